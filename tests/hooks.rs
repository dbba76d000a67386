//! Rollback hooks through the library API: real child processes for `exec`, a real HTTP receiver on
//! an ephemeral port for `webhook`.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{eventually, unique, within, WAIT};
use driftguard::config::{Dur, Hook, HookEvent, HookKind};
use driftguard::rollback::hooks::{HookContext, HookOutcome, HookRunner};
use driftguard::telemetry::metrics::Metrics;
use hmac::{Hmac, Mac};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::IntCounterVec;
use serde_json::json;
use sha2::Sha256;
use tokio::sync::mpsc;

const SECRET_ENV: &str = "DRIFTGUARD_TEST_HOOK_SECRET";
const SECRET: &str = "correct horse battery staple";

/// Every test calls this first, so the env var is set before any test spawns a process or reads it.
/// Hook log lines go to the test's captured output, shown when it fails.
fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::env::set_var(SECRET_ENV, SECRET));
    let _ = tracing_subscriber::fmt()
        .with_env_filter("driftguard=debug")
        .with_test_writer()
        .try_init();
}

fn hook(name: &str, kind: HookKind) -> Hook {
    Hook {
        name: name.into(),
        kind,
        command: Vec::new(),
        url: String::new(),
        secret_env: String::new(),
        timeout: Dur(Duration::from_secs(10)),
        retries: 0,
        on: vec![
            HookEvent::Tripped,
            HookEvent::Recovered,
            HookEvent::Escalated,
        ],
        ca_file: String::new(),
        trust: Default::default(),
    }
}

fn exec_hook(name: &str, argv: &[&str]) -> Hook {
    Hook {
        command: argv.iter().map(|s| s.to_string()).collect(),
        ..hook(name, HookKind::Exec)
    }
}

fn webhook(name: &str, addr: SocketAddr) -> Hook {
    Hook {
        url: format!("http://{addr}/hook"),
        ..hook(name, HookKind::Webhook)
    }
}

fn context(event: HookEvent) -> Arc<HookContext> {
    Arc::new(HookContext {
        event,
        rule: "retrieval_drift_p95".into(),
        probe: "retrieval".into(),
        lever: "alias".into(),
        arm: "canary".into(),
        snapshot_path: Some(PathBuf::from("/var/lib/driftguard/snapshots/1.json")),
        snapshot: json!({"rule": "retrieval_drift_p95", "observed": 0.41, "threshold": 0.15, "arms": ["baseline", "canary"]}),
    })
}

/// A runner over `hooks` with its own `driftguard_hook_runs_total`.
fn runner(hooks: Vec<Hook>) -> (HookRunner, IntCounterVec) {
    let runs = Metrics::new().hook_runs;
    (HookRunner::new(hooks, runs.clone()), runs)
}

fn count(runs: &IntCounterVec, hook: &str, outcome: &str) -> u64 {
    runs.with_label_values(&[hook, outcome]).get()
}

/// Fires `ctx` and waits for every run.
async fn fire(runner: &HookRunner, ctx: Arc<HookContext>) -> Vec<HookOutcome> {
    let mut outcomes = Vec::new();
    for handle in runner.fire(ctx) {
        outcomes.push(within(WAIT, "hook run", handle).await.expect("hook task"));
    }
    outcomes
}

/// Whether a process is gone: no /proc entry, or a zombie (killed, left for an init that may not
/// reap in a container).
fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn read_pid(path: &Path) -> u32 {
    let text = std::fs::read_to_string(path).expect("the hook wrote its pid");
    text.trim().parse().expect("a pid")
}

// === exec ===

#[tokio::test]
async fn exec_hook_gets_its_context_in_env() {
    init();
    let out = unique("hook-env");
    let out_arg = out.to_str().expect("utf-8 temp path");
    let (runner, runs) = runner(vec![exec_hook(
        "env-dump",
        &["/bin/sh", "-c", "env > \"$0\"", out_arg],
    )]);

    assert_eq!(
        fire(&runner, context(HookEvent::Tripped)).await,
        [HookOutcome::Ok]
    );
    let env = std::fs::read_to_string(&out).expect("hook output");
    for line in [
        "DRIFTGUARD_EVENT=tripped",
        "DRIFTGUARD_RULE=retrieval_drift_p95",
        "DRIFTGUARD_PROBE=retrieval",
        "DRIFTGUARD_LEVER=alias",
        "DRIFTGUARD_ARM=canary",
        "DRIFTGUARD_SNAPSHOT=/var/lib/driftguard/snapshots/1.json",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} missing in:\n{env}");
    }

    let mut ctx = (*context(HookEvent::Escalated)).clone();
    ctx.snapshot_path = None;
    assert_eq!(fire(&runner, Arc::new(ctx)).await, [HookOutcome::Ok]);
    let env = std::fs::read_to_string(&out).expect("hook output");
    assert!(
        env.lines().any(|l| l == "DRIFTGUARD_EVENT=escalated"),
        "{env}"
    );
    assert!(env.lines().any(|l| l == "DRIFTGUARD_SNAPSHOT="), "{env}");

    assert_eq!(count(&runs, "env-dump", "ok"), 2);
    assert_eq!(count(&runs, "env-dump", "failed"), 0);
    assert_eq!(count(&runs, "env-dump", "timeout"), 0);
    let _ = std::fs::remove_file(out);
}

#[tokio::test]
async fn exec_hook_past_its_timeout_is_killed_and_reaped() {
    init();
    let pid_file = unique("hook-pid");
    let mut sleeper = exec_hook(
        "sleeper",
        &[
            "/bin/sh",
            "-c",
            "echo $$ > \"$0\"; exec sleep 30",
            pid_file.to_str().expect("utf-8 temp path"),
        ],
    );
    sleeper.timeout = Dur(Duration::from_secs(1));
    let (runner, runs) = runner(vec![sleeper]);

    let started = Instant::now();
    let handles = runner.fire(context(HookEvent::Tripped));
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "fire() must not wait for the hook"
    );
    assert_eq!(handles.len(), 1);
    assert!(!handles[0].is_finished());
    for handle in handles {
        let outcome = within(WAIT, "timed-out hook", handle).await.expect("task");
        assert_eq!(outcome, HookOutcome::Timeout);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    // Reaped, not merely signalled: no zombie left behind either.
    let pid = read_pid(&pid_file);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "hook process {pid} still exists"
    );
    assert_eq!(count(&runs, "sleeper", "timeout"), 1);
    assert_eq!(count(&runs, "sleeper", "ok"), 0);
    let _ = std::fs::remove_file(pid_file);
}

#[tokio::test]
async fn exec_timeout_kills_what_the_hook_started() {
    init();
    let pid_file = unique("hook-child-pid");
    let mut script = exec_hook(
        "script",
        &[
            "/bin/sh",
            "-c",
            "sleep 30 & echo $! > \"$0\"; wait",
            pid_file.to_str().expect("utf-8 temp path"),
        ],
    );
    script.timeout = Dur(Duration::from_secs(1));
    let (runner, _runs) = runner(vec![script]);

    assert_eq!(
        fire(&runner, context(HookEvent::Tripped)).await,
        [HookOutcome::Timeout]
    );
    let pid = read_pid(&pid_file);
    eventually(WAIT, "background sleep killed", || async {
        is_gone(pid).then_some(())
    })
    .await;
    let _ = std::fs::remove_file(pid_file);
}

#[tokio::test]
async fn exec_missing_binary_or_nonzero_exit_fails() {
    init();
    let (runner, runs) = runner(vec![
        exec_hook("missing", &["/nonexistent/driftguard-hook", "--flag"]),
        exec_hook("exit3", &["/bin/sh", "-c", "echo oops >&2; exit 3"]),
    ]);
    assert_eq!(
        fire(&runner, context(HookEvent::Tripped)).await,
        [HookOutcome::Failed, HookOutcome::Failed]
    );
    assert_eq!(count(&runs, "missing", "failed"), 1);
    assert_eq!(count(&runs, "exit3", "failed"), 1);
    assert_eq!(count(&runs, "exit3", "ok"), 0);
}

#[tokio::test]
async fn exec_hook_with_loud_output_does_not_block() {
    init();
    // 1 MiB on stdout: far past both the pipe buffer and the kept 4 KiB.
    let (runner, _runs) = runner(vec![exec_hook(
        "loud",
        &["/bin/sh", "-c", "head -c 1048576 /dev/zero"],
    )]);
    assert_eq!(
        fire(&runner, context(HookEvent::Tripped)).await,
        [HookOutcome::Ok]
    );
}

// === webhook ===

/// What the receiver answers to its n-th request (from 0).
#[derive(Clone, Copy)]
enum Answer {
    Status(u16),
    /// Never answers.
    Hang,
}

struct Received {
    headers: HeaderMap,
    body: Bytes,
}

/// An HTTP/1.1 receiver on 127.0.0.1:0; every request is sent to the returned channel.
async fn receiver(
    answer: impl Fn(usize) -> Answer + Send + Sync + 'static,
) -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    let answer = Arc::new(answer);
    let seen = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (tx, answer, seen) = (tx.clone(), answer.clone(), seen.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (tx, answer, seen) = (tx.clone(), answer.clone(), seen.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let n = seen.fetch_add(1, Ordering::SeqCst);
                        let _ = tx.send(Received {
                            headers: parts.headers,
                            body,
                        });
                        match answer(n) {
                            Answer::Status(code) => Ok::<_, Infallible>(
                                Response::builder()
                                    .status(code)
                                    .body(Full::new(Bytes::from_static(b"receiver says hi")))
                                    .expect("response"),
                            ),
                            Answer::Hang => std::future::pending().await,
                        }
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, rx)
}

fn drain(rx: &mut mpsc::UnboundedReceiver<Received>) -> Vec<Received> {
    let mut all = Vec::new();
    while let Ok(r) = rx.try_recv() {
        all.push(r);
    }
    all
}

#[tokio::test]
async fn webhook_posts_the_signed_snapshot() {
    init();
    let (addr, mut rx) = receiver(|_| Answer::Status(204)).await;
    let mut signed = webhook("signed", addr);
    signed.secret_env = SECRET_ENV.into();
    let (runner, runs) = runner(vec![signed]);
    let ctx = context(HookEvent::Tripped);

    assert_eq!(fire(&runner, ctx.clone()).await, [HookOutcome::Ok]);
    let received = drain(&mut rx);
    assert_eq!(received.len(), 1);
    let r = &received[0];
    assert_eq!(r.body, serde_json::to_vec(&ctx.snapshot).expect("json"));
    let header = |name: &str| {
        r.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(header("content-type"), "application/json");
    assert_eq!(header("x-driftguard-event"), "tripped");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(&r.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(header("x-driftguard-signature"), expected);
    assert_eq!(count(&runs, "signed", "ok"), 1);
}

#[tokio::test]
async fn webhook_without_a_secret_is_unsigned() {
    init();
    let (addr, mut rx) = receiver(|_| Answer::Status(200)).await;
    let mut unset = webhook("unset-secret", addr);
    unset.secret_env = "DRIFTGUARD_TEST_HOOK_SECRET_NOT_SET".into();
    let (runner, _runs) = runner(vec![webhook("plain", addr), unset]);
    assert_eq!(
        fire(&runner, context(HookEvent::Recovered)).await,
        [HookOutcome::Ok, HookOutcome::Ok]
    );
    let received = drain(&mut rx);
    assert_eq!(received.len(), 2);
    for r in received {
        assert!(r.headers.get("x-driftguard-signature").is_none());
        assert_eq!(r.headers["x-driftguard-event"], "recovered");
    }
}

#[tokio::test]
async fn webhook_retries_until_it_succeeds() {
    init();
    let (addr, mut rx) = receiver(|n| Answer::Status(if n < 2 { 500 } else { 200 })).await;
    let mut flaky = webhook("flaky", addr);
    flaky.retries = 3;
    let (runner, runs) = runner(vec![flaky]);

    assert_eq!(
        fire(&runner, context(HookEvent::Tripped)).await,
        [HookOutcome::Ok]
    );
    assert_eq!(drain(&mut rx).len(), 3, "two 500s, then the 200");
    assert_eq!(count(&runs, "flaky", "ok"), 1);
    assert_eq!(count(&runs, "flaky", "failed"), 0, "counted once per run");
}

#[tokio::test]
async fn webhook_gives_up_after_its_retries() {
    init();
    let (addr, mut rx) = receiver(|_| Answer::Status(503)).await;
    let mut down = webhook("down", addr);
    down.retries = 2;
    let (runner, runs) = runner(vec![down]);

    assert_eq!(
        fire(&runner, context(HookEvent::Tripped)).await,
        [HookOutcome::Failed]
    );
    assert_eq!(drain(&mut rx).len(), 3, "one attempt and two retries");
    assert_eq!(count(&runs, "down", "failed"), 1);
    assert_eq!(count(&runs, "down", "ok"), 0);
}

#[tokio::test]
async fn webhook_to_a_closed_port_fails() {
    init();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let (runner, runs) = runner(vec![webhook("nobody", closed)]);
    assert_eq!(
        fire(&runner, context(HookEvent::Tripped)).await,
        [HookOutcome::Failed]
    );
    assert_eq!(count(&runs, "nobody", "failed"), 1);
}

#[tokio::test]
async fn slow_webhook_times_out() {
    init();
    let (addr, mut rx) = receiver(|_| Answer::Hang).await;
    let mut slow = webhook("slow", addr);
    slow.timeout = Dur(Duration::from_millis(300));
    let (runner, runs) = runner(vec![slow]);

    let started = Instant::now();
    assert_eq!(
        fire(&runner, context(HookEvent::Tripped)).await,
        [HookOutcome::Timeout]
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(drain(&mut rx).len(), 1);
    assert_eq!(count(&runs, "slow", "timeout"), 1);
    assert_eq!(count(&runs, "slow", "failed"), 0);
}

// === filtering ===

#[tokio::test]
async fn hooks_fire_only_on_their_events() {
    init();
    let (addr, mut rx) = receiver(|_| Answer::Status(200)).await;
    let mut on_recovered = webhook("on-recovered", addr);
    on_recovered.on = vec![HookEvent::Recovered];
    let (runner, runs) = runner(vec![on_recovered, webhook("always", addr)]);

    assert_eq!(
        fire(&runner, context(HookEvent::Tripped)).await,
        [HookOutcome::Ok]
    );
    assert_eq!(drain(&mut rx).len(), 1);
    assert_eq!(count(&runs, "on-recovered", "ok"), 0);
    assert_eq!(count(&runs, "always", "ok"), 1);

    assert_eq!(
        fire(&runner, context(HookEvent::Recovered)).await,
        [HookOutcome::Ok, HookOutcome::Ok]
    );
    assert_eq!(drain(&mut rx).len(), 2);
    assert_eq!(count(&runs, "on-recovered", "ok"), 1);
    assert_eq!(count(&runs, "always", "ok"), 2);

    assert_eq!(
        fire(&runner, context(HookEvent::Escalated)).await,
        [HookOutcome::Ok]
    );
    assert_eq!(count(&runs, "on-recovered", "ok"), 1);
}
