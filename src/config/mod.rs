//! Configuration: the TOML file of SPEC §9, parsed into typed structs.
//!
//! One file per section, each field's doc and default beside it; this root holds [`Config`], the parse
//! that reports *every* error with its key path (so `driftguard check` and a refused reload print them all
//! at once instead of one per edit-and-retry cycle), and the checks that span sections. Unknown keys are
//! errors. Config uses nothing of the crate: every stage reads it, so it sits below them all.

mod admin;
mod arms;
mod breaker;
mod budget;
mod cache;
mod dur;
mod fleet;
mod listen;
mod log;
mod ranges;
mod recovery;
mod rollback;
mod routing;
mod rules;
mod runtime;
mod signals;
mod tls;
mod upstream;
mod writes;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use admin::Admin;
pub use arms::{is_pin_name, ArmConfig};
pub use breaker::Breaker;
pub use budget::{Budget, BudgetBackend, OnBackendError};
pub use cache::Cache;
pub use dur::Dur;
pub use fleet::{Fleet, FleetOnError};
pub use listen::Listen;
pub use log::Log;
pub use ranges::MAX_DURATION;
pub use recovery::Recovery;
pub use rollback::{Hook, HookEvent, HookKind, Lever, Rollback, RollbackStep};
pub use routing::Routing;
pub use rules::{
    rule_name, Rules, HARD_RULE_KEYS, MAX_SPAN, MAX_WINDOW, SLOT, SLOTS, SOFT_RULE_KEYS,
};
pub use runtime::Runtime;
pub use signals::{pointer_problem, EmbedderKind, LocalEmbedder, OpenAiEmbedder, Signals};
pub use tls::{Tls, Trust};
pub use upstream::{parse_upstream, parse_upstream_url, redact_userinfo, Upstream, UpstreamUrl};
pub use writes::{parse_write_route, ReceiptStore, Writes};

/// One configuration problem, located by its key path (`arms[1].upstream`, `rules.window`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// All problems found in one configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

fn err(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        message: message.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for persistent state (baseline, guard state, receipts, snapshots).
    pub state_dir: PathBuf,
    /// A client-sent `x-pin-*` that differs from the stamped pin gets 409 with a JSON diff.
    pub strict_pins: bool,
    /// `[listen]`: proxy and admin addresses, shutdown drain.
    pub listen: Listen,
    /// `[runtime]`: Tokio worker threads.
    pub runtime: Runtime,
    /// `[admin]`: the admin token.
    pub admin: Admin,
    /// Global pins, stamped for every arm (per-arm pins and `DRIFTGUARD_PIN_*` env override them).
    pub pins: BTreeMap<String, String>,
    /// `[[arms]]`: the named upstreams; at least one is required.
    pub arms: Vec<ArmConfig>,
    /// `[routing]`: sticky routing.
    pub routing: Routing,
    /// `[upstream]`: connection timeouts and pooling.
    pub upstream: Upstream,
    /// `[cache]`: the pins of the cache namespace.
    pub cache: Cache,
    /// `[signals]`: evaluation sampling, pointers and embedder.
    pub signals: Signals,
    /// The global token budget; off unless the `[budget]` table is present.
    pub budget: Option<Budget>,
    /// `[breaker]`: the per-arm circuit breaker.
    pub breaker: Breaker,
    /// `[writes]`: write routes and the idempotency fence.
    pub writes: Writes,
    /// `[rules]`: when an arm trips.
    pub rules: Rules,
    /// `[rollback]`: the plan run on a trip.
    pub rollback: Rollback,
    /// `[recovery]`: the exit targets back to healthy.
    pub recovery: Recovery,
    /// `[log]`: access log and log filter.
    pub log: Log,
    /// Replicas sharing windows and verdicts; off unless the `[fleet]` table is present.
    pub fleet: Option<Fleet>,
    /// `[tls]`: what outgoing TLS connections trust on top of the platform's roots.
    pub tls: Tls,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from("./driftguard-state"),
            strict_pins: false,
            listen: Listen::default(),
            runtime: Runtime::default(),
            admin: Admin::default(),
            pins: BTreeMap::new(),
            arms: Vec::new(),
            routing: Routing::default(),
            upstream: Upstream::default(),
            cache: Cache::default(),
            signals: Signals::default(),
            budget: None,
            breaker: Breaker::default(),
            writes: Writes::default(),
            rules: Rules::default(),
            rollback: Rollback::default(),
            recovery: Recovery::default(),
            log: Log::default(),
            fleet: None,
            tls: Tls::default(),
        }
    }
}

// === impl Config ===

impl Config {
    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![err(
                "",
                format!("cannot read {}: {e}", path.display()),
            )])
        })?;
        Config::parse(&text)
    }

    /// Parses configuration text, returning every error found with its key path.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigErrors(vec![err(
                "",
                format!("TOML syntax: {}", e.to_string().trim_end()),
            )])
        })?;
        let mut errors = Vec::new();
        // serde stops at the first error; to report all of them, record it, drop the offending key and try
        // again, until the rest deserializes.
        let config = loop {
            match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(table.clone())) {
                Ok(config) => break Some(config),
                Err(e) => {
                    let path = e.path().to_string();
                    // toml appends "in `key`" on a second line; the path already says where.
                    let message = e
                        .inner()
                        .to_string()
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_string();
                    let (path, message) = locate_unknown_field(path, message);
                    let repeated = errors.iter().any(|x: &ConfigError| x.path == path);
                    if !repeated {
                        errors.push(err(path.clone(), message));
                    }
                    if repeated || errors.len() > 100 || !remove_path(&mut table, &path) {
                        break None;
                    }
                }
            }
        };
        let Some(mut config) = config else {
            return Err(ConfigErrors(errors));
        };
        config.resolve_trust();
        errors.extend(config.validate());
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Hands `[tls] ca_file`, with a target's own `ca_file`, to every section that makes TLS connections.
    pub fn resolve_trust(&mut self) {
        let global = self.tls.ca_file.as_str();
        self.upstream.trust = Trust::resolve(global, "");
        let openai = &mut self.signals.openai;
        openai.trust = Trust::resolve(global, &openai.ca_file);
        for hook in &mut self.rollback.hooks {
            hook.trust = Trust::resolve(global, &hook.ca_file);
        }
        if let Some(budget) = &mut self.budget {
            budget.trust = Trust::resolve(global, "");
        }
        self.writes.trust = Trust::resolve(global, "");
        if let Some(fleet) = &mut self.fleet {
            fleet.trust = Trust::resolve(global, "");
        }
    }

    /// Semantic checks that types alone cannot express, section by section in file order; the checks
    /// that span sections (an arm named elsewhere) are here.
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        self.listen.validate(&mut errors);
        arms::check_pins("pins", &self.pins, &mut errors);
        arms::validate_arms(&self.arms, &mut errors);
        self.routing.validate(&mut errors);
        self.cache.validate(&mut errors);
        self.signals.validate(&mut errors);
        if let Some(budget) = &self.budget {
            budget.validate(&mut errors);
        }
        if let Some(fleet) = &self.fleet {
            fleet.validate(&mut errors);
        }
        let target = &self.breaker.degrade_target;
        if !target.is_empty() && !self.arms.iter().any(|a| &a.name == target) {
            errors.push(err(
                "breaker.degrade_target",
                format!("no arm named {target:?}"),
            ));
        }
        self.breaker.validate(&mut errors);
        self.writes.validate(&mut errors);
        self.rules.validate(&mut errors);
        self.rollback.validate(&mut errors);
        self.tls.validate(&mut errors);
        ranges::check(self, &mut errors);
        errors
    }
}

/// serde_path_to_error locates an unknown key at its parent; move the path onto the key itself.
fn locate_unknown_field(path: String, message: String) -> (String, String) {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once('`') {
            let full = if path.is_empty() || path == "." {
                field.to_string()
            } else if path.ends_with(field) {
                path
            } else {
                format!("{path}.{field}")
            };
            let message = match closest(field, &expected_keys(expected)) {
                Some(known) => format!("unknown key {field:?} (did you mean {known:?}?)"),
                None => format!("unknown key {field:?}"),
            };
            return (full, message);
        }
    }
    (if path == "." { String::new() } else { path }, message)
}

/// The keys serde lists after an unknown field: "..., expected one of `a`, `b`" or "expected `a`".
fn expected_keys(message: &str) -> Vec<&str> {
    let Some((_, list)) = message.split_once("expected") else {
        return Vec::new();
    };
    list.split('`').skip(1).step_by(2).collect()
}

/// The known key closest to a mistyped one, when it is close: at most a third of its letters differ
/// (`sampel` → `sample`, `windw` → `window`), so an unrelated key is not offered as a fix.
fn closest<'a>(typed: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(typed, k), *k))
        .filter(|(d, k)| *d > 0 && *d <= (typed.len().max(k.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance, with a swap of two neighbouring letters counting as one edit (the usual typo).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // d[i][j]: distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// Removes the value at a serde_path_to_error path (`a.b[2].c`) so parsing can go on past it.
fn remove_path(table: &mut toml::Table, path: &str) -> bool {
    let mut segments = Vec::new();
    for part in path.split('.') {
        let (key, rest) = part.split_once('[').unwrap_or((part, ""));
        if !key.is_empty() {
            segments.push(Segment::Key(key.to_string()));
        }
        for idx in rest.split('[') {
            if let Ok(i) = idx.trim_end_matches(']').parse::<usize>() {
                segments.push(Segment::Index(i));
            }
        }
    }
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut value = toml::Value::Table(std::mem::take(table));
    let removed = {
        let mut cursor = Some(&mut value);
        for seg in parents {
            cursor = cursor.and_then(|v| match (seg, v) {
                (Segment::Key(k), toml::Value::Table(t)) => t.get_mut(k),
                (Segment::Index(i), toml::Value::Array(a)) => a.get_mut(*i),
                _ => None,
            });
        }
        match (last, cursor) {
            (Segment::Key(k), Some(toml::Value::Table(t))) => t.remove(k).is_some(),
            (Segment::Index(i), Some(toml::Value::Array(a))) if *i < a.len() => {
                a.remove(*i);
                true
            }
            _ => false,
        }
    };
    if let toml::Value::Table(t) = value {
        *table = t;
    }
    removed
}

enum Segment {
    Key(String),
    Index(usize),
}

#[cfg(test)]
mod tests;
