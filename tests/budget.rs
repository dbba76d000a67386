//! Global token budget (SPEC §5) end to end: requests are priced (prompt bytes ÷ 4 + `max_tokens` or the
//! default completion), reserved in a GCRA bucket of `tokens_per_minute` with `burst`, refused with `429
//! budget` when they do not fit, and reconciled with the upstream's reported `usage` once the response
//! completes (refund on a shortfall or a failure, extra charge on an overrun).
//!
//! Most tests use a slow refill (60 tokens per minute: one token per second) so that what the budget holds
//! can be read from `driftguard_budget_available_tokens` with a slack of about one token per second the
//! test takes; the two rate tests use a faster one and measure wall time.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use serde_json::json;

const AVAILABLE: &str = "driftguard_budget_available_tokens";
const RATE_LIMITED: &str = "driftguard_rate_limited_total";

// ================================================================================================
// Harness
// ================================================================================================

/// A `[budget]` table.
fn budget_table(
    tokens_per_minute: u64,
    burst: u64,
    default_completion: u64,
    peek: usize,
) -> String {
    format!(
        "[budget]\ntokens_per_minute = {tokens_per_minute}\nburst = {burst}\n\
         default_completion_tokens = {default_completion}\npeek_bytes = {peek}\nbackend = \"local\"\n"
    )
}

/// A config with one arm `main` on `upstream` and `budget` (a `[budget]` table, or empty for none).
fn config(upstream: &str, budget: &str) -> String {
    format!("{LISTEN}\n{budget}\n{}", arm("main", upstream, 1, &[]))
}

fn query_of(path: &str) -> BTreeMap<String, String> {
    path.split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The `usage` object a route's query asks for, from any of `total`, `prompt` and `completion`
/// (`total_tokens`, `prompt_tokens`, `completion_tokens`); `None` without any.
fn usage_of(q: &BTreeMap<String, String>) -> Option<serde_json::Value> {
    let mut usage = serde_json::Map::new();
    for (key, field) in [
        ("prompt", "prompt_tokens"),
        ("completion", "completion_tokens"),
        ("total", "total_tokens"),
    ] {
        if let Some(n) = q.get(key).and_then(|v| v.parse::<u64>().ok()) {
            usage.insert(field.into(), n.into());
        }
    }
    (!usage.is_empty()).then_some(serde_json::Value::Object(usage))
}

/// The OpenAI-style SSE stream `/sse` answers: three content deltas, then (when asked) a last event with
/// only the usage, then `[DONE]`.
fn sse_canned(usage: Option<serde_json::Value>) -> Canned {
    let mut events: Vec<String> = ["Hel", "lo", "!"]
        .iter()
        .map(|c| {
            json!({"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":c}}]})
                .to_string()
        })
        .collect();
    if let Some(usage) = usage {
        events
            .push(json!({"object":"chat.completion.chunk","choices":[],"usage":usage}).to_string());
    }
    Canned::sse(&events).gap(Duration::from_millis(15))
}

/// A stand-in LLM API. Routes (query in brackets):
/// - `/json` [total | prompt, completion]: 200 JSON answer, with `usage` only when the query gives one;
/// - `/sse` [total | prompt, completion]: 200 `text/event-stream` (see [`sse_canned`]);
/// - `/status` [code, total | ...]: that status with a JSON error body (and `usage` when asked);
/// - anything else: 200 `{"answer":"ok"}` without usage.
fn llm(name: &str) -> Scripted {
    Scripted::start(name, |req, _body| {
        let q = query_of(&req.path);
        let usage = usage_of(&q);
        let path = req.path.split('?').next().unwrap_or("");
        match path {
            "/sse" => sse_canned(usage),
            "/status" => {
                let code = q.get("code").and_then(|c| c.parse().ok()).unwrap_or(500);
                let mut body = json!({"error": {"message": "upstream failed"}});
                if let Some(u) = usage {
                    body["usage"] = u;
                }
                Canned::json(&body).status(StatusCode::from_u16(code).expect("status code"))
            }
            _ => {
                let mut body = json!({"choices": [{"message": {"content": "ok"}}]});
                if let Some(u) = usage {
                    body["usage"] = u;
                }
                Canned::json(&body)
            }
        }
    })
}

/// Price of a request whose whole body is `body` (read completely by the peek): `ceil(len / 4)` plus
/// `completion` (its `max_tokens`, or the default completion).
fn price(body: &str, completion: u64) -> u64 {
    body.len().div_ceil(4) as u64 + completion
}

/// `{"question":"hi","max_tokens":N}` padded (in the question) so that it costs exactly `tokens`.
fn body_costing(tokens: u64, max_tokens: u64) -> String {
    assert!(tokens > max_tokens);
    let prompt = (tokens - max_tokens) as usize;
    let mut question = String::from("hi");
    loop {
        let body = json!({"question": question, "max_tokens": max_tokens}).to_string();
        let cost = price(&body, max_tokens);
        if cost == tokens {
            return body;
        }
        assert!(
            cost < tokens,
            "cannot price a body at exactly {tokens} tokens ({prompt} prompt)"
        );
        question.push('x');
    }
}

/// POSTs a JSON `body` to `path` with `x-request-id: id`.
async fn post(client: &HttpClient, proxy: &Proxy, path: &str, body: &str, id: &str) -> Reply {
    let req = Request::post(proxy.url(path))
        .header("content-type", "application/json")
        .header("x-request-id", id)
        .body(full(body.to_string()))
        .unwrap();
    exchange(client, req).await
}

/// POST that must pass: 200 from the upstream.
async fn post_ok(client: &HttpClient, proxy: &Proxy, path: &str, body: &str, id: &str) -> Reply {
    let reply = post(client, proxy, path, body, id).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{id} {path}: {}",
        reply.text()
    );
    reply
}

async fn samples(client: &HttpClient, proxy: &Proxy) -> Vec<Sample> {
    scrape(client, proxy).await.1
}

/// `driftguard_budget_available_tokens` now (panics when absent).
async fn available(client: &HttpClient, proxy: &Proxy) -> u64 {
    let s = samples(client, proxy).await;
    metric(&s, AVAILABLE, &[]).unwrap_or_else(|| panic!("no {AVAILABLE} in /metrics")) as u64
}

/// Scrapes until available ≥ `at_least` (settlement runs as the response body ends, which may be a hair
/// after the client has it), then returns the value of that scrape.
async fn available_reaching(client: &HttpClient, proxy: &Proxy, at_least: u64, what: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = available(client, proxy).await;
        if a >= at_least {
            return a;
        }
        if Instant::now() > deadline {
            panic!("{what}: {AVAILABLE} stayed at {a}, expected at least {at_least}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn rate_limited(client: &HttpClient, proxy: &Proxy, reason: &str) -> f64 {
    let s = samples(client, proxy).await;
    metric(&s, RATE_LIMITED, &[("reason", reason)])
        .unwrap_or_else(|| panic!("no {RATE_LIMITED}{{reason={reason}}}"))
}

/// Tokens a budget of `per_second` can have refilled in `elapsed`, plus one for the floor in the gauge.
fn refill(elapsed: Duration, per_second: f64) -> u64 {
    (elapsed.as_secs_f64() * per_second).ceil() as u64 + 1
}

/// The reply is the budget's 429: JSON `{"error":"budget",..}` with the request id; returns the body.
fn assert_budget_429(reply: &Reply, id: &str) -> serde_json::Value {
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{id}: {}",
        reply.text()
    );
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/json"),
        "{id}"
    );
    let body = reply.json();
    assert_eq!(body["error"], "budget", "{id}: {body}");
    assert!(body["message"].is_string(), "{id}: {body}");
    assert_eq!(body["request_id"], id, "{id}: {body}");
    assert_eq!(reply.header("x-request-id").as_deref(), Some(id), "{id}");
    body
}

// ================================================================================================
// Tests
// ================================================================================================

/// 600 tokens/min (one token per 100 ms), burst 100: three 33-token requests pass at once, the fourth
/// waits for 32 tokens to refill and is told so with `Retry-After`; after that long it passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_beyond_the_budget_is_refused_with_retry_after() {
    let up = llm("burst");
    let proxy = Proxy::start(&config(&up.url(), &budget_table(600, 100, 50, 65536)));
    let client = client();
    let body = body_costing(33, 24);
    assert_eq!(price(&body, 24), 33);
    for i in 0..3 {
        post_ok(&client, &proxy, "/v1/chat", &body, &format!("burst-ok-{i}")).await;
    }
    assert_eq!(up.request_count(), 3);

    // 99 spent, 1 left (plus what refilled meanwhile, far below the 32 missing).
    let refused = post(&client, &proxy, "/v1/chat", &body, "burst-refused-1").await;
    let after_refusal = Instant::now();
    let body_json = assert_budget_429(&refused, "burst-refused-1");
    let retry_after: u64 = refused
        .header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After on an over-budget 429: {body_json}"))
        .parse()
        .expect("Retry-After in whole seconds");
    // 33 tokens take 3.3 s to refill; rounded up that is 4 s at most.
    let full_refill = (33.0_f64 * 0.1).ceil() as u64;
    assert!(
        (1..=full_refill).contains(&retry_after),
        "Retry-After {retry_after} not in 1..={full_refill}"
    );
    // A second refusal right away; neither reached the upstream.
    let again = post(&client, &proxy, "/v1/chat", &body, "burst-refused-2").await;
    assert_budget_429(&again, "burst-refused-2");
    assert!(again.header("retry-after").is_some());
    assert_eq!(up.request_count(), 3, "the upstream saw a refused request");
    let s = samples(&client, &proxy).await;
    assert_eq!(
        metric(&s, RATE_LIMITED, &[("reason", "over_budget")]),
        Some(2.0)
    );
    assert_eq!(
        metric(&s, RATE_LIMITED, &[("reason", "too_large")]),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &s,
            "driftguard_requests_total",
            &[("arm", "main"), ("class", "4xx")]
        ),
        Some(2.0),
        "429s count in the arm's 4xx class"
    );

    // Waiting Retry-After (counted from the first refusal) is enough for the same request.
    let wait_until = after_refusal + Duration::from_secs(retry_after);
    tokio::time::sleep_until(wait_until.into()).await;
    let reply = post(&client, &proxy, "/v1/chat", &body, "burst-retried").await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "after waiting Retry-After ({retry_after} s) the request still did not fit: {}",
        reply.text()
    );
    assert!(up.exchanges().iter().any(|e| e
        .request
        .headers
        .get("x-request-id")
        .is_some_and(|v| v == "burst-retried")));
    assert_eq!(up.request_count(), 4);
    assert_eq!(rate_limited(&client, &proxy, "over_budget").await, 2.0);
}

/// 1200 tokens/min (20/s), burst 40, 10-token requests from several tasks for ~3 s: what gets through
/// stays within burst + rate × elapsed (+ one request), and is not far below it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admitted_tokens_stay_within_rate_and_burst() {
    const PRICE: u64 = 10;
    const TASKS: usize = 3;
    let up = llm("rate");
    let proxy = Arc::new(Proxy::start(&config(
        &up.url(),
        &budget_table(1200, 40, 50, 65536),
    )));
    let body = Arc::new(body_costing(PRICE, 1));
    let admitted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let run_for = Duration::from_secs(3);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (proxy, body, admitted, refused) = (
            proxy.clone(),
            body.clone(),
            admitted.clone(),
            refused.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut i = 0;
            while start.elapsed() < run_for {
                let reply =
                    post(&client, &proxy, "/v1/chat", &body, &format!("rate-{t}-{i}")).await;
                match reply.status {
                    StatusCode::OK => admitted.fetch_add(PRICE, Ordering::Relaxed),
                    StatusCode::TOO_MANY_REQUESTS => {
                        assert_eq!(reply.json()["error"], "budget");
                        refused.fetch_add(1, Ordering::Relaxed)
                    }
                    other => panic!("unexpected {other}: {}", reply.text()),
                };
                i += 1;
            }
        }));
    }
    for t in tasks {
        within(WAIT, "hammering task", t).await.expect("task");
    }
    let elapsed = start.elapsed();
    let admitted = admitted.load(Ordering::Relaxed);
    let refused = refused.load(Ordering::Relaxed);
    let ceiling = 40.0 + 20.0 * elapsed.as_secs_f64() + PRICE as f64;
    eprintln!(
        "admitted {admitted} tokens, refused {refused} requests in {elapsed:?} (ceiling {ceiling:.1})"
    );
    assert!(
        admitted as f64 <= ceiling,
        "admitted {admitted} tokens in {elapsed:?}, more than burst + rate × elapsed + one request = {ceiling:.1}"
    );
    assert!(
        admitted as f64 >= ceiling / 2.0,
        "admitted only {admitted} tokens in {elapsed:?} (ceiling {ceiling:.1}): the budget starves"
    );
    assert!(
        refused > 0,
        "nothing was refused: the load did not exceed the budget"
    );
    assert_eq!(up.request_count() as u64, admitted / PRICE);
    let client = client();
    assert_eq!(
        rate_limited(&client, &proxy, "over_budget").await,
        refused as f64
    );
}

/// A request priced above `burst` can never fit: 429 without Retry-After, counted as `too_large`, and the
/// budget is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_above_the_burst_is_refused_for_good() {
    let up = llm("large");
    let proxy = Proxy::start(&config(&up.url(), &budget_table(600, 100, 50, 65536)));
    let client = client();
    let body = json!({"question": "hi", "max_tokens": 500}).to_string();
    let reply = post(&client, &proxy, "/v1/chat", &body, "too-large-1").await;
    let json = assert_budget_429(&reply, "too-large-1");
    assert_eq!(
        reply.header("retry-after"),
        None,
        "a request that can never fit must not be told to retry"
    );
    let message = json["message"].as_str().unwrap();
    assert!(
        message.contains("burst") && message.contains("100"),
        "the message should name the burst (100): {message}"
    );
    // `max_completion_tokens` counts the same way.
    let body = json!({"question": "hi", "max_completion_tokens": 101}).to_string();
    let reply = post(&client, &proxy, "/v1/chat", &body, "too-large-2").await;
    assert_budget_429(&reply, "too-large-2");
    assert_eq!(reply.header("retry-after"), None);

    assert_eq!(
        up.request_count(),
        0,
        "the upstream saw a too-large request"
    );
    let s = samples(&client, &proxy).await;
    assert_eq!(
        metric(&s, RATE_LIMITED, &[("reason", "too_large")]),
        Some(2.0)
    );
    assert_eq!(
        metric(&s, RATE_LIMITED, &[("reason", "over_budget")]),
        Some(0.0)
    );
    assert_eq!(
        metric(&s, AVAILABLE, &[]),
        Some(100.0),
        "a refusal spends nothing"
    );
    // The budget still admits what fits.
    let small = body_costing(30, 10);
    post_ok(&client, &proxy, "/v1/chat", &small, "fits").await;
    assert_eq!(up.request_count(), 1);
}

/// Non-streamed reconciliation: without usage the reservation stands; a small usage refunds the rest; a
/// usage above the reservation charges the difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_usage_refunds_and_charges() {
    const RATE: f64 = 1.0; // tokens per second
    let up = llm("usage");
    let proxy = Proxy::start(&config(&up.url(), &budget_table(60, 1000, 250, 65536)));
    let client = client();
    let body = json!({"question": "What does the token budget guard against?"}).to_string();
    let reserved = price(&body, 250);

    let a0 = available(&client, &proxy).await;
    assert_eq!(a0, 1000, "a fresh budget is full");

    // No usage reported: the whole reservation stays spent.
    let t = Instant::now();
    post_ok(&client, &proxy, "/json", &body, "no-usage").await;
    let a1 = available(&client, &proxy).await;
    let slack = refill(t.elapsed(), RATE);
    assert!(
        a1 <= a0 - reserved + slack && a1 >= a0 - reserved,
        "without usage the reservation of {reserved} should stand: {a0} -> {a1}"
    );

    // Usage 20 for a reservation of `reserved`: only 20 stay spent.
    let t = Instant::now();
    post_ok(&client, &proxy, "/json?total=20", &body, "small-usage").await;
    let a2 = available_reaching(&client, &proxy, a1 - 20, "refund of a small usage").await;
    let slack = refill(t.elapsed(), RATE);
    assert!(
        a2 <= a1 - 20 + slack,
        "usage 20 (reserved {reserved}): available {a1} -> {a2}, expected about {}",
        a1 - 20
    );

    // Usage 100 + 300 for a reservation of 10 + prompt: 400 spent in all (extra charge).
    let small = json!({"question": "hi", "max_tokens": 10}).to_string();
    let small_reserved = price(&small, 10);
    let t = Instant::now();
    post_ok(
        &client,
        &proxy,
        "/json?prompt=100&completion=300",
        &small,
        "large-usage",
    )
    .await;
    // The extra is charged when the body ends; wait until the gauge is below what the reservation alone
    // leaves.
    let deadline = Instant::now() + Duration::from_secs(5);
    let a3 = loop {
        let a = available(&client, &proxy).await;
        if a + 400 <= a2 + refill(t.elapsed(), RATE) || Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let slack = refill(t.elapsed(), RATE);
    assert!(
        a3 + 400 >= a2 && a3 + 400 <= a2 + slack,
        "usage 400 (reserved {small_reserved}): available {a2} -> {a3}, expected about {}",
        a2 - 400
    );
}

/// SSE reconciliation: the usage in the last event before `[DONE]` settles the reservation once the
/// stream ends; a stream without usage keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_usage_in_the_last_event_refunds() {
    const RATE: f64 = 1.0;
    let up = llm("sse");
    let proxy = Proxy::start(&config(&up.url(), &budget_table(60, 1000, 250, 65536)));
    let client = client();
    let body = json!({"question": "Stream me an answer", "stream": true}).to_string();
    let reserved = price(&body, 250);
    let a0 = available(&client, &proxy).await;
    assert_eq!(a0, 1000);

    let t = Instant::now();
    let reply = post_ok(&client, &proxy, "/sse", &body, "sse-no-usage").await;
    assert_eq!(reply.body, sse_canned(None).concatenated());
    let a1 = available(&client, &proxy).await;
    assert!(
        a1 >= a0 - reserved && a1 <= a0 - reserved + refill(t.elapsed(), RATE),
        "a stream without usage keeps its reservation of {reserved}: {a0} -> {a1}"
    );

    let usage = json!({"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15});
    let t = Instant::now();
    let reply = post_ok(
        &client,
        &proxy,
        "/sse?prompt=9&completion=6&total=15",
        &body,
        "sse-usage",
    )
    .await;
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(
        reply.body,
        sse_canned(Some(usage)).concatenated(),
        "the stream reached the client unchanged"
    );
    let a2 = available_reaching(&client, &proxy, a1 - 15, "refund from the SSE usage").await;
    assert!(
        a2 <= a1 - 15 + refill(t.elapsed(), RATE),
        "SSE usage 15 (reserved {reserved}): available {a1} -> {a2}, expected about {}",
        a1 - 15
    );
}

/// A failed exchange gives its reservation back: a 5xx or 4xx from the upstream, or an upstream that
/// cannot be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_refund_the_reservation() {
    const RATE: f64 = 1.0;
    let up = llm("fail");
    let proxy = Proxy::start(&config(&up.url(), &budget_table(60, 1000, 250, 65536)));
    let client = client();
    let body = json!({"question": "Will this fail?"}).to_string();
    let reserved = price(&body, 250);

    // Spend something first so that a refund is visible below the burst.
    post_ok(&client, &proxy, "/json", &body, "spend").await;
    let a1 = available(&client, &proxy).await;
    assert!(a1 < 1000 - reserved + 5, "the reservation stands: {a1}");

    for (path, id, status) in [
        ("/status?code=500", "fail-500", 500),
        ("/status?code=503&total=40", "fail-503-usage", 503),
        ("/status?code=404", "fail-404", 404),
    ] {
        let before = available(&client, &proxy).await;
        let t = Instant::now();
        let reply = post(&client, &proxy, path, &body, id).await;
        assert_eq!(reply.status.as_u16(), status, "{id}: {}", reply.text());
        let after = available_reaching(&client, &proxy, before, id).await;
        assert!(
            after <= before + refill(t.elapsed(), RATE),
            "{id}: available {before} -> {after}"
        );
    }
    assert_eq!(up.request_count(), 4);

    // An unreachable upstream (502) refunds too.
    let dead = Proxy::start(&config(
        &closed_port_url(),
        &budget_table(60, 1000, 250, 65536),
    ));
    let before = available(&client, &dead).await;
    assert_eq!(before, 1000);
    let reply = post(&client, &dead, "/json", &body, "unreachable").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    let after = available_reaching(&client, &dead, 1000, "refund after 502").await;
    assert_eq!(after, 1000);
}

/// Without `[budget]` nothing is priced: huge requests pass and there is no budget gauge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_budget_table_nothing_is_rate_limited() {
    let up = llm("nobudget");
    let proxy = Proxy::start(&config(&up.url(), ""));
    let client = client();
    let huge = json!({"question": "x".repeat(200_000), "max_tokens": 1_000_000_000u64}).to_string();
    for i in 0..5 {
        post_ok(&client, &proxy, "/json", &huge, &format!("free-{i}")).await;
    }
    let default_priced = json!({"question": "hi"}).to_string();
    for i in 0..20 {
        post_ok(
            &client,
            &proxy,
            "/json",
            &default_priced,
            &format!("small-{i}"),
        )
        .await;
    }
    assert_eq!(up.request_count(), 25);
    let (text, s) = scrape(&client, &proxy).await;
    assert!(
        !text.contains(AVAILABLE),
        "{AVAILABLE} is exported without a budget"
    );
    for reason in ["over_budget", "too_large"] {
        assert_eq!(
            metric(&s, RATE_LIMITED, &[("reason", reason)]).unwrap_or(0.0),
            0.0
        );
    }
}

/// Only POST/PUT/PATCH with a JSON (or no) content type are priced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_json_writes_are_priced() {
    let up = llm("unpriced");
    let proxy = Proxy::start(&config(&up.url(), &budget_table(60, 50, 1000, 65536)));
    let client = client();
    // Default completion 1000 > burst 50: anything priced without max_tokens is too large.
    let body = json!({"question": "hi"}).to_string();
    let text = Request::post(proxy.url("/json"))
        .header("content-type", "text/plain")
        .body(full(body.clone()))
        .unwrap();
    assert_eq!(exchange(&client, text).await.status, StatusCode::OK);
    assert_eq!(
        get(&client, &proxy.url("/json"), &[]).await.status,
        StatusCode::OK
    );
    let delete = Request::delete(proxy.url("/json"))
        .header("content-type", "application/json")
        .body(full(body.clone()))
        .unwrap();
    assert_eq!(exchange(&client, delete).await.status, StatusCode::OK);
    assert_eq!(available(&client, &proxy).await, 50);

    for (method, ct) in [
        (http::Method::POST, None),
        (http::Method::PUT, Some("application/json")),
        (http::Method::PATCH, Some("application/merge-patch+json")),
    ] {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(proxy.url("/json"))
            .header("x-request-id", "priced");
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let reply = exchange(&client, req.body(full(body.clone())).unwrap()).await;
        assert_eq!(
            reply.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{method} {ct:?} was not priced: {}",
            reply.text()
        );
    }
    assert_eq!(up.request_count(), 3);
    assert_eq!(rate_limited(&client, &proxy, "too_large").await, 3.0);
}

/// A body longer than `peek_bytes` is priced from its Content-Length (plus the default completion) and
/// still reaches the upstream whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_beyond_peek_bytes_is_priced_by_length_and_forwarded_intact() {
    const RATE: f64 = 1.0;
    const LEN: usize = 50_000;
    const DEFAULT: u64 = 300;
    let up = llm("peek");
    let proxy = Proxy::start(&config(&up.url(), &budget_table(60, 20_000, DEFAULT, 1024)));
    let client = client();
    // `{"question":"<varied text>"}`, exactly LEN bytes.
    let overhead = json!({"question": ""}).to_string().len();
    let text: String = (0..LEN - overhead)
        .map(|i| (b'a' + (i * 7 % 26) as u8) as char)
        .collect();
    let body = json!({ "question": text }).to_string();
    assert_eq!(body.len(), LEN);
    let expected = LEN.div_ceil(4) as u64 + DEFAULT;

    let a0 = available(&client, &proxy).await;
    assert_eq!(a0, 20_000);
    let t = Instant::now();
    let req = Request::post(proxy.url("/json"))
        .header("content-type", "application/json")
        .header("x-request-id", "big-body")
        .body(full(Bytes::from(body.clone())))
        .unwrap();
    let reply = exchange(&client, req).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let a1 = available(&client, &proxy).await;
    let slack = refill(t.elapsed(), RATE);

    let seen = up.exchanges();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].request.header("content-length").as_deref(),
        Some("50000")
    );
    assert_eq!(
        seen[0].body.len(),
        LEN,
        "the upstream got a different length"
    );
    assert!(
        seen[0].body == body.as_bytes(),
        "the body reached the upstream altered"
    );
    assert!(
        a1 >= a0 - expected && a1 <= a0 - expected + slack,
        "a {LEN}-byte body should cost {expected} (ceil({LEN}/4) + {DEFAULT}): available {a0} -> {a1}"
    );
}

/// The usage of a stream longer than `signals.max_body_bytes` (the cap of the evaluation copy) is still
/// the usage: the reservation is settled with it, refunded when smaller and charged when larger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_is_reconciled_with_its_final_usage() {
    const RATE: f64 = 1.0;
    // ~80 deltas of ~100 bytes: ~8 KB of events before the usage, twice the 4 KiB copy cap.
    let long_stream = |usage: serde_json::Value| {
        let mut events: Vec<String> = (0..80)
            .map(|i| {
                json!({"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":format!("token {i:04} ")}}]})
                    .to_string()
            })
            .collect();
        events
            .push(json!({"object":"chat.completion.chunk","choices":[],"usage":usage}).to_string());
        Canned::sse(&events)
    };
    let up = Scripted::start("long-sse", move |req, _| {
        let total: u64 = query_of(&req.path)
            .get("total")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        long_stream(
            json!({"prompt_tokens": 5, "completion_tokens": total - 5, "total_tokens": total}),
        )
    });
    let signals = "[signals]\nmax_body_bytes = 4096\n";
    let proxy = Proxy::start(&format!(
        "{}{signals}",
        config(&up.url(), &budget_table(60, 2000, 250, 65536))
    ));
    let client = client();
    let body = json!({"question": "Stream me a long answer", "stream": true}).to_string();
    let reserved = price(&body, 250);

    // Usage 15 for a reservation of `reserved`: the rest comes back.
    let a0 = available(&client, &proxy).await;
    let t = Instant::now();
    let reply = post_ok(&client, &proxy, "/sse?total=15", &body, "long-refund").await;
    assert!(reply.body.len() > 8000, "{} bytes", reply.body.len());
    // Settled or not, give it a moment and read the gauge.
    let deadline = Instant::now() + Duration::from_secs(2);
    let a1 = loop {
        let a = available(&client, &proxy).await;
        if a + 15 >= a0 || Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let refunded = a1 + 15 >= a0 && a1 <= a0 - 15 + refill(t.elapsed(), RATE);

    // Usage 900 for a reservation of `reserved`: the overrun is charged.
    let t = Instant::now();
    post_ok(&client, &proxy, "/sse?total=900", &body, "long-overrun").await;
    let deadline = Instant::now() + Duration::from_secs(2);
    let a2 = loop {
        let a = available(&client, &proxy).await;
        if a + 900 <= a1 + refill(t.elapsed(), RATE) || Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let charged = a2 + 900 <= a1 + refill(t.elapsed(), RATE) && a2 + 900 >= a1;
    assert!(
        refunded && charged,
        "a {}-byte stream (signals.max_body_bytes = 4096) was not reconciled with its final usage \
         (reserved {reserved} each): usage 15 took available {a0} -> {a1} (expected about {}); \
         usage 900 took it {a1} -> {a2} (expected about {})",
        reply.body.len(),
        a0 - 15,
        a1.saturating_sub(900)
    );
}
