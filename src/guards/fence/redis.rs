//! The Redis receipt store, shared by replicas: receipts plus a pending marker per key so replicas wait
//! for each other. Only `super::Fence` calls it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Claim, FenceError, FlightState, Receipt};
use crate::clock::now_ms;
use crate::net;

/// Receipts in Redis under `driftguard:receipt:<key>` (PX = ttl), plus `driftguard:pending:<key>` while
/// a replica executes the key (PX = lease, renewed every half lease while it runs, so a replica that
/// dies frees the key within a lease).
#[derive(Clone)]
pub struct RedisStore {
    /// Boxed: a TLS client carries its root store.
    client: Arc<redis::Client>,
    conn: Arc<tokio::sync::OnceCell<redis::aio::ConnectionManager>>,
}

const RECEIPT_PREFIX: &str = "driftguard:receipt:";
const PENDING_PREFIX: &str = "driftguard:pending:";
/// Bound of one Redis round trip (and of connecting).
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// The receipt if there is one, else the pending marker if free: `{1, receipt}`, `{2, ""}` (lead) or
/// `{3, ""}` (pending elsewhere).
const CLAIM: &str = r#"
local r = redis.call('GET', KEYS[1])
if r then return {1, r} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, ''} end
return {3, ''}
"#;

/// Stores the receipt and clears this holder's pending marker; returns 1 if a receipt was already there.
const PUT: &str = r#"
local dup = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return dup
"#;

/// Extends this holder's pending marker.
const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

impl RedisStore {
    /// A store on `url`; a `rediss://` server's certificate is verified now (see
    /// [`net::tls::verify_redis`]), so one that does not verify stops the start.
    pub fn new(url: &str, trust: &crate::config::Trust) -> Result<RedisStore, FenceError> {
        let roots = net::Roots::load(trust)?;
        net::tls::verify_redis("writes.redis_url", url, &roots)?;
        Ok(RedisStore {
            client: Arc::new(net::tls::redis_client(url, &roots)?),
            conn: Arc::new(tokio::sync::OnceCell::new()),
        })
    }

    async fn conn(&self) -> Result<redis::aio::ConnectionManager, FenceError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(REDIS_TIMEOUT))
                    .set_response_timeout(Some(REDIS_TIMEOUT))
                    .set_number_of_retries(1);
                tokio::time::timeout(
                    REDIS_TIMEOUT,
                    redis::aio::ConnectionManager::new_with_config((*self.client).clone(), config),
                )
                .await
                .map_err(|_| FenceError::RedisTimeout(REDIS_TIMEOUT))?
                .map_err(FenceError::from)
            })
            .await?;
        Ok(conn.clone())
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &str,
        keys: &[Vec<u8>],
        args: &[Vec<u8>],
    ) -> Result<T, FenceError> {
        let mut conn = self.conn().await?;
        let script = redis::Script::new(script);
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(k.as_slice());
        }
        for a in args {
            invocation.arg(a.as_slice());
        }
        tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut conn))
            .await
            .map_err(|_| FenceError::RedisTimeout(REDIS_TIMEOUT))?
            .map_err(FenceError::from)
    }

    fn keys(key: &str) -> Vec<Vec<u8>> {
        vec![
            format!("{RECEIPT_PREFIX}{key}").into_bytes(),
            format!("{PENDING_PREFIX}{key}").into_bytes(),
        ]
    }

    pub(super) async fn claim(
        &self,
        key: &str,
        token: &str,
        lease: Duration,
    ) -> Result<Claim, FenceError> {
        let (kind, bytes): (i64, Vec<u8>) = self
            .run(
                CLAIM,
                &Self::keys(key),
                &[
                    token.as_bytes().to_vec(),
                    lease.as_millis().max(1).to_string().into_bytes(),
                ],
            )
            .await?;
        Ok(match kind {
            // Redis expires receipts itself (PX), so replicas' clocks need not agree on `expires_ms`.
            1 => match Receipt::decode(&bytes) {
                Some(r) => Claim::Receipt(r),
                None => return Err(FenceError::Unreadable(format!("{RECEIPT_PREFIX}{key}"))),
            },
            2 => Claim::Lead,
            _ => Claim::Pending,
        })
    }

    pub(super) async fn put(
        &self,
        key: &str,
        token: &str,
        receipt: &Receipt,
    ) -> Result<bool, FenceError> {
        let ttl = receipt.expires_ms.saturating_sub(now_ms()).max(1);
        let dup: i64 = self
            .run(
                PUT,
                &Self::keys(key),
                &[
                    receipt.encode(),
                    ttl.to_string().into_bytes(),
                    token.as_bytes().to_vec(),
                ],
            )
            .await?;
        Ok(dup == 1)
    }

    /// Keeps the pending marker alive while this process executes the key (a response may stream for
    /// longer than the lease), until the flight ends.
    pub(super) async fn renew(
        self,
        key: String,
        token: String,
        lease: Duration,
        mut flight: watch::Receiver<FlightState>,
    ) {
        let keys = Self::keys(&key);
        let every = (lease / 2).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = flight.wait_for(|s| !matches!(s, FlightState::Running)) => return,
            }
            let args = [
                token.as_bytes().to_vec(),
                lease.as_millis().max(1).to_string().into_bytes(),
            ];
            let renewed: Result<i64, FenceError> = self.run(RENEW, &keys[1..], &args).await;
            if !matches!(renewed, Ok(1)) {
                tracing::warn!(key, "cannot renew the pending marker; another replica may execute the key once its lease runs out");
                return;
            }
        }
    }

    pub(super) async fn release(&self, key: &str, token: &str) {
        let keys = Self::keys(key);
        let result: Result<i64, FenceError> = self
            .run(RELEASE, &keys[1..], &[token.as_bytes().to_vec()])
            .await;
        if let Err(e) = result {
            tracing::warn!(key, error = %e, "cannot clear the pending marker; other replicas wait for its lease");
        }
    }
}
