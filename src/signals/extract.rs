//! Extraction (SPEC §3): the question, the retrieved chunks, the answer, the anchor, the token usage and the
//! tool calls of one exchange, read from the teed copies of the request and response bodies.
//!
//! A signals worker hands the capped copies of both bodies to an [`Extractor`] and gets back plain text for
//! the embedder and the measures, or a [`Skip`] that labels why the sample cannot be evaluated. A streamed
//! (SSE) response goes through an [`SseParser`], which the proxy can feed chunk by chunk while the stream
//! passes through; it keeps only the unfinished line and event plus what it has extracted so far.
//!
//! Rules chosen where SPEC §3 is silent:
//! - A configured pointer replaces the defaults of its piece; it never falls back to them, so a wrong
//!   pointer shows up as skips instead of quietly measuring something else.
//! - Question, answer and anchor: each match gives its text — a string, or the text parts of an array of
//!   content parts (`"..."` or `{"type": "text", "text": "..."}`) joined with "\n" — and the texts of several
//!   matches are joined with "\n". Blank (empty or whitespace-only) text counts as missing.
//! - Retrieved chunks: strings only, in document order; blank strings are dropped. The default takes each
//!   element of `/contexts/*` that is a string, or else its `text` string, so mixed lists keep their order.
//! - The anchor pointer is tried on the request body first (a gold set sends the expected answer along with
//!   the question), then on the response body; with no anchor found the caller uses the answer.
//! - OpenAI's `choices[0]` is the first element of `choices` unless it carries an `index` other than 0: with
//!   `n > 1` a stream sends one choice per event and only choice 0 is the answer.
//! - An empty body is an empty document, not malformed JSON: an empty request lacks a question (`NoQuestion`),
//!   an empty response an answer (`NoAnswer`).
//! - A truncated JSON body is `Truncated` without being parsed; a truncated SSE stream keeps its complete
//!   events and drops the cut one. An SSE stream whose events were all malformed is `ResponseNotJson`.
//! - Skip precedence, first wins: request truncated, request not JSON, response truncated, response not
//!   JSON, no question, no answer, no chunks. [`Extractor::gather`] returns what could be read alongside the
//!   skip, because token usage and tool calls (a tool-calling turn has no answer) count even when ΔS cannot.
//! - SSE answer: the concatenated `choices[0].delta.content`; a stream without deltas falls back to the last
//!   whole answer an event carried (`/choices/0/message/content`, else `/answer`). A configured answer pointer
//!   is applied to every event and its string matches are concatenated. Usage: the last event that sends a
//!   value wins. Anchor: the first event that has one.
//! - Tool calls: whole calls (`/choices/0/message/tool_calls/*`) in order, then streamed fragments
//!   (`choices[0].delta.tool_calls[*]`) assembled by `index` in index order. A fragment without `index`
//!   continues the previous call unless it names a function, which starts a new one. Calls without a
//!   function name are dropped.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::ControlFlow;
use std::str::FromStr;

use serde_json::Value;

/// A configured pointer that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    #[error("{pointer:?} is not a JSON pointer: {problem}")]
    Pointer {
        pointer: String,
        problem: &'static str,
    },
    #[error("{key} = {pointer:?} is not a JSON pointer: {problem}")]
    Config {
        key: &'static str,
        pointer: String,
        problem: &'static str,
    },
}

/// Why a sample was not evaluated; `as_str` is the `reason` label of the skip metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skip {
    /// The request body is not JSON.
    RequestNotJson,
    /// The response body (or every event of the stream) is not JSON.
    ResponseNotJson,
    /// No question in the request.
    NoQuestion,
    /// No answer in the response.
    NoAnswer,
    /// No retrieved chunks in the response.
    NoChunks,
    /// A JSON body was cut at `signals.max_body_bytes`.
    Truncated,
}

/// What one exchange says, as far as it could be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    pub question: Option<String>,
    pub chunks: Vec<String>,
    pub answer: Option<String>,
    /// The gold anchor text; `None` means "use the answer".
    pub anchor: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// (function name, arguments) per tool call; arguments as sent when a string, else compact JSON.
    pub tool_calls: Vec<(String, String)>,
}

/// Reads the pieces of an exchange from its bodies, with the configured pointers or the defaults.
#[derive(Debug, Clone, Default)]
pub struct Extractor {
    sources: Sources,
}

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

/// A JSON pointer (RFC 6901) in which a whole `*` segment matches every element of an array and every
/// value of an object. A literal `*` key therefore cannot be addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(Cow<'static, str>),
    Any,
}

/// The configured pointers; `None` means the SPEC §3 default of that piece.
#[derive(Debug, Clone, Default)]
struct Sources {
    question: Option<Pointer>,
    retrieved: Option<Pointer>,
    answer: Option<Pointer>,
    anchor: Option<Pointer>,
}

/// text/event-stream framing: bytes in, data payloads out. Holds the unfinished line and event only.
#[derive(Debug, Default)]
struct Framer {
    line: Vec<u8>,
    data: Vec<u8>,
    /// The last chunk ended in '\r': a '\n' starting the next one belongs to the same line break.
    after_cr: bool,
    seen_first_line: bool,
}

/// Streamed tool-call fragments, by their `index`.
#[derive(Debug, Default)]
struct ToolCallAssembly {
    calls: BTreeMap<u64, (String, String)>,
    last: Option<u64>,
}

const CONTEXTS_ANY: &[Segment] = &[Segment::Key(Cow::Borrowed("contexts")), Segment::Any];
/// Most tool calls kept per response: a runaway stream cannot grow the assembly without bound.
const MAX_TOOL_CALLS: usize = 1024;

// === impl Skip ===

impl Skip {
    pub const ALL: [Skip; 6] = [
        Skip::RequestNotJson,
        Skip::ResponseNotJson,
        Skip::NoQuestion,
        Skip::NoAnswer,
        Skip::NoChunks,
        Skip::Truncated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Skip::RequestNotJson => "request_not_json",
            Skip::ResponseNotJson => "response_not_json",
            Skip::NoQuestion => "no_question",
            Skip::NoAnswer => "no_answer",
            Skip::NoChunks => "no_chunks",
            Skip::Truncated => "truncated",
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Extracted ===

impl Extracted {
    /// The first piece the evaluation needs and lacks: question, answer, then chunks.
    pub fn missing(&self) -> Option<Skip> {
        if self.question.is_none() {
            Some(Skip::NoQuestion)
        } else if self.answer.is_none() {
            Some(Skip::NoAnswer)
        } else if self.chunks.is_empty() {
            Some(Skip::NoChunks)
        } else {
            None
        }
    }
}

// === impl Extractor ===

impl Extractor {
    /// Builds an extractor from the `signals.question|retrieved|answer|anchor` settings; an empty string
    /// means the default of that piece.
    pub fn new(
        question: &str,
        retrieved: &str,
        answer: &str,
        anchor: &str,
    ) -> Result<Extractor, ExtractError> {
        Ok(Extractor {
            sources: Sources {
                question: configured("signals.question", question)?,
                retrieved: configured("signals.retrieved", retrieved)?,
                answer: configured("signals.answer", answer)?,
                anchor: configured("signals.anchor", anchor)?,
            },
        })
    }

    /// The pieces of an exchange, or why it cannot be evaluated (see the module doc for the rules).
    pub fn extract(
        &self,
        request: &[u8],
        request_truncated: bool,
        response: &[u8],
        response_truncated: bool,
        response_is_sse: bool,
    ) -> Result<Extracted, Skip> {
        match self.gather(
            request,
            request_truncated,
            response,
            response_truncated,
            response_is_sse,
        ) {
            (extracted, None) => Ok(extracted),
            (_, Some(skip)) => Err(skip),
        }
    }

    /// Everything that could be read, and the reason to skip the evaluation if there is one.
    pub fn gather(
        &self,
        request: &[u8],
        request_truncated: bool,
        response: &[u8],
        response_truncated: bool,
        response_is_sse: bool,
    ) -> (Extracted, Option<Skip>) {
        if response_is_sse {
            let mut parser = self.sse_parser();
            if response_truncated {
                parser.mark_truncated();
            }
            parser.push(response);
            return self.gather_with_sse(request, request_truncated, parser.finish());
        }
        let (request_doc, request_problem) =
            parse_body(request, request_truncated, Skip::RequestNotJson);
        let (response_doc, response_problem) =
            parse_body(response, response_truncated, Skip::ResponseNotJson);
        let mut extracted = self.request_side(request_doc.as_ref());
        if let Some(doc) = &response_doc {
            extracted.answer = self.answer(doc);
            self.sources.collect_chunks(doc, &mut extracted.chunks);
            extracted.anchor = extracted.anchor.or_else(|| self.anchor(doc));
            extracted.prompt_tokens = usage(doc, "/usage/prompt_tokens");
            extracted.completion_tokens = usage(doc, "/usage/completion_tokens");
            collect_whole_tool_calls(doc, &mut extracted.tool_calls);
        }
        let skip = request_problem
            .or(response_problem)
            .or_else(|| extracted.missing());
        (extracted, skip)
    }

    /// A parser for a streamed response, to be fed as the bytes pass and finished into an [`SseResult`].
    pub fn sse_parser(&self) -> SseParser {
        SseParser::new(self.sources.clone())
    }

    /// [`Extractor::extract`] for a response that went through [`Extractor::sse_parser`].
    pub fn extract_with_sse(
        &self,
        request: &[u8],
        request_truncated: bool,
        sse: SseResult,
    ) -> Result<Extracted, Skip> {
        match self.gather_with_sse(request, request_truncated, sse) {
            (extracted, None) => Ok(extracted),
            (_, Some(skip)) => Err(skip),
        }
    }

    /// [`Extractor::gather`] for a response that went through [`Extractor::sse_parser`].
    pub fn gather_with_sse(
        &self,
        request: &[u8],
        request_truncated: bool,
        sse: SseResult,
    ) -> (Extracted, Option<Skip>) {
        let (request_doc, request_problem) =
            parse_body(request, request_truncated, Skip::RequestNotJson);
        let mut extracted = self.request_side(request_doc.as_ref());
        let all_bad = sse.events > 0 && sse.bad_events == sse.events;
        extracted.answer = sse.answer;
        extracted.chunks = sse.chunks;
        extracted.anchor = extracted.anchor.or(sse.anchor);
        extracted.prompt_tokens = sse.prompt_tokens;
        extracted.completion_tokens = sse.completion_tokens;
        extracted.tool_calls = sse.tool_calls;
        let response_problem = all_bad.then_some(Skip::ResponseNotJson);
        let skip = request_problem
            .or(response_problem)
            .or_else(|| extracted.missing());
        (extracted, skip)
    }

    fn request_side(&self, request: Option<&Value>) -> Extracted {
        Extracted {
            question: request.and_then(|doc| self.question(doc)),
            anchor: request.and_then(|doc| self.anchor(doc)),
            ..Extracted::default()
        }
    }

    fn question(&self, request: &Value) -> Option<String> {
        match &self.sources.question {
            Some(pointer) => text_of_matches(pointer.matches(request)),
            None => last_user_message(request)
                .or_else(|| field_text(request, "question"))
                .or_else(|| field_text(request, "query")),
        }
    }

    fn answer(&self, response: &Value) -> Option<String> {
        match &self.sources.answer {
            Some(pointer) => text_of_matches(pointer.matches(response)),
            None => default_answer(response),
        }
    }

    fn anchor(&self, doc: &Value) -> Option<String> {
        self.sources
            .anchor
            .as_ref()
            .and_then(|pointer| text_of_matches(pointer.matches(doc)))
    }
}

impl Sources {
    fn collect_chunks(&self, response: &Value, chunks: &mut Vec<String>) {
        let mut push = |text: &str| {
            if !text.trim().is_empty() {
                chunks.push(text.to_owned());
            }
        };
        match &self.retrieved {
            Some(pointer) => pointer
                .matches(response)
                .into_iter()
                .filter_map(Value::as_str)
                .for_each(push),
            None => {
                let mut contexts = Vec::new();
                walk(response, CONTEXTS_ANY, &mut contexts);
                for context in contexts {
                    match context {
                        Value::String(text) => push(text),
                        other => {
                            if let Some(text) = other.get("text").and_then(Value::as_str) {
                                push(text);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn configured(key: &'static str, text: &str) -> Result<Option<Pointer>, ExtractError> {
    if text.is_empty() {
        return Ok(None);
    }
    Pointer::parse(text).map(Some).map_err(|err| match err {
        ExtractError::Pointer { pointer, problem }
        | ExtractError::Config {
            pointer, problem, ..
        } => ExtractError::Config {
            key,
            pointer,
            problem,
        },
    })
}

/// The parsed document, or `None` with the reason it could not be read. An empty body is an empty document.
fn parse_body(body: &[u8], truncated: bool, not_json: Skip) -> (Option<Value>, Option<Skip>) {
    if truncated {
        return (None, Some(Skip::Truncated));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return (None, None);
    }
    match serde_json::from_slice(body) {
        Ok(doc) => (Some(doc), None),
        Err(_) => (None, Some(not_json)),
    }
}

/// The text of the last `user` message of an OpenAI chat request.
fn last_user_message(request: &Value) -> Option<String> {
    let messages = request.get("messages")?.as_array()?;
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))?;
    text_of(last_user.get("content")?).and_then(non_blank)
}

fn field_text(doc: &Value, field: &str) -> Option<String> {
    text_of(doc.get(field)?).and_then(non_blank)
}

/// The non-streamed answer: `/choices/0/message/content`, else `/answer`.
fn default_answer(response: &Value) -> Option<String> {
    first_choice(response)
        .and_then(|choice| choice.pointer("/message/content"))
        .and_then(text_of)
        .and_then(non_blank)
        .or_else(|| field_text(response, "answer"))
}

/// OpenAI's `choices[0]`, unless that element says it is another choice (streams with `n > 1`).
fn first_choice(response: &Value) -> Option<&Value> {
    let choice = response.get("choices")?.get(0)?;
    match choice.get("index") {
        None | Some(Value::Null) => Some(choice),
        Some(index) if index.as_u64() == Some(0) => Some(choice),
        Some(_) => None,
    }
}

fn usage(doc: &Value, pointer: &str) -> Option<u64> {
    doc.pointer(pointer).and_then(Value::as_u64)
}

fn collect_whole_tool_calls(response: &Value, out: &mut Vec<(String, String)>) {
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

/// The text of a content value: a string, or the text parts of an array of content parts joined with "\n".
fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Array(parts) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter_map(part_text)
                .filter(|t| !t.trim().is_empty())
                .collect();
            (!texts.is_empty()).then(|| texts.join("\n"))
        }
        _ => None,
    }
}

fn part_text(part: &Value) -> Option<&str> {
    match part {
        Value::String(text) => Some(text),
        Value::Object(fields) => {
            let is_text = match fields.get("type") {
                None => true,
                Some(kind) => matches!(kind.as_str(), Some("text" | "input_text" | "output_text")),
            };
            if is_text {
                fields.get("text")?.as_str()
            } else {
                None
            }
        }
        _ => None,
    }
}

fn text_of_matches(matches: Vec<&Value>) -> Option<String> {
    let texts: Vec<String> = matches
        .into_iter()
        .filter_map(text_of)
        .filter_map(non_blank)
        .collect();
    (!texts.is_empty()).then(|| texts.join("\n"))
}

fn non_blank(text: String) -> Option<String> {
    if text.trim().is_empty() {
        None
    } else {
        Some(text)
    }
}

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

fn walk<'a>(value: &'a Value, segments: &[Segment], out: &mut Vec<&'a Value>) {
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

// === impl SseParser ===

impl SseParser {
    fn new(sources: Sources) -> SseParser {
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
        if let Some(tokens) = usage(event, "/usage/prompt_tokens") {
            self.prompt_tokens = Some(tokens);
        }
        if let Some(tokens) = usage(event, "/usage/completion_tokens") {
            self.completion_tokens = Some(tokens);
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
    fn push(&mut self, mut chunk: &[u8], on_event: &mut impl FnMut(&[u8]) -> ControlFlow<()>) {
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
    fn finish(&mut self, on_event: &mut impl FnMut(&[u8]) -> ControlFlow<()>) {
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
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        // Comments (empty name) and the event, id and retry fields say nothing about the answer.
        if name == b"data" {
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

// === impl ToolCallAssembly ===

impl ToolCallAssembly {
    fn absorb(&mut self, fragment: &Value) {
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

    fn finish(self) -> impl Iterator<Item = (String, String)> {
        self.calls
            .into_values()
            .filter(|(name, _)| !name.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defaults() -> Extractor {
        Extractor::default()
    }

    fn bytes(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    fn pointer(text: &str) -> Pointer {
        Pointer::parse(text).unwrap()
    }

    fn rag_response() -> Value {
        json!({
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}}],
            "contexts": [{"text": "Paris is the capital of France."}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3}
        })
    }

    fn gather_json(ex: &Extractor, request: &Value, response: &Value) -> (Extracted, Option<Skip>) {
        ex.gather(&bytes(request), false, &bytes(response), false, false)
    }

    // --- pointers ---

    #[test]
    fn pointer_empty_is_whole_document() {
        let doc = json!({"a": 1});
        assert_eq!(pointer("").matches(&doc), vec![&doc]);
    }

    #[test]
    fn pointer_rejects_missing_slash_and_bad_escapes() {
        for bad in ["a/b", "*", "/a~", "/a~2", "/~x"] {
            assert!(Pointer::parse(bad).is_err(), "{bad:?} should not parse");
        }
        let err = Extractor::new("", "contexts", "", "").unwrap_err();
        assert!(err.to_string().contains("signals.retrieved"), "{err}");
    }

    #[test]
    fn pointer_escapes() {
        let doc = json!({"a/b": {"m~n": 1}, "~1": 2});
        assert_eq!(pointer("/a~1b/m~0n").matches(&doc), vec![&json!(1)]);
        assert_eq!(pointer("/~01").matches(&doc), vec![&json!(2)]);
        assert_eq!(pointer("/a~1b/m~0n").to_string(), "/a~1b/m~0n");
    }

    #[test]
    fn pointer_array_indexes_follow_rfc_6901() {
        let doc = json!({"a": [10, 11, 12], "": {"": 5}});
        assert_eq!(pointer("/a/2").matches(&doc), vec![&json!(12)]);
        assert!(pointer("/a/02").matches(&doc).is_empty());
        assert!(pointer("/a/-").matches(&doc).is_empty());
        assert!(pointer("/a/3").matches(&doc).is_empty());
        assert_eq!(pointer("//").matches(&doc), vec![&json!(5)]);
    }

    #[test]
    fn pointer_wildcard_nested_arrays() {
        let doc = json!({"docs": [
            {"parts": [{"t": "a"}, {"t": "b"}]},
            {"parts": []},
            {"parts": [{"t": "c"}, {"x": "no"}]},
            {"other": 1}
        ]});
        let got: Vec<_> = pointer("/docs/*/parts/*/t")
            .matches(&doc)
            .into_iter()
            .cloned()
            .collect();
        assert_eq!(got, vec![json!("a"), json!("b"), json!("c")]);
        let grid = json!([[1, 2], [3], 4]);
        let got: Vec<_> = pointer("/*/*")
            .matches(&grid)
            .into_iter()
            .cloned()
            .collect();
        assert_eq!(got, vec![json!(1), json!(2), json!(3)]);
    }

    #[test]
    fn pointer_wildcard_object_values() {
        let doc = json!({"hits": {"a": {"text": "one"}, "b": {"text": "two"}, "c": {"score": 1}}});
        let got: Vec<_> = pointer("/hits/*/text")
            .matches(&doc)
            .into_iter()
            .cloned()
            .collect();
        assert_eq!(got, vec![json!("one"), json!("two")]);
    }

    #[test]
    fn pointer_missing_paths_match_nothing() {
        let doc = json!({"a": {"b": "s"}, "n": null});
        for missing in ["/x", "/a/c", "/a/b/c", "/a/b/*", "/n/*", "/a/0"] {
            assert!(pointer(missing).matches(&doc).is_empty(), "{missing}");
        }
    }

    // --- question ---

    #[test]
    fn question_last_user_message_wins() {
        let request = json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "First question?"},
            {"role": "assistant", "content": "First answer."},
            {"role": "user", "content": "Where is the Louvre?"},
            {"role": "assistant", "content": "(prefill)"}
        ]});
        let (x, skip) = gather_json(&defaults(), &request, &rag_response());
        assert_eq!(x.question.as_deref(), Some("Where is the Louvre?"));
        assert_eq!(skip, None);
    }

    #[test]
    fn question_from_array_of_content_parts() {
        let request = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Describe this picture."},
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
            {"type": "text", "text": "In one line."}
        ]}]});
        let (x, _) = gather_json(&defaults(), &request, &rag_response());
        assert_eq!(
            x.question.as_deref(),
            Some("Describe this picture.\nIn one line.")
        );
    }

    #[test]
    fn question_falls_back_to_question_then_query() {
        let ex = defaults();
        let (x, _) = gather_json(
            &ex,
            &json!({"question": "Q1", "query": "Q2"}),
            &rag_response(),
        );
        assert_eq!(x.question.as_deref(), Some("Q1"));
        let (x, _) = gather_json(&ex, &json!({"query": "Q2"}), &rag_response());
        assert_eq!(x.question.as_deref(), Some("Q2"));
        let no_user = json!({"messages": [{"role": "system", "content": "S"}], "query": "Q3"});
        let (x, _) = gather_json(&ex, &no_user, &rag_response());
        assert_eq!(x.question.as_deref(), Some("Q3"));
    }

    #[test]
    fn missing_or_blank_question_is_skipped() {
        let ex = defaults();
        for request in [
            json!({}),
            json!({"question": "   "}),
            json!({"messages": []}),
            json!([1, 2]),
        ] {
            assert_eq!(
                gather_json(&ex, &request, &rag_response()).1,
                Some(Skip::NoQuestion),
                "{request}"
            );
        }
        let empty_request = ex.extract(b"", false, &bytes(&rag_response()), false, false);
        assert_eq!(empty_request, Err(Skip::NoQuestion));
    }

    // --- response pieces ---

    #[test]
    fn chunks_from_contexts_text_and_string_elements() {
        let ex = defaults();
        let q = json!({"question": "q"});
        let objects =
            json!({"answer": "a", "contexts": [{"text": "one"}, {"id": 2}, {"text": "two"}]});
        assert_eq!(gather_json(&ex, &q, &objects).0.chunks, ["one", "two"]);
        let strings = json!({"answer": "a", "contexts": ["one", 2, "", "two"]});
        assert_eq!(gather_json(&ex, &q, &strings).0.chunks, ["one", "two"]);
        let mixed = json!({"answer": "a", "contexts": ["one", {"text": "two"}]});
        assert_eq!(gather_json(&ex, &q, &mixed).0.chunks, ["one", "two"]);
        let none = json!({"answer": "a", "contexts": []});
        assert_eq!(gather_json(&ex, &q, &none).1, Some(Skip::NoChunks));
    }

    #[test]
    fn answer_default_then_answer_field() {
        let ex = defaults();
        let q = json!({"question": "q"});
        let (x, _) = gather_json(&ex, &q, &rag_response());
        assert_eq!(x.answer.as_deref(), Some("Paris."));
        let plain = json!({"answer": "Lyon.", "contexts": ["c"]});
        assert_eq!(
            gather_json(&ex, &q, &plain).0.answer.as_deref(),
            Some("Lyon.")
        );
        let null_content = json!({"choices": [{"message": {"content": null}}], "answer": "Nice.", "contexts": ["c"]});
        assert_eq!(
            gather_json(&ex, &q, &null_content).0.answer.as_deref(),
            Some("Nice.")
        );
        let nothing = json!({"choices": [{"message": {"content": null}}], "contexts": ["c"]});
        assert_eq!(gather_json(&ex, &q, &nothing).1, Some(Skip::NoAnswer));
    }

    #[test]
    fn usage_tokens() {
        let (x, _) = gather_json(&defaults(), &json!({"question": "q"}), &rag_response());
        assert_eq!((x.prompt_tokens, x.completion_tokens), (Some(12), Some(3)));
        let bad = json!({"answer": "a", "contexts": ["c"], "usage": {"prompt_tokens": -1}});
        let (x, _) = gather_json(&defaults(), &json!({"question": "q"}), &bad);
        assert_eq!((x.prompt_tokens, x.completion_tokens), (None, None));
    }

    #[test]
    fn tool_calls_from_the_message() {
        let response = json!({"choices": [{"message": {"content": null, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "search", "arguments": "{\"q\": \"paris\"}"}},
            {"id": "2", "type": "function", "function": {"name": "lookup", "arguments": {"id": 7}}},
            {"id": "3", "type": "function", "function": {"arguments": "{}"}}
        ]}}]});
        let (x, skip) = gather_json(&defaults(), &json!({"question": "q"}), &response);
        assert_eq!(
            x.tool_calls,
            [
                ("search".to_owned(), "{\"q\": \"paris\"}".to_owned()),
                ("lookup".to_owned(), "{\"id\":7}".to_owned())
            ]
        );
        // A tool-calling turn has no answer: skipped for ΔS, but the calls are still there for loops.
        assert_eq!(skip, Some(Skip::NoAnswer));
    }

    #[test]
    fn configured_pointers_override_defaults() {
        let ex = Extractor::new("/input/text", "/sources/*/body", "/output", "/expected").unwrap();
        let request = json!({"input": {"text": "Q?"}, "question": "ignored", "expected": "Gold."});
        let response = json!({
            "output": "A.", "answer": "ignored",
            "sources": [{"body": "S1"}, {"body": "S2"}], "contexts": [{"text": "ignored"}]
        });
        let x = ex
            .extract(&bytes(&request), false, &bytes(&response), false, false)
            .unwrap();
        assert_eq!(x.question.as_deref(), Some("Q?"));
        assert_eq!(x.answer.as_deref(), Some("A."));
        assert_eq!(x.chunks, ["S1", "S2"]);
        assert_eq!(x.anchor.as_deref(), Some("Gold."));
    }

    #[test]
    fn configured_pointer_never_falls_back_to_defaults() {
        let ex = Extractor::new("/prompt", "", "", "").unwrap();
        let request = json!({"question": "default would find this"});
        assert_eq!(
            gather_json(&ex, &request, &rag_response()).1,
            Some(Skip::NoQuestion)
        );
    }

    #[test]
    fn anchor_from_request_first_then_response() {
        let ex = Extractor::new("", "", "", "/gold").unwrap();
        let mut response = rag_response();
        response["gold"] = json!("From the response.");
        let (x, _) = gather_json(
            &ex,
            &json!({"question": "q", "gold": "From the request."}),
            &response,
        );
        assert_eq!(x.anchor.as_deref(), Some("From the request."));
        let (x, _) = gather_json(&ex, &json!({"question": "q"}), &response);
        assert_eq!(x.anchor.as_deref(), Some("From the response."));
        let (x, _) = gather_json(
            &defaults(),
            &json!({"question": "q", "gold": "g"}),
            &response,
        );
        assert_eq!(x.anchor, None);
    }

    #[test]
    fn malformed_or_truncated_bodies_skip_with_their_reason() {
        let ex = defaults();
        let good_req = bytes(&json!({"question": "q"}));
        let good_resp = bytes(&rag_response());
        assert_eq!(
            ex.extract(b"{\"question\":", false, &good_resp, false, false),
            Err(Skip::RequestNotJson)
        );
        assert_eq!(
            ex.extract(&good_req, false, b"<html>502</html>", false, false),
            Err(Skip::ResponseNotJson)
        );
        assert_eq!(
            ex.extract(&good_req, false, &good_resp[..10], true, false),
            Err(Skip::Truncated)
        );
        assert_eq!(
            ex.extract(&good_req[..5], true, &good_resp, false, false),
            Err(Skip::Truncated)
        );
        assert_eq!(
            ex.extract(b"nope", false, b"nope", false, false),
            Err(Skip::RequestNotJson)
        );
        assert_eq!(
            ex.extract(&good_req, false, b"", false, false),
            Err(Skip::NoAnswer)
        );
        assert!(ex
            .extract(&good_req, false, &good_resp, false, false)
            .is_ok());
    }

    #[test]
    fn gather_keeps_usage_when_skipping() {
        let (x, skip) =
            defaults().gather(b"not json", false, &bytes(&rag_response()), false, false);
        assert_eq!(skip, Some(Skip::RequestNotJson));
        assert_eq!(x.prompt_tokens, Some(12));
    }

    #[test]
    fn skip_labels() {
        let labels: Vec<_> = Skip::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            labels,
            [
                "request_not_json",
                "response_not_json",
                "no_question",
                "no_answer",
                "no_chunks",
                "truncated"
            ]
        );
        assert_eq!(Skip::NoChunks.to_string(), "no_chunks");
    }

    // --- SSE ---

    const DELTAS: [&str; 5] = [
        "The capital",
        " of France",
        " is Paris",
        " — café",
        " ☕ 東京 no.",
    ];

    fn openai_stream(line_end: &str) -> Vec<u8> {
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        let mut events = vec![chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        )];
        events.extend(
            DELTAS
                .iter()
                .map(|d| chunk(json!({"content": d}), Value::Null)),
        );
        events.push(chunk(json!({}), json!("stop")));
        events.push(
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
            "contexts": [{"text": "Paris is the capital of France."}, {"text": "Café culture ☕."}],
            "usage": {"prompt_tokens": 57, "completion_tokens": 14, "total_tokens": 71}}),
        );
        let mut out = format!(": keep-alive{line_end}{line_end}");
        for event in events {
            out.push_str(&format!("data: {event}{line_end}{line_end}"));
        }
        out.push_str(&format!("data: [DONE]{line_end}{line_end}"));
        out.into_bytes()
    }

    fn assert_stream_result(result: &SseResult, what: &str) {
        assert_eq!(
            result.answer.as_deref(),
            Some(DELTAS.concat().as_str()),
            "{what}"
        );
        assert_eq!(
            result.chunks,
            ["Paris is the capital of France.", "Café culture ☕."],
            "{what}"
        );
        assert_eq!(
            (result.prompt_tokens, result.completion_tokens),
            (Some(57), Some(14)),
            "{what}"
        );
        assert_eq!(
            (result.events, result.bad_events, result.done),
            (8, 0, true),
            "{what}"
        );
    }

    fn parse_pieces(pieces: &[&[u8]]) -> SseResult {
        let mut parser = defaults().sse_parser();
        for piece in pieces {
            parser.push(piece);
        }
        parser.finish()
    }

    #[test]
    fn sse_stream_split_at_every_offset() {
        for line_end in ["\n", "\r\n", "\r"] {
            let stream = openai_stream(line_end);
            assert_stream_result(&parse_pieces(&[&stream]), "whole");
            for at in 0..=stream.len() {
                let (a, b) = stream.split_at(at);
                assert_stream_result(
                    &parse_pieces(&[a, b]),
                    &format!("{line_end:?} split at {at}"),
                );
            }
        }
    }

    #[test]
    fn sse_stream_in_one_byte_chunks() {
        for line_end in ["\n", "\r\n", "\r"] {
            let stream = openai_stream(line_end);
            let pieces: Vec<&[u8]> = stream.chunks(1).collect();
            assert_stream_result(
                &parse_pieces(&pieces),
                &format!("{line_end:?} one byte at a time"),
            );
        }
    }

    #[test]
    fn sse_through_extractor() {
        let ex = defaults();
        let request =
            bytes(&json!({"messages": [{"role": "user", "content": "What is the capital?"}]}));
        let x = ex
            .extract(&request, false, &openai_stream("\n"), false, true)
            .unwrap();
        assert_eq!(x.answer.as_deref(), Some(DELTAS.concat().as_str()));
        assert_eq!(x.chunks.len(), 2);
        assert_eq!(x.prompt_tokens, Some(57));
        let mut parser = ex.sse_parser();
        parser.push(&openai_stream("\r\n"));
        assert_eq!(ex.extract_with_sse(&request, false, parser.finish()), Ok(x));
    }

    #[test]
    fn sse_multibyte_char_split_across_chunks() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"日本\"}}]}\n\n".as_bytes();
        let inside = stream.iter().position(|&b| b >= 0x80).unwrap() + 1;
        let result = parse_pieces(&[
            &stream[..inside],
            &stream[inside..inside + 1],
            &stream[inside + 1..],
        ]);
        assert_eq!(result.answer.as_deref(), Some("日本"));
        assert_eq!(result.bad_events, 0);
    }

    fn payloads(stream: &[u8]) -> Vec<String> {
        let mut framer = Framer::default();
        let mut out = Vec::new();
        let mut collect = |data: &[u8]| {
            out.push(String::from_utf8_lossy(data).into_owned());
            ControlFlow::Continue(())
        };
        framer.push(stream, &mut collect);
        framer.finish(&mut collect);
        out
    }

    #[test]
    fn sse_multiline_data_joined_with_newline() {
        assert_eq!(
            payloads(b"data: one\ndata:two\ndata:  three\n\n"),
            ["one\ntwo\n three"]
        );
        let stream = b"data: {\"answer\":\ndata: \"joined\",\ndata: \"contexts\": [\"c\"]}\n\n";
        let result = parse_pieces(&[stream]);
        assert_eq!(result.answer.as_deref(), Some("joined"));
        assert_eq!(result.chunks, ["c"]);
    }

    #[test]
    fn sse_comments_and_other_fields_ignored() {
        let stream =
            b"\xEF\xBB\xBFevent: message\n: comment data: no\nid: 7\nretry: 10\ndata\ndata: x\n\n\
                       event: ping\n\n: only a comment\n\ndatum: y\n\n";
        assert_eq!(payloads(stream), ["\nx"]);
    }

    #[test]
    fn sse_done_ends_the_stream_and_bad_events_are_counted() {
        let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
                       data: not json\n\n\
                       data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\
                       data: [DONE]\n\n\
                       data: {\"choices\":[{\"delta\":{\"content\":\"c\"}}]}\n\n";
        let result = parse_pieces(&[stream]);
        assert_eq!(result.answer.as_deref(), Some("ab"));
        assert_eq!(
            (result.events, result.bad_events, result.done),
            (3, 1, true)
        );
    }

    #[test]
    fn sse_truncated_stream_keeps_complete_events_only() {
        let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
                       data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n";
        let mut parser = defaults().sse_parser();
        parser.mark_truncated();
        parser.push(stream);
        let result = parser.finish();
        assert_eq!(result.answer.as_deref(), Some("a"));
        assert!(result.truncated);
        // The same bytes as a complete stream: the last event lacks only its blank line and counts.
        assert_eq!(parse_pieces(&[stream]).answer.as_deref(), Some("ab"));
        assert_eq!(
            parse_pieces(&[&stream[..stream.len() - 1]])
                .answer
                .as_deref(),
            Some("ab")
        );
    }

    #[test]
    fn sse_all_events_malformed_is_response_not_json() {
        let request = bytes(&json!({"question": "q"}));
        let skip = defaults().extract(
            &request,
            false,
            b"data: {oops\n\ndata: <html>\n\n",
            false,
            true,
        );
        assert_eq!(skip, Err(Skip::ResponseNotJson));
        assert_eq!(
            defaults().extract(&request, false, b"", false, true),
            Err(Skip::NoAnswer)
        );
    }

    #[test]
    fn sse_tool_call_fragments_assembled_by_index() {
        let events = [
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": "call_a", "type": "function", "function": {"name": "search", "arguments": ""}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\":"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 1, "id": "call_b", "type": "function", "function": {"name": "lookup", "arguments": "{\"id\""}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": " \"paris\"}"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "function": {"arguments": ": 7}"}}]}}]}),
            json!({"choices": [{"index": 1, "delta": {"tool_calls": [
                {"index": 0, "function": {"name": "other_choice", "arguments": "{}"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        ];
        let stream: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
        let stream = stream.as_bytes();
        let expected = [
            ("search".to_owned(), "{\"q\": \"paris\"}".to_owned()),
            ("lookup".to_owned(), "{\"id\": 7}".to_owned()),
        ];
        for at in 0..=stream.len() {
            let result = parse_pieces(&[&stream[..at], &stream[at..]]);
            assert_eq!(result.tool_calls, expected, "split at {at}");
            assert_eq!(result.answer, None);
        }
    }

    #[test]
    fn sse_configured_pointers_apply_to_every_event() {
        let ex = Extractor::new("", "/docs/*", "/token", "/gold").unwrap();
        let stream = b"data: {\"token\": \"Hel\", \"docs\": [\"d1\"]}\n\n\
                       data: {\"token\": \"lo\", \"gold\": \"g\"}\n\n\
                       data: {\"docs\": [\"d2\"], \"gold\": \"later\", \"usage\": {\"prompt_tokens\": 4}}\n\n";
        let mut parser = ex.sse_parser();
        parser.push(stream);
        let result = parser.finish();
        assert_eq!(result.answer.as_deref(), Some("Hello"));
        assert_eq!(result.chunks, ["d1", "d2"]);
        assert_eq!(result.anchor.as_deref(), Some("g"));
        assert_eq!(result.prompt_tokens, Some(4));
    }
}
