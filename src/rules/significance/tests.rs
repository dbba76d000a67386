//! Reference values from scipy 1.17.1 / numpy 2.4.6, produced by `python3 src/stats/reference.py`.

use super::*;

fn close(got: f64, want: f64, rel: f64, what: &str) {
    let err = (got - want).abs() / want.abs().max(f64::MIN_POSITIVE);
    assert!(
        err <= rel,
        "{what}: got {got:e}, want {want:e} (relative error {err:e} > {rel:e})"
    );
}

#[test]
fn normal_sf_matches_scipy() {
    let cases = [
        (-3.0, 0.9986501019683699),
        (-1.0, 0.8413447460685429),
        (0.0, 0.5),
        (0.5, 0.3085375387259869),
        (1.959964, 0.024999999096442398),
        (3.090232, 0.0010000010308950944),
        (5.0, 2.866515718791933e-07),
        (8.0, 6.22096057427174e-16),
    ];
    for (z, want) in cases {
        close(normal_sf(z), want, 1e-6, &format!("normal_sf({z})"));
    }
}

#[test]
fn student_t_sf_matches_scipy() {
    let cases = [
        (0.5, 3.0, 0.3257239824240755),
        (2.0, 5.0, 0.050969739414929174),
        (-1.5, 10.0, 0.9177463367772799),
        (3.0, 2.5, 0.036288047774515914),
        (2.5, 30.7, 0.008988720929681499),
        (4.0, 200.0, 4.456547609296721e-05),
        (1.0, 1.0, 0.25000000000000006),
        (6.0, 12.0, 3.108369432429282e-05),
        (2.0, 5000.0, 0.022777129994146977),
        (-4.0, 7.3, 0.9976188164178365),
        (0.0, 4.0, 0.5),
        (3.5, 123456.0, 0.00023271104183200157),
    ];
    for (t, df, want) in cases {
        close(
            student_t_sf(t, df),
            want,
            1e-6,
            &format!("student_t_sf({t}, {df})"),
        );
    }
}

#[test]
fn mann_whitney_matches_scipy() {
    type Histogram = &'static [(u64, u64)];
    let cases: [(Histogram, Histogram, f64); 5] = [
        (
            &[(10, 5), (20, 3), (30, 7)],
            &[(10, 4), (15, 2), (20, 6), (25, 1)],
            0.07467979828152896,
        ),
        (
            &[(1, 1), (2, 1), (3, 1)],
            &[(4, 1), (5, 1), (6, 1)],
            0.9854518341293739,
        ),
        (
            &[(4, 1), (5, 1), (6, 1)],
            &[(1, 1), (2, 1), (3, 1)],
            0.04042779918502612,
        ),
        (
            &[(100, 40), (200, 30), (300, 30)],
            &[(100, 50), (200, 30), (300, 20)],
            0.04408977568260904,
        ),
        (&[(7, 3)], &[(7, 2), (8, 1)], 0.9087887802741321),
    ];
    for (a, b, want) in cases {
        let got = mann_whitney_greater(a.iter().copied(), b.iter().copied());
        close(
            got,
            want,
            1e-4,
            &format!("mann_whitney_greater({a:?}, {b:?})"),
        );
    }
}

#[test]
fn mann_whitney_matches_scipy_on_many_buckets() {
    // The same histograms as reference.py's fifth case.
    let a = (50..150u64).map(|v| (v, 1 + v % 7));
    let b = (0..120u64).map(|v| (v, 1 + v % 5));
    close(
        mann_whitney_greater(a, b),
        4.0516268385087584e-44,
        1e-4,
        "many buckets",
    );
}

#[test]
fn welch_matches_scipy() {
    let cases = [
        (0.7, 0.01, 50, 0.72, 0.012, 60, 0.1597825337528534),
        (0.5, 0.04, 10, 0.6, 0.01, 8, 0.0947678302155206),
        (0.8, 0.02, 200, 0.7, 0.03, 150, 0.9999999897840366),
        (1.0, 4.0, 3, 2.0, 0.25, 40, 0.23896182437548116),
        (0.6, 0.0, 30, 0.65, 0.01, 30, 0.00521869474943365),
    ];
    for (ma, va, na, mb, vb, nb, want) in cases {
        let got = welch_less(ma, va, na, mb, vb, nb);
        close(
            got,
            want,
            1e-4,
            &format!("welch_less({ma}, {va}, {na}, {mb}, {vb}, {nb})"),
        );
    }
}

#[test]
fn proportion_matches_formula() {
    let cases = [
        (12, 100, 5, 100, 0.03796086413450962),
        (3, 50, 3, 50, 0.5),
        (1, 200, 10, 200, 0.9970356756787967),
        (30, 1000, 10, 1000, 0.0007006507904801069),
        (8, 60, 2, 400, 1.0320413747934343e-10),
    ];
    for (x1, n1, x2, n2, want) in cases {
        let got = proportion_greater(x1, n1, x2, n2);
        close(
            got,
            want,
            1e-4,
            &format!("proportion_greater({x1}, {n1}, {x2}, {n2})"),
        );
    }
}

#[test]
fn no_evidence_gives_one() {
    assert_eq!(proportion_greater(0, 0, 5, 10), 1.0);
    assert_eq!(proportion_greater(5, 10, 0, 0), 1.0);
    assert_eq!(proportion_greater(0, 100, 0, 100), 1.0);
    assert_eq!(proportion_greater(100, 100, 50, 50), 1.0);
    let empty: [(u64, u64); 0] = [];
    assert_eq!(mann_whitney_greater(empty, [(1, 5)]), 1.0);
    assert_eq!(mann_whitney_greater([(1, 5)], empty), 1.0);
    assert_eq!(mann_whitney_greater([(1, 0)], [(2, 0)]), 1.0);
    assert_eq!(mann_whitney_greater([(7, 50)], [(7, 80)]), 1.0, "all tied");
    assert_eq!(welch_less(0.1, 0.01, 1, 0.9, 0.01, 100), 1.0);
    assert_eq!(welch_less(0.1, 0.01, 100, 0.9, 0.01, 1), 1.0);
    assert_eq!(welch_less(f64::NAN, 0.01, 100, 0.9, 0.01, 100), 1.0);
    assert_eq!(
        welch_less(0.5, 0.0, 100, 0.5, 0.0, 100),
        1.0,
        "identical constants"
    );
}

#[test]
fn zero_variance_on_both_sides_is_decided_by_the_means() {
    assert_eq!(welch_less(0.4, 0.0, 10, 0.9, 0.0, 10), 0.0);
    assert_eq!(welch_less(0.9, 0.0, 10, 0.4, 0.0, 10), 1.0);
}

#[test]
fn p_values_stay_in_unit_interval() {
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..2000 {
        let (n1, n2) = (rng.u64(0..500), rng.u64(0..500));
        let p = proportion_greater(rng.u64(0..=n1), n1, rng.u64(0..=n2), n2);
        assert!((0.0..=1.0).contains(&p), "proportion {p}");

        let hist = |rng: &mut fastrand::Rng| {
            let mut v = 0;
            (0..rng.usize(0..20))
                .map(|_| {
                    v += rng.u64(1..50);
                    (v, rng.u64(0..30))
                })
                .collect::<Vec<_>>()
        };
        let (a, b) = (hist(&mut rng), hist(&mut rng));
        let p = mann_whitney_greater(a.clone(), b.clone());
        assert!((0.0..=1.0).contains(&p), "mann-whitney {p} for {a:?} {b:?}");

        let p = welch_less(
            rng.f64(),
            rng.f64() * 0.1,
            rng.u64(0..300),
            rng.f64(),
            rng.f64() * 0.1,
            rng.u64(0..300),
        );
        assert!((0.0..=1.0).contains(&p), "welch {p}");

        let t = (rng.f64() - 0.5) * 40.0;
        let df = rng.f64() * 1000.0 + 0.1;
        let p = student_t_sf(t, df);
        assert!((0.0..=1.0).contains(&p), "t_sf({t}, {df}) = {p}");
    }
}

#[test]
fn distributions_are_symmetric() {
    for z in [0.1, 0.7, 1.5, 2.5, 4.0] {
        close(normal_sf(z) + normal_sf(-z), 1.0, 1e-12, "normal symmetry");
        for df in [1.0, 2.5, 9.0, 77.0, 4000.0] {
            close(
                student_t_sf(z, df) + student_t_sf(-z, df),
                1.0,
                1e-12,
                "t symmetry",
            );
        }
    }
    // Large df converges to the normal.
    close(student_t_sf(2.0, 1e6), normal_sf(2.0), 1e-5, "t → normal");
}

#[test]
fn symmetric_cases_give_one_half() {
    close(
        proportion_greater(10, 100, 10, 100),
        0.5,
        1e-6,
        "proportion",
    );
    close(welch_less(0.5, 0.02, 40, 0.5, 0.03, 60), 0.5, 1e-6, "welch");
    // Without the continuity correction equal samples would give exactly 0.5; with it, just above.
    let h = [(10, 20), (20, 30), (30, 20)];
    let p = mann_whitney_greater(h, h);
    assert!((0.5..0.56).contains(&p), "mann-whitney {p}");
}

#[test]
fn identical_samples_are_never_significant() {
    let mut rng = fastrand::Rng::with_seed(11);
    for _ in 0..500 {
        let mut v = 0;
        let h: Vec<(u64, u64)> = (0..rng.usize(1..40))
            .map(|_| {
                v += rng.u64(1..100);
                (v, rng.u64(1..200))
            })
            .collect();
        assert!(mann_whitney_greater(h.clone(), h.clone()) >= 0.5);
        let (n, x) = (rng.u64(1..5000), rng.u64(0..50));
        assert!(proportion_greater(x.min(n), n, x.min(n), n) >= 0.5);
        let (mean, var, n) = (rng.f64(), rng.f64() * 0.05, rng.u64(2..5000));
        assert!(welch_less(mean, var, n, mean, var, n) >= 0.5);
    }
}

#[test]
fn clearly_shifted_samples_are_significant_at_0_999() {
    let alpha = 1.0 - 0.999;
    // ΔS: the canary's mass sits ~0.2 higher than the baseline's (values scaled by 1e4 as in windows).
    let baseline: Vec<(u64, u64)> = (0..20).map(|i| (1000 + i * 100, 10)).collect();
    let canary: Vec<(u64, u64)> = (0..20).map(|i| (3000 + i * 100, 10)).collect();
    assert!(mann_whitney_greater(canary.clone(), baseline.clone()) < alpha);
    assert!(mann_whitney_greater(baseline, canary) > 1.0 - alpha);
    // Errors: 6 % against 0.5 % over 500 requests each.
    assert!(proportion_greater(30, 500, 3, 500) < alpha);
    assert!(proportion_greater(3, 500, 30, 500) > 1.0 - alpha);
    // Coverage: 0.55 against 0.80 with sd 0.1, 100 samples each.
    assert!(welch_less(0.55, 0.01, 100, 0.80, 0.01, 100) < alpha);
    assert!(welch_less(0.80, 0.01, 100, 0.55, 0.01, 100) > 1.0 - alpha);
}

#[test]
fn healthy_noise_rarely_trips() {
    // Two draws from the same Bernoulli(0.15) with 50 samples each: the λ flip-rate case of SPEC §6.
    // At 0.999 confidence the false-positive rate must stay near 0.1 %; allow 1 % for the normal
    // approximation at this small n.
    let mut rng = fastrand::Rng::with_seed(3);
    let trials = 20_000;
    let mut trips = 0;
    for _ in 0..trials {
        let draw = |rng: &mut fastrand::Rng| (0..50).filter(|_| rng.f64() < 0.15).count() as u64;
        let (x1, x2) = (draw(&mut rng), draw(&mut rng));
        if proportion_greater(x1, 50, x2, 50) < 0.001 {
            trips += 1;
        }
    }
    assert!(
        trips * 100 < trials,
        "{trips} of {trials} healthy windows tripped"
    );
}

#[test]
fn mann_whitney_is_linear_in_buckets_not_samples() {
    // A billion samples in two buckets each: a per-sample algorithm would not finish.
    let a = [(10, 500_000_000), (20, 500_000_000)];
    let b = [(10, 600_000_000), (20, 400_000_000)];
    let p = mann_whitney_greater(a, b);
    assert!(p < 1e-10, "{p}");
}

#[test]
fn mann_whitney_merges_repeated_values() {
    // A value listed twice on one side counts as one tie group.
    let split = mann_whitney_greater([(5, 2), (5, 3), (9, 4)], [(5, 1), (7, 6)]);
    let merged = mann_whitney_greater([(5, 5), (9, 4)], [(5, 1), (7, 6)]);
    close(split, merged, 1e-12, "split vs merged");
}
