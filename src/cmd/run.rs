//! `driftguard run`: loads the config, binds the listeners and serves until a shutdown signal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::app::{self, App, Loaded};
use crate::config::ConfigErrors;
use crate::rollback::engine;
use crate::serve::{handle as proxy, listener};
use crate::telemetry::log;
use crate::{admin, guards, shutdown};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid config:\n{0}")]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    Start(#[from] app::StartError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error(
        "state_dir {dir} is held by another driftguard{holder}; give each instance its own state_dir \
         (its runtime state, snapshots and receipts are one process's)"
    )]
    StateDirHeld { dir: String, holder: String },
    #[error("state_dir {dir}: {source}")]
    StateDir { dir: String, source: std::io::Error },
}

/// Loads the config at `path` and runs driftguard until SIGTERM/SIGINT.
pub fn run(path: &Path) -> Result<(), RunError> {
    let loaded = app::load(path)?;
    let _log = log::init(&loaded.config.log.level);
    let workers = loaded.config.runtime.workers;
    let runtime = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
    .map_err(RunError::Runtime)?;
    runtime.block_on(serve(loaded, path))
}

/// Binds both listeners and serves until a shutdown signal, then drains.
pub async fn serve(loaded: Loaded, path: &Path) -> Result<(), RunError> {
    let running = start(loaded, Some(path.to_path_buf())).await?;
    signals(running.app.clone()).await;
    tracing::info!("shutdown signal: draining");
    running.stop().await;
    Ok(())
}

/// A driftguard serving in this process: what [`start`] bound and spawned.
pub struct Running {
    pub app: Arc<App>,
    pub engine: Arc<engine::Engine>,
    /// Where the proxy and admin listeners are bound (the real ports when the config asked for port 0).
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    trigger: shutdown::Trigger,
    admin_trigger: shutdown::Trigger,
    proxy: tokio::task::JoinHandle<bool>,
    admin: tokio::task::JoinHandle<bool>,
    /// Held while this process serves; dropped when `Running` is.
    _state_dir_lock: StateDirLock,
}

/// Binds both listeners and starts serving on the current runtime: the proxy, the admin API, the rule
/// engine and the background tasks. `config_path` is what `POST /reload` re-reads (none: no reload).
pub async fn start(loaded: Loaded, config_path: Option<PathBuf>) -> Result<Running, RunError> {
    // Before anything opens a file in it, so a second instance is told plainly (and not by the
    // receipt store's own lock, or not at all while both overwrite runtime.json).
    let state_dir_lock = lock_state_dir(&loaded.config.state_dir)?;
    let app = Arc::new(App::new(loaded, config_path)?);
    let config = app.config();
    let proxy_listener = bind("proxy", &config.listen.proxy).await?;
    let admin_listener = bind("admin", &config.listen.admin).await?;
    let local = |what: &'static str, l: &TcpListener| {
        l.local_addr().map_err(|source| RunError::Bind {
            what,
            addr: String::new(),
            source,
        })
    };
    let (proxy_addr, admin_addr) = (
        local("proxy", &proxy_listener)?,
        local("admin", &admin_listener)?,
    );
    tracing::info!(
        proxy = proxy_addr.to_string().as_str(),
        admin = admin_addr.to_string().as_str(),
        arms = config.arms.len(),
        workers = config.runtime.workers,
        version = env!("CARGO_PKG_VERSION"),
        "listening"
    );

    let (trigger, shutdown) = shutdown::channel();
    // The admin listener stops only after the proxy drained, so `/readyz` answers 503 "draining" to
    // the orchestrator's probes meanwhile.
    let (admin_trigger, admin_shutdown) = shutdown::channel();
    tokio::spawn(rotate_windows(app.clone(), shutdown.clone()));
    let engine = app.engine().clone();
    let mut engine_stop = shutdown.clone();
    tokio::spawn(engine.clone().run(async move { engine_stop.wait().await }));
    if let Some(fence) = app.fence.clone() {
        tokio::spawn(purge_receipts(fence, shutdown.clone()));
    }

    let drain = config.listen.drain_timeout.0;
    let cx = app.context();
    let refused = app.metrics.connections_refused.clone();
    let proxy_limits = listener::Limits {
        max_connections: listener::fitting_cap(config.listen.max_connections),
        idle_timeout: config.listen.idle_timeout.0,
        on_refused: Arc::new(move || refused.inc()),
    };
    // The admin listener has its own small budget, so a full proxy listener never shuts out a probe.
    let admin_limits = listener::Limits {
        max_connections: ADMIN_MAX_CONNECTIONS,
        idle_timeout: config.listen.idle_timeout.0,
        on_refused: Arc::new(|| {}),
    };
    let proxy = tokio::spawn(listener::serve(
        "proxy",
        proxy_listener,
        shutdown.clone(),
        drain,
        proxy_limits,
        move |addr| {
            let (cx, peer) = (cx.clone(), proxy::Peer::new(addr));
            move |req| proxy::handle(cx.clone(), peer.clone(), req)
        },
    ));
    let admin_app = app.clone();
    let admin = tokio::spawn(listener::serve(
        "admin",
        admin_listener,
        admin_shutdown,
        drain,
        admin_limits,
        move |peer| {
            let app = admin_app.clone();
            move |req| admin::handle(app.clone(), peer, req)
        },
    ));
    Ok(Running {
        app,
        engine,
        proxy_addr,
        admin_addr,
        trigger,
        admin_trigger,
        proxy,
        admin,
        _state_dir_lock: state_dir_lock,
    })
}

/// The file in `state_dir` whose lock says a driftguard runs on it; it holds that process's pid.
const LOCK_FILE: &str = "driftguard.lock";

/// An exclusive `flock` on `state_dir/driftguard.lock`, released when the process ends (kill -9
/// included: the kernel drops it with the file descriptor).
struct StateDirLock {
    _file: std::fs::File,
}

fn lock_state_dir(dir: &Path) -> Result<StateDirLock, RunError> {
    use std::io::{Read as _, Seek as _, Write as _};
    use std::os::fd::AsRawFd as _;
    let io = |source| RunError::StateDir {
        dir: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE))
        .map_err(io)?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(io(e));
        }
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        let pid = pid.trim();
        return Err(RunError::StateDirHeld {
            dir: dir.display().to_string(),
            holder: match pid.is_empty() {
                true => String::new(),
                false => format!(" (pid {pid})"),
            },
        });
    }
    // The pid is for the message above only; a failure to write it changes nothing.
    let _ = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()));
    Ok(StateDirLock { _file: file })
}

impl Running {
    /// Drains: the proxy stops accepting and waits for in-flight requests (up to
    /// `listen.drain_timeout`) while the admin listener still answers (`/readyz`: 503); then the admin
    /// listener stops, and it waits for queued evaluations (up to [`EVAL_FLUSH`]) and for queued trace
    /// spans (up to [`OTEL_FLUSH`]).
    pub async fn stop(self) {
        self.app.start_draining();
        self.trigger.fire();
        let drained = self.proxy.await.unwrap_or(false);
        self.admin_trigger.fire();
        let _ = self.admin.await;
        let evaluated = self.app.pipeline.flush(EVAL_FLUSH).await;
        if let Some(otel) = &self.app.otel {
            otel.shutdown(OTEL_FLUSH).await;
        }
        tracing::info!(drained, evaluated, "stopped");
    }
}

/// Connections the admin listener holds at once: probes, scrapes and the CLI need few.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// How long a shutdown waits for queued evaluations after the listeners have drained.
const EVAL_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a shutdown waits for the last spans to reach the OTLP collector.
const OTEL_FLUSH: std::time::Duration = std::time::Duration::from_secs(3);

async fn bind(what: &'static str, addr: &str) -> Result<TcpListener, RunError> {
    let parsed: SocketAddr = addr.parse().map_err(|e| RunError::Bind {
        what,
        addr: addr.into(),
        source: std::io::Error::other(e),
    })?;
    TcpListener::bind(parsed)
        .await
        .map_err(|source| RunError::Bind {
            what,
            addr: addr.into(),
            source,
        })
}

/// SIGHUP reloads; returns on SIGTERM or SIGINT (never, when the handlers cannot be installed).
async fn signals(app: Arc<App>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading config");
                let _ = app.reload();
            }
            _ = term.recv() => return,
            _ = int.recv() => return,
        }
    }
}

async fn rotate_windows(app: Arc<App>, mut shutdown: shutdown::Shutdown) {
    let mut tick = tokio::time::interval(app::ROTATE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => app.metrics.arms.rotate(),
            _ = shutdown.wait() => return,
        }
    }
}

/// Deletes expired idempotency receipts now and then (a read already ignores them).
async fn purge_receipts(fence: Arc<guards::fence::Fence>, mut shutdown: shutdown::Shutdown) {
    let mut tick = tokio::time::interval(guards::fence::PURGE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => match fence.purge().await {
                Ok(0) => {}
                Ok(purged) => tracing::debug!(purged, "expired idempotency receipts purged"),
                Err(e) => tracing::warn!(error = %e, "cannot purge expired idempotency receipts"),
            },
            _ = shutdown.wait() => return,
        }
    }
}
