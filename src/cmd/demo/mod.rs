//! `driftguard demo`: the whole loop on this machine, in one process. Two demo RAG arms ([`arms`])
//! answer from a built-in knowledge base ([`kb`]); driftguard itself serves in front of them with a
//! generated config (baseline 80 / canary 20, a 10 s rule window judged every second); a paced load
//! generator ([`load`]) sends questions through the proxy. After `degrade_after` the canary starts
//! answering off-topic (and now and then with a 500); the progress lines show the canary's ΔS and
//! coverage move, the guard trip, the canary's weight go to 0 and the guard recover; a short report says
//! which rule tripped, how fast, what it did, and where the snapshot is.

pub mod arms;
pub mod kb;
pub mod load;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::TcpListener;

use crate::clock::now_ms;
use crate::cmd::run::RunError;
use crate::rollback::snapshot::snapshot_dir;
use crate::rollback::state::{GuardState, Trip};
use crate::{app, shutdown};

/// Weights of the two arms (percent of the traffic).
const BASELINE_WEIGHT: u32 = 80;
const CANARY_WEIGHT: u32 = 20;
/// Traffic kept going after the trip before the demo ends, at the most.
const POST_FLIP_MAX: Duration = Duration::from_secs(10);
/// After the trip, once the guard is healthy again and this much has passed, the demo ends.
const POST_FLIP_MIN: Duration = Duration::from_secs(3);
/// The recovery hold of the demo config: short, so recovering → healthy shows within the run.
const RECOVERY_HOLD: &str = "3s";

/// What `driftguard demo` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Proxy listener port on 127.0.0.1 (0: any free port).
    pub proxy_port: u16,
    /// Admin listener port on 127.0.0.1 (0: any free port).
    pub admin_port: u16,
    /// The baseline arm listens here and the canary on the next port (0: any free ports).
    pub base_port: u16,
    /// Requests per second the load generator sends.
    pub rps: u32,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// When the canary starts going bad, after the load starts.
    pub degrade_after: Duration,
    /// The longest the demo runs (it ends sooner once the trip is shown).
    pub duration: Duration,
    /// Leave everything running after the report, until Ctrl-C or SIGTERM.
    pub keep: bool,
    /// Where the config, log, runtime state and snapshots go (absent or empty); default: a new folder
    /// under the system temp dir.
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "port {port} ({what}) is taken: {source}; choose another with {flag} (0 = any free port)"
    )]
    PortTaken {
        what: &'static str,
        port: String,
        flag: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

/// How the demo ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A rule tripped on the degraded canary and the rollback ran.
    Tripped,
    /// Nothing tripped, or something tripped before the canary went bad.
    NotTripped,
}

/// Runs the demo on a runtime of its own; prints progress and the report on stdout.
pub fn run(options: &Options) -> Result<Outcome, DemoError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| DemoError::Setup(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(demo(options))
}

/// The demo's files: config, log, runtime state and snapshots.
fn state_dir(options: &Options) -> Result<PathBuf, DemoError> {
    let dir = match &options.state_dir {
        Some(dir) => {
            let occupied = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
            if occupied {
                return Err(DemoError::Setup(format!(
                    "--state-dir {} is not empty; the demo starts from a fresh state",
                    dir.display()
                )));
            }
            dir.clone()
        }
        None => std::env::temp_dir().join(format!(
            "driftguard-demo-{}-{}",
            std::process::id(),
            now_ms()
        )),
    };
    std::fs::create_dir_all(&dir)
        .and_then(|()| dir.canonicalize())
        .map_err(|e| DemoError::Setup(format!("cannot create {}: {e}", dir.display())))
}

async fn bind(what: &'static str, flag: &'static str, port: u16) -> Result<TcpListener, DemoError> {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .map_err(|source| DemoError::PortTaken {
            what,
            port: port.to_string(),
            flag,
            source,
        })
}

/// The demo's driftguard config: two arms, every answer evaluated, a fast rule window, a short hold.
fn config_text(dir: &Path, options: &Options, baseline: SocketAddr, canary: SocketAddr) -> String {
    let quoted = toml::Value::String(dir.display().to_string()).to_string();
    format!(
        r#"# Generated by `driftguard demo`.
state_dir = {quoted}

[listen]
proxy = "127.0.0.1:{proxy}"
admin = "127.0.0.1:{admin}"
drain_timeout = "2s"

[pins]
BUILD_ID = "demo-1"
GIT_SHA = "d3m0d3m"

[[arms]]
name = "baseline"
upstream = "http://{baseline}"
weight = {BASELINE_WEIGHT}
baseline = true
pins = {{ MODEL_VER = "m-2026-10", PROMPT_VER = "p7", INDEX_HASH = "a1b2c3", INDEX_ALIAS = "docs_vA" }}

[[arms]]
name = "canary"
upstream = "http://{canary}"
weight = {CANARY_WEIGHT}
pins = {{ MODEL_VER = "m-2026-11", PROMPT_VER = "p8", INDEX_HASH = "d4e5f6", INDEX_ALIAS = "docs_vB" }}

[signals]
sample = 1.0

[writes]
routes = ["POST /v1/feedback"]

[rules]
window = "20s"
eval_interval = "1s"
min_samples = 50

[recovery]
hold = "{RECOVERY_HOLD}"
deadline = "2m"
"#,
        proxy = options.proxy_port,
        admin = options.admin_port,
    )
}

async fn demo(options: &Options) -> Result<Outcome, DemoError> {
    let dir = state_dir(options)?;
    let result = demo_in(&dir, options).await;
    // The demo never ran: nothing worth keeping. A --state-dir is the user's and stays.
    if result.is_err() && options.state_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn demo_in(dir: &Path, options: &Options) -> Result<Outcome, DemoError> {
    let dir = dir.to_path_buf();
    // The arms' ports first, so a taken port fails before anything starts.
    let baseline_listener = bind("baseline arm", "--base-port", options.base_port).await?;
    let canary_port = match options.base_port {
        0 => 0,
        p => p.checked_add(1).ok_or_else(|| {
            DemoError::Setup("--base-port: the canary needs the next port too".into())
        })?,
    };
    let canary_listener = bind("canary arm", "--base-port", canary_port).await?;
    let local = |l: &TcpListener| {
        l.local_addr()
            .map_err(|e| DemoError::Setup(format!("no local address: {e}")))
    };
    let (baseline_addr, canary_addr) = (local(&baseline_listener)?, local(&canary_listener)?);

    let config_path = dir.join("driftguard.toml");
    let log_path = dir.join("driftguard.log");
    std::fs::write(
        &config_path,
        config_text(&dir, options, baseline_addr, canary_addr),
    )
    .map_err(|e| DemoError::Setup(format!("cannot write {}: {e}", config_path.display())))?;
    let loaded = app::load(&config_path)
        .map_err(|e| DemoError::Setup(format!("the demo config is invalid:\n{e}")))?;
    let log_file = std::fs::File::create(&log_path)
        .map_err(|e| DemoError::Setup(format!("cannot create {}: {e}", log_path.display())))?;
    let _log = crate::telemetry::log::init_to(&loaded.config.log.level, Box::new(log_file));

    let running = crate::cmd::run::start(loaded, Some(config_path.clone()))
        .await
        .map_err(|e| match e {
            RunError::Bind {
                what, addr, source, ..
            } => DemoError::PortTaken {
                what,
                port: addr.rsplit(':').next().unwrap_or(&addr).to_string(),
                flag: if what == "admin" {
                    "--admin-port"
                } else {
                    "--proxy-port"
                },
                source,
            },
            other => DemoError::Setup(other.to_string()),
        })?;

    let started = Instant::now();
    let started_ms = now_ms();
    let degrade_at = started + options.degrade_after;
    let degrade_ms = started_ms + options.degrade_after.as_millis() as u64;
    let baseline = arms::Arm::new("baseline", None);
    let canary = arms::Arm::new("canary", Some(degrade_at));
    let (arms_stop, arms_shutdown) = shutdown::channel();
    arms::spawn(baseline.clone(), baseline_listener, arms_shutdown.clone());
    arms::spawn(canary.clone(), canary_listener, arms_shutdown);

    let proxy = format!("http://{}", running.proxy_addr);
    let admin = format!("http://{}", running.admin_addr);
    let window = running.app.config().rules.window.0.as_secs();
    println!(
        "driftguard demo: baseline {BASELINE_WEIGHT} % / canary {CANARY_WEIGHT} %, {} req/s for up to {} s; \
         the canary goes bad at t+{} s",
        options.rps,
        options.duration.as_secs(),
        secs(options.degrade_after)
    );
    println!("  proxy    {proxy}/v1/ask");
    println!("  admin    {admin}/status   {admin}/metrics");
    println!("  arms     baseline http://{baseline_addr}   canary http://{canary_addr}");
    println!(
        "  files    {} (driftguard.toml, driftguard.log, snapshots/)",
        dir.display()
    );
    println!(
        "each second: req/s, the baseline/canary split, then baseline/canary over the {window} s rule \
         window: p95 latency, p95 ΔS, mean coverage, 5xx share; the guard state"
    );

    let load = load::Load::start(proxy.clone(), options.rps, options.concurrency);
    let counts = load.counts.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = Snapshot::take(&counts);
    let mut degraded_shown = false;
    let mut guard = GuardState::Healthy;
    let mut trip: Option<Trip> = None;
    let mut at_trip: Option<(Duration, Snapshot)> = None;
    let mut interrupted = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => {
                interrupted = true;
                break;
            }
        }
        let now = Instant::now();
        let elapsed = now - started;
        if !degraded_shown && now >= degrade_at {
            degraded_shown = true;
            println!(
                "t+{:>5.1}s  >> the canary goes bad: off-topic answers for {} in 10 questions, a 500 for 1 in {}",
                secs(options.degrade_after),
                arms::OFF_TOPIC_PER_10,
                arms::FAIL_EVERY
            );
        }
        let snap = Snapshot::take(&counts);
        let status = running.app.status();
        let state = running.engine.control().runtime_state();
        if state.guard.state != guard {
            match (&trip, state.guard.state, &state.guard.last_trip) {
                (None, GuardState::Tripped, Some(t)) => {
                    at_trip = Some((elapsed, snap));
                    trip = Some(t.clone());
                    println!(
                        "t+{:>5.1}s  >> TRIPPED by rule {} on arm {}: observed {} → lever {}: {}",
                        (t.at_ms.saturating_sub(started_ms)) as f64 / 1e3,
                        t.rule,
                        t.arm,
                        observed_text(t),
                        t.lever,
                        t.action
                    );
                }
                _ => println!(
                    "t+{:>5.1}s  >> guard {} → {}",
                    Duration::from_millis(state.guard.since_ms.saturating_sub(started_ms))
                        .as_secs_f64(),
                    guard.as_str(),
                    state.guard.state.as_str()
                ),
            }
            guard = state.guard.state;
        }
        println!("{}", progress_line(elapsed, &last, &snap, &status, guard));
        last = snap;
        if elapsed >= options.duration {
            break;
        }
        if let Some(t) = &trip {
            let since = Duration::from_millis(now_ms().saturating_sub(t.at_ms));
            if since >= POST_FLIP_MAX || (since >= POST_FLIP_MIN && guard == GuardState::Healthy) {
                break;
            }
        }
    }
    load.stop().await;
    // Let the requests in flight finish so the counts after the flip are whole.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let report = Report {
        trip: trip.as_ref(),
        degrade_ms,
        started_ms,
        first_bad_ms: canary.first_bad_ms.load(Ordering::Relaxed),
        at_trip: at_trip.as_ref(),
        end: &Snapshot::take(&counts),
        guard: running.engine.control().runtime_state().guard.state,
        state_dir: &dir,
        admin: &admin,
        interrupted,
    };
    println!("{}", report.render());
    let outcome = report.outcome();

    if options.keep && !interrupted {
        println!(
            "--keep: everything stays up until Ctrl-C. Try:\n  \
             curl -s {admin}/status\n  \
             curl -s {admin}/metrics | grep driftguard_trips_total\n  \
             curl -s {proxy}/v1/ask -H 'content-type: application/json' -d '{{\"question\": \"{}\"}}'\n  \
             driftguard status --admin {admin}",
            kb::TOPICS[0].question
        );
        wait_for_stop().await;
    }
    running.stop().await;
    arms_stop.fire();
    Ok(outcome)
}

/// Ctrl-C or SIGTERM.
async fn wait_for_stop() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The load generator's counts at one moment.
#[derive(Clone, Copy)]
struct Snapshot {
    done: u64,
    baseline: u64,
    canary: u64,
    errors: u64,
    frozen_writes: u64,
    failed: u64,
}

impl Snapshot {
    fn take(c: &load::Counts) -> Snapshot {
        Snapshot {
            done: c.done.load(Ordering::Relaxed),
            baseline: c.baseline.load(Ordering::Relaxed),
            canary: c.canary.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            frozen_writes: c.frozen_writes.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }
}

/// One arm's figures from the `/status` document.
fn arm_json<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["arms"]
        .as_array()
        .and_then(|arms| arms.iter().find(|a| a["name"] == name))
        .unwrap_or(&Value::Null)
}

/// `a/b` of one figure of both arms, `-` where there is none yet.
fn pair(status: &Value, pointer: &str, fmt: impl Fn(f64) -> String) -> String {
    let one = |arm: &str| {
        arm_json(status, arm)
            .pointer(pointer)
            .and_then(Value::as_f64)
            .map_or("-".to_string(), &fmt)
    };
    format!("{}/{}", one("baseline"), one("canary"))
}

fn progress_line(
    elapsed: Duration,
    last: &Snapshot,
    now: &Snapshot,
    status: &Value,
    guard: GuardState,
) -> String {
    let done = now.done - last.done;
    let (b, c) = (now.baseline - last.baseline, now.canary - last.canary);
    let split = match b + c {
        0 => "-/-".to_string(),
        n => format!("{}/{}", b * 100 / n, c * 100 / n),
    };
    let weights = pair(status, "/weight", |w| format!("{w:.0}"));
    let mut line = format!(
        "t+{:>3}s  {done:>4} req/s  split {split:>5}  p95 {:>9} ms  ΔS p95 {:>9}  cov {:>9}  5xx {:>11}  weights {weights}  guard {}",
        elapsed.as_secs(),
        pair(status, "/window/latency_ms/p95", |v| format!("{v:.0}")),
        pair(status, "/window/signals/delta_s/p95", |v| format!("{v:.2}")),
        pair(status, "/window/signals/coverage_mean", |v| format!("{v:.2}")),
        pair(status, "/window/error_rate", |v| format!("{:.1}%", v * 100.0)),
        guard.as_str(),
    );
    let frozen = now.frozen_writes - last.frozen_writes;
    if frozen > 0 {
        let _ = write!(line, "  ({frozen} writes refused: frozen)");
    }
    line
}

/// "0.5123 < threshold 0.60 (baseline 0.93)".
fn observed_text(t: &Trip) -> String {
    let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    let side = if t.rule == "coverage" { "<" } else { ">" };
    let mut s = format!(
        "{} {side} threshold {}",
        num(t.observed),
        t.threshold.map_or("-".to_string(), |v| format!("{v}"))
    );
    if let Some(b) = t.baseline_value {
        let _ = write!(s, " (baseline {b:.4})");
    }
    s
}

/// The rules that watch answer quality (the others watch errors, latency, pins, tools, writes).
pub const QUALITY_RULES: [&str; 4] = [
    "delta_s_p95_drift",
    "delta_s_p50_drift",
    "coverage",
    "lambda_flip_rate",
];

struct Report<'a> {
    trip: Option<&'a Trip>,
    degrade_ms: u64,
    started_ms: u64,
    first_bad_ms: u64,
    /// When the progress first showed the trip, and the counts then.
    at_trip: Option<&'a (Duration, Snapshot)>,
    end: &'a Snapshot,
    guard: GuardState,
    state_dir: &'a Path,
    admin: &'a str,
    interrupted: bool,
}

impl Report<'_> {
    fn outcome(&self) -> Outcome {
        match self.trip {
            Some(t) if t.at_ms >= self.degrade_ms => Outcome::Tripped,
            _ => Outcome::NotTripped,
        }
    }

    fn render(&self) -> String {
        let t_plus = |ms: u64| format!("t+{:.2}s", ms.saturating_sub(self.started_ms) as f64 / 1e3);
        let mut out = String::from("\n== driftguard demo: report ==\n");
        match self.trip {
            None => {
                let _ = writeln!(
                    out,
                    "nothing tripped{} — the canary {} went bad at {}",
                    if self.interrupted {
                        " before the demo was interrupted"
                    } else {
                        " by the end of the run"
                    },
                    if self.first_bad_ms > 0 { "" } else { "never" },
                    t_plus(self.degrade_ms)
                );
            }
            Some(t) => {
                let kind = if QUALITY_RULES.contains(&t.rule.as_str()) {
                    "quality"
                } else {
                    "health"
                };
                if t.at_ms < self.degrade_ms {
                    let _ = writeln!(
                        out,
                        "tripped BEFORE the canary went bad (a false alarm): rule {} at {}",
                        t.rule,
                        t_plus(t.at_ms)
                    );
                } else {
                    let _ = writeln!(
                        out,
                        "tripped:        rule {} ({kind}) on arm {}, {:.2} s after the canary went bad (at {})",
                        t.rule,
                        t.arm,
                        (t.at_ms - self.degrade_ms) as f64 / 1e3,
                        t_plus(t.at_ms)
                    );
                }
                if self.first_bad_ms > 0 {
                    let _ = writeln!(
                        out,
                        "time to flip:   {:.2} s from the first bad response ({}) to the flip",
                        t.at_ms.saturating_sub(self.first_bad_ms) as f64 / 1e3,
                        t_plus(self.first_bad_ms)
                    );
                }
                let _ = writeln!(
                    out,
                    "{:16}{} over the {} s window{}",
                    "observed:",
                    observed_text(t),
                    t.window_seconds,
                    t.p_value
                        .map_or(String::new(), |p| format!(", p = {p:.2e}"))
                );
                let _ = writeln!(out, "{:16}{} — {}", "lever:", t.lever, t.action);
                if let Some(id) = &t.snapshot {
                    let path = snapshot_dir(self.state_dir).join(format!("{id}.json"));
                    let _ = writeln!(out, "{:16}{}", "snapshot:", path.display());
                }
                if let Some((seen, at)) = self.at_trip {
                    let _ = writeln!(
                        out,
                        "{:16}baseline {} requests, canary {}, 5xx {}, writes refused while frozen {}",
                        format!("from t+{}s on:", seen.as_secs()),
                        self.end.baseline - at.baseline,
                        self.end.canary - at.canary,
                        self.end.errors - at.errors,
                        self.end.frozen_writes - at.frozen_writes,
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "{:16}{} requests answered, {} 5xx, {} without an answer",
            "traffic:", self.end.done, self.end.errors, self.end.failed
        );
        let _ = writeln!(out, "{:16}{}", "guard now:", self.guard.as_str());
        let _ = writeln!(out, "{:16}{}/metrics", "metrics:", self.admin);
        let _ = writeln!(out, "{:16}{}/status", "status:", self.admin);
        let _ = write!(
            out,
            "{:16}{} (driftguard.toml, driftguard.log)",
            "files:",
            self.state_dir.display()
        );
        out
    }
}
