//! Idempotency fence (SPEC §5): a write (`writes.routes`) carrying the idempotency header is executed
//! once. The first request with a key runs upstream and leaves a receipt — the request's fingerprint
//! (method, path, body sha256) and the response (status, headers, body up to `writes.receipt_body_max`);
//! the same key with the same fingerprint replays the receipt without calling the upstream, another
//! fingerprint gets 409 with a diff, and a request arriving while the first is still in flight waits for
//! it (single-flight) and then replays.
//!
//! Where it sits: the request path's fence step ([`step::admit`]) reads the body, hashes it and asks
//! [`Fence::admit`] for a [`FenceOutcome`]. A [`Lead`] goes on to the upstream; once the response head is back it becomes a
//! [`Recording`] that copies the body as it streams to the client and stores the receipt when the body
//! ends. Dropping a `Lead` before that (upstream unreachable or timed out, client gone before the head,
//! the write frozen, over budget, breaker open) releases the key: nothing ran, so a waiter takes the lead.
//!
//! A response whose body broke off mid-stream (or whose client left mid-body) still leaves a receipt:
//! the upstream answered, so the write most likely took effect, and executing it again is the one thing
//! the fence is for. Such a receipt, like one whose body is above the cap, keeps status and headers only
//! and is marked `body_omitted`; its replays say so with `idempotent-replay-body: omitted`.
//!
//! Stores: [`Embedded`] is a redb file `state_dir/receipts.redb` (durable commits, so receipts survive
//! restart and kill -9; one process owns the file), [`RedisStore`] is shared by replicas and adds a
//! pending marker per key so that replicas wait for each other too. In-flight state within one process
//! is a map of key → watch channel.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderName;
use prometheus::IntCounter;
use tokio::sync::watch;

use crate::config::{ReceiptStore, Writes};
use crate::telemetry::metrics::Metrics;

mod embedded;
mod lead;
mod receipt;
mod redis;
pub mod step;

pub use embedded::Embedded;
pub use lead::{Lead, Recording};
pub use receipt::{BodyHash, Fingerprint, Receipt};
pub use redis::RedisStore;
pub use step::FenceAnswer;

/// Values of the `decision` label of `driftguard_idempotency_total`.
pub const DECISIONS: [&str; 4] = ["new", "replay", "conflict", "wait"];

/// Longest idempotency key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// Header marking a response replayed from a receipt.
pub const IDEMPOTENT_REPLAY: HeaderName = HeaderName::from_static("idempotent-replay");
/// On a replay whose receipt kept no body: `omitted`.
pub const IDEMPOTENT_REPLAY_BODY: HeaderName = HeaderName::from_static("idempotent-replay-body");

/// File of the embedded store under `state_dir`.
pub const EMBEDDED_FILE: &str = "receipts.redb";

/// How often a replica polls Redis while another replica holds the pending marker of a key.
const REDIS_POLL: Duration = Duration::from_millis(25);

/// Receipts kept in memory because the store refused them (see [`Fence::claim`]); past this many the
/// oldest is forgotten, and a retry of its key may execute again.
const MAX_UNCOMMITTED: usize = 10_000;

/// How often expired receipts are purged from the embedded store.
pub const PURGE_EVERY: Duration = Duration::from_secs(60);

/// Response headers never stored in a receipt: they belong to one exchange, not to its result.
const PER_EXCHANGE: [HeaderName; 4] = [
    super::X_REQUEST_ID,
    http::header::CONTENT_LENGTH,
    http::header::TRANSFER_ENCODING,
    http::header::DATE,
];

/// The fence's per-request settings, from `[writes]`; swapped with the routing table on reload.
#[derive(Debug, Clone)]
pub struct FenceSettings {
    pub header: HeaderName,
    pub require_key: bool,
    pub ttl: Duration,
    pub max_body_bytes: usize,
    pub receipt_body_max: usize,
}

impl From<&Writes> for FenceSettings {
    fn from(w: &Writes) -> Self {
        FenceSettings {
            header: HeaderName::try_from(w.idempotency_header.as_str())
                .unwrap_or(HeaderName::from_static("idempotency-key")),
            require_key: w.require_key,
            ttl: w.ttl.0,
            max_body_bytes: w.max_body_bytes,
            receipt_body_max: w.receipt_body_max,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("receipt store {path}: {detail}")]
    Embedded { path: String, detail: String },
    #[error("receipt store redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("receipt store redis: no answer within {0:?}")]
    RedisTimeout(Duration),
    #[error("receipt store: {0}")]
    Task(String),
    #[error("receipt store: unreadable receipt at {0}")]
    Unreadable(String),
    #[error("writes.redis_url: {0}")]
    Tls(#[from] crate::net::tls::TlsError),
}

use crate::clock::now_ms;

// === FenceOutcome ===

/// What to do with a keyed write.
pub enum FenceOutcome {
    /// Execute it upstream; the receipt is recorded from the response.
    Lead(Lead),
    /// Answer with the receipt; the upstream is not called.
    Replay(Arc<Receipt>),
    /// The key belongs to another request: the stored (or in-flight) fingerprint and this one differ.
    Conflict(serde_json::Map<String, serde_json::Value>),
    /// The first request with the key was still in flight when this one's wait ran out.
    StillInFlight,
    /// The store could not be asked: do not run a write that cannot be fenced.
    Unavailable(FenceError),
}

// === impl Fence ===

/// The fence of a running driftguard: the receipt store and the keys in flight in this process.
pub struct Fence {
    store: Store,
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    /// Receipts of writes that executed but could not be stored: their clients got a broken response
    /// (fail closed), and a retry must neither execute again nor replay what is not durable — it stores
    /// the receipt first, then replays it, or gets 503 while the store still fails.
    uncommitted: Mutex<Uncommitted>,
    decisions: [IntCounter; 4],
    duplicate_effects: IntCounter,
    store_errors: IntCounter,
}

enum Store {
    Embedded(Arc<Embedded>),
    Redis(RedisStore),
}

/// One key executing in this process.
struct Flight {
    request: Fingerprint,
    state: watch::Sender<FlightState>,
}

#[derive(Clone)]
enum FlightState {
    Running,
    Done(Arc<Receipt>),
    /// The execution ended without a response: the key is free again.
    Released,
}

enum Claim {
    Receipt(Receipt),
    Lead,
    /// Another replica holds the key's pending marker.
    Pending,
}

impl Fence {
    /// Opens the configured store: the embedded file under `state_dir` now, Redis on first use.
    pub fn open(writes: &Writes, state_dir: &Path, metrics: &Metrics) -> Result<Fence, FenceError> {
        let store = match writes.store {
            ReceiptStore::Embedded => {
                Store::Embedded(Arc::new(Embedded::open(&state_dir.join(EMBEDDED_FILE))?))
            }
            ReceiptStore::Redis => Store::Redis(RedisStore::new(&writes.redis_url, &writes.trust)?),
        };
        Ok(Fence {
            store,
            flights: Mutex::new(HashMap::new()),
            uncommitted: Mutex::new(Uncommitted::default()),
            decisions: DECISIONS.map(|d| metrics.idempotency.with_label_values(&[d])),
            duplicate_effects: metrics.duplicate_effects.clone(),
            store_errors: metrics.receipt_store_errors.clone(),
        })
    }

    fn count(&self, decision: &str) {
        if let Some(i) = DECISIONS.iter().position(|d| *d == decision) {
            self.decisions[i].inc();
        }
    }

    /// Decides what a keyed write does. Waits (for this process's or, with Redis, another replica's
    /// execution of the key) until `deadline` at most. `lease` bounds how long another replica waits
    /// for this one should it die mid-execution (Redis only).
    pub async fn admit(
        self: &Arc<Self>,
        key: &str,
        request: Fingerprint,
        deadline: tokio::time::Instant,
        lease: Duration,
    ) -> FenceOutcome {
        let mut waited = false;
        loop {
            let (flight, ours) = self.join(key, &request);
            if ours {
                return self
                    .execute(key, &flight, request, deadline, lease, waited)
                    .await;
            }
            if flight.request != request {
                self.count("conflict");
                return FenceOutcome::Conflict(flight.request.diff(&request));
            }
            if !waited {
                waited = true;
                self.count("wait");
            }
            let mut rx = flight.state.subscribe();
            let outcome = tokio::time::timeout_at(
                deadline,
                rx.wait_for(|s| !matches!(s, FlightState::Running)),
            )
            .await;
            match outcome {
                Err(_) => return FenceOutcome::StillInFlight,
                Ok(Ok(state)) => {
                    if let FlightState::Done(receipt) = state.clone() {
                        return self.replay(receipt, &request);
                    }
                }
                // The lead went away without a word: as released.
                Ok(Err(_)) => {}
            }
        }
    }

    /// The key's flight in this process, and whether this request just started it (holds the key).
    fn join(&self, key: &str, request: &Fingerprint) -> (Arc<Flight>, bool) {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        match flights.get(key) {
            Some(flight) => (flight.clone(), false),
            None => {
                let (state, _) = watch::channel(FlightState::Running);
                let flight = Arc::new(Flight {
                    request: request.clone(),
                    state,
                });
                flights.insert(key.to_string(), flight.clone());
                (flight, true)
            }
        }
    }

    /// This request holds the key in this process; the store says whether it already ran (a replay), or
    /// runs elsewhere (Redis: poll until `deadline`), or is this request's to lead.
    async fn execute(
        self: &Arc<Self>,
        key: &str,
        flight: &Flight,
        request: Fingerprint,
        deadline: tokio::time::Instant,
        lease: Duration,
        mut waited: bool,
    ) -> FenceOutcome {
        let mut lead = Lead {
            fence: self.clone(),
            key: key.to_string(),
            token: format!("{:032x}", fastrand::u128(..)),
            settled: false,
        };
        loop {
            match self.claim(&lead, lease).await {
                Ok(Claim::Receipt(receipt)) => {
                    let receipt = Arc::new(receipt);
                    lead.settle(FlightState::Done(receipt.clone()));
                    return self.replay(receipt, &request);
                }
                Ok(Claim::Lead) => {
                    self.count("new");
                    if let Store::Redis(redis) = &self.store {
                        let renew = redis.clone().renew(
                            lead.key.clone(),
                            lead.token.clone(),
                            lease,
                            flight.state.subscribe(),
                        );
                        tokio::spawn(renew);
                    }
                    return FenceOutcome::Lead(lead);
                }
                Ok(Claim::Pending) => {
                    if !waited {
                        waited = true;
                        self.count("wait");
                    }
                    if tokio::time::Instant::now() + REDIS_POLL > deadline {
                        return FenceOutcome::StillInFlight;
                    }
                    tokio::time::sleep(REDIS_POLL).await;
                }
                Err(e) => {
                    self.store_errors.inc();
                    tracing::error!(error = %e, "idempotency receipt store unavailable; refusing the keyed write");
                    return FenceOutcome::Unavailable(e);
                }
            }
        }
    }

    fn replay(&self, receipt: Arc<Receipt>, request: &Fingerprint) -> FenceOutcome {
        if receipt.request == *request {
            self.count("replay");
            FenceOutcome::Replay(receipt)
        } else {
            self.count("conflict");
            FenceOutcome::Conflict(receipt.request.diff(request))
        }
    }

    async fn claim(&self, lead: &Lead, lease: Duration) -> Result<Claim, FenceError> {
        let pending = self
            .uncommitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&lead.key);
        if let Some(receipt) = pending {
            // The key executed, but its receipt never reached the store: store it now, then replay.
            self.put(&lead.key, &lead.token, &receipt, true).await?;
            self.uncommitted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&lead.key);
            tracing::info!(
                key = lead.key,
                "a receipt the store had refused is stored now"
            );
            return Ok(Claim::Receipt((*receipt).clone()));
        }
        match &self.store {
            Store::Embedded(db) => {
                let (db, key) = (db.clone(), lead.key.clone());
                let found = blocking(move || db.get(&key, now_ms())).await?;
                Ok(found.map_or(Claim::Lead, Claim::Receipt))
            }
            Store::Redis(redis) => redis.claim(&lead.key, &lead.token, lease).await,
        }
    }

    /// Stores a receipt; counts a duplicate effect (unless `retry`: the same receipt stored again) and
    /// a store error.
    async fn put(
        &self,
        key: &str,
        token: &str,
        receipt: &Receipt,
        retry: bool,
    ) -> Result<(), FenceError> {
        let stored = match &self.store {
            Store::Embedded(db) => {
                let (db, key, bytes) = (db.clone(), key.to_string(), receipt.encode());
                blocking(move || db.put(&key, &bytes, now_ms())).await
            }
            Store::Redis(redis) => redis.put(key, token, receipt).await,
        };
        match stored {
            Ok(false) => Ok(()),
            Ok(true) if retry => Ok(()),
            Ok(true) => {
                self.duplicate_effects.inc();
                tracing::error!(
                    key,
                    "duplicate effect: a write executed although its key had a live receipt"
                );
                Ok(())
            }
            Err(e) => {
                self.store_errors.inc();
                tracing::error!(key, error = %e, "cannot store the idempotency receipt; the response fails and the receipt is kept in memory until the store takes it");
                Err(e)
            }
        }
    }

    /// Deletes expired receipts (embedded store; Redis expires its keys itself). Returns how many.
    pub async fn purge(&self) -> Result<usize, FenceError> {
        match &self.store {
            Store::Embedded(db) => {
                let db = db.clone();
                blocking(move || db.purge(now_ms())).await
            }
            Store::Redis(_) => Ok(0),
        }
    }

    fn finish_flight(&self, key: &str, state: FlightState) {
        let flight = self
            .flights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        if let Some(flight) = flight {
            flight.state.send_replace(state);
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FenceError> + Send + 'static,
) -> Result<T, FenceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FenceError::Task(e.to_string()))?
}

/// Receipts the store refused, in arrival order so the oldest goes first past [`MAX_UNCOMMITTED`].
#[derive(Default)]
struct Uncommitted {
    receipts: HashMap<String, Arc<Receipt>>,
    order: std::collections::VecDeque<String>,
}

impl Uncommitted {
    fn get(&self, key: &str) -> Option<Arc<Receipt>> {
        self.receipts.get(key).cloned()
    }

    fn insert(&mut self, key: &str, receipt: Arc<Receipt>) {
        if self.receipts.insert(key.to_string(), receipt).is_none() {
            self.order.push_back(key.to_string());
        }
        while self.receipts.len() > MAX_UNCOMMITTED {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.receipts.remove(&oldest);
                    tracing::error!(key = oldest, "a receipt the store refused is forgotten (too many kept); a retry of its key will execute again");
                }
                None => break,
            }
        }
    }

    fn remove(&mut self, key: &str) {
        if self.receipts.remove(key).is_some() {
            self.order.retain(|k| k != key);
        }
    }
}

#[cfg(test)]
mod tests;
