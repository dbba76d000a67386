//! The `/metrics` document (SPEC §7): telemetry's registry plus the families that follow the live routing
//! table — weights, baseline, breakers, pins, window means and quantile summaries — built fresh at each
//! scrape so an arm removed by a reload disappears from them. Called by the admin routes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary};
use prometheus::{GaugeVec, IntGauge, Opts, Registry};

use crate::app::App;
use crate::serve::router::RoutingTable;
use crate::telemetry::metrics::{Metrics, NAMESPACE};
use crate::windows::{Hist, PROBES};

/// The quantiles of the window summaries.
const QUANTILES: [f64; 3] = [0.5, 0.95, 0.99];

/// The Prometheus text exposition of everything the app knows.
pub fn render(app: &App) -> String {
    let metrics = &app.metrics;
    metrics.eval_queue_depth.set(app.pipeline.depth() as i64);
    let mut families = table_families(metrics, &app.table(), app.config().rules.window.0);
    if let Some(budget) = app.budget() {
        families.extend(budget_family(budget.available(Instant::now())));
    }
    metrics.render(families)
}

/// `budget_available_tokens`: the token budget's headroom now.
fn budget_family(available: u64) -> Vec<MetricFamily> {
    match IntGauge::new(
        format!("{NAMESPACE}_budget_available_tokens"),
        "Tokens the global budget would admit now.",
    ) {
        Ok(g) => {
            g.set(i64::try_from(available).unwrap_or(i64::MAX));
            prometheus::core::Collector::collect(&g)
        }
        Err(_) => Vec::new(),
    }
}

/// Families derived from the routing table and the windows at scrape time; the summaries' `_sum` and
/// `_count` are the registry's lifetime totals.
fn table_families(metrics: &Metrics, table: &RoutingTable, window: Duration) -> Vec<MetricFamily> {
    let scratch = Registry::new_custom(Some(NAMESPACE.into()), None)
        .expect("static registry prefix is valid");
    let gauge = |name: &str, help: &str, labels: &[&str]| -> Option<GaugeVec> {
        let g = GaugeVec::new(Opts::new(name, help), labels).ok()?;
        scratch.register(Box::new(g.clone())).ok()?;
        Some(g)
    };
    let weight = gauge(
        "arm_weight",
        "Current routing weight of each arm.",
        &["arm"],
    );
    let baseline = gauge(
        "arm_baseline",
        "1 for the baseline arm the rules compare the others with, else 0.",
        &["arm"],
    );
    let baseline_index = table.baseline_index();
    let breaker = gauge(
        "breaker_state",
        "Circuit breaker of each arm: 0 closed, 1 open, 2 half-open.",
        &["arm"],
    );
    if let Some(frozen) = gauge("writes_frozen", "1 while writes are frozen, else 0.", &[]) {
        frozen
            .with_label_values::<&str>(&[])
            .set(if table.controls.frozen { 1.0 } else { 0.0 });
    }
    let mut latency = Vec::new();
    let mut delta_s = Vec::new();
    let coverage = gauge(
        "coverage_mean",
        "Mean evidence coverage over the rule window.",
        &["arm"],
    );
    let retrieval_coverage = gauge(
        "retrieval_coverage_mean",
        "Mean retrieval coverage (IDF-weighted share of the question's tokens in the chunks) over the rule window.",
        &["arm"],
    );
    let flips = gauge(
        "lambda_flip_rate",
        "(divergent + chaotic) / evaluated over the rule window.",
        &["arm"],
    );
    let pin_names: BTreeSet<String> = table
        .arms()
        .iter()
        .flat_map(|a| a.pins.map().keys().map(|k| k.to_ascii_lowercase()))
        .collect();
    let mut labels: Vec<&str> = vec!["arm"];
    labels.extend(pin_names.iter().map(String::as_str));
    let pins = gauge(
        "pins_info",
        "Version pins stamped for each arm (value always 1).",
        &labels,
    );

    let now = Instant::now();
    for (i, (arm, w)) in table.arms().iter().zip(table.weights()).enumerate() {
        let name = arm.name.as_str();
        let stats = arm.stats.window.stats(now, window);
        if let Some(g) = &weight {
            g.with_label_values(&[name]).set(f64::from(*w));
        }
        if let Some(g) = &baseline {
            g.with_label_values(&[name])
                .set(if Some(i) == baseline_index { 1.0 } else { 0.0 });
        }
        if let Some(g) = &breaker {
            g.with_label_values(&[name])
                .set(arm.breaker.state(now).as_metric() as f64);
        }
        let latency_q: Vec<(f64, f64)> = QUANTILES
            .iter()
            .filter_map(|q| Some((*q, stats.hist(Hist::Latency).quantile(*q)? as f64 / 1e6)))
            .collect();
        latency.push(summary(
            &[("arm", name)],
            &latency_q,
            metrics.duration_totals(name),
        ));
        for (hist, probe) in PROBES {
            let q: Vec<(f64, f64)> = QUANTILES
                .iter()
                .filter_map(|q| Some((*q, stats.signal_quantile(hist, *q)?)))
                .collect();
            delta_s.push(summary(
                &[("arm", name), ("probe", probe)],
                &q,
                metrics.delta_s_totals(name, probe),
            ));
        }
        if let (Some(g), Some(v)) = (&coverage, stats.signal_mean(Hist::Coverage)) {
            g.with_label_values(&[name]).set(v);
        }
        if let (Some(g), Some(v)) = (
            &retrieval_coverage,
            stats.signal_mean(Hist::RetrievalCoverage),
        ) {
            g.with_label_values(&[name]).set(v);
        }
        if let (Some(g), Some(v)) = (&flips, stats.lambda_flip_rate()) {
            g.with_label_values(&[name]).set(v);
        }
        if let Some(g) = &pins {
            let mut values: Vec<&str> = vec![name];
            values.extend(
                pin_names
                    .iter()
                    .map(|p| arm.pins.get(&p.to_ascii_uppercase()).unwrap_or("")),
            );
            g.with_label_values(&values).set(1.0);
        }
    }
    let mut families = scratch.gather();
    families.push(summary_family(
        "latency_quantile_seconds",
        "Request latency quantiles over the rule window (HDR histogram, <= 1% relative error); _sum and _count are lifetime totals.",
        latency,
    ));
    families.push(summary_family(
        "semantic_drift_quantile",
        "ΔS quantiles over the rule window, by probe; _sum and _count are lifetime totals.",
        delta_s,
    ));
    families
}

/// A summary family: Prometheus's type for samples labelled by `quantile`.
fn summary_family(name: &str, help: &str, metrics: Vec<Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(format!("{NAMESPACE}_{name}"));
    family.set_help(help.to_string());
    family.set_field_type(MetricType::SUMMARY);
    family.set_metric(metrics);
    family
}

/// One summary series: window quantiles with the lifetime (count, sum).
fn summary(labels: &[(&str, &str)], quantiles: &[(f64, f64)], (count, sum): (u64, f64)) -> Metric {
    let mut s = Summary::default();
    s.set_sample_count(count);
    s.set_sample_sum(sum);
    s.set_quantile(
        quantiles
            .iter()
            .map(|(q, v)| {
                let mut quantile = Quantile::default();
                quantile.set_quantile(*q);
                quantile.set_value(*v);
                quantile
            })
            .collect(),
    );
    let mut metric = Metric::default();
    metric.set_label(
        labels
            .iter()
            .map(|(k, v)| {
                let mut pair = LabelPair::default();
                pair.set_name(k.to_string());
                pair.set_value(v.to_string());
                pair
            })
            .collect(),
    );
    metric.set_summary(s);
    metric
}
