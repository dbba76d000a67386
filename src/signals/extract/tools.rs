//! Tool calls of a response: whole calls from a message, and streamed fragments assembled by `index`
//! (the input of the tool-loop measure).

use std::collections::BTreeMap;

use serde_json::Value;

use super::first_choice;
use super::pointer::{walk, Segment};

/// Streamed tool-call fragments, by their `index`.
#[derive(Debug, Default)]
pub(super) struct ToolCallAssembly {
    calls: BTreeMap<u64, (String, String)>,
    last: Option<u64>,
}
/// Most tool calls kept per response: a runaway stream cannot grow the assembly without bound.
pub(super) const MAX_TOOL_CALLS: usize = 1024;
pub(super) fn collect_whole_tool_calls(response: &Value, out: &mut Vec<(String, String)>) {
    let Some(calls) = first_choice(response).and_then(|c| c.pointer("/message/tool_calls")) else {
        return;
    };
    let mut matched = Vec::new();
    walk(calls, &[Segment::Any], &mut matched);
    for call in matched {
        let Some(function) = call.get("function") else {
            continue;
        };
        let Some(name) = function
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        else {
            continue;
        };
        if out.len() < MAX_TOOL_CALLS {
            out.push((name.to_owned(), arguments_text(function.get("arguments"))));
        }
    }
}

/// Tool-call arguments as sent when a string (the OpenAI form), else their compact JSON.
fn arguments_text(arguments: Option<&Value>) -> String {
    match arguments {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}
// === impl ToolCallAssembly ===

impl ToolCallAssembly {
    pub(super) fn absorb(&mut self, fragment: &Value) {
        let function = fragment.get("function");
        let name = function
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let next_free = || {
            self.calls
                .keys()
                .next_back()
                .map_or(0, |last| last.saturating_add(1))
        };
        let index = match (fragment.get("index").and_then(Value::as_u64), self.last) {
            (Some(index), _) => index,
            (None, Some(last)) if name.is_empty() => last,
            (None, _) => next_free(),
        };
        if !self.calls.contains_key(&index) && self.calls.len() >= MAX_TOOL_CALLS {
            return;
        }
        let (call_name, arguments) = self.calls.entry(index).or_default();
        // OpenAI sends the name once; some servers repeat it in every fragment.
        if call_name != name {
            call_name.push_str(name);
        }
        match function.and_then(|f| f.get("arguments")) {
            None | Some(Value::Null) => {}
            Some(Value::String(piece)) => arguments.push_str(piece),
            Some(other) => arguments.push_str(&other.to_string()),
        }
        self.last = Some(index);
    }

    pub(super) fn finish(self) -> impl Iterator<Item = (String, String)> {
        self.calls
            .into_values()
            .filter(|(name, _)| !name.is_empty())
    }
}
