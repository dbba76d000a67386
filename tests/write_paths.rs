//! What a write route matches (hardening): `POST /INGEST`, `/ingest;jsessionid=1`, `/ingest.json`,
//! `/ingest%20` and `/ingest%00` may be routed by the upstream as `/ingest`, so they are writes for the
//! freeze (503 while frozen, the upstream never called) and for the idempotency fence (executed once,
//! replayed after); `/ingestion` is not.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use http::StatusCode;
use serde_json::json;

const FORMS: [&str; 7] = [
    "/INGEST",
    "/ingest;jsessionid=1",
    "/ingest.json",
    "/ingest%20",
    "/ingest%00",
    "/Ingest%09;x=1",
    "/%69ngest.",
];

fn setup() -> (Scripted, Arc<AtomicUsize>, Proxy) {
    let executions = Arc::new(AtomicUsize::new(0));
    let n = executions.clone();
    let up = Scripted::start("writes", move |_, _| {
        let id = n.fetch_add(1, Ordering::SeqCst) + 1;
        Canned::json(&json!({ "id": id }))
    });
    let proxy = Proxy::start(&format!(
        "{LISTEN}\n[writes]\nroutes = [\"POST /ingest\"]\n{}",
        arm("main", &up.url(), 1, &[])
    ));
    (up, executions, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_write_route_is_frozen() {
    let (_up, executions, proxy) = setup();
    let client = client();
    let reply = admin_post(&client, &proxy.admin_url("/freeze"), "", None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    for path in FORMS {
        let reply = post_json(&client, &proxy.url(path), &json!({}), &[]).await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "POST {path} while frozen: {}",
            reply.text()
        );
    }
    assert_eq!(
        executions.load(Ordering::SeqCst),
        0,
        "no write reached the upstream"
    );
    let reply = post_json(&client, &proxy.url("/ingestion"), &json!({}), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "/ingestion is no write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_write_route_is_fenced() {
    let (_up, executions, proxy) = setup();
    let client = client();
    for (i, path) in FORMS.iter().enumerate() {
        let key = format!("k{i}");
        let headers = [("idempotency-key", key.as_str())];
        let first = post_json(&client, &proxy.url(path), &json!({"n": i}), &headers).await;
        assert_eq!(
            first.status,
            StatusCode::OK,
            "POST {path}: {}",
            first.text()
        );
        let again = post_json(&client, &proxy.url(path), &json!({"n": i}), &headers).await;
        assert_eq!(
            again.header("idempotent-replay").as_deref(),
            Some("true"),
            "POST {path} with the same key replays"
        );
        assert_eq!(again.json(), first.json());
        assert_eq!(
            executions.load(Ordering::SeqCst),
            i + 1,
            "POST {path} ran once"
        );
    }
}
