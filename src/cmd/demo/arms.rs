//! The demo's RAG upstream arms: small HTTP services answering questions from the [`kb`] knowledge base
//! in the JSON shape the signals extractor understands (`{"answer", "contexts":[{"text"}], "usage"}`).
//! The baseline always answers from its retrieved chunks; the canary does too until `degrade_at`, then
//! answers [`OFF_TOPIC_PER_10`] in 10 questions with an off-topic answer and fails one in
//! [`FAIL_EVERY`] with a 500 — a bad model or prompt rollout as the proxy sees it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::kb::{self, Topic};
use crate::serve::listener;
use crate::shutdown::Shutdown;

/// Of every 10 questions the degraded canary gets, this many get an off-topic answer.
pub const OFF_TOPIC_PER_10: u64 = 6;
/// The degraded canary fails one request in this many with a 500 — few enough that a quality rule, not
/// `error_rate`, is what trips (a share at or under 1 % cannot breach `error_rate_over = 0.01`).
pub const FAIL_EVERY: u64 = 150;

/// Largest request body read.
const MAX_BODY: usize = 64 * 1024;

/// One demo arm's behaviour and what it has served.
pub struct Arm {
    pub name: &'static str,
    /// When this arm starts going bad (`None`: never).
    degrade_at: Option<Instant>,
    pub served: AtomicU64,
    /// Requests served since `degrade_at`.
    degraded: AtomicU64,
    pub off_topic: AtomicU64,
    pub failed: AtomicU64,
    /// When the first bad answer (off-topic or 500) left, Unix ms; 0 while none has.
    pub first_bad_ms: AtomicU64,
}

impl Arm {
    pub fn new(name: &'static str, degrade_at: Option<Instant>) -> Arc<Arm> {
        Arc::new(Arm {
            name,
            degrade_at,
            served: AtomicU64::new(0),
            degraded: AtomicU64::new(0),
            off_topic: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            first_bad_ms: AtomicU64::new(0),
        })
    }

    fn bad(&self) {
        let _ = self.first_bad_ms.compare_exchange(
            0,
            crate::clock::now_ms(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// What to answer to a question: grounded, off-topic, or a 500.
    fn verdict(&self) -> Answer {
        let degraded = self.degrade_at.is_some_and(|at| Instant::now() >= at);
        if !degraded {
            return Answer::Grounded;
        }
        let k = self.degraded.fetch_add(1, Ordering::Relaxed);
        // The first failure comes a little after the first off-topic answers, then one in FAIL_EVERY.
        if k % FAIL_EVERY == 20 {
            self.failed.fetch_add(1, Ordering::Relaxed);
            self.bad();
            return Answer::Fail;
        }
        if k % 10 < OFF_TOPIC_PER_10 {
            self.off_topic.fetch_add(1, Ordering::Relaxed);
            self.bad();
            return Answer::OffTopic;
        }
        Answer::Grounded
    }
}

enum Answer {
    Grounded,
    OffTopic,
    Fail,
}

/// Serves `arm` on `listener` until `shutdown`.
pub fn spawn(arm: Arc<Arm>, listener: TcpListener, shutdown: Shutdown) {
    tokio::spawn(listener::serve(
        arm.name,
        listener,
        shutdown,
        Duration::from_secs(2),
        listener::Limits::default(),
        move |_peer: SocketAddr| {
            let arm = arm.clone();
            move |req| handle(arm.clone(), req)
        },
    ));
}

async fn handle(
    arm: Arc<Arm>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let route = (req.method().clone(), req.uri().path().to_string());
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(reply(StatusCode::BAD_REQUEST, json!({"error": "bad body"}))),
    };
    let response = match (&route.0, route.1.as_str()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, json!({"ok": true})),
        (&Method::POST, "/v1/feedback") => reply(StatusCode::OK, json!({"ok": true})),
        (&Method::POST, "/v1/ask") => ask(&arm, &body).await,
        _ => reply(StatusCode::NOT_FOUND, json!({"error": "not found"})),
    };
    arm.served.fetch_add(1, Ordering::Relaxed);
    Ok(response)
}

async fn ask(arm: &Arm, body: &[u8]) -> Response<Full<Bytes>> {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let Some(topic) = parsed["question"].as_str().and_then(kb::topic_of) else {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "unknown question; ask one of the demo knowledge base's"}),
        );
    };
    // Retrieval and generation take a while.
    tokio::time::sleep(Duration::from_millis(fastrand::u64(8..=30))).await;
    let answer = match arm.verdict() {
        Answer::Fail => {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "model backend failed"}),
            )
        }
        Answer::OffTopic => topic.off_topic,
        Answer::Grounded => topic.grounded,
    };
    reply(StatusCode::OK, answer_json(arm.name, topic, answer))
}

fn answer_json(arm: &str, topic: &Topic, answer: &str) -> Value {
    let contexts: Vec<Value> = topic
        .chunks
        .iter()
        .enumerate()
        .map(|(i, text)| json!({"id": format!("kb#{i}"), "text": text, "score": 0.9 - 0.05 * i as f64}))
        .collect();
    let prompt = 300 + topic.chunks.iter().map(|c| c.len() as u64 / 4).sum::<u64>();
    let completion = answer.len() as u64 / 4;
    json!({
        "answer": answer,
        "contexts": contexts,
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
        "model": format!("demo-{arm}"),
    })
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
