//! `[rules]`, `[rules.hard]`, `[rules.soft]`: when an arm trips (SPEC §6). Read by `rules` (thresholds,
//! significance) and `rollback` (evaluation loop). The window ring's geometry lives here too: it bounds
//! `rules.window`, and config sits below `windows`, which builds its rings from it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::dur::{millis, secs, Dur};
use super::{err, ConfigError};

/// Length of one slot of the window ring.
pub const SLOT: Duration = Duration::from_secs(10);
/// Slots in the window ring.
pub const SLOTS: usize = 30;
/// The longest span a window can merge.
pub const MAX_SPAN: Duration = Duration::from_secs(SLOT.as_secs() * SLOTS as u64);
/// The longest rule window: the ring less the slot being cleared ahead of its period.
pub const MAX_WINDOW: Duration = Duration::from_secs(SLOT.as_secs() * (SLOTS as u64 - 1));

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rules {
    /// Span of the rule window, merged from the newest window slots (at most [`MAX_WINDOW`]); also the
    /// span behind /status and the quantile gauges.
    pub window: Dur,
    /// How often the rules are evaluated for every non-baseline arm.
    pub eval_interval: Dur,
    /// Evaluations an arm needs in the window before any rule is judged.
    pub min_samples: u64,
    /// Log and count trips without acting (shadow mode).
    pub dry_run: bool,
    /// A latency ratio counts only when the arm's quantile also exceeds the baseline's by this much.
    pub latency_floor: Dur,
    /// One-sided significance of "worse than the baseline" a breach needs, in (0, 1).
    pub confidence: f64,
    /// With a single arm, pin a baseline after this long healthy.
    pub auto_baseline_after: Dur,
    /// Hard rule key ([`HARD_RULE_KEYS`]) → threshold; a key left out keeps the built-in default.
    pub hard: BTreeMap<String, f64>,
    /// Soft rule key ([`SOFT_RULE_KEYS`]) → threshold; soft rules only warn.
    pub soft: BTreeMap<String, f64>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            window: secs(60),
            eval_interval: secs(1),
            min_samples: 50,
            dry_run: false,
            latency_floor: millis(25),
            confidence: 0.999,
            auto_baseline_after: secs(15 * 60),
            hard: BTreeMap::new(),
            soft: BTreeMap::new(),
        }
    }
}

/// Rule keys of SPEC §6 accepted under `[rules.hard]`.
pub const HARD_RULE_KEYS: &[&str] = &[
    "retrieval_drift_p95_over",
    "retrieval_drift_p50_over",
    "retrieval_coverage_under",
    "answer_drift_p95_over",
    "answer_drift_p50_over",
    "delta_s_p95_drift_over",
    "delta_s_p50_drift_over",
    "coverage_under",
    "lambda_flip_rate_over",
    "error_rate_over",
    "rate_limited_over",
    "p99_latency_ratio_over",
    "pin_mismatch_over",
    "tool_loops_over",
    "duplicate_effects_over",
];

/// Rule keys accepted under `[rules.soft]`.
pub const SOFT_RULE_KEYS: &[&str] = &[
    "p95_latency_uplift_over",
    "p99_latency_uplift_over",
    "delta_s_p50_drift_over",
];

/// A rule's name is its key without the `_over` / `_under` suffix.
pub fn rule_name(key: &str) -> &str {
    key.strip_suffix("_over")
        .or_else(|| key.strip_suffix("_under"))
        .unwrap_or(key)
}

impl Rules {
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        let r = self;
        if !(r.confidence > 0.0 && r.confidence < 1.0) {
            errors.push(err("rules.confidence", "must be in (0, 1)"));
        }
        if r.window.0 < Duration::from_secs(1) {
            errors.push(err("rules.window", "must be at least 1s"));
        }
        if r.window.0 > MAX_WINDOW {
            errors.push(err(
                "rules.window",
                format!(
                    "must be at most {}s, the span of the window ring",
                    MAX_WINDOW.as_secs()
                ),
            ));
        }
        for (table, keys, map) in [
            ("rules.hard", HARD_RULE_KEYS, &r.hard),
            ("rules.soft", SOFT_RULE_KEYS, &r.soft),
        ] {
            for (k, v) in map {
                if !keys.contains(&k.as_str()) {
                    errors.push(err(
                        format!("{table}.{k}"),
                        format!("unknown rule; known: {}", keys.join(", ")),
                    ));
                } else if !v.is_finite() || *v < 0.0 {
                    errors.push(err(format!("{table}.{k}"), "must be a non-negative number"));
                }
            }
        }
    }
}
