//! The running application's shared state: config and routing table (each swapped atomically), metrics,
//! the upstream client, and the admin token. Reload and weight changes go through here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;
use sha2::{Digest, Sha256};

use crate::config::{self, Config, ConfigError, ConfigErrors};
use crate::eval::Pipeline;
use crate::guards::budget::{Budget, BudgetSettings, RedisBudgetError};
use crate::guards::fence::{Fence, FenceError};
use crate::guards::Breakers;
use crate::rollback::state::{GuardState, RuntimeState, StateError, StateFile};
use crate::rules::Rule;
use crate::serve::context::{BudgetCell, Context, TableCell};
use crate::serve::pins;
use crate::serve::router::{
    is_flag_name, Controls, Overrides, RouterError, RoutingTable, MAX_FLAGS,
};
use crate::serve::upstream::Pools;
use crate::signals::EvalError;
use crate::telemetry::metrics::{Labels, Metrics};

pub const ADMIN_TOKEN_ENV: &str = "DRIFTGUARD_ADMIN_TOKEN";

/// A config as loaded: the parsed value, the token it resolves to, and the hash of its text.
pub struct Loaded {
    pub config: Config,
    pub admin_token: Option<String>,
    pub hash: String,
}

/// Reads, parses and validates a config file, resolving the admin token.
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            message: format!("cannot read {}: {e}", path.display()),
        }])
    })?;
    let config = Config::parse(&text)?;
    let admin_token = admin_token(&config, std::env::var(ADMIN_TOKEN_ENV).ok())
        .map_err(|e| ConfigErrors(vec![e]))?;
    let hash = hex::encode(&Sha256::digest(text.as_bytes())[..8]);
    Ok(Loaded {
        config,
        admin_token,
        hash,
    })
}

/// The admin token: the env var wins, else the first line of `admin.token_file`; `None` when neither.
fn admin_token(config: &Config, env: Option<String>) -> Result<Option<String>, ConfigError> {
    if let Some(token) = env.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
        return Ok(Some(token));
    }
    if config.admin.token_file.is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&config.admin.token_file).map_err(|e| ConfigError {
        path: "admin.token_file".into(),
        message: format!("cannot read {:?}: {e}", config.admin.token_file),
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(ConfigError {
            path: "admin.token_file".into(),
            message: "the token file is empty".into(),
        });
    }
    Ok(Some(token))
}

/// Shared state of a running driftguard.
pub struct App {
    config_path: Option<PathBuf>,
    config: ArcSwap<Config>,
    config_hash: ArcSwap<String>,
    table: TableCell,
    admin_token: ArcSwap<Option<String>>,
    env_pins: BTreeMap<String, String>,
    pub metrics: Arc<Metrics>,
    pub pools: Pools,
    pub breakers: Breakers,
    /// The global token budget, when the config has a `[budget]`; rebuilt by a reload that changes its
    /// backend.
    budget: BudgetCell,
    pub pipeline: Arc<Pipeline>,
    /// OpenTelemetry tracing, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; `None` costs the request path
    /// nothing more than this check.
    pub otel: Option<Arc<crate::telemetry::otel::Otel>>,
    /// The idempotency fence, opened at start when the config names write routes.
    pub fence: Option<Arc<Fence>>,
    started: Instant,
    started_ms: u64,
    draining: AtomicBool,
    /// Serialises table rebuilds (reload, weights, controls) so none is lost between load and store, and
    /// holds what was set at run time; a reload re-applies it so re-reading the file never silently
    /// undoes a rollback or a freeze.
    write_lock: Mutex<RuntimeState>,
    state_file: StateFile,
}

/// Keys whose new value a reload cannot apply (listeners, runtime, pools, evaluation threads).
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    macro_rules! changed {
        ($($section:ident . $key:ident),+ $(,)?) => {
            [$((concat!(stringify!($section), ".", stringify!($key)), old.$section.$key != new.$section.$key)),+]
        };
    }
    let keys = changed!(
        listen.proxy,
        listen.admin,
        runtime.workers,
        upstream.connect_timeout,
        upstream.pool_max_idle,
        upstream.pool_idle_timeout,
        signals.workers,
        signals.queue,
        signals.max_sessions,
        writes.store,
        writes.redis_url,
    );
    keys.into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| key)
        .collect()
}

/// The routing-table controls a runtime state and config call for.
fn controls(state: &RuntimeState, config: &Config) -> Controls {
    let degrade = state
        .degrade
        .then(|| HeaderValue::try_from(config.rollback.degrade.as_str()).ok())
        .flatten();
    Controls::new(state.frozen, degrade, state.flags.clone())
}

/// The arm-building overrides a runtime state calls for.
fn overrides<'a>(state: &'a RuntimeState, config: &Config) -> Overrides<'a> {
    Overrides {
        pins: Some(&state.pin_overrides),
        cache_epoch: state.cache_epoch,
        throttle: state.throttled.then_some(config.rollback.throttle_factor),
    }
}

/// Applies the runtime state to a table built from the config: controls, then the weights of arms that
/// still exist (the others are forgotten).
fn apply(
    state: &mut RuntimeState,
    table: RoutingTable,
    config: &Config,
) -> Result<RoutingTable, RouterError> {
    let mut table = table.with_controls(controls(state, config));
    state.weights.retain(|arm, _| table.index_of(arm).is_some());
    for (arm, weight) in state.weights.iter() {
        table = table.with_weight(arm, *weight)?;
        tracing::info!(
            arm = arm.as_str(),
            weight,
            "keeping the weight set at run time over the file's"
        );
    }
    Ok(table)
}

/// The budget's settings for a config and runtime state: `[budget]`, × `rollback.throttle_factor` while
/// throttled. `None` without a `[budget]`.
fn budget_settings(state: &RuntimeState, config: &Config) -> Option<BudgetSettings> {
    let settings = BudgetSettings::from(config.budget.as_ref()?);
    Some(if state.throttled {
        settings.throttled(config.rollback.throttle_factor)
    } else {
        settings
    })
}

/// A change to the controls requested through `POST /flags`.
#[derive(Debug, thiserror::Error)]
pub enum FlagsError {
    #[error("expected a JSON object of flag names to true/false, e.g. {{\"degrade\": true}}")]
    Shape,
    #[error("flag {0:?}: names are 1-64 characters of [A-Za-z0-9_.-] and values true, false or null (remove)")]
    Invalid(String),
    #[error("at most {MAX_FLAGS} named flags")]
    TooMany,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Router(#[from] RouterError),
    #[error("signals: {0}")]
    Signals(#[from] EvalError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Fence(#[from] FenceError),
    #[error(transparent)]
    Budget(#[from] RedisBudgetError),
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload from")]
    NoPath,
    #[error("{0}")]
    Invalid(#[from] ConfigErrors),
    #[error(transparent)]
    Router(#[from] RouterError),
    #[error("signals: {0}")]
    Signals(#[from] EvalError),
    #[error(transparent)]
    Budget(#[from] RedisBudgetError),
}

/// Whether a reload from `old` to `new` needs a new budget rather than new settings for the running one.
fn budget_backend_changed(old: &config::Budget, new: &config::Budget) -> bool {
    old.backend != new.backend
        || (new.backend == config::BudgetBackend::Redis
            && (old.redis_url != new.redis_url
                || old.redis_key != new.redis_key
                || old.redis_timeout != new.redis_timeout
                || old.on_backend_error != new.on_backend_error))
}

impl App {
    pub fn new(loaded: Loaded, config_path: Option<PathBuf>) -> Result<App, StartError> {
        let metrics = Arc::new(Metrics::with_labels(Labels {
            guard_states: &GuardState::ALL.map(GuardState::as_str),
            rules: &Rule::ALL.map(Rule::name),
            fence_decisions: &crate::guards::fence::DECISIONS,
        }));
        let env_pins = pins::from_env(std::env::vars());
        let pools = Pools::new((&loaded.config.upstream).into());
        let breakers = Breakers::default();
        let budget = match &loaded.config.budget {
            Some(b) => Some(Arc::new(Budget::from_config(
                b,
                metrics.budget_backend_errors.clone(),
            )?)),
            None => None,
        };
        let (state_file, mut state) = StateFile::open(&loaded.config.state_dir)?;
        let table = RoutingTable::from_config(
            &loaded.config,
            &env_pins,
            overrides(&state, &loaded.config),
            &metrics,
            &pools,
            &breakers,
        )?;
        let table = apply(&mut state, table, &loaded.config)?;
        if let Some(budget) = &budget {
            budget
                .set_settings(budget_settings(&state, &loaded.config).unwrap_or(budget.settings()));
        }
        metrics.guard_state.set(state.guard.state.gauge());
        if state != RuntimeState::default() {
            tracing::warn!(state = ?state, "restored the runtime state saved before the restart");
        }
        let pipeline = Arc::new(Pipeline::start(&loaded.config.signals, &metrics)?);
        let writes = &loaded.config.writes;
        let fence = match writes.routes.is_empty() {
            true => None,
            false => Some(Arc::new(Fence::open(
                writes,
                &loaded.config.state_dir,
                &metrics,
            )?)),
        };
        // A tracing setup that cannot work is said once; traffic goes on untraced.
        let otel = crate::telemetry::otel::Otel::from_env(&metrics).unwrap_or_else(|e| {
            tracing::error!(error = %e, "OpenTelemetry tracing off");
            None
        });
        Ok(App {
            fence,
            pipeline,
            otel,
            config_path,
            pools,
            breakers,
            budget: Arc::new(ArcSwapOption::new(budget)),
            config: ArcSwap::from_pointee(loaded.config),
            config_hash: ArcSwap::from_pointee(loaded.hash),
            table: Arc::new(ArcSwap::from_pointee(table)),
            admin_token: ArcSwap::from_pointee(loaded.admin_token),
            env_pins,
            metrics,
            started: Instant::now(),
            started_ms: crate::clock::now_ms(),
            draining: AtomicBool::new(false),
            write_lock: Mutex::new(state),
            state_file,
        })
    }

    /// The handles the request path uses.
    pub fn context(&self) -> Arc<Context> {
        Arc::new(Context::new(
            self.table.clone(),
            self.budget.clone(),
            self.fence.clone(),
            self.pipeline.clone(),
            self.otel.clone(),
            self.metrics.clone(),
        ))
    }

    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// The global token budget, when the config has a `[budget]`.
    pub fn budget(&self) -> Option<Arc<Budget>> {
        self.budget.load_full()
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// First 16 hex digits of the SHA-256 of the running config file.
    pub fn config_hash(&self) -> String {
        self.config_hash.load().as_str().to_string()
    }

    /// The environment's pins (`DRIFTGUARD_PIN_*`).
    pub fn env_pins(&self) -> &BTreeMap<String, String> {
        &self.env_pins
    }

    pub fn admin_token(&self) -> Arc<Option<String>> {
        self.admin_token.load_full()
    }

    /// The config file reloads read, if any.
    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    /// Time since this process started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// When this process started, Unix ms.
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Re-reads the config file and swaps in the new config and routing table, or changes nothing.
    pub fn reload(&self) -> Result<String, ReloadError> {
        let path = self.config_path.as_deref().ok_or(ReloadError::NoPath)?;
        let result = self.try_reload(path);
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        self.metrics.reloads.with_label_values(&[outcome]).inc();
        match &result {
            Ok(hash) => {
                tracing::info!(config = %path.display(), config_hash = hash.as_str(), "config reloaded")
            }
            Err(e) => {
                tracing::error!(config = %path.display(), error = %e, "config reload refused; the running config stays")
            }
        }
        result
    }

    fn try_reload(&self, path: &Path) -> Result<String, ReloadError> {
        let loaded = load(path)?;
        let mut state = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let table = RoutingTable::from_config(
            &loaded.config,
            &self.env_pins,
            overrides(&state, &loaded.config),
            &self.metrics,
            &self.pools,
            &self.breakers,
        )?;
        // Nothing is committed until every part of the new config has been built.
        let mut next = state.clone();
        let table = apply(&mut next, table, &loaded.config)?;
        let old = self.config.load();
        // A new backend (or Redis location) is a new budget, built before anything is committed; the
        // same backend keeps its state and takes the new settings.
        let new_budget = match (&old.budget, &loaded.config.budget) {
            (Some(before), Some(after)) if !budget_backend_changed(before, after) => None,
            (_, Some(after)) => Some(Some(Arc::new(Budget::from_config(
                after,
                self.metrics.budget_backend_errors.clone(),
            )?))),
            (Some(_), None) => Some(None),
            (None, None) => None,
        };
        for key in restart_only_changes(&old, &loaded.config) {
            tracing::warn!(
                key,
                "changed in the config file; takes effect on restart only"
            );
        }
        self.pipeline.reconfigure(&loaded.config.signals)?;
        if *state != next {
            *state = next;
            self.persist(&state);
        }
        if let Some(budget) = new_budget {
            match &loaded.config.budget {
                Some(b) => tracing::info!(backend = ?b.backend, "token budget (re)built"),
                None => tracing::warn!("[budget] removed: requests are no longer priced"),
            }
            self.budget.store(budget);
        }
        // New or kept, the budget takes the file's settings, × the throttle while it is on.
        if let (Some(budget), Some(settings)) =
            (self.budget(), budget_settings(&state, &loaded.config))
        {
            budget.set_settings(settings);
        }
        if self.fence.is_none() && !loaded.config.writes.routes.is_empty() {
            tracing::warn!(
                "writes.routes added: keyed writes are fenced (idempotency) after a restart only"
            );
        }
        self.table.store(Arc::new(table));
        self.config.store(Arc::new(loaded.config));
        self.admin_token.store(Arc::new(loaded.admin_token));
        self.config_hash.store(Arc::new(loaded.hash.clone()));
        Ok(loaded.hash)
    }

    /// Sets one arm's weight with a single swap of the routing table.
    pub fn set_weight(&self, arm: &str, weight: u32) -> Result<(), RouterError> {
        let mut state = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let table = self.table.load().with_weight(arm, weight)?;
        self.table.store(Arc::new(table));
        state.weights.insert(arm.to_string(), weight);
        self.persist(&state);
        tracing::info!(arm, weight, "arm weight set");
        Ok(())
    }

    /// Freezes or unfreezes writes with one swap of the routing table.
    pub fn set_frozen(&self, frozen: bool) {
        let mut state = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        state.frozen = frozen;
        self.swap_controls(&state);
        self.persist(&state);
        tracing::info!(
            frozen,
            "writes {}",
            if frozen { "frozen" } else { "unfrozen" }
        );
    }

    /// Applies `POST /flags`: `degrade` switches degrade mode, any other key sets a named flag.
    pub fn set_flags(&self, changes: &serde_json::Value) -> Result<(), FlagsError> {
        let changes = changes.as_object().ok_or(FlagsError::Shape)?;
        let mut parsed = Vec::with_capacity(changes.len());
        for (name, value) in changes {
            // true/false set a flag; null removes a named flag (degrade: off).
            let setting = match value {
                serde_json::Value::Bool(on) => Some(*on),
                serde_json::Value::Null => None,
                _ => return Err(FlagsError::Invalid(name.clone())),
            };
            if name != "degrade" && !is_flag_name(name) {
                return Err(FlagsError::Invalid(name.clone()));
            }
            parsed.push((name.to_string(), setting));
        }
        let mut state = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut flags = state.flags.clone();
        let mut degrade = state.degrade;
        for (name, setting) in parsed {
            match (name == "degrade", setting) {
                (true, on) => degrade = on.unwrap_or(false),
                (false, Some(on)) => {
                    flags.insert(name, on);
                }
                (false, None) => {
                    flags.remove(&name);
                }
            }
        }
        if flags.len() > MAX_FLAGS {
            return Err(FlagsError::TooMany);
        }
        state.flags = flags;
        state.degrade = degrade;
        self.swap_controls(&state);
        self.persist(&state);
        tracing::info!(degrade, flags = ?state.flags, "flags set");
        Ok(())
    }

    /// A copy of the runtime state (weights, controls, the rollback engine's record).
    pub fn runtime_state(&self) -> RuntimeState {
        self.write_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Changes the runtime state with `change` (given the current config and table) and commits it as
    /// one routing-table swap built from the config and the new state; the budget follows the throttle.
    /// Nothing changes when the table cannot be built. Returns what `change` returned and the new state.
    pub fn update_state<T>(
        &self,
        change: impl FnOnce(&mut RuntimeState, &Config, &RoutingTable) -> T,
    ) -> Result<(T, RuntimeState), RouterError> {
        let mut state = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let config = self.config.load_full();
        let mut next = state.clone();
        let out = change(&mut next, &config, &self.table.load());
        let table = RoutingTable::from_config(
            &config,
            &self.env_pins,
            overrides(&next, &config),
            &self.metrics,
            &self.pools,
            &self.breakers,
        )?;
        let table = apply(&mut next, table, &config)?;
        self.table.store(Arc::new(table));
        if let (Some(budget), Some(settings)) = (self.budget(), budget_settings(&next, &config)) {
            budget.set_settings(settings);
        }
        self.metrics.guard_state.set(next.guard.state.gauge());
        if *state != next {
            *state = next;
            self.persist(&state);
        }
        Ok((out, state.clone()))
    }

    /// Saves the runtime state; a failure is logged (the change holds until restart).
    fn persist(&self, state: &RuntimeState) {
        if let Err(e) = self.state_file.save(state) {
            tracing::error!(error = %e, "cannot save the runtime state; it will not survive a restart");
        }
    }

    fn swap_controls(&self, state: &RuntimeState) {
        let table = self
            .table
            .load()
            .with_controls(controls(state, &self.config.load()));
        self.table.store(Arc::new(table));
    }
}

/// How long the windows may go without a rotation tick.
pub const ROTATE_EVERY: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_keys_are_named() {
        let old = Config::default();
        let mut new = Config::default();
        assert!(restart_only_changes(&old, &new).is_empty());
        new.listen.proxy = "127.0.0.1:1".into();
        new.signals.queue = 1;
        new.strict_pins = true;
        assert_eq!(
            restart_only_changes(&old, &new),
            ["listen.proxy", "signals.queue"]
        );
    }

    #[test]
    fn env_token_wins_over_file() {
        let mut config = Config::default();
        config.admin.token_file = "/nonexistent/token".into();
        assert_eq!(
            admin_token(&config, Some("t0k".into())).unwrap().as_deref(),
            Some("t0k")
        );
        let e = admin_token(&config, None).unwrap_err();
        assert_eq!(e.path, "admin.token_file");
        config.admin.token_file = String::new();
        assert_eq!(admin_token(&config, None).unwrap(), None);
    }
}
