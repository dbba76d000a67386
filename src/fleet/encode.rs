//! A window [`Summary`] as the sparse, additive fields the fleet adds up in Redis, and back. Counters are
//! plain fields; each histogram bucket is one field named by its scaled value (`d:` ΔS, `q:` and `a:`
//! its retrieval and answer probes, `c:` coverage, `r:` retrieval coverage, `l:` latency µs). Only what the rules read travels, and histograms travel coarser than the windows
//! keep them ([`FLEET_SIG_BITS`]): the merged reply's size follows the number of coarse buckets the
//! values span, which a few thousand samples fill, so it stops growing with the fleet's traffic.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::rules::Summary;
use crate::windows::{coarse_midpoint, FLEET_SIG_BITS, SIGNAL_SCALE};

/// The nonzero fields of `s`.
pub fn fields(s: &Summary) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (name, n) in [
        ("req", s.requests),
        ("e5", s.errors_5xx),
        ("rl", s.rate_limited),
        ("pm", s.pin_mismatches),
        ("tl", s.tool_loops),
        ("ev", s.evaluated),
        ("lf", s.lambda_flips),
    ] {
        if n > 0 {
            out.insert(name.to_string(), n);
        }
    }
    for (prefix, buckets, max) in [
        ("d", &s.delta_s, SIGNAL_SCALE as u64),
        ("q", &s.delta_s_qr, SIGNAL_SCALE as u64),
        ("a", &s.delta_s_ra, SIGNAL_SCALE as u64),
        ("c", &s.coverage, SIGNAL_SCALE as u64),
        ("r", &s.retrieval_coverage, SIGNAL_SCALE as u64),
        ("l", &s.latency, u64::MAX),
    ] {
        for (value, n) in buckets.iter().filter(|(_, n)| *n > 0) {
            let value = coarse_midpoint(*value, FLEET_SIG_BITS).min(max);
            *out.entry(format!("{prefix}:{value}")).or_default() += *n;
        }
    }
    out
}

/// What `now` holds beyond `before` (a slot only grows; a field that shrank, after a ring wrap, counts
/// as new).
pub fn minus(now: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    now.iter()
        .filter_map(|(f, n)| {
            let grown = match before.get(f) {
                Some(b) if b <= n => n - b,
                _ => *n,
            };
            (grown > 0).then(|| (f.clone(), grown))
        })
        .collect()
}

/// Adds `more` into `into`.
pub fn add(into: &mut BTreeMap<String, u64>, more: &BTreeMap<String, u64>) {
    for (f, n) in more {
        *into.entry(f.clone()).or_default() += n;
    }
}

/// The merged window read back, `[arm|field, sum, ...]`, as one Summary per arm over `window`.
pub fn summaries(flat: &[String], window: Duration) -> HashMap<String, Summary> {
    let mut out: HashMap<String, Summary> = HashMap::new();
    for pair in flat.chunks_exact(2) {
        let (Some((arm, field)), Ok(n)) = (pair[0].split_once('|'), pair[1].parse::<u64>()) else {
            continue;
        };
        let s = out.entry(arm.to_string()).or_insert_with(|| Summary {
            span_seconds: window.as_secs(),
            ..Summary::default()
        });
        match field {
            "req" => s.requests += n,
            "e5" => s.errors_5xx += n,
            "rl" => s.rate_limited += n,
            "pm" => s.pin_mismatches += n,
            "tl" => s.tool_loops += n,
            "ev" => s.evaluated += n,
            "lf" => s.lambda_flips += n,
            _ => {
                let Some((prefix, value)) = field.split_once(':') else {
                    continue;
                };
                let Ok(value) = value.parse::<u64>() else {
                    continue;
                };
                match prefix {
                    "d" => s.delta_s.push((value, n)),
                    "q" => s.delta_s_qr.push((value, n)),
                    "a" => s.delta_s_ra.push((value, n)),
                    "c" => s.coverage.push((value, n)),
                    "r" => s.retrieval_coverage.push((value, n)),
                    "l" => s.latency.push((value, n)),
                    _ => {}
                }
            }
        }
    }
    for s in out.values_mut() {
        for buckets in [
            &mut s.delta_s,
            &mut s.delta_s_qr,
            &mut s.delta_s_ra,
            &mut s.coverage,
            &mut s.retrieval_coverage,
            &mut s.latency,
        ] {
            buckets.sort_unstable();
        }
        s.latency_p50_us = quantile(&s.latency, 0.5);
        s.latency_p95_us = quantile(&s.latency, 0.95);
        s.latency_p99_us = quantile(&s.latency, 0.99);
    }
    out
}

/// Quantile `q` of (value, count) buckets: the value at rank ceil(q·n), as the windows compute it.
fn quantile(buckets: &[(u64, u64)], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    buckets.iter().find_map(|(v, n)| {
        seen += n;
        (seen >= rank).then_some(*v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(requests: u64, errors: u64, ds: &[(u64, u64)], lat: &[(u64, u64)]) -> Summary {
        Summary {
            requests,
            errors_5xx: errors,
            evaluated: ds.iter().map(|(_, n)| n).sum(),
            delta_s: ds.to_vec(),
            latency: lat.to_vec(),
            ..Summary::default()
        }
    }

    #[test]
    fn three_replicas_merge_to_the_sum_of_their_windows() {
        let parts = [
            summary(10, 1, &[(1000, 3), (9000, 1)], &[(500, 10)]),
            summary(20, 0, &[(1000, 2)], &[(500, 18), (90_000, 2)]),
            summary(5, 5, &[(9000, 4)], &[(700, 5)]),
        ];
        let mut merged = BTreeMap::new();
        for p in &parts {
            add(&mut merged, &fields(p));
        }
        let flat: Vec<String> = merged
            .iter()
            .flat_map(|(f, n)| [format!("canary|{f}"), n.to_string()])
            .collect();
        let s = &summaries(&flat, Duration::from_secs(60))["canary"];
        let c = |v| coarse_midpoint(v, FLEET_SIG_BITS);
        assert_eq!((s.requests, s.errors_5xx, s.evaluated), (35, 6, 10));
        assert_eq!(s.delta_s, vec![(c(1000), 5), (c(9000), 5)]);
        assert_eq!(s.latency, vec![(c(500), 28), (c(700), 5), (c(90_000), 2)]);
        assert_eq!(s.latency_p50_us, Some(c(500)));
        assert_eq!(s.latency_p99_us, Some(c(90_000)));
        for v in [1000, 9000, 500, 700, 90_000] {
            assert!(c(v).abs_diff(v) as f64 <= v as f64 / 32.0, "{v} → {}", c(v));
        }
        assert_eq!(s.span_seconds, 60);
    }

    #[test]
    fn fine_buckets_fold_into_one_coarse_field_and_signals_stay_in_range() {
        // 5000..5100 spans several of the windows' buckets and at most two coarse ones.
        let fine: Vec<(u64, u64)> = (5000..5100).step_by(10).map(|v| (v, 1)).collect();
        let f = fields(&summary(10, 0, &fine, &[]));
        let ds: Vec<_> = f.keys().filter(|k| k.starts_with("d:")).collect();
        assert!(ds.len() <= 2, "{ds:?}");
        assert_eq!(
            f.iter()
                .filter(|(k, _)| k.starts_with("d:"))
                .map(|(_, n)| n)
                .sum::<u64>(),
            10
        );
        let top = fields(&summary(1, 0, &[(10_000, 1)], &[]));
        assert_eq!(top.get("d:10000"), Some(&1), "{top:?}");
    }

    #[test]
    fn every_signal_histogram_travels() {
        let h = |base: u64| vec![(base, 2), (base + 3000, 1)];
        let s = Summary {
            requests: 3,
            evaluated: 3,
            delta_s: h(4000),
            delta_s_qr: h(3000),
            delta_s_ra: h(2000),
            coverage: h(6000),
            retrieval_coverage: h(5000),
            latency: vec![(800, 3)],
            ..Summary::default()
        };
        let flat: Vec<String> = fields(&s)
            .iter()
            .flat_map(|(f, n)| [format!("a|{f}"), n.to_string()])
            .collect();
        let back = &summaries(&flat, Duration::from_secs(60))["a"];
        let coarse = |v: &[(u64, u64)]| -> Vec<(u64, u64)> {
            v.iter()
                .map(|(x, n)| (coarse_midpoint(*x, FLEET_SIG_BITS), *n))
                .collect()
        };
        assert_eq!(back.delta_s, coarse(&s.delta_s));
        assert_eq!(back.delta_s_qr, coarse(&s.delta_s_qr));
        assert_eq!(back.delta_s_ra, coarse(&s.delta_s_ra));
        assert_eq!(back.coverage, coarse(&s.coverage));
        assert_eq!(back.retrieval_coverage, coarse(&s.retrieval_coverage));
        assert_eq!(back.latency, coarse(&s.latency));
    }

    #[test]
    fn only_growth_is_pushed() {
        let before = fields(&summary(10, 1, &[(1000, 3)], &[]));
        let now = fields(&summary(12, 1, &[(1000, 3), (2000, 1)], &[]));
        let grown = minus(&now, &before);
        let d = |v| format!("d:{}", coarse_midpoint(v, FLEET_SIG_BITS));
        assert_eq!(grown.get("req"), Some(&2));
        assert_eq!(grown.get("e5"), None);
        assert_eq!(grown.get(&d(2000)), Some(&1));
        assert_eq!(grown.get(&d(1000)), None);
        assert_eq!(grown.get("ev"), Some(&1));
    }
}
