//! Guards (SPEC §5): protect the service while it is unhealthy. Each guard's step on the request path is a
//! function that returns a typed decision; `serve::handle` runs them in order and turns their refusals
//! into responses, so nothing here knows about the proxy's bodies or JSON errors.

pub mod breaker;
pub mod budget;
pub mod fence;
pub mod freeze;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use breaker::{Breaker, BreakerSettings};
use http::HeaderName;

/// The request id header: `serve` reads and stamps it, and the fence never stores it in a receipt (it
/// belongs to one exchange).
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Whether a failed read of a client's request body is the body's own fault — malformed framing, a
/// broken chunked encoding: 400 — rather than the client leaving (499). hyper reports broken chunked
/// framing as an I/O error of kind `InvalidInput`/`InvalidData`. Used by every step that reads a body
/// (the fence's hash, the budget's peek) and by `serve` for the body it sends on.
pub fn body_malformed(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            );
        }
        source = cause.source();
    }
    false
}

/// One breaker per arm name, kept across reloads (a reload changes its settings, not its state).
#[derive(Default)]
pub struct Breakers {
    map: Mutex<HashMap<String, Breaker>>,
}

impl Breakers {
    /// The breaker of an arm, created on first use; an existing one takes `settings`.
    pub fn get(&self, arm: &str, settings: BreakerSettings) -> Breaker {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(arm) {
            Some(b) => {
                b.set_settings(settings);
                b.clone()
            }
            None => {
                let b = Breaker::new(settings, Instant::now());
                map.insert(arm.to_string(), b.clone());
                b
            }
        }
    }
}
