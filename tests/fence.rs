//! Idempotency fence (SPEC §5): a write carrying `idempotency-key` executes once upstream; the same key
//! and body replay the receipt (`idempotent-replay: true`), another body gets 409 with a diff, duplicates
//! in flight wait for the first, receipts survive kill -9 and expire after `writes.ttl`, and with
//! `store = "redis"` replicas share them.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Request, StatusCode};
use serde_json::{json, Value};

/// An upstream that numbers its executions and answers `201 {"id": n, "echo": <body>}` after `delay`.
fn counting_upstream(delay: Duration) -> (Scripted, Arc<AtomicUsize>) {
    let executions = Arc::new(AtomicUsize::new(0));
    let n = executions.clone();
    let up = Scripted::start("writes", move |_, body| {
        let id = n.fetch_add(1, Ordering::SeqCst) + 1;
        let echo: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        Canned::json(&json!({"id": id, "echo": echo}))
            .status(StatusCode::CREATED)
            .delay(delay)
    });
    (up, executions)
}

fn config(upstream: &str, writes: &str) -> String {
    format!(
        "{LISTEN}\n[writes]\nroutes = [\"POST /ingest\"]\n{writes}\n{}",
        arm("main", upstream, 1, &[])
    )
}

/// POST `body` to `path` with `idempotency-key: key` (none when empty).
async fn write(client: &HttpClient, proxy: &Proxy, path: &str, key: &str, body: &Value) -> Reply {
    let headers: &[(&str, &str)] = if key.is_empty() {
        &[]
    } else {
        &[("idempotency-key", key)]
    };
    post_json(client, &proxy.url(path), body, headers).await
}

async fn decisions(client: &HttpClient, proxy: &Proxy) -> [f64; 5] {
    let (_, samples) = scrape(client, proxy).await;
    let d = |decision: &str| {
        metric(
            &samples,
            "driftguard_idempotency_total",
            &[("decision", decision)],
        )
        .unwrap_or(-1.0)
    };
    [
        d("new"),
        d("replay"),
        d("conflict"),
        d("wait"),
        metric(&samples, "driftguard_duplicate_effects_total", &[]).unwrap_or(-1.0),
    ]
}

fn is_replay(reply: &Reply) -> bool {
    reply.header("idempotent-replay").as_deref() == Some("true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_duplicates_execute_once_and_get_the_same_answer() {
    let (up, executions) = counting_upstream(Duration::from_millis(400));
    let proxy = Proxy::start(&config(&up.url(), ""));
    let client = client();
    let body = json!({"doc": "alpha"});

    let mut tasks = Vec::new();
    for i in 0..50 {
        let (client, url, body) = (client.clone(), proxy.url("/ingest"), body.clone());
        tasks.push(tokio::spawn(async move {
            let id = format!("dup-{i}");
            let req = Request::post(url)
                .header("content-type", "application/json")
                .header("idempotency-key", "order-50")
                .header("x-request-id", id.as_str())
                .body(full(body.to_string()))
                .unwrap();
            (id, exchange(&client, req).await)
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }

    assert_eq!(
        executions.load(Ordering::SeqCst),
        1,
        "the upstream executed the key more than once"
    );
    assert_eq!(up.request_count(), 1);
    let first = &replies[0].1;
    for (id, reply) in &replies {
        assert_eq!(reply.status, StatusCode::CREATED, "{id}: {}", reply.text());
        assert_eq!(reply.body, first.body, "{id}");
        assert_eq!(reply.json()["id"], 1, "{id}");
        assert_eq!(reply.json()["echo"], body, "{id}");
        assert_eq!(reply.header("x-request-id").as_deref(), Some(id.as_str()));
        assert_eq!(
            reply.header("content-type").as_deref(),
            Some("application/json")
        );
    }
    let replays = replies.iter().filter(|(_, r)| is_replay(r)).count();
    assert_eq!(replays, 49, "all but the executing request are replays");

    let [new, replay, conflict, wait, duplicates] = decisions(&client, &proxy).await;
    assert_eq!((new, replay, conflict, duplicates), (1.0, 49.0, 0.0, 0.0));
    // The upstream took 400 ms: most duplicates arrived while the first was in flight.
    assert!((1.0..=49.0).contains(&wait), "wait = {wait}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_another_request_gets_409_with_a_diff() {
    let (up, executions) = counting_upstream(Duration::ZERO);
    // With a budget too: it prices the body the fence has already read whole.
    let budget = "\n[budget]\ntokens_per_minute = 100000\nburst = 10000\n";
    let proxy = Proxy::start(&format!("{}{budget}", config(&up.url(), "")));
    let client = client();

    let first = write(&client, &proxy, "/ingest", "k-diff", &json!({"doc": 1})).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    assert!(!is_replay(&first));
    assert_eq!(
        up.exchanges()[0].json(),
        json!({"doc": 1}),
        "the body reached the upstream whole"
    );
    let again = write(&client, &proxy, "/ingest", "k-diff", &json!({"doc": 1})).await;
    assert!(is_replay(&again));
    assert_eq!(again.body, first.body);

    let other = write(&client, &proxy, "/ingest", "k-diff", &json!({"doc": 2})).await;
    assert_eq!(other.status, StatusCode::CONFLICT, "{}", other.text());
    let v = other.json();
    assert_eq!(v["error"], "idempotency_conflict", "{v}");
    let diff = &v["diff"]["body_sha256"];
    assert!(
        diff["stored"].is_string() && diff["received"].is_string(),
        "{v}"
    );
    assert_ne!(diff["stored"], diff["received"], "{v}");
    assert!(v["diff"].get("path").is_none(), "{v}");
    assert!(v["request_id"].is_string(), "{v}");

    let elsewhere = write(
        &client,
        &proxy,
        "/ingest/batch",
        "k-diff",
        &json!({"doc": 1}),
    )
    .await;
    assert_eq!(
        elsewhere.status,
        StatusCode::CONFLICT,
        "{}",
        elsewhere.text()
    );
    assert_eq!(
        elsewhere.json()["diff"]["path"],
        json!({"stored": "/ingest", "received": "/ingest/batch"})
    );

    assert_eq!(executions.load(Ordering::SeqCst), 1);
    let [new, replay, conflict, _, duplicates] = decisions(&client, &proxy).await;
    assert_eq!((new, replay, conflict, duplicates), (1.0, 1.0, 2.0, 0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_survives_kill_9_and_replays_after_restart() {
    let (up, executions) = counting_upstream(Duration::ZERO);
    let state_dir = common::unique("state-fence");
    let cfg = format!(
        "state_dir = {:?}\n{}",
        state_dir.display().to_string(),
        config(&up.url(), "")
    );
    let client = client();
    let body = json!({"doc": "durable"});

    let mut first = Proxy::start(&cfg);
    let original = write(&client, &first, "/ingest", "k-durable", &body).await;
    assert_eq!(original.status, StatusCode::CREATED, "{}", original.text());
    // The end of the body waited for the commit: killed right after, the receipt is on disk.
    first.signal(libc::SIGKILL);
    assert!(
        first.wait_exit(WAIT).await.is_some(),
        "killed proxy did not exit"
    );

    let second = Proxy::start(&cfg);
    let after = write(&client, &second, "/ingest", "k-durable", &body).await;
    assert_eq!(after.status, StatusCode::CREATED, "{}", after.text());
    assert!(is_replay(&after), "not replayed after the restart");
    assert_eq!(after.body, original.body);
    assert_eq!(executions.load(Ordering::SeqCst), 1);
    let conflict = write(&client, &second, "/ingest", "k-durable", &json!({"doc": 0})).await;
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    drop(second);
    let _ = std::fs::remove_dir_all(&state_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_receipt_executes_again() {
    let (up, executions) = counting_upstream(Duration::ZERO);
    let proxy = Proxy::start(&config(&up.url(), "ttl = \"700ms\""));
    let client = client();
    let body = json!({"doc": "short-lived"});

    let first = write(&client, &proxy, "/ingest", "k-ttl", &body).await;
    assert_eq!(first.json()["id"], 1);
    let replay = write(&client, &proxy, "/ingest", "k-ttl", &body).await;
    assert!(is_replay(&replay));
    let fresh = eventually(WAIT, "the receipt expires", || {
        let (client, proxy, body) = (&client, &proxy, &body);
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let reply = write(client, proxy, "/ingest", "k-ttl", body).await;
            (!is_replay(&reply)).then_some(reply)
        }
    })
    .await;
    assert_eq!(fresh.status, StatusCode::CREATED);
    assert_eq!(fresh.json()["id"], 2);
    assert_eq!(executions.load(Ordering::SeqCst), 2);
    // The new receipt replays in turn; an expired receipt is no duplicate effect.
    assert!(is_replay(
        &write(&client, &proxy, "/ingest", "k-ttl", &body).await
    ));
    let [new, _, _, _, duplicates] = decisions(&client, &proxy).await;
    assert_eq!((new, duplicates), (2.0, 0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_key_refuses_unkeyed_writes_before_the_upstream() {
    let (up, executions) = counting_upstream(Duration::ZERO);
    let proxy = Proxy::start(&config(
        &up.url(),
        "require_key = true\nmax_body_bytes = 64",
    ));
    let client = client();

    let reply = write(&client, &proxy, "/ingest", "", &json!({"doc": 1})).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(reply.json()["error"], "idempotency_key_required");
    let long = "k".repeat(256);
    let reply = write(&client, &proxy, "/ingest", &long, &json!({"doc": 1})).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(reply.json()["error"], "idempotency_key_invalid");
    let big = json!({"doc": "x".repeat(100)});
    let reply = write(&client, &proxy, "/ingest", "k-big", &big).await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.json()["error"], "body_too_large");
    assert_eq!(
        executions.load(Ordering::SeqCst),
        0,
        "nothing reached the upstream"
    );

    // Reads are not writes: no key needed.
    let read = post_json(&client, &proxy.url("/ask"), &json!({"q": 1}), &[]).await;
    assert_eq!(read.status, StatusCode::CREATED);
    let keyed = write(&client, &proxy, "/ingest", "k-ok", &json!({"doc": 1})).await;
    assert_eq!(keyed.status, StatusCode::CREATED);
    assert_eq!(executions.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_pass_a_write_freeze_but_new_keys_do_not() {
    let (up, executions) = counting_upstream(Duration::ZERO);
    let proxy = Proxy::start(&config(&up.url(), ""));
    let client = client();
    let body = json!({"doc": "frozen"});

    let first = write(&client, &proxy, "/ingest", "k-frozen", &body).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(is_replay(
        &write(&client, &proxy, "/ingest", "k-frozen", &body).await
    ));
    let frozen = admin_post(&client, &proxy.admin_url("/freeze"), "", None).await;
    assert_eq!(frozen.status, StatusCode::OK, "{}", frozen.text());

    let replay = write(&client, &proxy, "/ingest", "k-frozen", &body).await;
    assert_eq!(replay.status, StatusCode::CREATED, "{}", replay.text());
    assert!(is_replay(&replay));
    let new = write(&client, &proxy, "/ingest", "k-new", &body).await;
    assert_eq!(
        new.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        new.text()
    );
    assert_eq!(new.json()["error"], "writes_frozen");

    // The refused key was not burnt: once unfrozen it executes.
    let thawed = admin_post(&client, &proxy.admin_url("/unfreeze"), "", None).await;
    assert_eq!(thawed.status, StatusCode::OK);
    let new = write(&client, &proxy, "/ingest", "k-new", &body).await;
    assert_eq!(new.status, StatusCode::CREATED, "{}", new.text());
    assert!(!is_replay(&new));
    assert_eq!(executions.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_leaves_no_receipt() {
    let dead = closed_port_url();
    let proxy = Proxy::start(&config(&dead, ""));
    let client = client();
    let body = json!({"doc": "retry-me"});

    let reply = write(&client, &proxy, "/ingest", "k-retry", &body).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert!(!is_replay(&reply));

    // The upstream comes up; the retry with the same key executes.
    let (up, executions) = counting_upstream(Duration::ZERO);
    proxy.rewrite_config(&config(&up.url(), ""));
    let reloaded = admin_post(&client, &proxy.admin_url("/reload"), "", None).await;
    assert_eq!(reloaded.status, StatusCode::OK, "{}", reloaded.text());
    let retry = write(&client, &proxy, "/ingest", "k-retry", &body).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.text());
    assert!(!is_replay(&retry));
    assert_eq!(executions.load(Ordering::SeqCst), 1);
    let [new, _, _, _, duplicates] = decisions(&client, &proxy).await;
    assert_eq!((new, duplicates), (2.0, 0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (apt-get install redis-server)"]
async fn replicas_sharing_redis_execute_a_key_once() {
    let redis = RedisServer::start();
    let (up, executions) = counting_upstream(Duration::from_millis(500));
    let writes = format!("store = \"redis\"\nredis_url = {:?}", redis.url());
    let a = Proxy::start(&config(&up.url(), &writes));
    let b = Proxy::start(&config(&up.url(), &writes));
    let client = client();
    let body = json!({"doc": "shared"});

    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = if i % 2 == 0 {
            a.url("/ingest")
        } else {
            b.url("/ingest")
        };
        let (client, body) = (client.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let req = Request::post(url)
                .header("content-type", "application/json")
                .header("idempotency-key", "k-shared")
                .body(full(body.to_string()))
                .unwrap();
            exchange(&client, req).await
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    assert_eq!(
        executions.load(Ordering::SeqCst),
        1,
        "executed on more than one replica"
    );
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        assert_eq!(reply.body, replies[0].body);
    }
    assert_eq!(replies.iter().filter(|r| is_replay(r)).count(), 19);
    assert!(redis
        .cli(&["EXISTS", "driftguard:receipt:k-shared"])
        .is_some_and(|v| v == "1"));
    let conflict = write(&client, &b, "/ingest", "k-shared", &json!({"doc": 0})).await;
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    for proxy in [&a, &b] {
        let [_, _, _, _, duplicates] = decisions(&client, proxy).await;
        assert_eq!(duplicates, 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_refuses_keyed_writes() {
    let (up, executions) = counting_upstream(Duration::ZERO);
    let url = closed_port_url().replace("http://", "redis://");
    let proxy = Proxy::start(&config(
        &up.url(),
        &format!("store = \"redis\"\nredis_url = {url:?}"),
    ));
    let client = client();

    let reply = write(&client, &proxy, "/ingest", "k-nostore", &json!({"doc": 1})).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.json()["error"], "receipt_store_unavailable");
    assert!(reply.header("retry-after").is_some());
    // Unkeyed writes and reads are not fenced and go on.
    let unkeyed = write(&client, &proxy, "/ingest", "", &json!({"doc": 1})).await;
    assert_eq!(unkeyed.status, StatusCode::CREATED);
    assert_eq!(executions.load(Ordering::SeqCst), 1);
    let (_, samples) = scrape(&client, &proxy).await;
    assert!(
        metric(&samples, "driftguard_idempotency_store_errors_total", &[]).unwrap_or(0.0) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_answers_replay_whole_and_oversized_ones_replay_without_body() {
    let executions = Arc::new(AtomicUsize::new(0));
    let n = executions.clone();
    let up = Scripted::start("stream", move |_, _| {
        n.fetch_add(1, Ordering::SeqCst);
        Canned::sse(&["{\"part\":1}", "{\"part\":2}"]).gap(Duration::from_millis(50))
    });
    let proxy = Proxy::start(&config(&up.url(), "receipt_body_max = 1024"));
    let client = client();
    let body = json!({"doc": "stream"});

    let first = write(&client, &proxy, "/ingest", "k-stream", &body).await;
    assert_eq!(first.status, StatusCode::OK);
    let replay = write(&client, &proxy, "/ingest", "k-stream", &body).await;
    assert!(is_replay(&replay));
    assert_eq!(replay.body, first.body);
    assert_eq!(
        replay.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(replay.header("idempotent-replay-body"), None);

    proxy.rewrite_config(&config(&up.url(), "receipt_body_max = 8"));
    let reloaded = admin_post(&client, &proxy.admin_url("/reload"), "", None).await;
    assert_eq!(reloaded.status, StatusCode::OK, "{}", reloaded.text());
    let big = write(&client, &proxy, "/ingest", "k-big-answer", &body).await;
    assert_eq!(
        big.body, first.body,
        "the first client gets the whole stream"
    );
    let replay = write(&client, &proxy, "/ingest", "k-big-answer", &body).await;
    assert!(is_replay(&replay));
    assert_eq!(replay.status, StatusCode::OK);
    assert_eq!(
        replay.header("idempotent-replay-body").as_deref(),
        Some("omitted")
    );
    assert!(replay.body.is_empty());
    assert_eq!(executions.load(Ordering::SeqCst), 2);
}

/// A replica streaming a long answer keeps its Redis pending marker alive past the lease
/// (2 × `upstream.request_timeout`), so the other replica never executes the key meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (apt-get install redis-server)"]
async fn a_long_stream_keeps_other_replicas_waiting_past_the_lease() {
    let redis = RedisServer::start();
    let executions = Arc::new(AtomicUsize::new(0));
    let n = executions.clone();
    let up = Scripted::start("long", move |_, _| {
        n.fetch_add(1, Ordering::SeqCst);
        let parts: Vec<String> = (1..=8).map(|i| format!("{{\"part\":{i}}}")).collect();
        Canned::sse(&parts).gap(Duration::from_millis(200))
    });
    let cfg = format!(
        "{}\n[upstream]\nrequest_timeout = \"250ms\"\n",
        config(
            &up.url(),
            &format!("store = \"redis\"\nredis_url = {:?}", redis.url())
        )
    );
    let (a, b) = (Proxy::start(&cfg), Proxy::start(&cfg));
    let client = client();
    let body = json!({"doc": "long"});
    let request = |proxy: &Proxy| {
        Request::post(proxy.url("/ingest"))
            .header("content-type", "application/json")
            .header("idempotency-key", "k-long")
            .body(full(body.to_string()))
            .unwrap()
    };

    let response = within(WAIT, "head from replica a", client.request(request(&a)))
        .await
        .unwrap();
    let mut stream = response.into_body();
    let mut seen = String::new();
    // Part 5 comes ~800 ms in: past the 500 ms lease, so only a renewed marker still holds the key.
    read_until(&mut stream, &mut seen, WAIT, |s| s.contains("\"part\":5")).await;
    let meanwhile = exchange(&client, request(&b)).await;
    assert_eq!(
        meanwhile.status,
        StatusCode::CONFLICT,
        "{}",
        meanwhile.text()
    );
    assert_eq!(meanwhile.header("retry-after").as_deref(), Some("1"));
    read_to_end(&mut stream, &mut seen, WAIT).await;

    let replay = exchange(&client, request(&b)).await;
    assert!(is_replay(&replay), "{}", replay.text());
    assert_eq!(replay.text(), seen);
    assert_eq!(executions.load(Ordering::SeqCst), 1);
}
