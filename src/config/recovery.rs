//! `[recovery]`: the exit targets a tripped arm must hold to turn healthy again (SPEC §6 "watch for
//! green"); read by `rules` (exit targets) and `rollback` (hold and deadline).

use serde::Deserialize;

use super::dur::{secs, Dur};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recovery {
    /// How long the exit targets must hold before the state turns healthy.
    pub hold: Dur,
    /// Not healthy this long after the trip: the state turns escalated.
    pub deadline: Dur,
    /// Exit target: error rate below this share.
    pub error_rate_under: f64,
    /// Exit target: p95 latency at most this much above the baseline's (0.15 = 1.15 ×).
    pub p95_latency_uplift_max: f64,
    /// Exit target: ΔS p95 and coverage within this of the baseline.
    pub tolerance: f64,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            hold: secs(600),
            deadline: secs(900),
            error_rate_under: 0.005,
            p95_latency_uplift_max: 0.15,
            tolerance: 0.03,
        }
    }
}
