//! Version pins and the headers around them (SPEC §2, §1): what the upstream and the client see, strict
//! pins, h2c, and the JSON access log.

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};

fn pins_config(upstream: &Upstream, strict: bool) -> String {
    format!(
        "strict_pins = {strict}\n{LISTEN}\n[pins]\nBUILD_ID = \"b-1\"\nGIT_SHA = \"sha-config\"\n\n{}",
        arm("main", &upstream.url(), 1, &[("MODEL_VER", "m-1"), ("INDEX_HASH", "i-1")])
    )
}

/// The pins every response and upstream request must carry for `pins_config` with the env override.
fn expected_pins() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("x-pin-build-id", "b-1"),
        ("x-pin-git-sha", "sha-env"),
        ("x-pin-model-ver", "m-1"),
        ("x-pin-index-hash", "i-1"),
        ("x-pin-chunk-schema-ver", "c-env"),
    ])
}

const ENV: &[(&str, &str)] = &[
    ("DRIFTGUARD_PIN_GIT_SHA", "sha-env"),
    ("DRIFTGUARD_PIN_CHUNK_SCHEMA_VER", "c-env"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_reach_upstream_and_client() {
    let up = Upstream::start("main");
    let proxy = Proxy::start_with_env(&pins_config(&up, false), ENV);
    let client = client();

    // Control: sent straight to the upstream, the hop-by-hop fields do arrive (so the client sends them).
    let direct = Request::get(format!("{}/direct", up.url()))
        .header("x-request-id", "direct-1")
        .header("connection", "x-foo")
        .header("x-foo", "secret")
        .body(empty())
        .unwrap();
    assert_eq!(exchange(&client, direct).await.status, StatusCode::OK);
    let seen = up.find("direct-1").expect("direct request recorded");
    assert_eq!(seen.header("x-foo").as_deref(), Some("secret"));
    assert_eq!(seen.header("connection").as_deref(), Some("x-foo"));
    let direct = get(&client, &format!("{}/hop", up.url()), &[]).await;
    assert_eq!(
        direct.header("x-bar").as_deref(),
        Some("hop"),
        "the upstream does send x-bar"
    );

    let req = Request::get(proxy.url("/v1/chat?x=1"))
        .header("x-request-id", "req-pins-1")
        .header("x-pin-model-ver", "forged")
        .header("x-pin-index-hash", "forged-too")
        .header("connection", "x-foo")
        .header("x-foo", "secret")
        .header("x-keep", "kept")
        .body(empty())
        .unwrap();
    let reply = exchange(&client, req).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), "hello from main");

    let seen = up
        .find("req-pins-1")
        .expect("upstream got the request with the client's x-request-id");
    assert_eq!(seen.path, "/v1/chat?x=1");
    for (header, value) in expected_pins() {
        assert_eq!(
            seen.header(header).as_deref(),
            Some(value),
            "upstream {header}"
        );
        assert_eq!(
            reply.header(header).as_deref(),
            Some(value),
            "client {header}"
        );
    }
    let upstream_pins: Vec<&str> = seen
        .headers
        .keys()
        .map(|k| k.as_str())
        .filter(|k| k.starts_with("x-pin-"))
        .collect();
    assert_eq!(
        upstream_pins.len(),
        expected_pins().len(),
        "no other pin headers: {upstream_pins:?}"
    );

    assert_eq!(seen.header("x-driftguard-arm").as_deref(), Some("main"));
    assert_eq!(reply.header("x-driftguard-arm").as_deref(), Some("main"));
    assert_eq!(reply.header("x-request-id").as_deref(), Some("req-pins-1"));
    let ns = seen
        .header("x-cache-ns")
        .expect("x-cache-ns on the upstream request");
    assert_eq!(ns.len(), 16, "x-cache-ns {ns:?} is 16 hex digits");
    assert!(
        ns.chars().all(|c| c.is_ascii_hexdigit()),
        "x-cache-ns {ns:?} is hex"
    );
    assert_eq!(reply.header("x-cache-ns"), Some(ns));

    assert_eq!(seen.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        seen.header("x-keep").as_deref(),
        Some("kept"),
        "ordinary headers pass"
    );
    assert!(
        seen.headers.get("x-foo").is_none(),
        "x-foo was named by Connection, so it is hop-by-hop"
    );
    assert!(
        seen.headers
            .get_all("connection")
            .iter()
            .all(|v| !v.to_str().unwrap_or("").contains("x-foo")),
        "the client's Connection header is not forwarded: {:?}",
        seen.headers.get_all("connection")
    );

    // Without a client request id one is generated, and it is the same on both sides.
    let reply = get(
        &client,
        &proxy.url("/second"),
        &[("x-forwarded-for", "203.0.113.9")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let id = reply
        .header("x-request-id")
        .expect("generated x-request-id");
    assert!(!id.is_empty());
    let seen = up
        .find(&id)
        .expect("the upstream saw the generated request id");
    assert_eq!(seen.path, "/second");
    assert_eq!(
        seen.header("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1"),
        "appended"
    );

    // Hop-by-hop fields of the response do not reach the client either.
    let reply = get(&client, &proxy.url("/hop"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-upstream").as_deref(), Some("main"));
    assert!(
        reply.headers.get("x-bar").is_none(),
        "x-bar was named by the upstream's Connection header"
    );
    assert_eq!(reply.header("x-pin-model-ver").as_deref(), Some("m-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_namespace_follows_key_pins() {
    let up = Upstream::start("up");
    let config = format!(
        "{LISTEN}\n[pins]\nBUILD_ID = \"b\"\n{}{}{}",
        arm(
            "a",
            &up.url(),
            1,
            &[("INDEX_HASH", "i-1"), ("MODEL_VER", "m-1")]
        ),
        arm(
            "b",
            &up.url(),
            1,
            &[
                ("INDEX_HASH", "i-1"),
                ("MODEL_VER", "m-1"),
                ("GIT_SHA", "other")
            ]
        ),
        arm(
            "c",
            &up.url(),
            1,
            &[("INDEX_HASH", "i-2"), ("MODEL_VER", "m-1")]
        ),
    );
    let proxy = Proxy::start(&config);
    let client = client();
    let mut ns = BTreeMap::new();
    let mut n = 0;
    while ns.len() < 3 {
        n += 1;
        assert!(
            n < 500,
            "all three arms were not reached in 500 requests: {ns:?}"
        );
        let reply = get(&client, &proxy.url("/"), &[]).await;
        let arm = reply.header("x-driftguard-arm").expect("arm header");
        let value = reply.header("x-cache-ns").expect("x-cache-ns");
        if let Some(prev) = ns.insert(arm.clone(), value.clone()) {
            assert_eq!(prev, value, "x-cache-ns of arm {arm} is stable");
        }
    }
    assert_eq!(ns["a"], ns["b"], "GIT_SHA is not a cache key pin");
    assert_ne!(ns["a"], ns["c"], "INDEX_HASH is a cache key pin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_pins_conflict_returns_diff() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&pins_config(&up, true));
    let client = client();

    // A client pin that agrees is fine.
    let reply = get(&client, &proxy.url("/ok"), &[("x-pin-model-ver", "m-1")]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(up.request_count(), 1);

    let reply = get(
        &client,
        &proxy.url("/conflict"),
        &[("x-pin-model-ver", "m-0"), ("x-request-id", "strict-1")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text());
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(reply.header("x-request-id").as_deref(), Some("strict-1"));
    let body = reply.json();
    assert_eq!(body["error"], "pin_mismatch", "{body}");
    assert_eq!(body["diff"]["MODEL_VER"]["expected"], "m-1", "{body}");
    assert_eq!(body["diff"]["MODEL_VER"]["got"], "m-0", "{body}");
    assert_eq!(
        body["diff"].as_object().map(|d| d.len()),
        Some(1),
        "only the differing pin: {body}"
    );
    assert_eq!(body["request_id"], "strict-1");
    assert_eq!(
        up.request_count(),
        1,
        "a conflicting request never reaches the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_is_proxied_with_pins() {
    let up = Upstream::start("main");
    let proxy = Proxy::start_with_env(&pins_config(&up, false), ENV);

    let stream = within(WAIT, "connect", tokio::net::TcpStream::connect(proxy.proxy))
        .await
        .expect("connect");
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

    let req = Request::get(proxy.url("/h2?q=1"))
        .header("x-request-id", "h2-1")
        .header("x-pin-model-ver", "forged")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = within(WAIT, "h2 request", sender.send_request(req))
        .await
        .expect("h2 response");
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let headers = resp.headers().clone();
    let body = within(WAIT, "h2 body", resp.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(&body[..], b"hello from main");
    for (header, value) in expected_pins() {
        assert_eq!(
            headers.get(header).and_then(|v| v.to_str().ok()),
            Some(value),
            "client {header}"
        );
    }
    assert_eq!(headers.get("x-driftguard-arm").unwrap(), "main");
    assert_eq!(headers.get("x-request-id").unwrap(), "h2-1");
    assert!(headers.get("x-cache-ns").is_some());

    let seen = up.find("h2-1").expect("upstream got the h2c request");
    assert_eq!(seen.path, "/h2?q=1");
    assert_eq!(seen.header("x-pin-model-ver").as_deref(), Some("m-1"));
    assert_eq!(seen.header("x-pin-git-sha").as_deref(), Some("sha-env"));
}

/// The access line is written without tracing's event dispatch, but the log filter still rules it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_filter_can_turn_the_access_log_off() {
    let up = Upstream::start("main");
    let env = [ENV, &[("RUST_LOG", "info,driftguard::access=off")]].concat();
    let proxy = Proxy::start_with_env(&pins_config(&up, false), &env);
    let client = client();
    for i in 0..3 {
        let reply = get(&client, &proxy.url(&format!("/quiet/{i}")), &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    // An INFO line of another target after the requests: once it is out, theirs would be too.
    let reload = admin_post(&client, &proxy.admin_url("/reload"), "", None).await;
    assert_eq!(reload.status, StatusCode::OK);
    proxy
        .wait_log("the reload's line", |v| v["message"] == "config reloaded")
        .await;
    assert_eq!(proxy.access_log(), Vec::<serde_json::Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_json_access_log_line_per_request() {
    let up = Upstream::start("main");
    let proxy = Proxy::start_with_env(&pins_config(&up, false), ENV);
    let client = client();

    let ids: Vec<String> = (0..5).map(|i| format!("acc-{i}")).collect();
    // What each client saw, end to end: the proxy's latency of a request cannot be longer.
    let mut seen_ms = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let req = Request::builder()
            .method(method)
            .uri(proxy.url(&format!("/acc/{i}?secret=not-logged")))
            .header("x-request-id", id.as_str())
            .body(full("{}"))
            .unwrap();
        let started = std::time::Instant::now();
        assert_eq!(exchange(&client, req).await.status, StatusCode::OK);
        seen_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    // A marker last: once its line is out, every earlier line is too (one writer, in order).
    let marker = get(
        &client,
        &proxy.url("/marker"),
        &[("x-request-id", "acc-marker")],
    )
    .await;
    assert_eq!(marker.status, StatusCode::OK);
    proxy
        .wait_log("access line of the marker", |v| {
            v["request_id"] == "acc-marker"
        })
        .await;

    let access = proxy.access_log();
    let pins: serde_json::Value = serde_json::json!({
        "BUILD_ID": "b-1", "GIT_SHA": "sha-env", "MODEL_VER": "m-1", "INDEX_HASH": "i-1", "CHUNK_SCHEMA_VER": "c-env",
    });
    for (i, id) in ids.iter().enumerate() {
        let lines: Vec<_> = access
            .iter()
            .filter(|v| v["request_id"] == id.as_str())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "exactly one access line for {id}: {lines:?}"
        );
        let line = lines[0];
        assert_eq!(line["arm"], "main", "{line}");
        assert!(line["pins"].is_object(), "pins is a JSON object: {line}");
        assert_eq!(line["pins"], pins, "{line}");
        assert_eq!(
            line["method"],
            if i % 2 == 0 { "GET" } else { "POST" },
            "{line}"
        );
        assert_eq!(line["path"], format!("/acc/{i}"), "{line}");
        assert_eq!(line["status"], 200, "{line}");
        let latency = line["latency_ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("latency_ms is a number: {line}"));
        // Above zero, and within what the client measured around the same exchange (+0.5 ms for
        // the rounding of the logged figure).
        assert!(
            latency > 0.0 && latency <= seen_ms[i] + 0.5,
            "latency_ms {latency} vs {:.3} ms seen by the client: {line}",
            seen_ms[i]
        );
    }
    assert_eq!(
        access.len(),
        ids.len() + 1,
        "no other access lines: {access:?}"
    );
}
