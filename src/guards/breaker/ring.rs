//! The breaker's sliding window: a ring of [`BUCKETS`] time buckets of outcome counters, written on
//! every completed call without a lock and summed when the breaker decides whether to open.
//! `super::Breaker` owns one per phase of its state.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::time::Duration;

use super::{nanos, Counts, BUCKETS};
use crate::windows::Period;

/// Outcome counters of one bucket-long period.
struct Bucket {
    /// The period this bucket holds.
    epoch: Period,
    calls: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
}

impl Bucket {
    fn new() -> Self {
        Bucket {
            epoch: Period::default(),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            slow: AtomicU64::new(0),
        }
    }

    /// Makes this bucket hold period `epoch` (see `windows::Period::claim`). Returns false when it
    /// already holds a newer period: the outcome is a whole window late.
    #[inline]
    fn claim(&self, epoch: u64) -> bool {
        self.epoch.claim(epoch, || {
            self.calls.store(0, Relaxed);
            self.failures.store(0, Relaxed);
            self.slow.store(0, Relaxed);
        })
    }
}

/// A sliding window of [`BUCKETS`] buckets, each `window / BUCKETS` long.
pub(super) struct Ring {
    bucket_nanos: u64,
    buckets: [Bucket; BUCKETS],
}

impl Ring {
    pub(super) fn new(window: Duration) -> Self {
        Ring {
            bucket_nanos: (nanos(window) / BUCKETS as u64).max(1),
            buckets: std::array::from_fn(|_| Bucket::new()),
        }
    }

    #[inline]
    fn epoch(&self, at: u64) -> u64 {
        at / self.bucket_nanos
    }

    #[inline]
    pub(super) fn record(&self, at: u64, failed: bool, slow: bool) {
        let epoch = self.epoch(at);
        let bucket = &self.buckets[(epoch % BUCKETS as u64) as usize];
        if !bucket.claim(epoch) {
            return;
        }
        // `calls` first, and the others with Release, so a reader that sees a failure or a slow call also
        // sees its call (see `counts`).
        bucket.calls.fetch_add(1, Relaxed);
        if failed {
            bucket.failures.fetch_add(1, Release);
        }
        if slow {
            bucket.slow.fetch_add(1, Release);
        }
    }

    /// Sums the buckets of the current period and the `BUCKETS - 1` before it.
    ///
    /// Writers keep adding while this reads. Reading `failures` and `slow` before `calls` (the reverse of
    /// `record`) means every failure or slow call seen has its call counted too, so a share read here is
    /// never above the true one; read the other way, a reader paused between the loads could see a
    /// handful of calls and thousands of failures, and open a healthy arm.
    pub(super) fn counts(&self, at: u64) -> Counts {
        let newest = self.epoch(at);
        let oldest = newest.saturating_sub(BUCKETS as u64 - 1);
        let mut counts = Counts::default();
        for bucket in &self.buckets {
            let Some(epoch) = bucket.epoch.get() else {
                continue;
            };
            if epoch < oldest || epoch > newest {
                continue;
            }
            counts.failures += bucket.failures.load(Acquire);
            counts.slow += bucket.slow.load(Acquire);
            counts.calls += bucket.calls.load(Relaxed);
        }
        counts
    }
}
