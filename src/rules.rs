//! Rules of SPEC §6: what counts as a bad arm, and what counts as green again.
//!
//! Everything here is pure: a rule looks at a [`Summary`] of the arm's window and one of its baseline
//! (the baseline arm's concurrent window, or a pinned one) and says whether it breaches. A breach of a
//! threshold rule counts only when the arm is also worse than the baseline at `rules.confidence`
//! (one-sided): a two-proportion z-test for shares, Mann-Whitney U for the ΔS distributions, Welch's t
//! for mean coverage. A latency ratio counts only above `rules.latency_floor`. When the baseline breaches
//! the same absolute threshold, the finding is a baseline breach, not a trip. Count rules (pin mismatch,
//! tool loops, duplicate effects) trip on any occurrence.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{self, Lever};
use crate::windows::{Counter, Hist, WindowStats, SIGNAL_SCALE};
use significance as stats;

/// What the rules read of one window. Serializable: a pinned baseline is one of these, and snapshots
/// carry them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Summary {
    pub span_seconds: u64,
    pub requests: u64,
    pub errors_5xx: u64,
    pub rate_limited: u64,
    pub pin_mismatches: u64,
    pub tool_loops: u64,
    pub evaluated: u64,
    /// Divergent + chaotic λ states.
    pub lambda_flips: u64,
    /// ΔS (max probe) as (value × 10 000, count), ascending.
    pub delta_s: Vec<(u64, u64)>,
    /// Coverage as (value × 10 000, count), ascending.
    pub coverage: Vec<(u64, u64)>,
    pub latency_p50_us: Option<u64>,
    pub latency_p95_us: Option<u64>,
    pub latency_p99_us: Option<u64>,
    /// Latency as (µs, count), ascending: the p99 rule's tail test reads it.
    pub latency: Vec<(u64, u64)>,
}

impl Summary {
    pub fn from_window(w: &WindowStats) -> Summary {
        let latency = w.hist(Hist::Latency);
        Summary {
            span_seconds: w.span.as_secs(),
            requests: w.requests(),
            errors_5xx: w.counter(Counter::Class5xx),
            rate_limited: w.counter(Counter::RateLimited),
            pin_mismatches: w.counter(Counter::PinMismatches),
            tool_loops: w.counter(Counter::ToolLoops),
            evaluated: w.counter(Counter::Evaluated),
            lambda_flips: w.counter(Counter::LambdaDivergent) + w.counter(Counter::LambdaChaotic),
            delta_s: w.hist(Hist::DeltaS).buckets().collect(),
            coverage: w.hist(Hist::Coverage).buckets().collect(),
            latency_p50_us: latency.quantile(0.5),
            latency_p95_us: latency.quantile(0.95),
            latency_p99_us: latency.quantile(0.99),
            latency: latency.buckets().collect(),
        }
    }

    pub fn error_rate(&self) -> f64 {
        share(self.errors_5xx, self.requests)
    }

    pub fn rate_limited_rate(&self) -> f64 {
        share(self.rate_limited, self.requests)
    }

    pub fn lambda_flip_rate(&self) -> f64 {
        share(self.lambda_flips, self.evaluated)
    }

    pub fn delta_s_quantile(&self, q: f64) -> Option<f64> {
        bucket_quantile(&self.delta_s, q)
    }

    /// Requests slower than `us`.
    pub fn slower_than(&self, us: u64) -> u64 {
        self.latency
            .iter()
            .filter(|(v, _)| *v > us)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn coverage_n(&self) -> u64 {
        self.coverage.iter().map(|(_, n)| n).sum()
    }

    /// Mean and sample variance of coverage, in [0, 1] units.
    pub fn coverage_moments(&self) -> Option<(f64, f64)> {
        moments(&self.coverage)
    }

    /// The window as JSON for `/status` and snapshots (quantiles instead of raw buckets).
    pub fn to_json(&self) -> serde_json::Value {
        let ms = |us: Option<u64>| us.map(|v| v as f64 / 1e3);
        serde_json::json!({
            "span_seconds": self.span_seconds,
            "requests": self.requests,
            "error_rate": self.error_rate(),
            "rate_limited_rate": self.rate_limited_rate(),
            "pin_mismatches": self.pin_mismatches,
            "tool_loops": self.tool_loops,
            "evaluated": self.evaluated,
            "lambda_flip_rate": (self.evaluated > 0).then(|| self.lambda_flip_rate()),
            "delta_s_p50": self.delta_s_quantile(0.5),
            "delta_s_p95": self.delta_s_quantile(0.95),
            "coverage_mean": self.coverage_moments().map(|(m, _)| m),
            "latency_ms": {
                "p50": ms(self.latency_p50_us),
                "p95": ms(self.latency_p95_us),
                "p99": ms(self.latency_p99_us),
            },
        })
    }
}

fn share(x: u64, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        x as f64 / n as f64
    }
}

/// Quantile `q` of a (scaled value, count) histogram, back in [0, 1]; rank `ceil(q·n)` as the windows do.
fn bucket_quantile(buckets: &[(u64, u64)], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for &(v, n) in buckets {
        seen += n;
        if seen >= rank {
            return Some((v as f64 / SIGNAL_SCALE).min(1.0));
        }
    }
    None
}

/// Mean and sample variance of a (scaled value, count) histogram, in [0, 1] units.
fn moments(buckets: &[(u64, u64)]) -> Option<(f64, f64)> {
    let n: u64 = buckets.iter().map(|(_, c)| c).sum();
    if n == 0 {
        return None;
    }
    let value = |v: u64| (v as f64 / SIGNAL_SCALE).min(1.0);
    let mean = buckets
        .iter()
        .map(|&(v, c)| value(v) * c as f64)
        .sum::<f64>()
        / n as f64;
    let var = if n < 2 {
        0.0
    } else {
        buckets
            .iter()
            .map(|&(v, c)| (value(v) - mean).powi(2) * c as f64)
            .sum::<f64>()
            / (n - 1) as f64
    };
    Some((mean, var))
}

/// The hard rules of SPEC §6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    DeltaSP95Drift,
    DeltaSP50Drift,
    Coverage,
    LambdaFlipRate,
    ErrorRate,
    RateLimited,
    P99LatencyRatio,
    PinMismatch,
    ToolLoops,
    DuplicateEffects,
}

impl Rule {
    /// In the order they are judged: when several trip in one evaluation, the first names the trip
    /// (and so the lever): the certain count rules first, then errors, quality, cost and latency.
    pub const ALL: [Rule; 10] = [
        Rule::PinMismatch,
        Rule::DuplicateEffects,
        Rule::ToolLoops,
        Rule::ErrorRate,
        Rule::DeltaSP95Drift,
        Rule::DeltaSP50Drift,
        Rule::Coverage,
        Rule::LambdaFlipRate,
        Rule::RateLimited,
        Rule::P99LatencyRatio,
    ];

    /// The rule's name: its config key without `_over` / `_under`.
    pub fn name(self) -> &'static str {
        match self {
            Rule::DeltaSP95Drift => "delta_s_p95_drift",
            Rule::DeltaSP50Drift => "delta_s_p50_drift",
            Rule::Coverage => "coverage",
            Rule::LambdaFlipRate => "lambda_flip_rate",
            Rule::ErrorRate => "error_rate",
            Rule::RateLimited => "rate_limited",
            Rule::P99LatencyRatio => "p99_latency_ratio",
            Rule::PinMismatch => "pin_mismatch",
            Rule::ToolLoops => "tool_loops",
            Rule::DuplicateEffects => "duplicate_effects",
        }
    }

    /// The `[rules.hard]` key.
    pub fn key(self) -> &'static str {
        match self {
            Rule::DeltaSP95Drift => "delta_s_p95_drift_over",
            Rule::DeltaSP50Drift => "delta_s_p50_drift_over",
            Rule::Coverage => "coverage_under",
            Rule::LambdaFlipRate => "lambda_flip_rate_over",
            Rule::ErrorRate => "error_rate_over",
            Rule::RateLimited => "rate_limited_over",
            Rule::P99LatencyRatio => "p99_latency_ratio_over",
            Rule::PinMismatch => "pin_mismatch_over",
            Rule::ToolLoops => "tool_loops_over",
            Rule::DuplicateEffects => "duplicate_effects_over",
        }
    }

    /// The seed runbook's threshold.
    pub fn default_threshold(self) -> f64 {
        match self {
            Rule::DeltaSP95Drift => 0.15,
            Rule::DeltaSP50Drift => 0.10,
            Rule::Coverage => 0.60,
            Rule::LambdaFlipRate => 0.20,
            Rule::ErrorRate => 0.01,
            Rule::RateLimited => 0.02,
            Rule::P99LatencyRatio => 2.0,
            Rule::PinMismatch | Rule::ToolLoops | Rule::DuplicateEffects => 0.0,
        }
    }

    /// The seed's decision tree: which lever undoes what this rule detects.
    pub fn default_lever(self) -> Lever {
        match self {
            Rule::DeltaSP95Drift
            | Rule::DeltaSP50Drift
            | Rule::Coverage
            | Rule::LambdaFlipRate
            | Rule::ToolLoops
            | Rule::ErrorRate => Lever::Route,
            Rule::PinMismatch => Lever::Alias,
            Rule::P99LatencyRatio | Rule::RateLimited => Lever::Degrade,
            Rule::DuplicateEffects => Lever::None,
        }
    }

    /// Rules computed from the evaluated signals (they need evaluated samples, not just requests).
    fn needs_signals(self) -> bool {
        matches!(
            self,
            Rule::DeltaSP95Drift | Rule::DeltaSP50Drift | Rule::Coverage | Rule::LambdaFlipRate
        )
    }
}

/// The lever a rule pulls: `[rollback.levers]`, else the decision tree's, for the seed's rules; any
/// other name (a manual trip) takes `rollback.lever`.
pub fn lever_for(rule: &str, rollback: &config::Rollback) -> Lever {
    if let Some(lever) = rollback.levers.get(rule) {
        return *lever;
    }
    Rule::ALL
        .iter()
        .find(|r| r.name() == rule)
        .map_or(rollback.lever, |r| r.default_lever())
}

/// Rule settings read from `[rules]`.
#[derive(Debug, Clone)]
pub struct RuleSet {
    pub thresholds: Vec<(Rule, f64)>,
    pub soft: BTreeMap<String, f64>,
    pub min_samples: u64,
    /// One-sided significance level: 1 − `rules.confidence`.
    pub alpha: f64,
    pub latency_floor: Duration,
}

impl RuleSet {
    pub fn new(rules: &config::Rules) -> RuleSet {
        let thresholds = Rule::ALL
            .iter()
            .map(|&r| {
                let t = rules
                    .hard
                    .get(r.key())
                    .copied()
                    .unwrap_or(r.default_threshold());
                (r, t)
            })
            .collect();
        let mut soft: BTreeMap<String, f64> =
            [("p95_latency_uplift_over".to_string(), 0.15)].into();
        soft.extend(rules.soft.clone());
        RuleSet {
            thresholds,
            soft,
            min_samples: rules.min_samples.max(1),
            alpha: (1.0 - rules.confidence).clamp(0.0, 1.0),
            latency_floor: rules.latency_floor.0,
        }
    }

    pub fn threshold(&self, rule: Rule) -> f64 {
        self.thresholds
            .iter()
            .find(|(r, _)| *r == rule)
            .map_or(rule.default_threshold(), |(_, t)| *t)
    }
}

/// What a rule made of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The arm breaches and is significantly worse than the baseline: act.
    Trip,
    /// The arm breaches, but the baseline breaches as much: not the arm's fault.
    BaselineBreach,
    /// Over the threshold, but not significantly worse than the baseline (noise).
    NotSignificant,
    /// A soft rule: warn only.
    Warn,
}

/// One rule's finding on one arm.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub rule: &'static str,
    pub verdict: Verdict,
    pub observed: f64,
    pub threshold: f64,
    pub baseline: Option<f64>,
    /// One-sided p-value of "the arm is worse than the baseline", for the tested rules.
    pub p_value: Option<f64>,
}

/// Evaluates the hard and soft rules on `arm` against `baseline` (another arm's concurrent window or a
/// pinned one; `None` — a single arm with nothing pinned yet — leaves only the count rules). `duplicate_effects` is the number of
/// duplicate upstream executions since the last evaluation (a process-wide count). Returns the
/// breaches only (tripping, baseline, not significant, soft warnings); empty below `min_samples`.
pub fn evaluate(
    set: &RuleSet,
    arm: &Summary,
    baseline: Option<&Summary>,
    duplicate_effects: u64,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    if arm.requests < set.min_samples && duplicate_effects == 0 {
        return findings;
    }
    for &(rule, threshold) in &set.thresholds {
        if let Some(f) = evaluate_rule(set, rule, threshold, arm, baseline, duplicate_effects) {
            findings.push(f);
        }
    }
    if let Some(base) = baseline {
        if arm.requests >= set.min_samples {
            findings.extend(soft_findings(set, arm, base));
        }
    }
    findings
}

fn evaluate_rule(
    set: &RuleSet,
    rule: Rule,
    threshold: f64,
    arm: &Summary,
    baseline: Option<&Summary>,
    duplicate_effects: u64,
) -> Option<Finding> {
    let count = |observed: u64| {
        (observed as f64 > threshold).then_some(Finding {
            rule: rule.name(),
            verdict: Verdict::Trip,
            observed: observed as f64,
            threshold,
            baseline: None,
            p_value: None,
        })
    };
    match rule {
        Rule::DuplicateEffects => return count(duplicate_effects),
        Rule::PinMismatch if arm.requests >= set.min_samples => return count(arm.pin_mismatches),
        Rule::ToolLoops if arm.requests >= set.min_samples => return count(arm.tool_loops),
        Rule::PinMismatch | Rule::ToolLoops => return None,
        _ => {}
    }
    let base = baseline?;
    if arm.requests < set.min_samples {
        return None;
    }
    if rule.needs_signals() && (arm.evaluated < set.min_samples || base.evaluated == 0) {
        return None;
    }
    // (observed, baseline value, breached, baseline breached as much, p-value of "arm worse").
    let (observed, base_value, breached, base_breached, p) = match rule {
        Rule::DeltaSP95Drift | Rule::DeltaSP50Drift => {
            let q = if rule == Rule::DeltaSP95Drift {
                0.95
            } else {
                0.5
            };
            let a = arm.delta_s_quantile(q)?;
            let b = base.delta_s_quantile(q)?;
            let drift = a - b;
            if drift <= threshold {
                return None;
            }
            let p = stats::mann_whitney_greater(
                arm.delta_s.iter().copied(),
                base.delta_s.iter().copied(),
            );
            (drift, b, true, false, p)
        }
        Rule::Coverage => {
            let (ma, va) = arm.coverage_moments()?;
            let (mb, vb) = base.coverage_moments()?;
            if ma >= threshold {
                return None;
            }
            let p = stats::welch_less(ma, va, arm.coverage_n(), mb, vb, base.coverage_n());
            (ma, mb, true, mb < threshold && mb <= ma, p)
        }
        Rule::LambdaFlipRate => share_rule(
            threshold,
            (arm.lambda_flips, arm.evaluated),
            (base.lambda_flips, base.evaluated),
        )?,
        Rule::ErrorRate => share_rule(
            threshold,
            (arm.errors_5xx, arm.requests),
            (base.errors_5xx, base.requests),
        )?,
        Rule::RateLimited => share_rule(
            threshold,
            (arm.rate_limited, arm.requests),
            (base.rate_limited, base.requests),
        )?,
        Rule::P99LatencyRatio => {
            let a = arm.latency_p99_us? as f64;
            let b = base.latency_p99_us?.max(1) as f64;
            let ratio = a / b;
            let floor = set.latency_floor.as_micros() as f64;
            if ratio <= threshold || a - b <= floor {
                return None;
            }
            // Is the arm's tail really heavier? The share of its requests slower than the baseline's
            // p99 against the baseline's own share (about 1 %), z-tested like the other shares: a few
            // stalls on a busy host land on both arms alike and are not significant.
            let cut = b as u64;
            let p = proportion_greater_corrected(
                arm.slower_than(cut),
                arm.requests,
                base.slower_than(cut),
                base.requests,
            );
            (ratio, b / 1e3, true, false, p)
        }
        Rule::PinMismatch | Rule::ToolLoops | Rule::DuplicateEffects => unreachable!(),
    };
    let verdict = if !breached {
        return None;
    } else if base_breached {
        Verdict::BaselineBreach
    } else if p < set.alpha {
        Verdict::Trip
    } else {
        Verdict::NotSignificant
    };
    Some(Finding {
        rule: rule.name(),
        verdict,
        observed,
        threshold,
        baseline: Some(base_value),
        p_value: Some(p),
    })
}

/// A share rule (`x / n` over a threshold): the observed share, the baseline's, whether each breaches,
/// and the z-test's p-value. The baseline breaches "as much" when its share is over the threshold and
/// at least the arm's.
fn share_rule(
    threshold: f64,
    (x1, n1): (u64, u64),
    (x2, n2): (u64, u64),
) -> Option<(f64, f64, bool, bool, f64)> {
    let a = share(x1, n1);
    if a <= threshold {
        return None;
    }
    let b = share(x2, n2);
    let p = proportion_greater_corrected(x1, n1, x2, n2);
    Some((a, b, true, n2 > 0 && b > threshold && b >= a, p))
}

/// One-sided pooled two-proportion z-test with Yates' continuity correction: the difference of the
/// shares is reduced by ½·(1/n₁ + 1/n₂) before it is divided by its standard error. Without it the
/// normal approximation overstates the evidence when events are rare (3 errors in 110 requests against
/// none in 500 gave p ≈ 3·10⁻⁴ and tripped healthy arms about once in a thousand windows).
fn proportion_greater_corrected(x1: u64, n1: u64, x2: u64, n2: u64) -> f64 {
    if n1 == 0 || n2 == 0 {
        return 1.0;
    }
    let (p1, p2) = (x1 as f64 / n1 as f64, x2 as f64 / n2 as f64);
    let (n1, n2) = (n1 as f64, n2 as f64);
    let pooled = (x1 as f64 + x2 as f64) / (n1 + n2);
    if pooled <= 0.0 || pooled >= 1.0 {
        return 1.0;
    }
    let se = (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt();
    stats::normal_sf((p1 - p2 - 0.5 * (1.0 / n1 + 1.0 / n2)) / se)
}

/// Soft rules: latency uplift of p95 / p99 over the baseline (above the latency floor) and the soft ΔS
/// median drift. They warn only.
fn soft_findings(set: &RuleSet, arm: &Summary, base: &Summary) -> Vec<Finding> {
    let floor = set.latency_floor.as_micros() as f64;
    let mut out = Vec::new();
    for (key, &threshold) in &set.soft {
        let (rule, observed, base_value) = match key.as_str() {
            "p95_latency_uplift_over" | "p99_latency_uplift_over" => {
                let (a, b) = if key.starts_with("p95") {
                    (arm.latency_p95_us, base.latency_p95_us)
                } else {
                    (arm.latency_p99_us, base.latency_p99_us)
                };
                let (Some(a), Some(b)) = (a, b) else { continue };
                if (a as f64 - b as f64) <= floor {
                    continue;
                }
                let name = if key.starts_with("p95") {
                    "p95_latency_uplift"
                } else {
                    "p99_latency_uplift"
                };
                (name, a as f64 / b.max(1) as f64 - 1.0, b as f64 / 1e3)
            }
            "delta_s_p50_drift_over" => {
                let (Some(a), Some(b)) = (arm.delta_s_quantile(0.5), base.delta_s_quantile(0.5))
                else {
                    continue;
                };
                ("delta_s_p50_drift", a - b, b)
            }
            _ => continue,
        };
        if observed > threshold {
            out.push(Finding {
                rule,
                verdict: Verdict::Warn,
                observed,
                threshold,
                baseline: Some(base_value),
                p_value: None,
            });
        }
    }
    out
}

/// One exit target of the recovery watch (SPEC §6 "watch for green").
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: &'static str,
    pub arm: String,
    pub value: Option<f64>,
    pub limit: f64,
    pub ok: bool,
}

/// The exit targets for one serving arm against the baseline: error rate under
/// `recovery.error_rate_under`, ΔS p95 and mean coverage within `recovery.tolerance` of the baseline,
/// p95 latency at most (1 + `p95_latency_uplift_max`) × the baseline's (plus the latency floor). With no
/// baseline only the error rate is judged. An arm with fewer than `min_samples` requests does not hold.
pub fn exit_targets(
    name: &str,
    arm: &Summary,
    baseline: Option<&Summary>,
    recovery: &config::Recovery,
    set: &RuleSet,
) -> Vec<Target> {
    let target = |n: &'static str, value: Option<f64>, limit: f64, ok: bool| Target {
        name: n,
        arm: name.to_string(),
        value,
        limit,
        ok,
    };
    let mut out = vec![
        target(
            "samples",
            Some(arm.requests as f64),
            set.min_samples as f64,
            arm.requests >= set.min_samples,
        ),
        target(
            "error_rate",
            Some(arm.error_rate()),
            recovery.error_rate_under,
            arm.requests > 0 && arm.error_rate() < recovery.error_rate_under,
        ),
    ];
    let Some(base) = baseline else {
        return out;
    };
    let tol = recovery.tolerance;
    if let (Some(a), Some(b)) = (arm.delta_s_quantile(0.95), base.delta_s_quantile(0.95)) {
        out.push(target("delta_s_p95", Some(a), b + tol, a <= b + tol));
    }
    if let (Some((a, _)), Some((b, _))) = (arm.coverage_moments(), base.coverage_moments()) {
        out.push(target("coverage_mean", Some(a), b - tol, a >= b - tol));
    }
    if let (Some(a), Some(b)) = (arm.latency_p95_us, base.latency_p95_us) {
        let limit = b as f64 * (1.0 + recovery.p95_latency_uplift_max)
            + set.latency_floor.as_micros() as f64;
        out.push(target(
            "p95_latency_ms",
            Some(a as f64 / 1e3),
            limit / 1e3,
            a as f64 <= limit,
        ));
    }
    out
}

pub mod significance;

#[cfg(test)]
mod tests;
