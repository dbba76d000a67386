//! `driftguard demo`: the whole loop on this machine, in one process. Two demo RAG arms ([`arms`])
//! answer from a built-in knowledge base ([`kb`]); driftguard itself serves in front of them with a
//! generated config (baseline 80 / canary 20, a 10 s rule window judged every second); a paced load
//! generator ([`load`]) sends questions through the proxy. After `degrade_after` the canary starts
//! answering off-topic (and now and then with a 500); the progress lines show the canary's ΔS and
//! coverage move, the guard trip, the canary's weight go to 0 and the guard recover; a short report says
//! which rule tripped, how fast, what it did, and where the snapshot is (`report`). With `--replicas N`
//! the same runs as a fleet of N replicas sharing a Redis ([`fleet`]): the fleet trips once and every
//! replica flips together.

pub mod arms;
mod fleet;
pub mod kb;
pub mod load;
mod report;

pub use report::QUALITY_RULES;
use report::{observed_text, progress_line, Report, Snapshot};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use crate::clock::now_ms;
use crate::cmd::run::{RunError, Running};
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
    /// Replicas of driftguard in front of the arms; more than one runs them as a fleet on Redis.
    pub replicas: usize,
    /// The fleet's Redis; default: a redis-server of the demo's own on a free port.
    pub redis_url: Option<String>,
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

/// `driftguard demo`: exit 0 when a rule tripped on the bad canary, 1 when nothing did, 2 when the demo
/// cannot start (a port taken, …).
pub fn main(options: &Options) -> ExitCode {
    match run(options) {
        Ok(Outcome::Tripped) => ExitCode::SUCCESS,
        Ok(Outcome::NotTripped) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("driftguard demo: {e}");
            ExitCode::from(2)
        }
    }
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
fn config_text(
    dir: &Path,
    (proxy, admin): (u16, u16),
    baseline: SocketAddr,
    canary: SocketAddr,
    fleet: &str,
) -> String {
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
{fleet}"#,
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

    let redis = match options.replicas {
        0 | 1 => None,
        _ => Some(fleet::Redis::start(options.redis_url.as_deref(), &dir).await?),
    };
    let key = format!("driftguard:fleet:demo-{}-{}", std::process::id(), now_ms());
    let result = serve(
        &dir,
        options,
        (baseline_addr, canary_addr),
        redis.as_ref(),
        &key,
    )
    .await;
    let replicas = match result {
        Ok(r) => r,
        Err(e) => {
            if let Some(redis) = redis {
                redis.stop().await;
            }
            return Err(e);
        }
    };
    let outcome = demo_with(
        &dir,
        options,
        (baseline_listener, canary_listener),
        (baseline_addr, canary_addr),
        &replicas,
        redis.as_ref().map(|r| (r.url.as_str(), key.as_str())),
    )
    .await;
    for (running, _) in replicas {
        running.stop().await;
    }
    if let Some(redis) = redis {
        redis.stop().await;
    }
    outcome
}

/// Starts the replicas (one, or `options.replicas` sharing `redis`), each with its config, runtime
/// state and snapshots in its own folder (`dir`, or `dir/replica-N`); one log for all.
async fn serve(
    dir: &Path,
    options: &Options,
    (baseline, canary): (SocketAddr, SocketAddr),
    redis: Option<&fleet::Redis>,
    key: &str,
) -> Result<Vec<(Running, PathBuf)>, DemoError> {
    let n = options.replicas.max(1);
    let log_path = dir.join("driftguard.log");
    let mut replicas: Vec<(Running, PathBuf)> = Vec::with_capacity(n);
    for i in 0..n {
        let (folder, section) = match redis {
            Some(redis) => (
                dir.join(fleet::replica_name(i + 1)),
                fleet::section(&redis.url, key, i + 1),
            ),
            None => (dir.to_path_buf(), String::new()),
        };
        std::fs::create_dir_all(&folder)
            .map_err(|e| DemoError::Setup(format!("cannot create {}: {e}", folder.display())))?;
        // Replica i listens on the given ports plus i (port 0 stays "any free port").
        let port = |p: u16, flag| match p {
            0 => Ok(0),
            p => p.checked_add(i as u16).ok_or_else(|| {
                DemoError::Setup(format!("{flag}: the replicas need {n} ports from {p}"))
            }),
        };
        let ports = (
            port(options.proxy_port, "--proxy-port")?,
            port(options.admin_port, "--admin-port")?,
        );
        let config_path = folder.join("driftguard.toml");
        std::fs::write(
            &config_path,
            config_text(&folder, ports, baseline, canary, &section),
        )
        .map_err(|e| DemoError::Setup(format!("cannot write {}: {e}", config_path.display())))?;
        let loaded = app::load(&config_path)
            .map_err(|e| DemoError::Setup(format!("the demo config is invalid:\n{e}")))?;
        if i == 0 {
            let log_file = std::fs::File::create(&log_path).map_err(|e| {
                DemoError::Setup(format!("cannot create {}: {e}", log_path.display()))
            })?;
            // The subscriber stays installed for the rest of the process.
            std::mem::forget(crate::telemetry::log::init_to(
                &loaded.config.log.level,
                Box::new(log_file),
            ));
        }
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
            });
        match running {
            Ok(r) => replicas.push((r, folder)),
            Err(e) => {
                for (r, _) in replicas {
                    r.stop().await;
                }
                return Err(e);
            }
        }
    }
    Ok(replicas)
}

/// The demo proper, once the replicas serve: arms, load, progress, report.
async fn demo_with(
    dir: &Path,
    options: &Options,
    (baseline_listener, canary_listener): (TcpListener, TcpListener),
    (baseline_addr, canary_addr): (SocketAddr, SocketAddr),
    replicas: &[(Running, PathBuf)],
    fleet_of: Option<(&str, &str)>,
) -> Result<Outcome, DemoError> {
    let running = &replicas[0].0;
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
    if let Some((url, key)) = fleet_of {
        let others: Vec<String> = replicas[1..]
            .iter()
            .map(|(r, _)| format!("{} (admin {})", r.proxy_addr, r.admin_addr))
            .collect();
        println!(
            "  fleet    {} replicas on {url} (key {key}); the others: {}; the load goes round-robin",
            replicas.len(),
            others.join(", ")
        );
    }
    println!("  arms     baseline http://{baseline_addr}   canary http://{canary_addr}");
    println!(
        "  files    {} (driftguard.toml, driftguard.log, snapshots/)",
        dir.display()
    );
    println!(
        "each second: req/s, the baseline/canary split, then baseline/canary over the {window} s rule \
         window: p95 latency, p95 ΔS, mean coverage, 5xx share; the guard state"
    );

    let proxies = replicas
        .iter()
        .map(|(r, _)| format!("http://{}", r.proxy_addr))
        .collect();
    let load = load::Load::start(proxies, options.rps, options.concurrency);
    let flips = (replicas.len() > 1).then(|| {
        let running: Vec<&Running> = replicas.iter().map(|(r, _)| r).collect();
        fleet::Flips::watch(&running)
    });
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
        let status = crate::admin::status::app(&running.app);
        let state = running.engine.control().runtime_state();
        // A trip shows by its record, not by the state at this tick: a tripped guard can be
        // recovering again before the next one.
        let new_trip = match (&trip, &state.guard.last_trip) {
            (None, Some(t)) if t.at_ms >= started_ms => Some(t.clone()),
            _ => None,
        };
        if let Some(t) = new_trip {
            at_trip = Some((elapsed, snap));
            println!(
                "t+{:>5.1}s  >> TRIPPED by rule {} on arm {}: observed {} → lever {}: {}",
                (t.at_ms.saturating_sub(started_ms)) as f64 / 1e3,
                t.rule,
                t.arm,
                observed_text(&t),
                t.lever,
                t.action
            );
            trip = Some(t);
            guard = GuardState::Tripped;
        }
        if state.guard.state != guard {
            println!(
                "t+{:>5.1}s  >> guard {} → {}",
                Duration::from_millis(state.guard.since_ms.saturating_sub(started_ms))
                    .as_secs_f64(),
                guard.as_str(),
                state.guard.state.as_str()
            );
            guard = state.guard.state;
        }
        let mut line = progress_line(elapsed, &last, &snap, &status, guard);
        if let Some(flips) = &flips {
            line.push_str(&format!("  flipped {}/{}", flips.tripped(), replicas.len()));
        }
        println!("{line}");
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

    let dirs: Vec<PathBuf> = replicas.iter().map(|(_, d)| d.clone()).collect();
    let fleet_report = match (flips, fleet_of) {
        (Some(flips), Some((redis_url, key))) => Some(fleet::FleetReport {
            replicas: &replicas.iter().map(|(r, _)| r).collect::<Vec<_>>(),
            dirs: &dirs,
            flips: flips.stop(),
            redis_url,
            key,
        }),
        _ => None,
    };
    // The snapshot is in the folder of the replica that won the trip.
    let snapshot_dir = fleet_report
        .as_ref()
        .and_then(|f| f.writers("tripped").first().map(|&i| dirs[i].clone()))
        .unwrap_or_else(|| dirs[0].clone());
    let report = Report {
        trip: trip.as_ref(),
        degrade_ms,
        started_ms,
        first_bad_ms: canary.first_bad_ms.load(Ordering::Relaxed),
        at_trip: at_trip.as_ref(),
        end: &Snapshot::take(&counts),
        shown: &last,
        keep: options.keep && !interrupted,
        guard: running.engine.control().runtime_state().guard.state,
        state_dir: &snapshot_dir,
        admin: &admin,
        interrupted,
    };
    println!("{}", report.render());
    let mut outcome = report.outcome();
    if let Some(f) = &fleet_report {
        print!("{}", f.render());
        if !f.consistent() {
            outcome = Outcome::NotTripped;
        }
    }

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
