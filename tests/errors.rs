//! Errors the proxy makes itself (SPEC §1): JSON bodies with the proper status and the request id.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

/// A loopback port with nothing listening on it.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_gives_502_json() {
    let config = format!(
        "{LISTEN}\n{}",
        arm(
            "main",
            &format!("http://127.0.0.1:{}", closed_port()),
            1,
            &[("MODEL_VER", "m-1")]
        )
    );
    let proxy = Proxy::start(&config);
    let client = client();

    let reply = get(&client, &proxy.url("/x"), &[("x-request-id", "gone-1")]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(reply.header("x-request-id").as_deref(), Some("gone-1"));
    let body = reply.json();
    assert_eq!(body["error"], "upstream_unreachable", "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(body["request_id"], "gone-1", "{body}");

    // Without a client id the generated one is in both the header and the body.
    let reply = get(&client, &proxy.url("/y"), &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    let id = reply
        .header("x-request-id")
        .expect("x-request-id on a proxy-made error");
    assert_eq!(reply.json()["request_id"], id.as_str());

    let line = proxy
        .wait_log("access line of the 502", |v| v["request_id"] == "gone-1")
        .await;
    assert_eq!(line["status"], 502, "{line}");
    assert_eq!(line["arm"], "main", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_gives_504_json() {
    let up = Upstream::start("slow");
    let config = format!(
        "{LISTEN}\n[upstream]\nrequest_timeout = \"300ms\"\n\n{}",
        arm("main", &up.url(), 1, &[])
    );
    let proxy = Proxy::start(&config);
    let client = client();

    // A fast request passes under the same timeout.
    assert_eq!(
        get(&client, &proxy.url("/sleep?ms=0"), &[]).await.status,
        StatusCode::OK
    );

    let start = Instant::now();
    let reply = get(
        &client,
        &proxy.url("/sleep?ms=3000"),
        &[("x-request-id", "slow-1")],
    )
    .await;
    let took = start.elapsed();
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        reply.text()
    );
    assert!(
        took < Duration::from_millis(2500),
        "the 504 came after {took:?}, not near the 300ms timeout"
    );
    assert!(
        took >= Duration::from_millis(250),
        "the 504 came after only {took:?}"
    );
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(reply.header("x-request-id").as_deref(), Some("slow-1"));
    let body = reply.json();
    assert_eq!(body["error"], "upstream_timeout", "{body}");
    assert_eq!(body["request_id"], "slow-1", "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_weights_zero_gives_503_json() {
    let up = Upstream::start("main");
    let config = format!("{LISTEN}\n{}", arm("main", &up.url(), 1, &[]));
    let proxy = Proxy::start(&config);
    let client = client();
    let reply = admin_post(
        &client,
        &proxy.admin_url("/arms/main/weight"),
        r#"{"weight":0}"#,
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let reply = get(&client, &proxy.url("/x"), &[("x-request-id", "none-1")]).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.header("x-request-id").as_deref(), Some("none-1"));
    assert!(
        reply.header("retry-after").is_some(),
        "a 503 says when to retry"
    );
    let body = reply.json();
    assert_eq!(body["request_id"], "none-1", "{body}");
    assert!(body["error"].is_string(), "{body}");
    assert_eq!(
        get(&client, &proxy.admin_url("/readyz"), &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(up.request_count(), 0);
}

/// SPEC §7 "Logs: one JSON line per request": a request no arm could take is still a request.
/// Known failure, reported to the lead: src/proxy.rs `json_response` only logs when it has an arm, so the
/// 503 "no_upstream" answer leaves no access-log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_without_an_arm_still_gets_an_access_line() {
    let up = Upstream::start("main");
    let config = format!("{LISTEN}\n{}", arm("main", &up.url(), 1, &[]));
    let proxy = Proxy::start(&config);
    let client = client();
    let reply = admin_post(
        &client,
        &proxy.admin_url("/arms/main/weight"),
        r#"{"weight":0}"#,
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = get(
        &client,
        &proxy.url("/no-arm"),
        &[("x-request-id", "no-arm-1")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);

    // Then a request that does get an arm; its line comes after, so by then the first one is out too.
    let reply = admin_post(
        &client,
        &proxy.admin_url("/arms/main/weight"),
        r#"{"weight":1}"#,
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        get(
            &client,
            &proxy.url("/marker"),
            &[("x-request-id", "no-arm-marker")]
        )
        .await
        .status,
        StatusCode::OK
    );
    proxy
        .wait_log("access line of the marker", |v| {
            v["request_id"] == "no-arm-marker"
        })
        .await;

    let lines: Vec<_> = proxy
        .access_log()
        .into_iter()
        .filter(|v| v["request_id"] == "no-arm-1")
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one access line for the 503 without an arm; access log: {:?}",
        proxy.access_log()
    );
    assert_eq!(lines[0]["status"], 503, "{}", lines[0]);
    assert_eq!(lines[0]["path"], "/no-arm", "{}", lines[0]);
}
