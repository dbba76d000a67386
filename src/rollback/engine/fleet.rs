//! The engine in a fleet (`[fleet]`): it judges the fleet's merged window, commits a transition only when
//! the fleet takes it (the replica that wins the compare-and-set runs the hooks and writes the snapshot),
//! and adopts the fleet's state when another replica moved first. Alone, every call here is the plain
//! local path.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Engine;
use crate::config::{Config, FleetOnError};
use crate::fleet::{FleetError, Proposal};
use crate::rollback::state::RuntimeState;
use crate::rules::Summary;
use crate::serve::router::{RouterError, RoutingTable};
use crate::windows::Window;

/// Why a transition was not committed.
enum Refused {
    /// Another replica's transition came first: its generation and state.
    Lost { generation: u64, state: String },
    /// Redis failed and `fleet.on_backend_error = "hold"`.
    Hold(FleetError),
    /// This replica's state cannot be written as JSON (never expected).
    Encode(serde_json::Error),
}

impl Engine {
    /// The windows the rules judge this interval: the fleet's merged ones when the fleet answers (after
    /// adopting a newer fleet state), else this replica's own. `None`: hold, judge nothing.
    pub(super) fn windows(
        &self,
        config: &Config,
        table: &RoutingTable,
        now: Instant,
    ) -> Option<Vec<Summary>> {
        let span = config.rules.window.0;
        let local = || {
            table
                .arms()
                .iter()
                .map(|arm| Summary::from_window(&arm.stats.window.stats(now, span)))
                .collect()
        };
        let Some(fleet) = &self.fleet else {
            return Some(local());
        };
        let windows: Vec<(&str, &Window)> = table
            .arms()
            .iter()
            .map(|arm| (arm.name.as_str(), &arm.stats.window))
            .collect();
        match fleet.sync(&windows, now, span) {
            Ok(synced) => {
                if !self.fleet_ok.swap(true, SeqCst) {
                    tracing::info!(
                        replicas = synced.replicas,
                        "fleet: Redis answers; judging the fleet's window"
                    );
                }
                if let Some(state) = &synced.state {
                    self.adopt(synced.generation, state);
                }
                Some(
                    table
                        .arms()
                        .iter()
                        .map(|arm| {
                            synced.arms.get(&arm.name).cloned().unwrap_or(Summary {
                                span_seconds: span.as_secs(),
                                ..Summary::default()
                            })
                        })
                        .collect(),
                )
            }
            Err(e) => {
                let hold = fleet.on_error() == FleetOnError::Hold;
                if self.fleet_ok.swap(false, SeqCst) {
                    tracing::warn!(error = %e, hold, "fleet: Redis fails; {}", if hold {
                        "holding the last fleet state"
                    } else {
                        "judging this replica's own windows"
                    });
                }
                (!hold).then(local)
            }
        }
    }

    /// Commits a transition: alone, as any state change; in a fleet, only when the fleet's state is still
    /// the one this replica applies (then this replica runs the event). `None`: not committed — another
    /// replica's transition came first (adopted here) or Redis fails under "hold".
    pub(super) fn transition<T>(
        &self,
        change: impl FnOnce(&mut RuntimeState, &Config, &RoutingTable) -> T,
    ) -> Result<Option<(T, RuntimeState)>, RouterError> {
        let Some(fleet) = &self.fleet else {
            return self.control.update_state(change).map(Some);
        };
        let expected = self.generation.load(SeqCst);
        let gate = |next: &RuntimeState| -> Result<(), Refused> {
            let json = serde_json::to_string(next).map_err(Refused::Encode)?;
            match fleet.propose(expected, &json) {
                Ok(Proposal::Won(generation)) => {
                    self.generation.store(generation, SeqCst);
                    fleet.applied(generation);
                    Ok(())
                }
                Ok(Proposal::Lost { generation, state }) => {
                    Err(Refused::Lost { generation, state })
                }
                Err(e) if fleet.on_error() == FleetOnError::Local => {
                    tracing::warn!(error = %e, "fleet: cannot propose the transition; applying it on this replica alone");
                    Ok(())
                }
                Err(e) => Err(Refused::Hold(e)),
            }
        };
        match self.control.update_state_if(change, gate)? {
            Ok(done) => Ok(Some(done)),
            Err(Refused::Lost { generation, state }) => {
                tracing::info!(
                    generation,
                    "fleet: another replica's transition came first; adopting it"
                );
                self.adopt(generation, &state);
                Ok(None)
            }
            Err(Refused::Hold(e)) => {
                tracing::warn!(error = %e, "fleet: cannot propose the transition; holding (fleet.on_backend_error = \"hold\")");
                Ok(None)
            }
            Err(Refused::Encode(e)) => {
                tracing::error!(error = %e, "fleet: cannot encode the runtime state");
                Ok(None)
            }
        }
    }

    /// Starts the thread that applies another replica's transition as soon as it is published (the
    /// interval's sync catches a missed message); it ends once `stop` is set.
    pub(super) fn follow_fleet(self: &Arc<Self>, stop: Arc<AtomicBool>) {
        let Some(fleet) = self.fleet.clone() else {
            return;
        };
        let engine = self.clone();
        let spawned = std::thread::Builder::new()
            .name("driftguard-fleet".into())
            .spawn(move || {
                fleet.listen(&stop, || match fleet.read() {
                    Ok((generation, Some(state))) => engine.adopt(generation, &state),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "fleet: cannot read the state after a message")
                    }
                })
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "fleet: cannot start the message listener; the interval's sync applies transitions");
        }
    }

    /// Applies the fleet's state of `generation` when it is newer than what this replica applies: the
    /// same weights, freeze, flags, pins put back, cache epoch and throttle, in one table swap.
    pub fn adopt(&self, generation: u64, state: &str) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        let _one = self.adopting.lock().unwrap_or_else(|p| p.into_inner());
        if generation <= self.generation.load(SeqCst) {
            return;
        }
        let fleet_state: RuntimeState = match serde_json::from_str(state) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(generation, error = %e, "fleet: the fleet state is not valid; keeping this replica's");
                return;
            }
        };
        // The generation first: a transition proposed meanwhile (from this state on) expects it.
        let previous = self.generation.swap(generation, SeqCst);
        match self.control.update_state(|s, _, _| {
            let was = s.guard.state;
            *s = fleet_state;
            was
        }) {
            Ok((was, now)) => {
                fleet.applied(generation);
                if was != now.guard.state {
                    self.metrics
                        .transitions
                        .with_label_values(&[now.guard.state.as_str()])
                        .inc();
                    self.clear_progress();
                }
                tracing::warn!(
                    generation,
                    from = was.as_str(),
                    to = now.guard.state.as_str(),
                    rule = now.guard.last_trip.as_ref().map(|t| t.rule.as_str()),
                    "fleet: state adopted"
                );
            }
            Err(e) => {
                self.generation.store(previous, SeqCst);
                tracing::error!(generation, error = %e, "fleet: cannot apply the fleet state")
            }
        }
    }

    /// Reads the fleet state and adopts it, before this replica serves (a replica started after a trip
    /// starts rolled back). Redis failing here is logged; the engine's intervals catch up.
    pub fn join_fleet(&self, deadline: Duration) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        let started = Instant::now();
        loop {
            match fleet.read() {
                Ok((generation, state)) => {
                    if let Some(state) = state {
                        self.adopt(generation, &state);
                    }
                    tracing::info!(replica = fleet.replica(), generation, "fleet: joined");
                    return;
                }
                Err(e) if started.elapsed() >= deadline => {
                    tracing::warn!(error = %e, "fleet: cannot read the fleet state at start; serving with this replica's own state");
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}
