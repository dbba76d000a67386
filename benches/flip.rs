//! Time from the first bad response to the flip (issue #5's benchmark): the real binary in front of two
//! RAG arms (baseline 80 / canary 20), 200 req/s paced, `eval_interval = 1s`, `min_samples = 50`, the
//! default 60 s rule window. After a healthy warm-up the canary goes bad; the figure is the trip's time
//! minus the client's receipt of the canary's first bad answer. Five runs per scenario, median reported.
//!
//! A run counts only when the trip names the canary and a rule the scenario is about (quality rules for
//! off-topic answers, `error_rate` for 5xx); otherwise the scenario FAILs, as it does with no trip or a
//! median over the target. A run where a request got no response, driftguard answered an error of its
//! own, or no bad answer reached a client before the trip cannot be timed: the scenario is INVALID and
//! the bench exits 4 (1 for FAIL), never counting such a run as 0 ms.
//!
//! `cargo bench --bench flip` (loopback only; about a minute per scenario).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::rag::*;
use common::*;
use http::StatusCode;
use serde_json::{json, Value};

const HEALTHY: u8 = 0;
const OFF_TOPIC: u8 = 1;
const FAIL_10: u8 = 2;

const RUNS: usize = 5;
const RATE: u64 = 200;
const WARM_UP: Duration = Duration::from_secs(5);
/// The median flip a scenario must reach.
const TARGET_MS: u64 = 2000;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A RAG arm whose answers turn bad when `mode` changes; marks its bad answers with `x-bad: 1`.
fn rag_arm(name: &str, mode: Arc<AtomicU8>) -> Scripted {
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    Scripted::start(name, move |_, body| {
        let n = calls.fetch_add(1, Ordering::Relaxed) + 1;
        let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let topic = parsed["question"]
            .as_str()
            .and_then(|q| TOPICS.iter().find(|t| q.contains(t.question)))
            .unwrap_or(&TOPICS[0]);
        let m = mode.load(Ordering::Relaxed);
        let mut canned = if m == FAIL_10 && n.is_multiple_of(10) {
            Canned::json(&json!({"error": "backend failed"}))
                .status(StatusCode::INTERNAL_SERVER_ERROR)
        } else {
            let answer = if m == OFF_TOPIC {
                topic.off_topic
            } else {
                topic.grounded
            };
            Canned::json(
                &json!({"answer": answer, "contexts": contexts(topic), "usage": usage(400, 60)}),
            )
        };
        if m != HEALTHY {
            canned.headers.push(("x-bad".into(), "1".into()));
        }
        canned
    })
}

/// What one run measured.
enum Run {
    /// The canary tripped by an expected rule: ms from the client's receipt of the first bad answer.
    Flip(u64),
    /// The guard misbehaved: no trip, a trip on healthy traffic, or by the wrong rule or arm.
    Fail(String),
    /// The run cannot be measured: requests failed, or no bad answer reached a client before the trip.
    Invalid(String),
}

/// One scenario: the canary's bad mode and the rules that may trip it (and nothing else).
struct Scenario {
    name: &'static str,
    mode: u8,
    rules: &'static [&'static str],
}

const SCENARIOS: [Scenario; 2] = [
    Scenario {
        name: "off-topic canary (quality)",
        mode: OFF_TOPIC,
        // An off-topic answer is the answer probe's (retrieved → answer) to judge; the combined view
        // and coverage stay acceptable names for the same fault.
        rules: &[
            "answer_drift_p95",
            "answer_drift_p50",
            "delta_s_p95_drift",
            "delta_s_p50_drift",
            "coverage",
        ],
    },
    Scenario {
        name: "canary with 10 % 5xx",
        mode: FAIL_10,
        rules: &["error_rate"],
    },
];

/// What the load loops saw: the first bad answer's receipt, and requests that went wrong on the way.
#[derive(Default)]
struct Seen {
    first_bad: Option<u64>,
    sent: u64,
    /// Requests with no response (reset, refused, cut short): the run is invalid.
    transport_errors: Vec<String>,
    /// Responses driftguard made itself (its error JSON carries a request_id): the run is invalid.
    proxy_made: u64,
}

async fn one_run(scenario: &Scenario) -> Run {
    let mode = Arc::new(AtomicU8::new(HEALTHY));
    let baseline = rag_arm("baseline", Arc::new(AtomicU8::new(HEALTHY)));
    let canary = rag_arm("canary", mode.clone());
    let config = format!(
        "{LISTEN}\n[log]\naccess = false\n[rules]\neval_interval = \"1s\"\nmin_samples = 50\n\
         [recovery]\nhold = \"1h\"\ndeadline = \"1h\"\n\
         [[arms]]\nname = \"baseline\"\nupstream = \"{}\"\nweight = 80\nbaseline = true\n\
         [[arms]]\nname = \"canary\"\nupstream = \"{}\"\nweight = 20\n",
        baseline.url(),
        canary.url()
    );
    let proxy = Proxy::start(&config);
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    // Paced load: RATE requests per second from a few workers, each on its own schedule.
    const WORKERS: u64 = 8;
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (stop, seen, url) = (stop.clone(), seen.clone(), proxy.url("/v1/ask"));
        tasks.push(tokio::spawn(async move {
            let client = client();
            let period = Duration::from_micros(1_000_000 * WORKERS / RATE);
            let mut tick = tokio::time::interval(period);
            let mut i = w as usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let body = json!({"question": TOPICS[i % TOPICS.len()].question});
                i += 1;
                let sent = try_post_json(&client, &url, &body, &[]).await;
                let at = unix_ms();
                let mut seen = seen.lock().unwrap();
                seen.sent += 1;
                match sent {
                    Ok(reply) => {
                        if reply.header("x-bad").is_some() {
                            seen.first_bad.get_or_insert(at);
                        }
                        let parsed: Value =
                            serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
                        if parsed.get("request_id").is_some() {
                            seen.proxy_made += 1;
                        }
                    }
                    Err(e) => seen.transport_errors.push(e),
                }
            }
        }));
    }
    tokio::time::sleep(WARM_UP).await;
    let went_bad = unix_ms();
    mode.store(scenario.mode, Ordering::Relaxed);
    let client = client();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut trip = None;
    while std::time::Instant::now() < deadline {
        let s = get(&client, &proxy.admin_url("/status"), &[]).await.json();
        if s["guard"]["state"] != "healthy" {
            trip = Some(s["guard"]["last_trip"].clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("a load task panicked");
    }
    let seen = seen.lock().unwrap();
    if !seen.transport_errors.is_empty() {
        return Run::Invalid(format!(
            "{} of {} requests got no response, first: {}",
            seen.transport_errors.len(),
            seen.sent,
            seen.transport_errors[0]
        ));
    }
    if seen.proxy_made > 0 {
        return Run::Invalid(format!(
            "{} of {} responses were driftguard's own errors",
            seen.proxy_made, seen.sent
        ));
    }
    let Some(trip) = trip else {
        return Run::Fail("no trip within 60 s of the canary going bad".into());
    };
    let (rule, arm) = (
        trip["rule"].as_str().unwrap_or(""),
        trip["arm"].as_str().unwrap_or(""),
    );
    let at = trip["at_ms"].as_u64().unwrap_or(0);
    eprintln!(
        "  tripped by {rule} on {arm} {} ms after the canary went bad, first bad answer received {}",
        at.saturating_sub(went_bad),
        seen.first_bad
            .map_or("never".into(), |f| format!("{} ms before", at as i64 - f as i64)),
    );
    if at < went_bad {
        return Run::Fail(format!("tripped by {rule} on healthy traffic"));
    }
    if arm != "canary" || !scenario.rules.contains(&rule) {
        return Run::Fail(format!(
            "tripped by {rule} on {arm}, expected one of {:?} on canary",
            scenario.rules
        ));
    }
    match seen.first_bad {
        Some(first) if first <= at => Run::Flip(at - first),
        _ => Run::Invalid(format!(
            "tripped by {rule} before any bad answer reached a client: nothing to time from"
        )),
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing: only run when benched.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (mut failed, mut invalid) = (false, false);
    for scenario in &SCENARIOS {
        let name = scenario.name;
        eprintln!("{name}: {RUNS} runs at {RATE} req/s, baseline 80 / canary 20");
        let mut flips = Vec::new();
        let mut problems = Vec::new();
        for run in 1..=RUNS {
            match runtime.block_on(one_run(scenario)) {
                Run::Flip(ms) => flips.push(ms),
                Run::Fail(why) => problems.push(("FAIL", format!("run {run}: {why}"))),
                Run::Invalid(why) => problems.push(("INVALID", format!("run {run}: {why}"))),
            }
        }
        flips.sort_unstable();
        let median = flips.get(flips.len() / 2).copied();
        // INVALID when a run could not be measured; FAIL when the guard misbehaved or was slow.
        let verdict = if problems.iter().any(|(v, _)| *v == "INVALID") {
            invalid = true;
            "INVALID"
        } else if !problems.is_empty() || median.is_none_or(|m| m > TARGET_MS) {
            failed = true;
            "FAIL"
        } else {
            "PASS"
        };
        println!(
            "flip {name}: median {} ms over {} measured of {RUNS} runs (all: {flips:?}); \
             rules {:?} on canary; target ≤ {TARGET_MS} ms: {verdict}",
            median.map_or("-".into(), |m| m.to_string()),
            flips.len(),
            scenario.rules,
        );
        for (v, why) in &problems {
            println!("  {v} {why}");
        }
    }
    // The same exit codes as benches/load.sh: 4 for an invalid run, 1 for a failed target.
    if invalid {
        std::process::exit(4);
    }
    if failed {
        std::process::exit(1);
    }
}
