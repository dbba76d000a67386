//! Reading a multi-document YAML stream for `inject`: where the documents start, what a rewritten one
//! keeps of its leading comments, and the small lookups into a parsed document.

use serde_yaml_ng::{Mapping, Value};

use super::InjectError;

/// One `---`-separated piece of the input, kept verbatim unless it changes.
pub(super) struct Chunk {
    pub(super) text: String,
    pub(super) value: Option<Value>,
    pub(super) doc: usize,
    pub(super) changed: bool,
}

/// Whether `line` opens a new document (`---` alone or followed by a space or tab).
fn is_marker(line: &str) -> bool {
    let line = line.trim_end_matches(['\n', '\r']);
    line == "---" || line.starts_with("--- ") || line.starts_with("---\t")
}

/// Splits the stream at its document markers and parses each piece.
pub(super) fn parse(input: &str) -> Result<Vec<Chunk>, InjectError> {
    let mut pieces: Vec<String> = vec![String::new()];
    for line in input.split_inclusive('\n') {
        if is_marker(line) && pieces.last().is_some_and(|p| !p.is_empty()) {
            pieces.push(String::new());
        }
        if let Some(last) = pieces.last_mut() {
            last.push_str(line);
        }
    }
    let mut chunks = Vec::with_capacity(pieces.len());
    let mut doc = 0;
    for text in pieces {
        let has_content = text.lines().any(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#') && !is_marker(l) && t != "..."
        });
        if !has_content {
            chunks.push(Chunk {
                text,
                value: None,
                doc,
                changed: false,
            });
            continue;
        }
        doc += 1;
        let value: Value = serde_yaml_ng::from_str(&text).map_err(|e| InjectError::NotYaml {
            doc,
            message: e.to_string(),
        })?;
        match &value {
            Value::Mapping(m) if m.get("kind").and_then(Value::as_str).is_some() => {}
            Value::Mapping(_) => {
                return Err(InjectError::NotObject {
                    doc,
                    message: "it has no `kind`".into(),
                })
            }
            _ => {
                return Err(InjectError::NotObject {
                    doc,
                    message: "it is not a mapping".into(),
                })
            }
        }
        chunks.push(Chunk {
            text,
            value: Some(value),
            doc,
            changed: false,
        });
    }
    Ok(chunks)
}

/// The marker line and the comment or blank lines before a document's content, kept on a rewrite.
pub(super) fn leading_lines(text: &str) -> String {
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if is_marker(line) {
            // Content after the marker (`--- # note`) is a comment or a tag; keep only the marker.
            out.push_str("---\n");
        } else if t.is_empty() || t.starts_with('#') {
            out.push_str(line);
        } else {
            break;
        }
    }
    out
}

pub(super) fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut v = value;
    for key in path {
        v = v.get(*key)?;
    }
    v.as_str()
}

/// `value[key]` as a mapping, created (or replacing a null) when absent.
pub(super) fn mapping_entry<'a>(value: &'a mut Value, key: &str) -> Option<&'a mut Mapping> {
    let map = value.as_mapping_mut()?;
    let entry = map
        .entry(Value::from(key))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if entry.is_null() {
        *entry = Value::Mapping(Mapping::new());
    }
    entry.as_mapping_mut()
}

pub(super) fn sequence_entry<'a>(map: &'a mut Mapping, key: &str) -> Option<&'a mut Vec<Value>> {
    let entry = map
        .entry(Value::from(key))
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if entry.is_null() {
        *entry = Value::Sequence(Vec::new());
    }
    entry.as_sequence_mut()
}
