//! The two ΔS probes and retrieval coverage on real human-written text (the Python FAQ set of
//! tests/fixtures): how well each separates grounded exchanges from ungrounded answers and wrong
//! retrievals, with the default `hashed` embedder and with `local` when its model is there.

mod common;

use common::corpus::{self, auc, exchange, quantile, Item, Pairing};
use driftguard::config::{EmbedderKind, Signals};
use driftguard::eval::Evaluator;
use driftguard::signals::embed::Hashed;
use driftguard::signals::extract::Extracted;
use driftguard::signals::measure;
use driftguard::signals::retrieval::DocFrequency;
use std::sync::Mutex;

struct Scores {
    qr: Vec<f64>,
    ra: Vec<f64>,
    max: Vec<f64>,
    coverage: Vec<f64>,
    retrieval_coverage: Vec<f64>,
}

fn score(evaluator: &Evaluator, items: &[Item], pairing: Pairing) -> Scores {
    let mut s = Scores {
        qr: vec![],
        ra: vec![],
        max: vec![],
        coverage: vec![],
        retrieval_coverage: vec![],
    };
    let df = Mutex::new(DocFrequency::new());
    for i in 0..items.len() {
        let x = exchange(items, i, pairing);
        let extracted = Extracted {
            question: Some(x.question.to_string()),
            chunks: x.chunks.to_vec(),
            answer: Some(x.answer.to_string()),
            ..Extracted::default()
        };
        let scored = evaluator.score(&extracted, &df).expect("scored");
        s.retrieval_coverage
            .push(scored.retrieval_coverage.unwrap_or(0.0));
        s.qr.push(scored.delta_s_qr);
        s.ra.push(scored.delta_s_ra);
        s.max.push(scored.delta_s);
        s.coverage.push(scored.coverage.unwrap_or(0.0));
    }
    s
}

fn evaluator(kind: EmbedderKind) -> Option<Evaluator> {
    let mut signals = Signals {
        embedder: kind,
        ..Signals::default()
    };
    if kind == EmbedderKind::Local {
        signals.local.model_dir = corpus::model_dir()?.display().to_string();
    }
    Some(Evaluator::from_config(&signals).expect("evaluator"))
}

fn line(name: &str, good: &[f64], bad: &[f64]) -> String {
    format!(
        "{name:<12} AUC {:.3}  good p50 {:.3} p95 {:.3}  bad p50 {:.3} p95 {:.3} p5 {:.3}",
        auc(good, bad),
        quantile(good, 0.5),
        quantile(good, 0.95),
        quantile(bad, 0.5),
        quantile(bad, 0.95),
        quantile(bad, 0.05),
    )
}

/// The `hashed` probes before calibration (the raw lexical ΔS).
fn raw_hashed(items: &[Item], pairing: Pairing) -> (Vec<f64>, Vec<f64>) {
    let h = Hashed;
    (0..items.len())
        .map(|i| {
            let x = exchange(items, i, pairing);
            let chunks: Vec<Vec<f32>> = x.chunks.iter().map(|c| h.vector(c)).collect();
            let d = measure::delta_s_probes(&h.vector(x.question), &chunks, &h.vector(x.answer));
            (d.qr, d.ra)
        })
        .unzip()
}

#[test]
fn separation_report() {
    let items = corpus::items();
    let (gq, ga) = raw_hashed(&items, Pairing::Grounded);
    let (_, ua) = raw_hashed(&items, Pairing::UngroundedAnswer);
    let (wq, _) = raw_hashed(&items, Pairing::WrongRetrieval);
    println!("== hashed before calibration");
    println!("{}", line("qr/wrong", &gq, &wq));
    println!("{}", line("ra/ungr", &ga, &ua));
    for kind in [EmbedderKind::Hashed, EmbedderKind::Local] {
        let Some(ev) = evaluator(kind) else { continue };
        let g = score(&ev, &items, Pairing::Grounded);
        let u = score(&ev, &items, Pairing::UngroundedAnswer);
        let w = score(&ev, &items, Pairing::WrongRetrieval);
        println!("== {kind:?} ({} items)", items.len());
        println!("ungrounded answer:");
        println!("{}", line("qr", &g.qr, &u.qr));
        println!("{}", line("ra", &g.ra, &u.ra));
        println!("{}", line("max", &g.max, &u.max));
        let neg = |v: &[f64]| v.iter().map(|x| 1.0 - x).collect::<Vec<_>>();
        println!(
            "{}",
            line("1-coverage", &neg(&g.coverage), &neg(&u.coverage))
        );
        println!("wrong retrieval:");
        println!(
            "{}",
            line(
                "1-ret_cov",
                &neg(&g.retrieval_coverage),
                &neg(&w.retrieval_coverage)
            )
        );
        println!("{}", line("qr", &g.qr, &w.qr));
        println!("{}", line("ra", &g.ra, &w.ra));
        println!("{}", line("max", &g.max, &w.max));
    }
}

// ================================================================================================
// End to end: two arms of a RAG service answering from the real-text set, ~100 req/s
// ================================================================================================

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// How an arm of the test RAG service answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Healthy,
    /// Every second request retrieves another item's chunks and answers faithfully from them.
    HalfWrongRetrieval,
    /// Every third request answers with another item's answer over the right chunks.
    ThirdUngrounded,
}

/// A RAG service answering the set's questions, `{"answer", "contexts":[{"text"}], "usage"}`.
fn rag_arm(name: &str, items: Arc<Vec<Item>>, mode: Mode) -> Scripted {
    let index: HashMap<String, usize> = items
        .iter()
        .enumerate()
        .map(|(i, item)| (item.question.clone(), i))
        .collect();
    let calls = AtomicU64::new(0);
    Scripted::start(name, move |_, body| {
        let n = calls.fetch_add(1, Ordering::Relaxed);
        let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let i = parsed["question"]
            .as_str()
            .and_then(|q| index.get(q))
            .copied()
            .unwrap_or(0);
        let pairing = match mode {
            Mode::HalfWrongRetrieval if n.is_multiple_of(2) => Pairing::WrongRetrieval,
            Mode::ThirdUngrounded if n.is_multiple_of(3) => Pairing::UngroundedAnswer,
            _ => Pairing::Grounded,
        };
        let x = exchange(&items, i, pairing);
        let contexts: Vec<Value> = x.chunks.iter().map(|c| json!({"text": c})).collect();
        Canned::json(&json!({
            "answer": x.answer,
            "contexts": contexts,
            "usage": {"prompt_tokens": 400, "completion_tokens": 60},
        }))
    })
}

/// Request loops over the set's questions at about `rps` in total, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(proxy: &Proxy, items: &Arc<Vec<Item>>, rps: u64) -> Load {
        const CLIENTS: u64 = 4;
        let stop = Arc::new(AtomicBool::new(false));
        let pace = Duration::from_millis(1000 * CLIENTS / rps);
        let url = proxy.url("/v1/ask");
        let tasks = (0..CLIENTS)
            .map(|worker| {
                let (stop, url, items) = (stop.clone(), url.clone(), items.clone());
                tokio::spawn(async move {
                    let client = client();
                    let mut i = worker as usize * items.len() / CLIENTS as usize;
                    let mut next = tokio::time::Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        let body = json!({"question": items[i % items.len()].question});
                        i += 1;
                        post_json(&client, &url, &body, &[]).await;
                        next += pace;
                        tokio::time::sleep_until(next).await;
                    }
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Two arms at 50/50, the rules every 250 ms over `window` with `min_samples = 30`, the embedder named
/// by `signals` (a TOML fragment of `[signals]`). The p99 latency rule is out of reach: two test
/// upstreams on a shared host differ in their tails for reasons of their own.
fn two_arms(baseline: &str, canary: &str, window: &str, signals: &str) -> String {
    format!(
        r#"{LISTEN}
[signals]
{signals}
[rules]
window = "{window}"
eval_interval = "250ms"
min_samples = 30
[rules.hard]
p99_latency_ratio_over = 1000.0
[recovery]
hold = "1h"
deadline = "1h"
[rollback.alias]
INDEX_ALIAS = "docs_vA"
INDEX_HASH = "a1b2c3"

[[arms]]
name = "baseline"
upstream = "{baseline}"
weight = 50
baseline = true
pins = {{ INDEX_ALIAS = "docs_vA", INDEX_HASH = "a1b2c3" }}

[[arms]]
name = "canary"
upstream = "{canary}"
weight = 50
pins = {{ INDEX_ALIAS = "docs_vB", INDEX_HASH = "ffee01" }}
"#
    )
}

async fn status(client: &HttpClient, proxy: &Proxy) -> Value {
    get(client, &proxy.admin_url("/status"), &[]).await.json()
}

/// Drives the two arms at ~100 req/s until the guard trips (within `limit`); the trip and how long
/// after the load started it came.
async fn trip_of(canary: Mode, signals: &str, limit: Duration) -> (Value, Duration) {
    let items = Arc::new(corpus::items());
    let baseline = rag_arm("baseline", items.clone(), Mode::Healthy);
    let canary = rag_arm("canary", items.clone(), canary);
    let proxy = Proxy::start(&two_arms(&baseline.url(), &canary.url(), "60s", signals));
    let client = client();
    let started = Instant::now();
    let load = Load::start(&proxy, &items, 100);
    let tripped = eventually(limit, "the guard trips", || async {
        let s = status(&client, &proxy).await;
        (s["guard"]["state"] == "tripped").then_some(s)
    })
    .await;
    let after = started.elapsed();
    load.stop().await;
    (tripped["guard"]["last_trip"].clone(), after)
}

/// The index returns another document for half of the questions, the answers faithful to what it
/// returned: coverage and ΔS(retrieved, answer) stay healthy, the retrieval probe does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_wrong_retrievals_trip_a_retrieval_rule_and_pull_alias() {
    let (trip, after) = trip_of(Mode::HalfWrongRetrieval, "", Duration::from_secs(30)).await;
    eprintln!("hashed, half wrong retrievals: {trip} after {after:?}");
    let rule = trip["rule"].as_str().unwrap_or_default();
    assert!(rule.starts_with("retrieval_"), "tripped by {trip}");
    assert_eq!(trip["probe"], "retrieval", "{trip}");
    assert_eq!(trip["lever"], "alias", "{trip}");
}

/// The same with the `local` MiniLM model. Bounded at 90 s, not 30: in a debug build on a shared
/// 2-core host the model evaluates about one exchange a second, so the canary reaches `min_samples`
/// evaluated answers late (measured: a trip 45 s in, p = 2·10⁻⁷ at the first judgement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs the all-MiniLM-L6-v2 model: needs target/fixtures/all-MiniLM-L6-v2 (fetched by .ci/run) or DRIFTGUARD_TEST_MODEL; run with --include-ignored"]
async fn half_wrong_retrievals_trip_a_retrieval_rule_with_the_local_model() {
    let dir = corpus::model_dir().expect("the all-MiniLM-L6-v2 model folder");
    let signals = format!(
        "embedder = \"local\"\nworkers = 2\n[signals.local]\nmodel_dir = \"{}\"\n",
        dir.display()
    );
    let (trip, after) = trip_of(Mode::HalfWrongRetrieval, &signals, Duration::from_secs(90)).await;
    eprintln!("local, half wrong retrievals: {trip} after {after:?}");
    let rule = trip["rule"].as_str().unwrap_or_default();
    assert!(rule.starts_with("retrieval_"), "tripped by {trip}");
    assert_eq!(trip["lever"], "alias", "{trip}");
}

/// A third of the answers are not supported by the (right) chunks: an answer rule, lever route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_ungrounded_trips_an_answer_rule_and_pulls_route() {
    let (trip, after) = trip_of(Mode::ThirdUngrounded, "", Duration::from_secs(30)).await;
    eprintln!("hashed, a third ungrounded: {trip} after {after:?}");
    let rule = trip["rule"].as_str().unwrap_or_default();
    assert!(rule.starts_with("answer_drift_"), "tripped by {trip}");
    assert_eq!(trip["probe"], "answer", "{trip}");
    assert_eq!(trip["lever"], "route", "{trip}");
}

/// Two healthy arms under the same load never trip. `DRIFTGUARD_HEALTHY_SECS` sets how long (45 s by
/// default, with a 10 s rule window so the run spans several independent windows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_arms_never_trip() {
    let secs = std::env::var("DRIFTGUARD_HEALTHY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let items = Arc::new(corpus::items());
    let baseline = rag_arm("baseline", items.clone(), Mode::Healthy);
    let canary = rag_arm("canary", items.clone(), Mode::Healthy);
    let proxy = Proxy::start(&two_arms(&baseline.url(), &canary.url(), "10s", ""));
    let client = client();
    let load = Load::start(&proxy, &items, 100);
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = status(&client, &proxy).await;
        assert_eq!(s["guard"]["state"], "healthy", "{}", s["guard"]);
    }
    load.stop().await;
    let s = status(&client, &proxy).await;
    let canary = &s["arms"][1]["window"]["signals"];
    eprintln!("healthy canary after {secs} s: {canary}");
    assert!(canary["evaluated"].as_u64().unwrap_or(0) > 300, "{canary}");
    assert!(
        canary["retrieval_coverage_mean"].as_f64().is_some(),
        "{canary}"
    );
    let (_, samples) = scrape(&client, &proxy).await;
    let trips: f64 = samples
        .iter()
        .filter(|s| s.name == "driftguard_trips_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(trips, 0.0);
    assert!(
        metric(
            &samples,
            "driftguard_retrieval_coverage_count",
            &[("arm", "canary")]
        )
        .unwrap_or(0.0)
            > 0.0
    );
}
