//! `[listen]`: where the proxy and admin listeners bind and how long a shutdown drains. Read by `app`
//! at start (addresses are restart-only) and by the shutdown path.

use serde::Deserialize;

use super::dur::{secs, Dur};
use super::{err, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Address of the proxy listener (HTTP/1.1 and h2c).
    pub proxy: String,
    /// Address of the admin listener (/metrics, /status, mutating endpoints).
    pub admin: String,
    /// On SIGTERM/SIGINT, how long in-flight requests (streams included) may run before exit.
    pub drain_timeout: Dur,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            proxy: "0.0.0.0:9000".into(),
            admin: "0.0.0.0:9901".into(),
            drain_timeout: secs(30),
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
    }
}
