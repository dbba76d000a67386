//! Significance tests behind the noise guard of the hard rules (SPEC §6).
//!
//! A rule breach counts only when the arm is also worse than its baseline with one-sided confidence
//! `rules.confidence`; the rule engine asks one of the tests here for a p-value and compares it with
//! `1 - confidence`. Shares (error rate, 429 rate, λ flip rate) use a pooled two-proportion z-test,
//! ΔS distributions a Mann-Whitney U test on the window histograms, mean coverage Welch's t-test.
//!
//! Every function is pure and total: inputs that carry no evidence (empty samples, no variance, NaN)
//! give a p-value of 1.0, so a degenerate window can never trip a rule.

use std::f64::consts::{FRAC_1_SQRT_2, PI};
use std::iter::Peekable;

/// One-sided p-value for "share x1/n1 is greater than share x2/n2": pooled two-proportion z-test.
/// 1.0 when either n is 0 or the pooled share is 0 or 1 (no evidence).
pub fn proportion_greater(x1: u64, n1: u64, x2: u64, n2: u64) -> f64 {
    if n1 == 0 || n2 == 0 {
        return 1.0;
    }
    let (x1, x2) = (x1.min(n1) as f64, x2.min(n2) as f64);
    let (n1, n2) = (n1 as f64, n2 as f64);
    let pooled = (x1 + x2) / (n1 + n2);
    if pooled <= 0.0 || pooled >= 1.0 {
        return 1.0;
    }
    let se = (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt();
    normal_sf((x1 / n1 - x2 / n2) / se)
}

/// One-sided Mann-Whitney U p-value for "values of A tend to be greater than values of B", A and B given
/// as histograms: iterators of (value, count) ascending by value (as `windows::Snapshot::buckets()`
/// yields).
///
/// Ties (equal values across A and B) get mid-ranks; normal approximation with tie-corrected variance
/// and continuity correction, as scipy's `mannwhitneyu(alternative="greater", method="asymptotic")`.
/// 1.0 when either side is empty or all values are tied. Runs in O(buckets): each distinct value is
/// ranked once, whatever its count.
pub fn mann_whitney_greater(
    a: impl IntoIterator<Item = (u64, u64)>,
    b: impl IntoIterator<Item = (u64, u64)>,
) -> f64 {
    let mut a = a.into_iter().peekable();
    let mut b = b.into_iter().peekable();
    // Ranks below the current value, A's rank sum, sizes and Σ(t³ - t) over tie groups; f64 because
    // t³ overflows u64 for tie groups of a few million.
    let (mut below, mut rank_sum_a, mut n_a, mut n_b, mut ties) = (0.0, 0.0, 0.0, 0.0, 0.0);
    loop {
        let value = match (a.peek(), b.peek()) {
            (Some(&(va, _)), Some(&(vb, _))) => va.min(vb),
            (Some(&(va, _)), None) => va,
            (None, Some(&(vb, _))) => vb,
            (None, None) => break,
        };
        let (ca, cb) = (count_of(&mut a, value), count_of(&mut b, value));
        let t = ca + cb;
        rank_sum_a += ca * (below + (t + 1.0) / 2.0);
        ties += t * t * t - t;
        below += t;
        n_a += ca;
        n_b += cb;
    }
    if n_a == 0.0 || n_b == 0.0 {
        return 1.0;
    }
    let n = n_a + n_b;
    let u_a = rank_sum_a - n_a * (n_a + 1.0) / 2.0;
    let variance = n_a * n_b / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if variance.is_nan() || variance <= 0.0 {
        return 1.0;
    }
    normal_sf((u_a - n_a * n_b / 2.0 - 0.5) / variance.sqrt())
}

/// Takes every leading bucket of `side` at `value` and sums their counts.
fn count_of(side: &mut Peekable<impl Iterator<Item = (u64, u64)>>, value: u64) -> f64 {
    let mut count = 0u64;
    while let Some((_, n)) = side.next_if(|&(v, _)| v == value) {
        count = count.saturating_add(n);
    }
    count as f64
}

/// One-sided Welch t-test p-value for "mean of A is less than mean of B" from summary statistics
/// (sample variances, n - 1 denominator).
///
/// Uses the Welch–Satterthwaite degrees of freedom and the Student t distribution. 1.0 if n < 2 on a
/// side or an input is not finite. With no variance on either side the means alone decide: 0.0 when
/// A's mean is lower, 1.0 otherwise.
pub fn welch_less(mean_a: f64, var_a: f64, n_a: u64, mean_b: f64, var_b: f64, n_b: u64) -> f64 {
    if n_a < 2 || n_b < 2 {
        return 1.0;
    }
    if ![mean_a, var_a, mean_b, var_b].iter().all(|x| x.is_finite()) {
        return 1.0;
    }
    let (n_a, n_b) = (n_a as f64, n_b as f64);
    let (se2_a, se2_b) = (var_a.max(0.0) / n_a, var_b.max(0.0) / n_b);
    let se2 = se2_a + se2_b;
    if se2 <= 0.0 {
        return if mean_a < mean_b { 0.0 } else { 1.0 };
    }
    let df = se2 * se2 / (se2_a * se2_a / (n_a - 1.0) + se2_b * se2_b / (n_b - 1.0));
    let t = (mean_a - mean_b) / se2.sqrt();
    // P(T < t) = P(T > -t).
    student_t_sf(-t, df)
}

/// P(Z > z) for a standard normal Z, accurate to ~1e-7 relative (see [`erfc`]).
pub fn normal_sf(z: f64) -> f64 {
    if z.is_nan() {
        return f64::NAN;
    }
    0.5 * erfc(z * FRAC_1_SQRT_2)
}

/// P(T > t) for Student's t with `df` degrees of freedom (df > 0, not necessarily an integer).
///
/// Uses P(|T| > |t|) = I_x(df/2, 1/2) with x = df / (df + t²), the regularized incomplete beta.
pub fn student_t_sf(t: f64, df: f64) -> f64 {
    if t.is_nan() || df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    // Past ~1e10 df the t distribution is the normal one to double precision, and the continued
    // fraction would need ~sqrt(df) iterations.
    if df > 1e10 {
        return normal_sf(t);
    }
    if t.is_infinite() {
        return if t > 0.0 { 0.0 } else { 1.0 };
    }
    let t2 = t * t;
    // 1 - x computed directly: for small t it is tiny and `1.0 - x` would lose its digits.
    let (x, one_minus_x) = (df / (df + t2), t2 / (df + t2));
    let two_tailed = regularized_beta(df / 2.0, 0.5, x, one_minus_x);
    if t > 0.0 {
        0.5 * two_tailed
    } else {
        1.0 - 0.5 * two_tailed
    }
}

/// Complementary error function, Numerical Recipes' `erfcc` (Chebyshev fit): fractional error below
/// 1.2e-7 everywhere, in the tails too, which is what p-values near 1e-3 and below need.
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * (-z * z + poly).exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// ln Γ(x) for x > 0: Lanczos approximation (g = 7, 9 terms), ~1e-15 relative.
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 - x) = π / sin(πx).
        return (PI / (PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = COEF[0];
    for (i, c) in COEF.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The regularized incomplete beta I_x(a, b), given x and 1 - x (the caller often knows 1 - x more
/// precisely than the subtraction would give).
fn regularized_beta(a: f64, b: f64, x: f64, one_minus_x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if one_minus_x <= 0.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * one_minus_x.ln();
    let front = ln_front.exp();
    // The continued fraction converges fast for x below the mean (a+1)/(a+b+2); above it, use the
    // symmetry I_x(a, b) = 1 - I_{1-x}(b, a).
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_continued_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_continued_fraction(b, a, one_minus_x) / b
    }
}

/// The continued fraction of the incomplete beta, modified Lentz's method (Numerical Recipes `betacf`).
fn beta_continued_fraction(a: f64, b: f64, x: f64) -> f64 {
    const MAX_ITERATIONS: u32 = 100_000;
    const EPS: f64 = 1e-15;
    const TINY: f64 = 1e-300;
    let guard = |v: f64| if v.abs() < TINY { TINY } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / guard(1.0 - qab * x / qap);
    let mut h = d;
    for m in 1..=MAX_ITERATIONS {
        let m = f64::from(m);
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 / guard(1.0 + aa * d);
        c = guard(1.0 + aa / c);
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 / guard(1.0 + aa * d);
        c = guard(1.0 + aa / c);
        let step = d * c;
        h *= step;
        if (step - 1.0).abs() < EPS {
            break;
        }
    }
    h
}

#[cfg(test)]
mod tests;
