//! Global token budget (SPEC §5): caps the LLM tokens that pass through the proxy per minute, with a burst.
//!
//! The limiter is GCRA (generic cell rate algorithm) with one token as the cell. Each token costs
//! `T = 60 s / tokens_per_minute` of time; the budget keeps one number, the theoretical arrival time (TAT),
//! the instant at which everything admitted so far would have been paid for at the steady rate. A request
//! of `n` tokens arriving at `now` fits iff `max(TAT, now) + n·T − now ≤ burst·T` (the tolerance), and when
//! it does the TAT moves to `max(TAT, now) + n·T`. A fresh budget therefore admits `burst` tokens at once and
//! then refills at `tokens_per_minute`; over any interval of length `d` it admits at most
//! `burst + d / T` tokens.
//!
//! Admission only knows an estimate (prompt bytes ÷ 4 plus the requested completion limit, see
//! [`estimate_prompt_tokens`] and [`completion_tokens`]); when the response completes the caller
//! reconciles the [`Reservation`] with the usage the upstream reported: the unused part is refunded (the
//! TAT moves back, never before `now`) and an overrun is charged (the TAT moves forward, possibly past the
//! tolerance, so later requests wait until it is paid off).
//!
//! Why not the `governor` crate: it has no way to give back part of a reservation or to charge extra after
//! the fact, and the Redis backend must run the very same algorithm inside a Lua script so that replicas
//! share one budget. GCRA is a few lines of arithmetic, so it is implemented here directly, on integers, in
//! a form the script can mirror.
//!
//! Representation: the TAT is an `AtomicU64` of nanoseconds since an origin `Instant` and every operation
//! is one compare-and-swap loop on it, so the budget is lock-free and `Send + Sync`. `T` is rounded up to a
//! whole nanosecond, so the enforced rate is never above `tokens_per_minute` (it is below by less than one
//! part in `T` in ns, e.g. < 0.1 % up to 60 M tokens per minute, and exact whenever `tokens_per_minute`
//! divides 60·10⁹, as 200 000 does); the tolerance is exactly `burst·T`, so token counts are exact: a fresh
//! budget admits exactly `burst` tokens whether asked all at once or one by one.
//!
//! Time is always passed in, so the budget is deterministic under test and callers can reuse the
//! `Instant` they already took for the request.
//!
//! [`Budget`] is what the proxy holds: this local budget, or the [`RedisBudget`] that runs the same GCRA
//! in Redis (`redis_budget.rs`, `gcra.lua`) for replicas that share one budget.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config;

pub mod admission;
mod redis;

pub use redis::{RedisBudget, RedisBudgetError, BACKOFF};

/// Nanoseconds in a minute: the period `tokens_per_minute` refers to.
const MINUTE_NS: u128 = 60_000_000_000;
/// [`BudgetSettings::throttled`] clamps its factor to at least this.
const MIN_THROTTLE_FACTOR: f64 = 0.01;
/// Bytes per token assumed by [`estimate_prompt_tokens`].
const BYTES_PER_TOKEN: usize = 4;

/// The budget's size, from `[budget]` (see [`config::Budget`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetSettings {
    /// Steady refill rate. Zero is treated as one (config validation rejects zero).
    pub tokens_per_minute: u64,
    /// Most tokens admitted at once from a full budget; a request above it can never be admitted.
    pub burst: u64,
}

impl From<&config::Budget> for BudgetSettings {
    fn from(c: &config::Budget) -> Self {
        BudgetSettings {
            tokens_per_minute: c.tokens_per_minute,
            burst: c.burst,
        }
    }
}

impl BudgetSettings {
    /// Smaller budget for the rollback throttle (SPEC §6): `tokens_per_minute` and `burst` × `factor`,
    /// rounded to the nearest token and at least one token each. `factor` is meant to lie in (0, 1]; it is
    /// clamped to [0.01, 1], and NaN leaves the settings as they are.
    pub fn throttled(&self, factor: f64) -> Self {
        if factor.is_nan() || factor >= 1.0 {
            return *self;
        }
        let factor = factor.max(MIN_THROTTLE_FACTOR);
        // `as u64` saturates; the product is below the original value, which fits.
        let scale = |v: u64| ((v as f64 * factor).round() as u64).clamp(1, v.max(1));
        BudgetSettings {
            tokens_per_minute: scale(self.tokens_per_minute),
            burst: scale(self.burst),
        }
    }
}

/// Settings with the derived GCRA constants, swapped as one so that an operation never mixes two reloads.
#[derive(Debug, Clone, Copy)]
struct Params {
    settings: BudgetSettings,
    /// `T`: nanoseconds one token costs, `ceil(60 s / tokens_per_minute)`, at least 1.
    token_ns: u64,
    /// `burst · T` (saturating): how far the TAT may run ahead of `now` after an admission.
    tolerance_ns: u64,
}

impl Params {
    fn new(settings: BudgetSettings) -> Self {
        let tpm = u128::from(settings.tokens_per_minute.max(1));
        let token_ns = u64::try_from(MINUTE_NS.div_ceil(tpm))
            .unwrap_or(u64::MAX)
            .max(1);
        let tolerance_ns = token_ns.saturating_mul(settings.burst);
        Params {
            settings,
            token_ns,
            tolerance_ns,
        }
    }

    /// Time `tokens` cost at the steady rate, in ns (saturating).
    fn cost(&self, tokens: u64) -> u64 {
        self.token_ns.saturating_mul(tokens)
    }
}

/// What the request path reads of `[budget]` to price a request: how many body bytes to read ahead, and
/// the completion tokens to reserve when the request names none. Held by the routing table's settings.
#[derive(Debug, Clone, Copy)]
pub struct BudgetPeek {
    pub peek_bytes: usize,
    pub default_completion_tokens: u64,
}

/// Outcome of [`LocalBudget::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetAdmission {
    /// The tokens are reserved; reconcile them with the reported usage when the response completes.
    Admitted(Reservation),
    /// Not enough budget now; after `retry_after` the same request would fit (if nothing else is admitted
    /// meanwhile).
    OverBudget { retry_after: Duration },
    /// The request asks for more than `burst` tokens and can never fit, however long it waits.
    TooLarge { tokens: u64, burst: u64 },
}

/// Outcome of [`Budget::admit`] when the budget's backend (Redis) did not answer, or is being left alone
/// after a failure: what `budget.on_backend_error` says to do with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendDown {
    /// "open": let it through without a reservation.
    Admit,
    /// "closed": refuse it (503 `budget_unavailable`).
    Refuse,
}

/// Tokens reserved by an admission. Plain data: nothing happens on drop; the caller passes `tokens` to
/// [`LocalBudget::reconcile`] together with the usage the upstream reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub tokens: u64,
}

/// The token budget of this process (`budget.backend = "local"`). Lock-free; share it by reference or
/// `Arc`.
#[derive(Debug)]
pub struct LocalBudget {
    /// Time zero of `tat`.
    origin: Instant,
    /// Theoretical arrival time, ns since `origin`. It is the only shared state, and every update is a
    /// read-modify-write of it alone, so `Relaxed` suffices: RMWs always see the latest value.
    tat: AtomicU64,
    params: ArcSwap<Params>,
}

impl LocalBudget {
    /// A full budget. `origin` is any instant not after the first `now` passed in (earlier instants count
    /// as `origin`).
    pub fn new(settings: BudgetSettings, origin: Instant) -> Self {
        LocalBudget {
            origin,
            tat: AtomicU64::new(0),
            params: ArcSwap::from_pointee(Params::new(settings)),
        }
    }

    /// The current settings.
    pub fn settings(&self) -> BudgetSettings {
        self.params.load().settings
    }

    /// New settings (reload, rollback throttle). The TAT is kept: time already owed stays owed and is
    /// measured against the new tolerance, so a smaller budget may make requests wait until the backlog
    /// drains, and a larger one frees room at once.
    pub fn set_settings(&self, settings: BudgetSettings) {
        self.params
            .store(std::sync::Arc::new(Params::new(settings)));
    }

    /// Reserves `tokens` at `now` if the budget allows it (GCRA, see the module doc). Refusals change
    /// nothing. `OverBudget.retry_after` is exact to the nanosecond: at `now + retry_after` the same request
    /// fits if nothing else was admitted meanwhile.
    pub fn admit(&self, tokens: u64, now: Instant) -> BudgetAdmission {
        let p = **self.params.load();
        if tokens > p.settings.burst {
            return BudgetAdmission::TooLarge {
                tokens,
                burst: p.settings.burst,
            };
        }
        let now_ns = self.nanos(now);
        let cost = p.cost(tokens);
        let mut tat = self.tat.load(Relaxed);
        loop {
            let new_tat = tat.max(now_ns).saturating_add(cost);
            // How far ahead of `now` the TAT would run; the request fits iff that is within the tolerance.
            let ahead = new_tat - now_ns;
            if ahead > p.tolerance_ns {
                return BudgetAdmission::OverBudget {
                    retry_after: Duration::from_nanos(ahead - p.tolerance_ns),
                };
            }
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Relaxed, Relaxed)
            {
                Ok(_) => return BudgetAdmission::Admitted(Reservation { tokens }),
                Err(current) => tat = current,
            }
        }
    }

    /// Settles a reservation of `reserved` tokens with the `actual` usage. A shortfall is refunded: the TAT
    /// moves back by `(reserved − actual)·T`, but never before `now` (time that has passed already refilled
    /// the budget). An overrun is charged: the TAT moves to `max(TAT, now) + (actual − reserved)·T`, which
    /// may exceed the tolerance, so later requests wait until it is paid off. `T` is the one of the current
    /// settings.
    pub fn reconcile(&self, reserved: u64, actual: u64, now: Instant) {
        let p = **self.params.load();
        let now_ns = self.nanos(now);
        // `fetch_update` returns Err when the closure declines to update; there is nothing to do then.
        let _ = if actual < reserved {
            let refund = p.cost(reserved - actual);
            self.tat.fetch_update(Relaxed, Relaxed, |tat| {
                (tat > now_ns).then(|| tat.saturating_sub(refund).max(now_ns))
            })
        } else if actual > reserved {
            // A reported usage can be anything; one response may overdraw by at most a burst.
            let charge = p.cost((actual - reserved).min(p.settings.burst.max(1)));
            self.tat.fetch_update(Relaxed, Relaxed, |tat| {
                Some(tat.max(now_ns).saturating_add(charge))
            })
        } else {
            Ok(0)
        };
    }

    /// Tokens a single request could reserve at `now` (0 ..= `burst`), for
    /// `driftguard_budget_available_tokens`: for `n ≥ 1`, `admit(n, now)` succeeds iff
    /// `n ≤ available(now)`. (A zero-token request follows the same GCRA test, so it is refused only while
    /// an extra charge keeps the TAT past the tolerance.)
    pub fn available(&self, now: Instant) -> u64 {
        let p = **self.params.load();
        let ahead = self.tat.load(Relaxed).saturating_sub(self.nanos(now));
        let room = p.tolerance_ns.saturating_sub(ahead);
        (room / p.token_ns).min(p.settings.burst)
    }

    /// `now` as ns since `origin`; instants before `origin` count as `origin`.
    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The global token budget of either backend, as the proxy and the app use it.
pub enum Budget {
    /// `budget.backend = "local"`: this process's own budget.
    Local(LocalBudget),
    /// `budget.backend = "redis"`: one budget shared by every replica using the same key.
    Redis(RedisBudget),
}

// === impl Budget ===

impl Budget {
    /// The budget `[budget]` asks for. The Redis one must be built within a tokio runtime (it connects in
    /// the background); `backend_errors` counts its failed calls.
    pub fn from_config(
        c: &config::Budget,
        backend_errors: prometheus::IntCounter,
    ) -> Result<Budget, RedisBudgetError> {
        Ok(match c.backend {
            config::BudgetBackend::Local => {
                Budget::Local(LocalBudget::new(c.into(), Instant::now()))
            }
            config::BudgetBackend::Redis => Budget::Redis(RedisBudget::new(c, backend_errors)?),
        })
    }

    /// Reserves `tokens` (see [`LocalBudget::admit`]; the Redis backend uses the server's clock instead
    /// of `now`). Only the Redis backend can fail, with what `budget.on_backend_error` says to do.
    pub async fn admit(&self, tokens: u64, now: Instant) -> Result<BudgetAdmission, BackendDown> {
        match self {
            Budget::Local(b) => Ok(b.admit(tokens, now)),
            Budget::Redis(b) => b.admit(tokens).await,
        }
    }

    /// Settles a reservation (see [`LocalBudget::reconcile`]). Never blocks: the Redis backend runs it
    /// in a spawned task.
    pub fn reconcile(&self, reserved: u64, actual: u64, now: Instant) {
        match self {
            Budget::Local(b) => b.reconcile(reserved, actual, now),
            Budget::Redis(b) => b.reconcile(reserved, actual),
        }
    }

    pub fn settings(&self) -> BudgetSettings {
        match self {
            Budget::Local(b) => b.settings(),
            Budget::Redis(b) => b.settings(),
        }
    }

    /// New settings (reload, rollback throttle), in effect from the next admission.
    pub fn set_settings(&self, settings: BudgetSettings) {
        match self {
            Budget::Local(b) => b.set_settings(settings),
            Budget::Redis(b) => b.set_settings(settings),
        }
    }

    /// Tokens a request could reserve now, for `driftguard_budget_available_tokens`; never does I/O (the
    /// Redis backend reports the figure of its last call).
    pub fn available(&self, now: Instant) -> u64 {
        match self {
            Budget::Local(b) => b.available(now),
            Budget::Redis(b) => b.available(),
        }
    }
}

/// Estimated prompt tokens of a request body of `text_bytes` bytes: `ceil(bytes / 4)`. About four bytes
/// per token is the usual figure for English text with cl100k-style BPE tokenizers (OpenAI's rule of thumb);
/// JSON syntax and non-English text make it less exact, which reconciliation with the reported usage
/// corrects afterwards.
pub fn estimate_prompt_tokens(text_bytes: usize) -> u64 {
    u64::try_from(text_bytes.div_ceil(BYTES_PER_TOKEN)).unwrap_or(u64::MAX)
}

/// Completion tokens a request may produce: its `max_tokens`, else `max_completion_tokens` (the newer
/// OpenAI name), else `default` (`budget.default_completion_tokens`). Only a non-negative integer counts;
/// a field that is missing, null, negative, fractional or not a number is skipped.
pub fn completion_tokens(body: &serde_json::Value, default: u64) -> u64 {
    ["max_tokens", "max_completion_tokens"]
        .iter()
        .find_map(|key| body.get(key).and_then(serde_json::Value::as_u64))
        .unwrap_or(default)
}

#[cfg(test)]
mod tests;
