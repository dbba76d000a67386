//! JSON pointers with a `*` wildcard: what the `signals.question|retrieved|answer|anchor` settings are
//! parsed into (by the extractor, and by the config check so a bad pointer fails at load).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde_json::Value;

use super::ExtractError;

/// A JSON pointer (RFC 6901) in which a whole `*` segment matches every element of an array and every
/// value of an object. A literal `*` key therefore cannot be addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment {
    Key(Cow<'static, str>),
    Any,
}

/// The default chunks: every element of `/contexts`.
pub(super) const CONTEXTS_ANY: &[Segment] =
    &[Segment::Key(Cow::Borrowed("contexts")), Segment::Any];

// === impl Pointer ===

impl Pointer {
    /// Parses `""` (the whole document) or `/segment/...` with `~0` for `~` and `~1` for `/`.
    pub fn parse(text: &str) -> Result<Pointer, ExtractError> {
        let problem = |problem| ExtractError::Pointer {
            pointer: text.to_owned(),
            problem,
        };
        if text.is_empty() {
            return Ok(Pointer {
                text: String::new(),
                segments: Vec::new(),
            });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(problem("it must be empty or start with '/'"));
        };
        let mut segments = Vec::new();
        for raw in rest.split('/') {
            if raw == "*" {
                segments.push(Segment::Any);
                continue;
            }
            let mut key = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c != '~' {
                    key.push(c);
                    continue;
                }
                match chars.next() {
                    Some('0') => key.push('~'),
                    Some('1') => key.push('/'),
                    _ => return Err(problem("'~' must be followed by 0 or 1")),
                }
            }
            segments.push(Segment::Key(Cow::Owned(key)));
        }
        Ok(Pointer {
            text: text.to_owned(),
            segments,
        })
    }

    /// Every value the pointer reaches, in document order (object values in the map's key order).
    pub fn matches<'a>(&self, doc: &'a Value) -> Vec<&'a Value> {
        let mut out = Vec::new();
        walk(doc, &self.segments, &mut out);
        out
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for Pointer {
    type Err = ExtractError;

    fn from_str(text: &str) -> Result<Pointer, ExtractError> {
        Pointer::parse(text)
    }
}

impl fmt::Display for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

pub(super) fn walk<'a>(value: &'a Value, segments: &[Segment], out: &mut Vec<&'a Value>) {
    let Some((segment, rest)) = segments.split_first() else {
        out.push(value);
        return;
    };
    match (segment, value) {
        (Segment::Any, Value::Array(items)) => items.iter().for_each(|item| walk(item, rest, out)),
        (Segment::Any, Value::Object(fields)) => {
            fields.values().for_each(|item| walk(item, rest, out))
        }
        (Segment::Key(key), Value::Object(fields)) => {
            if let Some(item) = fields.get(key.as_ref()) {
                walk(item, rest, out);
            }
        }
        (Segment::Key(key), Value::Array(items)) => {
            if let Some(item) = array_index(key).and_then(|i| items.get(i)) {
                walk(item, rest, out);
            }
        }
        _ => {}
    }
}

/// RFC 6901 array index: "0" or digits without a leading zero ("-", past the end, matches nothing).
fn array_index(key: &str) -> Option<usize> {
    let digits_only = !key.is_empty() && key.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || (key.len() > 1 && key.starts_with('0')) {
        return None;
    }
    key.parse().ok()
}
