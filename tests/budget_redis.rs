//! The token budget shared through Redis (SPEC §5, `budget.backend = "redis"`), end to end: real
//! driftguard processes pointed at one private redis-server share one GCRA budget, reconcile through it,
//! and follow `budget.on_backend_error` while Redis is down, until it is back.
//!
//! The tests that need redis-server are `#[ignore]`d with that reason, and `.ci/run` runs them with
//! `--include-ignored` after installing it (a missing server then fails them).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::{Request, StatusCode};
use serde_json::json;

const AVAILABLE: &str = "driftguard_budget_available_tokens";
const RATE_LIMITED: &str = "driftguard_rate_limited_total";
const BACKEND_ERRORS: &str = "driftguard_budget_backend_errors_total";

// ================================================================================================
// Harness
// ================================================================================================

/// A config with one arm `main` on `upstream` and a Redis `[budget]` on `redis_url`/`key`.
/// `redis_timeout` is wide: a slow CI must not turn a slow answer into a backend error.
fn config(
    upstream: &str,
    redis_url: &str,
    key: &str,
    tpm: u64,
    burst: u64,
    on_error: &str,
) -> String {
    format!(
        "{LISTEN}\n[budget]\ntokens_per_minute = {tpm}\nburst = {burst}\ndefault_completion_tokens = 50\n\
         backend = \"redis\"\nredis_url = \"{redis_url}\"\nredis_key = \"{key}\"\nredis_timeout = \"1s\"\n\
         on_backend_error = \"{on_error}\"\n\n{}",
        arm("main", upstream, 1, &[])
    )
}

/// A key of its own per test, so tests sharing nothing never share a budget.
fn key(test: &str) -> String {
    format!(
        "driftguard-test:{test}:{}",
        unique("k").file_name().unwrap().to_string_lossy()
    )
}

/// A stand-in LLM API: `/json?total=N` answers with `usage.total_tokens = N`, anything else without usage
/// (so the reservation stands).
fn llm(name: &str) -> Scripted {
    Scripted::start(name, |req, _body| {
        let total: Option<u64> = req
            .path
            .split_once("?total=")
            .and_then(|(_, n)| n.parse().ok());
        let mut body = json!({"choices": [{"message": {"content": "ok"}}]});
        if let Some(total) = total {
            body["usage"] = json!({ "total_tokens": total });
        }
        Canned::json(&body)
    })
}

/// `{"question":"hi..","max_tokens":N}` whose price (bytes ÷ 4 rounded up, plus `max_tokens`) is exactly
/// `tokens`.
fn body_costing(tokens: u64, max_tokens: u64) -> String {
    let mut question = String::from("hi");
    loop {
        let body = json!({"question": question, "max_tokens": max_tokens}).to_string();
        let cost = body.len().div_ceil(4) as u64 + max_tokens;
        assert!(cost <= tokens, "cannot price a body at exactly {tokens}");
        if cost == tokens {
            return body;
        }
        question.push('x');
    }
}

async fn post(client: &HttpClient, proxy: &Proxy, path: &str, body: &str, id: &str) -> Reply {
    let req = Request::post(proxy.url(path))
        .header("content-type", "application/json")
        .header("x-request-id", id)
        .body(full(body.to_string()))
        .unwrap();
    exchange(client, req).await
}

fn counter(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(samples, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in /metrics"))
}

/// Whole seconds of a 429's `Retry-After`.
fn retry_after(reply: &Reply) -> u64 {
    reply
        .header("retry-after")
        .unwrap_or_else(|| panic!("a 429 without Retry-After: {}", reply.text()))
        .parse()
        .expect("Retry-After in whole seconds")
}

fn assert_status(reply: &Reply, status: StatusCode, what: &str) {
    assert_eq!(reply.status, status, "{what}: {}", reply.text());
}

/// Sends the request `body` to `path` until it gets `want` (other statuses in `meanwhile` are allowed
/// while waiting), within `limit`.
async fn until_status(
    client: &HttpClient,
    proxy: &Proxy,
    (path, body): (&str, &str),
    want: StatusCode,
    meanwhile: &[StatusCode],
    limit: Duration,
    what: &str,
) -> Reply {
    let deadline = Instant::now() + limit;
    let mut i = 0;
    loop {
        let reply = post(client, proxy, path, body, &format!("{what}-{i}")).await;
        if reply.status == want {
            return reply;
        }
        assert!(
            meanwhile.contains(&reply.status),
            "{what}: unexpected {} while waiting for {want}: {}",
            reply.status,
            reply.text()
        );
        assert!(
            Instant::now() < deadline,
            "{what}: no {want} within {limit:?}; last {}: {}",
            reply.status,
            reply.text()
        );
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the outage warning (log lines reach the test through a reader thread), then counts them.
async fn warnings_about_redis(proxy: &Proxy) -> usize {
    proxy
        .wait_log("the warning that Redis fails", is_redis_warning)
        .await;
    proxy.count_log(is_redis_warning)
}

fn is_redis_warning(v: &serde_json::Value) -> bool {
    v["level"] == "WARN"
        && v["message"]
            .as_str()
            .is_some_and(|m| m.contains("budget's Redis fails"))
}

fn redis_back_lines(proxy: &Proxy) -> usize {
    proxy.count_log(|v| {
        v["level"] == "INFO"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("budget's Redis answers again"))
    })
}

// ================================================================================================
// Tests
// ================================================================================================

/// Two replicas on one key, 1200 tokens/min (20/s) with a burst of 40, each hammered by two tasks with
/// 10-token requests for ~3 s: together they get no more than ONE budget allows (burst + rate × elapsed
/// + one request), where two separate budgets would have let through about twice that; the 429s say
/// when to retry; the key expires once the budget is idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (apt-get install redis-server)"]
async fn two_replicas_share_one_budget() {
    const PRICE: u64 = 10;
    const TPM: u64 = 1200;
    const BURST: u64 = 40;
    let redis = RedisServer::start();
    let key = key("shared");
    let up = llm("shared");
    let cfg = config(&up.url(), &redis.url(), &key, TPM, BURST, "closed");
    let proxies = [Arc::new(Proxy::start(&cfg)), Arc::new(Proxy::start(&cfg))];
    let body = Arc::new(body_costing(PRICE, 1));
    let admitted: [Arc<AtomicU64>; 2] = Default::default();
    let refused = Arc::new(AtomicU64::new(0));
    let retry_afters = Arc::new(Mutex::new(Vec::new()));
    let run_for = Duration::from_secs(3);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (p, proxy) in proxies.iter().enumerate() {
        for t in 0..2 {
            let (proxy, body, admitted, refused, retry_afters) = (
                proxy.clone(),
                body.clone(),
                admitted[p].clone(),
                refused.clone(),
                retry_afters.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let client = client();
                let mut i = 0;
                while start.elapsed() < run_for {
                    let id = format!("shared-{p}-{t}-{i}");
                    let reply = post(&client, &proxy, "/v1/chat", &body, &id).await;
                    match reply.status {
                        StatusCode::OK => {
                            admitted.fetch_add(PRICE, Ordering::Relaxed);
                        }
                        StatusCode::TOO_MANY_REQUESTS => {
                            assert_eq!(reply.json()["error"], "budget", "{id}");
                            retry_afters.lock().unwrap().push(retry_after(&reply));
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("{id}: unexpected {other}: {}", reply.text()),
                    }
                    i += 1;
                }
            }));
        }
    }
    for t in tasks {
        within(WAIT, "hammering task", t).await.expect("task");
    }
    let elapsed = start.elapsed();
    let per_proxy = [0, 1].map(|p| admitted[p].load(Ordering::Relaxed));
    let total: u64 = per_proxy.iter().sum();
    let refused = refused.load(Ordering::Relaxed);
    let one_budget = BURST as f64 + TPM as f64 / 60.0 * elapsed.as_secs_f64() + PRICE as f64;
    eprintln!(
        "admitted {total} tokens ({per_proxy:?} per replica), refused {refused} requests in \
         {elapsed:?}; one budget allows {one_budget:.1}, two separate ones {:.1}",
        2.0 * one_budget - PRICE as f64
    );
    assert!(
        total as f64 <= one_budget,
        "two replicas admitted {total} tokens in {elapsed:?}, more than one budget allows \
         (burst + rate × elapsed + one request = {one_budget:.1}): they do not share it"
    );
    assert!(
        total as f64 >= one_budget / 2.0,
        "only {total} tokens admitted in {elapsed:?} (one budget: {one_budget:.1}): the budget starves"
    );
    assert!(
        per_proxy.iter().all(|&a| a > 0),
        "a replica got nothing: {per_proxy:?}"
    );
    assert!(
        refused > 0,
        "nothing was refused: the load did not exceed the budget"
    );
    // 10 tokens refill in 0.5 s: Retry-After is that rounded up to whole seconds.
    let retry_afters = retry_afters.lock().unwrap().clone();
    assert!(
        retry_afters.iter().all(|r| (1..=2).contains(r)),
        "Retry-After outside 1..=2 s: {retry_afters:?}"
    );
    assert_eq!(up.request_count() as u64, total / PRICE);

    let client = client();
    let mut refused_counted = 0.0;
    for proxy in &proxies {
        let (_, s) = scrape(&client, proxy).await;
        assert_eq!(counter(&s, BACKEND_ERRORS, &[]), 0.0);
        refused_counted += counter(&s, RATE_LIMITED, &[("reason", "over_budget")]);
        let available = counter(&s, AVAILABLE, &[]);
        assert!(available <= BURST as f64, "{AVAILABLE} = {available}");
    }
    assert_eq!(refused_counted, refused as f64);

    // The budget lives in one key that goes away once it is full again (≤ 2 s of refill + 1 s).
    let pttl: i64 = redis
        .cli(&["PTTL", &key])
        .and_then(|t| t.parse().ok())
        .unwrap_or(-2);
    assert!(
        pttl == -2 || (0..=4_000).contains(&pttl),
        "the budget key's PTTL is {pttl} ms"
    );
    eventually(
        Duration::from_secs(10),
        "the idle budget key expiring",
        || {
            let gone = redis.cli(&["EXISTS", &key]).as_deref() == Some("0");
            async move { gone.then_some(()) }
        },
    )
    .await;
}

/// Reconciliation through Redis: replica A reserves 90 of a 100-token budget (1 token/s) and the answer
/// reports 10 tokens used; the 80 refunded let replica B admit another 90 at once, which without the
/// refund would wait 80 s. B's request reports no usage, so its reservation stands and the next one is
/// refused with a Retry-After of about 80 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (apt-get install redis-server)"]
async fn a_refund_through_redis_frees_the_budget_for_every_replica() {
    let redis = RedisServer::start();
    let key = key("refund");
    let up = llm("refund");
    let cfg = config(&up.url(), &redis.url(), &key, 60, 100, "closed");
    let (a, b) = (Proxy::start(&cfg), Proxy::start(&cfg));
    let client = client();
    let body = body_costing(90, 80);

    let reply = post(&client, &a, "/json?total=10", &body, "refund-a").await;
    assert_status(&reply, StatusCode::OK, "refund-a");
    // The refund runs in a task after the response; B gets in as soon as it has landed.
    until_status(
        &client,
        &b,
        ("/plain", &body),
        StatusCode::OK,
        &[StatusCode::TOO_MANY_REQUESTS],
        Duration::from_secs(10),
        "refund-b",
    )
    .await;
    let again = post(&client, &a, "/plain", &body, "refund-a-again").await;
    assert_status(&again, StatusCode::TOO_MANY_REQUESTS, "refund-a-again");
    assert_eq!(again.json()["error"], "budget");
    let wait = retry_after(&again);
    assert!(
        (60..=90).contains(&wait),
        "90 tokens with ~10 left at 1 token/s: Retry-After {wait} s, expected about 80"
    );
    assert_eq!(up.request_count(), 2);
    // The gauge shows what the script last reported: about the 10 tokens left.
    let (_, s) = scrape(&client, &a).await;
    let available = counter(&s, AVAILABLE, &[]);
    assert!(
        available <= 30.0,
        "{AVAILABLE} = {available} after spending 170 of 100 + refill"
    );
}

/// Redis stops: the "open" replica admits (unpriced) and counts backend errors, the "closed" one answers
/// 503 `budget_unavailable` with `Retry-After: 1`; each warns once, however many requests. Redis comes
/// back (empty, on the same port): both enforce the shared budget again and say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (apt-get install redis-server)"]
async fn redis_down_follows_on_backend_error_and_recovers() {
    let mut redis = RedisServer::start();
    let key = key("outage");
    let up = llm("outage");
    let open = Proxy::start(&config(&up.url(), &redis.url(), &key, 60, 100, "open"));
    let closed = Proxy::start(&config(&up.url(), &redis.url(), &key, 60, 100, "closed"));
    let client = client();
    let body = body_costing(80, 70);
    let request = ("/plain", body.as_str());

    // Healthy: one budget for both, 80 + 80 > 100.
    let reply = post(&client, &open, "/plain", &body, "before-open").await;
    assert_status(&reply, StatusCode::OK, "before-open");
    let reply = post(&client, &closed, "/plain", &body, "before-closed").await;
    assert_status(&reply, StatusCode::TOO_MANY_REQUESTS, "before-closed");

    redis.stop();

    // Open: admitted although the budget is spent, until at least two probes (1 s apart) have failed.
    let mut i = 0;
    let errors = loop {
        let started = Instant::now();
        let reply = post(&client, &open, "/plain", &body, &format!("down-open-{i}")).await;
        assert_status(&reply, StatusCode::OK, "open while Redis is down");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a request waited {:?} on a dead Redis",
            started.elapsed()
        );
        let (_, s) = scrape(&client, &open).await;
        let errors = counter(&s, BACKEND_ERRORS, &[]);
        if errors >= 2.0 {
            break errors;
        }
        assert!(
            i < 100,
            "the open replica counted {errors} backend errors after {i} requests"
        );
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "open replica: {} requests admitted, {errors} backend errors",
        i + 1
    );
    assert_eq!(
        warnings_about_redis(&open).await,
        1,
        "one warning per outage"
    );

    // Closed: 503 budget_unavailable, Retry-After: 1, counted as backend_down.
    for i in 0..3 {
        let id = format!("down-closed-{i}");
        let reply = post(&client, &closed, "/plain", &body, &id).await;
        assert_status(&reply, StatusCode::SERVICE_UNAVAILABLE, &id);
        let json = reply.json();
        assert_eq!(json["error"], "budget_unavailable", "{json}");
        assert_eq!(json["request_id"], id.as_str(), "{json}");
        assert_eq!(reply.header("retry-after").as_deref(), Some("1"));
    }
    let (text, s) = scrape(&client, &closed).await;
    assert_eq!(
        counter(&s, RATE_LIMITED, &[("reason", "backend_down")]),
        3.0
    );
    assert!(counter(&s, BACKEND_ERRORS, &[]) >= 1.0);
    assert_eq!(
        counter(
            &s,
            "driftguard_proxy_errors_total",
            &[("kind", "budget_unavailable")]
        ),
        3.0
    );
    assert_eq!(
        metric(
            &s,
            "driftguard_requests_total",
            &[("arm", "main"), ("class", "5xx")]
        )
        .unwrap_or(0.0),
        0.0,
        "a Redis outage counted against the arm:\n{text}"
    );
    assert_eq!(warnings_about_redis(&closed).await, 1);
    let upstream_before = up.request_count();

    // Back, empty: a full shared budget. The closed replica passes again once its probe succeeds...
    redis.spawn();
    until_status(
        &client,
        &closed,
        request,
        StatusCode::OK,
        &[StatusCode::SERVICE_UNAVAILABLE],
        Duration::from_secs(15),
        "closed-recovering",
    )
    .await;
    // ...and both enforce the one budget: 80 of 100 are spent, another 80 does not fit (for a minute).
    let reply = post(&client, &closed, "/plain", &body, "after-closed").await;
    assert_status(&reply, StatusCode::TOO_MANY_REQUESTS, "after-closed");
    until_status(
        &client,
        &open,
        request,
        StatusCode::TOO_MANY_REQUESTS,
        &[StatusCode::OK],
        Duration::from_secs(15),
        "open-recovering",
    )
    .await;
    assert!(up.request_count() > upstream_before);
    for (name, proxy) in [("open", &open), ("closed", &closed)] {
        proxy
            .wait_log("the line saying Redis is back", |v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("budget's Redis answers again"))
            })
            .await;
        assert_eq!(redis_back_lines(proxy), 1, "{name}");
        assert_eq!(
            warnings_about_redis(proxy).await,
            1,
            "{name}: still one warning"
        );
    }
}

/// The bodies the tests send cost what the tests say (the budget's estimate: bytes ÷ 4 + max_tokens).
#[test]
fn bodies_cost_what_they_say() {
    for (tokens, max) in [(10, 1), (80, 70), (90, 80)] {
        let body = body_costing(tokens, max);
        assert_eq!(body.len().div_ceil(4) as u64 + max, tokens);
    }
}

/// A reload that switches the backend from "local" to "redis" builds the shared budget: the replica's
/// spending now shows in Redis and limits another replica on the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (apt-get install redis-server)"]
async fn a_reload_switches_a_local_budget_to_the_shared_one() {
    let redis = RedisServer::start();
    let key = key("reload");
    let up = llm("reload");
    let shared = config(&up.url(), &redis.url(), &key, 60, 100, "closed");
    let local = shared.replace("backend = \"redis\"", "backend = \"local\"");
    let a = Proxy::start(&local);
    let client = client();
    let body = body_costing(80, 70);
    let reply = post(&client, &a, "/plain", &body, "local-1").await;
    assert_status(&reply, StatusCode::OK, "local-1");
    assert_eq!(redis.cli(&["EXISTS", &key]).as_deref(), Some("0"));

    a.rewrite_config(&shared);
    let reply = admin_post(&client, &a.admin_url("/reload"), "", None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // A fresh shared budget: full, whatever the local one had spent.
    let reply = post(&client, &a, "/plain", &body, "shared-1").await;
    assert_status(&reply, StatusCode::OK, "shared-1");
    assert_eq!(redis.cli(&["EXISTS", &key]).as_deref(), Some("1"));
    let b = Proxy::start(&shared);
    let reply = post(&client, &b, "/plain", &body, "other-replica").await;
    assert_status(&reply, StatusCode::TOO_MANY_REQUESTS, "other-replica");
}

/// `driftguard check` names the new keys when they are wrong and shows the Redis budget (without the
/// URL's password) when they are right.
#[test]
fn check_reports_the_redis_budget_keys() {
    let run = |budget: &str| {
        let path = unique("check").with_extension("toml");
        std::fs::write(
            &path,
            format!("{budget}\n[[arms]]\nname = \"a\"\nupstream = \"http://127.0.0.1:8000\"\n"),
        )
        .unwrap();
        let out = std::process::Command::new(bin())
            .arg("check")
            .arg("--config")
            .arg(&path)
            .env_remove("DRIFTGUARD_CONFIG")
            .output()
            .expect("run driftguard check");
        let _ = std::fs::remove_file(&path);
        out
    };
    let out = run(
        "[budget]\nbackend = \"redis\"\nredis_url = \"http://nowhere\"\nredis_key = \"\"\n\
         redis_timeout = \"0ms\"\non_backend_error = \"sometimes\"\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // A bad enum value stops serde before the semantic checks, so it is reported on its own.
    assert!(stderr.contains("budget.on_backend_error"), "{stderr}");
    let out = run(
        "[budget]\nbackend = \"redis\"\nredis_url = \"http://nowhere\"\nredis_key = \"\"\n\
         redis_timeout = \"0ms\"\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for key in [
        "budget.redis_url",
        "budget.redis_key",
        "budget.redis_timeout",
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{key}:"))),
            "no error line for {key} in:\n{stderr}"
        );
    }
    let out = run(
        "[budget]\nbackend = \"redis\"\nredis_url = \"redis://:hunter2@10.1.2.3:6380/1\"\n\
         redis_key = \"team:budget\"\nredis_timeout = \"80ms\"\non_backend_error = \"closed\"\n",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("budget:"))
        .unwrap_or_else(|| panic!("no budget line in:\n{stdout}"));
    for part in ["redis", "10.1.2.3:6380", "team:budget", "80ms", "closed"] {
        assert!(line.contains(part), "{part:?} missing from {line:?}");
    }
    assert!(!line.contains("hunter2"), "the password leaked: {line:?}");
}
