//! The guards that read a request body ahead of the upstream — the idempotency fence (the whole body,
//! to hash it) and the token budget (a prefix, to price it) — treat a failing upload as the client's,
//! end to end against the real binary: a malformed chunked body is 400 `bad_request`, a slow one is
//! 408 `body_timeout` after `listen.body_timeout` (not the arm's `upstream.request_timeout`), and
//! neither reaches the upstream or counts against the arm's window or breaker.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A chunked body whose first chunk size is not hex.
const BAD_CHUNKS: &str = "transfer-encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n";

/// Sends `request` on a new connection; the response's status and JSON body (a proxy-made one).
async fn raw(addr: SocketAddr, request: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut buf = Vec::new();
    let head = within(WAIT, "response head", read_head(&mut stream, &mut buf))
        .await
        .unwrap_or_else(|| panic!("no response head; got {:?}", String::from_utf8_lossy(&buf)));
    let len: usize = head_field(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut chunk = [0u8; 4096];
        while buf.len() < len {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let body = serde_json::from_slice(&buf[..len.min(buf.len())]).unwrap_or(Value::Null);
    (status_of(&head), body)
}

fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"))
}

/// The arm `main` of the admin `/status`, and its breaker state.
async fn main_arm(client: &HttpClient, proxy: &Proxy) -> Value {
    let status = get(client, &proxy.admin_url("/status"), &[]).await.json();
    status["arms"]
        .as_array()
        .and_then(|arms| arms.iter().find(|a| a["name"] == "main"))
        .cloned()
        .unwrap_or_else(|| panic!("no arm main in {status}"))
}

/// Nothing of the request was the arm's: no request, error or timeout in its window, breaker closed.
fn untouched(main: &Value) {
    assert_eq!(main["breaker"], "closed", "{main}");
    assert_eq!(main["window"]["requests"], 0, "{main}");
    assert_eq!(main["window"]["upstream_errors"], 0, "{main}");
    assert_eq!(main["window"]["timeouts"], 0, "{main}");
}

async fn proxy_errors(client: &HttpClient, proxy: &Proxy, kind: &str) -> Option<f64> {
    let (_, samples) = scrape(client, proxy).await;
    metric(&samples, "driftguard_proxy_errors_total", &[("kind", kind)])
}

/// The request never reached the upstream, left the arm [`untouched`], and `driftguard_proxy_errors_total`
/// holds exactly `counts` (kind, count) for the kinds named.
async fn only_the_client_was_charged(
    client: &HttpClient,
    proxy: &Proxy,
    upstream: &Upstream,
    counts: &[(&str, f64)],
) {
    assert_eq!(upstream.request_count(), 0, "nothing reached the upstream");
    untouched(&main_arm(client, proxy).await);
    for &(kind, count) in counts {
        assert_eq!(
            proxy_errors(client, proxy, kind).await,
            Some(count),
            "{kind}"
        );
    }
}

/// A fenced write with a malformed chunked body: 400, its key left free (a good retry executes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_write_is_a_400_not_the_arms() {
    let upstream = Upstream::start("main");
    let proxy = Proxy::start(&format!(
        "{LISTEN}[writes]\nroutes = [\"POST /ingest\"]\n{}",
        arm("main", &upstream.url(), 1, &[])
    ));
    let client = client();
    let request = format!(
        "POST /ingest HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\nidempotency-key: k-bad\r\n{BAD_CHUNKS}"
    );
    let (status, body) = raw(proxy.proxy, &request).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "bad_request", "{body}");
    only_the_client_was_charged(
        &client,
        &proxy,
        &upstream,
        &[("bad_request", 1.0), ("client_closed", 0.0)],
    )
    .await;

    let retry = post_json(
        &client,
        &proxy.url("/ingest"),
        &json!({"doc": 1}),
        &[("idempotency-key", "k-bad")],
    )
    .await;
    assert_eq!(retry.status, StatusCode::OK, "{}", retry.text());
    assert_eq!(upstream.request_count(), 1);
}

/// A priced request (a budget peeks at its body) with a malformed chunked body: 400, not the arm's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_the_budget_reads_is_a_400() {
    let upstream = Upstream::start("main");
    let proxy = Proxy::start(&format!(
        "{LISTEN}[budget]\ntokens_per_minute = 1000000\nburst = 1000000\nbackend = \"local\"\n{}",
        arm("main", &upstream.url(), 1, &[])
    ));
    let client = client();
    let request =
        format!("POST /rag HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n{BAD_CHUNKS}");
    let (status, body) = raw(proxy.proxy, &request).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "bad_request", "{body}");
    only_the_client_was_charged(&client, &proxy, &upstream, &[("client_closed", 0.0)]).await;
}

/// A fenced write trickling its body is answered 408 after `listen.body_timeout` (1 s), not after the
/// arm's `request_timeout` (30 s); the arm's window and breaker never hear of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_fenced_upload_is_timed_by_the_body_timeout() {
    let upstream = Upstream::start("main");
    let proxy = Proxy::start(&format!(
        "{LISTEN}body_timeout = \"1s\"\n[upstream]\nrequest_timeout = \"30s\"\n\
         [breaker]\nwindow = \"30s\"\nmin_calls = 1\nfailure_rate = 0.5\n\
         [writes]\nroutes = [\"POST /ingest\"]\n{}",
        arm("main", &upstream.url(), 1, &[])
    ));
    let client = client();
    let mut stream = TcpStream::connect(proxy.proxy).await.expect("connect");
    stream
        .write_all(b"POST /ingest HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\nidempotency-key: k-slow\r\ncontent-length: 1000\r\n\r\n")
        .await
        .expect("head");
    let started = Instant::now();
    let mut buf = Vec::new();
    // One byte every 100 ms: the body is never done.
    let head = within(Duration::from_secs(10), "the slow upload's answer", async {
        loop {
            tokio::select! {
                head = read_head(&mut stream, &mut buf) => return head,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if stream.write_all(b"x").await.is_err() {
                        return read_head(&mut stream, &mut buf).await;
                    }
                }
            }
        }
    })
    .await
    .expect("a response head");
    let took = started.elapsed();
    assert_eq!(status_of(&head), 408, "{head}");
    assert!(
        took >= Duration::from_millis(900),
        "408 before the body timeout ({took:?})"
    );
    only_the_client_was_charged(
        &client,
        &proxy,
        &upstream,
        &[("body_timeout", 1.0), ("upstream_timeout", 0.0)],
    )
    .await;
}

/// A fenced write whose upload takes longer than the arm's `request_timeout` (300 ms) but well within
/// `listen.body_timeout` is executed: the upload is the client's time, not the upstream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_upload_longer_than_the_request_timeout_is_executed() {
    let upstream = Upstream::start("main");
    let proxy = Proxy::start(&format!(
        "{LISTEN}body_timeout = \"10s\"\n[upstream]\nrequest_timeout = \"300ms\"\n\
         [writes]\nroutes = [\"POST /ingest\"]\n{}",
        arm("main", &upstream.url(), 1, &[])
    ));
    let mut stream = TcpStream::connect(proxy.proxy).await.expect("connect");
    stream
        .write_all(b"POST /ingest HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\nidempotency-key: k-long\r\ncontent-length: 10\r\n\r\n")
        .await
        .expect("head");
    // 10 bytes over ~1 s.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream.write_all(b"1").await.expect("a body byte");
    }
    let mut buf = Vec::new();
    let head = within(WAIT, "the answer", read_head(&mut stream, &mut buf))
        .await
        .expect("a response head");
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(upstream.request_count(), 1);
}
