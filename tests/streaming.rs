//! Streaming through the proxy (SPEC §1): SSE event by event, large bodies in both directions with flat
//! memory, and SIGTERM draining an in-flight stream.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;

fn one_arm(up: &Upstream, extra: &str) -> String {
    format!(
        "{LISTEN}{extra}\n[pins]\nBUILD_ID = \"b-1\"\n{}",
        arm("main", &up.url(), 1, &[("MODEL_VER", "m-1")])
    )
}

fn all_events(n: usize) -> String {
    (1..=n).map(sse_event).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_first_event_arrives_while_upstream_still_streams() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&one_arm(&up, ""));
    let client = client();

    let req = Request::get(proxy.url("/sse?events=5"))
        .header("accept", "text/event-stream")
        .body(empty())
        .unwrap();
    let resp = within(WAIT, "SSE response head", client.request(req))
        .await
        .expect("SSE response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(
        resp.headers()["x-pin-model-ver"],
        "m-1",
        "pins on the streamed response"
    );
    let mut body = resp.into_body();

    // The upstream holds events 2.. until the gate opens, and only this test opens it, after event 1
    // came through the proxy: a proxy that buffers the stream would time out here.
    let mut got = String::new();
    read_until(&mut body, &mut got, Duration::from_secs(10), |s| {
        s.contains(&sse_event(1))
    })
    .await;
    assert_eq!(got, sse_event(1), "only event 1 exists yet");
    up.open_gate();
    read_to_end(&mut body, &mut got, WAIT).await;
    assert_eq!(got, all_events(5));

    // The access line marks the stream complete.
    let line = proxy
        .wait_log("access line of the SSE stream", |v| {
            v["target"] == "driftguard::access"
        })
        .await;
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["complete"], true, "{line}");
}

const BIG: u64 = 200 * 1024 * 1024;
const MAX_RSS_GROWTH_KIB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_with_flat_memory() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&one_arm(&up, ""));
    let client = client();

    // Warm up the connection pools and lazy allocations before the baseline reading.
    let warm = get(
        &client,
        &proxy.url(&format!("/bytes?n={}", 4 * PATTERN_CHUNK)),
        &[],
    )
    .await;
    assert_eq!(warm.body.len(), 4 * PATTERN_CHUNK);
    let before = proxy.proc_status_kib("VmRSS");
    let start = Instant::now();

    // Response direction: 200 MB from the upstream, counted and spot-checked, never held whole.
    let resp = within(
        WAIT,
        "download head",
        client.get(proxy.url(&format!("/bytes?n={BIG}")).parse().unwrap()),
    )
    .await
    .expect("download");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut received: u64 = 0;
    within(
        Duration::from_secs(60),
        "200 MB download through the proxy",
        async {
            while let Some(frame) = body.frame().await {
                let frame = frame.expect("download stream");
                if let Some(data) = frame.data_ref() {
                    for (i, b) in [
                        (0usize, data.first()),
                        (data.len().saturating_sub(1), data.last()),
                    ] {
                        if let Some(b) = b {
                            assert_eq!(
                                u64::from(*b),
                                (received + i as u64) % 251,
                                "byte at offset {}",
                                received + i as u64
                            );
                        }
                    }
                    received += data.len() as u64;
                }
            }
        },
    )
    .await;
    assert_eq!(received, BIG, "every byte of the response arrived");
    let after_download = proxy.proc_status_kib("VmHWM");

    // Request direction: 200 MB upload, counted by the upstream.
    let req = Request::post(proxy.url("/upload"))
        .body(streamed(BIG))
        .unwrap();
    let reply = within(
        Duration::from_secs(60),
        "200 MB upload through the proxy",
        exchange(&client, req),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let counted = reply.json();
    assert_eq!(
        counted["bytes"], BIG,
        "every byte of the request arrived: {counted}"
    );
    let peak = proxy.proc_status_kib("VmHWM");
    eprintln!(
        "400 MB through the proxy in {:?}; VmRSS before {before} KiB, VmHWM after download {after_download} KiB, \
         after upload {peak} KiB",
        start.elapsed()
    );
    assert!(
        peak.saturating_sub(before) < MAX_RSS_GROWTH_KIB,
        "proxy memory grew by {} KiB (VmRSS {before} KiB → peak {peak} KiB): bodies are being buffered",
        peak.saturating_sub(before)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_stream_then_exits_zero() {
    let up = Upstream::start("main");
    let mut proxy = Proxy::start(&one_arm(&up, "drain_timeout = \"15s\"\n"));
    let client = client();

    let resp = within(
        WAIT,
        "stream head",
        client.get(proxy.url("/sse?events=20&delay_ms=10").parse().unwrap()),
    )
    .await
    .expect("stream");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = String::new();
    read_until(&mut body, &mut got, Duration::from_secs(10), |s| {
        s.contains(&sse_event(1))
    })
    .await;

    proxy.signal(libc::SIGTERM);

    // New connections are refused while the stream is still held open by the upstream.
    let refused_at = eventually(
        WAIT,
        "the proxy port refuses new connections after SIGTERM",
        || async {
            match tokio::net::TcpStream::connect(proxy.proxy).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(Instant::now()),
                _ => None,
            }
        },
    )
    .await;
    assert!(
        proxy.wait_exit(Duration::ZERO).await.is_none(),
        "still running while the stream is in flight"
    );

    up.open_gate();
    read_to_end(&mut body, &mut got, WAIT).await;
    assert_eq!(
        got,
        all_events(20),
        "the whole stream arrived after SIGTERM"
    );

    let status = proxy
        .wait_exit(WAIT)
        .await
        .expect("driftguard exits after the drain");
    assert!(
        status.success(),
        "exit status {status:?}; stderr: {}",
        proxy.stderr()
    );
    let stopped = proxy
        .wait_log("the final \"stopped\" line", |v| v["message"] == "stopped")
        .await;
    assert_eq!(stopped["drained"], true, "{stopped}");
    eprintln!(
        "refused new connections, drained the stream and exited {:?} after refusing",
        refused_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_event_by_event_over_h2c() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&one_arm(&up, ""));

    let stream = within(WAIT, "connect", tokio::net::TcpStream::connect(proxy.proxy))
        .await
        .expect("connect");
    let (mut sender, conn) = within(
        WAIT,
        "h2 handshake",
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<bytes::Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        ),
    )
    .await
    .expect("h2c handshake");
    tokio::spawn(conn);
    let req = Request::get(proxy.url("/sse?events=4"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = within(WAIT, "h2 SSE head", sender.send_request(req))
        .await
        .expect("h2 response");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = String::new();
    read_until(&mut body, &mut got, Duration::from_secs(10), |s| {
        s.contains(&sse_event(1))
    })
    .await;
    up.open_gate();
    read_to_end(&mut body, &mut got, WAIT).await;
    assert_eq!(got, all_events(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_going_away_mid_stream_is_logged_incomplete() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&one_arm(&up, ""));
    let client = client();

    let req = Request::get(proxy.url("/sse?events=3"))
        .header("x-request-id", "gone-mid-stream")
        .body(empty())
        .unwrap();
    let resp = within(WAIT, "stream head", client.request(req))
        .await
        .expect("stream");
    let mut body = resp.into_body();
    let mut got = String::new();
    read_until(&mut body, &mut got, Duration::from_secs(10), |s| {
        s.contains(&sse_event(1))
    })
    .await;
    drop(body);
    drop(client);

    let line = proxy
        .wait_log("access line of the abandoned stream", |v| {
            v["request_id"] == "gone-mid-stream"
        })
        .await;
    assert_eq!(line["complete"], false, "{line}");
    assert_eq!(line["status"], 200, "{line}");
    // The proxy still serves.
    up.open_gate();
    let reply = get(&common::client(), &proxy.url("/after"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_upstream_body_is_not_passed_off_as_complete() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&one_arm(&up, ""));
    let client = client();

    let n = 3 * PATTERN_CHUNK as u64 + 100;
    let req = Request::get(proxy.url(&format!("/truncated?n={n}")))
        .header("x-request-id", "cut-1")
        .body(empty())
        .unwrap();
    let resp = within(WAIT, "truncated head", client.request(req))
        .await
        .expect("head");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut received = 0u64;
    while received < n {
        let frame = within(WAIT, "the first part", body.frame())
            .await
            .expect("more frames")
            .expect("no error yet");
        received += frame.data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(received, n);
    up.open_gate();
    let outcome = within(WAIT, "truncated body", async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => received += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await;
    assert!(
        outcome.is_err(),
        "the client must see the body fail, not a clean end after {received} bytes"
    );
    assert_eq!(received, n, "nothing after the cut");

    let line = proxy
        .wait_log("access line of the truncated response", |v| {
            v["request_id"] == "cut-1"
        })
        .await;
    assert_eq!(line["complete"], false, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_cuts_a_stuck_stream() {
    let up = Upstream::start("main");
    let mut proxy = Proxy::start(&one_arm(&up, "drain_timeout = \"1s\"\n"));
    let client = client();

    let resp = within(
        WAIT,
        "stream head",
        client.get(proxy.url("/sse?events=3").parse().unwrap()),
    )
    .await
    .expect("stream");
    let mut body = resp.into_body();
    let mut got = String::new();
    read_until(&mut body, &mut got, Duration::from_secs(10), |s| {
        s.contains(&sse_event(1))
    })
    .await;

    let start = Instant::now();
    proxy.signal(libc::SIGINT);
    // The gate never opens: the stream would hang forever, the drain deadline ends it.
    let status = proxy
        .wait_exit(WAIT)
        .await
        .expect("driftguard exits once the drain deadline passes");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before the 1s drain deadline"
    );
    assert!(took < Duration::from_secs(10), "exited only after {took:?}");
    eprintln!("stuck stream: exited {status:?} after {took:?}");
    let stopped = proxy
        .wait_log("the final \"stopped\" line", |v| v["message"] == "stopped")
        .await;
    assert_eq!(stopped["drained"], false, "{stopped}");
    let rest = within(WAIT, "the cut stream ends", async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) => return true,
                None => return false,
            }
        }
    })
    .await;
    assert!(
        rest,
        "a stream cut by the deadline must not look complete to the client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_idle_keepalive_connections_is_prompt() {
    let up = Upstream::start("main");
    // Default drain_timeout (30s): idle connections must not hold the exit back.
    let mut proxy = Proxy::start(&one_arm(&up, ""));
    let client = client();
    assert_eq!(
        get(&client, &proxy.url("/idle-h1"), &[]).await.status,
        StatusCode::OK
    );

    let stream = within(WAIT, "connect", tokio::net::TcpStream::connect(proxy.proxy))
        .await
        .expect("connect");
    let (mut h2, conn) = within(
        WAIT,
        "h2 handshake",
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<bytes::Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        ),
    )
    .await
    .expect("h2c handshake");
    let h2_conn = tokio::spawn(conn);
    let resp = within(
        WAIT,
        "h2",
        h2.send_request(
            Request::get(proxy.url("/idle-h2"))
                .body(Default::default())
                .unwrap(),
        ),
    )
    .await
    .expect("h2 response");
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp);

    let start = Instant::now();
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(WAIT).await.expect("exit");
    assert!(status.success(), "{status:?}");
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "idle keep-alive connections held the exit for {took:?}"
    );
    let _ = within(WAIT, "the h2 connection closes", h2_conn).await;
}
