//! The `/status` document (SPEC §7): the app's part (config, controls, budget, signals, every arm with its
//! live window) and the rollback guard's part. Called by the admin routes (and the guard part alone
//! answers `POST /trip` and `/recover`); tests and the demo read its field names, so they are a contract.
//!
//! A window appears in two shapes: the live one here ([`window`]: counters, latency and TTFB quantiles,
//! signals by probe) and [`crate::rules::Summary::to_json`] for a pinned baseline in the guard part and in
//! snapshots. They stay two because a pinned baseline is a `Summary` saved to disk without the live
//! window's histograms (no TTFB, timeouts, probes), and both field sets are read by clients as they are.

use std::time::Instant;

use serde_json::{json, Value};

use crate::app::App;
use crate::clock::now_ms;
use crate::guards::budget::Budget;
use crate::rollback::engine::Engine;
use crate::rollback::state::{GuardState, Trip};
use crate::serve::router::RoutingTable;
use crate::windows::{Counter, Hist, WindowStats};

/// The whole document: the app's part with the guard's under `guard`.
pub fn document(app: &App) -> Value {
    // The guard first: a state change stores the routing table before it commits the state, so a
    // table read after the state is at least as new as the state shown.
    let guard = guard(app.engine());
    let mut status = self::app(app);
    status["guard"] = guard;
    if let Some(fleet) = app.engine().fleet() {
        status["fleet"] = fleet.status();
    }
    status
}

/// The app's part: version, config, controls, budget, signals and every arm of the live table.
pub fn app(app: &App) -> Value {
    let table = app.table();
    let config = app.config();
    let span = config.rules.window.0;
    let now = Instant::now();
    let arms: Vec<Value> = table
        .arms()
        .iter()
        .zip(table.weights())
        .map(|(arm, weight)| {
            json!({
                "name": arm.name,
                "upstream": arm.upstream,
                "weight": weight,
                "baseline": arm.baseline,
                "pins": arm.pins.map(),
                "cache_ns": arm.cache_ns,
                "breaker": arm.breaker.state(now).as_str(),
                "window": window(&arm.stats.window.stats(now, span)),
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": app.uptime().as_secs(),
        "draining": app.is_draining(),
        "config": {
            "path": app.config_path().map(|p| p.display().to_string()),
            "hash": app.config_hash(),
        },
        "total_weight": table.total_weight(),
        "frozen": table.controls.frozen,
        "degrade": table.controls.degrade.as_ref().and_then(|v| v.to_str().ok()),
        "flags": &table.controls.flags,
        "budget": app.budget().map(|b| {
            let settings = b.settings();
            json!({
                "backend": match &*b { Budget::Local(_) => "local", Budget::Redis(_) => "redis" },
                "tokens_per_minute": settings.tokens_per_minute,
                "burst": settings.burst,
                "available_tokens": b.available(Instant::now()),
            })
        }),
        "signals": {
            "embedder": app.pipeline.embedder_name(),
            "sample": config.signals.sample,
            "max_evals_per_sec": config.signals.max_evals_per_sec,
            "queue_depth": app.pipeline.depth(),
            "dropped": app.metrics.eval_dropped.get(),
        },
        "arms": arms,
    })
}

/// The guard's part: state, last trip, levers in force, pinned baseline and recovery progress.
pub fn guard(engine: &Engine) -> Value {
    let control = engine.control();
    let state = control.runtime_state();
    let config = control.config();
    let g = &state.guard;
    let progress = engine.progress();
    let now = now_ms();
    let watching = matches!(g.state, GuardState::Tripped | GuardState::Recovering);
    let tripped_at = g.last_trip.as_ref().map_or(g.since_ms, |t| t.at_ms);
    let table = control.table();
    json!({
        "hint": g.last_trip.as_ref().and_then(|trip| weight_hint(trip, &table)),
        "state": g.state.as_str(),
        "since_ms": g.since_ms,
        "dry_run": config.rules.dry_run,
        "last_trip": g.last_trip,
        "throttled": state.throttled,
        "cache_epoch": state.cache_epoch,
        "pin_overrides": state.pin_overrides,
        "baseline": g.baseline.as_ref().map(|b| json!({
            "kind": "pinned", "arm": b.arm, "captured_ms": b.captured_ms, "pins": b.pins,
            "window": b.summary.to_json(),
        })),
        "recovery": watching.then(|| json!({
            "targets": progress,
            "holding_ms": g.green_since_ms.map(|s| now.saturating_sub(s)),
            "hold_ms": config.recovery.hold.0.as_millis() as u64,
            "deadline_in_ms": (config.recovery.deadline.0.as_millis() as u64)
                .saturating_sub(now.saturating_sub(tripped_at)),
        })),
    })
}

/// While the arm a trip rolled back still has weight 0, how to send it traffic again: nothing does it by
/// itself (after `recover` too), because a person decides when to retry a canary.
fn weight_hint(trip: &Trip, table: &RoutingTable) -> Option<String> {
    let i = table.index_of(&trip.arm)?;
    if trip.dry_run || table.weights().get(i) != Some(&0) {
        return None;
    }
    // The route lever's action reads "arm canary weight 20 → 0": suggest the weight it had.
    let before = trip
        .action
        .split_once(" weight ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|w| w.parse::<u32>().ok())
        .filter(|w| *w > 0)
        .map_or("N".to_string(), |w| w.to_string());
    Some(format!(
        "arm {arm} has weight 0 since the trip: its traffic stays on the other arms until you send it \
         some again with `driftguard weight {arm} {before}` (or POST /arms/{arm}/weight)",
        arm = trip.arm
    ))
}

/// An arm's live window: requests, errors, latency and TTFB in ms, signals.
pub fn window(stats: &WindowStats) -> Value {
    let quantiles = |hist: Hist| {
        let snap = stats.hist(hist);
        let ms = |q: f64| snap.quantile(q).map(|us| us as f64 / 1e3);
        json!({"p50": ms(0.5), "p95": ms(0.95), "p99": ms(0.99)})
    };
    let p50_p95 = |hist: Hist| {
        json!({
            "p50": stats.signal_quantile(hist, 0.5),
            "p95": stats.signal_quantile(hist, 0.95),
        })
    };
    json!({
        "span_seconds": stats.span.as_secs(),
        "requests": stats.requests(),
        "errors_5xx": stats.counter(Counter::Class5xx),
        "error_rate": stats.error_rate(),
        "rate_limited": stats.counter(Counter::RateLimited),
        "upstream_errors": stats.counter(Counter::UpstreamErrors),
        "timeouts": stats.counter(Counter::Timeouts),
        "broken_off": stats.counter(Counter::BrokenOff),
        "pin_mismatches": stats.counter(Counter::PinMismatches),
        "latency_ms": quantiles(Hist::Latency),
        "ttfb_ms": quantiles(Hist::Ttfb),
        "signals": {
            "evaluated": stats.counter(Counter::Evaluated),
            "delta_s": p50_p95(Hist::DeltaS),
            "delta_s_qr": p50_p95(Hist::DeltaSQr),
            "delta_s_ra": p50_p95(Hist::DeltaSRa),
            "coverage_mean": stats.signal_mean(Hist::Coverage),
            "retrieval_coverage_mean": stats.signal_mean(Hist::RetrievalCoverage),
            "retrieval_coverage": p50_p95(Hist::RetrievalCoverage),
            "lambda_flip_rate": stats.lambda_flip_rate(),
            "tool_loops": stats.counter(Counter::ToolLoops),
            "tokens": {
                "prompt": stats.counter(Counter::PromptTokens),
                "completion": stats.counter(Counter::CompletionTokens),
            },
        },
    })
}
