//! The demo's words: the progress line printed each second and the report at the end, from the load
//! generator's counts and the `/status` document. Called by the demo loop in `demo/mod.rs`.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use super::{load, Outcome};
use crate::rollback::snapshot::snapshot_dir;
use crate::rollback::state::{GuardState, Trip};

/// The load generator's counts at one moment.
#[derive(Clone, Copy)]
pub(super) struct Snapshot {
    done: u64,
    baseline: u64,
    canary: u64,
    errors: u64,
    frozen_writes: u64,
    failed: u64,
}

impl Snapshot {
    pub(super) fn take(c: &load::Counts) -> Snapshot {
        Snapshot {
            done: c.done.load(Ordering::Relaxed),
            baseline: c.baseline.load(Ordering::Relaxed),
            canary: c.canary.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            frozen_writes: c.frozen_writes.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }
}

/// One arm's figures from the `/status` document.
fn arm_json<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["arms"]
        .as_array()
        .and_then(|arms| arms.iter().find(|a| a["name"] == name))
        .unwrap_or(&Value::Null)
}

/// `a/b` of one figure of both arms, `-` where there is none yet.
fn pair(status: &Value, pointer: &str, fmt: impl Fn(f64) -> String) -> String {
    let one = |arm: &str| {
        arm_json(status, arm)
            .pointer(pointer)
            .and_then(Value::as_f64)
            .map_or("-".to_string(), &fmt)
    };
    format!("{}/{}", one("baseline"), one("canary"))
}

pub(super) fn progress_line(
    elapsed: Duration,
    last: &Snapshot,
    now: &Snapshot,
    status: &Value,
    guard: GuardState,
) -> String {
    let done = now.done - last.done;
    let (b, c) = (now.baseline - last.baseline, now.canary - last.canary);
    let split = match b + c {
        0 => "-/-".to_string(),
        n => format!("{}/{}", b * 100 / n, c * 100 / n),
    };
    let weights = pair(status, "/weight", |w| format!("{w:.0}"));
    let mut line = format!(
        "t+{:>3}s  {done:>4} req/s  split {split:>5}  p95 {:>9} ms  ΔS p95 {:>9}  cov {:>9}  5xx {:>11}  weights {weights}  guard {}",
        elapsed.as_secs(),
        pair(status, "/window/latency_ms/p95", |v| format!("{v:.0}")),
        pair(status, "/window/signals/delta_s/p95", |v| format!("{v:.2}")),
        pair(status, "/window/signals/coverage_mean", |v| format!("{v:.2}")),
        pair(status, "/window/error_rate", |v| format!("{:.1}%", v * 100.0)),
        guard.as_str(),
    );
    let frozen = now.frozen_writes - last.frozen_writes;
    if frozen > 0 {
        let _ = write!(line, "  ({frozen} writes refused: frozen)");
    }
    line
}

/// "0.5123 < threshold 0.60 (baseline 0.93)".
pub(super) fn observed_text(t: &Trip) -> String {
    let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    let side = if t.rule.ends_with("coverage") {
        "<"
    } else {
        ">"
    };
    let mut s = format!(
        "{} {side} threshold {}",
        num(t.observed),
        t.threshold.map_or("-".to_string(), |v| format!("{v}"))
    );
    if let Some(b) = t.baseline_value {
        let _ = write!(s, " (baseline {b:.4})");
    }
    s
}

/// The rules that watch answer quality (the others watch errors, latency, pins, tools, writes).
pub const QUALITY_RULES: [&str; 9] = [
    "answer_drift_p95",
    "answer_drift_p50",
    "retrieval_drift_p95",
    "retrieval_drift_p50",
    "retrieval_coverage",
    "delta_s_p95_drift",
    "delta_s_p50_drift",
    "coverage",
    "lambda_flip_rate",
];

pub(super) struct Report<'a> {
    pub(super) trip: Option<&'a Trip>,
    pub(super) degrade_ms: u64,
    pub(super) started_ms: u64,
    pub(super) first_bad_ms: u64,
    /// When the progress first showed the trip, and the counts then.
    pub(super) at_trip: Option<&'a (Duration, Snapshot)>,
    pub(super) end: &'a Snapshot,
    /// The counts of the last progress line: the lines' per-second figures add up to these.
    pub(super) shown: &'a Snapshot,
    /// `--keep`: the listeners stay up after the report, so their URLs are worth printing.
    pub(super) keep: bool,
    pub(super) guard: GuardState,
    pub(super) state_dir: &'a Path,
    pub(super) admin: &'a str,
    pub(super) interrupted: bool,
}

impl Report<'_> {
    pub(super) fn outcome(&self) -> Outcome {
        match self.trip {
            Some(t) if t.at_ms >= self.degrade_ms => Outcome::Tripped,
            _ => Outcome::NotTripped,
        }
    }

    pub(super) fn render(&self) -> String {
        let t_plus = |ms: u64| format!("t+{:.2}s", ms.saturating_sub(self.started_ms) as f64 / 1e3);
        let mut out = String::from("\n== driftguard demo: report ==\n");
        match self.trip {
            None => {
                let _ = writeln!(
                    out,
                    "nothing tripped{} — the canary {} went bad at {}",
                    if self.interrupted {
                        " before the demo was interrupted"
                    } else {
                        " by the end of the run"
                    },
                    if self.first_bad_ms > 0 { "" } else { "never" },
                    t_plus(self.degrade_ms)
                );
            }
            Some(t) => {
                let kind = if QUALITY_RULES.contains(&t.rule.as_str()) {
                    "quality"
                } else {
                    "health"
                };
                if t.at_ms < self.degrade_ms {
                    let _ = writeln!(
                        out,
                        "tripped BEFORE the canary went bad (a false alarm): rule {} at {}",
                        t.rule,
                        t_plus(t.at_ms)
                    );
                } else {
                    let _ = writeln!(
                        out,
                        "tripped:        rule {} ({kind}) on arm {}, {:.2} s after the canary went bad (at {})",
                        t.rule,
                        t.arm,
                        (t.at_ms - self.degrade_ms) as f64 / 1e3,
                        t_plus(t.at_ms)
                    );
                }
                if self.first_bad_ms > 0 {
                    let _ = writeln!(
                        out,
                        "time to flip:   {:.2} s from the first bad response ({}) to the flip",
                        t.at_ms.saturating_sub(self.first_bad_ms) as f64 / 1e3,
                        t_plus(self.first_bad_ms)
                    );
                }
                let _ = writeln!(
                    out,
                    "{:16}{} over the {} s window{}",
                    "observed:",
                    observed_text(t),
                    t.window_seconds,
                    t.p_value
                        .map_or(String::new(), |p| format!(", p = {p:.2e}"))
                );
                let _ = writeln!(out, "{:16}{} — {}", "lever:", t.lever, t.action);
                if let Some(id) = &t.snapshot {
                    let path = snapshot_dir(self.state_dir).join(format!("{id}.json"));
                    let _ = writeln!(out, "{:16}{}", "snapshot:", path.display());
                }
                if let Some((seen, at)) = self.at_trip {
                    let _ = writeln!(
                        out,
                        "{:16}baseline {} requests, canary {}, 5xx {}",
                        format!("from t+{}s on:", seen.as_secs()),
                        self.end.baseline - at.baseline,
                        self.end.canary - at.canary,
                        self.end.errors - at.errors,
                    );
                }
            }
        }
        // Every frozen write came after the trip; the total is what the progress lines added up to,
        // plus any refused while the load stopped after the last line.
        if self.end.frozen_writes > 0 {
            let late = self.end.frozen_writes - self.shown.frozen_writes;
            let _ = writeln!(
                out,
                "{:16}{} refused while frozen{}",
                "writes:",
                self.end.frozen_writes,
                match late {
                    0 => String::new(),
                    n => format!(" ({n} after the last progress line)"),
                }
            );
        }
        let _ = writeln!(
            out,
            "{:16}{} requests answered, {} 5xx, {} without an answer",
            "traffic:", self.end.done, self.end.errors, self.end.failed
        );
        let _ = writeln!(out, "{:16}{}", "guard now:", self.guard.as_str());
        if self.keep {
            let _ = writeln!(out, "{:16}{}/metrics", "metrics:", self.admin);
            let _ = writeln!(out, "{:16}{}/status", "status:", self.admin);
        } else {
            let _ = writeln!(
                out,
                "{:16}the proxy and admin API stop with the demo; `--keep` keeps them up",
                "listeners:"
            );
        }
        let _ = write!(
            out,
            "{:16}{} (driftguard.toml, driftguard.log)",
            "files:",
            self.state_dir.display()
        );
        out
    }
}
