//! `[listen]`: where the proxy and admin listeners bind, how many client connections the proxy holds
//! and for how long an idle or slowly uploading client may hold one, and how long a shutdown drains.
//! Read by `app` and `cmd::run` at start (addresses, the cap and the idle timeout are restart-only),
//! by `serve::router` for the upload timeout (reloadable), and by the shutdown path.

use std::time::Duration;

use serde::Deserialize;

use super::dur::{secs, Dur};
use super::{err, ConfigError};

/// Upper bound of `listen.max_connections`: far above what one sidecar's file descriptors allow, low
/// enough that a typo (an extra zero or three) is caught by `check`.
pub const MAX_CONNECTIONS: usize = 1_000_000;
/// Upper bound of the client-side timeouts: a client holding a connection idle, or taking longer than
/// this to upload one body, is not one to wait for.
const MAX_CLIENT_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Address of the proxy listener (HTTP/1.1 and h2c).
    pub proxy: String,
    /// Address of the admin listener (/metrics, /status, mutating endpoints).
    pub admin: String,
    /// On SIGTERM/SIGINT, how long in-flight requests (streams included) may run before exit.
    pub drain_timeout: Dur,
    /// Client connections the proxy listener holds at once; past it a new connection is closed at
    /// accept and counted (`driftguard_connections_refused_total`). The admin listener is not counted.
    pub max_connections: usize,
    /// How long a client connection may sit without a request in flight — before its first byte, or
    /// between two requests on a keep-alive connection — before it is closed.
    pub idle_timeout: Dur,
    /// How long a client has to send a request body in full: past it the request gets `408`. Never
    /// counted against the arm, and the upstream's own timeout starts only once the body is sent.
    pub body_timeout: Dur,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            proxy: "0.0.0.0:9000".into(),
            admin: "0.0.0.0:9901".into(),
            drain_timeout: secs(30),
            max_connections: 4096,
            idle_timeout: secs(60),
            body_timeout: secs(60),
        }
    }
}

impl Listen {
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        for (key, value) in [("listen.proxy", &self.proxy), ("listen.admin", &self.admin)] {
            if value.parse::<std::net::SocketAddr>().is_err() {
                errors.push(err(
                    key,
                    format!("{value:?} is not an address like \"0.0.0.0:9000\""),
                ));
            }
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.max_connections) {
            errors.push(err(
                "listen.max_connections",
                format!("must be between 1 and {MAX_CONNECTIONS}"),
            ));
        }
        for (key, value) in [
            ("listen.idle_timeout", self.idle_timeout),
            ("listen.body_timeout", self.body_timeout),
        ] {
            if value.0.is_zero() || value.0 > MAX_CLIENT_TIMEOUT {
                errors.push(err(key, "must be above 0 and at most 1h"));
            }
        }
    }
}
