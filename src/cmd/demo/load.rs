//! The demo's load generator: questions from the knowledge base sent through the proxy at a steady
//! `rps` with bounded concurrency (a tick that finds every slot busy is counted as shed, not queued),
//! and a feedback write now and then so the write freeze shows. It counts what comes back by arm.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use tokio::sync::Semaphore;

use super::kb::TOPICS;
use crate::net;

/// One request in this many is a feedback write (`POST /v1/feedback`, a write route).
const WRITE_EVERY: u64 = 25;
/// A request that takes longer is abandoned and counted as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The demo arms answer a few hundred bytes; a larger answer is counted as failed.
const MAX_RESPONSE: usize = 1 << 20;

/// Cumulative counts; the progress line takes differences.
#[derive(Default)]
pub struct Counts {
    pub sent: AtomicU64,
    pub done: AtomicU64,
    pub baseline: AtomicU64,
    pub canary: AtomicU64,
    /// 5xx the client saw (upstream or proxy-made, frozen writes excluded).
    pub errors: AtomicU64,
    /// Writes refused with 503 while writes were frozen.
    pub frozen_writes: AtomicU64,
    /// Ticks skipped because `concurrency` requests were already in flight.
    pub shed: AtomicU64,
    /// No response at all (connection refused, timeout).
    pub failed: AtomicU64,
}

/// A running load generator.
pub struct Load {
    pub counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    /// Starts sending to `proxies` (`http://host:port`), round-robin.
    pub fn start(proxies: Vec<String>, rps: u32, concurrency: usize) -> Load {
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let client = net::Client::builder(REQUEST_TIMEOUT)
            .max_response(MAX_RESPONSE)
            .build();
        let slots = Arc::new(Semaphore::new(concurrency.max(1)));
        let period = Duration::from_secs_f64(1.0 / f64::from(rps.max(1)));
        let (c, s) = (counts.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            let mut n: u64 = 0;
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    c.shed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                n += 1;
                let req = request(&proxies[n as usize % proxies.len().max(1)], n);
                let (client, c) = (client.clone(), c.clone());
                c.sent.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let write = req.method() == Method::POST && req.uri().path() == "/v1/feedback";
                    match client.send(req).await {
                        Ok(resp) => {
                            let status = resp.status();
                            let arm = resp
                                .headers()
                                .get("x-driftguard-arm")
                                .and_then(|v| v.to_str().ok());
                            c.done.fetch_add(1, Ordering::Relaxed);
                            match arm {
                                Some("baseline") => c.baseline.fetch_add(1, Ordering::Relaxed),
                                Some("canary") => c.canary.fetch_add(1, Ordering::Relaxed),
                                _ => 0,
                            };
                            let frozen = write
                                && status.as_u16() == 503
                                && String::from_utf8_lossy(resp.body()).contains("writes_frozen");
                            if frozen {
                                c.frozen_writes.fetch_add(1, Ordering::Relaxed);
                            } else if status.is_server_error() {
                                c.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            c.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    drop(slot);
                });
            }
        });
        Load { counts, stop, task }
    }

    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
    }
}

/// The `n`th request: a question of the knowledge base, or every [`WRITE_EVERY`]th a feedback write.
fn request(proxy: &str, n: u64) -> Request<Bytes> {
    let topic = &TOPICS[(n as usize * 7) % TOPICS.len()];
    let (path, body) = if n.is_multiple_of(WRITE_EVERY) {
        (
            "/v1/feedback",
            serde_json::json!({"question": topic.question, "helpful": true}),
        )
    } else {
        ("/v1/ask", serde_json::json!({"question": topic.question}))
    };
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(format!("{proxy}{path}"))
        .header(header::CONTENT_TYPE, "application/json");
    if path == "/v1/feedback" {
        builder = builder.header("idempotency-key", format!("demo-feedback-{n}"));
    }
    builder
        .body(Bytes::from(body.to_string()))
        .unwrap_or_else(|_| Request::new(Bytes::new()))
}
