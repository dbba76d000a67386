//! `[rollback]`, `[rollback.levers]`, `[rollback.alias]`, `[[rollback.hooks]]`: the plan run on a trip
//! (SPEC §6). Read by `rollback` (engine, plan, hooks).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::arms::check_pins;
use super::dur::{secs, Dur};
use super::rules::{rule_name, HARD_RULE_KEYS};
use super::tls::Trust;
use super::{err, ConfigError};

/// What the `lever` step pulls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lever {
    /// Canary weight → 0 / active arm → the previous one.
    Route,
    /// INDEX_ALIAS and INDEX_HASH pins back to the last good values.
    Alias,
    /// The named kill-switch flag off.
    Flag,
    /// Stamp the degrade directives.
    Degrade,
    /// Pull nothing (writes stay frozen, fences on).
    None,
}

/// One step of the rollback plan, run in the configured order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackStep {
    Capture,
    FreezeWrites,
    Lever,
    RotateCache,
    Throttle,
    Hooks,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rollback {
    /// The steps run on a trip, in order; a step left out is skipped.
    pub steps: Vec<RollbackStep>,
    /// Fallback lever for a rule without an entry in `levers`.
    pub lever: Lever,
    /// Kill-switch flag turned off by lever `flag`.
    pub flag: String,
    /// Directives stamped as `x-driftguard-degrade` by lever `degrade`.
    pub degrade: String,
    /// While tripped, the budget and breaker thresholds are multiplied by this, in (0, 1].
    pub throttle_factor: f64,
    /// Rule name → lever, over the decision tree's defaults.
    pub levers: BTreeMap<String, Lever>,
    /// Last good pin values for lever `alias` (else the baseline arm's).
    pub alias: BTreeMap<String, String>,
    /// Hooks fired by the `hooks` step and on recovery and escalation.
    pub hooks: Vec<Hook>,
}

impl Default for Rollback {
    fn default() -> Self {
        Rollback {
            steps: vec![
                RollbackStep::Capture,
                RollbackStep::FreezeWrites,
                RollbackStep::Lever,
                RollbackStep::RotateCache,
                RollbackStep::Throttle,
                RollbackStep::Hooks,
            ],
            lever: Lever::Route,
            flag: String::new(),
            degrade: "skip_rerank;k=3;cite_only".into(),
            throttle_factor: 0.5,
            levers: BTreeMap::new(),
            alias: BTreeMap::new(),
            hooks: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookKind {
    /// Run a command (argv, no shell) with `DRIFTGUARD_*` env.
    Exec,
    /// POST the snapshot JSON to a URL.
    Webhook,
}

/// The guard transitions a hook can fire on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookEvent {
    Tripped,
    Recovered,
    Escalated,
}

/// One `[[rollback.hooks]]` entry; `name` and `kind` are required, the rest defaults beside it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    /// Name in logs and the hook outcome metric.
    pub name: String,
    /// "exec" or "webhook".
    pub kind: HookKind,
    /// argv for `exec` (no shell).
    #[serde(default)]
    pub command: Vec<String>,
    /// Target for `webhook`.
    #[serde(default)]
    pub url: String,
    /// Env var holding the HMAC secret for `webhook`.
    #[serde(default)]
    pub secret_env: String,
    /// Longest run of one attempt.
    #[serde(default = "default_hook_timeout")]
    pub timeout: Dur,
    /// Attempts after the first failed one (with backoff).
    #[serde(default)]
    pub retries: u32,
    /// The transitions that fire the hook.
    #[serde(default = "default_hook_events")]
    pub on: Vec<HookEvent>,
    /// PEM bundle of CAs this webhook's https receiver may be signed by, on top of `[tls] ca_file`.
    #[serde(default)]
    pub ca_file: String,
    /// What its TLS connections trust: `[tls] ca_file` and this hook's `ca_file`; filled in by `Config::parse`.
    #[serde(skip)]
    pub trust: Trust,
}

fn default_hook_timeout() -> Dur {
    secs(10)
}

fn default_hook_events() -> Vec<HookEvent> {
    vec![
        HookEvent::Tripped,
        HookEvent::Recovered,
        HookEvent::Escalated,
    ]
}

impl Rollback {
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        let rb = self;
        if !(rb.throttle_factor > 0.0 && rb.throttle_factor <= 1.0) {
            errors.push(err("rollback.throttle_factor", "must be in (0, 1]"));
        }
        if rb.lever == Lever::Flag && rb.flag.is_empty() {
            errors.push(err(
                "rollback.flag",
                "required when rollback.lever = \"flag\"",
            ));
        }
        let rule_names: Vec<&str> = HARD_RULE_KEYS.iter().map(|k| rule_name(k)).collect();
        for k in rb.levers.keys() {
            if !rule_names.contains(&k.as_str()) {
                errors.push(err(
                    format!("rollback.levers.{k}"),
                    format!("unknown rule; known: {}", rule_names.join(", ")),
                ));
            }
        }
        check_pins("rollback.alias", &rb.alias, errors);
        for (i, hook) in rb.hooks.iter().enumerate() {
            let at = |k: &str| format!("rollback.hooks[{i}].{k}");
            if hook.name.is_empty() {
                errors.push(err(at("name"), "must not be empty"));
            }
            match hook.kind {
                HookKind::Exec if hook.command.is_empty() => {
                    errors.push(err(at("command"), "required for kind = \"exec\""))
                }
                HookKind::Webhook
                    if !(hook.url.starts_with("http://") || hook.url.starts_with("https://")) =>
                {
                    errors.push(err(
                        at("url"),
                        "an http:// or https:// URL is required for kind = \"webhook\"",
                    ))
                }
                _ => {}
            }
            super::tls::check_ca_file(&at("ca_file"), &hook.ca_file, errors);
        }
    }
}
