//! `driftguard demo --replicas N`: the fleet on one machine. A redis-server of the demo's own (or the
//! one `--redis-url` names), N replicas in this process, each with its own ports, state dir and a
//! `[fleet]` section naming the same key; the load spreads over them round-robin. The demo loop in
//! `demo/mod.rs` runs them; this module starts Redis, watches when each replica flips, and says what
//! the fleet did (one winner, one snapshot, every replica flipped within milliseconds, one cache namespace).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::DemoError;
use crate::clock::now_ms;
use crate::cmd::run::Running;
use crate::rollback::snapshot::snapshot_dir;
use crate::rollback::state::GuardState;

/// How long a redis-server of the demo's own has to answer PING.
const REDIS_START: Duration = Duration::from_secs(5);
/// How often the flip watcher looks at every replica's state.
const WATCH_EVERY: Duration = Duration::from_millis(5);

/// The Redis the replicas share: the demo's own server (stopped when this drops) or the user's.
pub(super) struct Redis {
    pub(super) url: String,
    child: Option<tokio::process::Child>,
}

impl Redis {
    /// `url` when given; else a redis-server from PATH on a free loopback port, persistence off, its
    /// files in `dir`.
    pub(super) async fn start(url: Option<&str>, dir: &Path) -> Result<Redis, DemoError> {
        if let Some(url) = url {
            return Ok(Redis {
                url: url.to_string(),
                child: None,
            });
        }
        let port = free_port().await?;
        let child = tokio::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                DemoError::Setup(format!(
                    "--replicas needs Redis: cannot start redis-server ({e}); install it \
                     (apt-get install redis-server) or pass --redis-url redis://HOST:PORT"
                ))
            })?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = tokio::time::Instant::now() + REDIS_START;
        while !pong(addr).await {
            if tokio::time::Instant::now() >= deadline {
                return Err(DemoError::Setup(format!(
                    "redis-server on {addr} did not answer PING within {} s",
                    REDIS_START.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Redis {
            url: format!("redis://{addr}"),
            child: Some(child),
        })
    }

    pub(super) async fn stop(mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill().await;
        }
    }
}

async fn free_port() -> Result<u16, DemoError> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| DemoError::Setup(format!("no free port for redis-server: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| DemoError::Setup(format!("no free port for redis-server: {e}")))
}

/// Whether a Redis server answers PING at `addr`.
async fn pong(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        buf[..n].starts_with(b"+PONG").then_some(())
    };
    tokio::time::timeout(Duration::from_millis(500), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// The `[fleet]` section of replica `index` (from 1).
pub(super) fn section(redis_url: &str, key: &str, index: usize) -> String {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    format!(
        "\n[fleet]\nredis_url = {}\nkey = {}\nreplica = {}\n",
        quote(redis_url),
        quote(key),
        quote(&replica_name(index))
    )
}

pub(super) fn replica_name(index: usize) -> String {
    format!("replica-{index}")
}

/// When each replica was first seen tripped (ms since the epoch), polled every [`WATCH_EVERY`].
pub(super) struct Flips {
    seen: Arc<Mutex<Vec<Option<u64>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Flips {
    pub(super) fn watch(replicas: &[&Running]) -> Flips {
        let controls: Vec<_> = replicas
            .iter()
            .map(|r| r.engine.control().clone())
            .collect();
        let seen = Arc::new(Mutex::new(vec![None; controls.len()]));
        let out = seen.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(WATCH_EVERY);
            loop {
                tick.tick().await;
                let now = now_ms();
                let mut seen = out.lock().unwrap_or_else(|p| p.into_inner());
                for (at, control) in seen.iter_mut().zip(&controls) {
                    if at.is_none() && control.runtime_state().guard.state == GuardState::Tripped {
                        *at = Some(now);
                    }
                }
            }
        });
        Flips { seen, task }
    }

    /// How many replicas have been seen tripped.
    pub(super) fn tripped(&self) -> usize {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.iter().flatten().count()
    }

    pub(super) fn stop(self) -> Vec<Option<u64>> {
        self.task.abort();
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.clone()
    }
}

/// What the fleet did, for the report: the replica that won the trip (the only one with a snapshot),
/// when each replica flipped, and whether all serve under one cache namespace.
pub(super) struct FleetReport<'a> {
    pub(super) replicas: &'a [&'a Running],
    pub(super) dirs: &'a [PathBuf],
    pub(super) flips: Vec<Option<u64>>,
    pub(super) redis_url: &'a str,
    pub(super) key: &'a str,
}

impl FleetReport<'_> {
    /// The replicas whose state dir holds a snapshot of `kind` (`tripped`, `recovered`): the winners
    /// of those transitions, one each when all went well.
    pub(super) fn writers(&self, kind: &str) -> Vec<usize> {
        let tag = format!("-{kind}-");
        self.dirs
            .iter()
            .enumerate()
            .filter(|(_, d)| {
                std::fs::read_dir(snapshot_dir(d)).is_ok_and(|entries| {
                    entries
                        .flatten()
                        .any(|e| e.file_name().to_string_lossy().contains(&tag))
                })
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Every replica flipped, one snapshot was written, one cache namespace.
    pub(super) fn consistent(&self) -> bool {
        let epochs = self.epochs();
        self.flips.iter().all(Option::is_some)
            && self.writers("tripped").len() == 1
            && self.writers("recovered").len() <= 1
            && epochs.windows(2).all(|w| w[0] == w[1])
    }

    fn epochs(&self) -> Vec<u64> {
        self.replicas
            .iter()
            .map(|r| r.engine.control().runtime_state().cache_epoch)
            .collect()
    }

    pub(super) fn render(&self) -> String {
        let mut out = String::new();
        let n = self.replicas.len();
        let _ = writeln!(
            out,
            "{:16}{n} replicas share {} (key {})",
            "fleet:", self.redis_url, self.key
        );
        let names = |w: &[usize]| match w {
            [] => "-".to_string(),
            w => w
                .iter()
                .map(|i| replica_name(i + 1))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let tripped = self.writers("tripped");
        let _ = writeln!(
            out,
            "{:16}{} ({}; the others adopted the fleet state)",
            "trip won by:",
            names(&tripped),
            if tripped.len() == 1 {
                "the only replica that wrote the trip's snapshot and ran its hooks"
            } else {
                "NOT exactly one replica wrote the trip's snapshot"
            }
        );
        let recovered = self.writers("recovered");
        if !recovered.is_empty() {
            let _ = writeln!(
                out,
                "{:16}{} (one recovery, fleet-wide)",
                "recovery by:",
                names(&recovered)
            );
        }
        if let Some(first) = self.flips.iter().flatten().min() {
            let each: Vec<String> = self
                .flips
                .iter()
                .enumerate()
                .map(|(i, at)| match at {
                    Some(at) => format!("{} +{} ms", replica_name(i + 1), at - first),
                    None => format!("{} never", replica_name(i + 1)),
                })
                .collect();
            let flipped = self.flips.iter().flatten().count();
            let _ = writeln!(
                out,
                "{:16}{flipped} of {n} within {} ms of the first ({}; watched every {} ms)",
                "flipped:",
                self.flips.iter().flatten().max().map_or(0, |m| m - first),
                each.join(", "),
                WATCH_EVERY.as_millis()
            );
        }
        let epochs = self.epochs();
        let same = epochs.windows(2).all(|w| w[0] == w[1]);
        let _ = writeln!(
            out,
            "{:16}{}",
            "cache epoch:",
            if same {
                format!("{} on every replica (one new x-cache-ns)", epochs[0])
            } else {
                format!("differs: {epochs:?}")
            }
        );
        out
    }
}
