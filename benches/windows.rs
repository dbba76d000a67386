//! Micro-benchmarks of the windows (SPEC §4): the request-path record and the rule-engine quantile read.
//!
//! `cargo bench --bench windows`
//!
//! - `record/1_thread`: one request's worth of recording — a `Hist::Latency` value plus a status-class
//!   counter increment — into one arm's `Window`, from one thread. Reported time = ns per record.
//! - `record/2_threads`: the same from 2 threads at once into the same `Window` (the worst case of a
//!   2-worker runtime: both threads hit the same slot, the same counter cache line and, for equal
//!   values, the same bucket). Each thread does `iters` records; the reported time is the wall time
//!   from a common start barrier until the slower thread is done, divided by `iters` — i.e. ns per
//!   record *as seen by each thread under contention* (aggregate throughput is 2 records per that time).
//! - `record/1_thread_with_clock`: as `1_thread` but with the `Instant::now()` the request path pays
//!   for each timestamp.
//! - `read/stats_60s_p99`: `window.stats(now, 60s)` over a ring whose 30 slots are all populated, then
//!   `.hist(Hist::Latency).quantile(0.99)` — what the rule engine does per arm every `eval_interval`.
//! - `read/stats_300s_p99`: the same over the whole ring (`MAX_SPAN`).
//! - `read/quantile_p99_only`: `quantile(0.99)` on an already merged snapshot.
//!
//! Latency values are log-normal µs (median ≈ 400 ms, long tail to tens of seconds, floor 200 µs), a
//! typical RAG / LLM answer mix, so records spread over many buckets as in production.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use driftguard::windows::{Counter, Hist, Window, MAX_SPAN, SLOT, SLOTS};

/// Pre-generated values, cycled through by index (power of two so the wrap is a mask).
const VALUES: usize = 1 << 12;

fn latency_values(seed: u64) -> Vec<u64> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..VALUES)
        .map(|_| {
            // Box-Muller normal → log-normal around 400 ms with sigma 1.2 (in ln units).
            let (u1, u2) = (rng.f64().max(f64::MIN_POSITIVE), rng.f64());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (400_000.0 * (1.2 * z).exp()).clamp(200.0, 60_000_000.0) as u64
        })
        .collect()
}

/// One request's recording: the latency histogram and the status-class counter.
#[inline(always)]
fn record_one(w: &Window, at: Instant, value: u64) {
    w.record(at, Hist::Latency, value);
    w.count(at, Counter::Class2xx, 1);
}

fn record_loop(w: &Window, at: Instant, values: &[u64], iters: u64) {
    for i in 0..iters as usize {
        record_one(black_box(w), black_box(at), values[i & (VALUES - 1)]);
    }
}

fn bench_record(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    group.throughput(Throughput::Elements(1));
    let values = latency_values(1);

    group.bench_function(BenchmarkId::from_parameter("1_thread"), |b| {
        let origin = Instant::now();
        let w = Window::new(origin);
        // A fixed timestamp inside one slot: measures the record itself, not slot rotation.
        let at = origin + SLOT / 2;
        b.iter_custom(|iters| {
            let start = Instant::now();
            record_loop(&w, at, &values, iters);
            start.elapsed()
        });
    });

    group.bench_function(BenchmarkId::from_parameter("1_thread_with_clock"), |b| {
        let w = Window::new(Instant::now());
        b.iter_custom(|iters| {
            let start = Instant::now();
            for i in 0..iters as usize {
                record_one(black_box(&w), Instant::now(), values[i & (VALUES - 1)]);
            }
            start.elapsed()
        });
    });

    group.bench_function(BenchmarkId::from_parameter("2_threads"), |b| {
        let origin = Instant::now();
        let w = Window::new(origin);
        let at = origin + SLOT / 2;
        let values2 = latency_values(2);
        b.iter_custom(|iters| {
            let barrier = Barrier::new(2);
            let (w, barrier) = (&w, &barrier);
            std::thread::scope(|s| {
                let t1 = s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    record_loop(w, at, &values, iters);
                    start.elapsed()
                });
                let t2 = s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    record_loop(w, at, &values2, iters);
                    start.elapsed()
                });
                let (a, b) = (
                    t1.join().expect("recorder thread"),
                    t2.join().expect("recorder thread"),
                );
                a.max(b)
            })
        });
    });
    group.finish();
}

/// A window with every slot of the ring populated, and a `now` in its newest slot.
fn full_ring() -> (Window, Instant) {
    let origin = Instant::now();
    let w = Window::new(origin);
    let values = latency_values(3);
    for slot in 0..SLOTS as u32 {
        let at = origin + SLOT * slot + SLOT / 2;
        for (i, &v) in values.iter().cycle().take(20_000).enumerate() {
            record_one(&w, at, v);
            if i % 4 == 0 {
                w.record(at, Hist::Ttfb, v / 3);
            }
        }
    }
    let now = origin + SLOT * (SLOTS as u32 - 1) + SLOT / 2;
    (w, now)
}

fn bench_read(c: &mut Criterion) {
    let mut group = c.benchmark_group("read");
    let (w, now) = full_ring();
    let stats = w.stats(now, Duration::from_secs(60));
    assert_eq!(
        stats.hist(Hist::Latency).count(),
        6 * 20_000,
        "60 s merges 6 slots of the full ring"
    );

    group.bench_function("stats_60s_p99", |b| {
        b.iter(|| {
            let stats = black_box(&w).stats(black_box(now), Duration::from_secs(60));
            stats.hist(Hist::Latency).quantile(0.99)
        })
    });
    group.bench_function("stats_300s_p99", |b| {
        b.iter(|| {
            black_box(&w)
                .stats(black_box(now), MAX_SPAN)
                .hist(Hist::Latency)
                .quantile(0.99)
        })
    });
    group.bench_function("quantile_p99_only", |b| {
        let snap = stats.hist(Hist::Latency);
        b.iter(|| black_box(snap).quantile(black_box(0.99)))
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
}

criterion_group! { name = benches; config = config(); targets = bench_record, bench_read }
criterion_main!(benches);
