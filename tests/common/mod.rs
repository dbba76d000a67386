//! Shared harness of the end-to-end tests: a tiny upstream server (hyper 1.x on its own tokio runtime), a
//! driftguard child process started from a config string, and HTTP helpers for the client side.
//!
//! Nothing here sleeps to synchronise: waits are on channels, on log lines read from the child's stdout,
//! or polls with a deadline.

#![allow(dead_code)]

pub mod corpus;
pub mod rag;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::sync::{mpsc, Notify};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ReqBody = BoxBody<Bytes, BoxError>;
pub type HttpClient = Client<HttpConnector, ReqBody>;

/// Upper bound for any single wait in a test; generous because CI has 2 cores and debug builds.
pub const WAIT: Duration = Duration::from_secs(20);

/// The `[listen]` table every test config uses: ephemeral ports, learnt from the "listening" log line.
pub const LISTEN: &str = "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n";

/// Unique names for temp files across the tests of one process and across processes.
pub fn unique(prefix: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "driftguard-e2e-{prefix}-{}-{n}-{nanos}",
        std::process::id()
    ))
}

/// Awaits `fut`, failing the test with `what` when it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Polls `check` every 10 ms until it returns `Some`, failing the test after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("condition not met within {limit:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ================================================================================================
// Tools a test needs
// ================================================================================================

/// Whether `program arg` can be run (found on PATH and executable); its exit status does not matter.
pub fn runs(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Fails the test when a tool it needs is absent. Such tests carry `#[ignore = "needs TOOL"]`, so a
/// plain `cargo test` lists them as ignored with the reason instead of passing them unrun; `.ci/run`
/// installs the tools and runs them with `--include-ignored`, where a missing tool is this failure.
pub fn require(tool: &str, present: bool, install: &str) {
    assert!(
        present,
        "{tool} is not installed, and this test cannot run without it ({install}; .ci/run installs \
         it). Plain `cargo test` skips it as ignored; `--include-ignored` needs the tool."
    );
}

// ================================================================================================
// Test upstream
// ================================================================================================

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// Path and query.
    pub path: String,
    pub version: Version,
    pub headers: HeaderMap,
}

impl Recorded {
    /// The single value of a header; panics when it appears more than once.
    pub fn header(&self, name: &str) -> Option<String> {
        let all: Vec<_> = self.headers.get_all(name).iter().collect();
        assert!(
            all.len() <= 1,
            "header {name} received {} times: {all:?}",
            all.len()
        );
        all.first()
            .map(|v| v.to_str().expect("ascii header").to_string())
    }
}

struct UpstreamState {
    name: String,
    records: Mutex<Vec<Recorded>>,
    /// TCP connections accepted.
    connections: AtomicU64,
    /// Streaming routes send their first part, then wait here until the test opens the gate.
    gate: Notify,
}

/// A small HTTP/1.1 server standing in for the guarded service. Routes (query parameters in brackets):
/// - `/sse` [events=3, delay_ms=0]: `text/event-stream`; sends event 1, waits for [`Upstream::open_gate`],
///   then the rest `delay_ms` apart. Each event is `data: {"n":<i>}\n\n`.
/// - `/bytes` [n]: a streamed (chunked) body of `n` bytes, 64 KiB frames of the pattern `i % 251`.
/// - `/upload`: counts the request body as it streams in; answers `{"bytes": n}`.
/// - `/sleep` [ms]: answers after `ms` milliseconds.
/// - `/echo-pin` [<pin-kebab>=<value>...]: answers with `x-pin-<pin-kebab>: <value>` for each parameter.
/// - `/truncated` [n]: sends `n` bytes of the pattern, waits for the gate, then fails the stream (the
///   connection is cut without the end of the body).
/// - `/hop`: answers with `connection: x-bar` and `x-bar: hop` (a hop-by-hop field the proxy must drop).
/// - anything else: 200 `hello from <name>`.
///
/// Every response carries `x-upstream: <name>`. Every request is recorded with its headers.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
    rt: Option<tokio::runtime::Runtime>,
}

pub const PATTERN_CHUNK: usize = 64 * 1024;

impl Upstream {
    pub fn start(name: &str) -> Upstream {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("upstream-{name}"))
            .enable_all()
            .build()
            .expect("upstream runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("upstream addr");
        let state = Arc::new(UpstreamState {
            name: name.to_string(),
            records: Mutex::new(Vec::new()),
            connections: AtomicU64::new(0),
            gate: Notify::new(),
        });
        let st = state.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                st.connections.fetch_add(1, Ordering::Relaxed);
                let st = st.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| upstream_handle(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            state,
            rt: Some(rt),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.records.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.records.lock().unwrap().len()
    }

    /// TCP connections the upstream accepted so far.
    pub fn connection_count(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }

    /// The request the proxy forwarded with this `x-request-id`.
    pub fn find(&self, request_id: &str) -> Option<Recorded> {
        self.requests().into_iter().find(|r| {
            r.headers
                .get("x-request-id")
                .is_some_and(|v| v == request_id)
        })
    }

    /// Lets one waiting (or the next) streaming response go on past its first part.
    pub fn open_gate(&self) {
        self.state.gate.notify_one();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

type UpBody = BoxBody<Bytes, BoxError>;

fn query(path: &str) -> BTreeMap<String, String> {
    path.split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn param<T: std::str::FromStr>(q: &BTreeMap<String, String>, key: &str, default: T) -> T {
    q.get(key).and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn sse_event(n: usize) -> String {
    format!("data: {{\"n\":{n}}}\n\n")
}

async fn upstream_handle(
    st: Arc<UpstreamState>,
    req: Request<Incoming>,
) -> Result<Response<UpBody>, Infallible> {
    let path_q = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    st.records.lock().unwrap().push(Recorded {
        method: req.method().clone(),
        path: path_q.clone(),
        version: req.version(),
        headers: req.headers().clone(),
    });
    let q = query(&path_q);
    let mut builder = Response::builder().header("x-upstream", st.name.as_str());
    let body: UpBody = match req.uri().path() {
        "/sse" => {
            let events: usize = param(&q, "events", 3);
            let delay = Duration::from_millis(param(&q, "delay_ms", 0));
            let (tx, rx) = mpsc::channel(16);
            let st = st.clone();
            tokio::spawn(async move {
                if tx.send(Ok(Bytes::from(sse_event(1)))).await.is_err() {
                    return;
                }
                st.gate.notified().await;
                for n in 2..=events {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    if tx.send(Ok(Bytes::from(sse_event(n)))).await.is_err() {
                        return;
                    }
                }
            });
            builder = builder
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache");
            ChannelBody { rx }.boxed()
        }
        "/bytes" => {
            builder = builder.header("content-type", "application/octet-stream");
            RepeatBody::new(param(&q, "n", 0))
                .map_err(|never| match never {})
                .boxed()
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut n: u64 = 0;
            let mut error = None;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(e) => {
                        error = Some(e.to_string());
                        break;
                    }
                }
            }
            builder = builder.header("content-type", "application/json");
            full_up(serde_json::json!({"bytes": n, "error": error}).to_string())
        }
        "/sleep" => {
            tokio::time::sleep(Duration::from_millis(param(&q, "ms", 0))).await;
            full_up("slept".to_string())
        }
        "/echo-pin" => {
            for (k, v) in &q {
                builder = builder.header(format!("x-pin-{k}"), v.as_str());
            }
            full_up("echoed".to_string())
        }
        "/truncated" => {
            let n: u64 = param(&q, "n", 1024);
            builder = builder.header("content-type", "application/octet-stream");
            let (tx, rx) = mpsc::channel(4);
            let st = st.clone();
            tokio::spawn(async move {
                let mut part = RepeatBody::new(n);
                while let Some(Ok(frame)) = part.frame().await {
                    if tx
                        .send(Ok(frame.into_data().expect("data frame")))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                st.gate.notified().await;
                let _ = tx.send(Err("upstream died mid-body".into())).await;
            });
            ChannelBody { rx }.boxed()
        }
        "/hop" => {
            builder = builder.header("connection", "x-bar").header("x-bar", "hop");
            full_up(format!("hello from {}", st.name))
        }
        _ => full_up(format!("hello from {}", st.name)),
    };
    Ok(builder.body(body).expect("upstream response"))
}

fn full_up(s: String) -> UpBody {
    Full::new(Bytes::from(s))
        .map_err(|never| match never {})
        .boxed()
}

/// A body fed by a channel: each message is one frame (or the error that breaks the stream); the stream
/// ends when the sender is dropped.
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.get_mut()
            .rx
            .poll_recv(cx)
            .map(|m| m.map(|r| r.map(Frame::data)))
    }
}

/// A body of `n` bytes made on demand in 64 KiB frames (never held in memory at once). Byte `i` of the
/// stream is `i % 251`, so a receiver can check content at any offset cheaply.
pub struct RepeatBody {
    remaining: u64,
    offset: u64,
    chunks: Vec<Bytes>,
}

impl RepeatBody {
    pub fn new(n: u64) -> Self {
        // 251 rotations of one chunk cover every starting phase of the pattern.
        let base: Vec<u8> = (0..PATTERN_CHUNK + 251).map(|i| (i % 251) as u8).collect();
        let base = Bytes::from(base);
        let chunks = (0..251)
            .map(|phase| base.slice(phase..phase + PATTERN_CHUNK))
            .collect();
        RepeatBody {
            remaining: n,
            offset: 0,
            chunks,
        }
    }
}

impl Body for RepeatBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let len = (PATTERN_CHUNK as u64).min(this.remaining) as usize;
        let chunk = this.chunks[(this.offset % 251) as usize].slice(..len);
        this.remaining -= len as u64;
        this.offset += len as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        // Deliberately inexact so it goes chunked, like a generated answer would.
        SizeHint::default()
    }
}

// ================================================================================================
// driftguard child process
// ================================================================================================

#[derive(Default)]
struct Output {
    lines: Mutex<Vec<String>>,
    stdout_closed: Mutex<bool>,
    changed: Condvar,
    stderr: Mutex<String>,
}

/// A running `driftguard run` on ephemeral ports; killed on drop.
pub struct Proxy {
    child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    state_dir: PathBuf,
    output: Arc<Output>,
    exited: Option<ExitStatus>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_driftguard")
}

/// Environment variables of the host that would change what the child does.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars() {
        if k.starts_with("DRIFTGUARD_") || k == "RUST_LOG" || k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
}

impl Proxy {
    pub fn start(config: &str) -> Proxy {
        Proxy::start_with_env(config, &[])
    }

    /// Writes `config` (with a private `state_dir` put in front unless it sets one) to a temp file and
    /// runs driftguard on it, with `env` added to a cleaned environment. Returns once it listens.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Proxy {
        let config_path = unique("config").with_extension("toml");
        let state_dir = unique("state");
        std::fs::write(&config_path, with_state_dir(config, &state_dir)).expect("write config");
        let mut cmd = Command::new(bin());
        cmd.arg("run").arg("--config").arg(&config_path);
        clean_env(&mut cmd);
        cmd.envs(env.iter().copied());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn driftguard");

        let output = Arc::new(Output::default());
        let stdout = child.stdout.take().expect("stdout");
        let out = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                out.lines.lock().unwrap().push(line);
                out.changed.notify_all();
            }
            *out.stdout_closed.lock().unwrap() = true;
            out.changed.notify_all();
        });
        let mut stderr = child.stderr.take().expect("stderr");
        let out = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.stderr
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });

        let mut proxy = Proxy {
            child,
            proxy: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
            config_path,
            state_dir,
            output,
            exited: None,
        };
        let listening = proxy.wait_line_blocking(WAIT, |v| v["message"] == "listening");
        let Some(listening) = listening else {
            let status = proxy.child.try_wait().ok().flatten();
            panic!(
                "driftguard did not log \"listening\" within {WAIT:?} (exit: {status:?})\nstdout:\n{}\nstderr:\n{}",
                proxy.output.lines.lock().unwrap().join("\n"),
                proxy.output.stderr.lock().unwrap()
            );
        };
        let addr = |key: &str| -> SocketAddr {
            listening[key]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {listening}"))
        };
        proxy.proxy = addr("proxy");
        proxy.admin = addr("admin");
        proxy
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://<proxy><path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// `http://<admin><path>`
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is shared.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.child.id());
    }

    /// Replaces the config file's content (the same `state_dir` is put in front).
    pub fn rewrite_config(&self, config: &str) {
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, with_state_dir(config, &self.state_dir)).expect("write config");
        std::fs::rename(&tmp, &self.config_path).expect("replace config");
    }

    /// Every stdout line so far that parses as JSON.
    pub fn log_lines(&self) -> Vec<Value> {
        self.output
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Access-log lines (target `driftguard::access`) so far.
    pub fn access_log(&self) -> Vec<Value> {
        self.log_lines()
            .into_iter()
            .filter(|v| v["target"] == "driftguard::access")
            .collect()
    }

    fn wait_line_blocking(&self, limit: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + limit;
        let mut lines = self.output.lines.lock().unwrap();
        let mut seen = 0;
        loop {
            for line in &lines[seen..] {
                if let Ok(v) = serde_json::from_str::<Value>(line) {
                    if pred(&v) {
                        return Some(v);
                    }
                }
            }
            seen = lines.len();
            if *self.output.stdout_closed.lock().unwrap() {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self
                .output
                .changed
                .wait_timeout(lines, (deadline - now).min(Duration::from_millis(100)))
                .unwrap()
                .0;
        }
    }

    /// Waits (polling, without blocking the test's runtime) for a log line matching `pred`.
    pub async fn wait_log(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        eventually(WAIT, what, || {
            let found = self.log_lines().into_iter().find(|v| pred(v));
            async move { found }
        })
        .await
    }

    /// Number of log lines matching `pred` so far.
    pub fn count_log(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.log_lines().iter().filter(|v| pred(v)).count()
    }

    /// Polls for the child's exit, up to `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
    pub fn proc_status_kib(&self, field: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        text.lines()
            .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    pub fn stderr(&self) -> String {
        self.output.stderr.lock().unwrap().clone()
    }
}

fn with_state_dir(config: &str, state_dir: &Path) -> String {
    if config
        .lines()
        .any(|l| l.trim_start().starts_with("state_dir"))
    {
        config.to_string()
    } else {
        format!(
            "state_dir = {:?}\n{config}",
            state_dir.display().to_string()
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let lines = self.output.lines.lock().unwrap();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- driftguard stdout (last {} lines) ---\n{}",
                tail.len(),
                tail.join("\n")
            );
            eprintln!(
                "--- driftguard stderr ---\n{}",
                self.output.stderr.lock().unwrap()
            );
        }
        let _ = std::fs::remove_file(&self.config_path);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

// ================================================================================================
// Client side
// ================================================================================================

/// A pooled HTTP/1.1 keep-alive client.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn empty() -> ReqBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(body: impl Into<Bytes>) -> ReqBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn streamed(n: u64) -> ReqBody {
    RepeatBody::new(n).map_err(|never| match never {}).boxed()
}

/// A finished exchange: status, headers and the whole (small) body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<String> {
        let all: Vec<_> = self.headers.get_all(name).iter().collect();
        assert!(
            all.len() <= 1,
            "response header {name} appears {} times: {all:?}",
            all.len()
        );
        all.first()
            .map(|v| v.to_str().expect("ascii header").to_string())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
}

/// Sends a request and reads the whole response, all within [`WAIT`]; a transport error fails the test.
pub async fn exchange(client: &HttpClient, req: Request<ReqBody>) -> Reply {
    try_exchange(client, req)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`exchange`], but a transport error (refused, reset, a body cut short) or the [`WAIT`] timeout
/// is returned as `Err` saying what failed. Load loops record it as an outcome and assert on it: a
/// panic in a spawned task is lost unless someone joins the task and looks.
pub async fn try_exchange(client: &HttpClient, req: Request<ReqBody>) -> Result<Reply, String> {
    let what = format!("{} {}", req.method(), req.uri());
    let sent = tokio::time::timeout(WAIT, async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("{what}: {e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("{what}: body: {e}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    })
    .await;
    sent.unwrap_or_else(|_| Err(format!("{what}: no whole response within {WAIT:?}")))
}

/// GET `url` with extra headers.
pub async fn get(client: &HttpClient, url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    exchange(client, req.body(empty()).unwrap()).await
}

/// POST to an admin endpoint with an optional bearer token.
pub async fn admin_post(client: &HttpClient, url: &str, body: &str, token: Option<&str>) -> Reply {
    let mut req = Request::post(url).header("content-type", "application/json");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    exchange(client, req.body(full(body.to_string())).unwrap()).await
}

/// Reads frames from `body` until `until` says the accumulated text is enough, within `limit`.
pub async fn read_until(
    body: &mut Incoming,
    acc: &mut String,
    limit: Duration,
    until: impl Fn(&str) -> bool,
) {
    within(limit, "reading the streamed body", async {
        while !until(acc) {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        acc.push_str(std::str::from_utf8(data).expect("utf-8 stream"));
                    }
                }
                Some(Err(e)) => panic!("stream broke: {e}; got so far: {acc:?}"),
                None => panic!("stream ended early; got: {acc:?}"),
            }
        }
    })
    .await
}

/// Reads `body` to its end.
pub async fn read_to_end(body: &mut Incoming, acc: &mut String, limit: Duration) {
    within(limit, "reading the body to its end", async {
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap_or_else(|e| panic!("stream broke: {e}; got so far: {acc:?}"));
            if let Some(data) = frame.data_ref() {
                acc.push_str(std::str::from_utf8(data).expect("utf-8 stream"));
            }
        }
    })
    .await
}

pub fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap()
}

// ================================================================================================
// Prometheus text
// ================================================================================================

/// One sample of the Prometheus text exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses sample lines (comments skipped). Label values here never hold `"` or `,`.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("bad labels in {line:?}"));
                    let labels = inner
                        .split(',')
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv
                                .split_once('=')
                                .unwrap_or_else(|| panic!("bad label in {line:?}"));
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            Sample {
                name,
                labels,
                value,
            }
        })
        .collect()
}

/// The value of the sample `name` whose labels include all of `labels`.
pub fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

pub async fn scrape(client: &HttpClient, proxy: &Proxy) -> (String, Vec<Sample>) {
    let reply = get(client, &proxy.admin_url("/metrics"), &[]).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "GET /metrics: {}",
        reply.text()
    );
    let text = reply.text();
    let samples = parse_metrics(&text);
    (text, samples)
}

/// `[[arms]]` entry text.
pub fn arm(name: &str, upstream: &str, weight: u32, pins: &[(&str, &str)]) -> String {
    let mut s =
        format!("[[arms]]\nname = \"{name}\"\nupstream = \"{upstream}\"\nweight = {weight}\n");
    if !pins.is_empty() {
        s.push_str("[arms.pins]\n");
        for (k, v) in pins {
            s.push_str(&format!("{k} = \"{v}\"\n"));
        }
    }
    s
}

// ================================================================================================
// Scripted server: an upstream (or an embeddings endpoint) whose answers a closure decides
// ================================================================================================

/// What a [`Scripted`] server answers to one request.
#[derive(Debug, Clone)]
pub struct Canned {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    /// Body frames in order; each one goes out as its own frame (chunked transfer).
    pub frames: Vec<Bytes>,
    /// Wait before sending the response head.
    pub delay: Duration,
    /// Wait between two frames.
    pub gap: Duration,
}

impl Canned {
    /// 200 with `content_type` and one frame.
    pub fn body(content_type: &str, body: impl Into<Bytes>) -> Canned {
        Canned {
            status: StatusCode::OK,
            headers: vec![("content-type".into(), content_type.into())],
            frames: vec![body.into()],
            delay: Duration::ZERO,
            gap: Duration::ZERO,
        }
    }

    /// 200 `application/json`.
    pub fn json(value: &Value) -> Canned {
        Canned::body("application/json", value.to_string())
    }

    /// 200 `text/event-stream`: each payload becomes one `data: <payload>\n\n` event in its own frame,
    /// followed by `data: [DONE]`.
    pub fn sse<S: AsRef<str>>(payloads: &[S]) -> Canned {
        let mut frames: Vec<Bytes> = payloads
            .iter()
            .map(|p| Bytes::from(format!("data: {}\n\n", p.as_ref())))
            .collect();
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
        Canned {
            status: StatusCode::OK,
            headers: vec![
                ("content-type".into(), "text/event-stream".into()),
                ("cache-control".into(), "no-cache".into()),
            ],
            frames,
            delay: Duration::ZERO,
            gap: Duration::ZERO,
        }
    }

    pub fn status(mut self, status: StatusCode) -> Canned {
        self.status = status;
        self
    }

    pub fn delay(mut self, delay: Duration) -> Canned {
        self.delay = delay;
        self
    }

    pub fn gap(mut self, gap: Duration) -> Canned {
        self.gap = gap;
        self
    }

    /// The whole body, for comparing with what a client received.
    pub fn concatenated(&self) -> Bytes {
        let mut all = Vec::new();
        for f in &self.frames {
            all.extend_from_slice(f);
        }
        Bytes::from(all)
    }
}

/// One request a [`Scripted`] server received, with its whole body.
#[derive(Debug, Clone)]
pub struct Exchanged {
    pub request: Recorded,
    pub body: Bytes,
}

impl Exchanged {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "request body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

type Script = dyn Fn(&Recorded, &Bytes) -> Canned + Send + Sync;

struct ScriptedState {
    exchanges: Mutex<Vec<Exchanged>>,
    script: Box<Script>,
}

/// An HTTP/1.1 server on 127.0.0.1 (its own tokio runtime) that reads each request body whole, records
/// it, and answers what `script(request, body)` returns. Stops when dropped: its port then refuses.
pub struct Scripted {
    pub addr: SocketAddr,
    state: Arc<ScriptedState>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Scripted {
    pub fn start(
        name: &str,
        script: impl Fn(&Recorded, &Bytes) -> Canned + Send + Sync + 'static,
    ) -> Scripted {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("scripted-{name}"))
            .enable_all()
            .build()
            .expect("scripted runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind scripted server");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("scripted addr");
        let state = Arc::new(ScriptedState {
            exchanges: Mutex::new(Vec::new()),
            script: Box::new(script),
        });
        let st = state.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let st = st.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| scripted_handle(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Scripted {
            addr,
            state,
            rt: Some(rt),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn exchanges(&self) -> Vec<Exchanged> {
        self.state.exchanges.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.exchanges.lock().unwrap().len()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn scripted_handle(
    st: Arc<ScriptedState>,
    req: Request<Incoming>,
) -> Result<Response<UpBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method.clone(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        version: parts.version,
        headers: parts.headers.clone(),
    };
    let canned = (st.script)(&recorded, &body);
    st.exchanges.lock().unwrap().push(Exchanged {
        request: recorded,
        body,
    });
    if !canned.delay.is_zero() {
        tokio::time::sleep(canned.delay).await;
    }
    let mut builder = Response::builder().status(canned.status);
    for (k, v) in &canned.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    let body = if canned.frames.len() == 1 && canned.gap.is_zero() {
        full_up_bytes(canned.frames[0].clone())
    } else {
        let (tx, rx) = mpsc::channel(16);
        let (frames, gap) = (canned.frames, canned.gap);
        tokio::spawn(async move {
            for (i, frame) in frames.into_iter().enumerate() {
                if i > 0 && !gap.is_zero() {
                    tokio::time::sleep(gap).await;
                }
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
        });
        ChannelBody { rx }.boxed()
    };
    Ok(builder.body(body).expect("scripted response"))
}

fn full_up_bytes(b: Bytes) -> UpBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// An `http://127.0.0.1:<port>` where nothing listens (the port was bound and released just now).
pub fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

/// POST a JSON body with extra headers.
pub async fn post_json(
    client: &HttpClient,
    url: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> Reply {
    try_post_json(client, url, body, headers)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// [`post_json`] that returns a transport error instead of failing the test (see [`try_exchange`]).
pub async fn try_post_json(
    client: &HttpClient,
    url: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut req = Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    try_exchange(client, req.body(full(body.to_string())).unwrap()).await
}

/// Scrapes `/metrics` until the sample `name{labels}` exists and satisfies `pred`, within `limit`;
/// returns that scrape's samples.
pub async fn wait_metric(
    client: &HttpClient,
    proxy: &Proxy,
    name: &str,
    labels: &[(&str, &str)],
    limit: Duration,
    pred: impl Fn(f64) -> bool,
) -> Vec<Sample> {
    let deadline = Instant::now() + limit;
    loop {
        let (_, samples) = scrape(client, proxy).await;
        let value = metric(&samples, name, labels);
        if value.is_some_and(&pred) {
            return samples;
        }
        if Instant::now() > deadline {
            panic!("{name}{labels:?} did not reach the expected value within {limit:?}; last: {value:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One expected sample for [`wait_metrics`]: name, labels it must include, exact value.
pub type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Scrapes `/metrics` until every sample in `expected` has exactly its value, within `limit`; returns
/// that scrape's samples. Waiting for one counter and reading the others from the same scrape races:
/// a scrape reads the metric families one after another, in an order of its own, so it can see the
/// last counter an evaluation bumps and still miss an earlier one.
pub async fn wait_metrics(
    client: &HttpClient,
    proxy: &Proxy,
    limit: Duration,
    expected: &[Expected<'_>],
) -> Vec<Sample> {
    let deadline = Instant::now() + limit;
    loop {
        let (_, samples) = scrape(client, proxy).await;
        let seen: Vec<Option<f64>> = expected
            .iter()
            .map(|(name, labels, _)| metric(&samples, name, labels))
            .collect();
        if seen.iter().zip(expected).all(|(v, e)| *v == Some(e.2)) {
            return samples;
        }
        if Instant::now() > deadline {
            let report: Vec<String> = seen
                .iter()
                .zip(expected)
                .map(|(v, (name, labels, want))| {
                    format!("{name}{labels:?}: want {want}, last {v:?}")
                })
                .collect();
            panic!(
                "/metrics did not reach the expected values within {limit:?}:\n{}",
                report.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs `driftguard <args>` in `cwd` with a cleaned environment, waiting at most `limit` (then kills it
/// and fails the test).
pub fn run_cli(args: &[&str], cwd: &Path, limit: Duration) -> std::process::Output {
    run_cli_with_input(args, cwd, limit, None)
}

/// [`run_cli`] with `stdin` piped in (else /dev/null).
pub fn run_cli_with_input(
    args: &[&str],
    cwd: &Path,
    limit: Duration,
    stdin: Option<&str>,
) -> std::process::Output {
    let mut cmd = Command::new(bin());
    cmd.args(args).current_dir(cwd);
    clean_env(&mut cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn driftguard");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        let text = text.to_string();
        // A writer thread: a large input must not block against a full stdout pipe.
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = pipe.write_all(text.as_bytes());
        });
    }
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("driftguard {args:?} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

// ================================================================================================
// Raw TCP: an upstream that writes its own bytes, and helpers for a client that does
// ================================================================================================

/// A TCP server on 127.0.0.1 (its own tokio runtime) whose every accepted connection is handed to
/// `handler`: for upstreams that must misbehave in ways an HTTP library will not (answer early without
/// reading the body, send both `Transfer-Encoding` and `Content-Length`, break off mid-body).
/// Stops when dropped.
pub struct RawUpstream {
    pub addr: SocketAddr,
    connections: Arc<AtomicU64>,
    rt: Option<tokio::runtime::Runtime>,
}

impl RawUpstream {
    pub fn start<F, Fut>(name: &str, handler: F) -> RawUpstream
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("raw-{name}"))
            .enable_all()
            .build()
            .expect("raw upstream runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind raw upstream");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("raw upstream addr");
        let connections = Arc::new(AtomicU64::new(0));
        let count = connections.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(handler(stream));
            }
        });
        RawUpstream {
            addr,
            connections,
            rt: Some(rt),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// TCP connections accepted so far.
    pub fn connection_count(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Reads from `stream` until `buf` holds a whole message head (`\r\n\r\n`); returns the head (without
/// the blank line) and leaves the bytes after it in `buf`. `None` on EOF or error before a whole head.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The value of header `name` (case-insensitive) in a raw message head; the first one.
pub fn head_field(head: &str, name: &str) -> Option<String> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Every value of header `name` (case-insensitive) in a raw message head.
pub fn head_fields(head: &str, name: &str) -> Vec<String> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
        .collect()
}

/// Decodes a complete chunked body (RFC 9112 §7.1; extensions and trailers ignored). `None` when the
/// bytes are not a complete, well-formed chunked body.
pub fn decode_chunked(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            // Trailer section: lines until an empty one.
            loop {
                let end = data.windows(2).position(|w| w == b"\r\n")?;
                if end == 0 {
                    return Some(out);
                }
                data = &data[end + 2..];
            }
        }
        if data.len() < size + 2 || &data[size..size + 2] != b"\r\n" {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Reads `stream` to EOF (within `limit`), returning everything received.
pub async fn read_to_eof<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    within(limit, "reading the connection to EOF", async {
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    all
}

/// The promtool binary (`apt-get install prometheus`); a test that calls this is
/// `#[ignore = "needs promtool ..."]`, so without it the test fails with the reason.
pub fn promtool() -> &'static str {
    let found = ["/usr/bin/promtool", "promtool"]
        .into_iter()
        .find(|p| runs(p, "--version"));
    require("promtool", found.is_some(), "apt-get install prometheus");
    found.unwrap_or("promtool")
}

/// Runs `promtool check metrics` on an exposition. Any finding fails: promtool must print nothing and
/// exit 0.
pub fn assert_promtool_clean(promtool: &str, text: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(text.as_bytes())
        .expect("pipe to promtool");
    let out = child.wait_with_output().expect("promtool output");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let findings: Vec<&str> = report.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        findings.is_empty(),
        "promtool check metrics found problems:\n{report}"
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{report}",
        out.status
    );
}

// ================================================================================================
// Redis
// ================================================================================================

/// A private redis-server (Debian package `redis-server`, installed by `.ci/run`) on a free loopback
/// port, with persistence off; killed on drop. A test that starts one is
/// `#[ignore = "needs redis-server ..."]`: without the binary it fails, saying so.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        require(
            "redis-server",
            runs("redis-server", "--version"),
            "apt-get install redis-server",
        );
        let port = free_port();
        let mut server = RedisServer { child: None, port };
        server.spawn();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port and waits until it answers PING.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while self.cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (its data is gone: persistence is off).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// One command through `redis-cli`; its trimmed output, or `None` if it failed.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}
