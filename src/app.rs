//! The composition root: loads the config, builds every part from it (metrics, pools, budget, the
//! rollback control and engine, the evaluation pipeline, the fence, tracing), wires the handles each
//! stage gets (the request path's `Context`, the engine's `Control`) and reloads. It decides nothing:
//! every change of the runtime state or the routing table is `rollback::control`'s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::config::{Config, ConfigError, ConfigErrors};
use crate::eval::Pipeline;
use crate::fleet::{Fleet, FleetError};
use crate::guards::budget::{Budget, RedisBudgetError};
use crate::guards::fence::{Fence, FenceError};
use crate::guards::Breakers;
use crate::rollback::control::{ConfigCell, Control, ControlError, TableParts};
use crate::rollback::engine::Engine;
use crate::rollback::state::GuardState;
use crate::rules::Rule;
use crate::serve::context::Context;
use crate::serve::error::ProxyError;
use crate::serve::pins;
use crate::serve::router::{RouterError, RoutingTable};
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

/// A running driftguard's parts and the handles that wire them.
pub struct App {
    config_path: Option<PathBuf>,
    /// The running config; swapped by [`Control::reload`], read here.
    config: ConfigCell,
    config_hash: Arc<ArcSwap<String>>,
    admin_token: ArcSwap<Option<String>>,
    pub metrics: Arc<Metrics>,
    /// The one writer of the runtime state, the routing table and the budget's settings.
    control: Arc<Control>,
    /// The rollback engine, built on `control`; `cmd::run` starts its loop and admin calls it.
    engine: Arc<Engine>,
    pub pipeline: Arc<Pipeline>,
    /// OpenTelemetry tracing, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; `None` costs the request path
    /// nothing more than this check.
    pub otel: Option<Arc<crate::telemetry::otel::Otel>>,
    /// The idempotency fence, opened at start when the config names write routes.
    pub fence: Option<Arc<Fence>>,
    started: Instant,
    started_ms: u64,
    draining: AtomicBool,
    /// Serialises reloads, see [`App::reload`].
    reloading: Mutex<()>,
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
        .chain([("fleet", old.fleet != new.fleet)])
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| key)
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("signals: {0}")]
    Signals(#[from] EvalError),
    #[error(transparent)]
    Fence(#[from] FenceError),
    #[error(transparent)]
    Budget(#[from] RedisBudgetError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
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

impl App {
    pub fn new(loaded: Loaded, config_path: Option<PathBuf>) -> Result<App, StartError> {
        let metrics = Arc::new(Metrics::with_labels(Labels {
            guard_states: &GuardState::ALL.map(GuardState::as_str),
            rules: &Rule::ALL.map(Rule::name),
            fence_decisions: &crate::guards::fence::DECISIONS,
            proxy_errors: &ProxyError::ALL.map(ProxyError::as_str),
        }));
        let budget = match &loaded.config.budget {
            Some(b) => Some(Arc::new(Budget::from_config(
                b,
                metrics.budget_backend_errors.clone(),
            )?)),
            None => None,
        };
        let parts = TableParts {
            env_pins: pins::from_env(std::env::vars()),
            metrics: metrics.clone(),
            pools: Pools::new((&loaded.config.upstream).into()),
            breakers: Breakers::default(),
        };
        let config = loaded.config;
        let control = Arc::new(Control::open(config, parts, budget)?);
        let config = control.config();
        let pipeline = Arc::new(Pipeline::start(&config.signals, &metrics)?);
        let writes = &config.writes;
        let fence = match writes.routes.is_empty() {
            true => None,
            false => Some(Arc::new(Fence::open(writes, &config.state_dir, &metrics)?)),
        };
        // A tracing setup that cannot work is said once; traffic goes on untraced.
        let otel_roots = crate::net::Roots::load(&crate::config::Trust::resolve(
            &config.tls.ca_file,
            "",
        ))
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "OpenTelemetry: [tls] ca_file unusable; the platform's roots only");
            crate::net::Roots::platform()
        });
        let otel =
            crate::telemetry::otel::Otel::from_env(&metrics, otel_roots).unwrap_or_else(|e| {
                tracing::error!(error = %e, "OpenTelemetry tracing off");
                None
            });
        let config_hash = Arc::new(ArcSwap::from_pointee(loaded.hash));
        let started_ms = crate::clock::now_ms();
        let fleet = match &config.fleet {
            Some(f) => Some(Arc::new(Fleet::new(f, &metrics)?)),
            None => None,
        };
        let engine = Engine::new(
            control.clone(),
            metrics.clone(),
            config_hash.clone(),
            started_ms,
            fleet,
        );
        // A replica that starts after a fleet trip serves its first request rolled back.
        engine.join_fleet(FLEET_JOIN);
        Ok(App {
            fence,
            pipeline,
            otel,
            config_path,
            config: control.config_cell(),
            config_hash,
            admin_token: ArcSwap::from_pointee(loaded.admin_token),
            metrics,
            control,
            engine,
            started: Instant::now(),
            started_ms,
            draining: AtomicBool::new(false),
            reloading: Mutex::new(()),
        })
    }

    /// The handles the request path uses.
    pub fn context(&self) -> Arc<Context> {
        Arc::new(Context::new(
            self.control.table_cell(),
            self.control.budget_cell(),
            self.fence.clone(),
            self.pipeline.clone(),
            self.otel.clone(),
            self.metrics.clone(),
        ))
    }

    /// The rollback engine (its loop is started by `cmd::run`; admin's trip, recover and baseline).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The writer of the runtime state and the routing table (admin's weight, freeze and flag calls).
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    pub fn table(&self) -> Arc<RoutingTable> {
        self.control.table()
    }

    /// The global token budget, when the config has a `[budget]`.
    pub fn budget(&self) -> Option<Arc<Budget>> {
        self.control.budget()
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
        self.control.env_pins()
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
        // One reload at a time (SIGHUP and POST /reload may overlap): the token and the hash stored after
        // the control's commit must be the committed file's.
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
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

    /// Loads the file; the control builds the table and budget and, once the pipeline has taken the new
    /// signals settings, commits them with the runtime state re-applied. Token and hash follow.
    fn try_reload(&self, path: &Path) -> Result<String, ReloadError> {
        let loaded = load(path)?;
        let adds_writes = self.fence.is_none() && !loaded.config.writes.routes.is_empty();
        self.control.reload(loaded.config, |old, new| {
            for key in restart_only_changes(old, new) {
                tracing::warn!(
                    key,
                    "changed in the config file; takes effect on restart only"
                );
            }
            self.pipeline.reconfigure(&new.signals)?;
            Ok::<(), ReloadError>(())
        })?;
        if adds_writes {
            tracing::warn!(
                "writes.routes added: keyed writes are fenced (idempotency) after a restart only"
            );
        }
        self.admin_token.store(Arc::new(loaded.admin_token));
        self.config_hash.store(Arc::new(loaded.hash.clone()));
        Ok(loaded.hash)
    }
}

/// How long a starting replica tries to read the fleet state before it serves on its own state.
const FLEET_JOIN: std::time::Duration = std::time::Duration::from_secs(1);

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
