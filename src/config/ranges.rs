//! The documented range of every duration and size in the file, checked in one place by
//! `Config::validate` — so `driftguard check`, a reload and the start refuse the same values, each
//! error naming its key and its range.
//!
//! Why a range and not just "above 0": a value the types accept can still take the process down — a
//! 300000000000-year timeout overflows `Instant + Duration` on the first request, a queue of 10^11
//! samples aborts the allocation at start, a zero evaluation interval spins a core. The bounds are wide
//! (far beyond any sensible setting) and keep every product of them with the process's own constants
//! inside their types. The README's configuration reference lists the same table.

use std::time::Duration;

use super::{err, Config, ConfigError, Dur};

/// Longest duration any key accepts, whatever its own range (a safety net for every `Dur`).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);
const MIN: u64 = 60;
const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;
const MIB: u64 = 1 << 20;

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Checks every duration and size against its range.
pub(super) fn check(c: &Config, errors: &mut Vec<ConfigError>) {
    let mut d = |key: &str, value: Dur, min: Duration, max: Duration| {
        if value.0 < min || value.0 > max {
            errors.push(err(
                key,
                format!(
                    "{} is out of range: must be between {} and {}",
                    show(value.0),
                    show(min),
                    show(max)
                ),
            ));
        }
    };
    d(
        "listen.drain_timeout",
        c.listen.drain_timeout,
        Duration::ZERO,
        secs(HOUR),
    );
    d(
        "upstream.connect_timeout",
        c.upstream.connect_timeout,
        MS,
        secs(5 * MIN),
    );
    d(
        "upstream.request_timeout",
        c.upstream.request_timeout,
        MS,
        secs(HOUR),
    );
    d(
        "upstream.body_idle_timeout",
        c.upstream.body_idle_timeout,
        MS,
        secs(DAY),
    );
    d(
        "upstream.pool_idle_timeout",
        c.upstream.pool_idle_timeout,
        Duration::ZERO,
        secs(HOUR),
    );
    d(
        "signals.session_ttl",
        c.signals.session_ttl,
        S,
        secs(7 * DAY),
    );
    d(
        "signals.openai.timeout",
        c.signals.openai.timeout,
        MS,
        secs(5 * MIN),
    );
    if let Some(b) = &c.budget {
        d("budget.redis_timeout", b.redis_timeout, MS, secs(MIN));
    }
    d("breaker.window", c.breaker.window, S, secs(HOUR));
    d("breaker.slow_call", c.breaker.slow_call, MS, secs(HOUR));
    d(
        "breaker.open_for",
        c.breaker.open_for,
        Duration::from_millis(10),
        secs(HOUR),
    );
    d(
        "writes.ttl",
        c.writes.ttl,
        Duration::from_millis(100),
        secs(365 * DAY),
    );
    d(
        "rules.eval_interval",
        c.rules.eval_interval,
        Duration::from_millis(10),
        secs(10 * MIN),
    );
    d(
        "rules.latency_floor",
        c.rules.latency_floor,
        Duration::ZERO,
        secs(HOUR),
    );
    d(
        "rules.auto_baseline_after",
        c.rules.auto_baseline_after,
        S,
        secs(30 * DAY),
    );
    d(
        "recovery.hold",
        c.recovery.hold,
        Duration::ZERO,
        secs(30 * DAY),
    );
    d("recovery.deadline", c.recovery.deadline, S, secs(30 * DAY));
    for (i, hook) in c.rollback.hooks.iter().enumerate() {
        d(
            &format!("rollback.hooks[{i}].timeout"),
            hook.timeout,
            MS,
            secs(HOUR),
        );
    }
    if let Some(f) = &c.fleet {
        d("fleet.redis_timeout", f.redis_timeout, MS, secs(MIN));
    }

    let mut n = |key: &str, value: u64, min: u64, max: u64| {
        if value < min || value > max {
            errors.push(err(
                key,
                format!("{value} is out of range: must be between {min} and {max}"),
            ));
        }
    };
    n("runtime.workers", c.runtime.workers as u64, 1, 256);
    n(
        "upstream.pool_max_idle",
        c.upstream.pool_max_idle as u64,
        0,
        100_000,
    );
    n(
        "signals.max_body_bytes",
        c.signals.max_body_bytes as u64,
        0,
        64 * MIB,
    );
    n("signals.queue", c.signals.queue as u64, 1, 100_000);
    n("signals.workers", c.signals.workers as u64, 1, 256);
    n(
        "signals.max_sessions",
        c.signals.max_sessions as u64,
        1,
        10_000_000,
    );
    n(
        "signals.max_queue_bytes",
        c.signals.max_queue_bytes as u64,
        1,
        16 * 1024 * MIB,
    );
    n(
        "signals.openai.cache_entries",
        c.signals.openai.cache_entries as u64,
        0,
        1_000_000,
    );
    n(
        "signals.local.cache_entries",
        c.signals.local.cache_entries as u64,
        0,
        1_000_000,
    );
    if let Some(b) = &c.budget {
        n(
            "budget.tokens_per_minute",
            b.tokens_per_minute,
            1,
            1_000_000_000_000,
        );
        n("budget.burst", b.burst, 1, 1_000_000_000_000);
        n(
            "budget.default_completion_tokens",
            b.default_completion_tokens,
            0,
            10_000_000,
        );
        n("budget.peek_bytes", b.peek_bytes as u64, 1, 16 * MIB);
    }
    n("breaker.min_calls", c.breaker.min_calls, 1, 1_000_000);
    n(
        "breaker.half_open_probes",
        c.breaker.half_open_probes.into(),
        1,
        10_000,
    );
    n(
        "writes.max_body_bytes",
        c.writes.max_body_bytes as u64,
        1,
        64 * MIB,
    );
    n(
        "writes.receipt_body_max",
        c.writes.receipt_body_max as u64,
        0,
        64 * MIB,
    );
    n("rules.min_samples", c.rules.min_samples, 1, 10_000_000);
    for (i, hook) in c.rollback.hooks.iter().enumerate() {
        n(
            &format!("rollback.hooks[{i}].retries"),
            hook.retries.into(),
            0,
            100,
        );
    }
}

/// A duration as the file writes it ("250ms", "1h").
fn show(d: Duration) -> String {
    if d.is_zero() {
        "0s".to_string()
    } else {
        humantime::format_duration(d).to_string()
    }
}
