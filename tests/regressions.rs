//! Regression tests for the fixes of the code review: each test drives the real binary over real sockets
//! into a situation the review found broken, and checks what must hold now.
//!
//! 1. The `openai` embedder survives a reload (POST /reload and SIGHUP) and SIGTERM still exits 0.
//! 2. An upstream that answers early without reading a slow upload does not stall the next request.
//! 3. A client aborting its upload is a 499, not an upstream error (and `client_closed` is counted).
//! 4. A request cancelled before the response head is logged (499, incomplete) and counted.
//! 5. A chunked GET body reaches the upstream; split h2 `cookie` fields reach it as one.
//! 6. An upstream response with both `Transfer-Encoding: chunked` and `Content-Length` is re-framed.
//! 7. Weights set at run time survive a reload of the unchanged file.
//! 8. `rules.window` above 290s is refused by `driftguard check`.
//! 9. An upstream breaking off mid-body counts as an upstream error.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(extra: &str, arms: &[String]) -> String {
    format!("{LISTEN}{extra}\n{}", arms.concat())
}

/// The `/status` entry of one arm.
async fn arm_status(client: &HttpClient, proxy: &Proxy, arm: &str) -> Value {
    let reply = get(client, &proxy.admin_url("/status"), &[]).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "GET /status: {}",
        reply.text()
    );
    let status = reply.json();
    status["arms"]
        .as_array()
        .and_then(|arms| arms.iter().find(|a| a["name"] == arm))
        .cloned()
        .unwrap_or_else(|| panic!("no arm {arm} in /status: {status}"))
}

/// The access-log lines of one request id so far.
fn access_lines(proxy: &Proxy, request_id: &str) -> Vec<Value> {
    proxy
        .access_log()
        .into_iter()
        .filter(|v| v["request_id"] == request_id)
        .collect()
}

async fn connect(proxy: &Proxy) -> TcpStream {
    let stream = within(
        WAIT,
        "connect to the proxy",
        TcpStream::connect(proxy.proxy),
    )
    .await
    .expect("connect to the proxy");
    let _ = stream.set_nodelay(true);
    stream
}

// ================================================================================================
// 1. openai embedder and reload
// ================================================================================================

/// Before the fix, dropping the old `openai` embedder on reload dropped its tokio runtime on a thread of
/// the proxy's runtime, which panics (and aborts a release build).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_embedder_survives_reload_and_sighup() {
    let up = Upstream::start("main");
    let embed = closed_port_url();
    let cfg = config(
        &format!(
            "[signals]\nembedder = \"openai\"\n[signals.openai]\nurl = \"{embed}/v1/embeddings\"\ntimeout = \"1s\"\n"
        ),
        &[arm("main", &up.url(), 1, &[])],
    );
    let mut proxy = Proxy::start(&cfg);
    let client = client();

    let status = get(&client, &proxy.admin_url("/status"), &[]).await.json();
    assert_eq!(status["signals"]["embedder"], "openai", "{status}");

    // POST /reload of the unchanged file: the old embedder is dropped on an admin connection's task.
    let reply = admin_post(&client, &proxy.admin_url("/reload"), "", None).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "POST /reload: {}",
        reply.text()
    );
    assert_eq!(reply.json()["reloaded"], true, "{}", reply.text());
    let healthz = get(&client, &proxy.admin_url("/healthz"), &[]).await;
    assert_eq!(
        healthz.status,
        StatusCode::OK,
        "/healthz after POST /reload"
    );
    let reply = get(&client, &proxy.url("/after-post-reload"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), "hello from main");
    assert!(
        proxy.wait_exit(Duration::ZERO).await.is_none(),
        "the process is still up after POST /reload"
    );

    // SIGHUP: the same reload on the signal task.
    proxy.signal(libc::SIGHUP);
    eventually(WAIT, "a second \"config reloaded\" line (SIGHUP)", || {
        let n = proxy.count_log(|v| v["message"] == "config reloaded");
        async move { (n >= 2).then_some(()) }
    })
    .await;
    let healthz = get(&client, &proxy.admin_url("/healthz"), &[]).await;
    assert_eq!(healthz.status, StatusCode::OK, "/healthz after SIGHUP");
    let reply = get(&client, &proxy.url("/after-sighup"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), "hello from main");
    let status = get(&client, &proxy.admin_url("/status"), &[]).await.json();
    assert_eq!(status["signals"]["embedder"], "openai", "{status}");
    assert!(
        proxy.wait_exit(Duration::ZERO).await.is_none(),
        "the process is still up after SIGHUP"
    );
    assert!(
        !proxy.stderr().contains("panicked"),
        "no panic on reload; stderr:\n{}",
        proxy.stderr()
    );

    // SIGTERM still drains and exits 0 (the signal task is alive).
    proxy.signal(libc::SIGTERM);
    let exit = proxy
        .wait_exit(WAIT)
        .await
        .expect("driftguard exits after SIGTERM");
    assert_eq!(exit.code(), Some(0), "exit status after SIGTERM: {exit:?}");
    assert!(
        !proxy.stderr().contains("panicked"),
        "no panic at shutdown; stderr:\n{}",
        proxy.stderr()
    );
}

// ================================================================================================
// 2. Early response + slow upload
// ================================================================================================

/// An upstream that answers `POST /upload` with 413 at once, never reading the request body (the
/// connection is then useless for further requests: it only drains until EOF), and `200 ok` to anything
/// else. Records each request line.
fn early_answering_upstream() -> (RawUpstream, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let up = RawUpstream::start("early", move |mut s| {
        let log = log.clone();
        async move {
            let mut buf = Vec::new();
            while let Some(head) = read_head(&mut s, &mut buf).await {
                let line = head.lines().next().unwrap_or_default().to_string();
                log.lock().unwrap().push(line.clone());
                if line.starts_with("POST /upload") {
                    let body = br#"{"error":"too large"}"#;
                    let head = format!(
                        "HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    if s.write_all(head.as_bytes()).await.is_err()
                        || s.write_all(body).await.is_err()
                    {
                        return;
                    }
                    let mut sink = [0u8; 8192];
                    while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                    return;
                }
                let ok =
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
                if s.write_all(ok).await.is_err() {
                    return;
                }
            }
        }
    });
    (up, seen)
}

/// Before the fix, the connection of the finished 413 went back to the pool while its request body was
/// still being sent; the next request took it, waited behind the upload and got a 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_response_with_slow_upload_does_not_block_the_next_request() {
    let (up, seen) = early_answering_upstream();
    let proxy = Proxy::start(&config(
        "[upstream]\nrequest_timeout = \"3s\"\n",
        &[arm("main", &up.url(), 1, &[])],
    ));

    // A slow upload: the head and 1000 of 200000 bytes; the body then stays open.
    let mut slow = connect(&proxy).await;
    let head = "POST /upload HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\n\
                x-request-id: slow-upload\r\ncontent-length: 200000\r\n\r\n";
    slow.write_all(head.as_bytes()).await.expect("send head");
    slow.write_all(&[b'a'; 1000]).await.expect("send a little");
    let mut buf = Vec::new();
    let answer = within(
        WAIT,
        "the 413 for the slow upload",
        read_head(&mut slow, &mut buf),
    )
    .await
    .expect("a response head for the slow upload");
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "the upstream's early answer reaches the client: {answer}"
    );
    // The exchange is over for the proxy once it logged it (the connection is released before that).
    proxy
        .wait_log("the access line of the slow upload", |v| {
            v["request_id"] == "slow-upload"
        })
        .await;
    // More of the upload trickles in while the next request is made.
    slow.write_all(&[b'a'; 1000])
        .await
        .expect("send a little more");

    let client = client();
    let started = Instant::now();
    let reply = get(
        &client,
        &proxy.url("/after"),
        &[("x-request-id", "after-1")],
    )
    .await;
    let took = started.elapsed();
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "an unrelated GET during the upload: {} after {took:?}; the upstream accepted {} connection(s) \
         and saw {:?} (one connection: the GET was queued on the upload's busy connection)",
        reply.text(),
        up.connection_count(),
        seen.lock().unwrap()
    );
    assert!(
        took < Duration::from_secs(2),
        "the GET took {took:?}: it waited behind the upload's connection"
    );
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("GET /after")),
        "the upstream saw the GET: {:?}",
        seen.lock().unwrap()
    );
    drop(slow);
}

// ================================================================================================
// 3. Client aborts mid-upload
// ================================================================================================

/// Sends `n` uploads announcing 100000 bytes, each cut off (socket closed) after 1000 bytes once the
/// upstream has the request; returns their request ids.
async fn aborted_uploads(proxy: &Proxy, up: &Upstream, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("abort-{i}");
        let mut s = connect(proxy).await;
        let head = format!(
            "POST /upload HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\n\
             x-request-id: {id}\r\ncontent-length: 100000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.expect("send head");
        s.write_all(&[b'a'; 1000])
            .await
            .expect("send part of the body");
        // Cut it off while the upload is in flight to the upstream.
        eventually(WAIT, "the upstream receives the upload", || {
            let there = up.find(&id).is_some();
            async move { there.then_some(()) }
        })
        .await;
        drop(s);
        ids.push(id);
    }
    ids
}

/// Waits for an access-log line of each id and returns them.
async fn logged(proxy: &Proxy, ids: &[String]) -> Vec<Value> {
    let mut lines = Vec::new();
    for id in ids {
        lines.push(
            proxy
                .wait_log(&format!("the access line of {id}"), |v| {
                    v["target"] == "driftguard::access" && v["request_id"] == id.as_str()
                })
                .await,
        );
    }
    lines
}

/// Before the fix, a client's broken upload was a 502 counted as the upstream's error (and could feed a
/// rollback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_abort_mid_upload_is_499_not_an_upstream_error() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&config("", &[arm("main", &up.url(), 1, &[])]));
    let client = client();

    let ids = aborted_uploads(&proxy, &up, 5).await;
    let lines = logged(&proxy, &ids).await;
    for line in &lines {
        assert_eq!(
            line["status"], 499,
            "a client abort is logged as 499: {line}"
        );
    }

    let arm = arm_status(&client, &proxy, "main").await;
    let window = &arm["window"];
    assert_eq!(
        window["errors_5xx"], 0,
        "no 5xx for client aborts: {window}"
    );
    assert_eq!(
        window["upstream_errors"], 0,
        "client aborts are not upstream errors: {window}"
    );
    assert!(
        window["requests"].as_u64().unwrap_or(0) >= 5,
        "the aborted requests are counted: {window}"
    );
    let (_, samples) = scrape(&client, &proxy).await;
    assert_eq!(
        metric(
            &samples,
            "driftguard_requests_total",
            &[("arm", "main"), ("class", "5xx")]
        ),
        Some(0.0),
        "no 5xx in the metrics"
    );
}

/// The `client_closed` kind of `driftguard_proxy_errors_total` must count the aborted uploads. At least
/// one, not all five: depending on when hyper notices the closed socket, an abort ends either as the
/// upstream exchange failing on the broken request body (the proxy's own 499 answer) or as the handler
/// being dropped before any answer (the cancellation guard); both are logged as 499 above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_abort_mid_upload_is_counted_as_client_closed() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&config("", &[arm("main", &up.url(), 1, &[])]));
    let client = client();

    let ids = aborted_uploads(&proxy, &up, 5).await;
    let lines = logged(&proxy, &ids).await;
    let (_, samples) = scrape(&client, &proxy).await;
    let counted = metric(
        &samples,
        "driftguard_proxy_errors_total",
        &[("kind", "client_closed")],
    );
    assert!(
        counted.is_some_and(|v| v >= 1.0),
        "driftguard_proxy_errors_total{{kind=\"client_closed\"}} = {counted:?} after 5 aborted uploads \
         (access lines: {lines:?})"
    );
}

// ================================================================================================
// 4. Cancelled before the response head
// ================================================================================================

/// Before the fix, a client leaving before the response head left no access-log line and no count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_cancelled_before_the_head_is_logged_and_counted() {
    let up = Scripted::start("slow", |_, _| {
        Canned::body("text/plain", "late").delay(Duration::from_secs(2))
    });
    let proxy = Proxy::start(&config("", &[arm("main", &up.url(), 1, &[])]));
    let client = client();

    let mut s = connect(&proxy).await;
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\nx-request-id: cancel-1\r\n\r\n")
        .await
        .expect("send request");
    eventually(WAIT, "the upstream receives the request", || {
        let n = up.request_count();
        async move { (n >= 1).then_some(()) }
    })
    .await;
    drop(s);

    let line = eventually(
        Duration::from_secs(5),
        "an access line for the cancelled request",
        || {
            let line = access_lines(&proxy, "cancel-1").into_iter().next();
            async move { line }
        },
    )
    .await;
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["complete"], false, "{line}");
    assert_eq!(line["path"], "/slow", "{line}");
    assert!(
        line["latency_ms"].as_f64().is_some_and(|ms| ms < 1500.0),
        "logged when the client left, not when the upstream answered (after 2 s): {line}"
    );

    let arm = arm_status(&client, &proxy, "main").await;
    let window = &arm["window"];
    assert!(
        window["requests"].as_u64().unwrap_or(0) >= 1,
        "the cancelled request is counted: {window}"
    );
    assert_eq!(window["errors_5xx"], 0, "{window}");
    let (_, samples) = scrape(&client, &proxy).await;
    assert_eq!(
        metric(
            &samples,
            "driftguard_requests_total",
            &[("arm", "main"), ("class", "4xx")]
        ),
        Some(1.0),
        "counted as one 4xx (499)"
    );
}

// ================================================================================================
// 5. Chunked GET body, h2 cookies
// ================================================================================================

/// Before the fix, a GET's chunked body was dropped (hyper sends a GET without a length as bodiless).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_get_body_reaches_the_upstream() {
    let up = Scripted::start("echo", |_, body| {
        Canned::body("text/plain", format!("read {} bytes", body.len()))
    });
    let proxy = Proxy::start(&config("", &[arm("main", &up.url(), 1, &[])]));

    let mut s = connect(&proxy).await;
    s.write_all(
        b"GET /x HTTP/1.1\r\nhost: x\r\nx-request-id: chunked-get\r\ntransfer-encoding: chunked\r\n\
          connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .expect("send request");
    let raw = read_to_eof(&mut s, WAIT).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");

    let exchanges = up.exchanges();
    let got = exchanges
        .iter()
        .find(|e| e.request.path == "/x")
        .unwrap_or_else(|| panic!("the upstream saw GET /x: {exchanges:?}"));
    assert_eq!(got.request.method, http::Method::GET);
    assert_eq!(
        &got.body[..],
        b"hello",
        "the upstream read the GET's body; headers: {:?}",
        got.request.headers
    );
    assert!(text.contains("read 5 bytes"), "{text}");
}

/// Before the fix, the two `cookie` fields of an h2 request reached the HTTP/1.1 upstream as two fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_cookie_fields_reach_the_upstream_joined() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&config("", &[arm("main", &up.url(), 1, &[])]));

    let stream = connect(&proxy).await;
    let (mut sender, conn) = within(
        WAIT,
        "h2 handshake",
        hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(stream),
        ),
    )
    .await
    .expect("h2c handshake");
    tokio::spawn(conn);

    let req = Request::get(proxy.url("/cookies"))
        .header("x-request-id", "h2-cookie")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(req.headers().get_all("cookie").iter().count(), 2);
    let resp = within(WAIT, "h2 request", sender.send_request(req))
        .await
        .expect("h2 response");
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let body = within(WAIT, "h2 body", resp.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(&body[..], b"hello from main");

    let seen = up.find("h2-cookie").expect("the upstream saw the request");
    let cookies: Vec<&str> = seen
        .headers
        .get_all("cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(
        cookies,
        vec!["a=1; b=2"],
        "one cookie field on the HTTP/1.1 side"
    );
}

// ================================================================================================
// 6. Upstream response with Transfer-Encoding and Content-Length
// ================================================================================================

const TE_CL_CHUNKS: [&str; 3] = [
    "the first chunk, ",
    "a second somewhat longer chunk, ",
    "and the last one.",
];

/// Answers every request with a chunked body that also carries a wrong `content-length: 5`, keeping the
/// connection open afterwards.
fn te_and_cl_upstream() -> RawUpstream {
    RawUpstream::start("te-cl", |mut s| async move {
        let mut buf = Vec::new();
        while read_head(&mut s, &mut buf).await.is_some() {
            let mut out = String::from(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\
                 content-length: 5\r\n\r\n",
            );
            for c in TE_CL_CHUNKS {
                out.push_str(&format!("{:x}\r\n{c}\r\n", c.len()));
            }
            out.push_str("0\r\n\r\n");
            if s.write_all(out.as_bytes()).await.is_err() {
                return;
            }
        }
    })
}

/// Before the fix, the wrong length was forwarded with the body and the client cut it (or hung).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_te_and_content_length_is_reframed() {
    let up = te_and_cl_upstream();
    let proxy = Proxy::start(&config("", &[arm("main", &up.url(), 1, &[])]));
    let expected = TE_CL_CHUNKS.concat();

    // Raw: check the framing the proxy puts on the wire.
    let mut s = connect(&proxy).await;
    s.write_all(b"GET /te-cl HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("send request");
    let raw = read_to_eof(&mut s, WAIT).await;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let rest = &raw[end + 4..];
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let te = head_fields(&head, "transfer-encoding");
    let cl = head_fields(&head, "content-length");
    if te.iter().any(|v| v.eq_ignore_ascii_case("chunked")) {
        assert!(
            cl.is_empty(),
            "chunked and content-length together again:\n{head}"
        );
        let body = decode_chunked(rest).unwrap_or_else(|| {
            panic!(
                "not a complete chunked body: {:?}",
                String::from_utf8_lossy(rest)
            )
        });
        assert_eq!(String::from_utf8_lossy(&body), expected);
    } else if let Some(cl) = cl.first() {
        assert_eq!(cl, &expected.len().to_string(), "{head}");
        assert_eq!(String::from_utf8_lossy(rest), expected, "{head}");
    } else {
        assert_eq!(String::from_utf8_lossy(rest), expected, "{head}");
    }

    // And through a keep-alive client: two exchanges on the pooled connection, each body whole.
    let client = client();
    for i in 0..2 {
        let reply = get(&client, &proxy.url(&format!("/te-cl-{i}")), &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), expected, "exchange {i}");
    }
}

// ================================================================================================
// 7. Runtime weights and reload
// ================================================================================================

/// Before the fix, a reload rebuilt the table from the file and silently undid a weight set at run time
/// (a manual or automatic rollback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_weight_survives_reload() {
    let stable = Upstream::start("stable");
    let canary = Upstream::start("canary");
    let proxy = Proxy::start(&config(
        "",
        &[
            arm("stable", &stable.url(), 1, &[]),
            arm("canary", &canary.url(), 1, &[]),
        ],
    ));
    let client = client();

    let reply = admin_post(
        &client,
        &proxy.admin_url("/arms/canary/weight"),
        r#"{"weight":0}"#,
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = admin_post(&client, &proxy.admin_url("/reload"), "", None).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "POST /reload: {}",
        reply.text()
    );

    assert_eq!(
        arm_status(&client, &proxy, "canary").await["weight"],
        0,
        "the canary keeps the weight set at run time"
    );
    assert_eq!(arm_status(&client, &proxy, "stable").await["weight"], 1);
    for i in 0..20 {
        let reply = get(&client, &proxy.url(&format!("/w-{i}")), &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.header("x-driftguard-arm").as_deref(),
            Some("stable"),
            "request {i}"
        );
    }
    assert_eq!(canary.request_count(), 0, "no traffic to the canary");
    assert_eq!(stable.request_count(), 20);
}

// ================================================================================================
// 8. rules.window bound
// ================================================================================================

/// Before the fix, 300s (the whole ring, including the slot cleared ahead of time) was accepted.
#[test]
fn check_refuses_a_rule_window_above_290s() {
    let dir = unique("window");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let check = |window: &str| {
        let path = dir.join(format!("w-{window}.toml"));
        std::fs::write(
            &path,
            format!(
                "{LISTEN}{}[rules]\nwindow = \"{window}\"\n",
                arm("main", "http://127.0.0.1:8001", 1, &[])
            ),
        )
        .expect("write config");
        run_cli(&["check", "--config", path.to_str().unwrap()], &dir, WAIT)
    };
    let refused = check("300s");
    let accepted = check("290s");
    let _ = std::fs::remove_dir_all(&dir);

    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "300s is refused; stderr:\n{stderr}"
    );
    assert!(stderr.contains("rules.window"), "names the key: {stderr}");
    assert_eq!(
        accepted.status.code(),
        Some(0),
        "290s is accepted; stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&accepted.stdout),
        String::from_utf8_lossy(&accepted.stderr)
    );
}

// ================================================================================================
// 9. Upstream breaks off mid-body
// ================================================================================================

/// Before the fix, an upstream dying mid-body after a 200 head was not counted against the arm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_breaking_off_mid_body_is_an_upstream_error() {
    let up = RawUpstream::start("cut", |mut s| async move {
        let mut buf = Vec::new();
        if read_head(&mut s, &mut buf).await.is_some() {
            let _ = s
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: 1000\r\n\r\n",
                )
                .await;
            let _ = s.write_all(&[b'x'; 100]).await;
            let _ = s.flush().await;
        }
        // Dropped: the connection closes 900 bytes short.
    });
    let proxy = Proxy::start(&config("", &[arm("main", &up.url(), 1, &[])]));
    let client = client();

    let resp = within(
        WAIT,
        "the response head",
        client.request(
            Request::get(proxy.url("/cut"))
                .header("x-request-id", "cut-1")
                .body(empty())
                .unwrap(),
        ),
    )
    .await
    .expect("a response head");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = within(WAIT, "the cut body", resp.into_body().collect()).await;
    if let Ok(body) = body {
        panic!(
            "the client got a complete body of {} bytes from a cut upstream",
            body.to_bytes().len()
        );
    }

    let window = eventually(WAIT, "upstream_errors >= 1 in /status", || {
        let client = client.clone();
        let proxy = &proxy;
        async move {
            let arm = arm_status(&client, proxy, "main").await;
            let window = arm["window"].clone();
            (window["upstream_errors"].as_u64().unwrap_or(0) >= 1).then_some(window)
        }
    })
    .await;
    assert_eq!(window["upstream_errors"], 1, "{window}");
    let line = proxy
        .wait_log("the access line of the cut response", |v| {
            v["request_id"] == "cut-1"
        })
        .await;
    assert_eq!(line["complete"], false, "{line}");
}
