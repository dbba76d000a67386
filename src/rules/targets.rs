//! The exit targets of the recovery watch (SPEC §6 "watch for green"), judged by the engine while
//! tripped or recovering and shown in `/status`.

use serde::Serialize;

use super::{RuleSet, Summary};
use crate::config;

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
