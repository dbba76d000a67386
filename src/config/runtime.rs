//! `[runtime]`: the Tokio runtime's shape, read once by `main`/`app` before anything starts.

use serde::Deserialize;

use super::{err, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Tokio worker threads. 1 runs a single-threaded runtime, the usual choice for a one-core sidecar.
    pub workers: usize,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime { workers: 1 }
    }
}

impl Runtime {
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        if self.workers == 0 {
            errors.push(err("runtime.workers", "must be at least 1"));
        }
    }
}
