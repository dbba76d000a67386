//! The script against a real redis-server (skipped with a message when none is installed, outside CI):
//! the same exact token counts as LocalBudget, settings per call, the TAT rebase, and the backoff.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;
use crate::config::{Budget as BudgetConfig, BudgetBackend, Dur};

/// A private redis-server on a free loopback port, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start() -> Option<Server> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(std::env::var_os("CI").is_none(), "redis-server is missing");
            eprintln!("skipped: redis-server is not installed");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let server = Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    fn config(&self, tokens_per_minute: u64, burst: u64, on_error: OnBackendError) -> BudgetConfig {
        BudgetConfig {
            tokens_per_minute,
            burst,
            backend: BudgetBackend::Redis,
            redis_url: format!("redis://127.0.0.1:{}", self.port),
            redis_key: "test:budget".into(),
            redis_timeout: Dur(Duration::from_secs(2)),
            on_backend_error: on_error,
            ..BudgetConfig::default()
        }
    }

    async fn cmd(&self, args: &[&str]) -> redis::Value {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd(args[0])
            .arg(&args[1..])
            .query_async(&mut conn)
            .await
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn counter() -> IntCounter {
    IntCounter::new("errors", "test").unwrap()
}

/// One token per second, so the few ms the test takes refill nothing.
#[tokio::test]
async fn a_fresh_budget_admits_exactly_burst_then_tells_when() {
    let Some(server) = Server::start() else {
        return;
    };
    let budget =
        RedisBudget::new(&server.config(60, 10, OnBackendError::Closed), counter()).unwrap();
    for i in 0..10 {
        assert_eq!(
            budget.admit(1).await,
            Ok(BudgetAdmission::Admitted(Reservation { tokens: 1 })),
            "token {i}"
        );
    }
    assert_eq!(budget.available(), 0);
    match budget.admit(3).await {
        Ok(BudgetAdmission::OverBudget { retry_after }) => assert!(
            retry_after > Duration::from_millis(2500) && retry_after <= Duration::from_secs(3),
            "3 tokens at 1/s: {retry_after:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        budget.admit(11).await,
        Ok(BudgetAdmission::TooLarge {
            tokens: 11,
            burst: 10
        })
    );
    // A refund lands in a task; the next answer shows it.
    budget.reconcile(5, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while budget.admit(0).await.is_ok() && budget.available() < 5 {
        assert!(Instant::now() < deadline, "the refund never landed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(budget.available(), 5);
    // Settings travel with the call: with a burst of 5 the 5 tokens still owed leave no room.
    budget.set_settings(BudgetSettings {
        tokens_per_minute: 60,
        burst: 5,
    });
    assert!(matches!(
        budget.admit(1).await,
        Ok(BudgetAdmission::OverBudget { .. })
    ));
    // The key's expiry follows the TAT (about 5 s ahead at 1 token/s, plus 1 s).
    match server.cmd(&["PTTL", "test:budget"]).await {
        redis::Value::Int(ms) => assert!((4_000..=6_100).contains(&ms), "PTTL {ms}"),
        other => panic!("PTTL {other:?}"),
    }
}

/// Time zero moves forward every hour; what is owed stays owed.
#[tokio::test]
async fn an_old_epoch_is_rebased_without_losing_the_tat() {
    let Some(server) = Server::start() else {
        return;
    };
    let sec = match server.cmd(&["TIME"]).await {
        redis::Value::Array(v) => match &v[0] {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).parse::<u64>().unwrap(),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    // Two hours ago as time zero, TAT 5 s (plus up to 1 s of this second) ahead of now.
    let epoch = (sec - 7200).to_string();
    let tat = ((7200 + 6) * 1_000_000_000u64).to_string();
    server
        .cmd(&["HSET", "test:budget", "epoch", &epoch, "tat", &tat])
        .await;
    let budget =
        RedisBudget::new(&server.config(60, 10, OnBackendError::Closed), counter()).unwrap();
    assert_eq!(
        budget.admit(0).await,
        Ok(BudgetAdmission::Admitted(Reservation { tokens: 0 }))
    );
    let available = budget.available();
    assert!((4..=5).contains(&available), "available {available}");
    match server.cmd(&["HGET", "test:budget", "epoch"]).await {
        redis::Value::BulkString(b) => {
            let stored: u64 = String::from_utf8_lossy(&b).parse().unwrap();
            assert!(stored >= sec, "epoch {stored} not rebased (now {sec})");
        }
        other => panic!("{other:?}"),
    }
}

/// Nobody listening: "closed" refuses, "open" admits; after the first failure Redis is left alone for the
/// backoff, so the second call costs no attempt.
#[tokio::test]
async fn an_unreachable_redis_follows_on_backend_error_and_backs_off() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    for (on_error, expected) in [
        (OnBackendError::Closed, BackendDown::Refuse),
        (OnBackendError::Open, BackendDown::Admit),
    ] {
        let c = BudgetConfig {
            backend: BudgetBackend::Redis,
            redis_url: format!("redis://127.0.0.1:{port}"),
            redis_timeout: Dur(Duration::from_millis(200)),
            on_backend_error: on_error,
            ..BudgetConfig::default()
        };
        let errors = counter();
        let budget = RedisBudget::new(&c, errors.clone()).unwrap();
        let started = Instant::now();
        assert_eq!(budget.admit(1).await, Err(expected));
        assert_eq!(budget.admit(1).await, Err(expected));
        assert!(started.elapsed() < Duration::from_secs(2));
        // The warm-up and the first admission may both have tried; the second was skipped.
        let failed = errors.get();
        assert!((1..=2).contains(&failed), "{failed} failed calls");
    }
}

/// A Redis that does not answer in time is a failure too: the request waits `redis_timeout`, not Redis.
#[tokio::test]
async fn a_slow_redis_times_out() {
    let Some(server) = Server::start() else {
        return;
    };
    let mut c = server.config(60, 10, OnBackendError::Open);
    c.redis_timeout = Dur(Duration::from_millis(100));
    let errors = counter();
    let budget = RedisBudget::new(&c, errors.clone()).unwrap();
    // Connected and the script loaded while Redis is still quick.
    let deadline = Instant::now() + Duration::from_secs(10);
    while budget.admit(0).await.is_err() {
        assert!(Instant::now() < deadline, "Redis never answered");
        tokio::time::sleep(BACKOFF).await;
    }
    let before = errors.get();
    server.cmd(&["CLIENT", "PAUSE", "3000", "ALL"]).await;
    let started = Instant::now();
    assert_eq!(budget.admit(1).await, Err(BackendDown::Admit));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_secs(2),
        "waited {waited:?}"
    );
    assert_eq!(errors.get(), before + 1);
}
