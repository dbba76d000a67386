//! The streamed (text/event-stream) response: an incremental parser the evaluation feeds with the teed
//! copy, keeping only the unfinished line and event plus what it has extracted so far.

use std::ops::ControlFlow;

use serde_json::Value;

use super::tools::{collect_whole_tool_calls, ToolCallAssembly, MAX_TOOL_CALLS};
use super::{default_answer, first_choice, non_blank, text_of_matches, Sources};
use crate::signals::usage::{sse_data, Usage};

/// Incremental text/event-stream parser that extracts the response pieces of a streamed answer.
///
/// Feed it what the tee copies (at most `signals.max_body_bytes`) and call [`SseParser::mark_truncated`]
/// when the copy stops at the cap; it holds the unfinished line and event, never the whole stream.
#[derive(Debug)]
pub struct SseParser {
    sources: Sources,
    framer: Framer,
    truncated: bool,
    done: bool,
    events: u64,
    bad_events: u64,
    deltas: String,
    saw_delta: bool,
    whole_answer: Option<String>,
    chunks: Vec<String>,
    anchor: Option<String>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    whole_tool_calls: Vec<(String, String)>,
    streamed_tool_calls: ToolCallAssembly,
}

/// The response pieces of a finished stream, plus how the stream went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseResult {
    pub answer: Option<String>,
    pub chunks: Vec<String>,
    pub anchor: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub tool_calls: Vec<(String, String)>,
    /// Events with a non-blank data payload, `[DONE]` excluded.
    pub events: u64,
    /// Events whose payload was not JSON; they were skipped.
    pub bad_events: u64,
    /// The stream ended with `data: [DONE]`.
    pub done: bool,
    /// The stream was cut at the tee cap; the unfinished last event was dropped.
    pub truncated: bool,
}
/// text/event-stream framing: bytes in, data payloads out. Holds the unfinished line and event only.
#[derive(Debug, Default)]
pub(super) struct Framer {
    line: Vec<u8>,
    data: Vec<u8>,
    /// The last chunk ended in '\r': a '\n' starting the next one belongs to the same line break.
    after_cr: bool,
    seen_first_line: bool,
}

// === impl SseParser ===

impl SseParser {
    pub(super) fn new(sources: Sources) -> SseParser {
        SseParser {
            sources,
            framer: Framer::default(),
            truncated: false,
            done: false,
            events: 0,
            bad_events: 0,
            deltas: String::new(),
            saw_delta: false,
            whole_answer: None,
            chunks: Vec::new(),
            anchor: None,
            prompt_tokens: None,
            completion_tokens: None,
            whole_tool_calls: Vec::new(),
            streamed_tool_calls: ToolCallAssembly::default(),
        }
    }

    /// Feeds the next bytes of the stream, split anywhere.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.done {
            return;
        }
        let mut framer = std::mem::take(&mut self.framer);
        framer.push(chunk, &mut |payload| self.on_event(payload));
        self.framer = framer;
    }

    /// The stream was cut at the tee cap: the unfinished last event will be dropped, not dispatched.
    pub fn mark_truncated(&mut self) {
        self.truncated = true;
    }

    /// Events parsed so far whose payload was not JSON.
    pub fn bad_events(&self) -> u64 {
        self.bad_events
    }

    /// Ends the stream. A complete stream's last event counts even without the closing blank line.
    pub fn finish(mut self) -> SseResult {
        if !self.done && !self.truncated {
            let mut framer = std::mem::take(&mut self.framer);
            framer.finish(&mut |payload| self.on_event(payload));
        }
        let answer = if self.saw_delta {
            non_blank(self.deltas)
        } else {
            self.whole_answer
        };
        let mut tool_calls = self.whole_tool_calls;
        tool_calls.extend(self.streamed_tool_calls.finish());
        tool_calls.truncate(MAX_TOOL_CALLS);
        SseResult {
            answer,
            chunks: self.chunks,
            anchor: self.anchor,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            tool_calls,
            events: self.events,
            bad_events: self.bad_events,
            done: self.done,
            truncated: self.truncated,
        }
    }

    fn on_event(&mut self, payload: &[u8]) -> ControlFlow<()> {
        if payload.iter().all(u8::is_ascii_whitespace) {
            return ControlFlow::Continue(());
        }
        if payload.trim_ascii() == b"[DONE]" {
            self.done = true;
            return ControlFlow::Break(());
        }
        self.events += 1;
        match serde_json::from_slice::<Value>(payload) {
            Ok(event) => self.absorb(&event),
            Err(_) => self.bad_events += 1,
        }
        ControlFlow::Continue(())
    }

    fn absorb(&mut self, event: &Value) {
        match &self.sources.answer {
            Some(pointer) => {
                for piece in pointer.matches(event).into_iter().filter_map(Value::as_str) {
                    self.deltas.push_str(piece);
                    self.saw_delta = true;
                }
            }
            None => {
                let choice = first_choice(event);
                if let Some(piece) = choice
                    .and_then(|c| c.pointer("/delta/content"))
                    .and_then(Value::as_str)
                {
                    self.deltas.push_str(piece);
                    self.saw_delta = true;
                }
                if let Some(whole) = default_answer(event) {
                    self.whole_answer = Some(whole);
                }
            }
        }
        self.sources.collect_chunks(event, &mut self.chunks);
        if self.anchor.is_none() {
            self.anchor = self
                .sources
                .anchor
                .as_ref()
                .and_then(|p| text_of_matches(p.matches(event)));
        }
        if let Some(usage) = Usage::of(event) {
            if let Some(tokens) = usage.prompt_tokens() {
                self.prompt_tokens = Some(tokens);
            }
            if let Some(tokens) = usage.completion_tokens() {
                self.completion_tokens = Some(tokens);
            }
        }
        collect_whole_tool_calls(event, &mut self.whole_tool_calls);
        if let Some(Value::Array(fragments)) =
            first_choice(event).and_then(|c| c.pointer("/delta/tool_calls"))
        {
            fragments
                .iter()
                .for_each(|fragment| self.streamed_tool_calls.absorb(fragment));
        }
    }
}

// === impl Framer ===

impl Framer {
    /// Splits `chunk` into lines and hands each dispatched event's data to `on_event` until it breaks.
    pub(super) fn push(
        &mut self,
        mut chunk: &[u8],
        on_event: &mut impl FnMut(&[u8]) -> ControlFlow<()>,
    ) {
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                chunk = &chunk[1..];
            }
        }
        while let Some(end) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&chunk[..end]);
            let was_cr = chunk[end] == b'\r';
            chunk = &chunk[end + 1..];
            if was_cr {
                match chunk.first() {
                    Some(b'\n') => chunk = &chunk[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            if self.end_line(on_event).is_break() {
                return;
            }
        }
        self.line.extend_from_slice(chunk);
    }

    /// End of input: an unterminated last line and an undispatched last event still count.
    pub(super) fn finish(&mut self, on_event: &mut impl FnMut(&[u8]) -> ControlFlow<()>) {
        if !self.line.is_empty() && self.end_line(on_event).is_break() {
            return;
        }
        let _ = self.dispatch(on_event);
    }

    fn end_line(&mut self, on_event: &mut impl FnMut(&[u8]) -> ControlFlow<()>) -> ControlFlow<()> {
        let mut line = std::mem::take(&mut self.line);
        let flow = self.field(&line, on_event);
        line.clear();
        self.line = line;
        flow
    }

    fn field(
        &mut self,
        mut line: &[u8],
        on_event: &mut impl FnMut(&[u8]) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        if !self.seen_first_line {
            self.seen_first_line = true;
            line = line.strip_prefix("\u{feff}".as_bytes()).unwrap_or(line);
        }
        if line.is_empty() {
            return self.dispatch(on_event);
        }
        // Comments and the event, id and retry fields say nothing about the answer.
        if let Some(value) = sse_data(line) {
            self.data.extend_from_slice(value);
            self.data.push(b'\n');
        }
        ControlFlow::Continue(())
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(&[u8]) -> ControlFlow<()>) -> ControlFlow<()> {
        if self.data.is_empty() {
            return ControlFlow::Continue(());
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop();
        let flow = on_event(&data);
        data.clear();
        self.data = data;
        flow
    }
}
