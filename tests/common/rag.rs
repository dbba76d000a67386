//! A small RAG knowledge base and a test RAG service answering from it, grounded or off-topic: shared by
//! the signals and the rollback tests.

#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use serde_json::{json, Value};

use super::{Canned, Scripted};

// ================================================================================================
// Fixtures: a small knowledge base
// ================================================================================================

/// One question of the knowledge base, the chunks a retriever returns for it, an answer that restates
/// the chunks (grounded), and an answer about something else entirely (off-topic, other vocabulary).
pub struct Topic {
    pub question: &'static str,
    pub chunks: [&'static str; 2],
    pub grounded: &'static str,
    pub off_topic: &'static str,
}

pub const TOPICS: [Topic; 4] = [
    Topic {
        question: "How do I reset my account password if I forgot it?",
        chunks: [
            "To reset a forgotten account password, open the sign-in page and choose Forgot password. \
             Enter the email address linked to your account and we send a reset link.",
            "The password reset link expires after 30 minutes. If the link expired, request a new reset \
             email from the sign-in page.",
        ],
        grounded: "Open the sign-in page, choose Forgot password and enter the email address linked to \
                   your account. We send a reset link to that email; the link expires after 30 minutes, \
                   so request a new reset email if it expired.",
        off_topic: "Our quarterly picnic features grilled vegetables, fresh lemonade and a jazz band \
                    playing by the lake until sunset.",
    },
    Topic {
        question: "What is the refund policy for annual subscriptions?",
        chunks: [
            "Annual subscriptions can be refunded in full within 14 days of purchase. After 14 days, the \
             refund is prorated for the unused months.",
            "Refunds go back to the original payment method and usually arrive within five business days.",
        ],
        grounded: "Annual subscriptions are refunded in full within 14 days of purchase; after that the \
                   refund is prorated for the unused months. Refunds go back to the original payment \
                   method within five business days.",
        off_topic: "Mountain gorillas live in dense forests, eat mostly leaves and shoots, and travel in \
                    small troops led by a silverback.",
    },
    Topic {
        question: "Can I export my project data to CSV?",
        chunks: [
            "Project owners can export project data to CSV or JSON from the Settings page, under Data \
             export.",
            "Large exports are prepared in the background, and a download link is emailed when the \
             export file is ready.",
        ],
        grounded: "Project owners can export project data to CSV or JSON from the Settings page under \
                   Data export; large exports are prepared in the background and a download link is \
                   emailed when the file is ready.",
        off_topic: "The bakery on Elm Street sells sourdough loaves, cinnamon rolls and almond \
                    croissants every morning before nine.",
    },
    Topic {
        question: "How do I turn on two-factor authentication?",
        chunks: [
            "Two-factor authentication is turned on from the Security tab of your profile. Scan the QR \
             code with an authenticator app and enter the six-digit code.",
            "After you turn on two-factor authentication, save the recovery codes in a safe place; each \
             recovery code works once.",
        ],
        grounded: "Go to the Security tab of your profile, scan the QR code with an authenticator app and \
                   enter the six-digit code to turn on two-factor authentication. Save the recovery codes \
                   in a safe place, since each code works once.",
        off_topic: "Saturn's rings are made of countless ice particles, ranging in size from tiny grains \
                    to boulders as large as houses.",
    },
];

/// Words that only the off-topic answers use (the test embeddings endpoint keys on them).
pub const OFF_TOPIC_MARKERS: [&str; 4] = ["picnic", "gorillas", "bakery", "saturn"];

/// Usage the RAG JSON and chat completion answers report.
pub const PROMPT_TOKENS: u64 = 412;
pub const COMPLETION_TOKENS: u64 = 58;
/// Usage the streamed answers report in their last event.
pub const SSE_PROMPT_TOKENS: u64 = 301;
pub const SSE_COMPLETION_TOKENS: u64 = 47;

/// The topic whose question the asked text contains (a suffix like "(ticket 7)" is allowed).
pub fn topic_of(asked: &str) -> Option<&'static Topic> {
    TOPICS.iter().find(|t| asked.contains(t.question))
}

pub fn contexts(t: &Topic) -> Value {
    json!([
        {"id": "kb-101#2", "text": t.chunks[0], "score": 0.83},
        {"id": "kb-101#5", "text": t.chunks[1], "score": 0.79},
    ])
}

pub fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The question of a request body: `question`, `query`, or the last user message of an OpenAI chat.
pub fn asked(body: &Value) -> Option<String> {
    if let Some(q) = body["question"].as_str().or(body["query"].as_str()) {
        return Some(q.to_string());
    }
    body["messages"]
        .as_array()?
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .map(str::to_string)
}

pub fn query_param(path: &str, key: &str) -> Option<String> {
    let q = path.split_once('?')?.1;
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

/// Deterministic JSON body of about `n` bytes (for the tee cap).
pub fn big_body(n: usize) -> Bytes {
    let sentence = "The export file is prepared in the background and a download link is emailed. ";
    let answer: String = sentence.repeat(n / sentence.len() + 1);
    let t = &TOPICS[2];
    Bytes::from(
        json!({"answer": answer, "contexts": contexts(t), "usage": usage(1, 2)}).to_string(),
    )
}

pub fn tool_call(id: usize, arguments: &str) -> Value {
    json!({"id": format!("call_{id}"), "type": "function",
           "function": {"name": "search_docs", "arguments": arguments}})
}

/// SSE payloads of an OpenAI chat stream: a role event, the answer in small deltas, a finish event,
/// then the service's own last event with an empty `choices`, the retrieved contexts and the usage.
pub fn sse_payloads(t: &Topic, answer: &str) -> Vec<String> {
    let mut payloads = vec![json!({"id": "chatcmpl-s1", "object": "chat.completion.chunk", "model": "m-1",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]})
    .to_string()];
    let words: Vec<&str> = answer.split_inclusive(' ').collect();
    for piece in words.chunks(4) {
        payloads.push(
            json!({"id": "chatcmpl-s1", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": piece.concat()}, "finish_reason": null}]})
            .to_string(),
        );
    }
    payloads.push(
        json!({"id": "chatcmpl-s1", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        .to_string(),
    );
    payloads.push(
        json!({"id": "chatcmpl-s1", "object": "chat.completion.chunk", "choices": [],
            "contexts": contexts(t), "usage": usage(SSE_PROMPT_TOKENS, SSE_COMPLETION_TOKENS)})
        .to_string(),
    );
    payloads
}

/// The test RAG service. Routes (all answer from the knowledge base; `?style=off` or `?style=grounded`
/// overrides the server's default style):
/// - `POST /v1/ask` `{"question"|"query"|"messages"}` → `{"answer", "contexts":[{"text"}], "usage"}`
/// - `POST /v1/chat/completions` → an OpenAI chat completion (`choices[0].message.content`), or an SSE
///   stream when the request says `"stream": true`; `contexts` and `usage` alongside
/// - `/tools?kind=loop|distinct|once` → a chat completion with tool calls and no content
/// - `/plain` → `text/plain`; `/big?n=N` → JSON of about N bytes; `/fail` → 500 JSON
pub fn rag_service(name: &str, off_topic_by_default: bool) -> Scripted {
    Scripted::start(name, move |req, body| {
        let path = req.path.as_str();
        let route = path.split('?').next().unwrap_or("");
        let off = match query_param(path, "style").as_deref() {
            Some("off") => true,
            Some("grounded") => false,
            _ => off_topic_by_default,
        };
        let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        match route {
            "/plain" => return Canned::body("text/plain; charset=utf-8", "plain text, not JSON"),
            "/big" => {
                let n = query_param(path, "n")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(16 * 1024);
                return Canned::body("application/json", big_body(n));
            }
            "/fail" => {
                return Canned::json(&json!({"error": "boom"}))
                    .status(StatusCode::INTERNAL_SERVER_ERROR)
            }
            "/tools" => {
                let kind = query_param(path, "kind").unwrap_or_default();
                let calls: Vec<Value> = match kind.as_str() {
                    "loop" => (0..3)
                        .map(|i| tool_call(i, r#"{"query":"refund policy"}"#))
                        .collect(),
                    "distinct" => ["refund policy", "annual plan", "payment method"]
                        .iter()
                        .enumerate()
                        .map(|(i, q)| tool_call(i, &json!({"query": q}).to_string()))
                        .collect(),
                    _ => vec![tool_call(0, r#"{"query":"refund policy"}"#)],
                };
                return Canned::json(&json!({
                    "id": "chatcmpl-t", "object": "chat.completion", "model": "m-1",
                    "choices": [{"index": 0, "finish_reason": "tool_calls",
                        "message": {"role": "assistant", "content": null, "tool_calls": calls}}],
                    "usage": usage(PROMPT_TOKENS, COMPLETION_TOKENS),
                }));
            }
            _ => {}
        }
        let by_param = query_param(path, "topic")
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| TOPICS.get(i));
        let Some(topic) = asked(&parsed).as_deref().and_then(topic_of).or(by_param) else {
            return Canned::json(&json!({"error": "unknown question"}))
                .status(StatusCode::BAD_REQUEST);
        };
        let answer = if off { topic.off_topic } else { topic.grounded };
        match route {
            "/v1/chat/completions" if parsed["stream"] == true => {
                Canned::sse(&sse_payloads(topic, answer)).gap(Duration::from_millis(2))
            }
            "/v1/chat/completions" => Canned::json(&json!({
                "id": "chatcmpl-1", "object": "chat.completion", "model": "m-1",
                "choices": [{"index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": answer}}],
                "contexts": contexts(topic),
                "usage": usage(PROMPT_TOKENS, COMPLETION_TOKENS),
            })),
            _ => Canned::json(&json!({
                "answer": answer,
                "contexts": contexts(topic),
                "usage": usage(PROMPT_TOKENS, COMPLETION_TOKENS),
                "model": "m-1",
            })),
        }
    })
}
