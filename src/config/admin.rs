//! `[admin]`: how the admin listener authenticates mutating calls; read by `admin` at start and reload.

use serde::Deserialize;

/// Every field defaults to empty (`Default` derive): no token file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// File holding the bearer token for mutating admin endpoints; env `DRIFTGUARD_ADMIN_TOKEN` wins.
    /// With no token at all, only loopback peers may call them.
    pub token_file: String,
}
