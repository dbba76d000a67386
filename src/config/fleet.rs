//! `[fleet]`: replicas of one service share their windows and their verdict through Redis, so the
//! fleet trips once and flips together. Absent: each replica judges and flips alone. Read by `fleet`
//! (the Redis link) and `app` (wiring).

use serde::Deserialize;

use super::dur::{millis, Dur};
use super::tls::Trust;
use super::{err, ConfigError};

/// What judging does while Redis is unreachable or slower than `redis_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FleetOnError {
    /// Judge this replica's own windows and act alone until Redis answers again.
    Local,
    /// Keep the last fleet state: no trip, recovery or escalation until Redis answers again.
    Hold,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fleet {
    /// The Redis server the replicas share, e.g. "redis://127.0.0.1:6379" (`rediss://` for TLS).
    pub redis_url: String,
    /// Prefix of every fleet key: one fleet is one service.
    pub key: String,
    /// This replica's name; empty: env `POD_NAME`, else the hostname.
    pub replica: String,
    /// Replicas judge and flip per scope (e.g. a region); empty: one scope for the whole fleet.
    pub scope: String,
    /// "local" judges this replica's own windows while Redis fails; "hold" keeps the last fleet state.
    pub on_backend_error: FleetOnError,
    /// Longest wait for one Redis call; slower counts as a backend error.
    pub redis_timeout: Dur,
    /// What its TLS connections trust (`rediss://`: `[tls] ca_file`); filled in by `Config::parse`.
    #[serde(skip)]
    pub trust: Trust,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            redis_url: "redis://127.0.0.1:6379".into(),
            key: "driftguard:fleet".into(),
            replica: String::new(),
            scope: String::new(),
            on_backend_error: FleetOnError::Local,
            redis_timeout: millis(200),
            trust: Trust::default(),
        }
    }
}

impl Fleet {
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        if let Err(e) = redis::Client::open(self.redis_url.as_str()) {
            errors.push(err(
                "fleet.redis_url",
                format!("{:?} is not a Redis URL: {e}", self.redis_url),
            ));
        }
        if self.key.is_empty() {
            errors.push(err("fleet.key", "must not be empty"));
        }
        for (name, value) in [
            ("fleet.replica", &self.replica),
            ("fleet.scope", &self.scope),
        ] {
            if value
                .chars()
                .any(|c| c.is_whitespace() || c == ':' || c.is_control())
            {
                errors.push(err(name, "no spaces, colons or control characters"));
            }
        }
        if self.scope == "_" {
            errors.push(err(
                "fleet.scope",
                "\"_\" is reserved (it names the unscoped fleet)",
            ));
        }
    }

    /// This replica's name: `replica`, else env `POD_NAME`, else the hostname, else "driftguard".
    pub fn replica_name(&self) -> String {
        if !self.replica.is_empty() {
            return self.replica.clone();
        }
        if let Some(pod) = std::env::var("POD_NAME")
            .ok()
            .filter(|p| !p.trim().is_empty())
        {
            return pod.trim().to_string();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "driftguard".into())
    }
}
