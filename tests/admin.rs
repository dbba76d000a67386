//! The admin listener and the operator's levers (SPEC §7): reload (SIGHUP and POST /reload), the bearer
//! token on mutating endpoints, and the Prometheus exposition.

mod common;

use common::*;
use http::StatusCode;

fn config(up: &Upstream, model_ver: &str) -> String {
    format!(
        "{LISTEN}\n[pins]\nBUILD_ID = \"b-1\"\n\n{}",
        arm("main", &up.url(), 1, &[("MODEL_VER", model_ver)])
    )
}

/// Invalid in several ways, each with a key path.
fn invalid_config(up: &Upstream) -> String {
    format!(
        "{LISTEN}\n[upstream]\nrequest_timeout = \"soon\"\n\n[[arms]]\nname = \"main\"\nupstream = \"{}\"\n\
         weight = \"heavy\"\n[arms.pins]\nMODEL_VER = \"m-bad\"\n",
        up.url()
    )
}

async fn model_ver(client: &HttpClient, proxy: &Proxy, up: &Upstream, id: &str) -> String {
    let reply = get(client, &proxy.url("/which"), &[("x-request-id", id)]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = up.find(id).expect("the upstream saw the request");
    let upstream = seen
        .header("x-pin-model-ver")
        .expect("pin on the upstream request");
    assert_eq!(
        reply.header("x-pin-model-ver"),
        Some(upstream.clone()),
        "client and upstream agree"
    );
    upstream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_refuses_invalid_file_and_applies_valid_one() {
    let up = Upstream::start("main");
    let mut proxy = Proxy::start(&config(&up, "m-1"));
    let client = client();
    assert_eq!(model_ver(&client, &proxy, &up, "hup-0").await, "m-1");

    proxy.rewrite_config(&invalid_config(&up));
    proxy.signal(libc::SIGHUP);
    let refused = proxy
        .wait_log("the refused-reload line", |v| {
            v["level"] == "ERROR" && v["message"].as_str().is_some_and(|m| m.contains("refused"))
        })
        .await;
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("upstream.request_timeout"),
        "the log names the key: {refused}"
    );
    assert_eq!(
        model_ver(&client, &proxy, &up, "hup-1").await,
        "m-1",
        "the old config keeps running"
    );
    let (_, samples) = scrape(&client, &proxy).await;
    assert_eq!(
        metric(
            &samples,
            "driftguard_config_reloads_total",
            &[("outcome", "refused")]
        ),
        Some(1.0)
    );

    proxy.rewrite_config(&config(&up, "m-2"));
    proxy.signal(libc::SIGHUP);
    proxy
        .wait_log("the reloaded line", |v| v["message"] == "config reloaded")
        .await;
    assert_eq!(
        model_ver(&client, &proxy, &up, "hup-2").await,
        "m-2",
        "the valid change took effect"
    );
    let (_, samples) = scrape(&client, &proxy).await;
    assert_eq!(
        metric(
            &samples,
            "driftguard_config_reloads_total",
            &[("outcome", "ok")]
        ),
        Some(1.0)
    );
    assert!(
        proxy.wait_exit(std::time::Duration::ZERO).await.is_none(),
        "SIGHUP does not stop the process"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_refuses_invalid_file_with_errors_and_applies_valid_one() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&config(&up, "m-1"));
    let client = client();
    assert_eq!(model_ver(&client, &proxy, &up, "post-0").await, "m-1");

    proxy.rewrite_config(&invalid_config(&up));
    let reply = admin_post(&client, &proxy.admin_url("/reload"), "", None).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["error"], "invalid_config", "{body}");
    let errors: Vec<&str> = body["errors"]
        .as_array()
        .expect("errors[]")
        .iter()
        .filter_map(|e| e.as_str())
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("upstream.request_timeout")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.starts_with("arms[0].weight")),
        "{errors:?}"
    );
    assert_eq!(
        model_ver(&client, &proxy, &up, "post-1").await,
        "m-1",
        "the old config keeps running"
    );

    proxy.rewrite_config(&config(&up, "m-2"));
    let reply = admin_post(&client, &proxy.admin_url("/reload"), "", None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["reloaded"], true);
    assert_eq!(
        model_ver(&client, &proxy, &up, "post-2").await,
        "m-2",
        "the valid change took effect"
    );
    let status = get(&client, &proxy.admin_url("/status"), &[]).await.json();
    assert_eq!(status["arms"][0]["pins"]["MODEL_VER"], "m-2", "{status}");
}

const TOKEN: &str = "s3cret-t0ken";

async fn check_token_rule(client: &HttpClient, proxy: &Proxy, token: &str) {
    let url = proxy.admin_url("/arms/main/weight");
    let body = r#"{"weight":7}"#;

    let reply = admin_post(client, &url, body, None).await;
    assert_eq!(
        reply.status,
        StatusCode::UNAUTHORIZED,
        "no token: {}",
        reply.text()
    );
    assert_eq!(reply.json()["error"], "unauthorized");
    let reply = admin_post(client, &url, body, Some("wrong-token")).await;
    assert_eq!(
        reply.status,
        StatusCode::UNAUTHORIZED,
        "wrong token: {}",
        reply.text()
    );
    let reply = admin_post(client, &url, body, Some(&format!("{token}x"))).await;
    assert_eq!(
        reply.status,
        StatusCode::UNAUTHORIZED,
        "token with a suffix: {}",
        reply.text()
    );
    let reply = admin_post(client, &proxy.admin_url("/reload"), "", Some("wrong-token")).await;
    assert_eq!(
        reply.status,
        StatusCode::UNAUTHORIZED,
        "reload with a wrong token: {}",
        reply.text()
    );
    let status = get(client, &proxy.admin_url("/status"), &[]).await.json();
    assert_eq!(
        status["arms"][0]["weight"], 1,
        "refused calls changed nothing"
    );

    let reply = admin_post(client, &url, body, Some(token)).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "right token: {}",
        reply.text()
    );
    let status = get(client, &proxy.admin_url("/status"), &[]).await.json();
    assert_eq!(status["arms"][0]["weight"], 7);
    let reply = admin_post(client, &proxy.admin_url("/reload"), "", Some(token)).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "reload with the right token: {}",
        reply.text()
    );

    // Read-only endpoints stay open.
    assert_eq!(
        get(client, &proxy.admin_url("/metrics"), &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(client, &proxy.admin_url("/healthz"), &[]).await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_from_env_guards_mutations() {
    let up = Upstream::start("main");
    let proxy = Proxy::start_with_env(&config(&up, "m-1"), &[("DRIFTGUARD_ADMIN_TOKEN", TOKEN)]);
    check_token_rule(&client(), &proxy, TOKEN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_from_file_guards_mutations() {
    let up = Upstream::start("main");
    let token_file = unique("token");
    std::fs::write(&token_file, "file-t0ken\n").unwrap();
    let config = format!(
        "[admin]\ntoken_file = {:?}\n{}",
        token_file.display().to_string(),
        config(&up, "m-1")
    );
    let proxy = Proxy::start(&config);
    check_token_rule(&client(), &proxy, "file-t0ken").await;
    let _ = std::fs::remove_file(token_file);
}

// The non-loopback rule (no token configured → 403 for a remote peer) is unit-tested in src/admin.rs; it
// is not exercised here because it would need traffic to a non-loopback address of this machine.

/// Sends some traffic of every kind the exposition reports on.
async fn traffic(client: &HttpClient, proxy: &Proxy) {
    for i in 0..10 {
        let reply = get(client, &proxy.url(&format!("/t/{i}")), &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    // The upstream echoes its real pins: INDEX_HASH differs (a mismatch), MODEL_VER agrees (none).
    let reply = get(
        client,
        &proxy.url("/echo-pin?index-hash=i-WRONG&model-ver=m-1"),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("x-pin-index-hash").as_deref(),
        Some("i-1"),
        "the client sees the stamped pin"
    );
    let reply = get(client, &proxy.url("/echo-pin?model-ver=m-1"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
}

fn metrics_config(up: &Upstream) -> String {
    format!(
        "{LISTEN}\n[pins]\nBUILD_ID = \"b-1\"\nGIT_SHA = \"abc\"\n\n{}",
        arm(
            "main",
            &up.url(),
            1,
            &[("MODEL_VER", "m-1"), ("INDEX_HASH", "i-1")]
        )
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_families_have_samples_and_count_pin_mismatch() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&metrics_config(&up));
    let client = client();
    traffic(&client, &proxy).await;

    let (text, samples) = scrape(&client, &proxy).await;
    for family in [
        "driftguard_requests_total",
        "driftguard_request_duration_seconds_bucket",
        "driftguard_request_duration_seconds_count",
        "driftguard_ttfb_seconds_bucket",
        "driftguard_latency_quantile_seconds",
        "driftguard_pins_info",
        "driftguard_arm_weight",
        "driftguard_build_info",
        "driftguard_pin_mismatch_total",
    ] {
        assert!(
            samples.iter().any(|s| s.name == family),
            "no samples of {family} in:\n{text}"
        );
    }
    assert_eq!(
        metric(
            &samples,
            "driftguard_requests_total",
            &[("arm", "main"), ("class", "2xx")]
        ),
        Some(12.0)
    );
    assert_eq!(
        metric(
            &samples,
            "driftguard_request_duration_seconds_count",
            &[("arm", "main")]
        ),
        Some(12.0)
    );
    assert_eq!(
        metric(
            &samples,
            "driftguard_ttfb_seconds_count",
            &[("arm", "main")]
        ),
        Some(12.0)
    );
    for q in ["0.5", "0.95", "0.99"] {
        let v = metric(
            &samples,
            "driftguard_latency_quantile_seconds",
            &[("arm", "main"), ("quantile", q)],
        )
        .unwrap_or_else(|| panic!("no latency quantile {q}:\n{text}"));
        assert!(v > 0.0 && v < 10.0, "quantile {q} = {v}");
    }
    assert_eq!(
        metric(
            &samples,
            "driftguard_pins_info",
            &[
                ("arm", "main"),
                ("build_id", "b-1"),
                ("git_sha", "abc"),
                ("model_ver", "m-1"),
                ("index_hash", "i-1")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&samples, "driftguard_arm_weight", &[("arm", "main")]),
        Some(1.0)
    );
    assert_eq!(metric(&samples, "driftguard_build_info", &[]), Some(1.0));
    assert_eq!(
        metric(
            &samples,
            "driftguard_pin_mismatch_total",
            &[("arm", "main"), ("pin", "INDEX_HASH")]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        !samples
            .iter()
            .any(|s| s.name == "driftguard_pin_mismatch_total" && s.labels["pin"] != "INDEX_HASH"),
        "only the echoed pin differed:\n{text}"
    );
    let status = get(&client, &proxy.admin_url("/status"), &[]).await.json();
    assert_eq!(status["arms"][0]["window"]["pin_mismatches"], 1, "{status}");
}

/// promtool lints every family, and finds nothing: any finding fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs promtool (apt-get install prometheus)"]
async fn metrics_pass_promtool_check() {
    let promtool = promtool();
    let up = Upstream::start("main");
    let proxy = Proxy::start(&metrics_config(&up));
    let client = client();
    traffic(&client, &proxy).await;
    let (text, _) = scrape(&client, &proxy).await;

    assert_promtool_clean(promtool, &text);
}
