//! `[log]`: the access log and the operational log filter; read by `telemetry` at start.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// One JSON line per proxied request on stdout.
    pub access: bool,
    /// Filter for operational logs (tracing `EnvFilter` syntax); env `RUST_LOG` wins.
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            access: true,
            level: "info".into(),
        }
    }
}
