//! `signals.max_evals_per_sec`: a token bucket over the sampled requests, so the evaluation cost has a
//! ceiling whatever the traffic. It is asked on the request path when a request is sampled, before
//! its bodies are copied, so a request over the rate costs one atomic operation and no copy.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use prometheus::IntCounter;

/// A lock-free token bucket in its GCRA form: one "theoretical arrival time" that every admitted
/// evaluation pushes one interval further; an evaluation is admitted while that time stays within one
/// second (the burst) of now.
pub struct EvalRate {
    /// Nanoseconds between evaluations at the configured rate.
    interval: u64,
    /// How far ahead of now the arrival time may run: a burst of one second's evaluations (at least 1).
    capacity: u64,
    /// Theoretical arrival time, in nanoseconds since `epoch`.
    tat: AtomicU64,
    epoch: Instant,
    /// `eval_skipped_total{reason="rate_limited"}`.
    skipped: IntCounter,
}

impl std::fmt::Debug for EvalRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvalRate")
            .field("interval_ns", &self.interval)
            .finish_non_exhaustive()
    }
}

const SECOND: u64 = 1_000_000_000;

impl EvalRate {
    /// A bucket of `per_sec` evaluations per second (above 0).
    pub fn new(per_sec: f64, skipped: IntCounter) -> EvalRate {
        let interval = (SECOND as f64 / per_sec).clamp(1.0, u64::MAX as f64 / 4.0) as u64;
        EvalRate {
            interval,
            capacity: interval.max(SECOND),
            tat: AtomicU64::new(0),
            epoch: Instant::now(),
            skipped,
        }
    }

    /// Takes a token if there is one; counts the skip otherwise.
    pub fn admit(&self) -> bool {
        self.admit_at(self.epoch.elapsed().as_nanos() as u64)
    }

    fn admit_at(&self, now: u64) -> bool {
        let mut tat = self.tat.load(Relaxed);
        loop {
            let next = tat.max(now) + self.interval;
            if next - now > self.capacity {
                self.skipped.inc();
                return false;
            }
            match self.tat.compare_exchange_weak(tat, next, Relaxed, Relaxed) {
                Ok(_) => return true,
                Err(current) => tat = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_the_rate_with_one_second_of_burst() {
        let rate = EvalRate::new(5.0, IntCounter::new("t", "t").unwrap());
        // 100 requests/s for 10 s: a burst of 5, then 5 a second.
        let admitted = (0..1000u64)
            .filter(|i| rate.admit_at(i * SECOND / 100))
            .count();
        assert!((50..=56).contains(&admitted), "{admitted}");
        assert_eq!(rate.skipped.get(), 1000 - admitted as u64);
    }

    #[test]
    fn a_rate_below_one_still_admits_the_first() {
        let rate = EvalRate::new(0.5, IntCounter::new("t", "t").unwrap());
        assert!(rate.admit_at(0));
        assert!(!rate.admit_at(SECOND));
        assert!(rate.admit_at(2 * SECOND));
    }
}
