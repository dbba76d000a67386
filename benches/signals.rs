//! Micro-benchmark of one signals evaluation (SPEC §3) with the built-in `hashed` embedder.
//!
//! `cargo bench --bench signals`
//!
//! - `evaluate/hashed`: what a signals worker does per sampled request once the texts are extracted:
//!   embed the question (~100 bytes), 5 retrieved chunks (~600 bytes each) and the answer (~400 bytes,
//!   also the anchor), then the ΔS probes, coverage and λ from [qr, ra]. Reported: time per
//!   evaluation and evaluations/s on one core. Target: ≥ 25,000 evaluations/s (≤ 40 µs each).
//! - `embed/chunk_600b`, `coverage/answer_vs_5_chunks`: the two big parts on their own.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use driftguard::signals::embed::{Embedder, Hashed};
use driftguard::signals::measure::{coverage, delta_s_probes, lambda, DeltaS, Lambda};

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

fn evaluate(
    embedder: &dyn Embedder,
    question: &str,
    chunks: &[&str],
    answer: &str,
) -> (DeltaS, Option<f64>, Lambda) {
    let mut texts = Vec::with_capacity(chunks.len() + 2);
    texts.push(question);
    texts.extend_from_slice(chunks);
    texts.push(answer);
    let mut vectors = embedder.embed_batch(&texts).expect("hashed never fails");
    let answer_vector = vectors.pop().expect("one vector per text");
    let question_vector = vectors.remove(0);
    let probes = delta_s_probes(&question_vector, &vectors, &answer_vector);
    let covered = coverage(answer, chunks);
    (probes, covered, lambda(probes.qr, probes.ra))
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
    let (probes, covered, state) = evaluate(&Hashed, QUESTION, &CHUNKS, ANSWER);
    eprintln!(
        "sample evaluation: {probes:?}, coverage {covered:?}, λ {}",
        driftguard::windows::LAMBDA_STATES[state.index()]
    );

    let mut group = c.benchmark_group("evaluate");
    group.throughput(Throughput::Elements(1));
    group.bench_function("hashed", |b| {
        b.iter(|| {
            evaluate(
                black_box(&Hashed),
                black_box(QUESTION),
                black_box(&CHUNKS),
                black_box(ANSWER),
            )
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
