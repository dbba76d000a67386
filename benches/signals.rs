//! Micro-benchmark of one signals evaluation (SPEC §3) with the built-in `hashed` embedder, through the
//! code the proxy runs — not a copy of it.
//!
//! `cargo bench --bench signals`
//!
//! - `pipeline/hashed`: the whole path of a sampled exchange after the response completed: the proxy's
//!   `Pipeline::submit` (queue, byte accounting, wake-up) and a real evaluation thread that extracts the
//!   question, chunks and answer from the JSON bodies (the default pointers), embeds the question
//!   (~100 bytes), 5 retrieved chunks (~600 bytes each) and the answer (~400 bytes, also the anchor),
//!   measures the ΔS probes, coverage and λ, and records them into the arm's window and metrics. Timed
//!   as batches of up to 4096 submitted and flushed (the flush is woken by the worker when it finds the
//!   queue empty, so no polling interval is added); reported per sample. Target: ≥ 50,000
//!   evaluations/s on one core (≤ 20 µs each).
//! - `evaluate/hashed`: the same extraction and scoring calls a worker makes (`Extractor::gather`,
//!   `Evaluator::score`) without the queue and recording.
//! - `embed/chunk_600b`, `coverage/answer_vs_5_chunks`: the two big parts on their own.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use driftguard::capture::Capture;
use driftguard::config::Signals;
use driftguard::eval::{Evaluator, Pipeline, Sample};
use driftguard::signals::embed::Hashed;
use driftguard::signals::measure::coverage;
use driftguard::telemetry::metrics::Metrics;
use driftguard::windows::Counter;

const QUESTION: &str = "How do I roll back the canary when the index alias points at the wrong \
                        version of the documents?";

const CHUNKS: [&str; 5] = [
    "Rolling back a canary release starts with setting its traffic weight to zero. The router keeps \
     one immutable routing table and swaps it atomically, so no request ever sees half a change. \
     Once the weight is zero, new sessions land on the baseline arm, while sticky users are moved \
     on their next request. Operators should capture a snapshot before acting: the pins of every \
     arm, the window statistics and the last samples of the quality signals are what the \
     post-incident review will need. Writes are frozen first so that no duplicate side effects \
     reach the document store while traffic moves between the two arms of the deployment.",
    "The index alias is a pointer from a stable name, such as docs_current, to one physical index \
     version. Re-indexing builds a new version next to the old one and flips the alias when the \
     build is verified. If the alias points at the wrong version, answers cite passages that no \
     longer exist or miss new ones entirely. The fix is to flip the alias back to the last known \
     good version, recorded as INDEX_HASH in the version pins, and to rotate the cache namespace \
     so that cached answers computed against the bad index are never served again to any user. The previous version is kept for a week for exactly this reason.",
    "Version pins are stamped on every request and response: BUILD_ID, GIT_SHA, MODEL_VER, \
     PROMPT_VER, INDEX_HASH and RERANK_CONF among others. When the upstream echoes its own pins \
     and one differs from what the proxy stamped, the mismatch is counted and can trip a rule on \
     its own. A mismatch on INDEX_HASH or INDEX_ALIAS usually means the retriever was pointed at a \
     different index than the one the release was tested with, and the alias lever is the right \
     response. Pins also key the cache, so rolling the alias back rotates the cache namespace. Dashboards show the pins next to every quality signal.",
    "Recovery is watched, not assumed. After a rollback the guard holds the system in a recovering \
     state until the exit targets have held for ten minutes: an error rate under half a percent, \
     semantic drift and evidence coverage within tolerance of the baseline, and tail latency no \
     more than fifteen percent above it. Only then do writers unfreeze and the throttle lift. If \
     the targets are not met before the deadline, the state escalates and the paging hooks fire \
     again with the snapshot attached, so that a human can decide what the next step should be. Every transition is logged and persisted to disk.",
    "Coverage measures how much of an answer is grounded in the retrieved passages: the share of \
     its content words, after stemming, that also appear in the chunks. A healthy retrieval \
     augmented service keeps coverage high because the model quotes and paraphrases its sources. \
     When the retriever drifts, for example after an embedding model upgrade or a tokenizer \
     change, coverage drops before users start to complain. Together with the drift of the \
     semantic distance and the convergence state of each session, it is a leading indicator. It is cheap to compute, needs no model and runs on every sample.",
];

const ANSWER: &str =
    "To roll back the canary, set its weight to zero so that the router sends all \
                      new traffic to the baseline arm, after capturing a snapshot and freezing \
                      writes. If the index alias points at the wrong version, flip the alias back \
                      to the last good INDEX_HASH from the version pins and rotate the cache \
                      namespace, so that no cached answer built on the bad index is served again. \
                      Then watch the exit targets until recovery holds.";

/// The request and response bodies of one RAG exchange, in the shapes the default pointers read.
fn bodies() -> (Bytes, Bytes) {
    let request = serde_json::json!({ "question": QUESTION });
    let contexts: Vec<_> = CHUNKS
        .iter()
        .enumerate()
        .map(|(i, c)| serde_json::json!({"id": format!("kb-{i}"), "text": c, "score": 0.8}))
        .collect();
    let response = serde_json::json!({
        "answer": ANSWER,
        "contexts": contexts,
        "usage": {"prompt_tokens": 900, "completion_tokens": 90},
    });
    (
        Bytes::from(request.to_string()),
        Bytes::from(response.to_string()),
    )
}

fn capture(body: &Bytes) -> Capture {
    let mut c = Capture::new(1 << 20);
    c.push(body);
    c
}

fn bench(c: &mut Criterion) {
    assert!(
        (90..=130).contains(&QUESTION.len()),
        "question {} bytes",
        QUESTION.len()
    );
    assert!(
        CHUNKS.iter().all(|c| (570..=650).contains(&c.len())),
        "chunk sizes"
    );
    assert!(
        (370..=430).contains(&ANSWER.len()),
        "answer {} bytes",
        ANSWER.len()
    );
    let (request, response) = bodies();
    let evaluator = Evaluator::from_config(&Signals::default()).expect("the default evaluator");
    let (extracted, skip) = evaluator
        .extractor
        .gather(&request, false, &response, false, false);
    assert!(skip.is_none(), "the bench's exchange is skipped: {skip:?}");
    assert_eq!(extracted.chunks.len(), CHUNKS.len());
    // The arm's document frequencies for retrieval coverage, as the worker keeps one per arm.
    let df = std::sync::Mutex::new(driftguard::signals::retrieval::DocFrequency::default());
    let scored = evaluator
        .score(&extracted, &df)
        .expect("hashed never fails");
    eprintln!("sample evaluation: {scored:?}");

    // The proxy's side and one evaluation thread, as `app` builds them.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let config = Signals {
        queue: 1 << 16,
        max_queue_bytes: 1 << 30,
        ..Signals::default()
    };
    let metrics = Metrics::new();
    let pipeline = Pipeline::start(&config, &metrics).expect("pipeline");
    let arm = metrics.arms.arm("main");
    let sample = |i: u64| Sample {
        arm: arm.clone(),
        request_id: format!("bench-{i}"),
        session: None,
        request: Some(capture(&request)),
        response: capture(&response),
        sse: false,
        at: Instant::now(),
        trace: None,
        place: pipeline
            .reserve()
            .expect("a place: batches stay within the queue's bound"),
    };
    // Whether the pipeline was measured: a filter (`cargo bench --bench signals -- evaluate`) skips it.
    let mut measured = false;
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(1));
    group.bench_function("hashed", |b| {
        measured = true;
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                // Batches within the queue's bound: a dropped sample would not be evaluated.
                let n = left.min(4096);
                left -= n;
                let batch: Vec<Sample> = (0..n).map(sample).collect();
                let started = Instant::now();
                for s in batch {
                    pipeline.submit(s);
                }
                assert!(
                    runtime.block_on(pipeline.flush(Duration::from_secs(60))),
                    "the pipeline did not drain"
                );
                elapsed += started.elapsed();
            }
            elapsed
        })
    });
    group.finish();
    // Every submitted sample was evaluated: none dropped or skipped.
    let evaluated = arm
        .window
        .stats(Instant::now(), Duration::from_secs(3600))
        .counter(Counter::Evaluated);
    let dropped = metrics.eval_dropped.get();
    eprintln!("pipeline: {evaluated} samples evaluated, {dropped} dropped");
    assert_eq!(dropped, 0, "samples dropped: the figure would be too good");
    assert!(evaluated > 0 || !measured, "nothing was evaluated");

    let mut group = c.benchmark_group("evaluate");
    group.throughput(Throughput::Elements(1));
    group.bench_function("hashed", |b| {
        b.iter(|| {
            let (extracted, _) = evaluator.extractor.gather(
                black_box(&request),
                false,
                black_box(&response),
                false,
                false,
            );
            evaluator
                .score(&extracted, &df)
                .expect("hashed never fails")
        })
    });
    group.finish();

    let mut group = c.benchmark_group("embed");
    group.throughput(Throughput::Bytes(CHUNKS[0].len() as u64));
    group.bench_function("chunk_600b", |b| {
        b.iter(|| Hashed.vector(black_box(CHUNKS[0])))
    });
    group.finish();

    let mut group = c.benchmark_group("coverage");
    group.bench_function("answer_vs_5_chunks", |b| {
        b.iter(|| coverage(black_box(ANSWER), black_box(&CHUNKS)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
