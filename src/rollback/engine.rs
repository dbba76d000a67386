//! The rollback engine (SPEC §6): every `rules.eval_interval` it judges each serving non-baseline arm
//! against its baseline, and on a trip runs the rollback plan — capture a snapshot, freeze writes, pull the
//! lever the rule calls for, rotate the cache namespace, throttle, fire the hooks — then watches for
//! green until the exit targets have held for `recovery.hold` (→ healthy) or `recovery.deadline` passed
//! (→ escalated).
//!
//! All state lives in [`Control`]'s [`RuntimeState`] (persisted in `state_dir`), and every change of it
//! is one routing-table swap through [`Control::update_state`]: the freeze, the lever, the new cache
//! namespace and the tightened breakers reach the request path together, and a restart (kill -9
//! included) comes back in the same state with the same routing. The plan's steps are in `plan`, the
//! pinned baseline in `engine/baseline.rs`, snapshots and hook events in `engine/events.rs`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::clock::now_ms;
use crate::config::{self, HookEvent, RollbackStep};
use crate::fleet::Fleet;
use crate::rollback::control::Control;
use crate::rollback::hooks::{HookContext, HookOutcome};
use crate::rollback::plan::{self, lever_name};
use crate::rollback::snapshot::{snapshot_dir, write_snapshot};
use crate::rollback::state::{GuardState, RuntimeState, Trip};
use crate::rules::{self, Finding, RuleSet, Summary, Target, Verdict};
use crate::serve::router::{RouterError, RoutingTable};
use crate::telemetry::metrics::Metrics;
use baseline::baseline_of;

mod baseline;
mod events;
mod fleet;

/// Rule name of a trip requested through `POST /trip`.
pub const MANUAL: &str = "manual";

/// The engine's memory between evaluations (not persisted: it is rebuilt within one interval).
pub struct Engine {
    /// The one writer of the runtime state and the routing table; every transition goes through it.
    control: Arc<Control>,
    metrics: Arc<Metrics>,
    /// The running config file's hash, for the snapshots.
    config_hash: Arc<ArcSwap<String>>,
    /// When this process started, Unix ms: an automatic baseline waits for green since then.
    started_ms: u64,
    /// `duplicate_effects_total` at the last evaluation.
    last_duplicates: Mutex<u64>,
    /// (arm, rule, verdict) findings already logged and counted, so an ongoing breach is reported once.
    reported: Mutex<HashSet<(String, &'static str, &'static str)>>,
    /// The exit targets as last judged, for `/status`.
    progress: Mutex<Vec<Target>>,
    /// The fleet this replica judges and flips with (`[fleet]`); `None`: alone.
    fleet: Option<Arc<Fleet>>,
    /// The fleet state's generation this replica applies.
    generation: AtomicU64,
    /// Whether the last fleet sync answered (a change of it is logged once).
    fleet_ok: AtomicBool,
    /// Serialises adopting a fleet state (the interval and the message listener both may).
    adopting: Mutex<()>,
}

/// Why a trip was asked for.
pub struct TripRequest {
    pub rule: String,
    pub arm: Option<String>,
    pub finding: Option<Finding>,
    pub reason: Option<String>,
    pub window_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the guard is already {0}; POST /recover first")]
    NotHealthy(&'static str),
    #[error("no arm named {0:?}")]
    UnknownArm(String),
    #[error("{0}")]
    Baseline(String),
    #[error(transparent)]
    Router(#[from] RouterError),
}

impl Engine {
    pub fn new(
        control: Arc<Control>,
        metrics: Arc<Metrics>,
        config_hash: Arc<ArcSwap<String>>,
        started_ms: u64,
        fleet: Option<Arc<Fleet>>,
    ) -> Arc<Engine> {
        let duplicates = metrics.duplicate_effects.get();
        // The configured hooks' series exist from the start, so dashboards show 0 rather than nothing.
        for hook in &control.config().rollback.hooks {
            for outcome in HookOutcome::ALL {
                metrics
                    .hook_runs
                    .with_label_values(&[hook.name.as_str(), outcome.as_str()]);
            }
        }
        Arc::new(Engine {
            control,
            metrics,
            config_hash,
            started_ms,
            last_duplicates: Mutex::new(duplicates),
            reported: Mutex::new(HashSet::new()),
            progress: Mutex::new(Vec::new()),
            fleet,
            generation: AtomicU64::new(0),
            fleet_ok: AtomicBool::new(true),
            adopting: Mutex::new(()),
        })
    }

    /// The writer of the runtime state and the routing table (admin's weight, freeze and flag calls).
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Evaluates every `rules.eval_interval` until `stop` resolves.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let stop_listener = Arc::new(AtomicBool::new(false));
        self.follow_fleet(stop_listener.clone());
        let state = self.control.runtime_state();
        if state.guard.state != GuardState::Healthy {
            tracing::warn!(
                state = state.guard.state.as_str(),
                rule = state.guard.last_trip.as_ref().map(|t| t.rule.as_str()),
                "the guard comes back in the state it had before the restart"
            );
        }
        loop {
            let interval = self.control.config().rules.eval_interval.0;
            tokio::select! {
                _ = &mut stop => {
                    stop_listener.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                _ = tokio::time::sleep(interval) => {}
            }
            let engine = self.clone();
            // File writes and table rebuilds: off the runtime threads.
            let fired = tokio::task::spawn_blocking(move || engine.tick()).await;
            match fired {
                Ok(events) => {
                    for ctx in events {
                        self.fire(ctx);
                    }
                }
                Err(e) => tracing::error!(error = %e, "rule evaluation failed"),
            }
        }
    }

    /// One evaluation: the rules while healthy, the exit targets while tripped or recovering. Returns the
    /// hook events to fire.
    pub fn tick(&self) -> Vec<HookContext> {
        let now = Instant::now();
        let Some(summaries) = self.windows(&self.control.config(), &self.control.table(), now)
        else {
            return Vec::new();
        };
        // Read after the fleet sync: it may have adopted a newer fleet state.
        let config = self.control.config();
        let table = self.control.table();
        let state = self.control.runtime_state();
        if summaries.len() != table.arms().len() {
            return Vec::new(); // a reload changed the arms in between; the next interval judges
        }
        let duplicates = {
            let total = self.metrics.duplicate_effects.get();
            let mut last = self
                .last_duplicates
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let delta = total.saturating_sub(*last);
            *last = total;
            delta
        };
        let set = RuleSet::new(&config.rules);
        match state.guard.state {
            GuardState::Healthy => {
                self.judge(&config, &table, &state, &summaries, &set, duplicates)
            }
            GuardState::Tripped | GuardState::Recovering => {
                self.watch(&config, &table, &state, &summaries, &set, duplicates)
            }
            GuardState::Escalated => Vec::new(),
        }
    }

    /// Healthy: run the rules on each serving candidate arm; trip on the first tripping finding.
    fn judge(
        &self,
        config: &config::Config,
        table: &RoutingTable,
        state: &RuntimeState,
        summaries: &[Summary],
        set: &RuleSet,
        duplicates: u64,
    ) -> Vec<HookContext> {
        let baseline_index = table.baseline_index();
        let mut seen = HashSet::new();
        let mut trip = None;
        for (i, arm) in table.arms().iter().enumerate() {
            let single = table.arms().len() == 1;
            if table.weights()[i] == 0 || (!single && Some(i) == baseline_index) {
                continue;
            }
            let baseline = baseline_of(table, summaries, state, i);
            for finding in rules::evaluate(set, &summaries[i], baseline, duplicates) {
                let verdict = verdict_name(finding.verdict);
                let key = (arm.name.clone(), finding.rule, verdict);
                seen.insert(key.clone());
                let first = self
                    .reported
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key);
                match finding.verdict {
                    // The first tripping finding names the trip; later ones this round are moot.
                    Verdict::Trip if !config.rules.dry_run && trip.is_none() => {
                        trip = Some((arm.name.clone(), finding));
                    }
                    Verdict::Trip if !config.rules.dry_run => {}
                    _ if first => self.report(&arm.name, &finding, summaries[i].span_seconds),
                    _ => {}
                }
            }
        }
        // A breach that ended may be reported again when it comes back.
        self.reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k| seen.contains(k));
        if let Some((arm, finding)) = trip {
            let request = TripRequest {
                rule: finding.rule.to_string(),
                arm: Some(arm),
                window_seconds: config.rules.window.0.as_secs(),
                finding: Some(finding),
                reason: None,
            };
            return match self.trip(request) {
                Ok(events) => events,
                Err(e) => {
                    tracing::error!(error = %e, "the rollback could not be applied");
                    Vec::new()
                }
            };
        }
        self.auto_baseline(config, table, state, summaries, set);
        Vec::new()
    }

    /// Logs and counts a finding that does not act (a dry-run trip, a baseline breach, a soft-rule
    /// warning, a breach without significance), once per episode.
    fn report(&self, arm: &str, f: &Finding, window_seconds: u64) {
        let m = &self.metrics;
        let (counter, message) = match f.verdict {
            Verdict::Trip => (
                Some(&m.trips),
                "rule would trip (rules.dry_run: nothing done)",
            ),
            Verdict::BaselineBreach => (
                Some(&m.baseline_breaches),
                "the baseline breaches this rule as much as the arm: not a trip",
            ),
            Verdict::Warn => (Some(&m.rule_warnings), "soft rule breached"),
            Verdict::NotSignificant => (
                None,
                "over the threshold but not significantly worse than the baseline",
            ),
        };
        macro_rules! log {
            ($level:ident) => {
                tracing::$level!(
                    arm,
                    rule = f.rule,
                    verdict = verdict_name(f.verdict),
                    observed = f.observed,
                    threshold = f.threshold,
                    baseline = f.baseline,
                    p_value = f.p_value,
                    window_seconds,
                    "{message}"
                )
            };
        }
        match counter {
            Some(c) => {
                c.with_label_values(&[f.rule]).inc();
                log!(warn)
            }
            None => log!(info),
        }
    }

    /// Tripped or recovering: judge the exit targets on every serving arm; move to recovering when they
    /// hold, back to tripped when they break, to healthy after `recovery.hold`, to escalated past
    /// `recovery.deadline`.
    fn watch(
        &self,
        config: &config::Config,
        table: &RoutingTable,
        state: &RuntimeState,
        summaries: &[Summary],
        set: &RuleSet,
        duplicates: u64,
    ) -> Vec<HookContext> {
        let mut targets = Vec::new();
        for (i, arm) in table.arms().iter().enumerate() {
            if table.weights()[i] == 0 {
                continue;
            }
            targets.extend(rules::exit_targets(
                &arm.name,
                &summaries[i],
                baseline_of(table, summaries, state, i),
                &config.recovery,
                set,
            ));
        }
        targets.push(Target {
            name: "duplicate_effects",
            arm: "*".into(),
            value: Some(duplicates as f64),
            limit: 0.0,
            ok: duplicates == 0,
        });
        let green = targets.len() > 1 && targets.iter().all(|t| t.ok);
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = targets.clone();

        let now = now_ms();
        let tripped_at = state
            .guard
            .last_trip
            .as_ref()
            .map_or(state.guard.since_ms, |t| t.at_ms);
        let held = state
            .guard
            .green_since_ms
            .map_or(0, |since| now.saturating_sub(since));
        if green
            && state.guard.state == GuardState::Recovering
            && Duration::from_millis(held) >= config.recovery.hold.0
        {
            return self.recover("the exit targets held for recovery.hold");
        }
        if Duration::from_millis(now.saturating_sub(tripped_at)) >= config.recovery.deadline.0 {
            return self.escalate(&targets);
        }
        let next = match (state.guard.state, green) {
            (GuardState::Tripped, true) => Some((GuardState::Recovering, Some(now))),
            (GuardState::Recovering, false) => Some((GuardState::Tripped, None)),
            _ => None,
        };
        if let Some((to, green_since)) = next {
            let result = self.control.update_state(|s, _, _| {
                s.guard.state = to;
                s.guard.since_ms = now;
                s.guard.green_since_ms = green_since;
            });
            if let Err(e) = result {
                tracing::error!(error = %e, "cannot change the guard state");
            } else {
                self.metrics
                    .transitions
                    .with_label_values(&[to.as_str()])
                    .inc();
                let failing: Vec<String> = targets
                    .iter()
                    .filter(|t| !t.ok)
                    .map(|t| format!("{}:{}", t.arm, t.name))
                    .collect();
                tracing::info!(state = to.as_str(), failing = ?failing,
                    "{}", if green { "exit targets hold; recovery hold started" } else { "exit targets broke; hold reset" });
            }
        }
        Vec::new()
    }

    /// Runs the rollback plan for `request`. Returns the hook events to fire.
    pub fn trip(&self, request: TripRequest) -> Result<Vec<HookContext>, EngineError> {
        let config = self.control.config();
        let before = self.control.runtime_state();
        if before.guard.state != GuardState::Healthy {
            return Err(EngineError::NotHealthy(before.guard.state.as_str()));
        }
        let table = self.control.table();
        let arm = match &request.arm {
            Some(name) => {
                table
                    .index_of(name)
                    .ok_or_else(|| EngineError::UnknownArm(name.clone()))?;
                name.clone()
            }
            None => default_arm(&table),
        };
        let steps = &config.rollback.steps;
        let lever = rules::lever_for(&request.rule, &config.rollback);
        let at_ms = now_ms();
        let finding = request.finding.as_ref();
        let mut trip = Trip {
            rule: request.rule.clone(),
            probe: rules::probe_of(&request.rule).map(String::from),
            arm: arm.clone(),
            observed: finding.map(|f| f.observed),
            threshold: finding.map(|f| f.threshold),
            baseline_value: finding.and_then(|f| f.baseline),
            p_value: finding.and_then(|f| f.p_value),
            window_seconds: request.window_seconds,
            at_ms,
            lever: lever_name(lever).into(),
            action: String::new(),
            snapshot: None,
            reason: request.reason.clone(),
            dry_run: false,
        };
        // 1. capture — before anything changes, so the snapshot shows what tripped.
        let snapshot = self.snapshot("tripped", &trip, &before);
        if steps.contains(&RollbackStep::Capture) {
            match write_snapshot(&config.state_dir, "tripped", &trip.rule, at_ms, &snapshot) {
                Ok(id) => trip.snapshot = Some(id),
                Err(e) => tracing::error!(error = %e, "cannot write the rollback snapshot"),
            }
        }
        // 2–5 in one swap: freeze, lever, cache namespace, throttle.
        let committed = self.transition(|s, config, table| {
            let action = plan::apply_steps(steps, lever, s, config, table, &arm);
            let mut recorded = trip.clone();
            recorded.action = action.clone();
            s.guard.state = GuardState::Tripped;
            s.guard.since_ms = at_ms;
            s.guard.green_since_ms = None;
            s.guard.last_trip = Some(recorded);
            action
        })?;
        let Some((action, _)) = committed else {
            // The fleet took another replica's transition: that replica writes the snapshot and fires.
            if let Some(id) = &trip.snapshot {
                let path = snapshot_dir(&config.state_dir).join(format!("{id}.json"));
                let _ = std::fs::remove_file(path);
            }
            return Ok(Vec::new());
        };
        trip.action = action;
        let metrics = &self.metrics;
        metrics.trips.with_label_values(&[trip.rule.as_str()]).inc();
        metrics.transitions.with_label_values(&["tripped"]).inc();
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        tracing::warn!(
            rule = trip.rule.as_str(),
            probe = trip.probe.as_deref(),
            arm = trip.arm.as_str(),
            observed = trip.observed,
            threshold = trip.threshold,
            baseline = trip.baseline_value,
            p_value = trip.p_value,
            window_seconds = trip.window_seconds,
            lever = trip.lever.as_str(),
            action = trip.action.as_str(),
            snapshot = trip.snapshot.as_deref(),
            reason = trip.reason.as_deref(),
            "guard tripped: rollback applied"
        );
        if !steps.contains(&RollbackStep::Hooks) {
            return Ok(Vec::new());
        }
        Ok(vec![self.hook_context(
            HookEvent::Tripped,
            &trip,
            snapshot,
            &config,
        )])
    }

    /// Back to healthy: writes unfreeze, the throttle lifts; traffic stays rolled back. Returns the
    /// `recovered` hook events.
    pub fn recover(&self, why: &str) -> Vec<HookContext> {
        let config = self.control.config();
        let result = self.transition(|s, _, _| {
            let was = s.guard.state;
            s.frozen = false;
            s.throttled = false;
            s.guard.state = GuardState::Healthy;
            s.guard.since_ms = now_ms();
            s.guard.green_since_ms = None;
            was
        });
        let (was, state) = match result {
            Ok(Some(r)) => r,
            Ok(None) => return Vec::new(),
            Err(e) => {
                tracing::error!(error = %e, "cannot recover");
                return Vec::new();
            }
        };
        self.metrics
            .transitions
            .with_label_values(&["healthy"])
            .inc();
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        tracing::info!(
            from = was.as_str(),
            why,
            "guard recovered: writes unfrozen, throttle lifted"
        );
        if was == GuardState::Healthy {
            return Vec::new();
        }
        let trip = state.guard.last_trip.clone().unwrap_or_default();
        let snapshot = self.snapshot("recovered", &trip, &state);
        self.event(HookEvent::Recovered, &trip, snapshot, &config)
    }

    fn escalate(&self, targets: &[Target]) -> Vec<HookContext> {
        let config = self.control.config();
        let result = self.transition(|s, _, _| {
            s.guard.state = GuardState::Escalated;
            s.guard.since_ms = now_ms();
            s.guard.green_since_ms = None;
        });
        let state = match result {
            Ok(Some((_, state))) => state,
            Ok(None) => return Vec::new(),
            Err(e) => {
                tracing::error!(error = %e, "cannot escalate");
                return Vec::new();
            }
        };
        self.metrics
            .transitions
            .with_label_values(&["escalated"])
            .inc();
        let failing: Vec<String> = targets
            .iter()
            .filter(|t| !t.ok)
            .map(|t| format!("{}:{}", t.arm, t.name))
            .collect();
        tracing::error!(failing = failing.join(", ").as_str(),
            deadline = %humantime::format_duration(config.recovery.deadline.0),
            "guard escalated: the exit targets were not met by recovery.deadline");
        let trip = state.guard.last_trip.clone().unwrap_or_default();
        let snapshot = self.snapshot("escalated", &trip, &state);
        self.event(HookEvent::Escalated, &trip, snapshot, &config)
    }

    fn clear_progress(&self) {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// This replica's fleet link, when it runs in one.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.as_ref()
    }

    /// The exit targets as last judged (for `/status`).
    pub fn progress(&self) -> Vec<Target> {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The arm a manual trip is about: the first serving non-baseline arm, else the baseline.
fn default_arm(table: &RoutingTable) -> String {
    let base = table.baseline_index();
    table
        .arms()
        .iter()
        .enumerate()
        .find(|(i, _)| Some(*i) != base && table.weights()[*i] > 0)
        .or_else(|| table.arms().iter().enumerate().next())
        .map(|(_, a)| a.name.clone())
        .unwrap_or_default()
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Trip => "trip",
        Verdict::BaselineBreach => "baseline_breach",
        Verdict::NotSignificant => "not_significant",
        Verdict::Warn => "warn",
    }
}
