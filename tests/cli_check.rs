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
