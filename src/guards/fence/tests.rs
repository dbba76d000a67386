//! Unit tests of the fence: receipts, fingerprints, the embedded store.

use super::*;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

fn fingerprint(body: &str) -> Fingerprint {
    let mut hash = BodyHash::default();
    hash.update(body.as_bytes());
    Fingerprint {
        method: "POST".into(),
        path: "/ingest".into(),
        body_sha256: hash.finish(),
    }
}

fn receipt(body: &str, expires_ms: u64) -> Receipt {
    Receipt {
        request: fingerprint("{}"),
        status: 201,
        headers: vec![("content-type".into(), "application/json".into())],
        body_omitted: false,
        created_ms: 1,
        expires_ms,
        body: Bytes::from(body.to_string()),
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "driftguard-fence-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ))
}

fn fence(dir: &Path) -> Arc<Fence> {
    let metrics = Metrics::new();
    Arc::new(Fence::open(&Writes::default(), dir, &metrics).unwrap())
}

fn settings() -> FenceSettings {
    FenceSettings::from(&Writes::default())
}

#[test]
fn receipts_encode_and_decode() {
    let r = receipt("{\"id\":7}", 99);
    let bytes = r.encode();
    assert_eq!(Receipt::expires_of(&bytes), Some(99));
    assert_eq!(Receipt::decode(&bytes), Some(r));
    assert_eq!(Receipt::decode(&bytes[..10]), None);
}

#[test]
fn diff_names_only_the_fields_that_differ() {
    let a = fingerprint("{\"doc\":1}");
    let b = fingerprint("{\"doc\":2}");
    let diff = a.diff(&b);
    assert_eq!(diff.len(), 1);
    assert_eq!(
        diff["body_sha256"]["stored"].as_str().unwrap(),
        &a.body_sha256[..12]
    );
    let mut c = a.clone();
    c.path = "/docs".into();
    assert!(a.diff(&c).contains_key("path"));
    assert!(a.diff(&a).is_empty());
}

#[test]
fn embedded_store_expires_reports_duplicates_and_purges() {
    let dir = temp_dir("embedded");
    let path = dir.join(EMBEDDED_FILE);
    let db = Embedded::open(&path).unwrap();
    assert_eq!(db.get("k", 10).unwrap(), None);
    assert!(!db.put("k", &receipt("a", 100).encode(), 10).unwrap());
    assert_eq!(db.get("k", 50).unwrap().unwrap().body, "a");
    // A second live receipt for the key is a duplicate effect.
    assert!(db.put("k", &receipt("b", 100).encode(), 20).unwrap());
    assert_eq!(db.get("k", 100).unwrap(), None, "expired at 100");
    assert!(!db.put("k2", &receipt("c", 300).encode(), 150).unwrap());
    assert_eq!(db.purge(200).unwrap(), 1);
    assert!(db.get("k2", 200).unwrap().is_some());
    drop(db);
    // Reopened: the receipt is still there.
    let db = Embedded::open(&path).unwrap();
    assert_eq!(db.get("k2", 200).unwrap().unwrap().body, "c");
    drop(db);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn one_lead_then_waiters_replay_and_other_bodies_conflict() {
    let dir = temp_dir("flight");
    let fence = fence(&dir);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let lease = Duration::from_secs(10);
    let FenceOutcome::Lead(lead) = fence.admit("k", fingerprint("a"), deadline, lease).await else {
        panic!("first request leads");
    };
    // While it runs: another body conflicts at once, the same body waits.
    assert!(matches!(
        fence.admit("k", fingerprint("b"), deadline, lease).await,
        FenceOutcome::Conflict(_)
    ));
    let waiter = {
        let fence = fence.clone();
        tokio::spawn(async move { fence.admit("k", fingerprint("a"), deadline, lease).await })
    };
    tokio::task::yield_now().await;
    let mut headers = HeaderMap::new();
    headers.insert("x-request-id", HeaderValue::from_static("r1"));
    headers.insert("x-kept", HeaderValue::from_static("1"));
    let mut recording = lead.record(fingerprint("a"), StatusCode::CREATED, &headers, &settings());
    recording.push(&Bytes::from_static(b"done"));
    recording.finish(true);
    let FenceOutcome::Replay(receipt) = waiter.await.unwrap() else {
        panic!("the waiter replays");
    };
    assert_eq!(receipt.status, 201);
    assert_eq!(receipt.body, "done");
    assert_eq!(receipt.headers, [("x-kept".to_string(), "1".to_string())]);
    // Later arrivals replay from the store.
    assert!(matches!(
        fence.admit("k", fingerprint("a"), deadline, lease).await,
        FenceOutcome::Replay(_)
    ));
    assert_eq!(fence.decisions[0].get(), 1, "new");
    assert_eq!(fence.decisions[1].get(), 2, "replay");
    assert_eq!(fence.decisions[2].get(), 1, "conflict");
    assert_eq!(fence.decisions[3].get(), 1, "wait");
    assert_eq!(fence.duplicate_effects.get(), 0);
    drop(fence);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_dropped_lead_frees_the_key_and_a_broken_body_keeps_no_body() {
    let dir = temp_dir("release");
    let fence = fence(&dir);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let lease = Duration::from_secs(10);
    let FenceOutcome::Lead(lead) = fence.admit("k", fingerprint("a"), deadline, lease).await else {
        panic!("leads");
    };
    drop(lead);
    let FenceOutcome::Lead(lead) = fence.admit("k", fingerprint("a"), deadline, lease).await else {
        panic!("a released key leads again");
    };
    let mut recording = lead.record(
        fingerprint("a"),
        StatusCode::OK,
        &HeaderMap::new(),
        &settings(),
    );
    recording.push(&Bytes::from_static(b"half"));
    drop(recording);
    let receipt = eventually_replay(&fence, deadline).await;
    assert!(receipt.body_omitted);
    assert!(receipt.body.is_empty());
    drop(fence);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_waiter_gives_up_at_its_deadline() {
    let dir = temp_dir("deadline");
    let fence = fence(&dir);
    let far = tokio::time::Instant::now() + Duration::from_secs(10);
    let FenceOutcome::Lead(_lead) = fence
        .admit(
            "k",
            fingerprint("a"),
            far,
            far - tokio::time::Instant::now(),
        )
        .await
    else {
        panic!("leads");
    };
    let soon = tokio::time::Instant::now() + Duration::from_millis(50);
    assert!(matches!(
        fence
            .admit("k", fingerprint("a"), soon, Duration::from_secs(1))
            .await,
        FenceOutcome::StillInFlight
    ));
    drop(fence);
    let _ = std::fs::remove_dir_all(dir);
}

async fn eventually_replay(fence: &Arc<Fence>, deadline: tokio::time::Instant) -> Arc<Receipt> {
    loop {
        match fence
            .admit("k", fingerprint("a"), deadline, Duration::from_secs(1))
            .await
        {
            FenceOutcome::Replay(r) => return r,
            FenceOutcome::Lead(_) => {
                assert!(tokio::time::Instant::now() < deadline, "no receipt");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            _ => panic!("unexpected decision"),
        }
    }
}

/// A store on an in-memory redb backend, for tests that need no file.
fn memory_store() -> Embedded {
    Embedded::with_opener(
        "memory".into(),
        Box::new(|| {
            redb::Builder::new().create_with_backend(redb::backends::InMemoryBackend::new())
        }),
    )
    .unwrap()
}

#[test]
fn the_purge_deletes_in_bounded_rounds_and_leaves_nothing_expired() {
    let store = memory_store();
    let (now, expired_at, live_at) = (1_000, 500, 10_000);
    // Expired receipts interleaved with live ones (every 7th key), more than two rounds' worth.
    let total = 2 * embedded::PURGE_BATCH + 300;
    let mut expired = 0;
    for i in 0..total {
        let at = if i % 7 == 0 { live_at } else { expired_at };
        expired += usize::from(at == expired_at);
        store
            .put(&format!("k{i:05}"), &receipt("r", at).encode(), 1)
            .unwrap();
    }

    // Each round deletes at most PURGE_BATCH, and the rounds together reach the end of the table.
    let mut rounds = Vec::new();
    let mut from: Option<String> = None;
    loop {
        let batch = store.purge_batch(now, from.as_deref()).unwrap();
        rounds.push(batch.removed);
        match batch.next {
            Some(key) => from = Some(key),
            None => break,
        }
    }
    assert!(
        rounds.iter().all(|&n| n <= embedded::PURGE_BATCH),
        "{rounds:?}"
    );
    assert_eq!(rounds[0], embedded::PURGE_BATCH, "{rounds:?}");
    assert_eq!(rounds.iter().sum::<usize>(), expired, "{rounds:?}");

    // Nothing expired is left behind, and every live receipt is kept.
    assert_eq!(store.purge(now).unwrap(), 0);
    for i in 0..total {
        let kept = store.get(&format!("k{i:05}"), now).unwrap().is_some();
        assert_eq!(kept, i % 7 == 0, "key {i}");
    }
    assert_eq!(store.purge(live_at).unwrap(), total - expired);
}

#[test]
fn a_whole_purge_runs_every_round() {
    let store = memory_store();
    for i in 0..3 * embedded::PURGE_BATCH + 1 {
        store
            .put(&format!("k{i}"), &receipt("r", 10).encode(), 1)
            .unwrap();
    }
    assert_eq!(store.purge(20).unwrap(), 3 * embedded::PURGE_BATCH + 1);
    assert_eq!(store.purge(20).unwrap(), 0);
}

/// A redb backend over shared memory whose writes fail while `full` is set: a disk that fills up and
/// empties again, injected through the store's opener (runs anywhere, no tmpfs needed).
#[derive(Debug)]
struct FlakyDisk {
    inner: Arc<redb::backends::InMemoryBackend>,
    full: Arc<std::sync::atomic::AtomicBool>,
}

impl FlakyDisk {
    fn check(&self) -> Result<(), std::io::Error> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            Err(std::io::Error::other("No space left on device"))
        } else {
            Ok(())
        }
    }
}

impl redb::StorageBackend for FlakyDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, std::io::Error> {
        self.inner.read(offset, len)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self, eventual: bool) -> Result<(), std::io::Error> {
        self.check()?;
        self.inner.sync_data(eventual)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.check()?;
        self.inner.write(offset, data)
    }
}

#[test]
fn the_embedded_store_reopens_itself_after_a_failed_write() {
    let memory = Arc::new(redb::backends::InMemoryBackend::new());
    let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (m, f) = (memory.clone(), full.clone());
    let store = Embedded::with_opener(
        "flaky".into(),
        Box::new(move || {
            redb::Builder::new().create_with_backend(FlakyDisk {
                inner: m.clone(),
                full: f.clone(),
            })
        }),
    )
    .unwrap();
    let now = 1_000;
    store
        .put("k0", &receipt("a", 10_000).encode(), now)
        .unwrap();

    full.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(store
        .put("k1", &receipt("b", 10_000).encode(), now)
        .is_err());

    // Space is back: no "Previous I/O error" — the store reopened and both reads and writes work.
    full.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(store.get("k0", now).unwrap().unwrap().body, "a");
    assert!(!store
        .put("k1", &receipt("b", 10_000).encode(), now)
        .unwrap());
    assert_eq!(store.get("k1", now).unwrap().unwrap().body, "b");
}

#[test]
fn a_purge_reuses_the_pages_it_frees_instead_of_growing_the_file() {
    // Keys arrive, expire and are purged, round after round: the store holds at most two rounds of
    // keys, so its file must stay near the size two rounds need. Purged in one transaction, the first
    // purge alone grew it to 10x the size of one round (measured: 2.8 -> 28.3 MB here).
    let memory = Arc::new(redb::backends::InMemoryBackend::new());
    let m = memory.clone();
    let store = Embedded::with_opener(
        "memory".into(),
        Box::new(move || {
            redb::Builder::new().create_with_backend(FlakyDisk {
                inner: m.clone(),
                full: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            })
        }),
    )
    .unwrap();
    let file_kb = || redb::StorageBackend::len(&*memory).unwrap() / 1024;
    let body = "x".repeat(300);
    let mut one_round_kb = 0;
    for round in 0..4u64 {
        for _ in 0..2_000 {
            let key = format!("{:016x}", fastrand::u64(..));
            let expires = (round + 1) * 100 + 50;
            store
                .put(&key, &receipt(&body, expires).encode(), 1)
                .unwrap();
        }
        if round == 0 {
            one_round_kb = file_kb();
        }
        // Deletes the previous round's keys.
        store.purge((round + 1) * 100).unwrap();
    }
    let kb = file_kb();
    assert!(
        kb <= 4 * one_round_kb,
        "the file grew to {kb} KiB; one round of keys took {one_round_kb} KiB"
    );
}
