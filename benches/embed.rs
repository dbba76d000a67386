//! Cost of the `local` embedder (all-MiniLM-L6-v2 on candle's CPU backend) on one core.
//!
//! `cargo bench --bench embed` (needs the model folder: `DRIFTGUARD_TEST_MODEL` or
//! `target/fixtures/all-MiniLM-L6-v2`, which `.ci/run` unpacks; skips without it)
//!
//! - `local/tokens_16`, `local/tokens_128`, `local/tokens_256`: one text of exactly that many tokens
//!   (truncated at `max_tokens`), uncached. Reported: texts/s. The linear layers run in int8 where
//!   the CPU has AVX-512 VNNI, as in production.
//! - `local_f32/tokens_128`: the same with every layer in f32 (`Precision::F32`), the reference.
//! - `evaluate/local_cold`: a SPEC-sized request — a question (~100 B), 5 retrieved chunks of ~600 B
//!   and a ~400 B answer — embedded with nothing cached, then ΔS and coverage. Reported: evaluations/s.
//! - `evaluate/local_chunks_cached`: the same with the 5 chunks already in the embedding cache (a
//!   corpus retrieved again and again): only the question and the answer, new each time, are embedded.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, Throughput};
use driftguard::signals::embed::local::{Local, Precision};
use driftguard::signals::embed::Embedder;
use driftguard::signals::measure::{coverage, delta_s_probes};

const QUESTION: &str = "How do I roll back the canary when the index alias points at the wrong \
                        version of the documents?";

/// ~600 bytes each, like the chunks of the signals bench.
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
     so that cached answers computed against the bad index are never served again to any user.",
    "Version pins are stamped on every request and response: BUILD_ID, GIT_SHA, MODEL_VER, \
     PROMPT_VER, INDEX_HASH and RERANK_CONF among others. When the upstream echoes its own pins \
     and one differs from what the proxy stamped, the mismatch is counted and can trip a rule on \
     its own. A mismatch on INDEX_HASH or INDEX_ALIAS usually means the retriever was pointed at a \
     different index than the one the release was tested with, and the alias lever is the right \
     response. Pins also key the cache, so rolling the alias back rotates the cache namespace.",
    "Recovery is watched, not assumed. After a rollback the guard holds the system in a recovering \
     state until the exit targets have held for ten minutes: an error rate under half a percent, \
     semantic drift and evidence coverage within tolerance of the baseline, and tail latency no \
     more than fifteen percent above it. Only then do writers unfreeze and the throttle lift. If \
     the targets are not met before the deadline, the state escalates and the paging hooks fire \
     again with the snapshot attached, so that a human can decide what the next step should be.",
    "Coverage measures how much of an answer is grounded in the retrieved passages: the share of \
     its content words, after stemming, that also appear in the chunks. A healthy retrieval \
     augmented service keeps coverage high because the model quotes and paraphrases its sources. \
     When the retriever drifts, for example after an embedding model upgrade or a tokenizer \
     change, coverage drops before users start to complain. Together with the drift of the \
     semantic distance and the convergence state of each session, it is a leading indicator.",
];

const ANSWER: &str =
    "To roll back the canary, set its weight to zero so that the router sends all \
                      new traffic to the baseline arm, after capturing a snapshot and freezing \
                      writes. If the index alias points at the wrong version, flip the alias back \
                      to the last good INDEX_HASH from the version pins and rotate the cache \
                      namespace, so that no cached answer built on the bad index is served again.";

fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("DRIFTGUARD_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fixtures/all-MiniLM-L6-v2")
        });
    dir.join("model.safetensors").is_file().then_some(dir)
}

fn load(dir: &Path, max_tokens: usize, cache_entries: usize) -> Local {
    Local::load(dir, max_tokens, cache_entries).unwrap_or_else(|e| panic!("{e}"))
}

fn evaluate(model: &Local, question: &str, answer: &str) -> f64 {
    let mut texts = vec![question];
    texts.extend(CHUNKS);
    texts.push(answer);
    let v = model.embed_batch(&texts).expect("embeds");
    let ds = delta_s_probes(&v[0], &v[1..6], &v[6]);
    ds.max + coverage(answer, &CHUNKS).unwrap_or(0.0)
}

fn bench(c: &mut Criterion, dir: &Path) {
    // Long enough that truncation at max_tokens gives exactly that many tokens.
    let long = CHUNKS.join(" ");
    let mut texts = c.benchmark_group("local");
    texts.throughput(Throughput::Elements(1));
    for tokens in [16, 128, 256] {
        let model = load(dir, tokens, 0);
        texts.bench_function(format!("tokens_{tokens}"), |b| {
            b.iter(|| model.embed(black_box(&long)).expect("embeds"))
        });
    }
    texts.finish();
    let mut exact = c.benchmark_group("local_f32");
    exact.throughput(Throughput::Elements(1));
    let model = Local::load_with(dir, 128, 0, Precision::F32).unwrap_or_else(|e| panic!("{e}"));
    exact.bench_function("tokens_128", |b| {
        b.iter(|| model.embed(black_box(&long)).expect("embeds"))
    });
    exact.finish();

    let mut evals = c.benchmark_group("evaluate");
    evals.throughput(Throughput::Elements(1));
    let cold = load(dir, 256, 0);
    evals.bench_function("local_cold", |b| {
        b.iter(|| evaluate(&cold, black_box(QUESTION), black_box(ANSWER)))
    });
    let cached = load(dir, 256, 10_000);
    evaluate(&cached, QUESTION, ANSWER);
    let n = AtomicU64::new(0);
    evals.bench_function("local_chunks_cached", |b| {
        b.iter(|| {
            // A new question and answer each time: only the chunks are cache hits.
            let i = n.fetch_add(1, Ordering::Relaxed);
            let question = format!("{QUESTION} (case {i})");
            let answer = format!("{ANSWER} Ticket {i}.");
            evaluate(&cached, &question, &answer)
        })
    });
    evals.finish();
}

fn main() {
    // One core: candle's matrix products on the calling thread only (as `driftguard run` sets it).
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let Some(dir) = model_dir() else {
        eprintln!("SKIPPED: no model folder (set DRIFTGUARD_TEST_MODEL or run .ci/run once)");
        return;
    };
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    bench(&mut c, &dir);
    c.final_summary();
}
