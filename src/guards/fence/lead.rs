//! A keyed write's way through the fence once it leads its key: [`Lead`] is the right to execute it,
//! [`Recording`] the response on its way to the client, copied and stored as the key's receipt when its
//! body ends (see the module doc of `super` for what a broken-off body leaves). `super::Fence::admit`
//! hands out the lead; `serve::handle` turns it into a recording once the response head is back, and
//! `serve::body` pushes the body through it and finishes it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::{
    Fence, FenceError, FenceSettings, Fingerprint, FlightState, Receipt, Store, PER_EXCHANGE,
};
use crate::capture::Capture;
use crate::clock::now_ms;

/// The right to execute a key. Dropped unsettled (no response came back), it frees the key.
pub struct Lead {
    pub(super) fence: Arc<Fence>,
    pub(super) key: String,
    /// Value of the Redis pending marker, so only this holder clears it.
    pub(super) token: String,
    pub(super) settled: bool,
}

impl Lead {
    /// The response head is back: record the exchange from here on.
    pub fn record(
        self,
        request: Fingerprint,
        status: StatusCode,
        headers: &HeaderMap,
        settings: &FenceSettings,
    ) -> Recording {
        let headers = headers
            .iter()
            .filter(|(name, _)| !PER_EXCHANGE.contains(name))
            .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
            .collect();
        Recording {
            lead: Some(self),
            request,
            status: status.as_u16(),
            headers,
            body: Capture::new(settings.receipt_body_max),
            ttl: settings.ttl,
        }
    }

    pub(super) fn settle(&mut self, state: FlightState) {
        self.settled = true;
        self.fence.finish_flight(&self.key, state);
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.fence.finish_flight(&self.key, FlightState::Released);
        if let Store::Redis(redis) = &self.fence.store {
            let (redis, key, token) = (redis.clone(), self.key.clone(), self.token.clone());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { redis.release(&key, &token).await });
            }
        }
    }
}

/// A response of a keyed write on its way to the client, copied for its receipt.
pub struct Recording {
    lead: Option<Lead>,
    request: Fingerprint,
    status: u16,
    headers: Vec<(String, String)>,
    body: Capture,
    ttl: Duration,
}

impl Recording {
    #[inline]
    pub fn push(&mut self, data: &Bytes) {
        self.body.push(data);
    }

    /// The body ended (`complete`) or broke off: store the receipt in the background, then let the
    /// waiters replay it. A broken-off body leaves a receipt too, without its body (see the module doc).
    pub fn finish(self, complete: bool) {
        let commit = self.commit(complete);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                // A failure is counted and logged by the store; the response is already over.
                rt.spawn(async move {
                    let _ = commit.await;
                });
            }
            Err(_) => tracing::error!("no runtime to store an idempotency receipt on"),
        }
    }

    /// [`Recording::finish`] as a future: done once the receipt is stored and the waiters have it. An
    /// error means the receipt could not be stored: the response must fail (SPEC §5: the end of the
    /// body waits for the commit), and the receipt stays in memory until a retry of the key stores it.
    pub fn commit(
        mut self,
        complete: bool,
    ) -> impl std::future::Future<Output = Result<(), FenceError>> + Send + 'static {
        let lead = self.lead.take();
        let omitted = !complete || self.body.truncated;
        let created_ms = now_ms();
        let receipt = Arc::new(Receipt {
            request: self.request.clone(),
            status: self.status,
            headers: std::mem::take(&mut self.headers),
            body_omitted: omitted,
            created_ms,
            expires_ms: created_ms.saturating_add(self.ttl.as_millis() as u64),
            body: if omitted {
                Bytes::new()
            } else {
                std::mem::replace(&mut self.body, Capture::new(0))
                    .compact()
                    .into_bytes()
            },
        });
        async move {
            let Some(mut lead) = lead else {
                return Ok(());
            };
            // Settled: the key is freed below, once the receipt is stored, not on drop.
            lead.settled = true;
            let fence = lead.fence.clone();
            match fence.put(&lead.key, &lead.token, &receipt, false).await {
                Ok(()) => {
                    fence.finish_flight(&lead.key, FlightState::Done(receipt));
                    Ok(())
                }
                Err(e) => {
                    fence
                        .uncommitted
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(&lead.key, receipt);
                    // Waiters go round again: the next to lead meets the kept receipt in `claim`.
                    fence.finish_flight(&lead.key, FlightState::Released);
                    Err(e)
                }
            }
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if self.lead.is_some() {
            let recording = Recording {
                lead: self.lead.take(),
                request: self.request.clone(),
                status: self.status,
                headers: std::mem::take(&mut self.headers),
                body: Capture::new(0),
                ttl: self.ttl,
            };
            recording.finish(false);
        }
    }
}
