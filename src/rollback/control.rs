//! The one writer of the runtime state and the routing table: admin mutations, the rollback engine's
//! transitions and the table/budget half of a reload all come here, so every change is one swap made
//! under one lock, persisted, and re-applied by a reload instead of being silently undone by it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::HeaderValue;

use crate::config::{self, Config};
use crate::guards::budget::{Budget, BudgetSettings, RedisBudgetError};
use crate::guards::Breakers;
use crate::rollback::state::{RuntimeState, StateError, StateFile};
use crate::serve::context::{BudgetCell, TableCell};
use crate::serve::router::{
    is_flag_name, Controls, Overrides, RouterError, RoutingTable, MAX_FLAGS,
};
use crate::serve::upstream::Pools;
use crate::telemetry::metrics::Metrics;

/// The running config, swapped by a reload together with the table; everyone else only loads it.
pub type ConfigCell = Arc<ArcSwap<Config>>;

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

/// Why the control could not start: the saved state cannot be opened or the first table built.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Router(#[from] RouterError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// What the routing table is built from, besides the config and the runtime state.
pub struct TableParts {
    /// The environment's pins (`DRIFTGUARD_PIN_*`).
    pub env_pins: BTreeMap<String, String>,
    pub metrics: Arc<Metrics>,
    pub pools: Pools,
    pub breakers: Breakers,
}

/// Owner of the runtime state, the routing table, the config cell and the budget's settings.
pub struct Control {
    config: ConfigCell,
    table: TableCell,
    budget: BudgetCell,
    parts: TableParts,
    /// Serialises table rebuilds (reload, weights, controls) so none is lost between load and store, and
    /// holds what was set at run time; a reload re-applies it so re-reading the file never silently
    /// undoes a rollback or a freeze.
    write_lock: Mutex<RuntimeState>,
    state_file: StateFile,
    /// Why the last save failed, while the state in memory differs from the one on disk; cleared by the
    /// next save that succeeds. Admin mutations answer an error while it is set.
    unsaved: Mutex<Option<String>>,
}

impl Control {
    /// Opens the saved runtime state under `config.state_dir` and builds the first routing table with
    /// it applied; the budget (if any) takes the settings the state calls for.
    pub fn open(
        config: Config,
        parts: TableParts,
        budget: Option<Arc<Budget>>,
    ) -> Result<Control, ControlError> {
        let (state_file, mut state) = StateFile::open(&config.state_dir)?;
        let table = build(&parts, &config, &state)?;
        let table = apply(&mut state, table, &config)?;
        if let Some(budget) = &budget {
            budget.set_settings(budget_settings(&state, &config).unwrap_or(budget.settings()));
        }
        parts.metrics.guard_state.set(state.guard.state.gauge());
        if state != RuntimeState::default() {
            // As JSON (the file's own form), not a Rust debug dump.
            let saved = serde_json::to_string(&state).unwrap_or_default();
            tracing::warn!(
                guard = state.guard.state.as_str(),
                state = saved.as_str(),
                "restored the runtime state saved before the restart"
            );
        }
        Ok(Control {
            config: Arc::new(ArcSwap::from_pointee(config)),
            table: Arc::new(ArcSwap::from_pointee(table)),
            budget: Arc::new(arc_swap::ArcSwapOption::new(budget)),
            parts,
            write_lock: Mutex::new(state),
            state_file,
            unsaved: Mutex::new(None),
        })
    }

    /// The routing-table cell, for the request path's `Context` (which only loads it).
    pub fn table_cell(&self) -> TableCell {
        self.table.clone()
    }

    /// The budget cell, for the request path's `Context` (which only loads it).
    pub fn budget_cell(&self) -> BudgetCell {
        self.budget.clone()
    }

    /// The config cell, for readers of the running config.
    pub fn config_cell(&self) -> ConfigCell {
        self.config.clone()
    }

    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The global token budget, when the config has a `[budget]`.
    pub fn budget(&self) -> Option<Arc<Budget>> {
        self.budget.load_full()
    }

    /// The environment's pins (`DRIFTGUARD_PIN_*`).
    pub fn env_pins(&self) -> &BTreeMap<String, String> {
        &self.parts.env_pins
    }

    /// The table/budget half of a reload: builds the table and (when its backend changed) the budget
    /// for `config` with the runtime state re-applied, runs `before_commit(old, new)` (the caller's
    /// own parts of the reload, which may still refuse it), then commits state, budget, table and config.
    /// Nothing is committed when anything fails.
    pub fn reload<E>(
        &self,
        config: Config,
        before_commit: impl FnOnce(&Config, &Config) -> Result<(), E>,
    ) -> Result<(), E>
    where
        E: From<RouterError> + From<RedisBudgetError>,
    {
        let mut state = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let table = build(&self.parts, &config, &state)?;
        // Nothing is committed until every part of the new config has been built.
        let mut next = state.clone();
        let table = apply(&mut next, table, &config)?;
        let old = self.config.load();
        // A new backend (or Redis location) is a new budget, built before anything is committed; the
        // same backend keeps its state and takes the new settings.
        let new_budget = match (&old.budget, &config.budget) {
            (Some(before), Some(after)) if !budget_backend_changed(before, after) => None,
            (_, Some(after)) => Some(Some(Arc::new(Budget::from_config(
                after,
                self.parts.metrics.budget_backend_errors.clone(),
            )?))),
            (Some(_), None) => Some(None),
            (None, None) => None,
        };
        before_commit(&old, &config)?;
        if *state != next {
            *state = next;
            self.persist(&state);
        }
        if let Some(budget) = new_budget {
            match &config.budget {
                Some(b) => tracing::info!(backend = ?b.backend, "token budget (re)built"),
                None => tracing::warn!("[budget] removed: requests are no longer priced"),
            }
            self.budget.store(budget);
        }
        // New or kept, the budget takes the file's settings, × the throttle while it is on.
        if let (Some(budget), Some(settings)) = (self.budget(), budget_settings(&state, &config)) {
            budget.set_settings(settings);
        }
        self.table.store(Arc::new(table));
        self.config.store(Arc::new(config));
        Ok(())
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
        self.update_state_if(change, |_| Ok::<(), std::convert::Infallible>(()))?
            .map_err(|never| match never {})
    }

    /// [`Control::update_state`], committed only when `gate` accepts the new state (a fleet takes the
    /// transition); a refusal changes nothing and is returned as the inner error.
    pub fn update_state_if<T, G>(
        &self,
        change: impl FnOnce(&mut RuntimeState, &Config, &RoutingTable) -> T,
        gate: impl FnOnce(&RuntimeState) -> Result<(), G>,
    ) -> Result<Result<(T, RuntimeState), G>, RouterError> {
        let mut state = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let config = self.config.load_full();
        let mut next = state.clone();
        let out = change(&mut next, &config, &self.table.load());
        let table = build(&self.parts, &config, &next)?;
        let table = apply(&mut next, table, &config)?;
        if let Err(refused) = gate(&next) {
            return Ok(Err(refused));
        }
        self.table.store(Arc::new(table));
        if let (Some(budget), Some(settings)) = (self.budget(), budget_settings(&next, &config)) {
            budget.set_settings(settings);
        }
        self.parts.metrics.guard_state.set(next.guard.state.gauge());
        if *state != next {
            *state = next;
            self.persist(&state);
        }
        Ok(Ok((out, state.clone())))
    }

    /// Saves the runtime state; a failure is logged and kept for [`Control::unsaved`] (the change holds
    /// in this process, so a freeze during a full disk still freezes, but not across a restart).
    fn persist(&self, state: &RuntimeState) {
        let result = self.state_file.save(state);
        let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => *unsaved = None,
            Err(e) => {
                tracing::error!(error = %e, "cannot save the runtime state; it will not survive a restart");
                *unsaved = Some(e.to_string());
            }
        }
    }

    /// Why the runtime state in memory is not saved, if it is not (the last save failed).
    pub fn unsaved(&self) -> Option<String> {
        self.unsaved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn swap_controls(&self, state: &RuntimeState) {
        let table = self
            .table
            .load()
            .with_controls(controls(state, &self.config.load()));
        self.table.store(Arc::new(table));
    }
}

/// A routing table built from the config with the runtime state's overrides (not yet its controls).
fn build(
    parts: &TableParts,
    config: &Config,
    state: &RuntimeState,
) -> Result<RoutingTable, RouterError> {
    RoutingTable::from_config(
        config,
        &parts.env_pins,
        overrides(state, config),
        &parts.metrics,
        &parts.pools,
        &parts.breakers,
    )
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

/// Whether a reload from `old` to `new` needs a new budget rather than new settings for the running one.
fn budget_backend_changed(old: &config::Budget, new: &config::Budget) -> bool {
    old.backend != new.backend
        || (new.backend == config::BudgetBackend::Redis
            && (old.redis_url != new.redis_url
                || old.redis_key != new.redis_key
                || old.redis_timeout != new.redis_timeout
                || old.on_backend_error != new.on_backend_error))
}
