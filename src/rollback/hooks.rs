//! Rollback hooks (SPEC §6, step 6 of the rollback plan): tell the outside world that an arm tripped,
//! recovered or escalated.
//!
//! Two kinds, both bounded by the hook's `timeout` and counted in `driftguard_hook_runs_total`:
//! - `exec` runs an argv directly (no shell) with the event in `DRIFTGUARD_*` env vars; a run past its
//!   timeout has its whole process group killed and reaped.
//! - `webhook` POSTs the snapshot JSON, HMAC-signed when a secret is configured, retrying with jittered
//!   exponential backoff.
//!
//! The rollback engine calls [`HookRunner::fire`] and moves on: each hook runs on its own task, so a
//! slow or hanging hook never delays the rollback itself.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{header, Method, Request};
use prometheus::IntCounterVec;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;

use crate::config::{Hook, HookEvent, HookKind};
use crate::net;

/// Most bytes of an exec hook's stdout, and of its stderr, kept for the log.
const OUTPUT_LIMIT: usize = 4 * 1024;
/// Most bytes of a failed webhook response body kept for the log.
const RESPONSE_LIMIT: usize = 1024;
/// Webhook retry n (from 0) waits BACKOFF_BASE × 2^n, ±50 % jitter, at most BACKOFF_CAP. The jitter
/// keeps several driftguard replicas that tripped together from retrying in lockstep.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// The client's own timeout; never used, as every attempt passes its hook's.
const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a hook is told about the transition that fired it.
#[derive(Debug, Clone)]
pub struct HookContext {
    pub event: HookEvent,
    /// The rule that tripped (SPEC §6 rule name, e.g. `coverage`).
    pub rule: String,
    /// The ΔS probe the rule judges (`retrieval`, `answer`, `combined`), empty for other rules.
    pub probe: String,
    /// The lever the rollback pulled (`route`, `alias`, `flag`, ...), empty when none was.
    pub lever: String,
    pub arm: String,
    /// Where the snapshot was written (`DRIFTGUARD_SNAPSHOT`), when it was.
    pub snapshot_path: Option<PathBuf>,
    /// The snapshot itself: the webhook body.
    pub snapshot: serde_json::Value,
}

/// How one hook run ended; the `outcome` label of `driftguard_hook_runs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookOutcome {
    /// Exit status 0, or a 2xx answer.
    Ok,
    /// Non-zero exit, cannot spawn, non-2xx answer or connection error (after all retries).
    Failed,
    /// Past the hook's timeout (for a webhook: on its last attempt).
    Timeout,
}

impl HookOutcome {
    pub const ALL: [HookOutcome; 3] = [HookOutcome::Ok, HookOutcome::Failed, HookOutcome::Timeout];

    pub fn as_str(self) -> &'static str {
        match self {
            HookOutcome::Ok => "ok",
            HookOutcome::Failed => "failed",
            HookOutcome::Timeout => "timeout",
        }
    }
}

/// The event's name as hooks see it: `DRIFTGUARD_EVENT` and the `x-driftguard-event` header.
pub fn event_name(event: HookEvent) -> &'static str {
    match event {
        HookEvent::Tripped => "tripped",
        HookEvent::Recovered => "recovered",
        HookEvent::Escalated => "escalated",
    }
}

fn kind_name(kind: HookKind) -> &'static str {
    match kind {
        HookKind::Exec => "exec",
        HookKind::Webhook => "webhook",
    }
}

// === impl HookRunner ===

/// The configured hooks and what they need to run; cheap to clone.
#[derive(Clone)]
pub struct HookRunner {
    inner: Arc<Inner>,
}

struct Inner {
    hooks: Vec<Hook>,
    runs: IntCounterVec,
}

impl HookRunner {
    /// `runs` is `driftguard_hook_runs_total{hook,outcome}` ([`crate::telemetry::metrics::Metrics::hook_runs`]).
    pub fn new(hooks: Vec<Hook>, runs: IntCounterVec) -> Self {
        // Every hook's series exist from the start, so "no failures yet" reads as 0, not as absent.
        for hook in &hooks {
            for outcome in HookOutcome::ALL {
                runs.with_label_values(&[hook.name.as_str(), outcome.as_str()]);
            }
        }
        HookRunner {
            inner: Arc::new(Inner { hooks, runs }),
        }
    }

    pub fn hooks(&self) -> &[Hook] {
        &self.inner.hooks
    }

    /// Fires every hook whose `on` contains `ctx.event`, each on its own task, and returns at once.
    /// The handles let tests and shutdown wait for the runs; dropping them detaches the runs.
    ///
    /// Must be called within a tokio runtime.
    pub fn fire(&self, ctx: Arc<HookContext>) -> Vec<JoinHandle<HookOutcome>> {
        (0..self.inner.hooks.len())
            .filter(|&i| self.inner.hooks[i].on.contains(&ctx.event))
            .map(|i| {
                let (inner, ctx) = (self.inner.clone(), ctx.clone());
                tokio::spawn(async move { inner.run(i, &ctx).await })
            })
            .collect()
    }
}

/// What one run found, for its log line.
struct Report {
    outcome: HookOutcome,
    attempts: u32,
    /// Exit status, HTTP status or error.
    detail: String,
    stdout: String,
    stderr: String,
}

impl Report {
    fn new(outcome: HookOutcome, attempts: u32, detail: String) -> Self {
        Report {
            outcome,
            attempts,
            detail,
            stdout: String::new(),
            stderr: String::new(),
        }
    }
}

impl Inner {
    async fn run(&self, index: usize, ctx: &HookContext) -> HookOutcome {
        let hook = &self.hooks[index];
        let started = Instant::now();
        let report = match hook.kind {
            HookKind::Exec => exec(hook, ctx).await,
            HookKind::Webhook => self.webhook(hook, ctx).await,
        };
        let outcome = report.outcome;
        self.runs
            .with_label_values(&[hook.name.as_str(), outcome.as_str()])
            .inc();
        macro_rules! log_run {
            ($level:ident) => {
                tracing::$level!(
                    hook = hook.name.as_str(),
                    kind = kind_name(hook.kind),
                    event = event_name(ctx.event),
                    rule = ctx.rule.as_str(),
                    arm = ctx.arm.as_str(),
                    outcome = outcome.as_str(),
                    attempts = report.attempts,
                    duration_ms = started.elapsed().as_millis() as u64,
                    detail = report.detail.as_str(),
                    stdout = report.stdout.as_str(),
                    stderr = report.stderr.as_str(),
                    "hook run"
                )
            };
        }
        if outcome == HookOutcome::Ok {
            log_run!(info);
        } else {
            log_run!(warn);
        }
        outcome
    }

    async fn webhook(&self, hook: &Hook, ctx: &HookContext) -> Report {
        let body = match serde_json::to_vec(&ctx.snapshot) {
            Ok(body) => Bytes::from(body),
            Err(e) => return Report::new(HookOutcome::Failed, 0, format!("snapshot: {e}")),
        };
        let uri = match net::url(&hook.url) {
            Ok(uri) => uri,
            Err(e) => return Report::new(HookOutcome::Failed, 0, format!("url: {e}")),
        };
        let roots = match net::Roots::load(&hook.trust) {
            Ok(roots) => roots,
            Err(e) => return Report::new(HookOutcome::Failed, 0, e.to_string()),
        };
        // Hooks fire minutes apart: a pooled connection would mostly be one the receiver has already
        // closed, costing a failed attempt. Every attempt opens its own. Each attempt is bounded by
        // its hook's timeout (`send_within`); only a refusal's body is read, for the log.
        let client = net::Client::builder(DEFAULT_ATTEMPT_TIMEOUT)
            .no_pool()
            .failure_body_only(RESPONSE_LIMIT)
            .roots(roots)
            .build();
        let signature = signature(hook, &body);
        let timeout = hook.timeout.0;
        let mut last = Report::new(HookOutcome::Failed, 0, String::new());
        for attempt in 0..=hook.retries {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt - 1)).await;
            }
            let mut request = Request::builder()
                .method(Method::POST)
                .uri(uri.clone())
                .header(header::CONTENT_TYPE, "application/json")
                .header(
                    header::USER_AGENT,
                    concat!("driftguard/", env!("CARGO_PKG_VERSION")),
                )
                .header("x-driftguard-event", event_name(ctx.event));
            if let Some(signature) = &signature {
                request = request.header("x-driftguard-signature", signature.as_str());
            }
            let request = match request.body(body.clone()) {
                Ok(request) => request,
                Err(e) => {
                    return Report::new(HookOutcome::Failed, attempt, format!("request: {e}"))
                }
            };
            let (outcome, detail) = match client.send_within(request, timeout).await {
                Ok(response) if response.status().is_success() => {
                    let status = response.status();
                    return Report::new(HookOutcome::Ok, attempt + 1, format!("HTTP {status}"));
                }
                Ok(response) => {
                    // Receivers often say in the body why they refused.
                    let status = response.status();
                    let body = String::from_utf8_lossy(response.body()).trim().to_string();
                    if body.is_empty() {
                        (HookOutcome::Failed, format!("HTTP {status}"))
                    } else {
                        (HookOutcome::Failed, format!("HTTP {status}: {body}"))
                    }
                }
                Err(net::Error::Timeout { .. }) => (
                    HookOutcome::Timeout,
                    format!("no answer within {}", humantime::format_duration(timeout)),
                ),
                Err(net::Error::Connect { cause, .. }) => (HookOutcome::Failed, cause),
                Err(e) => (HookOutcome::Failed, e.to_string()),
            };
            tracing::debug!(
                hook = hook.name.as_str(),
                attempt = attempt + 1,
                detail = detail.as_str(),
                "webhook attempt failed"
            );
            last = Report::new(outcome, attempt + 1, detail);
        }
        last
    }
}

/// `sha256=<hex HMAC-SHA256 of body>` keyed by the env var `secret_env` names, when it is set and
/// not empty.
fn signature(hook: &Hook, body: &[u8]) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    if hook.secret_env.is_empty() {
        return None;
    }
    let secret = std::env::var_os(&hook.secret_env).filter(|s| !s.is_empty());
    let Some(secret) = secret else {
        tracing::warn!(
            hook = hook.name.as_str(),
            secret_env = hook.secret_env.as_str(),
            "webhook secret env var is unset or empty; sending unsigned"
        );
        return None;
    };
    // HMAC takes keys of any length; this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).ok()?;
    mac.update(body);
    Some(format!(
        "sha256={}",
        hex::encode(mac.finalize().into_bytes())
    ))
}

fn backoff(retry: u32) -> Duration {
    let base = BACKOFF_BASE.saturating_mul(1 << retry.min(16));
    base.mul_f64(0.5 + fastrand::f64()).min(BACKOFF_CAP)
}

// === exec ===

async fn exec(hook: &Hook, ctx: &HookContext) -> Report {
    let Some((program, args)) = hook.command.split_first() else {
        return Report::new(HookOutcome::Failed, 0, "empty command".into());
    };
    let snapshot = ctx
        .snapshot_path
        .as_deref()
        .map(|p| p.as_os_str())
        .unwrap_or_default();
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env("DRIFTGUARD_EVENT", event_name(ctx.event))
        .env("DRIFTGUARD_RULE", &ctx.rule)
        .env("DRIFTGUARD_ARM", &ctx.arm)
        .env("DRIFTGUARD_PROBE", &ctx.probe)
        .env("DRIFTGUARD_LEVER", &ctx.lever)
        .env("DRIFTGUARD_SNAPSHOT", snapshot)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout also kills what the hook started (a script's children),
        // and a Ctrl-C meant for driftguard does not reach a hook mid-run.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Report::new(
                HookOutcome::Failed,
                1,
                format!("cannot run {program:?}: {e}"),
            )
        }
    };
    let pid = child.id();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let (mut out, mut err) = (Output::default(), Output::default());
    let timeout = hook.timeout.0;
    // The run ends when the child has exited *and* its pipes have closed: a background process still
    // holding them is part of the run, and the timeout kills it too.
    let finished = tokio::time::timeout(timeout, async {
        let (status, (), ()) = tokio::join!(child.wait(), out.read(stdout), err.read(stderr));
        status
    })
    .await;
    let (outcome, detail) = match finished {
        Ok(Ok(status)) if status.success() => (HookOutcome::Ok, status.to_string()),
        Ok(Ok(status)) => (HookOutcome::Failed, status.to_string()),
        Ok(Err(e)) => (
            HookOutcome::Failed,
            format!("cannot wait for the hook: {e}"),
        ),
        Err(_) => {
            kill_group(pid);
            // The group kill reaches the child too; start_kill covers a child that left the group.
            let _ = child.start_kill();
            let _ = child.wait().await;
            (
                HookOutcome::Timeout,
                format!("killed after {}", humantime::format_duration(timeout)),
            )
        }
    };
    Report {
        outcome,
        attempts: 1,
        detail,
        stdout: out.text(),
        stderr: err.text(),
    }
}

fn kill_group(pid: Option<u32>) {
    let Some(pgid) = pid.and_then(|p| libc::pid_t::try_from(p).ok()) else {
        return;
    };
    // SAFETY: kill(2) touches no memory of ours. The group id is the child's pid (process_group(0)).
    // Linux does not reuse a pid while it is unreaped or still names a live group; we get here with the
    // child unreaped or with its pipes still held, almost always by a member of its group, so the id
    // cannot have passed to a stranger. An empty group makes the call fail with ESRCH.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// The first [`OUTPUT_LIMIT`] bytes of a stream, which is still read to its end so that the hook
/// never blocks on a full pipe.
#[derive(Default)]
struct Output {
    kept: Vec<u8>,
    total: usize,
}

impl Output {
    async fn read(&mut self, stream: Option<impl AsyncRead + Unpin>) {
        let Some(mut stream) = stream else { return };
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let room = OUTPUT_LIMIT.saturating_sub(self.kept.len());
                    self.kept.extend_from_slice(&buf[..n.min(room)]);
                    self.total += n;
                }
            }
        }
    }

    fn text(&self) -> String {
        let mut text = String::from_utf8_lossy(&self.kept).trim_end().to_string();
        if self.total > self.kept.len() {
            text.push_str(&format!(" [{} more bytes]", self.total - self.kept.len()));
        }
        text
    }
}
