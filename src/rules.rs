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

use crate::config::{self, Lever};
use significance as stats;

/// The hard rules of SPEC §6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    RetrievalDriftP95,
    RetrievalDriftP50,
    RetrievalCoverage,
    AnswerDriftP95,
    AnswerDriftP50,
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
    /// (and so the lever): the certain count rules first, then errors, then quality — each probe's
    /// rules before the combined view (`delta_s_*`, the max of the probes), so that a wrong retrieval
    /// is named as one and pulls the retrieval lever — then cost and latency.
    pub const ALL: [Rule; 15] = [
        Rule::PinMismatch,
        Rule::DuplicateEffects,
        Rule::ToolLoops,
        Rule::ErrorRate,
        Rule::RetrievalDriftP95,
        Rule::RetrievalDriftP50,
        Rule::RetrievalCoverage,
        Rule::AnswerDriftP95,
        Rule::AnswerDriftP50,
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
            Rule::RetrievalDriftP95 => "retrieval_drift_p95",
            Rule::RetrievalDriftP50 => "retrieval_drift_p50",
            Rule::RetrievalCoverage => "retrieval_coverage",
            Rule::AnswerDriftP95 => "answer_drift_p95",
            Rule::AnswerDriftP50 => "answer_drift_p50",
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
            Rule::RetrievalDriftP95 => "retrieval_drift_p95_over",
            Rule::RetrievalDriftP50 => "retrieval_drift_p50_over",
            Rule::RetrievalCoverage => "retrieval_coverage_under",
            Rule::AnswerDriftP95 => "answer_drift_p95_over",
            Rule::AnswerDriftP50 => "answer_drift_p50_over",
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

    /// The seed runbook's threshold; the per-probe ones measured on real text (README, "Probes").
    pub fn default_threshold(self) -> f64 {
        match self {
            Rule::RetrievalDriftP95 | Rule::AnswerDriftP95 => 0.15,
            Rule::RetrievalDriftP50 | Rule::AnswerDriftP50 => 0.08,
            Rule::RetrievalCoverage => RETRIEVAL_COVERAGE_UNDER,
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
            // Retriever wrong (its probe, its coverage, a mismatched index pin): alias the index back.
            Rule::RetrievalDriftP95
            | Rule::RetrievalDriftP50
            | Rule::RetrievalCoverage
            | Rule::PinMismatch => Lever::Alias,
            Rule::AnswerDriftP95
            | Rule::AnswerDriftP50
            | Rule::DeltaSP95Drift
            | Rule::DeltaSP50Drift
            | Rule::Coverage
            | Rule::LambdaFlipRate
            | Rule::ToolLoops
            | Rule::ErrorRate => Lever::Route,
            Rule::P99LatencyRatio | Rule::RateLimited => Lever::Degrade,
            Rule::DuplicateEffects => Lever::None,
        }
    }

    /// The ΔS probe (or the signal of one) the rule judges: `retrieval` (question → retrieved),
    /// `answer` (retrieved → answer), `combined` (the max of both); `None` for the other rules. Named in
    /// snapshots, trip reports and /status.
    pub fn probe(self) -> Option<&'static str> {
        match self {
            Rule::RetrievalDriftP95 | Rule::RetrievalDriftP50 | Rule::RetrievalCoverage => {
                Some("retrieval")
            }
            Rule::AnswerDriftP95 | Rule::AnswerDriftP50 | Rule::Coverage => Some("answer"),
            Rule::DeltaSP95Drift | Rule::DeltaSP50Drift => Some("combined"),
            _ => None,
        }
    }

    /// Rules computed from the evaluated signals (they need evaluated samples, not just requests).
    fn needs_signals(self) -> bool {
        self.probe().is_some() || self == Rule::LambdaFlipRate
    }
}

/// Default of `retrieval_coverage_under` (README, "Probes": the figures behind it).
const RETRIEVAL_COVERAGE_UNDER: f64 = 0.45;

/// The probe a rule named `rule` judges (see [`Rule::probe`]); `None` for other rules and manual trips.
pub fn probe_of(rule: &str) -> Option<&'static str> {
    Rule::ALL
        .iter()
        .find(|r| r.name() == rule)
        .and_then(|r| r.probe())
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
    let deferred = baseline.is_some_and(|base| probe_moved(set, arm, base));
    for &(rule, threshold) in &set.thresholds {
        // λ follows the combined ΔS series too: it defers alike.
        if deferred
            && matches!(
                rule,
                Rule::DeltaSP95Drift | Rule::DeltaSP50Drift | Rule::LambdaFlipRate
            )
        {
            continue;
        }
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
            drift_rule(rule, threshold, &arm.delta_s, &base.delta_s)?
        }
        Rule::RetrievalDriftP95 | Rule::RetrievalDriftP50 => {
            drift_rule(rule, threshold, &arm.delta_s_qr, &base.delta_s_qr)?
        }
        Rule::AnswerDriftP95 | Rule::AnswerDriftP50 => {
            drift_rule(rule, threshold, &arm.delta_s_ra, &base.delta_s_ra)?
        }
        Rule::Coverage => mean_under_rule(threshold, &arm.coverage, &base.coverage)?,
        Rule::RetrievalCoverage => {
            mean_under_rule(threshold, &arm.retrieval_coverage, &base.retrieval_coverage)?
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

/// The level at which a probe counts as moved for [`probe_moved`].
const PROBE_MOVED_ALPHA: f64 = 0.05;

/// Whether a probe whose own drift rules are on (threshold under 1) is significantly worse on the arm
/// than on the baseline. The combined view (`delta_s_*`, the max of the probes, and the λ flip rate,
/// which follows the series of that max) then defers to the
/// probe's rules, so the trip names the probe and pulls its lever: on a small window the max's quantile
/// can cross its threshold a tick before the probe's own does.
///
/// "Worse" here is a shift at [`PROBE_MOVED_ALPHA`], looser than the rules' own confidence: the
/// combined view must not trip a tick before a probe that is on its way there (the probe's rule still
/// needs the full confidence to trip), and the combined view still judges when neither probe moved.
fn probe_moved(set: &RuleSet, arm: &Summary, base: &Summary) -> bool {
    let on = |rules: [Rule; 2]| rules.iter().any(|&r| set.threshold(r) < 1.0);
    let worse = |a: &[(u64, u64)], b: &[(u64, u64)]| {
        stats::mann_whitney_greater(a.iter().copied(), b.iter().copied()) < PROBE_MOVED_ALPHA
    };
    (on([Rule::RetrievalDriftP95, Rule::RetrievalDriftP50])
        && worse(&arm.delta_s_qr, &base.delta_s_qr))
        || (on([Rule::AnswerDriftP95, Rule::AnswerDriftP50])
            && worse(&arm.delta_s_ra, &base.delta_s_ra))
}

/// A ΔS drift rule: quantile (p95 for the `*_p95` rules, else p50) of the arm − the baseline's over
/// `threshold`, and the arm's distribution greater by Mann-Whitney U.
fn drift_rule(
    rule: Rule,
    threshold: f64,
    arm: &[(u64, u64)],
    base: &[(u64, u64)],
) -> Option<(f64, f64, bool, bool, f64)> {
    let q = if matches!(
        rule,
        Rule::DeltaSP95Drift | Rule::RetrievalDriftP95 | Rule::AnswerDriftP95
    ) {
        0.95
    } else {
        0.5
    };
    let a = summary::bucket_quantile(arm, q)?;
    let b = summary::bucket_quantile(base, q)?;
    let drift = a - b;
    if drift <= threshold {
        return None;
    }
    let p = stats::mann_whitney_greater(arm.iter().copied(), base.iter().copied());
    Some((drift, b, true, false, p))
}

/// A mean-under rule (coverage, retrieval coverage): the arm's window mean under `threshold` and lower
/// than the baseline's by Welch's t; the baseline breaches as much when its mean is under the
/// threshold and at most the arm's.
fn mean_under_rule(
    threshold: f64,
    arm: &[(u64, u64)],
    base: &[(u64, u64)],
) -> Option<(f64, f64, bool, bool, f64)> {
    let (ma, va) = summary::moments(arm)?;
    let (mb, vb) = summary::moments(base)?;
    if ma >= threshold {
        return None;
    }
    let n = |h: &[(u64, u64)]| h.iter().map(|(_, c)| c).sum::<u64>();
    let p = stats::welch_less(ma, va, n(arm), mb, vb, n(base));
    Some((ma, mb, true, mb < threshold && mb <= ma, p))
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

pub mod significance;
mod summary;
mod targets;

use summary::share;
pub use summary::Summary;
pub use targets::{exit_targets, Target};

#[cfg(test)]
mod tests;
