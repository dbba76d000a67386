//! `[runtime]`: the Tokio runtime's shape, read once by `main`/`app` before anything starts.

use serde::Deserialize;

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
