//! `[routing]`: how a request picks its arm; read by `serve::router` when the routing table is built.

use serde::Deserialize;

use super::{err, ConfigError};

/// Every field defaults to empty (`Default` derive): random split by weight.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Routing {
    /// Request header whose value pins a user to one arm (empty: random split by weight).
    pub sticky_header: String,
}

impl Routing {
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        if !self.sticky_header.is_empty()
            && http::HeaderName::try_from(&self.sticky_header).is_err()
        {
            errors.push(err("routing.sticky_header", "not a valid header name"));
        }
    }
}
