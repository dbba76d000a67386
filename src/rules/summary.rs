//! [`Summary`]: what the rules read of one window, and what a pinned baseline and a snapshot store.
//! Built by the engine from an arm's live window; read by every rule and exit target.

use serde::{Deserialize, Serialize};

use crate::windows::{Counter, Hist, WindowStats, SIGNAL_SCALE};

/// What the rules read of one window. Serializable: a pinned baseline is one of these, and snapshots
/// carry them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Summary {
    pub span_seconds: u64,
    pub requests: u64,
    /// Failed responses: 5xx, and responses the upstream broke off after their head.
    pub errors_5xx: u64,
    pub rate_limited: u64,
    pub pin_mismatches: u64,
    pub tool_loops: u64,
    pub evaluated: u64,
    /// Divergent + chaotic λ states.
    pub lambda_flips: u64,
    /// ΔS (max probe) as (value × 10 000, count), ascending.
    pub delta_s: Vec<(u64, u64)>,
    /// The retrieval probe ΔS(question, retrieved) as (value × 10 000, count), ascending.
    pub delta_s_qr: Vec<(u64, u64)>,
    /// The answer probe ΔS(retrieved, answer) as (value × 10 000, count), ascending.
    pub delta_s_ra: Vec<(u64, u64)>,
    /// Coverage as (value × 10 000, count), ascending.
    pub coverage: Vec<(u64, u64)>,
    /// Retrieval coverage as (value × 10 000, count), ascending.
    pub retrieval_coverage: Vec<(u64, u64)>,
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
            errors_5xx: w.errors(),
            rate_limited: w.counter(Counter::RateLimited),
            pin_mismatches: w.counter(Counter::PinMismatches),
            tool_loops: w.counter(Counter::ToolLoops),
            evaluated: w.counter(Counter::Evaluated),
            lambda_flips: w.counter(Counter::LambdaDivergent) + w.counter(Counter::LambdaChaotic),
            delta_s: w.hist(Hist::DeltaS).buckets().collect(),
            delta_s_qr: w.hist(Hist::DeltaSQr).buckets().collect(),
            delta_s_ra: w.hist(Hist::DeltaSRa).buckets().collect(),
            coverage: w.hist(Hist::Coverage).buckets().collect(),
            retrieval_coverage: w.hist(Hist::RetrievalCoverage).buckets().collect(),
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

    pub fn retrieval_coverage_n(&self) -> u64 {
        self.retrieval_coverage.iter().map(|(_, n)| n).sum()
    }

    /// Mean and sample variance of retrieval coverage, in [0, 1] units.
    pub fn retrieval_coverage_moments(&self) -> Option<(f64, f64)> {
        moments(&self.retrieval_coverage)
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
            "retrieval_delta_s_p50": bucket_quantile(&self.delta_s_qr, 0.5),
            "retrieval_delta_s_p95": bucket_quantile(&self.delta_s_qr, 0.95),
            "answer_delta_s_p50": bucket_quantile(&self.delta_s_ra, 0.5),
            "answer_delta_s_p95": bucket_quantile(&self.delta_s_ra, 0.95),
            "coverage_mean": self.coverage_moments().map(|(m, _)| m),
            "retrieval_coverage_mean": self.retrieval_coverage_moments().map(|(m, _)| m),
            "latency_ms": {
                "p50": ms(self.latency_p50_us),
                "p95": ms(self.latency_p95_us),
                "p99": ms(self.latency_p99_us),
            },
        })
    }
}

pub(super) fn share(x: u64, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        x as f64 / n as f64
    }
}

/// Quantile `q` of a (scaled value, count) histogram, back in [0, 1]; rank `ceil(q·n)` as the windows do.
pub(super) fn bucket_quantile(buckets: &[(u64, u64)], q: f64) -> Option<f64> {
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
pub(super) fn moments(buckets: &[(u64, u64)]) -> Option<(f64, f64)> {
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
