//! The pinned baseline of a single-arm deployment: captured on `POST /baseline` or automatically after
//! `rules.auto_baseline_after` of green, and what each arm is judged against. Part of the engine: the
//! pin is one more runtime-state change through `Control`.

use std::time::{Duration, Instant};

use super::{Engine, EngineError};
use crate::clock::now_ms;
use crate::config;
use crate::rollback::state::{PinnedBaseline, RuntimeState};
use crate::rules::{RuleSet, Summary};
use crate::serve::router::RoutingTable;

impl Engine {
    /// Single arm without a pinned baseline: pin one after `rules.auto_baseline_after` of green.
    pub(super) fn auto_baseline(
        &self,
        config: &config::Config,
        table: &RoutingTable,
        state: &RuntimeState,
        summaries: &[Summary],
        set: &RuleSet,
    ) {
        if table.arms().len() != 1 || state.guard.baseline.is_some() {
            return;
        }
        let healthy_for = now_ms().saturating_sub(state.guard.since_ms.max(self.started_ms));
        if Duration::from_millis(healthy_for) < config.rules.auto_baseline_after.0
            || summaries[0].requests < set.min_samples
        {
            return;
        }
        if let Err(e) = self.capture_baseline(None) {
            tracing::warn!(error = %e, "automatic baseline capture failed");
        }
    }
    /// Pins a baseline for a single-arm deployment from its current window (`POST /baseline`).
    pub fn capture_baseline(&self, arm: Option<&str>) -> Result<PinnedBaseline, EngineError> {
        let config = self.control.config();
        let table = self.control.table();
        if table.arms().len() > 1 {
            let name = table
                .baseline_index()
                .map_or("", |i| table.arms()[i].name.as_str());
            return Err(EngineError::Baseline(format!(
                "with several arms the baseline is arm {name:?}'s concurrent window; nothing to pin"
            )));
        }
        let index = match arm {
            Some(name) => table
                .index_of(name)
                .ok_or_else(|| EngineError::UnknownArm(name.to_string()))?,
            None => 0,
        };
        let arm = &table.arms()[index];
        let summary = Summary::from_window(
            &arm.stats
                .window
                .stats(Instant::now(), config.rules.window.0),
        );
        let min = config.rules.min_samples;
        if summary.requests < min {
            return Err(EngineError::Baseline(format!(
                "arm {:?} has {} requests in the window; a baseline needs rules.min_samples ({min})",
                arm.name, summary.requests
            )));
        }
        let pinned = PinnedBaseline {
            arm: arm.name.clone(),
            captured_ms: now_ms(),
            pins: arm.pins.map().clone(),
            summary,
        };
        let copy = pinned.clone();
        // In a fleet the pinned baseline is the fleet's: one transition like a trip.
        if self
            .transition(move |s, _, _| s.guard.baseline = Some(copy))?
            .is_none()
        {
            return Err(EngineError::Baseline(
                "the fleet's state changed meanwhile (another replica's transition); try again"
                    .into(),
            ));
        }
        tracing::info!(
            arm = pinned.arm.as_str(),
            requests = pinned.summary.requests,
            evaluated = pinned.summary.evaluated,
            "baseline pinned"
        );
        Ok(pinned)
    }
}

/// What arm `i` is judged against: with several arms the baseline arm's concurrent window (the baseline
/// judged against itself holds every exit target), with one arm its pinned baseline, if any.
pub(super) fn baseline_of<'a>(
    table: &RoutingTable,
    summaries: &'a [Summary],
    state: &'a RuntimeState,
    i: usize,
) -> Option<&'a Summary> {
    if table.arms().len() > 1 {
        return table.baseline_index().map(|b| &summaries[b]);
    }
    let name = &table.arms()[i].name;
    state
        .guard
        .baseline
        .as_ref()
        .filter(|p| &p.arm == name)
        .map(|p| &p.summary)
}
