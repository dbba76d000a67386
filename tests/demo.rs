//! `driftguard demo` as a user runs it: the real binary with short timings on ephemeral ports — the
//! report of a trip by a quality rule, a taken port refused clearly, and `--keep` leaving the admin API
//! up after the report.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Rules that watch answer quality; the demo's canary must be caught by one of these.
const QUALITY_RULES: [&str; 9] = [
    "answer_drift_p95",
    "answer_drift_p50",
    "retrieval_drift_p95",
    "retrieval_drift_p50",
    "retrieval_coverage",
    "delta_s_p95_drift",
    "delta_s_p50_drift",
    "coverage",
    "lambda_flip_rate",
];

/// Ephemeral ports, 80 req/s.
const PORTS: [&str; 6] = ["demo", "--proxy-port", "0", "--admin-port", "0", "--rps=80"];
/// Short timings: the canary goes bad 3 s in; the run ends a few seconds after the trip.
const SHORT: [&str; 4] = ["--degrade-after", "3s", "--duration", "40s"];

/// The value after `label` on the report line that starts with it.
fn report_line<'a>(stdout: &'a str, label: &str) -> Option<&'a str> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .map(str::trim)
}

#[test]
fn the_demo_trips_a_quality_rule_and_reports_it() {
    let dir = unique("demo");
    let state_dir = dir.display().to_string();
    let mut args = PORTS.to_vec();
    args.extend(SHORT);
    args.extend(["--state-dir", &state_dir]);
    let started = Instant::now();
    let out = run_cli(&args, &std::env::temp_dir(), Duration::from_secs(120));
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    // It ended on its own soon after the trip, not at --duration.
    assert!(took < Duration::from_secs(38), "took {took:?}\n{stdout}");

    let tripped = report_line(&stdout, "tripped:").unwrap_or_else(|| panic!("{stdout}"));
    let rule = tripped
        .strip_prefix("rule ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{tripped}"));
    assert!(
        QUALITY_RULES.contains(&rule),
        "tripped by {rule}, not a quality rule\n{stdout}"
    );
    assert!(tripped.contains("on arm canary"), "{tripped}");

    let flip = report_line(&stdout, "time to flip:").unwrap_or_else(|| panic!("{stdout}"));
    let seconds: f64 = flip
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{flip}"));
    eprintln!("demo: rule {rule}, time to flip {seconds:.2} s");
    // The README's figure is 2–3 s (three runs on a shared 2-core machine, debug build). Allowed here:
    // 0.2 s (an evaluation interval cannot judge sooner) to 6 s — the claim's top plus 3 s of margin
    // for a loaded CI machine.
    assert!(
        (0.2..6.0).contains(&seconds),
        "time to flip {seconds} s, the README says 2–3 s\n{stdout}"
    );

    let lever = report_line(&stdout, "lever:").unwrap_or_else(|| panic!("{stdout}"));
    assert!(lever.starts_with("route"), "{lever}");
    assert!(lever.contains("canary weight 20 → 0"), "{lever}");
    assert!(report_line(&stdout, "observed:").is_some(), "{stdout}");
    // Without --keep the listeners are gone when the report is read: no URLs, a word on --keep.
    assert!(report_line(&stdout, "metrics:").is_none(), "{stdout}");
    assert!(report_line(&stdout, "status:").is_none(), "{stdout}");
    assert!(
        report_line(&stdout, "listeners:").is_some_and(|l| l.contains("--keep")),
        "{stdout}"
    );

    // The frozen writes the progress lines showed add up to the report's count.
    let per_second: u64 = stdout
        .lines()
        .filter_map(|l| {
            l.split_once("  (")?
                .1
                .strip_suffix(" writes refused: frozen)")
        })
        .map(|n| n.parse::<u64>().unwrap_or_else(|_| panic!("{n}")))
        .sum();
    let (total, late) = report_line(&stdout, "writes:").map_or((0, 0), |w| {
        let total = w.split_whitespace().next().and_then(|n| n.parse().ok());
        let late = w
            .split_once('(')
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok());
        (total.unwrap_or_else(|| panic!("{w}")), late.unwrap_or(0u64))
    });
    assert!(total > 0, "no write was refused while frozen\n{stdout}");
    assert_eq!(per_second + late, total, "{stdout}");

    // The snapshot is on disk and names the same rule.
    let snapshot = report_line(&stdout, "snapshot:").unwrap_or_else(|| panic!("{stdout}"));
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(snapshot).unwrap_or_else(|e| panic!("{snapshot}: {e}")),
    )
    .unwrap();
    assert_eq!(doc["rule"], rule);
    assert_eq!(doc["arm"], "canary");
    assert!(snapshot.starts_with(&state_dir), "{snapshot}");

    // The progress showed the rollback: the canary's weight at 0 and no canary traffic after it.
    assert!(stdout.contains("weights 80/20"), "{stdout}");
    assert!(stdout.contains("weights 80/0"), "{stdout}");
    assert!(stdout.contains(">> TRIPPED by rule"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_taken_port_fails_clearly() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    for flag in ["--proxy-port", "--admin-port", "--base-port"] {
        let mut args = vec!["demo", "--duration", "5s"];
        for other in ["--proxy-port", "--admin-port"] {
            if other != flag {
                args.extend([other, "0"]);
            }
        }
        args.extend([flag, &port]);
        let out = run_cli(&args, &std::env::temp_dir(), WAIT);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(
            stderr.contains(&format!("port {port}")) && stderr.contains(flag),
            "{flag}: {stderr}"
        );
    }
}

#[tokio::test]
async fn keep_leaves_the_admin_api_up_after_the_report() {
    let dir = unique("demo-keep");
    let mut child = Command::new(bin())
        .args(PORTS)
        .args(["--keep", "--degrade-after", "2s", "--duration", "20s"])
        .arg("--state-dir")
        .arg(&dir)
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let mut next_line = |what: &str| {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no {what} line; so far:\n{}", seen.join("\n")));
        seen.push(line.clone());
        line
    };
    // "  admin    http://127.0.0.1:PORT/status   http://127.0.0.1:PORT/metrics"
    let admin = loop {
        let line = next_line("admin");
        if let Some(rest) = line.trim().strip_prefix("admin") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let client = client();
    let running = get(&client, &admin, &[]).await.json();
    assert_eq!(
        running["arms"].as_array().map(Vec::len),
        Some(2),
        "{running}"
    );

    // After the report, --keep: everything stays up.
    loop {
        if next_line("--keep").starts_with("--keep") {
            break;
        }
    }
    // The report named the URLs that stay up.
    let report = seen.join("\n");
    assert!(
        report_line(&report, "status:").is_some_and(|u| u == admin),
        "{report}"
    );
    assert!(report_line(&report, "metrics:").is_some(), "{report}");
    let kept = get(&client, &admin, &[]).await.json();
    assert!(
        kept["guard"]["last_trip"]["rule"].is_string(),
        "after the report: {kept}"
    );
    assert!(child.try_wait().unwrap().is_none(), "--keep exited");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
