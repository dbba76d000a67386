//! What `[fleet]` costs and how fast it flips (the fleet issue's two targets), measured against a private
//! redis-server this binary starts on a free loopback port and stops at the end.
//!
//! 1. **Redis cost per replica per interval.** N in-process [`Fleet`]s (N = 3, then 50), each with its own
//!    two arms ("baseline" 80 % / "canary" 20 %) fed through the arms' real write API at 20 requests/s per
//!    replica (1 % 5xx, log-normal latency, every 2xx evaluated: ΔS, coverage, λ), call [`Fleet::sync`] once
//!    per replica per 1 s interval, as the engine does every `rules.eval_interval`. A warm-up interval
//!    connects, loads the script and puts a full rule window (60 s) of traffic in Redis, so the merged
//!    window read back is as large as in steady state. Over the measured intervals the server's own
//!    counters are read on a raw connection of its own — `INFO stats` (total_net_input_bytes,
//!    total_net_output_bytes) and `INFO commandstats` (calls, usec) — with the INFO exchanges' exact bytes
//!    subtracted, and divided by replicas × intervals. "Commands sent" are the commands the replicas put
//!    on the wire; "run in Redis" adds those the sync script runs inside Redis (commandstats counts both).
//!    Also shown: Redis CPU per sync (EVALSHA's commandstats usec, the script's own commands included),
//!    the client-side sync time, and how many fields the merged window read back has. Checked on the
//!    way: the last sync's merged window holds every request recorded, and every replica's heartbeat.
//!    Targets: ≤ 3 commands sent per replica per interval; bytes per replica per interval do not grow
//!    with the number of replicas (N = 50 within 10 % of N = 3). Any sync error makes the run INVALID.
//! 2. **Trip → every replica flipped.** Three real driftguard processes (the release binary cargo builds
//!    for this bench) share one fleet key; their upstreams are closed ports (a manual trip needs no
//!    traffic). Ten times, rotating the replica: `POST /trip`, then every replica's `GET /status` every
//!    5 ms until each shows guard.state "tripped" and canary weight 0. Reported: the time from the trip's
//!    HTTP response to the last replica seen flipped, the time from the winning transition
//!    (guard.since_ms) to that sighting (an upper bound: the sighting is the poll's response), and the
//!    spread of guard.since_ms across replicas (0 when all adopted the winner's state). Then
//!    `POST /recover`, wait until all are healthy, and put the canary's weight back on each replica
//!    (recovery keeps traffic rolled back). Target: all replicas flipped ≤ 1 s after the winning
//!    transition. A replica not flipped (or not healthy again) within 10 s makes the run INVALID.
//!
//! `cargo bench --bench fleet` (loopback only; about a minute). Exit status 1 when INVALID.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{admin_post, client, closed_port_url, get, HttpClient, Proxy, RedisServer, LISTEN};
use driftguard::config;
use driftguard::fleet::Fleet;
use driftguard::telemetry::metrics::Metrics;
use driftguard::windows::{ArmStats, Evaluation, NoMirror};
use serde_json::Value;

// Part 1: the simulated fleet.
/// (replicas, fleet requests per second): 3 and 50 replicas at the same rate each, then 50 at the
/// 3-replica fleet's rate (what the replica count alone does to the bytes).
const RUNS: [(usize, u64); 3] = [(3, 3 * RATE), (50, 50 * RATE), (50, 3 * RATE)];
const INTERVALS: u32 = 20;
const INTERVAL: Duration = Duration::from_secs(1);
/// The rule window (`rules.window` default).
const WINDOW: Duration = Duration::from_secs(60);
/// Requests per second per replica, and the canary's share of them.
const RATE: u64 = 20;
const CANARY_SHARE: f64 = 0.2;
/// Commands the sync script runs inside Redis (src/fleet/sync.lua): counted apart from those sent.
const SCRIPT_COMMANDS: [&str; 11] = [
    "hget",
    "hset",
    "hincrby",
    "pexpire",
    "zadd",
    "zremrangebyscore",
    "hgetall",
    "sadd",
    "smembers",
    "hmget",
    "zcard",
];
const MAX_COMMANDS_SENT: f64 = 3.0;
/// How much more a replica may send or receive per interval at 50 replicas than at 3.
const GROWTH_TOLERANCE: f64 = 0.10;

// Part 2: the real processes.
const PROCESSES: usize = 3;
const TRIPS: usize = 10;
const POLL: Duration = Duration::from_millis(5);
const FLIP_LIMIT: Duration = Duration::from_secs(10);
const FLIP_TARGET_MS: f64 = 1000.0;
const CANARY_WEIGHT: u64 = 20;

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: only run when benched.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let valid = match run() {
        Ok(valid) => valid,
        Err(e) => {
            println!("INVALID: {e}");
            false
        }
    };
    // Everything started (redis-server, driftguard processes) was dropped, so stopped, inside `run`.
    std::process::exit(if valid { 0 } else { 1 });
}

/// Both parts; false when the run is INVALID.
fn run() -> Result<bool, String> {
    if !common::runs("redis-server", "--version") {
        return Err("redis-server is not installed (apt-get install redis-server)".into());
    }
    let redis = RedisServer::start();
    println!(
        "redis-server on 127.0.0.1:{} (persistence off)\n",
        redis.port
    );
    let cost_valid = redis_cost(&redis)?;
    println!();
    let flip_valid = flips(&redis)?;
    Ok(cost_valid && flip_valid)
}

// ================================================================================================
// Part 1: Redis cost per replica per interval
// ================================================================================================

/// One simulated replica: its fleet link and its two arms.
struct Replica {
    fleet: Fleet,
    baseline: ArmStats,
    canary: ArmStats,
}

/// What one N-replica run measured, per replica per interval.
struct Cost {
    replicas: usize,
    /// Requests per second over the whole fleet.
    fleet_rate: u64,
    sent: f64,
    sent_by_command: BTreeMap<String, f64>,
    in_redis: f64,
    script_by_command: BTreeMap<String, f64>,
    bytes_to_redis: f64,
    bytes_from_redis: f64,
    /// Redis CPU per script call (EVALSHA's usec, the script's own commands included).
    redis_usec_per_sync: f64,
    sync_ms_p50: f64,
    sync_ms_max: f64,
    /// Fields of the merged window read back (both arms), at the last interval.
    merged_fields: usize,
    errors: u64,
}

fn redis_cost(redis: &RedisServer) -> Result<bool, String> {
    let mut info = InfoConn::open(redis.port)?;
    let (in_residual, out_residual) = info.check_accounting()?;
    println!(
        "== Redis cost per replica per interval ({INTERVALS} intervals of {}s, {RATE} req/s per replica or \
         the fleet rate given, {}s rule window) ==",
        INTERVAL.as_secs(),
        WINDOW.as_secs()
    );
    println!(
        "INFO accounting check (two back-to-back INFO, their own bytes subtracted): residual {in_residual} B in, \
         {out_residual} B out"
    );
    let mut costs = Vec::new();
    for (n, fleet_rate) in RUNS {
        costs.push(measure(redis, &mut info, n, fleet_rate)?);
    }
    println!(
        "{:>8} | {:>10} | {:>13} | {:>13} | {:>14} | {:>16} | {:>13} | {:>15} | {:>13}",
        "replicas",
        "fleet rps",
        "commands sent",
        "run in Redis",
        "bytes to Redis",
        "bytes from Redis",
        "Redis µs/sync",
        "sync ms p50/max",
        "merged fields"
    );
    for c in &costs {
        println!(
            "{:>8} | {:>10} | {:>13.2} | {:>13.1} | {:>14.0} | {:>16.0} | {:>13.0} | {:>15} | {:>13}",
            c.replicas,
            c.fleet_rate,
            c.sent,
            c.in_redis,
            c.bytes_to_redis,
            c.bytes_from_redis,
            c.redis_usec_per_sync,
            format!("{:.2}/{:.2}", c.sync_ms_p50, c.sync_ms_max),
            c.merged_fields
        );
    }
    for c in &costs {
        let parts: Vec<String> = c
            .sent_by_command
            .iter()
            .map(|(name, per)| format!("{name} {per:.2}"))
            .collect();
        println!(
            "  N={} @ {} req/s: commands sent: {}",
            c.replicas,
            c.fleet_rate,
            parts.join(", ")
        );
        let parts: Vec<String> = c
            .script_by_command
            .iter()
            .map(|(name, per)| format!("{name} {per:.2}"))
            .collect();
        println!(
            "  N={} @ {} req/s: run by the script: {}",
            c.replicas,
            c.fleet_rate,
            parts.join(", ")
        );
    }
    let worst_sent = costs.iter().map(|c| c.sent).fold(0.0, f64::max);
    println!(
        "target ≤ {MAX_COMMANDS_SENT} commands per replica per interval: {} → {}",
        costs
            .iter()
            .map(|c| format!("N={} {:.2}", c.replicas, c.sent))
            .collect::<Vec<_>>()
            .join(", "),
        pass(worst_sent <= MAX_COMMANDS_SENT)
    );
    // Growth with the replica count alone: 3 → 50 replicas at the same rate each (what each replica
    // sends), and at the same fleet traffic (what each replica reads back: the merged window).
    let (few, many, many_same_traffic) = (&costs[0], &costs[1], &costs[2]);
    let mut ok = worst_sent <= MAX_COMMANDS_SENT;
    for (what, a, b) in [
        ("bytes to Redis", few, many),
        ("bytes from Redis", few, many_same_traffic),
    ] {
        let bytes = |c: &Cost| {
            if what == "bytes to Redis" {
                c.bytes_to_redis
            } else {
                c.bytes_from_redis
            }
        };
        let growth = bytes(b) / bytes(a) - 1.0;
        ok &= growth <= GROWTH_TOLERANCE;
        println!(
            "target {what} per replica per interval do not grow with replicas: N={} @ {} req/s {:.0} → \
             N={} @ {} req/s {:.0} ({:+.1} %, tolerance {:.0} %) → {}",
            a.replicas,
            a.fleet_rate,
            bytes(a),
            b.replicas,
            b.fleet_rate,
            bytes(b),
            growth * 100.0,
            GROWTH_TOLERANCE * 100.0,
            pass(growth <= GROWTH_TOLERANCE)
        );
    }
    println!(
        "  with the fleet's traffic (N={} @ {} req/s → N={} @ {} req/s, {:.1}× the samples) the merged \
         window fills more of its coarse buckets: bytes from Redis {:.0} → {:.0} ({:+.1} %), merged fields \
         {} → {}, {:.1} bytes per field; the layout bounds it (no target)",
        few.replicas,
        few.fleet_rate,
        many.replicas,
        many.fleet_rate,
        many.fleet_rate as f64 / few.fleet_rate as f64,
        few.bytes_from_redis,
        many.bytes_from_redis,
        (many.bytes_from_redis / few.bytes_from_redis - 1.0) * 100.0,
        few.merged_fields,
        many.merged_fields,
        many.bytes_from_redis / many.merged_fields.max(1) as f64
    );
    let errors: u64 = costs.iter().map(|c| c.errors).sum();
    if errors > 0 {
        println!("INVALID: {errors} sync calls returned an error or a merged window lost counts");
    }
    Ok(errors == 0 && ok)
}

fn measure(
    redis: &RedisServer,
    info: &mut InfoConn,
    n: usize,
    fleet_rate: u64,
) -> Result<Cost, String> {
    let origin = Instant::now();
    let mut rng = fastrand::Rng::with_seed(n as u64);
    let key = format!("driftguard:bench:fleet:n{n}r{fleet_rate}");
    // Replica i's share of `total` fleet requests (the shares add up to `total` exactly).
    let share = |total: u64, i: usize| {
        let (i, n) = (i as u64, n as u64);
        total * (i + 1) / n - total * i / n
    };
    let replicas: Vec<Replica> = (0..n)
        .map(|i| {
            let settings = config::Fleet {
                redis_url: redis.url(),
                key: key.clone(),
                replica: format!("r{i}"),
                ..Default::default()
            };
            Ok(Replica {
                fleet: Fleet::new(&settings, &Metrics::new()).map_err(|e| e.to_string())?,
                baseline: ArmStats::new("baseline", origin, Box::new(NoMirror)),
                canary: ArmStats::new("canary", origin, Box::new(NoMirror)),
            })
        })
        .collect::<Result<_, String>>()?;
    let mut errors = 0u64;
    let mut recorded = 0u64;
    let mut sync_ms = Vec::new();
    let mut last = None;
    // Warm-up (not measured): connect, load the script, and a full rule window of traffic in Redis.
    for (i, r) in replicas.iter().enumerate() {
        recorded += traffic(
            r,
            &mut rng,
            Instant::now(),
            share(fleet_rate * WINDOW.as_secs(), i),
        );
        if let Err(e) = sync(r) {
            errors += 1;
            println!("  N={n} warm-up sync of {} failed: {e}", r.fleet.replica());
        }
    }
    let before = info.snapshot()?;
    let start = Instant::now();
    for i in 1..=INTERVALS {
        let tick = start + INTERVAL * i;
        std::thread::sleep(tick.saturating_duration_since(Instant::now()));
        for (i, r) in replicas.iter().enumerate() {
            recorded += traffic(
                r,
                &mut rng,
                Instant::now(),
                share(fleet_rate * INTERVAL.as_secs(), i),
            );
        }
        for r in &replicas {
            let t = Instant::now();
            match sync(r) {
                Ok(synced) => last = Some(synced),
                Err(e) => {
                    errors += 1;
                    println!("  N={n} sync of {} failed: {e}", r.fleet.replica());
                }
            }
            sync_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let after = info.snapshot()?;
    let per = (n as f64) * f64::from(INTERVALS);
    let delta = |name: &str| {
        let (a, b) = (after.calls(name), before.calls(name));
        (a.0 - b.0, a.1 - b.1)
    };
    let (mut sent_by_command, mut script_by_command) = (BTreeMap::new(), BTreeMap::new());
    let (mut sent, mut in_redis) = (0u64, 0u64);
    for name in after.calls.keys().filter(|k| *k != "info") {
        let (calls, _) = delta(name);
        if calls == 0 {
            continue;
        }
        in_redis += calls;
        if SCRIPT_COMMANDS.contains(&name.as_str()) {
            script_by_command.insert(name.clone(), calls as f64 / per);
        } else {
            sent += calls;
            sent_by_command.insert(name.clone(), calls as f64 / per);
        }
    }
    let (evalsha_calls, evalsha_usec) = delta("evalsha");
    // What the INFO exchanges themselves added between the two snapshots (see `InfoConn`).
    let bytes_to_redis = after.net_in - before.net_in - after.request_bytes;
    let bytes_from_redis = after.net_out - before.net_out - before.reply_bytes;
    sync_ms.sort_by(f64::total_cmp);
    // The last sync saw every replica's pushes: its merged window must hold every request recorded
    // (all of them fall inside the rule window), and every replica's heartbeat.
    let last = last.ok_or("no sync succeeded")?;
    let merged_requests: u64 = last.arms.values().map(|s| s.requests).sum();
    let merged_fields: usize = last
        .arms
        .values()
        .map(|s| {
            s.delta_s.len()
                + s.coverage.len()
                + s.latency.len()
                + [s.requests, s.errors_5xx, s.evaluated, s.lambda_flips]
                    .iter()
                    .filter(|v| **v > 0)
                    .count()
        })
        .sum();
    println!(
        "  N={n} @ {fleet_rate} req/s: merged window holds {merged_requests} requests (recorded: {recorded}) {}, replicas alive {} {}",
        if merged_requests == recorded { "ok" } else { "MISMATCH" },
        last.replicas,
        if last.replicas == n as u64 { "ok" } else { "MISMATCH" },
    );
    if merged_requests != recorded || last.replicas != n as u64 {
        errors += 1;
    }
    Ok(Cost {
        replicas: n,
        fleet_rate,
        sent: sent as f64 / per,
        sent_by_command,
        in_redis: in_redis as f64 / per,
        script_by_command,
        bytes_to_redis: bytes_to_redis as f64 / per,
        bytes_from_redis: bytes_from_redis as f64 / per,
        redis_usec_per_sync: evalsha_usec as f64 / evalsha_calls.max(1) as f64,
        sync_ms_p50: sync_ms[sync_ms.len() / 2],
        sync_ms_max: sync_ms[sync_ms.len() - 1],
        merged_fields,
        errors,
    })
}

fn sync(r: &Replica) -> Result<driftguard::fleet::Synced, driftguard::fleet::FleetError> {
    r.fleet.sync(
        &[
            ("baseline", &r.baseline.window),
            ("canary", &r.canary.window),
        ],
        Instant::now(),
        WINDOW,
    )
}

/// Records `requests` requests at `at` on a replica's arms, as the proxy and the evaluation workers do;
/// returns how many were recorded.
fn traffic(r: &Replica, rng: &mut fastrand::Rng, at: Instant, requests: u64) -> u64 {
    let clamp = |v: f64| v.clamp(0.0, 1.0);
    for _ in 0..requests {
        let arm = if rng.f64() < CANARY_SHARE {
            &r.canary
        } else {
            &r.baseline
        };
        let status = if rng.f64() < 0.01 { 503 } else { 200 };
        arm.response(at, status);
        // Log-normal latency: median 250 ms, σ 0.6 (p99 ≈ 1 s).
        let latency_ms = (250f64.ln() + 0.6 * normal(rng)).exp();
        arm.first_byte(at, Duration::from_secs_f64(latency_ms * 0.3 / 1e3));
        arm.completed(at, Duration::from_secs_f64(latency_ms / 1e3));
        if status == 200 {
            let qr = clamp(0.30 + 0.08 * normal(rng));
            let ra = clamp(0.25 + 0.08 * normal(rng));
            let lambda = match rng.f64() {
                x if x < 0.95 => 0,
                x if x < 0.98 => 1,
                x if x < 0.995 => 2,
                _ => 3,
            };
            arm.evaluated(
                at,
                &Evaluation {
                    delta_s_qr: qr,
                    delta_s_ra: ra,
                    delta_s: qr.max(ra),
                    coverage: Some(clamp(0.8 + 0.1 * normal(rng))),
                    retrieval_coverage: Some(clamp(0.8 + 0.1 * normal(rng))),
                    lambda,
                },
            );
            arm.usage(at, Some(400), Some(60), false);
        }
    }
    requests
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut fastrand::Rng) -> f64 {
    let u = rng.f64().max(f64::MIN_POSITIVE);
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * rng.f64()).cos()
}

/// A raw RESP2 connection for `INFO stats commandstats`, counting its own bytes exactly.
///
/// Redis counts a request's bytes when it reads them (before running it) and a reply's when it writes
/// them (after the numbers in it were taken). So between snapshot A and the next snapshot B the server's
/// counters include, besides everyone else's traffic, B's request (input) and A's reply (output) — the
/// two amounts subtracted — and INFO's own calls, which the cost leaves out by name.
struct InfoConn {
    reader: BufReader<TcpStream>,
}

struct InfoSnapshot {
    net_in: u64,
    net_out: u64,
    /// Command name → (calls, usec).
    calls: BTreeMap<String, (u64, u64)>,
    /// Bytes of the INFO request that produced this snapshot, and of its reply.
    request_bytes: u64,
    reply_bytes: u64,
}

impl InfoSnapshot {
    fn calls(&self, name: &str) -> (u64, u64) {
        self.calls.get(name).copied().unwrap_or((0, 0))
    }
}

impl InfoConn {
    const REQUEST: &'static [u8] = b"*3\r\n$4\r\nINFO\r\n$5\r\nstats\r\n$12\r\ncommandstats\r\n";

    fn open(port: u16) -> Result<InfoConn, String> {
        let stream =
            TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("INFO connection: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        Ok(InfoConn {
            reader: BufReader::new(stream),
        })
    }

    fn snapshot(&mut self) -> Result<InfoSnapshot, String> {
        let io = |e: std::io::Error| format!("INFO: {e}");
        self.reader.get_mut().write_all(Self::REQUEST).map_err(io)?;
        let mut header = String::new();
        self.reader.read_line(&mut header).map_err(io)?;
        let len: usize = header
            .strip_prefix('$')
            .and_then(|h| h.trim_end().parse().ok())
            .ok_or_else(|| format!("INFO: unexpected reply {header:?}"))?;
        let mut body = vec![0u8; len + 2];
        self.reader.read_exact(&mut body).map_err(io)?;
        let text = String::from_utf8_lossy(&body[..len]);
        let mut snap = InfoSnapshot {
            net_in: 0,
            net_out: 0,
            calls: BTreeMap::new(),
            request_bytes: Self::REQUEST.len() as u64,
            reply_bytes: (header.len() + len + 2) as u64,
        };
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("total_net_input_bytes:") {
                snap.net_in = v.trim().parse().map_err(|_| format!("INFO: {line}"))?;
            } else if let Some(v) = line.strip_prefix("total_net_output_bytes:") {
                snap.net_out = v.trim().parse().map_err(|_| format!("INFO: {line}"))?;
            } else if let Some((name, rest)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            {
                let field = |key: &str| {
                    rest.split(',')
                        .find_map(|kv| kv.strip_prefix(key))
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                // Subcommands appear as `cmdstat_script|load`.
                snap.calls
                    .insert(name.to_string(), (field("calls="), field("usec=")));
            }
        }
        Ok(snap)
    }

    /// Two snapshots with nothing in between: what is left after subtracting the INFO exchanges' own
    /// bytes must be 0 in and 0 out, or the cost figures would be off by it.
    fn check_accounting(&mut self) -> Result<(i64, i64), String> {
        let a = self.snapshot()?;
        let b = self.snapshot()?;
        Ok((
            b.net_in as i64 - a.net_in as i64 - b.request_bytes as i64,
            b.net_out as i64 - a.net_out as i64 - a.reply_bytes as i64,
        ))
    }
}

// ================================================================================================
// Part 2: trip → every replica flipped
// ================================================================================================

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One round's figures.
struct Round {
    tripped_on: usize,
    /// From the trip's HTTP response to the last replica seen flipped.
    after_response_ms: f64,
    /// From the winner's guard.since_ms to the last replica seen flipped (unix ms; an upper bound).
    after_transition_ms: u64,
    since_spread_ms: u64,
    generations: Vec<u64>,
    same_cache_epoch: bool,
}

fn flips(redis: &RedisServer) -> Result<bool, String> {
    println!(
        "== Trip → every replica flipped ({PROCESSES} driftguard processes, {TRIPS} trips, /status polled every {} ms) ==",
        POLL.as_millis()
    );
    let key = format!("driftguard:bench:fleet:flip-{}", std::process::id());
    let proxies: Vec<Proxy> = (0..PROCESSES)
        .map(|i| Proxy::start(&process_config(&redis.url(), &key, i)))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let result = runtime.block_on(rounds(&proxies));
    drop(proxies);
    let (rounds, failure) = result;
    println!(
        "{:>5} | {:>10} | {:>21} | {:>23} | {:>15} | {:>11} | {:>11}",
        "round",
        "tripped on",
        "response→last flip ms",
        "transition→last flip ms",
        "since_ms spread",
        "generations",
        "cache_epoch"
    );
    for (i, r) in rounds.iter().enumerate() {
        println!(
            "{:>5} | {:>10} | {:>21.1} | {:>23} | {:>15} | {:>11} | {:>11}",
            i + 1,
            format!("r{}", r.tripped_on),
            r.after_response_ms,
            r.after_transition_ms,
            r.since_spread_ms,
            format!("{:?}", r.generations).replace(' ', ""),
            if r.same_cache_epoch { "same" } else { "DIFFER" }
        );
    }
    let lagging = rounds
        .iter()
        .filter(|r| {
            r.generations
                .iter()
                .any(|g| *g != r.generations[r.tripped_on])
        })
        .count();
    if lagging > 0 {
        println!(
            "  note: in {lagging} round(s) a replica's /status already showed the flipped state with a \
             fleet.generation other than the winner's"
        );
    }
    if let Some(failure) = &failure {
        println!("INVALID: round {}: {failure}", rounds.len() + 1);
    }
    if rounds.is_empty() {
        return Ok(false);
    }
    let mut response: Vec<f64> = rounds.iter().map(|r| r.after_response_ms).collect();
    let mut transition: Vec<f64> = rounds
        .iter()
        .map(|r| r.after_transition_ms as f64)
        .collect();
    let mut spread: Vec<f64> = rounds.iter().map(|r| r.since_spread_ms as f64).collect();
    let (rm, rx) = median_max(&mut response);
    let (tm, tx) = median_max(&mut transition);
    let (sm, sx) = median_max(&mut spread);
    println!(
        "over {} trips: response→last flip median {rm:.1} ms, max {rx:.1} ms; transition→last flip median \
         {tm:.0} ms, max {tx:.0} ms; since_ms spread median {sm:.0} ms, max {sx:.0} ms",
        rounds.len()
    );
    println!(
        "target every replica flipped ≤ {FLIP_TARGET_MS:.0} ms after the winning transition: max {tx:.0} ms → {}",
        pass(tx <= FLIP_TARGET_MS && failure.is_none())
    );
    Ok(failure.is_none())
}

/// A replica of the bench's fleet: two arms on closed ports, rules every second, no recovery on its own.
fn process_config(redis_url: &str, key: &str, i: usize) -> String {
    format!(
        "{LISTEN}[log]\naccess = false\n[rules]\neval_interval = \"1s\"\n\
         [recovery]\nhold = \"1h\"\ndeadline = \"1h\"\n\
         [fleet]\nredis_url = \"{redis_url}\"\nkey = \"{key}\"\nreplica = \"r{i}\"\n\
         [[arms]]\nname = \"baseline\"\nupstream = \"{}\"\nweight = {}\nbaseline = true\n\
         [[arms]]\nname = \"canary\"\nupstream = \"{}\"\nweight = {CANARY_WEIGHT}\n",
        closed_port_url(),
        100 - CANARY_WEIGHT,
        closed_port_url(),
    )
}

/// The rounds run, and why the run stopped early, if it did.
async fn rounds(proxies: &[Proxy]) -> (Vec<Round>, Option<String>) {
    let client = client();
    let mut done = Vec::new();
    for round in 0..TRIPS {
        match one_round(&client, proxies, round % proxies.len()).await {
            Ok(r) => done.push(r),
            Err(e) => return (done, Some(e)),
        }
    }
    (done, None)
}

async fn one_round(client: &HttpClient, proxies: &[Proxy], who: usize) -> Result<Round, String> {
    // Every replica healthy with the canary serving before the trip.
    for p in proxies {
        let reply = admin_post(
            client,
            &p.admin_url("/arms/canary/weight"),
            &format!("{{\"weight\": {CANARY_WEIGHT}}}"),
            None,
        )
        .await;
        if reply.status != http::StatusCode::OK {
            return Err(format!("restoring the canary's weight: {}", reply.text()));
        }
    }
    let all = statuses(client, proxies).await;
    if let Some(i) = all.iter().position(|s| !healthy(s)) {
        return Err(format!("replica r{i} is not healthy before the trip"));
    }

    let reply = admin_post(
        client,
        &proxies[who].admin_url("/trip"),
        "{\"reason\": \"fleet bench\"}",
        None,
    )
    .await;
    let responded = Instant::now();
    if reply.status != http::StatusCode::OK || reply.json()["state"] != "tripped" {
        return Err(format!(
            "POST /trip on r{who}: {} {}",
            reply.status,
            reply.text()
        ));
    }
    let mut seen: Vec<Option<(Instant, u64, Value)>> = vec![None; proxies.len()];
    while seen.iter().any(Option::is_none) {
        if responded.elapsed() > FLIP_LIMIT {
            let missing: Vec<String> = (0..proxies.len())
                .filter(|i| seen[*i].is_none())
                .map(|i| format!("r{i}"))
                .collect();
            return Err(format!(
                "{} not flipped {}s after the trip on r{who}",
                missing.join(", "),
                FLIP_LIMIT.as_secs()
            ));
        }
        let next = Instant::now() + POLL;
        let all = statuses(client, proxies).await;
        let (at, at_ms) = (Instant::now(), unix_ms());
        for (i, s) in all.into_iter().enumerate() {
            if seen[i].is_none() && flipped(&s) {
                seen[i] = Some((at, at_ms, s));
            }
        }
        tokio::time::sleep(next.saturating_duration_since(Instant::now())).await;
    }
    let seen: Vec<(Instant, u64, Value)> = seen.into_iter().flatten().collect();
    let last = seen.iter().map(|(at, _, _)| *at).max().unwrap_or(responded);
    let last_ms = seen.iter().map(|(_, ms, _)| *ms).max().unwrap_or(0);
    let since: Vec<u64> = seen
        .iter()
        .map(|(_, _, s)| s["guard"]["since_ms"].as_u64().unwrap_or(0))
        .collect();
    let epochs: Vec<&Value> = seen
        .iter()
        .map(|(_, _, s)| &s["guard"]["cache_epoch"])
        .collect();
    let round = Round {
        tripped_on: who,
        after_response_ms: last.saturating_duration_since(responded).as_secs_f64() * 1e3,
        after_transition_ms: last_ms.saturating_sub(since[who]),
        since_spread_ms: since.iter().max().unwrap_or(&0) - since.iter().min().unwrap_or(&0),
        generations: seen
            .iter()
            .map(|(_, _, s)| s["fleet"]["generation"].as_u64().unwrap_or(0))
            .collect(),
        same_cache_epoch: epochs.iter().all(|e| *e == epochs[0]),
    };

    let reply = admin_post(client, &proxies[who].admin_url("/recover"), "", None).await;
    if reply.status != http::StatusCode::OK {
        return Err(format!("POST /recover on r{who}: {}", reply.text()));
    }
    let started = Instant::now();
    loop {
        let all = statuses(client, proxies).await;
        if all.iter().all(|s| s["guard"]["state"] == "healthy") {
            break;
        }
        if started.elapsed() > FLIP_LIMIT {
            return Err(format!(
                "not every replica healthy {}s after POST /recover on r{who}",
                FLIP_LIMIT.as_secs()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(round)
}

/// Every replica's `/status`, fetched concurrently (Null for a replica that did not answer).
async fn statuses(client: &HttpClient, proxies: &[Proxy]) -> Vec<Value> {
    let tasks: Vec<_> = proxies
        .iter()
        .map(|p| {
            let (client, url) = (client.clone(), p.admin_url("/status"));
            tokio::spawn(async move { get(&client, &url, &[]).await.json() })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or(Value::Null));
    }
    out
}

fn canary_weight(status: &Value) -> Option<u64> {
    status["arms"]
        .as_array()?
        .iter()
        .find(|a| a["name"] == "canary")?["weight"]
        .as_u64()
}

fn flipped(status: &Value) -> bool {
    status["guard"]["state"] == "tripped" && canary_weight(status) == Some(0)
}

fn healthy(status: &Value) -> bool {
    status["guard"]["state"] == "healthy" && canary_weight(status) == Some(CANARY_WEIGHT)
}

fn median_max(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() - 1])
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}
