//! The engine's events: each transition's snapshot written under `state_dir/snapshots/` and the hook
//! context it hands to the hooks, fired on their own tasks so a slow hook never delays a rollback.

use std::sync::Arc;

use super::Engine;
use crate::clock::now_ms;
use crate::config::{self, HookEvent, RollbackStep};
use crate::rollback::hooks::{event_name, HookContext, HookRunner};
use crate::rollback::snapshot::{snapshot_dir, snapshot_json, write_snapshot};
use crate::rollback::state::{RuntimeState, Trip};

impl Engine {
    /// Writes the event's snapshot and returns its hook context (when the hooks step is on).
    pub(super) fn event(
        &self,
        event: HookEvent,
        trip: &Trip,
        snapshot: serde_json::Value,
        config: &config::Config,
    ) -> Vec<HookContext> {
        let name = event_name(event);
        let mut snapshot = snapshot;
        match write_snapshot(&config.state_dir, name, &trip.rule, now_ms(), &snapshot) {
            Ok(id) => snapshot["id"] = id.into(),
            Err(e) => tracing::error!(error = %e, "cannot write the {name} snapshot"),
        }
        if !config.rollback.steps.contains(&RollbackStep::Hooks) {
            return Vec::new();
        }
        vec![self.hook_context(event, trip, snapshot, config)]
    }

    pub(super) fn hook_context(
        &self,
        event: HookEvent,
        trip: &Trip,
        mut snapshot: serde_json::Value,
        config: &config::Config,
    ) -> HookContext {
        let id = snapshot["id"]
            .as_str()
            .map(String::from)
            .or(trip.snapshot.clone());
        if let Some(id) = &id {
            snapshot["id"] = id.as_str().into();
        }
        HookContext {
            event,
            rule: trip.rule.clone(),
            probe: trip.probe.clone().unwrap_or_default(),
            lever: trip.lever.clone(),
            arm: trip.arm.clone(),
            snapshot_path: id.map(|id| snapshot_dir(&config.state_dir).join(format!("{id}.json"))),
            snapshot,
        }
    }

    /// The event's snapshot document, from the config and routing table as they are now.
    pub(super) fn snapshot(
        &self,
        event: &str,
        trip: &Trip,
        state: &RuntimeState,
    ) -> serde_json::Value {
        let hash = self.config_hash.load();
        let (config, table) = (self.control.config(), self.control.table());
        let mut snapshot = snapshot_json(event, trip, state, &config, &table, hash.as_str());
        if let Some(fleet) = &self.fleet {
            // The fleet's view the transition was judged on: replicas alive, merged window counts.
            snapshot["fleet"] = fleet.status();
            match fleet.replicas_alive(config.rules.window.0) {
                Ok(names) => snapshot["fleet"]["replica_names"] = names.into(),
                Err(e) => {
                    tracing::warn!(error = %e, "fleet: cannot list the replicas for the snapshot")
                }
            }
        }
        snapshot
    }

    /// Fires the hooks of an event on their own tasks; never waits for them.
    pub fn fire(&self, ctx: HookContext) {
        let hooks = self.control.config().rollback.hooks.clone();
        if hooks.is_empty() {
            return;
        }
        let runner = HookRunner::new(hooks, self.metrics.hook_runs.clone());
        drop(runner.fire(Arc::new(ctx)));
    }
}
