//! Extraction (SPEC §3): the question, the retrieved chunks, the answer, the anchor, the token usage and the
//! tool calls of one exchange, read from the teed copies of the request and response bodies.
//!
//! An evaluation worker (`eval`) hands the capped copies of both bodies to an [`Extractor`] and gets back
//! plain text for the embedder and the measures, or a [`Skip`] that labels why the sample cannot be
//! evaluated. A streamed (SSE) response goes through an [`SseParser`], which the proxy can feed chunk by
//! chunk while the stream passes through; it keeps only the unfinished line and event plus what it has
//! extracted so far.
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
//!
//! Layout: `pointer` (JSON pointers with `*`), `sse` (the streamed response), `tools` (tool calls, whole
//! and streamed); the token usage is read by [`super::usage`], the parser the budget uses too.

mod pointer;
mod sse;
#[cfg(test)]
mod tests;
mod tools;

use std::fmt;

use serde_json::Value;

pub use pointer::Pointer;
pub use sse::{SseParser, SseResult};

use super::usage::Usage;
use pointer::{walk, CONTEXTS_ANY};
use tools::collect_whole_tool_calls;

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

/// The configured pointers; `None` means the SPEC §3 default of that piece.
#[derive(Debug, Clone, Default)]
struct Sources {
    question: Option<Pointer>,
    retrieved: Option<Pointer>,
    answer: Option<Pointer>,
    anchor: Option<Pointer>,
}

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
            let usage = Usage::of(doc).unwrap_or_default();
            extracted.prompt_tokens = usage.prompt_tokens();
            extracted.completion_tokens = usage.completion_tokens();
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
