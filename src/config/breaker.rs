//! `[breaker]`: the per-arm circuit breaker (SPEC §5); read by `guards::breaker` and tightened by
//! `rollback`'s throttle step.

use serde::Deserialize;

use super::dur::{secs, Dur};
use super::{err, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Breaker {
    /// Span of the calls the failure and slow-call rates are measured over.
    pub window: Dur,
    /// Share of failed calls (5xx, timeouts, connect errors) in `window` that opens the breaker, in (0, 1].
    pub failure_rate: f64,
    /// Calls in `window` needed before either rate can open the breaker.
    pub min_calls: u64,
    /// A call slower than this counts as slow.
    pub slow_call: Dur,
    /// Share of slow calls in `window` that opens the breaker, in (0, 1].
    pub slow_call_rate: f64,
    /// How long an open breaker stays open before it lets probes through (±10 % jitter).
    pub open_for: Dur,
    /// Successful probes in half-open that close the breaker; one failure reopens it.
    pub half_open_probes: u32,
    /// Arm that takes the requests of an arm whose breaker is open (SPEC §5 "route to the degrade
    /// target"); empty = fail fast with 503.
    pub degrade_target: String,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            window: secs(10),
            failure_rate: 0.5,
            min_calls: 20,
            slow_call: secs(5),
            slow_call_rate: 0.8,
            open_for: secs(10),
            half_open_probes: 5,
            degrade_target: String::new(),
        }
    }
}

impl Breaker {
    /// The checks within `[breaker]`; `degrade_target` names an arm, so the root checks it.
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        for (key, v) in [
            ("breaker.failure_rate", self.failure_rate),
            ("breaker.slow_call_rate", self.slow_call_rate),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                errors.push(err(key, "must be in (0, 1]"));
            }
        }
    }
}
