//! `driftguard check` (SPEC §7): every error with its key path, exit 1; the shipped example passes.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{bin, unique};

fn check(path: &Path) -> Output {
    let mut cmd = Command::new(bin());
    cmd.arg("check").arg("--config").arg(path);
    for (k, _) in std::env::vars() {
        if k.starts_with("DRIFTGUARD_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("run driftguard check")
}

#[test]
fn check_lists_every_error_with_its_key_path() {
    let path = unique("bad").with_extension("toml");
    std::fs::write(
        &path,
        r#"
strict_pins = "yes"

[listen]
proxy = "nope"
bogus = 1

[[arms]]
name = "bad name!"
upstream = "ftp://example"
weight = 1

[[arms]]
name = "ok"
upstream = "http://127.0.0.1:8001"
[arms.pins]
lower_case = "x"

[upstream]
request_timeout = "soon"

[rules.hard]
bogus_over = 1
"#,
    )
    .unwrap();
    let out = check(&path);
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit 1 on a bad config; stderr:\n{stderr}"
    );
    for key in [
        "strict_pins",
        "listen.proxy",
        "listen.bogus",
        "arms[0].name",
        "arms[0].upstream",
        "arms[1].pins.lower_case",
        "upstream.request_timeout",
        "rules.hard.bogus_over",
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{key}:"))),
            "no error line for {key} in:\n{stderr}"
        );
    }
}

#[test]
fn check_passes_the_shipped_example() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/driftguard.toml");
    let out = check(&path);
    assert_eq!(
        out.status.code(),
        Some(0),
        "deploy/driftguard.toml is valid; stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_reports_an_unreadable_file() {
    let path = unique("missing").with_extension("toml");
    let out = check(&path);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `check` on `text`; returns (exit code, stderr).
fn check_text(name: &str, text: &str) -> (Option<i32>, String) {
    let path = unique(name).with_extension("toml");
    std::fs::write(&path, text).unwrap();
    let out = check(&path);
    let _ = std::fs::remove_file(&path);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const ARM: &str = "[[arms]]\nname = \"a\"\nupstream = \"http://127.0.0.1:8000\"\n";

/// Values the types accept but the process cannot live with (an `Instant + Duration` overflow on the
/// first request, an allocation abort at start, a busy loop): each is refused naming its key and range.
#[test]
fn check_refuses_durations_and_sizes_outside_their_range() {
    for (section, key, line) in [
        (
            "upstream",
            "upstream.request_timeout",
            "request_timeout = \"300000000000y\"",
        ),
        (
            "upstream",
            "upstream.request_timeout",
            "request_timeout = \"2h\"",
        ),
        ("signals", "signals.queue", "queue = 100000000000"),
        (
            "signals",
            "signals.max_sessions",
            "max_sessions = 1000000000000",
        ),
        ("signals", "signals.workers", "workers = 3000"),
        ("rules", "rules.eval_interval", "eval_interval = \"0s\""),
        ("breaker", "breaker.window", "window = \"0s\""),
        ("breaker", "breaker.min_calls", "min_calls = 0"),
        ("writes", "writes.ttl", "ttl = \"400days\""),
        ("runtime", "runtime.workers", "workers = 100000"),
    ] {
        let (code, stderr) = check_text("range", &format!("{ARM}[{section}]\n{line}\n"));
        assert_eq!(code, Some(1), "{line} must be refused; stderr:\n{stderr}");
        let error = stderr
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{key}:")))
            .unwrap_or_else(|| panic!("no error line for {key} ({line}) in:\n{stderr}"));
        assert!(
            error.contains("between") || error.contains("365 days"),
            "{key}: the message names the range: {error}"
        );
    }
    // The edges of a range are accepted.
    let (code, stderr) = check_text(
        "range-ok",
        &format!(
            "{ARM}[upstream]\nrequest_timeout = \"1h\"\n[signals]\nqueue = 100000\nmax_sessions = 10000000\nworkers = 256\n[rules]\neval_interval = \"10ms\"\n[breaker]\nwindow = \"1s\"\nmin_calls = 1\n"
        ),
    );
    assert_eq!(code, Some(0), "edges of the ranges pass; stderr:\n{stderr}");
}

/// `http://user:pass@host` would be refused by nothing and then show `user:pass` in every 502 body and
/// in `/status`: `check` refuses it, and its message does not repeat the credentials either.
#[test]
fn check_refuses_credentials_in_an_upstream_url_without_echoing_them() {
    let (code, stderr) = check_text(
        "userinfo",
        "[[arms]]\nname = \"a\"\nupstream = \"http://user:s3cret@127.0.0.1:8000\"\n",
    );
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains("arms[0].upstream:") && stderr.contains("credentials"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("s3cret") && !stderr.contains("user:s3cret"),
        "{stderr}"
    );
}
