//! Unit tests of the local GCRA budget: admission, refunds, bursts, settings changes.

use super::*;

use serde_json::json;

const SEC: Duration = Duration::from_secs(1);

fn settings(tokens_per_minute: u64, burst: u64) -> BudgetSettings {
    BudgetSettings {
        tokens_per_minute,
        burst,
    }
}

/// 60 tokens per minute: one token costs exactly one second.
fn per_second(burst: u64) -> (LocalBudget, Instant) {
    let t0 = Instant::now();
    (LocalBudget::new(settings(60, burst), t0), t0)
}

fn admitted(a: BudgetAdmission) -> bool {
    matches!(a, BudgetAdmission::Admitted(_))
}

fn retry_after(a: BudgetAdmission) -> Duration {
    match a {
        BudgetAdmission::OverBudget { retry_after } => retry_after,
        other => panic!("expected OverBudget, got {other:?}"),
    }
}

#[test]
fn budget_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<LocalBudget>();
}

#[test]
fn fresh_budget_admits_burst_at_once_then_refuses_for_one_token_time() {
    let (b, t0) = per_second(10);
    assert_eq!(
        b.admit(10, t0),
        BudgetAdmission::Admitted(Reservation { tokens: 10 })
    );
    assert_eq!(retry_after(b.admit(1, t0)), SEC);
    assert_eq!(retry_after(b.admit(3, t0)), 3 * SEC);
    // Exact to the nanosecond: one ns early is still refused, on time fits.
    let early = t0 + SEC - Duration::from_nanos(1);
    assert_eq!(retry_after(b.admit(1, early)), Duration::from_nanos(1));
    assert!(admitted(b.admit(1, t0 + SEC)));
    assert_eq!(retry_after(b.admit(1, t0 + SEC)), SEC);
}

#[test]
fn retry_after_is_rounded_up_token_time_when_inexact() {
    // 60 s / 7 = 8.571428571428… s, rounded up to the ns.
    let t0 = Instant::now();
    let b = LocalBudget::new(settings(7, 1), t0);
    assert!(admitted(b.admit(1, t0)));
    let wait = retry_after(b.admit(1, t0));
    assert_eq!(wait, Duration::from_nanos(8_571_428_572));
    assert!(wait.as_secs_f64() >= 60.0 / 7.0);
    assert!(admitted(b.admit(1, t0 + wait)));
}

#[test]
fn default_rate_costs_exact_nanoseconds() {
    let t0 = Instant::now();
    let b = LocalBudget::new(BudgetSettings::from(&config::Budget::default()), t0);
    assert_eq!(b.settings(), settings(200_000, 20_000));
    assert!(admitted(b.admit(20_000, t0)));
    // 60 s / 200 000 = 300 µs per token.
    assert_eq!(retry_after(b.admit(1, t0)), Duration::from_micros(300));
}

/// Admits requests of sizes cycling through `sizes` as fast as the budget allows, stepping `now` by `step`
/// up to and including `span`; returns the tokens admitted.
fn saturate(b: &LocalBudget, t0: Instant, span: Duration, step: Duration, sizes: &[u64]) -> u64 {
    let mut total = 0;
    let mut i = 0;
    let mut t = Duration::ZERO;
    while t <= span {
        loop {
            let n = sizes[i % sizes.len()];
            match b.admit(n, t0 + t) {
                BudgetAdmission::Admitted(r) => {
                    total += r.tokens;
                    i += 1;
                }
                BudgetAdmission::OverBudget { .. } => break,
                BudgetAdmission::TooLarge { .. } => panic!("size {n} above burst"),
            }
        }
        t += step;
    }
    total
}

#[test]
fn a_simulated_minute_stays_within_rate_plus_burst() {
    // One token per 100 ms: 50 at once, then one per 100 ms → 50 + 600 at t = 60 s inclusive.
    let t0 = Instant::now();
    let b = LocalBudget::new(settings(600, 50), t0);
    let total = saturate(&b, t0, 60 * SEC, Duration::from_millis(50), &[1]);
    assert_eq!(total, 650);

    // Mixed request sizes and a rate that does not divide a minute evenly.
    for (tpm, burst, sizes) in [
        (7_000u64, 100u64, &[1u64, 5, 17, 3][..]),
        (90_000, 2_000, &[250, 1, 999, 40][..]),
        (200_000, 20_000, &[1_500, 4_000, 300][..]),
    ] {
        let b = LocalBudget::new(settings(tpm, burst), t0);
        let total = saturate(&b, t0, 60 * SEC, Duration::from_millis(7), sizes);
        assert!(total <= tpm + burst, "{total} > {tpm} + {burst}");
        // And the budget is not starved: within one largest request (plus rounding) of the bound.
        let largest = sizes.iter().max().unwrap();
        assert!(
            total + largest + 1 >= tpm + burst,
            "{total} far below {tpm} + {burst}"
        );
    }
}

#[test]
fn refund_lets_a_later_request_in_sooner() {
    let (b, t0) = per_second(10);
    let BudgetAdmission::Admitted(r) = b.admit(10, t0) else {
        panic!("fresh budget refused");
    };
    assert_eq!(retry_after(b.admit(5, t0)), 5 * SEC);
    // Only 4 of the 10 reserved tokens were used: 6 come back.
    b.reconcile(r.tokens, 4, t0 + SEC);
    assert_eq!(b.available(t0 + SEC), 7);
    assert!(admitted(b.admit(5, t0 + SEC)));
}

#[test]
fn refund_never_moves_the_tat_before_now() {
    let (b, t0) = per_second(10);
    assert!(admitted(b.admit(10, t0)));
    // 8 s later only 2 s are still owed; refunding all 10 cannot bank credit beyond a full budget.
    b.reconcile(10, 0, t0 + 8 * SEC);
    assert_eq!(b.available(t0 + 8 * SEC), 10);
    assert!(admitted(b.admit(10, t0 + 8 * SEC)));
    assert_eq!(retry_after(b.admit(1, t0 + 8 * SEC)), SEC);
    // A refund on an idle budget changes nothing.
    let (b, t0) = per_second(10);
    b.reconcile(10, 0, t0 + 100 * SEC);
    assert!(admitted(b.admit(10, t0 + 100 * SEC)));
    assert!(!admitted(b.admit(1, t0 + 100 * SEC)));
}

#[test]
fn extra_charge_delays_later_requests() {
    let (b, t0) = per_second(10);
    assert!(admitted(b.admit(5, t0)));
    assert_eq!(b.available(t0), 5);
    // 12 used against 5 reserved: 7 more charged, the TAT runs 2 s past the tolerance.
    b.reconcile(5, 12, t0);
    assert_eq!(b.available(t0), 0);
    assert_eq!(retry_after(b.admit(1, t0)), 3 * SEC);
    assert_eq!(retry_after(b.admit(0, t0)), 2 * SEC);
    assert_eq!(b.available(t0 + 2 * SEC), 0);
    assert_eq!(b.available(t0 + 3 * SEC), 1);
    assert!(admitted(b.admit(1, t0 + 3 * SEC)));
    // Exact reconciliation changes nothing.
    b.reconcile(7, 7, t0 + 3 * SEC);
    assert_eq!(b.available(t0 + 3 * SEC), 0);
    assert_eq!(b.available(t0 + 13 * SEC), 10);
}

#[test]
fn extra_charge_on_an_idle_budget_counts_from_now() {
    let (b, t0) = per_second(10);
    b.reconcile(0, 4, t0 + 100 * SEC);
    assert_eq!(b.available(t0 + 100 * SEC), 6);
}

#[test]
fn requests_above_burst_are_too_large() {
    let (b, t0) = per_second(10);
    assert_eq!(
        b.admit(11, t0),
        BudgetAdmission::TooLarge {
            tokens: 11,
            burst: 10
        }
    );
    assert_eq!(
        b.admit(u64::MAX, t0),
        BudgetAdmission::TooLarge {
            tokens: u64::MAX,
            burst: 10
        }
    );
    // Refusals change nothing.
    assert!(admitted(b.admit(10, t0)));
}

#[test]
fn available_matches_what_admit_allows() {
    let (b, t0) = per_second(10);
    let mut t = t0;
    for (step, take, charge) in [
        (0u32, 3u64, 0u64),
        (0, 4, 0),
        (1, 0, 0),
        (0, 6, 0),
        (2, 1, 5),
        (3, 0, 0),
        (7, 2, 0),
        (30, 0, 0),
    ] {
        t += step * SEC;
        for offset in [Duration::ZERO, Duration::from_millis(500)] {
            let now = t + offset;
            let a = b.available(now);
            assert!(a <= 10);
            if a < 10 {
                assert!(
                    !admitted(b.admit(a + 1, now)),
                    "admitted {} > available {a}",
                    a + 1
                );
            }
        }
        let a = b.available(t);
        if a > 0 {
            assert!(admitted(b.admit(a, t)), "refused available {a}");
        }
        b.reconcile(a, a - take.min(a) + charge, t);
    }
}

#[test]
fn set_settings_keeps_the_tat() {
    let (b, t0) = per_second(10);
    assert!(admitted(b.admit(10, t0)));
    // Twice the rate, same burst: 0.5 s per token, tolerance 5 s, 10 s owed.
    b.set_settings(settings(120, 10));
    assert_eq!(b.settings(), settings(120, 10));
    assert_eq!(b.available(t0), 0);
    assert_eq!(retry_after(b.admit(1, t0)), Duration::from_millis(5_500));
    assert_eq!(b.available(t0 + 6 * SEC), 2);
    // Back to one per second with a doubled burst: 10 s owed of a 20 s tolerance.
    b.set_settings(settings(60, 20));
    assert_eq!(b.available(t0), 10);
    assert!(admitted(b.admit(10, t0)));
    assert!(!admitted(b.admit(1, t0)));
}

#[test]
fn throttled_scales_rate_and_burst() {
    let s = settings(200_000, 20_000);
    assert_eq!(s.throttled(0.5), settings(100_000, 10_000));
    assert_eq!(s.throttled(0.25), settings(50_000, 5_000));
    assert_eq!(s.throttled(0.3), settings(60_000, 6_000));
    assert_eq!(s.throttled(1.0), s);
    assert_eq!(s.throttled(2.0), s);
    assert_eq!(s.throttled(f64::INFINITY), s);
    assert_eq!(s.throttled(f64::NAN), s);
    // Clamped to 0.01.
    assert_eq!(s.throttled(0.0), settings(2_000, 200));
    assert_eq!(s.throttled(-3.0), settings(2_000, 200));
    assert_eq!(s.throttled(0.001), settings(2_000, 200));
    // At least one token each.
    assert_eq!(settings(10, 1).throttled(0.01), settings(1, 1));
    assert_eq!(settings(0, 0).throttled(0.5), settings(1, 1));
    // Huge values do not overflow.
    let big = settings(u64::MAX, u64::MAX).throttled(0.5);
    assert!(big.tokens_per_minute > 1 && big.burst > 1);
}

#[test]
fn concurrent_admissions_share_the_burst_exactly() {
    let (b, t0) = per_second(10_000);
    let counts: Vec<u64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let mut n = 0;
                    while admitted(b.admit(1, t0)) {
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    assert_eq!(counts.iter().sum::<u64>(), 10_000, "{counts:?}");
    assert_eq!(b.available(t0), 0);
}

#[test]
fn concurrent_admissions_and_refunds_balance() {
    // Every thread reserves 3 and uses 1, all at one instant: each admission nets exactly one token, so
    // refunds must be neither lost nor double counted and the budget never overdrawn.
    let (b, t0) = per_second(30);
    let admissions = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..1_000 {
                    if let BudgetAdmission::Admitted(r) = b.admit(3, t0) {
                        admissions.fetch_add(1, Relaxed);
                        b.reconcile(r.tokens, 1, t0);
                    }
                }
            });
        }
    });
    let admissions = admissions.into_inner();
    assert!((1..=30).contains(&admissions), "{admissions} admissions");
    assert_eq!(b.available(t0), 30 - admissions);
}

#[test]
fn zero_rate_or_burst_does_not_panic() {
    let t0 = Instant::now();
    let b = LocalBudget::new(settings(0, 0), t0);
    assert_eq!(
        b.admit(1, t0),
        BudgetAdmission::TooLarge {
            tokens: 1,
            burst: 0
        }
    );
    assert!(admitted(b.admit(0, t0)));
    assert_eq!(b.available(t0), 0);
    let b = LocalBudget::new(settings(0, 1), t0);
    assert!(admitted(b.admit(1, t0)));
    assert_eq!(retry_after(b.admit(1, t0)), 60 * SEC);
}

#[test]
fn instants_before_the_origin_count_as_the_origin() {
    let t0 = Instant::now();
    let b = LocalBudget::new(settings(60, 2), t0 + SEC);
    assert!(admitted(b.admit(2, t0)));
    assert_eq!(retry_after(b.admit(1, t0 + SEC)), SEC);
}

#[test]
fn prompt_estimate_is_a_quarter_of_the_bytes_rounded_up() {
    assert_eq!(estimate_prompt_tokens(0), 0);
    assert_eq!(estimate_prompt_tokens(1), 1);
    assert_eq!(estimate_prompt_tokens(3), 1);
    assert_eq!(estimate_prompt_tokens(4), 1);
    assert_eq!(estimate_prompt_tokens(5), 2);
    assert_eq!(estimate_prompt_tokens(4_000), 1_000);
    assert_eq!(estimate_prompt_tokens(4_001), 1_001);
    assert_eq!(
        estimate_prompt_tokens(usize::MAX),
        (usize::MAX / 4 + 1) as u64
    );
}

#[test]
fn completion_tokens_prefers_max_tokens_then_max_completion_tokens() {
    assert_eq!(completion_tokens(&json!({"max_tokens": 100}), 256), 100);
    assert_eq!(
        completion_tokens(&json!({"max_completion_tokens": 300}), 256),
        300
    );
    assert_eq!(
        completion_tokens(
            &json!({"max_tokens": 50, "max_completion_tokens": 300}),
            256
        ),
        50
    );
    assert_eq!(completion_tokens(&json!({"max_tokens": 0}), 256), 0);
    assert_eq!(completion_tokens(&json!({"model": "x"}), 256), 256);
    assert_eq!(completion_tokens(&json!({}), 7), 7);
    // Not a non-negative integer: skipped.
    assert_eq!(
        completion_tokens(
            &json!({"max_tokens": null, "max_completion_tokens": 300}),
            256
        ),
        300
    );
    assert_eq!(completion_tokens(&json!({"max_tokens": -1}), 256), 256);
    assert_eq!(completion_tokens(&json!({"max_tokens": 1.5}), 256), 256);
    assert_eq!(completion_tokens(&json!({"max_tokens": "100"}), 256), 256);
    // Not an object at all.
    assert_eq!(completion_tokens(&json!([1, 2]), 256), 256);
    assert_eq!(completion_tokens(&json!(null), 256), 256);
}
