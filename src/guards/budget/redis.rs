//! The Redis backend of the global token budget (`budget.backend = "redis"`): the GCRA of
//! [`LocalBudget`](super::LocalBudget), run atomically by a Lua script (`gcra.lua`) on one Redis key, so
//! that every replica using the same key shares one budget. The script reads the server's `TIME`, so the
//! replicas share one clock too, and it gets the settings with every call, so `set_settings` (reload,
//! rollback throttle) applies at once.
//!
//! Redis sits on the request path, so it must never stall it: every call is bounded by
//! `budget.redis_timeout`, and after a failure Redis is skipped for [`BACKOFF`], after which one request
//! probes it again. While Redis is skipped or failing, admissions follow `budget.on_backend_error`, and
//! reconciliations are dropped (they run in a spawned task, never on the response path).
//!
//! `available` answers from an atomic holding the last figure the script reported, so a metrics scrape
//! does no I/O.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::IntCounter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::{BackendDown, BudgetAdmission, BudgetSettings, Params, Reservation};
use crate::config::{self, OnBackendError};
use crate::net;

/// How long Redis is left alone after a failed call before one request tries it again.
pub const BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait for a new connection, in the background (calls give up after `redis_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The first call connects and loads the script, so it may take longer than a request's call.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RedisBudgetError {
    #[error("budget.redis_url: {0}")]
    Url(redis::RedisError),
    #[error("budget.redis_url: cannot set up the connection: {0}")]
    Connection(redis::RedisError),
    #[error("budget.redis_url: {0}")]
    Tls(#[from] net::tls::TlsError),
}

/// Why a call to Redis gave no answer.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    #[error("no answer within {0:?} (budget.redis_timeout)")]
    Timeout(Duration),
    #[error("the script answered {0:?}")]
    Reply(Vec<i64>),
}

/// What the script is asked to do; its `op` argument and the amount of ns that goes with it.
#[derive(Debug, Clone, Copy)]
enum Op {
    Admit { cost_ns: u64 },
    Refund { ns: u64 },
    Charge { ns: u64 },
    Peek,
}

impl Op {
    fn name_and_amount(self) -> (&'static str, u64) {
        match self {
            Op::Admit { cost_ns } => ("admit", cost_ns),
            Op::Refund { ns } => ("refund", ns),
            Op::Charge { ns } => ("charge", ns),
            Op::Peek => ("peek", 0),
        }
    }
}

/// The script's answer.
#[derive(Debug, Clone, Copy)]
struct Reply {
    admitted: bool,
    retry_after: Duration,
    available: u64,
}

/// The token budget shared through Redis. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct RedisBudget {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    script: Script,
    key: String,
    timeout: Duration,
    on_error: OnBackendError,
    params: ArcSwap<Params>,
    /// Tokens available as of the last answer from the script.
    available: AtomicU64,
    health: Health,
    /// `driftguard_budget_backend_errors_total`.
    errors: IntCounter,
}

impl RedisBudget {
    /// A budget on `budget.redis_url` and `budget.redis_key`. Connects lazily, in the background; must be
    /// called within a tokio runtime. `errors` counts every failed call.
    pub fn new(c: &config::Budget, errors: IntCounter) -> Result<RedisBudget, RedisBudgetError> {
        // A `rediss://` server whose certificate does not verify is an error now, not a budget that
        // silently runs on `on_backend_error` from the first request on.
        let roots = net::Roots::load(&c.trust)?;
        net::tls::verify_redis("budget.redis_url", &c.redis_url, &roots)?;
        let client = net::tls::redis_client(&c.redis_url, &roots).map_err(RedisBudgetError::Url)?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(BACKOFF);
        let conn = ConnectionManager::new_lazy_with_config(client, manager)
            .map_err(RedisBudgetError::Connection)?;
        let settings = BudgetSettings::from(c);
        let budget = RedisBudget {
            inner: Arc::new(Inner {
                conn,
                script: Script::new(include_str!("gcra.lua")),
                key: c.redis_key.clone(),
                timeout: c.redis_timeout.0,
                on_error: c.on_backend_error,
                params: ArcSwap::from_pointee(Params::new(settings)),
                available: AtomicU64::new(settings.burst),
                health: Health::new(),
                errors,
            }),
        };
        // Connect and load the script now, not on the first request; this also fills `available`.
        let inner = budget.inner.clone();
        tokio::spawn(async move {
            let p = **inner.params.load();
            let _ = inner
                .run(Op::Peek, &p, WARM_UP_TIMEOUT.max(inner.timeout))
                .await;
        });
        Ok(budget)
    }

    pub fn settings(&self) -> BudgetSettings {
        self.inner.params.load().settings
    }

    /// New settings; the next call passes them to the script (the TAT in Redis is kept, as in
    /// [`LocalBudget::set_settings`](super::LocalBudget::set_settings)).
    pub fn set_settings(&self, settings: BudgetSettings) {
        self.inner.params.store(Arc::new(Params::new(settings)));
    }

    /// Reserves `tokens` in Redis. While Redis fails or is being left alone after a failure, returns
    /// what `budget.on_backend_error` says to do.
    pub async fn admit(&self, tokens: u64) -> Result<BudgetAdmission, BackendDown> {
        let p = **self.inner.params.load();
        if tokens > p.settings.burst {
            return Ok(BudgetAdmission::TooLarge {
                tokens,
                burst: p.settings.burst,
            });
        }
        let op = Op::Admit {
            cost_ns: p.cost(tokens),
        };
        match self.inner.run(op, &p, self.inner.timeout).await {
            Some(reply) if reply.admitted => Ok(BudgetAdmission::Admitted(Reservation { tokens })),
            Some(reply) => Ok(BudgetAdmission::OverBudget {
                retry_after: reply.retry_after,
            }),
            None => Err(match self.inner.on_error {
                OnBackendError::Open => BackendDown::Admit,
                OnBackendError::Closed => BackendDown::Refuse,
            }),
        }
    }

    /// Settles a reservation as [`LocalBudget::reconcile`](super::LocalBudget::reconcile) does, in a
    /// spawned task: returns at once. Outside a tokio runtime, or while Redis is down, nothing happens.
    pub fn reconcile(&self, reserved: u64, actual: u64) {
        let p = **self.inner.params.load();
        let op = if actual < reserved {
            Op::Refund {
                ns: p.cost(reserved - actual),
            }
        } else if actual > reserved {
            // A reported usage can be anything; one response may overdraw by at most a burst.
            Op::Charge {
                ns: p.cost((actual - reserved).min(p.settings.burst.max(1))),
            }
        } else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = self.inner.clone();
        runtime.spawn(async move {
            let timeout = inner.timeout;
            inner.run(op, &p, timeout).await
        });
    }

    /// Tokens a request could reserve, as of the last answer from Redis (no I/O).
    pub fn available(&self) -> u64 {
        self.inner.available.load(Relaxed)
    }
}

impl Inner {
    /// One script call, unless Redis is being left alone; `None` when there is no answer.
    async fn run(&self, op: Op, p: &Params, timeout: Duration) -> Option<Reply> {
        if !self.health.may_call(Instant::now()) {
            return None;
        }
        let result = match tokio::time::timeout(timeout, self.call(op, p)).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout(timeout)),
        };
        match result {
            Ok(reply) => {
                self.available.store(reply.available, Relaxed);
                self.health.succeeded(&self.key);
                Some(reply)
            }
            Err(e) => {
                self.errors.inc();
                self.health
                    .failed(Instant::now(), &self.key, &e, self.on_error);
                None
            }
        }
    }

    async fn call(&self, op: Op, p: &Params) -> Result<Reply, CallError> {
        let (name, amount) = op.name_and_amount();
        let mut conn = self.conn.clone();
        let answer: Vec<i64> = self
            .script
            .key(&self.key)
            .arg(name)
            .arg(amount)
            .arg(p.token_ns)
            .arg(p.tolerance_ns)
            .arg(p.settings.burst)
            .invoke_async(&mut conn)
            .await?;
        match answer[..] {
            [admitted, retry_ns, available] => Ok(Reply {
                admitted: admitted == 1,
                retry_after: Duration::from_nanos(u64::try_from(retry_ns).unwrap_or(0)),
                available: u64::try_from(available).unwrap_or(0),
            }),
            _ => Err(CallError::Reply(answer)),
        }
    }
}

/// Whether Redis answered lately: after a failure it is left alone for [`BACKOFF`], then exactly one
/// caller probes it. Logs a warning when an outage starts and a line when it ends, not one per request.
struct Health {
    origin: Instant,
    /// 0 while healthy; else when (ns since `origin`, at least [`BACKOFF`]) the next probe may go.
    retry_at: AtomicU64,
    down: AtomicBool,
}

impl Health {
    fn new() -> Self {
        Health {
            origin: Instant::now(),
            retry_at: AtomicU64::new(0),
            down: AtomicBool::new(false),
        }
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Healthy, or the backoff is over and this caller won the probe (the others keep skipping).
    fn may_call(&self, now: Instant) -> bool {
        let at = self.retry_at.load(Relaxed);
        if at == 0 {
            return true;
        }
        let now = self.nanos(now);
        now >= at
            && self
                .retry_at
                .compare_exchange(at, now.saturating_add(backoff_ns()), Relaxed, Relaxed)
                .is_ok()
    }

    fn succeeded(&self, key: &str) {
        self.retry_at.store(0, Relaxed);
        if self.down.swap(false, Relaxed) {
            tracing::info!(
                key,
                "the budget's Redis answers again; the shared budget applies"
            );
        }
    }

    fn failed(&self, now: Instant, key: &str, error: &CallError, on_error: OnBackendError) {
        self.retry_at
            .store(self.nanos(now).saturating_add(backoff_ns()), Relaxed);
        if !self.down.swap(true, Relaxed) {
            let decision = match on_error {
                OnBackendError::Open => "admitted unpriced (on_backend_error = \"open\")",
                OnBackendError::Closed => "refused with 503 (on_backend_error = \"closed\")",
            };
            tracing::warn!(
                key,
                error = %error,
                "the budget's Redis fails; requests are {decision} until it answers again (retried every {BACKOFF:?})"
            );
        } else {
            tracing::debug!(key, error = %error, "the budget's Redis still fails");
        }
    }
}

/// [`BACKOFF`] in ns; never 0, which means healthy.
fn backoff_ns() -> u64 {
    u64::try_from(BACKOFF.as_nanos()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests;
