//! A full disk under the embedded receipt store (hardening): `state_dir` on a small tmpfs filled to the
//! last byte. A keyed write whose receipt cannot be committed fails closed (its response breaks off
//! instead of ending cleanly), the store reopens itself once space is back (no "Previous I/O error"
//! until restart), retries of the key replay instead of executing again, and the store errors are
//! counted. Needs to mount a tmpfs (root, as in the CI container); elsewhere it says so and passes.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = unique("tmpfs");
        std::fs::create_dir_all(&dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Some(Tmpfs(dir))
        } else {
            let _ = std::fs::remove_dir(&dir);
            None
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes zeros into `path` until the filesystem is full.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).expect("filler");
    let block = vec![0u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    let small = [0u8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
}

/// POSTs a keyed write; returns the status, the replay header and whether the body ended cleanly.
async fn keyed(client: &HttpClient, url: &str, key: &str) -> (StatusCode, Option<String>, bool) {
    let req = Request::post(url)
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(full(json!({"doc": key}).to_string()))
        .unwrap();
    within(WAIT, "keyed write", async {
        match client.request(req).await {
            Err(_) => (StatusCode::BAD_GATEWAY, None, false),
            Ok(resp) => {
                let status = resp.status();
                let replay = resp
                    .headers()
                    .get("idempotent-replay")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let clean = resp.into_body().collect().await.is_ok();
                (status, replay, clean)
            }
        }
    })
    .await
}

async fn counter(client: &HttpClient, proxy: &Proxy, name: &str) -> f64 {
    let (_, samples) = scrape(client, proxy).await;
    metric(&samples, name, &[]).unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_keyed_writes_closed_and_the_store_recovers_when_space_is_back() {
    let Some(disk) = Tmpfs::mount("8m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let executions = Arc::new(AtomicUsize::new(0));
    let n = executions.clone();
    // Large bodies, so a receipt needs pages the full disk cannot give.
    let up = Scripted::start("writes", move |_, _| {
        n.fetch_add(1, Ordering::SeqCst);
        Canned::body("application/octet-stream", vec![b'x'; 700 * 1024])
    });
    let proxy = Proxy::start(&format!(
        "state_dir = {:?}\n{LISTEN}\n[writes]\nroutes = [\"POST /ingest\"]\nreceipt_body_max = 1048576\n{}",
        disk.0.display().to_string(),
        arm("main", &up.url(), 1, &[])
    ));
    let client = client();
    let url = proxy.url("/ingest");

    // Before: a receipt stored and replayed.
    assert_eq!(
        keyed(&client, &url, "k0").await,
        (StatusCode::OK, None, true)
    );
    assert_eq!(
        keyed(&client, &url, "k0").await,
        (StatusCode::OK, Some("true".into()), true)
    );

    let filler = disk.0.join("filler");
    fill(&filler);

    // Full: k1 executes upstream, but its receipt cannot be committed — the response must not end
    // cleanly (a client that saw a clean end would not retry, and a retry would run it again).
    let (_, _, clean) = keyed(&client, &url, "k1").await;
    assert!(
        !clean,
        "a write whose receipt was not committed must not end cleanly"
    );
    assert_eq!(executions.load(Ordering::SeqCst), 2);
    assert!(
        counter(&client, &proxy, "driftguard_idempotency_store_errors_total").await >= 1.0,
        "store errors are counted"
    );
    // While the disk is still full a retry neither executes again nor passes as done.
    let (status, _, _) = keyed(&client, &url, "k1").await;
    assert_ne!(
        status,
        StatusCode::OK,
        "no replay of a receipt that is not durable"
    );
    assert_eq!(executions.load(Ordering::SeqCst), 2, "no second execution");

    // Space back: the store reopens by itself, k1's kept receipt is stored and replayed (three retries,
    // no execution), the old receipt still replays and a new key runs once.
    std::fs::remove_file(&filler).unwrap();
    for _ in 0..3 {
        assert_eq!(
            keyed(&client, &url, "k1").await,
            (StatusCode::OK, Some("true".into()), true),
            "k1 replays once space is back"
        );
    }
    assert_eq!(
        keyed(&client, &url, "k0").await,
        (StatusCode::OK, Some("true".into()), true)
    );
    assert_eq!(
        keyed(&client, &url, "k2").await,
        (StatusCode::OK, None, true)
    );
    assert_eq!(
        keyed(&client, &url, "k2").await,
        (StatusCode::OK, Some("true".into()), true)
    );
    assert_eq!(
        executions.load(Ordering::SeqCst),
        3,
        "k0, k1, k2 each ran once"
    );
    assert_eq!(
        counter(&client, &proxy, "driftguard_duplicate_effects_total").await,
        0.0
    );
    drop(proxy);
}

/// `POST /freeze` on a full `state_dir` answered 200 although the frozen state was not saved (a restart
/// would have silently unfrozen writes). Now it answers 500 `state_not_saved`; the freeze still holds
/// in the process, and once space is back the next mutation saves and answers 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_mutation_whose_state_cannot_be_saved_answers_an_error() {
    let Some(disk) = Tmpfs::mount("2m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let up = Upstream::start("main");
    let proxy = Proxy::start(&format!(
        "state_dir = {:?}\n{LISTEN}\n[writes]\nroutes = [\"POST /ingest\"]\n{}",
        disk.0.display().to_string(),
        arm("main", &up.url(), 1, &[])
    ));
    let client = client();
    let filler = disk.0.join("filler");
    fill(&filler);

    let reply = admin_post(&client, &proxy.admin_url("/freeze"), "", None).await;
    assert_eq!(
        reply.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        reply.text()
    );
    assert_eq!(reply.json()["error"], "state_not_saved", "{}", reply.text());
    let write = post_json(&client, &proxy.url("/ingest"), &json!({}), &[]).await;
    assert_eq!(
        write.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the freeze holds in memory"
    );

    std::fs::remove_file(&filler).unwrap();
    let reply = admin_post(&client, &proxy.admin_url("/freeze"), "", None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let saved = std::fs::read_to_string(disk.0.join("runtime.json")).expect("the state file");
    assert!(saved.contains("\"frozen\": true"), "{saved}");
    drop(proxy);
}
