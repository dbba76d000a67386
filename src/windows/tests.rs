//! Unit tests of the windows: HDR layout error against hdrhistogram, slot rotation, the arm write API.

use super::*;

#[test]
fn bucket_layout_round_trips() {
    let mut prev_end = 0;
    for i in 0..index_of(u32::MAX as u64) {
        let (low, width) = bucket_range(i);
        assert_eq!(low, prev_end, "bucket {i} is contiguous");
        assert_eq!(index_of(low), i);
        assert_eq!(index_of(low + width - 1), i);
        // Bucket width relative to its values stays within 1/128.
        if low >= SUB_COUNT {
            assert!((width as f64) / (low as f64) <= 1.0 / 128.0 + 1e-12);
        }
        prev_end = low + width;
    }
}

#[test]
fn quantiles_within_one_percent_of_exact() {
    let w = Window::new(Instant::now());
    let now = Instant::now();
    let mut values: Vec<u64> = (0..50_000).map(|_| fastrand::u64(50..5_000_000)).collect();
    for &v in &values {
        w.record(now, Hist::Latency, v);
    }
    values.sort_unstable();
    let stats = w.stats(now, Duration::from_secs(60));
    let snap = stats.hist(Hist::Latency);
    assert_eq!(snap.count(), values.len() as u64);
    for q in [0.5, 0.9, 0.95, 0.99, 0.999] {
        let exact = values[((q * values.len() as f64).ceil() as usize).max(1) - 1] as f64;
        let got = snap.quantile(q).unwrap() as f64;
        assert!(
            (got - exact).abs() / exact <= 0.01,
            "q{q}: got {got}, exact {exact}"
        );
    }
    let exact_mean = values.iter().sum::<u64>() as f64 / values.len() as f64;
    assert!((snap.mean().unwrap() - exact_mean).abs() / exact_mean < 0.01);
}

#[test]
fn agrees_with_hdrhistogram_crate() {
    let mut reference =
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, u32::MAX as u64, 2).unwrap();
    let w = Window::new(Instant::now());
    let now = Instant::now();
    for _ in 0..20_000 {
        let v = fastrand::u64(1..10_000_000);
        reference.record(v).unwrap();
        w.record(now, Hist::Ttfb, v);
    }
    let stats = w.stats(now, SLOT);
    for q in [0.5, 0.95, 0.99] {
        let ours = stats.hist(Hist::Ttfb).quantile(q).unwrap() as f64;
        let theirs = reference.value_at_quantile(q) as f64;
        assert!(
            (ours - theirs).abs() / theirs <= 0.01,
            "q{q}: ours {ours}, hdrhistogram {theirs}"
        );
    }
}

#[test]
fn values_past_the_top_are_clamped() {
    let w = Window::new(Instant::now());
    let now = Instant::now();
    w.record(now, Hist::Latency, u64::MAX);
    let stats = w.stats(now, SLOT);
    let top = stats.hist(Hist::Latency).quantile(1.0).unwrap();
    assert!(
        ((1u64 << 32) - (1u64 << 25)..1u64 << 32).contains(&top),
        "{top}"
    );
}

#[test]
fn window_merges_only_the_newest_slots() {
    let origin = Instant::now();
    let w = Window::new(origin);
    // Ten slot periods, one request each with latency = 1000 × period index.
    for period in 0..10u64 {
        let at = origin + SLOT * period as u32 + Duration::from_millis(1);
        w.record(at, Hist::Latency, 1000 * (period + 1));
        w.count(at, Counter::Class2xx, 1);
        if period % 2 == 0 {
            w.count(at, Counter::Class5xx, 1);
        }
    }
    let now = origin + SLOT * 9 + Duration::from_millis(5);
    // The last 20 s reach back 5 ms into period 7: periods 7, 8 and 9 (the current one).
    let last3 = w.stats(now, SLOT * 2);
    assert_eq!(last3.span, SLOT * 3);
    assert_eq!(last3.hist(Hist::Latency).count(), 3);
    assert_eq!(last3.requests(), 4); // 3 × 2xx + one 5xx (period 8)
    assert_eq!(last3.counter(Counter::Class5xx), 1);
    assert!((last3.error_rate() - 0.25).abs() < 1e-9);
    let min = last3.hist(Hist::Latency).quantile(0.0).unwrap();
    assert!(
        (7900..=8100).contains(&min),
        "oldest value in the window is period 7's: {min}"
    );
    // A span longer than the ring is capped at the ring.
    assert_eq!(
        w.stats(now, Duration::from_secs(3600))
            .hist(Hist::Latency)
            .count(),
        10
    );
}

#[test]
fn a_reused_slot_starts_empty() {
    let origin = Instant::now();
    let w = Window::new(origin);
    w.record(origin, Hist::Latency, 5);
    w.count(origin, Counter::Timeouts, 7);
    // One whole ring later the same slot index holds a new period.
    let later = origin + SLOT * SLOTS as u32;
    w.record(later, Hist::Latency, 9);
    let stats = w.stats(later, SLOT);
    assert_eq!(stats.hist(Hist::Latency).count(), 1);
    assert_eq!(stats.counter(Counter::Timeouts), 0);
    // A straggler from the old period no longer lands anywhere.
    w.record(origin, Hist::Latency, 5);
    assert_eq!(w.stats(later, SLOT).hist(Hist::Latency).count(), 1);
}

#[test]
fn prepare_next_clears_ahead() {
    let origin = Instant::now();
    let w = Window::new(origin);
    w.count(origin + SLOT, Counter::Class2xx, 1);
    // Ring wraps: period SLOTS+1 maps to the same slot as period 1.
    let now = origin + SLOT * SLOTS as u32;
    w.prepare_next(now);
    let next = origin + SLOT * (SLOTS as u32 + 1);
    assert_eq!(w.stats(next, SLOT).requests(), 0);
}

#[test]
fn concurrent_recording_loses_nothing() {
    let w = Window::new(Instant::now());
    let now = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for i in 0..100_000u64 {
                    w.record(now, Hist::Latency, i % 10_000);
                    w.count(now, Counter::Class2xx, 1);
                }
            });
        }
    });
    let stats = w.stats(now, SLOT);
    assert_eq!(stats.hist(Hist::Latency).count(), 400_000);
    assert_eq!(stats.requests(), 400_000);
}

/// Counts the mirror calls of [`ArmStats`], to show every event reaches both the window and the mirror.
#[derive(Default)]
struct Calls(std::sync::Mutex<Vec<String>>);

struct Shared(std::sync::Arc<Calls>);

impl Mirror for Shared {
    fn response(&self, class: Counter) {
        self.push(format!("response {class:?}"));
    }
    fn first_byte(&self, _: Duration) {
        self.push("first_byte".into());
    }
    fn completed(&self, _: Duration) {
        self.push("completed".into());
    }
    fn evaluated(&self, e: &Evaluation) {
        self.push(format!("evaluated {}", LAMBDA_STATES[e.lambda]));
    }
    fn usage(&self, p: Option<u64>, c: Option<u64>, tool_loop: bool) {
        self.push(format!("usage {p:?} {c:?} {tool_loop}"));
    }
    fn pin_mismatch(&self, pin: &str) {
        self.push(format!("pin {pin}"));
    }
}

impl Shared {
    fn push(&self, call: String) {
        self.0 .0.lock().unwrap().push(call);
    }
}

#[test]
fn every_arm_event_reaches_window_and_mirror() {
    let calls = std::sync::Arc::new(Calls::default());
    let arm = ArmStats::new("a", Instant::now(), Box::new(Shared(calls.clone())));
    let now = Instant::now();
    arm.response(now, 429);
    arm.first_byte(now, Duration::from_millis(5));
    arm.completed(now, Duration::from_millis(9));
    arm.upstream_error(now, true);
    arm.upstream_error(now, false);
    arm.evaluated(
        now,
        &Evaluation {
            delta_s: 0.4,
            coverage: Some(0.5),
            lambda: 3,
            ..Evaluation::default()
        },
    );
    arm.usage(now, Some(7), None, true);
    arm.pin_mismatch(now, "model");
    let w = arm.window.stats(now, Duration::from_secs(10));
    assert_eq!(w.counter(Counter::Class4xx), 1);
    assert_eq!(w.counter(Counter::RateLimited), 1);
    assert_eq!(w.counter(Counter::Timeouts), 1);
    assert_eq!(w.counter(Counter::UpstreamErrors), 1);
    assert_eq!(w.counter(Counter::Evaluated), 1);
    assert_eq!(w.counter(Counter::LambdaChaotic), 1);
    assert_eq!(w.counter(Counter::ToolLoops), 1);
    assert_eq!(w.counter(Counter::PromptTokens), 7);
    assert_eq!(w.counter(Counter::PinMismatches), 1);
    assert_eq!(w.hist(Hist::Ttfb).count(), 1);
    assert_eq!(w.hist(Hist::Latency).count(), 1);
    assert_eq!(w.hist(Hist::Coverage).count(), 1);
    assert_eq!(arm.recent(), vec![(0.4, Some(0.5))]);
    assert_eq!(
        *calls.0.lock().unwrap(),
        [
            "response Class4xx",
            "first_byte",
            "completed",
            "evaluated chaotic",
            "usage Some(7) None true",
            "pin model",
        ]
    );
}

#[test]
fn arms_keep_an_arm_by_name() {
    let arms = Arms::default();
    let a = arms.arm("a");
    assert!(std::sync::Arc::ptr_eq(&a, &arms.arm("a")));
    assert!(!std::sync::Arc::ptr_eq(&a, &arms.arm("b")));
    arms.rotate();
}

#[test]
fn a_coarse_bucket_holds_every_value_of_the_fine_buckets_it_takes() {
    // Every value of a fine bucket coarsens to the same midpoint as the fine bucket's midpoint, so
    // replicas that coarsen their own buckets add up to what coarsening the merged buckets gives.
    for index in 0..index_of(1 << 40) {
        let (low, width) = bucket_range(index);
        let mid = low + (width - 1) / 2;
        let want = coarse_midpoint(mid, 6);
        for v in [low, mid, low + width - 1] {
            assert_eq!(coarse_midpoint(v, 6), want, "index {index}: {v}");
        }
        assert!(
            want.abs_diff(mid) as f64 <= (mid as f64 / 32.0).max(1.0),
            "{mid} → {want}"
        );
    }
    assert_eq!(coarse_midpoint(17, 6), 17);
}
