//! Windows: per-arm rings of time slots holding HDR-layout histograms and counters (SPEC §4).
//!
//! The request path records into the slot of the current 10 s period with relaxed atomic adds — no lock,
//! no allocation. Readers (the rule engine, `/status`, `/metrics`) merge the newest slots into a
//! [`WindowStats`] and read quantiles from it.
//!
//! The histogram uses the HdrHistogram bucket layout (256 sub-buckets: ≤ 0.4 % relative error at the
//! reported midpoint) over `AtomicU64` counts. The `hdrhistogram` crate records through `&mut` and, for
//! concurrent use, per-thread recorders synchronised by a blocking phaser; plain atomics fit a hot path
//! shared by every connection task better.
//!
//! [`arm`] holds the one write API for an arm ([`ArmStats`]) and the registry of arms ([`Arms`]).

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::time::{Duration, Instant};

// The ring's geometry is config's: `rules.window` is bounded by it, and config sits below windows.
pub use crate::config::{MAX_SPAN, MAX_WINDOW, SLOT, SLOTS};

pub mod arm;

pub use arm::{ArmStats, Arms, Evaluation, Mirror, Mirrors, NoMirror};

/// log2 of the sub-bucket count; 8 → 256 sub-buckets, bucket width ≤ 1/128 of its values.
const SUB_BITS: u32 = 8;
const SUB_COUNT: u64 = 1 << SUB_BITS;
const SUB_HALF: u64 = SUB_COUNT / 2;

/// What a histogram holds and the largest value it keeps (larger values are clamped to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hist {
    /// Request latency until the response body completed, µs.
    Latency,
    /// Time to the first response body byte (TTFT for streams), µs.
    Ttfb,
    /// ΔS(question, retrieved centroid), in [`SIGNAL_SCALE`] units.
    DeltaSQr,
    /// ΔS(retrieved centroid, anchor), in [`SIGNAL_SCALE`] units.
    DeltaSRa,
    /// max(qr, ra), in [`SIGNAL_SCALE`] units.
    DeltaS,
    /// Evidence coverage, in [`SIGNAL_SCALE`] units.
    Coverage,
    /// Retrieval coverage (IDF-weighted share of the question's tokens in the chunks), in
    /// [`SIGNAL_SCALE`] units.
    RetrievalCoverage,
}

/// Signals in [0, 1] are recorded as integers in units of 1/SIGNAL_SCALE.
pub const SIGNAL_SCALE: f64 = 10_000.0;

impl Hist {
    pub const ALL: [Hist; 7] = [
        Hist::Latency,
        Hist::Ttfb,
        Hist::DeltaSQr,
        Hist::DeltaSRa,
        Hist::DeltaS,
        Hist::Coverage,
        Hist::RetrievalCoverage,
    ];

    /// Largest recordable value: 2^32 µs ≈ 71 minutes for times, 2^14 > SIGNAL_SCALE for signals.
    const fn max_bits(self) -> u32 {
        match self {
            Hist::Latency | Hist::Ttfb => 32,
            Hist::DeltaSQr
            | Hist::DeltaSRa
            | Hist::DeltaS
            | Hist::Coverage
            | Hist::RetrievalCoverage => 14,
        }
    }

    /// A value in [0, 1] in this histogram's integer units.
    pub fn scaled(value: f64) -> u64 {
        (value.clamp(0.0, 1.0) * SIGNAL_SCALE).round() as u64
    }
}

/// The ΔS histograms by probe: the `probe` label of `driftguard_semantic_drift`, in the order of
/// [`Evaluation::probes`].
pub const PROBES: [(Hist, &str); 3] = [
    (Hist::DeltaSQr, "qr"),
    (Hist::DeltaSRa, "ra"),
    (Hist::DeltaS, "max"),
];

/// The λ states (SPEC §3), the one list of their names: the `state` label of `driftguard_lambda_total`,
/// in the order of [`Counter::LAMBDA`] and of `signals::measure::Lambda::ALL` ([`Evaluation::lambda`]
/// indexes it).
pub const LAMBDA_STATES: [&str; 4] = ["convergent", "recursive", "divergent", "chaotic"];

/// Counters kept per slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    Class1xx,
    Class2xx,
    Class3xx,
    Class4xx,
    Class5xx,
    /// 429 responses, upstream-made or proxy-made.
    RateLimited,
    /// Upstream unreachable or failed before a response (502 by the proxy).
    UpstreamErrors,
    /// Upstream did not answer in time (504 by the proxy).
    Timeouts,
    /// Responses the upstream broke off, or left silent past `upstream.body_idle_timeout`, after their
    /// head: counted with their status class as sent, and as errors by [`WindowStats::error_rate`].
    BrokenOff,
    /// Upstream-echoed pins that differ from the stamped ones.
    PinMismatches,
    /// Responses whose signals were computed.
    Evaluated,
    LambdaConvergent,
    LambdaRecursive,
    LambdaDivergent,
    LambdaChaotic,
    /// Responses with a tool loop.
    ToolLoops,
    PromptTokens,
    CompletionTokens,
}

const COUNTERS: usize = Counter::CompletionTokens as usize + 1;

impl Counter {
    /// The λ counters in the order of [`LAMBDA_STATES`].
    pub const LAMBDA: [Counter; 4] = [
        Counter::LambdaConvergent,
        Counter::LambdaRecursive,
        Counter::LambdaDivergent,
        Counter::LambdaChaotic,
    ];

    /// The status-class counter for an HTTP status code.
    pub fn class_of(status: u16) -> Counter {
        match status {
            100..=199 => Counter::Class1xx,
            200..=299 => Counter::Class2xx,
            300..=399 => Counter::Class3xx,
            400..=499 => Counter::Class4xx,
            _ => Counter::Class5xx,
        }
    }
}

// === impl AtomicHistogram ===

/// A fixed-layout HDR histogram with atomic counts; `record` is wait-free.
pub struct AtomicHistogram {
    counts: Box<[AtomicU64]>,
    max_value: u64,
}

impl AtomicHistogram {
    pub fn new(max_bits: u32) -> Self {
        let max_value = (1u64 << max_bits) - 1;
        let len = index_of(max_value) + 1;
        AtomicHistogram {
            counts: (0..len).map(|_| AtomicU64::new(0)).collect(),
            max_value,
        }
    }

    #[inline]
    pub fn record(&self, value: u64) {
        self.counts[index_of(value.min(self.max_value))].fetch_add(1, Relaxed);
    }

    fn reset(&self) {
        for c in self.counts.iter() {
            c.store(0, Relaxed);
        }
    }

    fn add_into(&self, into: &mut Snapshot) {
        for (dst, src) in into.counts.iter_mut().zip(self.counts.iter()) {
            let n = src.load(Relaxed);
            *dst += n;
            into.total += n;
        }
    }
}

/// Bucket index of a value in the HDR layout.
#[inline]
fn index_of(value: u64) -> usize {
    let bits = 64 - value.leading_zeros();
    let bucket = bits.saturating_sub(SUB_BITS);
    let sub = value >> bucket;
    (bucket as u64 * SUB_HALF + sub) as usize
}

/// Significant bits the fleet keeps of a histogram value when it merges replicas' windows: 32 buckets
/// per octave, each at most 1/32 of its values wide (a quantile read from the merged window is within
/// 1.6 % of the one the full layout gives).
pub const FLEET_SIG_BITS: u32 = 6;

/// The midpoint of the bucket holding `value` in a coarser layout of the same shape, one that keeps
/// `sig_bits` significant bits (2^(sig_bits-1) sub-buckets per octave, width ≤ 1/2^(sig_bits-1) of its
/// values; values below 2^sig_bits stay exact). Coarsening a midpoint of this layout lands in the same
/// coarse bucket as every value of its fine bucket, so counts coarsened anywhere add up alike.
pub fn coarse_midpoint(value: u64, sig_bits: u32) -> u64 {
    let shift = (64 - value.leading_zeros()).saturating_sub(sig_bits);
    let low = (value >> shift) << shift;
    low + ((1u64 << shift) - 1) / 2
}

/// Lowest value and width of the bucket at an index.
fn bucket_range(index: usize) -> (u64, u64) {
    let index = index as u64;
    if index < SUB_COUNT {
        return (index, 1);
    }
    let bucket = index / SUB_HALF - 1;
    let sub = index - bucket * SUB_HALF;
    (sub << bucket, 1 << bucket)
}

// === impl Snapshot ===

/// Merged counts of one histogram over a window, for reading.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    counts: Vec<u64>,
    total: u64,
}

impl Snapshot {
    fn for_hist(h: &AtomicHistogram) -> Self {
        Snapshot {
            counts: vec![0; h.counts.len()],
            total: 0,
        }
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// Value at quantile `q` (0.0..=1.0), the midpoint of its bucket; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, width) = bucket_range(i);
                return Some(low + (width - 1) / 2);
            }
        }
        None
    }

    /// Mean of the recorded values (bucket midpoints).
    pub fn mean(&self) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let sum: f64 = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, &n)| {
                let (low, width) = bucket_range(i);
                n as f64 * (low as f64 + (width - 1) as f64 / 2.0)
            })
            .sum();
        Some(sum / self.total as f64)
    }

    /// Non-empty buckets as (midpoint value, count), ascending.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, &n)| {
                let (low, width) = bucket_range(i);
                (low + (width - 1) / 2, n)
            })
    }
}

// === impl Window ===

struct Slot {
    /// The slot period this slot currently holds.
    epoch: Period,
    hists: [AtomicHistogram; Hist::ALL.len()],
    counters: [AtomicU64; COUNTERS],
}

impl Slot {
    fn new() -> Self {
        Slot {
            epoch: Period::default(),
            hists: Hist::ALL.map(|h| AtomicHistogram::new(h.max_bits())),
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Makes this slot hold period `epoch`; see [`Period::claim`]. The rotation task claims each slot
    /// ahead of its period, so the request path almost never clears one.
    #[inline]
    fn claim(&self, epoch: u64) -> bool {
        self.epoch.claim(epoch, || {
            for h in &self.hists {
                h.reset();
            }
            for c in &self.counters {
                c.store(0, Relaxed);
            }
        })
    }
}

/// The period a ring slot holds: how the lock-free rings here and in the breaker reuse a slot.
#[derive(Debug)]
pub struct Period(AtomicU64);

impl Default for Period {
    fn default() -> Self {
        Period(AtomicU64::new(EMPTY))
    }
}

impl Period {
    /// The period held, or `None` while never used or being cleared.
    #[inline]
    pub fn get(&self) -> Option<u64> {
        let p = self.0.load(Acquire);
        (p < RESETTING).then_some(p)
    }

    /// Makes the slot hold period `epoch`, running `clear` when it held an older one. Returns false when
    /// it already holds a newer period (a record more than a whole ring late is dropped).
    ///
    /// The first caller for a new period marks the slot `RESETTING`, clears it, then publishes the
    /// period; anyone arriving meanwhile waits for the publish, so no record is wiped.
    #[inline]
    pub fn claim(&self, epoch: u64, clear: impl FnOnce()) -> bool {
        loop {
            let current = self.0.load(Acquire);
            if current == epoch {
                return true;
            }
            if current == RESETTING {
                std::hint::spin_loop();
                std::thread::yield_now();
                continue;
            }
            if current != EMPTY && current > epoch {
                return false;
            }
            if self
                .0
                .compare_exchange(current, RESETTING, Acquire, Relaxed)
                .is_ok()
            {
                clear();
                self.0.store(epoch, Release);
                return true;
            }
        }
    }
}

/// Epoch of a slot never used.
const EMPTY: u64 = u64::MAX;
/// Epoch of a slot being cleared.
const RESETTING: u64 = u64::MAX - 1;

/// One arm's ring of slots.
pub struct Window {
    origin: Instant,
    slots: Box<[Slot]>,
}

impl Window {
    /// A window whose slot periods count from `origin` (share one origin so all windows rotate together).
    pub fn new(origin: Instant) -> Self {
        Window {
            origin,
            slots: (0..SLOTS).map(|_| Slot::new()).collect(),
        }
    }

    #[inline]
    fn epoch_at(&self, at: Instant) -> u64 {
        // Whole seconds and a u64 division: `as_millis` would divide in u128.
        at.saturating_duration_since(self.origin).as_secs() / SLOT.as_secs()
    }

    #[inline]
    fn slot_at(&self, at: Instant) -> Option<&Slot> {
        let epoch = self.epoch_at(at);
        let slot = &self.slots[(epoch % SLOTS as u64) as usize];
        slot.claim(epoch).then_some(slot)
    }

    /// Records a histogram value at time `at`.
    #[inline]
    pub fn record(&self, at: Instant, hist: Hist, value: u64) {
        if let Some(slot) = self.slot_at(at) {
            slot.hists[hist as usize].record(value);
        }
    }

    /// Adds `n` to a counter at time `at`.
    #[inline]
    pub fn count(&self, at: Instant, counter: Counter, n: u64) {
        if let Some(slot) = self.slot_at(at) {
            slot.counters[counter as usize].fetch_add(n, Relaxed);
        }
    }

    /// Clears the slot of the next period ahead of time so the request path rarely has to. Called by a
    /// periodic task.
    pub fn prepare_next(&self, now: Instant) {
        let next = self.epoch_at(now) + 1;
        self.slots[(next % SLOTS as u64) as usize].claim(next);
    }

    /// Merges the slots covering the whole of the last `span`: from the slot holding `now − span` to the
    /// current one, so the merged window covers at least `span` (up to one slot more) and never shrinks
    /// to a freshly rotated, empty slot. At most `SLOTS − 1` slots: the oldest may be being cleared for
    /// the next period.
    pub fn stats(&self, now: Instant, span: Duration) -> WindowStats {
        let newest = self.epoch_at(now);
        let reach = now.checked_sub(span).map_or(0, |from| self.epoch_at(from));
        let n = (newest - reach.min(newest) + 1).clamp(1, SLOTS as u64 - 1);
        let oldest = newest.saturating_sub(n - 1);
        self.merge(oldest, newest, n)
    }

    /// The slot period `at` falls in.
    pub fn epoch(&self, at: Instant) -> u64 {
        self.epoch_at(at)
    }

    /// What one slot period holds (empty when the ring no longer or not yet holds it): the fleet
    /// pushes a slot's growth since its last interval.
    pub fn slot(&self, epoch: u64) -> WindowStats {
        self.merge(epoch, epoch, 1)
    }

    /// Merges the slots of periods `oldest..=newest`, `n` slots long.
    fn merge(&self, oldest: u64, newest: u64, n: u64) -> WindowStats {
        let mut stats = WindowStats {
            span: Duration::from_millis(n * SLOT.as_millis() as u64),
            hists: std::array::from_fn(|i| Snapshot::for_hist(&self.slots[0].hists[i])),
            counters: [0; COUNTERS],
        };
        for slot in self.slots.iter() {
            let Some(epoch) = slot.epoch.get() else {
                continue;
            };
            if epoch < oldest || epoch > newest {
                continue;
            }
            for (snap, h) in stats.hists.iter_mut().zip(slot.hists.iter()) {
                h.add_into(snap);
            }
            for (total, c) in stats.counters.iter_mut().zip(slot.counters.iter()) {
                *total += c.load(Relaxed);
            }
        }
        stats
    }
}

/// A merged window: histograms and counters over `span`.
#[derive(Debug, Clone)]
pub struct WindowStats {
    pub span: Duration,
    hists: [Snapshot; Hist::ALL.len()],
    counters: [u64; COUNTERS],
}

impl WindowStats {
    pub fn hist(&self, hist: Hist) -> &Snapshot {
        &self.hists[hist as usize]
    }

    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters[counter as usize]
    }

    /// λ flip rate: (divergent + chaotic) / evaluated; `None` before any evaluation.
    pub fn lambda_flip_rate(&self) -> Option<f64> {
        let n = self.counter(Counter::Evaluated);
        let flips = self.counter(Counter::LambdaDivergent) + self.counter(Counter::LambdaChaotic);
        (n > 0).then(|| flips as f64 / n as f64)
    }

    /// Quantile of a signal histogram, back in [0, 1].
    pub fn signal_quantile(&self, hist: Hist, q: f64) -> Option<f64> {
        // The top bucket's midpoint can sit just above SIGNAL_SCALE.
        self.hist(hist)
            .quantile(q)
            .map(|v| (v as f64 / SIGNAL_SCALE).min(1.0))
    }

    /// Mean of a signal histogram, back in [0, 1].
    pub fn signal_mean(&self, hist: Hist) -> Option<f64> {
        self.hist(hist).mean().map(|v| (v / SIGNAL_SCALE).min(1.0))
    }

    /// Responses of every status class.
    pub fn requests(&self) -> u64 {
        self.counters[..=Counter::Class5xx as usize].iter().sum()
    }

    /// Failed responses: 5xx, and responses broken off after their head.
    pub fn errors(&self) -> u64 {
        self.counter(Counter::Class5xx) + self.counter(Counter::BrokenOff)
    }

    /// Share of the responses that failed ([`WindowStats::errors`]), 0 when there were none.
    pub fn error_rate(&self) -> f64 {
        let n = self.requests();
        if n == 0 {
            0.0
        } else {
            (self.errors() as f64 / n as f64).min(1.0)
        }
    }
}

#[cfg(test)]
mod tests;
