//! `[budget]`: the global token budget (SPEC §5), off unless the table is present. Read by
//! `guards::budget` (GCRA, Redis) and `rollback` (throttle).

use serde::Deserialize;

use super::dur::{millis, Dur};
use super::tls::Trust;
use super::{err, ConfigError};

/// Where the budget's state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetBackend {
    /// In this process: each replica has a budget of its own.
    Local,
    /// In Redis at `redis_url`: every replica pointing at the same key shares one budget.
    Redis,
}

/// What the Redis budget decides while Redis is unreachable or slower than `redis_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBackendError {
    /// Admit the request unpriced: availability over the budget.
    Open,
    /// Refuse it with 503 `budget_unavailable`: the budget over availability.
    Closed,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Budget {
    /// Steady refill rate of the budget.
    pub tokens_per_minute: u64,
    /// Most tokens admitted at once from a full budget; a request priced above it is refused for good.
    pub burst: u64,
    /// Completion tokens reserved for a request that names no `max_tokens`.
    pub default_completion_tokens: u64,
    /// "local" (per process) or "redis" (shared by every replica using the same `redis_url` and key).
    pub backend: BudgetBackend,
    /// The Redis server of `backend = "redis"`, e.g. "redis://127.0.0.1:6379", "redis://:pw@host/2", or
    /// "rediss://host:6380" over TLS.
    pub redis_url: String,
    /// The Redis key holding the shared budget; replicas that share a budget use the same key.
    pub redis_key: String,
    /// Longest wait for one Redis call; slower counts as a backend error.
    pub redis_timeout: Dur,
    /// What `backend = "redis"` does while Redis fails: "open" admits, "closed" refuses with 503.
    pub on_backend_error: OnBackendError,
    /// Most request-body bytes read ahead to find `max_tokens` and estimate the prompt; a longer body
    /// is estimated from its Content-Length and streamed on.
    pub peek_bytes: usize,
    /// What its TLS connections trust (`rediss://`: `[tls] ca_file`); filled in by `Config::parse`.
    #[serde(skip)]
    pub trust: Trust,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            tokens_per_minute: 200_000,
            burst: 20_000,
            default_completion_tokens: 256,
            backend: BudgetBackend::Local,
            redis_url: "redis://127.0.0.1:6379".into(),
            trust: Trust::default(),
            redis_key: "driftguard:budget".into(),
            redis_timeout: millis(50),
            on_backend_error: OnBackendError::Open,
            peek_bytes: 64 * 1024,
        }
    }
}

impl Budget {
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        // Checked whatever the backend, so switching to "redis" later cannot surprise.
        if let Err(e) = redis::Client::open(self.redis_url.as_str()) {
            errors.push(err(
                "budget.redis_url",
                format!("{:?} is not a Redis URL: {e}", self.redis_url),
            ));
        }
        if self.redis_key.is_empty() {
            errors.push(err("budget.redis_key", "must not be empty"));
        }
    }
}
