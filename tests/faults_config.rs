//! Bad numbers and bad URLs in the config file (hardening): a value outside its documented range or an
//! upstream URL with credentials is refused by a reload and at start, as `check` refuses it
//! (tests/cli_check.rs), and the running process never falls over or shows the credentials.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use http::StatusCode;

fn config(up: &str, extra: &str) -> String {
    format!("{LISTEN}{}{extra}", arm("main", up, 1, &[]))
}

/// Before the ranges, `request_timeout = "300000000000y"` was accepted by a reload and the next
/// request aborted the process (`Instant + Duration` overflow); `eval_interval = "0s"` and a
/// 10^11-sample queue went in too. Now the reload is refused, naming each key, and traffic goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_refuses_values_outside_their_range_and_keeps_serving() {
    let up = Upstream::start("main");
    let proxy = Proxy::start(&config(&up.url(), ""));
    let client = client();
    assert_eq!(
        get(&client, &proxy.url("/ask"), &[]).await.status,
        StatusCode::OK
    );

    proxy.rewrite_config(&config(
        &up.url(),
        "[upstream]\nrequest_timeout = \"300000000000y\"\n[rules]\neval_interval = \"0s\"\n\
         [breaker]\nwindow = \"0s\"\nmin_calls = 0\n[signals]\nworkers = 3000\n",
    ));
    let reply = admin_post(&client, &proxy.admin_url("/reload"), "", None).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    let body = reply.json();
    let errors: Vec<String> = body["errors"]
        .as_array()
        .expect("errors[]")
        .iter()
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect();
    for key in [
        "upstream.request_timeout",
        "rules.eval_interval",
        "breaker.window",
        "breaker.min_calls",
        "signals.workers",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(key)),
            "{key} not named in {errors:?}"
        );
    }
    for n in 0..5 {
        let reply = get(&client, &proxy.url(&format!("/ask?{n}")), &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "the old config keeps serving");
    }

    // Credentials in an upstream URL: refused by the reload, not echoed by it, never in /status.
    proxy.rewrite_config(&config("http://user:s3cret@127.0.0.1:9", ""));
    let reply = admin_post(&client, &proxy.admin_url("/reload"), "", None).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(
        reply.text().contains("arms[0].upstream"),
        "{}",
        reply.text()
    );
    assert!(!reply.text().contains("s3cret"), "{}", reply.text());
    let status = get(&client, &proxy.admin_url("/status"), &[]).await;
    assert!(!status.text().contains("s3cret"), "{}", status.text());
    assert!(
        proxy
            .log_lines()
            .iter()
            .all(|l| !l.to_string().contains("s3cret")),
        "no log line shows the password"
    );
}

/// A start with a value outside its range exits with the key and range instead of aborting on an
/// allocation (`signals.queue = 100000000000`) or on the first request.
#[test]
fn start_refuses_values_outside_their_range() {
    for (extra, key) in [
        ("[signals]\nqueue = 100000000000\n", "signals.queue"),
        (
            "[signals]\nmax_sessions = 1000000000000\n",
            "signals.max_sessions",
        ),
        (
            "[upstream]\nrequest_timeout = \"300000000000y\"\n",
            "upstream.request_timeout",
        ),
    ] {
        let path = unique("start-range").with_extension("toml");
        let state = unique("start-range-state");
        std::fs::write(
            &path,
            format!(
                "state_dir = {:?}\n{}",
                state.display().to_string(),
                config("http://127.0.0.1:9", extra)
            ),
        )
        .unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("run").arg("--config").arg(&path);
        cmd.env_remove("DRIFTGUARD_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("spawn driftguard");
        let out = wait_output(child, Duration::from_secs(30));
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir_all(&state);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "{key}: exit 1, not a crash:\n{text}"
        );
        assert!(text.contains(key), "{key} named in:\n{text}");
    }
}

fn wait_output(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if child.try_wait().ok().flatten().is_some() {
            return child.wait_with_output().expect("output");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("driftguard did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
