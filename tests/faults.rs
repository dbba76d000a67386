//! Hostile and unlucky clients and upstreams, end to end against the real binary: slow uploads are the
//! client's, not the arm's; idle connections are closed and a full proxy port leaves the admin port
//! reachable; a body broken off after a 200 head is a failure; and the small refusals (CONNECT, foreign
//! transfer codings, malformed chunked bodies, bad idempotency keys and request ids).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` on a new connection and reads the response head; returns it with the bytes after it.
async fn raw(addr: SocketAddr, request: &[u8]) -> (String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    let mut buf = Vec::new();
    let head = within(WAIT, "response head", read_head(&mut stream, &mut buf))
        .await
        .unwrap_or_else(|| panic!("no response head; got {:?}", String::from_utf8_lossy(&buf)));
    // The (small) rest of a proxy-made response.
    let mut rest = buf;
    let _ = tokio::time::timeout(Duration::from_millis(300), async {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stream.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    (head, rest)
}

fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"))
}

/// The JSON body of a proxy-made response read by [`raw`] (its `content-length` bytes).
fn json_body(head: &str, rest: &[u8]) -> Value {
    let len: usize = head_field(head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(rest.len());
    serde_json::from_slice(&rest[..len.min(rest.len())])
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(rest)))
}

async fn status(client: &HttpClient, proxy: &Proxy) -> Value {
    get(client, &proxy.admin_url("/status"), &[]).await.json()
}

fn arm_status<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["arms"]
        .as_array()
        .and_then(|arms| arms.iter().find(|a| a["name"] == name))
        .unwrap_or_else(|| panic!("no arm {name} in {status}"))
}

/// Whether the peer closed `stream` (EOF or reset) within `limit`, reading and discarding anything.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A raw upstream answering a request with a 200 head announcing 1000 bytes and sending 10, then
/// either closing the connection (`stall: false`) or holding it open.
fn truncating(name: &str, stall: bool) -> RawUpstream {
    RawUpstream::start(name, move |mut stream| async move {
        let mut buf = Vec::new();
        if read_head(&mut stream, &mut buf).await.is_none() {
            return;
        }
        let head =
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n";
        if stream.write_all(head.as_bytes()).await.is_err()
            || stream.write_all(b"{\"answer\":").await.is_err()
        {
            return;
        }
        if stall {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    })
}

// ================================================================================================
// 1. Slow uploads
// ================================================================================================

/// Uploaders trickling their bodies are timed by `listen.body_timeout` (408), not by the arm's
/// `request_timeout`: no upstream error, no timeout and no breaker failure is counted against the arm,
/// and the breaker stays closed for everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploaders_do_not_open_the_breaker() {
    let upstream = Upstream::start("main");
    let config = format!(
        "{LISTEN}body_timeout = \"1500ms\"\n[upstream]\nrequest_timeout = \"300ms\"\n[breaker]\nwindow = \"30s\"\nmin_calls = 5\nfailure_rate = 0.5\n{}",
        arm("main", &upstream.url(), 1, &[])
    );
    let proxy = Proxy::start(&config);
    let client = client();

    const UPLOADERS: usize = 12;
    let addr = proxy.proxy;
    let uploads: Vec<_> = (0..UPLOADERS)
        .map(|i| {
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.expect("connect");
                let head = format!(
                    "POST /upload?n={i} HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n"
                );
                stream.write_all(head.as_bytes()).await.expect("head");
                let started = Instant::now();
                let mut buf = Vec::new();
                // One byte every 100 ms: far below the body, never done within the body timeout.
                loop {
                    tokio::select! {
                        head = read_head(&mut stream, &mut buf) => {
                            return (head.map(|h| status_of(&h)), started.elapsed());
                        }
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {
                            if stream.write_all(b"x").await.is_err() {
                                let head = read_head(&mut stream, &mut buf).await;
                                return (head.map(|h| status_of(&h)), started.elapsed());
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for upload in uploads {
        let (status, took) = within(WAIT, "a slow upload's answer", upload)
            .await
            .expect("uploader task");
        assert_eq!(status, Some(408), "a slow uploader gets 408");
        assert!(
            took >= Duration::from_millis(1000),
            "408 after the body timeout, not the upstream's ({took:?})"
        );
    }

    let s = status(&client, &proxy).await;
    let main = arm_status(&s, "main");
    assert_eq!(main["breaker"], "closed", "{main}");
    assert_eq!(main["window"]["upstream_errors"], 0, "{main}");
    assert_eq!(main["window"]["timeouts"], 0, "{main}");
    assert_eq!(main["window"]["error_rate"], 0.0, "{main}");
    // Everyone else still gets through.
    let reply = get(&client, &proxy.url("/after"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let (_, samples) = scrape(&client, &proxy).await;
    assert_eq!(
        metric(
            &samples,
            "driftguard_proxy_errors_total",
            &[("kind", "body_timeout")]
        ),
        Some(UPLOADERS as f64)
    );
    assert_eq!(
        metric(
            &samples,
            "driftguard_proxy_errors_total",
            &[("kind", "upstream_timeout")]
        ),
        Some(0.0)
    );
}

/// Once the body is sent, the upstream's own `request_timeout` starts: a body that took longer than
/// that to upload is still answered when the upstream is quick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_clock_starts_when_the_body_is_sent() {
    let upstream = Upstream::start("main");
    let config = format!(
        "{LISTEN}body_timeout = \"10s\"\n[upstream]\nrequest_timeout = \"400ms\"\n{}",
        arm("main", &upstream.url(), 1, &[])
    );
    let proxy = Proxy::start(&config);
    let mut stream = TcpStream::connect(proxy.proxy).await.expect("connect");
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-type: text/plain\r\ncontent-length: 10\r\n\r\n")
        .await
        .unwrap();
    // 10 bytes over ~1 s: longer than request_timeout, well within body_timeout.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream.write_all(b"y").await.unwrap();
    }
    let mut buf = Vec::new();
    let head = within(WAIT, "answer", read_head(&mut stream, &mut buf))
        .await
        .expect("head");
    assert_eq!(status_of(&head), 200, "{head}");
}

// ================================================================================================
// 2. Idle connections and the connection cap
// ================================================================================================

/// A connection that never sends a byte, and a keep-alive connection after its request, are closed
/// after `listen.idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let upstream = Upstream::start("main");
    let config = format!(
        "{LISTEN}idle_timeout = \"1s\"\n{}",
        arm("main", &upstream.url(), 1, &[])
    );
    let proxy = Proxy::start(&config);

    let mut silent = TcpStream::connect(proxy.proxy).await.unwrap();
    let opened = Instant::now();
    assert!(
        closed_within(&mut silent, Duration::from_secs(10)).await,
        "a connection that never sent a byte stayed open"
    );
    assert!(opened.elapsed() >= Duration::from_millis(800));

    let mut kept = TcpStream::connect(proxy.proxy).await.unwrap();
    kept.write_all(b"GET /one HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let head = within(WAIT, "head", read_head(&mut kept, &mut buf))
        .await
        .expect("head");
    assert_eq!(status_of(&head), 200);
    assert!(
        closed_within(&mut kept, Duration::from_secs(10)).await,
        "an idle keep-alive connection stayed open"
    );

    // The admin listener closes idle connections too.
    let mut admin = TcpStream::connect(proxy.admin).await.unwrap();
    assert!(closed_within(&mut admin, Duration::from_secs(10)).await);
}

/// With the proxy port holding `listen.max_connections`, a new connection is closed at accept and
/// counted, while the admin port's `/healthz` still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_proxy_port_leaves_the_admin_port_reachable() {
    let upstream = Upstream::start("main");
    const CAP: usize = 20;
    let config = format!(
        "{LISTEN}max_connections = {CAP}\nidle_timeout = \"60s\"\n{}",
        arm("main", &upstream.url(), 1, &[])
    );
    let proxy = Proxy::start(&config);
    let client = client();

    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(TcpStream::connect(proxy.proxy).await.unwrap());
    }
    // Accepting is asynchronous: the cap is reached once every held connection was taken.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut extra = TcpStream::connect(proxy.proxy).await.unwrap();
    let _ = extra.write_all(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut got)).await;
    assert!(closed.is_ok(), "the connection past the cap was not closed");
    assert!(
        !String::from_utf8_lossy(&got).contains("200 OK"),
        "the connection past the cap was served"
    );

    let health = get(&client, &proxy.admin_url("/healthz"), &[]).await;
    assert_eq!(health.status, StatusCode::OK);
    let (_, samples) = scrape(&client, &proxy).await;
    let refused = metric(&samples, "driftguard_connections_refused_total", &[]).unwrap_or(0.0);
    assert!(refused >= 1.0, "refusals counted: {refused}");

    // Room again once one is closed.
    drop(held.pop());
    eventually(WAIT, "a new connection served", || async {
        let mut s = TcpStream::connect(proxy.proxy).await.ok()?;
        s.write_all(b"GET /y HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        let head = tokio::time::timeout(Duration::from_secs(2), read_head(&mut s, &mut buf))
            .await
            .ok()??;
        (status_of(&head) == 200).then_some(())
    })
    .await;
}

// ================================================================================================
// 6. Bodies broken off after a 200 head
// ================================================================================================

/// A canary that breaks every body off after its 200 head opens its breaker, like one answering 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_bodies_open_the_breaker() {
    let canary = truncating("canary", false);
    let config = format!(
        "{LISTEN}[breaker]\nwindow = \"30s\"\nmin_calls = 10\nfailure_rate = 0.5\nopen_for = \"60s\"\n{}",
        arm("canary", &canary.url(), 1, &[])
    );
    let proxy = Proxy::start(&config);
    let client = client();

    let mut broken = 0;
    let mut open = false;
    for i in 0..40 {
        let req = http::Request::get(proxy.url(&format!("/t/{i}")))
            .body(empty())
            .unwrap();
        let resp = within(WAIT, "a truncated exchange", client.request(req))
            .await
            .expect("head");
        if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(
                resp.headers()
                    .get("x-driftguard-breaker")
                    .map(|v| v.to_str().unwrap()),
                Some("open")
            );
            open = true;
            break;
        }
        assert_eq!(resp.status(), StatusCode::OK);
        let body = http_body_util::BodyExt::collect(resp.into_body()).await;
        assert!(body.is_err(), "the body was cut short");
        broken += 1;
    }
    assert!(
        open,
        "the breaker never opened after {broken} broken bodies"
    );
    assert!(broken >= 10, "opened after {broken}, before min_calls");
    let s = status(&client, &proxy).await;
    let canary_status = arm_status(&s, "canary");
    assert_eq!(canary_status["breaker"], "open");
    assert!(canary_status["window"]["broken_off"].as_u64() >= Some(10));
}

/// The same canary next to a healthy baseline trips the `error_rate` rule: a body broken off after a
/// 200 head is an error of the arm's window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_bodies_trip_the_error_rate_rule() {
    let baseline = Upstream::start("baseline");
    let canary = truncating("canary", false);
    let config = format!(
        r#"{LISTEN}
[rules]
window = "10s"
eval_interval = "250ms"
min_samples = 20
[rules.hard]
p99_latency_ratio_over = 1000.0
[recovery]
hold = "1h"
deadline = "1h"
[breaker]
min_calls = 100000
[[arms]]
name = "baseline"
upstream = "{}"
weight = 50
baseline = true
[[arms]]
name = "canary"
upstream = "{}"
weight = 50
"#,
        baseline.url(),
        canary.url()
    );
    let proxy = Proxy::start(&config);
    let client = client();

    let tripped = eventually(WAIT * 2, "an error_rate trip", || async {
        for i in 0..20 {
            let req = http::Request::get(proxy.url(&format!("/t/{i}")))
                .body(empty())
                .unwrap();
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(5), client.request(req)).await
            {
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            }
        }
        let s = status(&client, &proxy).await;
        (s["guard"]["state"] == "tripped").then_some(s)
    })
    .await;
    let trip = &tripped["guard"]["last_trip"];
    assert_eq!(trip["rule"], "error_rate", "{trip}");
    assert_eq!(trip["arm"], "canary", "{trip}");
    let canary_status = arm_status(&tripped, "canary");
    assert_eq!(canary_status["window"]["errors_5xx"], 0, "{canary_status}");
}

// ================================================================================================
// 7. The small items
// ================================================================================================

/// A response body that stalls after its head is cut off after `upstream.body_idle_timeout` and
/// counted as an upstream timeout of the arm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_response_body_is_cut_off() {
    let stalling = truncating("stall", true);
    let config = format!(
        "{LISTEN}[upstream]\nbody_idle_timeout = \"1s\"\n{}",
        arm("main", &stalling.url(), 1, &[])
    );
    let proxy = Proxy::start(&config);
    let client = client();
    let req = http::Request::get(proxy.url("/stall"))
        .body(empty())
        .unwrap();
    let resp = within(WAIT, "head", client.request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let started = Instant::now();
    let body = within(
        Duration::from_secs(10),
        "the stalled body cut off",
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await;
    assert!(body.is_err(), "the stalled body ended cleanly");
    assert!(started.elapsed() >= Duration::from_millis(800));
    let s = status(&client, &proxy).await;
    let main = arm_status(&s, "main");
    assert_eq!(main["window"]["timeouts"], 1, "{main}");
    assert_eq!(main["window"]["broken_off"], 1, "{main}");
}

/// `CONNECT` and `Transfer-Encoding: gzip, chunked` are refused with a JSON 501 and never reach the
/// upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_foreign_transfer_codings_are_refused() {
    let upstream = Upstream::start("main");
    let proxy = Proxy::start(&format!("{LISTEN}{}", arm("main", &upstream.url(), 1, &[])));

    let (head, rest) = raw(
        proxy.proxy,
        b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&head), 501, "{head}");
    assert_eq!(json_body(&head, &rest)["error"], "not_implemented");

    let (head, rest) = raw(
        proxy.proxy,
        b"POST /gz HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&head), 501, "{head}");
    assert_eq!(json_body(&head, &rest)["error"], "not_implemented");
    assert_eq!(upstream.request_count(), 0);
}

/// A malformed chunked request body gets 400, not 499, and is not counted in the arm's window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_is_a_400_not_the_arms() {
    let upstream = Upstream::start("main");
    let proxy = Proxy::start(&format!("{LISTEN}{}", arm("main", &upstream.url(), 1, &[])));
    let client = client();
    let (head, rest) = raw(
        proxy.proxy,
        b"POST /bad HTTP/1.1\r\nhost: a\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&head), 400, "{head}");
    assert_eq!(json_body(&head, &rest)["error"], "bad_request");
    let s = status(&client, &proxy).await;
    let main = arm_status(&s, "main");
    assert_eq!(main["window"]["requests"], 0, "{main}");
}

/// Idempotency keys with a space, a tab or a control character are refused (400).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_with_whitespace_are_refused() {
    let upstream = Upstream::start("main");
    let proxy = Proxy::start(&format!(
        "{LISTEN}[writes]\nroutes = [\"POST /ingest\"]\n{}",
        arm("main", &upstream.url(), 1, &[])
    ));
    for key in ["a b", "a\tb"] {
        let request = format!(
            "POST /ingest HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\nidempotency-key: {key}\r\ncontent-length: 2\r\n\r\n{{}}"
        );
        let (head, rest) = raw(proxy.proxy, request.as_bytes()).await;
        assert_eq!(status_of(&head), 400, "key {key:?}: {head}");
        assert_eq!(
            json_body(&head, &rest)["error"],
            "idempotency_key_invalid",
            "key {key:?}"
        );
    }
    assert_eq!(upstream.request_count(), 0);
    // A visible-ASCII key still passes.
    let (head, _) = raw(
        proxy.proxy,
        b"POST /ingest HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\nidempotency-key: ok-1\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await;
    assert_eq!(status_of(&head), 200, "{head}");
}

/// A non-ASCII client `x-request-id` is replaced by a new id, and both are logged; several
/// `x-forwarded-for` fields are all kept, joined, with the client's address appended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_and_forwarded_for_fields() {
    let upstream = Upstream::start("main");
    let proxy = Proxy::start(&format!("{LISTEN}{}", arm("main", &upstream.url(), 1, &[])));
    let request = b"GET /id HTTP/1.1\r\nhost: a\r\nx-request-id: caf\xc3\xa9-1\r\nx-forwarded-for: 10.0.0.1\r\nx-forwarded-for: 10.0.0.2, 10.0.0.3\r\n\r\n".to_vec();
    let (head, _) = raw(proxy.proxy, &request).await;
    assert_eq!(status_of(&head), 200, "{head}");
    let id = head_field(&head, "x-request-id").expect("an id");
    assert_eq!(id.len(), 32, "a new id: {id}");
    let forwarded = upstream.find(&id).expect("the upstream got the new id");
    assert_eq!(
        forwarded.header("x-forwarded-for").as_deref(),
        Some("10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1")
    );
    let line = proxy
        .wait_log("the replaced id logged", |v| {
            v["client_request_id"].as_str().is_some()
        })
        .await;
    assert_eq!(line["request_id"], id.as_str(), "{line}");
    assert_eq!(line["client_request_id"], "café-1", "{line}");
}

/// With no admin token and the admin listener on `[::]`, a peer on 127.0.0.1 (seen as
/// `::ffff:127.0.0.1`) is loopback and may call a mutating endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapped_loopback_is_loopback_for_the_admin_rule() {
    if std::net::TcpListener::bind("[::]:0").is_err() {
        eprintln!("skipped: no IPv6 on this host");
        return;
    }
    let upstream = Upstream::start("main");
    let config = format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"[::]:0\"\n{}",
        arm("main", &upstream.url(), 1, &[])
    );
    let proxy = Proxy::start(&config);
    let admin: SocketAddr = format!("127.0.0.1:{}", proxy.admin.port()).parse().unwrap();
    let (head, rest) = raw(
        admin,
        b"POST /arms/main/weight HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: 13\r\n\r\n{\"weight\": 1}",
    )
    .await;
    assert_ne!(
        status_of(&head),
        403,
        "{head}\n{}",
        String::from_utf8_lossy(&rest)
    );
    assert_eq!(
        status_of(&head),
        200,
        "{head}\n{}",
        String::from_utf8_lossy(&rest)
    );
}
