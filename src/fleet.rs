//! The fleet: replicas of one service share their windows and their verdict through Redis, so the fleet
//! trips once and flips together. Called by the rollback engine every `rules.eval_interval` ([`Fleet::sync`])
//! and on each transition ([`Fleet::propose`]); the request path never waits on it.
//!
//! Windows: each replica adds what its arms recorded since its last interval (counters and histogram
//! buckets, sparse) into per-slot Redis hashes that expire with the rule window, and reads back the sum
//! over the window's slots, merged in Redis: what a replica sends and reads does not grow with the fleet.
//! A heartbeat sorted set tells which replicas are alive. Verdict: a hash holding a generation number and
//! the fleet's runtime state (opaque JSON here); a transition is a compare-and-set on the generation by a
//! Lua script, then a PUBLISH. One script call per replica per interval carries the push, the heartbeat,
//! the merged read and the state read.

mod encode;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::clock::now_ms;
use crate::config::{self, FleetOnError};
use crate::rules::Summary;
use crate::telemetry::metrics::{FleetMetrics, Metrics};
use crate::windows::{Window, SLOT};

/// The `op` label values of `driftguard_fleet_errors_total`.
pub const OPS: [&str; 3] = ["sync", "propose", "read"];

/// How often the message listener looks at its stop flag.
const LISTEN_POLL: Duration = Duration::from_millis(250);

const SYNC: &str = include_str!("fleet/sync.lua");
const PROPOSE: &str = include_str!("fleet/propose.lua");

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("fleet.redis_url: {0}")]
    Url(redis::RedisError),
    #[error("fleet Redis {op}: {source}")]
    Redis {
        op: &'static str,
        source: redis::RedisError,
    },
    #[error("fleet state from Redis is not valid: {0}")]
    Corrupt(String),
    #[error("fleet.redis_url: {0}")]
    Tls(#[from] crate::net::tls::TlsError),
}

/// What one interval's sync brought back.
#[derive(Debug, Default)]
pub struct Synced {
    /// The fleet state's generation (0: no transition yet) and its JSON, when set.
    pub generation: u64,
    pub state: Option<String>,
    /// Replicas with a heartbeat in the last rule window.
    pub replicas: u64,
    /// The merged fleet window by arm name.
    pub arms: HashMap<String, Summary>,
}

/// The outcome of proposing a transition.
#[derive(Debug)]
pub enum Proposal {
    /// This replica's transition is the fleet's; the new generation.
    Won(u64),
    /// Another replica moved first: its generation and state are the fleet's now.
    Lost { generation: u64, state: String },
}

/// See [`Fleet::sync`]: growth is assigned to fleet slots as absolute totals, so a push Redis applied
/// but did not acknowledge (a timeout) is sent again without being counted twice.
#[derive(Default)]
struct Pushed {
    /// Per arm: the local slot period last read and what that slot held then.
    local: HashMap<String, (u64, BTreeMap<String, u64>)>,
    /// Per fleet slot: this replica's absolute totals, `arm|field` → count.
    assigned: BTreeMap<u64, BTreeMap<String, u64>>,
    /// Per fleet slot: the fields changed since Redis last acknowledged a push.
    dirty: BTreeMap<u64, std::collections::BTreeSet<String>>,
}

/// This replica's link to its fleet.
pub struct Fleet {
    client: redis::Client,
    conn: Mutex<Option<redis::Connection>>,
    timeout: Duration,
    /// `key:scope`: the prefix of every key of this replica's scope.
    prefix: String,
    /// `fleet.key`: the fleet's root, under which every scope lives.
    key: String,
    replica: String,
    /// Random per process: a restarted replica (same name) counts its totals afresh.
    incarnation: u64,
    scope: String,
    on_error: FleetOnError,
    sync_script: redis::Script,
    propose_script: redis::Script,
    /// What this replica has counted into the fleet: per arm the local slot period last read and what
    /// that slot held then, and per fleet slot the absolute totals assigned to it with the fields not
    /// yet acknowledged by Redis.
    pushed: Mutex<Pushed>,
    view: Mutex<View>,
    metrics: FleetMetrics,
}

/// The last sync as `/status` shows it.
#[derive(Debug, Clone, Default)]
struct View {
    generation: u64,
    replicas: u64,
    ok: bool,
    at_ms: u64,
    arms: Vec<(String, u64, u64)>,
    /// Every scope of the fleet: (name, generation, guard state).
    scopes: Vec<(String, u64, String)>,
}

/// The sync script's reply: replicas, generation, state, merged window, scopes.
type SyncReply = (u64, u64, String, Vec<String>, Vec<String>);

impl Fleet {
    pub fn new(config: &config::Fleet, metrics: &Metrics) -> Result<Fleet, FleetError> {
        // `rediss://`: a certificate that does not verify stops the start (see `net::tls::verify_redis`).
        let roots = crate::net::Roots::load(&config.trust)?;
        crate::net::tls::verify_redis("fleet.redis_url", &config.redis_url, &roots)?;
        let client =
            crate::net::tls::redis_client(&config.redis_url, &roots).map_err(FleetError::Url)?;
        let scope = if config.scope.is_empty() {
            "_"
        } else {
            &config.scope
        };
        Ok(Fleet {
            client,
            conn: Mutex::new(None),
            timeout: config.redis_timeout.0,
            prefix: format!("{}:{scope}", config.key),
            key: config.key.clone(),
            replica: config.replica_name(),
            incarnation: fastrand::u64(..),
            scope: config.scope.clone(),
            on_error: config.on_backend_error,
            sync_script: redis::Script::new(SYNC),
            propose_script: redis::Script::new(PROPOSE),
            pushed: Mutex::new(Pushed::default()),
            view: Mutex::new(View::default()),
            metrics: metrics.fleet(&OPS),
        })
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// This replica's scope ("" for the whole fleet).
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The scope's name in keys ("_" for the whole fleet).
    fn scope_name(&self) -> &str {
        if self.scope.is_empty() {
            "_"
        } else {
            &self.scope
        }
    }

    pub fn on_error(&self) -> FleetOnError {
        self.on_error
    }

    /// Pushes what `arms` recorded since the last sync, beats the heartbeat, and reads the merged fleet
    /// window over `window` and the fleet state. What a replica pushes is its absolute total per fleet
    /// slot and field, and the script adds only the difference to what it holds of this replica: a push
    /// that Redis applied after the client gave up (a timeout) is sent again on the next sync, and
    /// counted once.
    pub fn sync(
        &self,
        arms: &[(&str, &Window)],
        now: Instant,
        window: Duration,
    ) -> Result<Synced, FleetError> {
        let mut pushed = self.pushed.lock().unwrap_or_else(|p| p.into_inner());
        let slot_ms = SLOT.as_millis() as u64;
        let wall = now_ms();
        let fleet_slot = wall / slot_ms;
        for (name, w) in arms {
            let epoch = w.epoch(now);
            let current = encode::fields(&Summary::from_window(&w.slot(epoch)));
            let grown = match pushed.local.get(*name) {
                Some((at, before)) if *at == epoch => encode::minus(&current, before),
                Some((at, before)) if *at < epoch => {
                    let mut grown =
                        encode::minus(&encode::fields(&Summary::from_window(&w.slot(*at))), before);
                    // Slots passed whole since (at most a ring's worth: older ones are gone).
                    for e in
                        (at + 1).max(epoch.saturating_sub(crate::windows::SLOTS as u64 - 2))..=epoch
                    {
                        let slot = if e == epoch {
                            current.clone()
                        } else {
                            encode::fields(&Summary::from_window(&w.slot(e)))
                        };
                        encode::add(&mut grown, &slot);
                    }
                    grown
                }
                _ => current.clone(),
            };
            pushed.local.insert(name.to_string(), (epoch, current));
            let Pushed {
                assigned, dirty, ..
            } = &mut *pushed;
            let totals = assigned.entry(fleet_slot).or_default();
            let changed = dirty.entry(fleet_slot).or_default();
            for (f, n) in grown {
                let field = format!("{name}|{f}");
                *totals.entry(field.clone()).or_default() += n;
                changed.insert(field);
            }
        }
        // Fleet slots older than the window are gone from Redis too.
        let keep_from = fleet_slot.saturating_sub(window.as_secs().div_ceil(SLOT.as_secs()) + 1);
        pushed.assigned.retain(|slot, _| *slot >= keep_from);
        pushed
            .dirty
            .retain(|slot, fields| *slot >= keep_from && !fields.is_empty());
        let slots = window.as_secs().div_ceil(SLOT.as_secs()) + 1;
        let mut invocation = self.sync_script.prepare_invoke();
        invocation
            .arg(&self.prefix)
            .arg(&self.replica)
            .arg(wall)
            .arg(slot_ms)
            .arg(slots)
            .arg((slots + 1) * slot_ms)
            .arg(window.as_millis() as u64)
            .arg(&self.key)
            .arg(self.scope_name())
            .arg(self.incarnation);
        for (slot, fields) in &pushed.dirty {
            for field in fields {
                let total = pushed
                    .assigned
                    .get(slot)
                    .and_then(|totals| totals.get(field))
                    .copied()
                    .unwrap_or(0);
                invocation.arg(*slot).arg(field).arg(total);
            }
        }
        let reply: Result<SyncReply, FleetError> =
            self.call("sync", |conn| invocation.invoke(conn));
        let (replicas, generation, state, merged, scopes) = match reply {
            Ok(r) => r,
            Err(e) => {
                self.view.lock().unwrap_or_else(|p| p.into_inner()).ok = false;
                return Err(e);
            }
        };
        pushed.dirty.clear();
        let arms = encode::summaries(&merged, window);
        self.metrics.replicas.set(replicas as i64);
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        *view = View {
            generation: view.generation.max(generation),
            replicas,
            ok: true,
            at_ms: now_ms(),
            arms: arms
                .iter()
                .map(|(name, s)| (name.clone(), s.requests, s.evaluated))
                .collect(),
            scopes: scopes
                .chunks_exact(2)
                .map(|pair| {
                    let (generation, guard) = pair[1].split_once(' ').unwrap_or(("0", "healthy"));
                    (
                        pair[0].clone(),
                        generation.parse().unwrap_or(0),
                        guard.to_string(),
                    )
                })
                .collect(),
        };
        Ok(Synced {
            generation,
            state: (!state.is_empty()).then_some(state),
            replicas,
            arms,
        })
    }

    /// The fleet state as it is now: its generation and JSON (none before the first transition). A
    /// replica reads it before it serves its first request.
    pub fn read(&self) -> Result<(u64, Option<String>), FleetError> {
        let key = format!("{}:state", self.prefix);
        let (generation, state): (Option<u64>, Option<String>) = self.call("read", |conn| {
            redis::cmd("HMGET")
                .arg(&key)
                .arg("gen")
                .arg("state")
                .query(conn)
        })?;
        Ok((generation.unwrap_or(0), state.filter(|s| !s.is_empty())))
    }

    /// The replicas of this scope with a heartbeat in the last rule window, by name (for snapshots;
    /// the interval's sync only counts them, so its reply does not grow with the fleet).
    pub fn replicas_alive(&self, window: Duration) -> Result<Vec<String>, FleetError> {
        let key = format!("{}:replicas", self.prefix);
        let since = now_ms().saturating_sub(window.as_millis() as u64);
        self.call("read", |conn| {
            redis::cmd("ZRANGEBYSCORE")
                .arg(&key)
                .arg(since)
                .arg("+inf")
                .query(conn)
        })
    }

    /// Proposes `state` as the fleet's next state, if the fleet is still at `expected`.
    pub fn propose(&self, expected: u64, state: &str) -> Result<Proposal, FleetError> {
        let (won, generation, current): (u64, u64, String) = self.call("propose", |conn| {
            self.propose_script
                .prepare_invoke()
                .arg(&self.prefix)
                .arg(expected)
                .arg(state)
                .invoke(conn)
        })?;
        Ok(if won == 1 {
            Proposal::Won(generation)
        } else {
            Proposal::Lost {
                generation,
                state: current,
            }
        })
    }

    /// Blocks on the fleet's transition messages, calling `on_event` for each, until `stop` is set; a
    /// broken subscription is opened again a second later (the engine's interval reads the state
    /// meanwhile). Runs on a thread of its own: a message is applied well within one interval.
    pub fn listen(&self, stop: &AtomicBool, mut on_event: impl FnMut()) {
        let channel = format!("{}:events", self.prefix);
        while !stop.load(SeqCst) {
            let result = (|| -> redis::RedisResult<()> {
                let mut conn = self.client.get_connection_with_timeout(self.timeout)?;
                let mut pubsub = conn.as_pubsub();
                pubsub.subscribe(&channel)?;
                pubsub.set_read_timeout(Some(LISTEN_POLL))?;
                while !stop.load(SeqCst) {
                    match pubsub.get_message() {
                        Ok(_) => on_event(),
                        Err(e) if e.is_timeout() => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            })();
            if result.is_err() {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }

    /// Records that this replica now applies `generation`.
    pub fn applied(&self, generation: u64) {
        self.metrics.generation.set(generation as i64);
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        view.generation = generation;
    }

    /// The fleet part of `/status`.
    pub fn status(&self) -> serde_json::Value {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        serde_json::json!({
            "replica": self.replica,
            "scope": self.scope,
            "generation": view.generation,
            "replicas": view.replicas,
            "backend": if view.ok { "ok" } else { "error" },
            "synced_ms": (view.at_ms > 0).then_some(view.at_ms),
            "on_backend_error": match self.on_error { FleetOnError::Local => "local", FleetOnError::Hold => "hold" },
            "arms": view.arms.iter().map(|(name, requests, evaluated)| serde_json::json!({
                "name": name, "requests": requests, "evaluated": evaluated,
            })).collect::<Vec<_>>(),
            "scopes": view.scopes.iter().map(|(name, generation, guard)| serde_json::json!({
                "scope": if name == "_" { "" } else { name.as_str() },
                "generation": generation, "state": guard,
            })).collect::<Vec<_>>(),
        })
    }

    /// Runs one Redis call on the kept connection (opened on demand with the timeout); an error drops
    /// the connection, counts, and is returned.
    fn call<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, FleetError> {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let result = (|| {
            if slot.is_none() {
                let conn = self.client.get_connection_with_timeout(self.timeout)?;
                conn.set_read_timeout(Some(self.timeout))?;
                conn.set_write_timeout(Some(self.timeout))?;
                *slot = Some(conn);
            }
            let Some(conn) = slot.as_mut() else {
                return Err((redis::ErrorKind::Client, "no connection").into());
            };
            f(conn)
        })();
        result.map_err(|source| {
            *slot = None;
            self.metrics.errors.with_label_values(&[op]).inc();
            self.view.lock().unwrap_or_else(|p| p.into_inner()).ok = false;
            FleetError::Redis { op, source }
        })
    }
}
