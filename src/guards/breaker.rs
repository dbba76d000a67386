//! Circuit breaker per arm (SPEC §5): stops sending requests to an arm that keeps failing or answering
//! slowly, and after a pause lets a few probes through to learn whether it has recovered.
//!
//! Closed, the breaker sits on every request, so that path takes no lock and allocates nothing: `admit` is
//! one atomic load and an `Arc` clone; `complete` adds into the current bucket of a ring of [`BUCKETS`]
//! time buckets spanning `window` and sums the ring to decide whether to open. State changes (closed →
//! open → half-open → closed or open again) take a mutex; an open breaker turns requests away without it.
//!
//! Time is always passed in, so the breaker is deterministic under test and callers can reuse the
//! `Instant` they already took for the request.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config;

mod pick;
mod ring;

pub use pick::{pick, BreakerOpen, HasBreaker, Picked};
use ring::Ring;

/// Buckets in the ring: the window slides in steps of `window / BUCKETS`, and an outcome counts for
/// between 90 % and 100 % of `window` — never longer.
const BUCKETS: usize = 10;
/// Each open interval is stretched or shortened by up to this share of `open_for`, so replicas that opened
/// together do not probe the arm in lockstep.
const JITTER: f64 = 0.1;
/// Retry-After for requests turned away while the probes are in flight. When the arm recovers depends on
/// the probes' answers, not on a clock; one second is the shortest `Retry-After` a client can be told.
const HALF_OPEN_RETRY_AFTER: Duration = Duration::from_secs(1);
/// [`BreakerSettings::tightened`] clamps its factor to at least this, so a rate never reaches zero and
/// `open_for` stays finite.
const MIN_TIGHTEN_FACTOR: f64 = 0.01;

/// The breaker's thresholds, from `[breaker]` (see [`config::Breaker`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Span over which failure and slow-call shares are measured.
    pub window: Duration,
    /// Failure share (5xx, timeouts, connect errors) at or above which the breaker opens.
    pub failure_rate: f64,
    /// Calls the window must hold before either share is judged.
    pub min_calls: u64,
    /// A call taking at least this long is slow.
    pub slow_call: Duration,
    /// Slow-call share at or above which the breaker opens.
    pub slow_call_rate: f64,
    /// How long the breaker stays open before probing (±10 % jitter).
    pub open_for: Duration,
    /// Probes admitted at once while half-open, and good probes needed to close.
    pub half_open_probes: u32,
}

impl From<&config::Breaker> for BreakerSettings {
    fn from(c: &config::Breaker) -> Self {
        BreakerSettings {
            window: c.window.0,
            failure_rate: c.failure_rate,
            min_calls: c.min_calls,
            slow_call: c.slow_call.0,
            slow_call_rate: c.slow_call_rate,
            open_for: c.open_for.0,
            half_open_probes: c.half_open_probes,
        }
    }
}

impl BreakerSettings {
    /// Stricter settings for the rollback throttle (SPEC §6): both rates × `factor`, `open_for` ÷ `factor`.
    /// `factor` is meant to lie in (0, 1]; it is clamped to [0.01, 1], and NaN leaves the settings as they
    /// are.
    pub fn tightened(&self, factor: f64) -> Self {
        let factor = if factor.is_nan() {
            1.0
        } else {
            factor.clamp(MIN_TIGHTEN_FACTOR, 1.0)
        };
        BreakerSettings {
            failure_rate: self.failure_rate * factor,
            slow_call_rate: self.slow_call_rate * factor,
            open_for: Duration::try_from_secs_f64(self.open_for.as_secs_f64() / factor)
                .unwrap_or(Duration::MAX),
            ..*self
        }
    }

    /// Probes in flight at once and good probes needed to close; zero would never close, so at least one.
    fn probes(&self) -> u32 {
        self.half_open_probes.max(1)
    }

    fn is_slow(&self, duration: Duration) -> bool {
        duration >= self.slow_call
    }

    /// Whether a closed breaker with these counts in its window opens. A share needs at least one
    /// occurrence, so a rate tightened towards zero does not open on a healthy arm.
    fn trips(&self, counts: Counts) -> bool {
        if counts.calls == 0 || counts.calls < self.min_calls {
            return false;
        }
        let share = |n: u64| n as f64 / counts.calls as f64;
        (counts.failures > 0 && share(counts.failures) >= self.failure_rate)
            || (counts.slow > 0 && share(counts.slow) >= self.slow_call_rate)
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Requests flow; outcomes are counted.
    Closed,
    /// Requests fail fast until `open_for` has passed.
    Open,
    /// A few probes are let through; the rest fail fast.
    HalfOpen,
}

impl State {
    /// Value of the `breaker_state{arm}` gauge (SPEC §8): 0 closed, 1 open, 2 half-open.
    pub fn as_metric(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }

    /// Name for `/status`, logs and the `x-driftguard-breaker` header.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Outcomes in a breaker's current window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub calls: u64,
    pub failures: u64,
    pub slow: u64,
}

/// The answer to [`Breaker::admit`].
#[derive(Debug)]
#[must_use]
pub enum BreakerAdmission {
    /// Send the request, then [`Ticket::complete`] with its outcome.
    Allowed(Ticket),
    /// Fail fast (503); the client may retry after `retry_after`.
    Rejected { retry_after: Duration },
}

// === impl Breaker ===

/// One arm's circuit breaker; clones share the same state.
#[derive(Clone)]
pub struct Breaker {
    inner: Arc<Inner>,
}

impl Breaker {
    /// A closed breaker. `now` is the origin its time buckets count from.
    pub fn new(settings: BreakerSettings, now: Instant) -> Self {
        Breaker {
            inner: Arc::new(Inner {
                origin: now,
                phase: AtomicU64::new(
                    Phase {
                        state: State::Closed,
                        generation: 0,
                    }
                    .pack(),
                ),
                open_until: AtomicU64::new(0),
                live: ArcSwap::from_pointee(Live::fresh(settings)),
                probes: Mutex::new(Probes::default()),
            }),
        }
    }

    /// Replaces the thresholds (config reload, rollback throttle) and keeps the state. The window's
    /// counts are kept too, unless `window` itself changed: its buckets then mean other spans, so it starts
    /// empty. A breaker already open stays open until the time it was given.
    pub fn set_settings(&self, settings: BreakerSettings) {
        // Under the transition lock so a concurrent close cannot swap in a ring with the old settings.
        let _probes = self.inner.lock();
        let current = self.inner.live.load();
        let ring = if current.settings.window == settings.window {
            current.ring.clone()
        } else {
            Arc::new(Ring::new(settings.window))
        };
        self.inner.live.store(Arc::new(Live { settings, ring }));
    }

    /// The thresholds in force.
    pub fn settings(&self) -> BreakerSettings {
        self.inner.live.load().settings
    }

    /// Whether a request may go to the arm now. Open, it fails fast; once `open_for` has passed, the
    /// first requests become probes.
    pub fn admit(&self, now: Instant) -> BreakerAdmission {
        let phase = self.inner.phase();
        match phase.state {
            State::Closed => BreakerAdmission::Allowed(self.inner.ticket(phase, false)),
            State::Open => match self.inner.open_remaining(now) {
                Some(retry_after) => BreakerAdmission::Rejected { retry_after },
                None => self.admit_probe(now),
            },
            State::HalfOpen => self.admit_probe(now),
        }
    }

    /// The state at `now`: half-open as soon as `open_for` has passed, even before a request arrives.
    pub fn state(&self, now: Instant) -> State {
        let phase = self.inner.phase();
        if phase.state == State::Open && self.inner.open_remaining(now).is_none() {
            let mut probes = self.inner.lock();
            return self.inner.half_open_if_due(&mut probes, now).state;
        }
        phase.state
    }

    /// Outcomes counted in the window at `now` (empty unless closed or just opened).
    pub fn counts(&self, now: Instant) -> Counts {
        self.inner
            .live
            .load()
            .ring
            .counts(self.inner.since_origin(now))
    }

    fn admit_probe(&self, now: Instant) -> BreakerAdmission {
        let inner = &self.inner;
        let mut probes = inner.lock();
        let phase = inner.half_open_if_due(&mut probes, now);
        match phase.state {
            // Another request closed it since the lock-free look.
            State::Closed => BreakerAdmission::Allowed(inner.ticket(phase, false)),
            State::Open => BreakerAdmission::Rejected {
                retry_after: inner.open_remaining(now).unwrap_or_default(),
            },
            State::HalfOpen => {
                if probes.in_flight < inner.live.load().settings.probes() {
                    probes.in_flight += 1;
                    BreakerAdmission::Allowed(inner.ticket(phase, true))
                } else {
                    BreakerAdmission::Rejected {
                        retry_after: HALF_OPEN_RETRY_AFTER,
                    }
                }
            }
        }
    }
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phase = self.inner.phase();
        f.debug_struct("Breaker")
            .field("state", &phase.state)
            .field("generation", &phase.generation)
            .field("settings", &self.inner.live.load().settings)
            .finish()
    }
}

// === impl Ticket ===

/// Permission to send one request. Complete it with the outcome; dropping it uncompleted (the client went
/// away) counts as neither success nor failure but frees its probe slot.
#[must_use = "complete the ticket with the request's outcome"]
pub struct Ticket {
    inner: Arc<Inner>,
    /// The phase it was admitted in; an outcome that arrives after the breaker moved on is ignored.
    generation: u64,
    probe: bool,
    completed: bool,
}

impl Ticket {
    /// Whether this request is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Records the outcome: `failed` for a 5xx, a timeout or a connect error; `duration` is judged
    /// against `slow_call`. A probe is good only when it neither failed nor was slow.
    pub fn complete(mut self, now: Instant, duration: Duration, failed: bool) {
        self.completed = true;
        let inner = &self.inner;
        let live = inner.live.load();
        let slow = live.settings.is_slow(duration);
        if self.probe {
            inner.probe_done(self.generation, now, Some(!failed && !slow));
            return;
        }
        let admitted_in = Phase {
            state: State::Closed,
            generation: self.generation,
        };
        if inner.phase() != admitted_in {
            // Opened since: calls that were already in flight say nothing about the next closed period.
            return;
        }
        let at = inner.since_origin(now);
        live.ring.record(at, failed, slow);
        if live.settings.trips(live.ring.counts(at)) {
            inner.trip(admitted_in, now);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.probe && !self.completed {
            self.inner.probe_done(self.generation, Instant::now(), None);
        }
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("generation", &self.generation)
            .field("probe", &self.probe)
            .finish()
    }
}

// === impl Inner ===

struct Inner {
    /// Time zero of the buckets and of `open_until`.
    origin: Instant,
    /// [`Phase`] packed into one word so the request path reads state and generation in one load. Written
    /// only under `probes`.
    phase: AtomicU64,
    /// When an open breaker turns half-open, in nanoseconds since `origin`; written before `phase`.
    open_until: AtomicU64,
    /// Thresholds and the window they count into, swapped whole on reload and on close.
    live: ArcSwap<Live>,
    /// The transition lock, and the half-open bookkeeping it guards.
    probes: Mutex<Probes>,
}

struct Live {
    settings: BreakerSettings,
    ring: Arc<Ring>,
}

impl Live {
    fn fresh(settings: BreakerSettings) -> Self {
        Live {
            ring: Arc::new(Ring::new(settings.window)),
            settings,
        }
    }
}

#[derive(Default)]
struct Probes {
    in_flight: u32,
    succeeded: u32,
}

/// A state and how many transitions led to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Phase {
    state: State,
    generation: u64,
}

impl Phase {
    fn pack(self) -> u64 {
        (self.generation << 2) | self.state.as_metric() as u64
    }

    fn unpack(word: u64) -> Self {
        let state = match word & 0b11 {
            0 => State::Closed,
            1 => State::Open,
            _ => State::HalfOpen,
        };
        Phase {
            state,
            generation: word >> 2,
        }
    }

    fn next(self, state: State) -> Self {
        Phase {
            state,
            generation: self.generation + 1,
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Probes> {
        // The guarded counters stay consistent even if a holder panicked.
        self.probes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[inline]
    fn phase(&self) -> Phase {
        Phase::unpack(self.phase.load(Acquire))
    }

    #[inline]
    fn since_origin(&self, now: Instant) -> u64 {
        nanos(now.saturating_duration_since(self.origin))
    }

    fn ticket(self: &Arc<Self>, phase: Phase, probe: bool) -> Ticket {
        Ticket {
            inner: self.clone(),
            generation: phase.generation,
            probe,
            completed: false,
        }
    }

    /// Time left open at `now`, `None` once it is due to turn half-open. Meaningful only when open.
    fn open_remaining(&self, now: Instant) -> Option<Duration> {
        let until = self.open_until.load(Relaxed);
        let at = self.since_origin(now);
        (at < until).then(|| Duration::from_nanos(until - at))
    }

    fn set_phase(&self, _probes: &mut Probes, phase: Phase) {
        self.phase.store(phase.pack(), Release);
    }

    /// Under the lock: turns an open breaker half-open when its time has come; returns the phase.
    fn half_open_if_due(&self, probes: &mut Probes, now: Instant) -> Phase {
        let phase = self.phase();
        if phase.state != State::Open || self.open_remaining(now).is_some() {
            return phase;
        }
        *probes = Probes::default();
        let next = phase.next(State::HalfOpen);
        self.set_phase(probes, next);
        next
    }

    /// Opens a closed breaker whose window crossed a threshold, unless another completion already did.
    fn trip(&self, seen: Phase, now: Instant) {
        let mut probes = self.lock();
        if self.phase() == seen {
            self.open(&mut probes, seen, now);
        }
    }

    fn open(&self, probes: &mut Probes, from: Phase, now: Instant) {
        let open_for = jittered(self.live.load().settings.open_for);
        let until = self.since_origin(now).saturating_add(nanos(open_for));
        self.open_until.store(until, Relaxed);
        *probes = Probes::default();
        self.set_phase(probes, from.next(State::Open));
    }

    /// A probe finished: `Some(good)` with its outcome, `None` when it was dropped uncompleted.
    fn probe_done(&self, generation: u64, now: Instant, good: Option<bool>) {
        let mut probes = self.lock();
        let phase = self.phase();
        if phase.state != State::HalfOpen || phase.generation != generation {
            return; // a probe of an earlier half-open period; its slot went with it
        }
        probes.in_flight = probes.in_flight.saturating_sub(1);
        match good {
            None => {}
            Some(false) => self.open(&mut probes, phase, now),
            Some(true) => {
                probes.succeeded += 1;
                let settings = self.live.load().settings;
                if probes.succeeded >= settings.probes() {
                    // A fresh window: the failures that opened it must not reopen it.
                    self.live.store(Arc::new(Live::fresh(settings)));
                    *probes = Probes::default();
                    self.set_phase(&mut probes, phase.next(State::Closed));
                }
            }
        }
    }
}

/// `d` stretched or shortened at random by up to [`JITTER`].
fn jittered(d: Duration) -> Duration {
    let factor = 1.0 + JITTER * (2.0 * fastrand::f64() - 1.0);
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

/// Whole nanoseconds in a u64 (saturating after 584 years), so bucket arithmetic avoids u128 division.
#[inline]
fn nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

#[cfg(test)]
mod tests;
