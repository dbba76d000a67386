//! Token usage as the upstream reports it (OpenAI `usage`), read by one parser for both callers: the
//! budget (`guards::budget::admission`) settles every budgeted response from it, so it reads only the
//! end of a body; extraction (`signals::extract`) records prompt and completion tokens per arm.
//!
//! The `data:` line of a text/event-stream is read here too, for the budget's backwards scan and for the
//! extractor's forward framer alike.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::capture::Capture;

/// A `usage` object: each count as sent, so one reader serves the budget (which trusts a usage only when
/// every count in it is one) and extraction (which takes each count that is one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    prompt_tokens: Count,
    #[serde(default)]
    completion_tokens: Count,
    #[serde(default)]
    total_tokens: Count,
}

/// One token count of a `usage` object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Count {
    /// Missing or `null`.
    #[default]
    Absent,
    Tokens(u64),
    /// Present but not a count (negative, fractional, a string, …).
    Other,
}

impl Usage {
    /// The `usage` object of a parsed document (a JSON body or one event of a stream), if it has one.
    pub fn of(doc: &Value) -> Option<Usage> {
        let usage = doc.get("usage").filter(|u| u.is_object())?;
        Usage::deserialize(usage).ok()
    }

    pub fn prompt_tokens(&self) -> Option<u64> {
        self.prompt_tokens.tokens()
    }

    pub fn completion_tokens(&self) -> Option<u64> {
        self.completion_tokens.tokens()
    }

    /// Total tokens: `total_tokens`, else prompt + completion. `None` when a count is malformed: the
    /// budget then keeps the reservation rather than charge a guess.
    pub fn total(&self) -> Option<u64> {
        let counts = [
            self.prompt_tokens,
            self.completion_tokens,
            self.total_tokens,
        ];
        if counts.contains(&Count::Other) {
            return None;
        }
        self.total_tokens
            .tokens()
            .or(match (self.prompt_tokens(), self.completion_tokens()) {
                (None, None) => None,
                (p, c) => Some(p.unwrap_or(0).saturating_add(c.unwrap_or(0))),
            })
    }
}

impl Count {
    fn tokens(self) -> Option<u64> {
        match self {
            Count::Tokens(n) => Some(n),
            Count::Absent | Count::Other => None,
        }
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Count, D::Error> {
        deserializer.deserialize_any(CountVisitor)
    }
}

/// Takes any JSON value without failing: a count is kept, `null` is absent, the rest is [`Count::Other`].
struct CountVisitor;

impl<'de> Visitor<'de> for CountVisitor {
    type Value = Count;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a token count")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Count, E> {
        Ok(Count::Tokens(n))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Count, E> {
        Ok(u64::try_from(n).map_or(Count::Other, Count::Tokens))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Count, E> {
        Ok(Count::Other)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Count, E> {
        Ok(Count::Other)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Count, E> {
        Ok(Count::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Count, E> {
        Ok(Count::Absent)
    }

    fn visit_none<E: de::Error>(self) -> Result<Count, E> {
        Ok(Count::Absent)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Count::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Count::Other)
    }
}

/// A document read only for its `usage`: the rest of a body is skipped, not built.
#[derive(Deserialize)]
struct UsageDoc {
    usage: Option<Usage>,
}

/// The value of a text/event-stream `data` field line: what follows the first ':' less one leading
/// space (a bare `data` line has an empty value). `None` for any other line.
#[inline]
pub fn sse_data(line: &[u8]) -> Option<&[u8]> {
    // The field name is what precedes the first ':': `data` exactly, so only the prefix is looked at.
    let rest = line.strip_prefix(b"data")?;
    match rest.split_first() {
        None => Some(rest),
        Some((b':', value)) => Some(value.strip_prefix(b" ").unwrap_or(value)),
        Some(_) => None,
    }
}

/// Total tokens in the response's `usage` (OpenAI format); for SSE the last event that carries one.
///
/// A JSON body is read from its end: the last `"usage"` key's object (OpenAI puts it last), which spares
/// parsing the whole answer on every response; only when that fails is the whole body parsed.
pub fn reported_usage(body: &[u8], sse: bool) -> Option<u64> {
    if !sse {
        return usage_in_tail(body).or_else(|| {
            serde_json::from_slice::<UsageDoc>(body)
                .ok()?
                .usage?
                .total()
        });
    }
    let finder = memchr::memmem::Finder::new(b"\"usage\"");
    body.split(|b| *b == b'\n')
        .rev()
        .filter_map(sse_data)
        .filter(|data| finder.find(data).is_some())
        .find_map(|data| {
            serde_json::from_slice::<UsageDoc>(data.trim_ascii())
                .ok()?
                .usage?
                .total()
        })
}

/// The last `"usage": {...}` object in a (fragment of) JSON: found by a reverse substring search, so
/// only the end of a body is looked at, and only that object is parsed.
pub fn usage_in_tail(tail: &[u8]) -> Option<u64> {
    let key = memchr::memmem::rfind(tail, b"\"usage\"")?;
    let after = tail[key + 7..].trim_ascii_start().strip_prefix(b":")?;
    let open = tail.len() - after.trim_ascii_start().strip_prefix(b"{")?.len() - 1;
    let mut depth = 0usize;
    for (i, b) in tail[open..].iter().enumerate() {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    let usage: Usage = serde_json::from_slice(&tail[open..=open + i]).ok()?;
                    return usage.total();
                }
            }
            _ => {}
        }
    }
    None
}

/// Bytes kept from the end of a response however long it is: `usage` comes last.
const TAIL: usize = 16 * 1024;

/// What of a response the usage is read from: the whole body while it fits `cap`, and always its last
/// [`TAIL`] bytes, so a long stream's final usage event is never cut off.
pub struct UsageTap {
    head: Capture,
    tail: VecDeque<Bytes>,
    tail_len: usize,
}

impl UsageTap {
    pub fn new(cap: usize) -> Self {
        UsageTap {
            head: Capture::new(cap),
            tail: VecDeque::new(),
            tail_len: 0,
        }
    }

    #[inline]
    pub fn push(&mut self, data: &Bytes) {
        self.head.push(data);
        self.tail.push_back(data.clone());
        self.tail_len += data.len();
        while self
            .tail
            .front()
            .is_some_and(|f| self.tail_len - f.len() >= TAIL)
        {
            if let Some(f) = self.tail.pop_front() {
                self.tail_len -= f.len();
            }
        }
    }

    /// Total tokens the response reported.
    pub fn usage(self, sse: bool) -> Option<u64> {
        if !self.head.truncated {
            return reported_usage(&self.head.into_bytes(), sse);
        }
        let mut tail = BytesMut::with_capacity(self.tail_len);
        for part in &self.tail {
            tail.extend_from_slice(part);
        }
        if sse {
            reported_usage(&tail, true)
        } else {
            usage_in_tail(&tail)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_from_json_and_sse() {
        let json = br#"{"answer":"x","usage":{"prompt_tokens":10,"completion_tokens":5}}"#;
        assert_eq!(reported_usage(json, false), Some(15));
        assert_eq!(
            reported_usage(br#"{"usage":{"total_tokens":42}}"#, false),
            Some(42)
        );
        assert_eq!(reported_usage(br#"{"answer":"x"}"#, false), None);
        // Read from the end: the key, not an earlier string value; whitespace and later keys allowed.
        assert_eq!(
            reported_usage(
                br#"{"topic":"usage","usage" : {"total_tokens":5},"model":"m"}"#,
                false
            ),
            Some(5)
        );
        assert_eq!(
            reported_usage(br#"{"usage": null, "answer": "the "usage" policy"}"#, false),
            None
        );
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\ndata: [DONE]\n\n";
        assert_eq!(reported_usage(sse, true), Some(10));
        assert_eq!(reported_usage(b"data: {\"choices\":[]}\n\n", true), None);
    }

    #[test]
    fn a_malformed_count_is_not_charged_but_the_others_are_extracted() {
        // The budget keeps the reservation; an earlier event with a clean usage still counts.
        assert_eq!(
            reported_usage(
                br#"{"usage":{"prompt_tokens":-1,"completion_tokens":5}}"#,
                false
            ),
            None
        );
        let sse = b"data: {\"usage\":{\"total_tokens\":9}}\n\ndata: {\"usage\":{\"total_tokens\":\"x\"}}\n\n";
        assert_eq!(reported_usage(sse, true), Some(9));
        // Extraction takes each count that is one.
        let doc = serde_json::json!({"usage": {"prompt_tokens": 3, "completion_tokens": 1.5}});
        let usage = Usage::of(&doc).unwrap();
        assert_eq!(
            (usage.prompt_tokens(), usage.completion_tokens()),
            (Some(3), None)
        );
        assert_eq!(usage.total(), None);
        assert_eq!(Usage::of(&serde_json::json!({"usage": 7})), None);
        assert_eq!(Usage::of(&serde_json::json!({"usage": [1, 2]})), None);
        assert_eq!(Usage::of(&serde_json::json!([1])), None);
    }

    #[test]
    fn sse_data_lines() {
        assert_eq!(sse_data(b"data: {}"), Some(&b"{}"[..]));
        assert_eq!(sse_data(b"data:{}"), Some(&b"{}"[..]));
        assert_eq!(sse_data(b"data:  x"), Some(&b" x"[..]));
        assert_eq!(sse_data(b"data"), Some(&b""[..]));
        assert_eq!(sse_data(b"event: data"), None);
        assert_eq!(sse_data(b": data"), None);
        assert_eq!(sse_data(b"datum: x"), None);
    }

    #[test]
    fn usage_of_a_body_longer_than_the_cap() {
        let filler = Bytes::from(vec![b'x'; 10_000]);
        let mut json = UsageTap::new(4096);
        json.push(&Bytes::from_static(b"{\"answer\":\""));
        for _ in 0..10 {
            json.push(&filler);
        }
        json.push(&Bytes::from_static(
            b"\",\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":900}}",
        ));
        assert_eq!(json.usage(false), Some(907));
        let mut sse = UsageTap::new(4096);
        for _ in 0..10 {
            sse.push(&Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}}]}\n\n"));
            sse.push(&filler);
            sse.push(&Bytes::from_static(b"\n\n"));
        }
        sse.push(&Bytes::from_static(
            b"data: {\"choices\":[],\"usage\":{\"total_tokens\":15}}\n\ndata: [DONE]\n\n",
        ));
        assert_eq!(sse.usage(true), Some(15));
    }
}
