//! Guards driven by operators (SPEC §5 "Write freeze" and "Degrade mode"): `POST /freeze` / `/unfreeze`
//! refuse and release the writes of `writes.routes`; `POST /flags` switches degrade mode and named flags,
//! which driftguard alone stamps on upstream requests. Both survive a config reload.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, Request, StatusCode};
use serde_json::{json, Value};

const WRITES: &str = "[writes]\nroutes = [\"POST /ingest\", \"DELETE /docs\"]\n";
const TOKEN: &str = "fr33ze-t0ken";

fn config(up: &Upstream, extra: &str) -> String {
    format!(
        "{LISTEN}\n{WRITES}\n{extra}\n{}",
        arm("main", &up.url(), 1, &[])
    )
}

/// Sends `method path` through the proxy with `x-request-id: id` and any extra headers.
async fn send(
    client: &HttpClient,
    proxy: &Proxy,
    method: Method,
    path: &str,
    id: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let with_body = method == Method::POST || method == Method::PUT;
    let mut req = Request::builder()
        .method(method)
        .uri(proxy.url(path))
        .header("x-request-id", id);
    if with_body {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = if with_body {
        full(r#"{"doc":"x"}"#)
    } else {
        empty()
    };
    exchange(client, req.body(body).unwrap()).await
}

/// The request went through: 200 from the upstream, which saw it under `id`.
async fn assert_passes(
    client: &HttpClient,
    proxy: &Proxy,
    up: &Upstream,
    method: Method,
    path: &str,
    id: &str,
) -> Recorded {
    let what = format!("{method} {path}");
    let reply = send(client, proxy, method.clone(), path, id, &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{what}: {}", reply.text());
    assert_eq!(
        reply.header("x-upstream").as_deref(),
        Some("main"),
        "{what}"
    );
    let seen = up
        .find(id)
        .unwrap_or_else(|| panic!("{what}: the upstream did not see {id}"));
    assert_eq!(seen.method, method, "{what}");
    seen
}

/// The request was refused as a frozen write: 503 JSON `writes_frozen` with `Retry-After` and the
/// request id, and the upstream never saw it.
async fn assert_frozen(
    client: &HttpClient,
    proxy: &Proxy,
    up: &Upstream,
    method: Method,
    path: &str,
    id: &str,
) {
    let what = format!("{method} {path}");
    let before = up.request_count();
    let reply = send(client, proxy, method, path, id, &[]).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{what}: {}",
        reply.text()
    );
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/json"),
        "{what}"
    );
    let body = reply.json();
    assert_eq!(body["error"], "writes_frozen", "{what}: {body}");
    assert!(body["message"].is_string(), "{what}: {body}");
    assert_eq!(body["request_id"], id, "{what}: {body}");
    let retry_after = reply
        .header("retry-after")
        .unwrap_or_else(|| panic!("{what}: no Retry-After"));
    assert!(
        retry_after.parse::<u64>().is_ok_and(|s| s >= 1),
        "{what}: Retry-After {retry_after:?}"
    );
    assert_eq!(
        reply.header("x-request-id").as_deref(),
        Some(id),
        "{what}: x-request-id"
    );
    assert!(
        up.find(id).is_none(),
        "{what}: the upstream saw a frozen write"
    );
    assert_eq!(
        up.request_count(),
        before,
        "{what}: the upstream saw a request"
    );
}

async fn status(client: &HttpClient, proxy: &Proxy) -> Value {
    let reply = get(client, &proxy.admin_url("/status"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()
}

async fn metric_now(
    client: &HttpClient,
    proxy: &Proxy,
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    let (text, samples) = scrape(client, proxy).await;
    metric(&samples, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{text}"))
}

async fn frozen_gauge(client: &HttpClient, proxy: &Proxy) -> f64 {
    metric_now(client, proxy, "driftguard_writes_frozen", &[]).await
}

async fn frozen_refusals(client: &HttpClient, proxy: &Proxy) -> f64 {
    metric_now(
        client,
        proxy,
        "driftguard_proxy_errors_total",
        &[("kind", "writes_frozen")],
    )
    .await
}

async fn post_admin(client: &HttpClient, proxy: &Proxy, path: &str, body: &str) -> Reply {
    admin_post(client, &proxy.admin_url(path), body, None).await
}

async fn freeze(client: &HttpClient, proxy: &Proxy, on: bool) {
    let path = if on { "/freeze" } else { "/unfreeze" };
    let reply = post_admin(client, proxy, path, "").await;
    assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
    assert_eq!(reply.json(), json!({ "frozen": on }), "{path}");
}

async fn set_flags(client: &HttpClient, proxy: &Proxy, body: &str) -> Value {
    let reply = post_admin(client, proxy, "/flags", body).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "/flags {body}: {}",
        reply.text()
    );
    reply.json()
}

/// The degrade and flags headers one request carried to the upstream.
async fn stamped(
    client: &HttpClient,
    proxy: &Proxy,
    up: &Upstream,
    id: &str,
    headers: &[(&str, &str)],
) -> (Option<String>, Option<String>) {
    let reply = send(client, proxy, Method::POST, "/ask", id, headers).await;
    assert_eq!(reply.status, StatusCode::OK, "POST /ask: {}", reply.text());
    let seen = up
        .find(id)
        .unwrap_or_else(|| panic!("the upstream did not see {id}"));
    (
        seen.header("x-driftguard-degrade"),
        seen.header("x-driftguard-flags"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_refuses_writes_and_lets_reads_through() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&config(&up, ""));
    let client = client();

    // Not frozen: writes pass.
    assert_passes(&client, &proxy, &up, Method::POST, "/ingest", "pre-1").await;
    assert_eq!(frozen_gauge(&client, &proxy).await, 0.0);
    assert_eq!(frozen_refusals(&client, &proxy).await, 0.0);
    assert_eq!(status(&client, &proxy).await["frozen"], false);

    freeze(&client, &proxy, true).await;
    assert_eq!(status(&client, &proxy).await["frozen"], true);
    assert_eq!(frozen_gauge(&client, &proxy).await, 1.0);

    assert_frozen(&client, &proxy, &up, Method::POST, "/ingest", "fz-1").await;
    assert_frozen(&client, &proxy, &up, Method::POST, "/ingest/batch", "fz-2").await;
    assert_frozen(&client, &proxy, &up, Method::DELETE, "/docs/1", "fz-3").await;
    assert_frozen(
        &client,
        &proxy,
        &up,
        Method::POST,
        "/ingest?mode=full",
        "fz-4",
    )
    .await;
    assert_frozen(&client, &proxy, &up, Method::DELETE, "/docs", "fz-5").await;

    // Reads and non-matching routes go on.
    assert_passes(&client, &proxy, &up, Method::POST, "/ingestion", "rd-1").await;
    assert_passes(&client, &proxy, &up, Method::GET, "/ingest", "rd-2").await;
    assert_passes(&client, &proxy, &up, Method::POST, "/ask", "rd-3").await;
    assert_passes(&client, &proxy, &up, Method::GET, "/docs/1", "rd-4").await;
    assert_passes(&client, &proxy, &up, Method::POST, "/docs/1", "rd-5").await;

    assert_eq!(frozen_refusals(&client, &proxy).await, 5.0);
    assert_eq!(frozen_gauge(&client, &proxy).await, 1.0);

    // Freezing twice is harmless.
    freeze(&client, &proxy, true).await;
    assert_eq!(frozen_gauge(&client, &proxy).await, 1.0);

    freeze(&client, &proxy, false).await;
    assert_eq!(status(&client, &proxy).await["frozen"], false);
    assert_eq!(frozen_gauge(&client, &proxy).await, 0.0);
    assert_passes(&client, &proxy, &up, Method::POST, "/ingest", "post-1").await;
    assert_passes(
        &client,
        &proxy,
        &up,
        Method::POST,
        "/ingest/batch",
        "post-2",
    )
    .await;
    assert_passes(&client, &proxy, &up, Method::DELETE, "/docs/1", "post-3").await;
    assert_eq!(
        frozen_refusals(&client, &proxy).await,
        5.0,
        "the counter keeps its total and grows no more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_levers_need_the_configured_token() {
    let up = Upstream::start("main");
    let proxy = Proxy::start_with_env(&config(&up, ""), &[("DRIFTGUARD_ADMIN_TOKEN", TOKEN)]);
    let client = client();

    for (path, body) in [
        ("/freeze", ""),
        ("/unfreeze", ""),
        ("/flags", r#"{"degrade": true}"#),
    ] {
        for token in [None, Some("wrong"), Some(&*format!("{TOKEN}x"))] {
            let reply = admin_post(&client, &proxy.admin_url(path), body, token).await;
            assert_eq!(
                reply.status,
                StatusCode::UNAUTHORIZED,
                "{path} with {token:?}: {}",
                reply.text()
            );
            assert_eq!(reply.json()["error"], "unauthorized", "{path}");
        }
    }
    let st = status(&client, &proxy).await;
    assert_eq!(st["frozen"], false, "{st}");
    assert_eq!(st["degrade"], Value::Null, "{st}");
    assert_eq!(frozen_gauge(&client, &proxy).await, 0.0);
    let seen = assert_passes(&client, &proxy, &up, Method::POST, "/ingest", "tok-1").await;
    assert_eq!(seen.header("x-driftguard-degrade"), None);

    let reply = admin_post(&client, &proxy.admin_url("/freeze"), "", Some(TOKEN)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json(), json!({"frozen": true}));
    assert_frozen(&client, &proxy, &up, Method::POST, "/ingest", "tok-2").await;

    // Unfreezing without the token is refused too, and the freeze holds.
    let reply = admin_post(&client, &proxy.admin_url("/unfreeze"), "", None).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    assert_eq!(status(&client, &proxy).await["frozen"], true);
    assert_frozen(&client, &proxy, &up, Method::POST, "/ingest", "tok-3").await;

    let reply = admin_post(&client, &proxy.admin_url("/unfreeze"), "", Some(TOKEN)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_passes(&client, &proxy, &up, Method::POST, "/ingest", "tok-4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_degrade_and_flags_survive_reload() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&config(&up, ""));
    let client = client();

    freeze(&client, &proxy, true).await;
    set_flags(&client, &proxy, r#"{"degrade": true, "beta": true}"#).await;

    // Unchanged file.
    let reply = post_admin(&client, &proxy, "/reload", "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["reloaded"], true);
    let st = status(&client, &proxy).await;
    assert_eq!(st["frozen"], true, "after an unchanged reload: {st}");
    assert_eq!(frozen_gauge(&client, &proxy).await, 1.0);
    assert_frozen(&client, &proxy, &up, Method::POST, "/ingest", "rl-1").await;
    assert_eq!(
        stamped(&client, &proxy, &up, "rl-2", &[]).await,
        (
            Some("skip_rerank;k=3;cite_only".into()),
            Some("beta=on".into())
        )
    );

    // A slightly changed file: another write route, other degrade directives, a request timeout.
    proxy.rewrite_config(&format!(
        "{LISTEN}\n[writes]\nroutes = [\"POST /ingest\", \"DELETE /docs\", \"PUT /items\"]\n\n\
         [upstream]\nrequest_timeout = \"29s\"\n\n[rollback]\ndegrade = \"k=2\"\n\n{}",
        arm("main", &up.url(), 1, &[])
    ));
    let reply = post_admin(&client, &proxy, "/reload", "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let st = status(&client, &proxy).await;
    assert_eq!(st["frozen"], true, "after a changed reload: {st}");
    assert_eq!(st["degrade"], "k=2", "the new directives: {st}");
    assert_eq!(st["flags"], json!({"beta": true}), "{st}");
    assert_eq!(frozen_gauge(&client, &proxy).await, 1.0);
    assert_frozen(&client, &proxy, &up, Method::POST, "/ingest", "rl-3").await;
    assert_frozen(&client, &proxy, &up, Method::PUT, "/items/9", "rl-4").await;
    assert_eq!(
        stamped(&client, &proxy, &up, "rl-5", &[]).await,
        (Some("k=2".into()), Some("beta=on".into()))
    );

    // A refused reload changes nothing either.
    proxy.rewrite_config(&format!(
        "{LISTEN}\n[writes]\nroutes = [\"nonsense\"]\n\n{}",
        arm("main", &up.url(), 1, &[])
    ));
    let reply = post_admin(&client, &proxy, "/reload", "").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(status(&client, &proxy).await["frozen"], true);
    assert_frozen(&client, &proxy, &up, Method::PUT, "/items/9", "rl-6").await;

    freeze(&client, &proxy, false).await;
    assert_passes(&client, &proxy, &up, Method::PUT, "/items/9", "rl-7").await;
    assert_eq!(frozen_gauge(&client, &proxy).await, 0.0);
    assert_eq!(frozen_refusals(&client, &proxy).await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degrade_and_flags_are_stamped_by_driftguard_only() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&config(&up, ""));
    let client = client();
    let forged = [
        ("x-driftguard-degrade", "forged;k=99"),
        ("x-driftguard-flags", "evil=on"),
    ];

    // Off by default; a client's headers are dropped.
    assert_eq!(
        stamped(&client, &proxy, &up, "dg-0", &[]).await,
        (None, None)
    );
    assert_eq!(
        stamped(&client, &proxy, &up, "dg-1", &forged).await,
        (None, None),
        "client-sent degrade/flags headers reached the upstream"
    );
    let st = status(&client, &proxy).await;
    assert_eq!(st["degrade"], Value::Null, "{st}");
    assert_eq!(st["flags"], json!({}), "{st}");

    let reply = set_flags(&client, &proxy, r#"{"degrade": true}"#).await;
    assert_eq!(reply["degrade"], "skip_rerank;k=3;cite_only", "{reply}");
    let st = status(&client, &proxy).await;
    assert_eq!(st["degrade"], "skip_rerank;k=3;cite_only", "{st}");
    assert_eq!(
        stamped(&client, &proxy, &up, "dg-2", &[]).await,
        (Some("skip_rerank;k=3;cite_only".into()), None)
    );
    assert_eq!(
        stamped(&client, &proxy, &up, "dg-3", &forged).await,
        (Some("skip_rerank;k=3;cite_only".into()), None),
        "the client's values are replaced"
    );

    let reply = set_flags(
        &client,
        &proxy,
        r#"{"prompt_pack_v2": false, "beta": true}"#,
    )
    .await;
    assert_eq!(
        reply["flags"],
        json!({"beta": true, "prompt_pack_v2": false}),
        "{reply}"
    );
    assert_eq!(
        reply["degrade"], "skip_rerank;k=3;cite_only",
        "flags leave degrade alone"
    );
    let want = (
        Some("skip_rerank;k=3;cite_only".to_string()),
        Some("beta=on,prompt_pack_v2=off".to_string()),
    );
    assert_eq!(stamped(&client, &proxy, &up, "dg-4", &[]).await, want);
    assert_eq!(stamped(&client, &proxy, &up, "dg-5", &forged).await, want);
    let st = status(&client, &proxy).await;
    assert_eq!(
        st["flags"],
        json!({"beta": true, "prompt_pack_v2": false}),
        "{st}"
    );

    // Flags also reach requests that are not POSTs, and writes while not frozen.
    let seen = assert_passes(&client, &proxy, &up, Method::GET, "/search?q=x", "dg-6").await;
    assert_eq!(
        seen.header("x-driftguard-flags").as_deref(),
        Some("beta=on,prompt_pack_v2=off")
    );
    let seen = assert_passes(&client, &proxy, &up, Method::POST, "/ingest", "dg-7").await;
    assert_eq!(
        seen.header("x-driftguard-degrade").as_deref(),
        Some("skip_rerank;k=3;cite_only")
    );

    // Degrade off: its header is gone, the flags stay; a flag can be flipped.
    let reply = set_flags(&client, &proxy, r#"{"degrade": false, "beta": false}"#).await;
    assert_eq!(reply["degrade"], Value::Null, "{reply}");
    assert_eq!(
        stamped(&client, &proxy, &up, "dg-8", &forged).await,
        (None, Some("beta=off,prompt_pack_v2=off".into()))
    );
    let st = status(&client, &proxy).await;
    assert_eq!(st["degrade"], Value::Null, "{st}");
    assert_eq!(
        st["flags"],
        json!({"beta": false, "prompt_pack_v2": false}),
        "{st}"
    );

    // An empty object changes nothing.
    let reply = set_flags(&client, &proxy, "{}").await;
    assert_eq!(
        reply["flags"],
        json!({"beta": false, "prompt_pack_v2": false})
    );
    assert_eq!(reply["degrade"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_degrade_directives_are_stamped() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&config(&up, "[rollback]\ndegrade = \"k=2\"\n"));
    let client = client();

    assert_eq!(
        stamped(&client, &proxy, &up, "cd-0", &[]).await,
        (None, None)
    );
    let reply = set_flags(&client, &proxy, r#"{"degrade": true}"#).await;
    assert_eq!(reply["degrade"], "k=2", "{reply}");
    assert_eq!(status(&client, &proxy).await["degrade"], "k=2");
    assert_eq!(
        stamped(
            &client,
            &proxy,
            &up,
            "cd-1",
            &[("x-driftguard-degrade", "skip_rerank;k=3;cite_only")]
        )
        .await,
        (Some("k=2".into()), None)
    );
    set_flags(&client, &proxy, r#"{"degrade": false}"#).await;
    assert_eq!(
        stamped(&client, &proxy, &up, "cd-2", &[]).await,
        (None, None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_flags_bodies_are_refused_and_change_nothing() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&config(&up, ""));
    let client = client();

    // null removes a named flag.
    set_flags(&client, &proxy, r#"{"gone": true}"#).await;
    let removed = set_flags(&client, &proxy, r#"{"gone": null}"#).await;
    assert_eq!(removed["flags"], json!({}), "{removed}");

    set_flags(&client, &proxy, r#"{"degrade": true, "beta": true}"#).await;
    let before = status(&client, &proxy).await;
    let want = (
        Some("skip_rerank;k=3;cite_only".to_string()),
        Some("beta=on".to_string()),
    );
    assert_eq!(stamped(&client, &proxy, &up, "inv-0", &[]).await, want);

    let too_many: serde_json::Map<String, Value> = (0..65)
        .map(|i| (format!("f{i}"), Value::Bool(true)))
        .collect();
    let too_many = Value::Object(too_many).to_string();
    let name_too_long = format!(r#"{{"{}": true}}"#, "a".repeat(65));
    for body in [
        r#"{"bad name": true}"#,
        r#"{"x": "yes"}"#,
        r#"{"x": 1}"#,
        r#"{"degrade": "on"}"#,
        r#"{"": true}"#,
        r#"{"ok": true, "bad name": true}"#,
        r#"{"degrade": false, "x": "yes"}"#,
        "[1,2]",
        "true",
        r#""degrade""#,
        "not json",
        "",
        r#"{"degrade": true"#,
        too_many.as_str(),
        name_too_long.as_str(),
    ] {
        let reply = post_admin(&client, &proxy, "/flags", body).await;
        let shown: String = body.chars().take(60).collect();
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "/flags {shown}: {}",
            reply.text()
        );
        let err = reply.json();
        assert_eq!(err["error"], "bad_request", "/flags {shown}: {err}");
        assert!(err["message"].is_string(), "/flags {shown}: {err}");
        let now = status(&client, &proxy).await;
        assert_eq!(
            now["degrade"], before["degrade"],
            "/flags {shown} changed degrade"
        );
        assert_eq!(
            now["flags"], before["flags"],
            "/flags {shown} changed the flags"
        );
    }
    assert_eq!(stamped(&client, &proxy, &up, "inv-1", &[]).await, want);

    // Exactly 64 named flags is the limit, not over it.
    let mut max: serde_json::Map<String, Value> = (0..63)
        .map(|i| (format!("f{i:02}"), Value::Bool(false)))
        .collect();
    max.insert("degrade".into(), Value::Bool(true));
    let reply = set_flags(&client, &proxy, &Value::Object(max).to_string()).await;
    assert_eq!(
        reply["flags"].as_object().map(|m| m.len()),
        Some(64),
        "{reply}"
    );
    let reply = post_admin(&client, &proxy, "/flags", r#"{"one_more": true}"#).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(
        status(&client, &proxy).await["flags"]
            .as_object()
            .map(|m| m.len()),
        Some(64)
    );
}

/// Same rule as `metrics_pass_promtool_check` in tests/admin.rs: promtool finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs promtool (apt-get install prometheus)"]
async fn metrics_with_writes_frozen_pass_promtool_check() {
    let promtool = promtool();
    let up = Upstream::start("main");
    let proxy = Proxy::start(&config(&up, ""));
    let client = client();
    freeze(&client, &proxy, true).await;
    set_flags(&client, &proxy, r#"{"degrade": true, "beta": true}"#).await;
    assert_frozen(&client, &proxy, &up, Method::POST, "/ingest", "pm-1").await;
    assert_passes(&client, &proxy, &up, Method::POST, "/ask", "pm-2").await;
    let (text, samples) = scrape(&client, &proxy).await;
    assert_eq!(metric(&samples, "driftguard_writes_frozen", &[]), Some(1.0));
    assert!(
        text.contains("# TYPE driftguard_writes_frozen gauge"),
        "the gauge is typed:\n{text}"
    );
    assert!(
        text.contains("# HELP driftguard_writes_frozen "),
        "the gauge has help:\n{text}"
    );

    assert_promtool_clean(promtool, &text);
}

/// A write spelled another way is the same write: percent-encoded unreserved characters are equivalent to
/// the characters (RFC 3986 §2.3, §6.2.2.2) and dot segments are removed (§5.2.4, §6.2.2.3) — an upstream
/// that decodes or normalises its path (Starlette/FastAPI decode `%69` to `i`; Go's ServeMux and most
/// front servers clean `.`/`..`) routes these to its `/ingest` / `/docs` handlers, so a freeze that only
/// compares the raw bytes lets them through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_holds_for_equivalent_spellings_of_a_write_path() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&config(&up, ""));
    let client = client();
    freeze(&client, &proxy, true).await;
    let mut leaked = Vec::new();
    for (i, (method, path)) in [
        (Method::POST, "/%69ngest"),
        (Method::POST, "/ingest/%62atch"),
        (Method::DELETE, "/%64ocs/1"),
        (Method::POST, "/./ingest"),
        (Method::POST, "/x/../ingest"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("eq-{i}");
        let reply = send(&client, &proxy, method.clone(), path, &id, &[]).await;
        if reply.status != StatusCode::SERVICE_UNAVAILABLE || up.find(&id).is_some() {
            leaked.push(format!(
                "{method} {path} -> {} (upstream saw {:?})",
                reply.status,
                up.find(&id).map(|r| r.path)
            ));
        }
    }
    assert!(
        leaked.is_empty(),
        "writes got past the freeze:\n{}",
        leaked.join("\n")
    );
}

// ================================================================================================
// Circuit breaker per arm (SPEC §5)
// ================================================================================================

const BREAKER: &str =
    "[breaker]\nwindow = \"10s\"\nfailure_rate = 0.5\nmin_calls = 10\nopen_for = \"1s\"\n\
                       half_open_probes = 3\nslow_call = \"5s\"\nslow_call_rate = 0.8\n";

/// An answer from an open breaker must come well before a failing upstream would have answered.
const FAIL_FAST: Duration = Duration::from_millis(100);
/// `open_for` is 1 s ± 10 % jitter: half-open is expected well within this.
const HALF_OPEN_WITHIN: Duration = Duration::from_secs(3);

fn breaker_config(arms: &str) -> String {
    format!("{LISTEN}\n{BREAKER}\n{arms}")
}

/// An upstream whose health the test switches at run time: failing, it answers 500 after `fail_delay`;
/// healthy, 200 at once. Every response carries `x-upstream: <name>`.
struct Flaky {
    server: Scripted,
    failing: Arc<AtomicBool>,
}

impl Flaky {
    fn start(name: &str, fail_delay: Duration) -> Flaky {
        let failing = Arc::new(AtomicBool::new(true));
        let flag = failing.clone();
        let name = name.to_string();
        let server = Scripted::start(&name.clone(), move |_, _| {
            let canned = Canned::body("text/plain", format!("hello from {name}"));
            let mut canned = if flag.load(Ordering::SeqCst) {
                canned
                    .status(StatusCode::INTERNAL_SERVER_ERROR)
                    .delay(fail_delay)
            } else {
                canned
            };
            canned.headers.push(("x-upstream".into(), name.clone()));
            canned
        });
        Flaky { server, failing }
    }

    fn url(&self) -> String {
        self.server.url()
    }

    fn set_failing(&self, on: bool) {
        self.failing.store(on, Ordering::SeqCst);
    }

    fn request_count(&self) -> usize {
        self.server.request_count()
    }

    fn saw(&self, id: &str) -> bool {
        self.server.exchanges().iter().any(|e| {
            e.request
                .headers
                .get("x-request-id")
                .is_some_and(|v| v == id)
        })
    }
}

/// `driftguard_breaker_state{arm}` now: 0 closed, 1 open, 2 half-open.
async fn breaker_gauge(client: &HttpClient, proxy: &Proxy, arm: &str) -> f64 {
    metric_now(client, proxy, "driftguard_breaker_state", &[("arm", arm)]).await
}

/// `driftguard_proxy_errors_total{kind}`, 0 while the series does not exist yet.
async fn proxy_errors(client: &HttpClient, proxy: &Proxy, kind: &str) -> f64 {
    let (_, samples) = scrape(client, proxy).await;
    metric(&samples, "driftguard_proxy_errors_total", &[("kind", kind)]).unwrap_or(0.0)
}

/// `/status` arms[i].breaker by arm name.
async fn status_breaker(client: &HttpClient, proxy: &Proxy, arm: &str) -> String {
    let st = status(client, proxy).await;
    st["arms"]
        .as_array()
        .and_then(|arms| arms.iter().find(|a| a["name"] == arm))
        .and_then(|a| a["breaker"].as_str())
        .unwrap_or_else(|| panic!("no arms[name={arm}].breaker in /status: {st}"))
        .to_string()
}

/// Sends `n` GET /ask at once (ids `<prefix>-<i>`) and returns the replies in id order.
async fn burst(client: &HttpClient, proxy: &Proxy, n: usize, prefix: &str) -> Vec<Reply> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            let req = Request::get(proxy.url("/ask"))
                .header("x-request-id", format!("{prefix}-{i}"))
                .body(empty())
                .unwrap();
            tokio::spawn(async move { exchange(&client, req).await })
        })
        .collect();
    let mut replies = Vec::with_capacity(n);
    for task in tasks {
        replies.push(task.await.expect("request task"));
    }
    replies
}

/// Opens the breaker of a single-arm proxy whose upstream is failing: 10 calls at once, all 500.
async fn trip(client: &HttpClient, proxy: &Proxy, up: &Flaky, prefix: &str) {
    let before = up.request_count();
    for (i, reply) in burst(client, proxy, 10, prefix).await.iter().enumerate() {
        assert_eq!(
            reply.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{prefix}-{i} while closed: {}",
            reply.text()
        );
    }
    assert_eq!(
        up.request_count(),
        before + 10,
        "every call of the closed breaker reaches the upstream"
    );
}

/// A fail-fast answer of an open breaker: 503 JSON `breaker_open`, `x-driftguard-breaker: open`,
/// `Retry-After` ≥ 1, stamped with the arm and request id.
fn assert_breaker_open(reply: &Reply, arm: &str, id: &str) {
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{id}: {}",
        reply.text()
    );
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/json"),
        "{id}"
    );
    let body = reply.json();
    assert_eq!(body["error"], "breaker_open", "{id}: {body}");
    assert!(body["message"].is_string(), "{id}: {body}");
    assert_eq!(body["request_id"], id, "{id}: {body}");
    assert_eq!(
        reply.header("x-driftguard-breaker").as_deref(),
        Some("open"),
        "{id}"
    );
    let retry_after = reply
        .header("retry-after")
        .unwrap_or_else(|| panic!("{id}: no Retry-After"));
    assert!(
        retry_after.parse::<u64>().is_ok_and(|s| s >= 1),
        "{id}: Retry-After {retry_after:?}"
    );
    assert_eq!(
        reply.header("x-driftguard-arm").as_deref(),
        Some(arm),
        "{id}"
    );
    assert_eq!(reply.header("x-request-id").as_deref(), Some(id), "{id}");
}

/// Sends one request that an open breaker must turn away fast, without the upstream seeing it.
async fn assert_fails_fast(client: &HttpClient, proxy: &Proxy, up: &Flaky, arm: &str, id: &str) {
    let before = up.request_count();
    let started = Instant::now();
    let reply = send(client, proxy, Method::GET, "/ask", id, &[]).await;
    let took = started.elapsed();
    assert_breaker_open(&reply, arm, id);
    assert!(
        took < FAIL_FAST,
        "{id}: an open breaker answered in {took:?} (the failing upstream takes 200 ms)"
    );
    assert!(
        !up.saw(id),
        "{id}: the upstream saw a request the open breaker refused"
    );
    assert_eq!(
        up.request_count(),
        before,
        "{id}: the upstream saw a request"
    );
}

async fn wait_breaker(client: &HttpClient, proxy: &Proxy, arm: &str, state: f64, what: &str) {
    let started = Instant::now();
    wait_metric(
        client,
        proxy,
        "driftguard_breaker_state",
        &[("arm", arm)],
        HALF_OPEN_WITHIN,
        |v| v == state,
    )
    .await;
    eprintln!(
        "{what}: breaker_state{{arm={arm}}} = {state} after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_on_5xx_fails_fast_then_good_probes_close_it() {
    let up = Flaky::start("main", Duration::from_millis(200));
    let proxy = Proxy::start(&breaker_config(&arm("main", &up.url(), 1, &[])));
    let client = client();
    assert_eq!(breaker_gauge(&client, &proxy, "main").await, 0.0);
    assert_eq!(status_breaker(&client, &proxy, "main").await, "closed");

    // 10 failures (min_calls, failure share 1.0 ≥ 0.5): open. It stays open for at least 0.9 s, far
    // more than the checks below need.
    trip(&client, &proxy, &up, "fail").await;
    for i in 0..3 {
        assert_fails_fast(&client, &proxy, &up, "main", &format!("open-{i}")).await;
    }
    assert_eq!(breaker_gauge(&client, &proxy, "main").await, 1.0);
    assert_eq!(status_breaker(&client, &proxy, "main").await, "open");
    assert_eq!(proxy_errors(&client, &proxy, "breaker_open").await, 3.0);

    // Half-open once open_for has passed, even before a request arrives.
    wait_breaker(&client, &proxy, "main", 2.0, "after open_for").await;
    assert_eq!(status_breaker(&client, &proxy, "main").await, "half_open");

    // The arm recovered: three good probes close it; until the third, it stays half-open.
    up.set_failing(false);
    for i in 0..3 {
        let id = format!("probe-{i}");
        let reply = send(&client, &proxy, Method::GET, "/ask", &id, &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{id}: {}", reply.text());
        assert_eq!(reply.header("x-upstream").as_deref(), Some("main"), "{id}");
        assert!(up.saw(&id), "{id}: the probe did not reach the upstream");
        let want = if i < 2 { 2.0 } else { 0.0 };
        assert_eq!(
            breaker_gauge(&client, &proxy, "main").await,
            want,
            "after {} good probe(s)",
            i + 1
        );
    }
    assert_eq!(status_breaker(&client, &proxy, "main").await, "closed");
    for (i, reply) in burst(&client, &proxy, 5, "closed").await.iter().enumerate() {
        assert_eq!(reply.status, StatusCode::OK, "closed-{i}: {}", reply.text());
        assert!(reply.header("x-driftguard-breaker").is_none(), "closed-{i}");
        assert!(up.saw(&format!("closed-{i}")), "closed-{i}");
    }
    assert_eq!(breaker_gauge(&client, &proxy, "main").await, 0.0);
    assert_eq!(proxy_errors(&client, &proxy, "breaker_open").await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_one_failed_probe_reopens_it() {
    let up = Flaky::start("main", Duration::from_millis(200));
    let proxy = Proxy::start(&breaker_config(&arm("main", &up.url(), 1, &[])));
    let client = client();

    trip(&client, &proxy, &up, "fail").await;
    assert_eq!(breaker_gauge(&client, &proxy, "main").await, 1.0);
    wait_breaker(&client, &proxy, "main", 2.0, "after open_for").await;

    // Still failing: the first probe reaches the upstream, fails, and the breaker is open again.
    let before = up.request_count();
    let reply = send(&client, &proxy, Method::GET, "/ask", "probe", &[]).await;
    assert_eq!(
        reply.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "the probe: {}",
        reply.text()
    );
    assert_eq!(
        up.request_count(),
        before + 1,
        "the probe reached the upstream"
    );
    assert_eq!(breaker_gauge(&client, &proxy, "main").await, 1.0);
    assert_eq!(status_breaker(&client, &proxy, "main").await, "open");
    assert_fails_fast(&client, &proxy, &up, "main", "reopened").await;
    assert_eq!(proxy_errors(&client, &proxy, "breaker_open").await, 1.0);

    // Half-open again: at most half_open_probes = 3 probes at once; the others are turned away, and
    // the failing probes reopen it.
    wait_breaker(&client, &proxy, "main", 2.0, "after reopening").await;
    let before = up.request_count();
    let replies = burst(&client, &proxy, 5, "probes").await;
    let probed = replies
        .iter()
        .filter(|r| r.status == StatusCode::INTERNAL_SERVER_ERROR)
        .count();
    assert_eq!(probed, 3, "probes let through: {replies:?}");
    assert_eq!(up.request_count(), before + 3, "requests the upstream saw");
    for (i, reply) in replies.iter().enumerate() {
        if reply.status != StatusCode::INTERNAL_SERVER_ERROR {
            assert_breaker_open(reply, "main", &format!("probes-{i}"));
        }
    }
    assert_eq!(breaker_gauge(&client, &proxy, "main").await, 1.0);
    assert_eq!(proxy_errors(&client, &proxy, "breaker_open").await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_on_an_unreachable_upstream() {
    let dead = closed_port_url();
    let proxy = Proxy::start(&breaker_config(&arm("main", &dead, 1, &[])));
    let client = client();

    for i in 0..10 {
        let id = format!("refused-{i}");
        let reply = send(&client, &proxy, Method::GET, "/ask", &id, &[]).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_GATEWAY,
            "{id}: {}",
            reply.text()
        );
        assert_eq!(reply.json()["error"], "upstream_unreachable", "{id}");
    }
    assert_eq!(breaker_gauge(&client, &proxy, "main").await, 1.0);
    assert_eq!(status_breaker(&client, &proxy, "main").await, "open");
    let started = Instant::now();
    let reply = send(&client, &proxy, Method::GET, "/ask", "open", &[]).await;
    assert_breaker_open(&reply, "main", "open");
    assert!(
        started.elapsed() < FAIL_FAST,
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(proxy_errors(&client, &proxy, "breaker_open").await, 1.0);
    assert_eq!(
        proxy_errors(&client, &proxy, "upstream_unreachable").await,
        10.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_is_per_arm() {
    let blue = Upstream::start("blue");
    let green = Flaky::start("green", Duration::ZERO);
    let proxy = Proxy::start(&breaker_config(&format!(
        "{}\n{}",
        arm("blue", &blue.url(), 50, &[]),
        arm("green", &green.url(), 50, &[])
    )));
    let client = client();

    // Random 50/50 routing until a green request meets the open breaker.
    let (mut blue_ok, mut green_failed) = (0, 0);
    let mut opened = false;
    for i in 0..400 {
        let id = format!("r-{i}");
        let reply = send(&client, &proxy, Method::GET, "/ask", &id, &[]).await;
        match reply.header("x-driftguard-arm").as_deref() {
            Some("blue") => {
                assert_eq!(reply.status, StatusCode::OK, "{id}: {}", reply.text());
                assert_eq!(reply.header("x-upstream").as_deref(), Some("blue"), "{id}");
                blue_ok += 1;
            }
            Some("green") if reply.status == StatusCode::INTERNAL_SERVER_ERROR => {
                green_failed += 1;
            }
            Some("green") => {
                assert_breaker_open(&reply, "green", &id);
                assert!(!green.saw(&id), "{id}: green saw a refused request");
                opened = true;
                break;
            }
            other => panic!("{id}: x-driftguard-arm {other:?}: {}", reply.text()),
        }
    }
    assert!(
        opened,
        "green's breaker never opened ({green_failed} failures, {blue_ok} blue)"
    );
    assert_eq!(
        green_failed, 10,
        "green's breaker opens on its own 10th failure, whatever blue does ({blue_ok} blue successes in between)"
    );
    assert_eq!(breaker_gauge(&client, &proxy, "green").await, 1.0);
    assert_eq!(breaker_gauge(&client, &proxy, "blue").await, 0.0);
    assert_eq!(status_breaker(&client, &proxy, "blue").await, "closed");

    // Blue keeps serving; green keeps being refused (or, once half-open, probed and failing).
    let mut blue_after = 0;
    for (i, reply) in burst(&client, &proxy, 20, "after").await.iter().enumerate() {
        let id = format!("after-{i}");
        match reply.header("x-driftguard-arm").as_deref() {
            Some("blue") => {
                assert_eq!(reply.status, StatusCode::OK, "{id}: {}", reply.text());
                blue_after += 1;
            }
            Some("green") => assert_ne!(reply.status, StatusCode::OK, "{id}"),
            other => panic!("{id}: x-driftguard-arm {other:?}"),
        }
    }
    assert!(blue_after > 0, "no request of 20 went to blue");
    assert_eq!(breaker_gauge(&client, &proxy, "blue").await, 0.0);
    assert_eq!(status_breaker(&client, &proxy, "blue").await, "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_stays_closed_below_min_calls() {
    let up = Flaky::start("main", Duration::ZERO);
    let proxy = Proxy::start(&breaker_config(&arm("main", &up.url(), 1, &[])));
    let client = client();

    // 9 failures out of 9 calls: a share of 1.0, but fewer calls than min_calls = 10.
    for i in 0..9 {
        let id = format!("few-{i}");
        let reply = send(&client, &proxy, Method::GET, "/ask", &id, &[]).await;
        assert_eq!(
            reply.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{id}: {}",
            reply.text()
        );
        assert!(reply.header("x-driftguard-breaker").is_none(), "{id}");
    }
    assert_eq!(up.request_count(), 9);
    assert_eq!(breaker_gauge(&client, &proxy, "main").await, 0.0);
    assert_eq!(status_breaker(&client, &proxy, "main").await, "closed");
    assert_eq!(proxy_errors(&client, &proxy, "breaker_open").await, 0.0);

    // The 10th call still goes through (the breaker was closed when it was admitted) and opens it.
    let reply = send(&client, &proxy, Method::GET, "/ask", "tenth", &[]).await;
    assert_eq!(
        reply.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        reply.text()
    );
    assert!(up.saw("tenth"));
    assert_eq!(breaker_gauge(&client, &proxy, "main").await, 1.0);
}

/// Freeze, flags, degrade and a runtime weight survive a restart (SIGKILL included): they are saved in
/// `state_dir/runtime.json` and restored before the proxy listens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_state_survives_a_restart() {
    let up = Upstream::start("main");
    let state_dir = common::unique("state-restart");
    let cfg = format!(
        "state_dir = {:?}\n{}",
        state_dir.display().to_string(),
        config(&up, "")
    );
    let client = client();

    let mut first = Proxy::start(&cfg);
    freeze(&client, &first, true).await;
    set_flags(&client, &first, r#"{"degrade": true, "beta": true}"#).await;
    let reply = post_admin(&client, &first, "/arms/main/weight", r#"{"weight": 7}"#).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    first.signal(libc::SIGKILL);
    assert!(
        first.wait_exit(WAIT).await.is_some(),
        "killed proxy did not exit"
    );

    let second = Proxy::start(&cfg);
    let st = status(&client, &second).await;
    assert_eq!(st["frozen"], true, "{st}");
    assert_eq!(st["degrade"], "skip_rerank;k=3;cite_only", "{st}");
    assert_eq!(st["flags"], json!({"beta": true}), "{st}");
    assert_eq!(st["arms"][0]["weight"], 7, "{st}");
    assert_frozen(
        &client,
        &second,
        &up,
        Method::POST,
        "/ingest",
        "after-restart",
    )
    .await;
    let _ = std::fs::remove_dir_all(&state_dir);
}

/// `breaker.degrade_target`: while an arm's breaker is open its requests go to the degrade target
/// instead of failing fast; the refused arm never sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_open_routes_to_the_degrade_target() {
    let primary = Flaky::start("primary", Duration::ZERO);
    let fallback = Upstream::start("fallback");
    let proxy = Proxy::start(&format!(
        "{LISTEN}\n{BREAKER}degrade_target = \"fallback\"\n\n{}\n{}",
        arm("primary", &primary.url(), 100, &[]),
        arm("fallback", &fallback.url(), 0, &[])
    ));
    let client = client();
    trip(&client, &proxy, &primary, "fail").await;
    assert_eq!(breaker_gauge(&client, &proxy, "primary").await, 1.0);

    let before = primary.request_count();
    for (i, reply) in burst(&client, &proxy, 10, "open").await.iter().enumerate() {
        assert_eq!(reply.status, StatusCode::OK, "open-{i}: {}", reply.text());
        assert_eq!(
            reply.header("x-driftguard-arm").as_deref(),
            Some("fallback")
        );
        assert_eq!(reply.header("x-upstream").as_deref(), Some("fallback"));
    }
    assert_eq!(
        primary.request_count(),
        before,
        "the open arm saw no request"
    );
    let fallbacks = metric_now(
        &client,
        &proxy,
        "driftguard_breaker_fallbacks_total",
        &[("arm", "primary"), ("target", "fallback")],
    )
    .await;
    assert_eq!(fallbacks, 10.0);
    assert_eq!(proxy_errors(&client, &proxy, "breaker_open").await, 0.0);
}
