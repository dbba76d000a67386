//! Metrics: the Prometheus registry, per-arm recording handles and the `/metrics` rendering (SPEC §7).
//!
//! Label children are resolved once per arm ([`ArmStats`]) so the request path never hashes label
//! values. Families whose label sets follow the live routing table (weights, pins, window quantiles) are
//! built fresh at scrape time, so an arm removed by a reload disappears from them.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

use crate::serve::router::RoutingTable;
use crate::windows::{Counter, Hist, Window};
use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary};

pub const NAMESPACE: &str = "driftguard";

/// Latency buckets, seconds: LLM answers range from a cached hit to a minute-long stream.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

pub const QUANTILES: [(f64, &str); 3] = [(0.5, "0.5"), (0.95, "0.95"), (0.99, "0.99")];

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Process-wide metrics and the per-arm stats, keyed by arm name so they survive reloads.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    ttfb: HistogramVec,
    pin_mismatch: IntCounterVec,
    proxy_errors: IntCounterVec,
    delta_s: HistogramVec,
    coverage: HistogramVec,
    lambda: IntCounterVec,
    tool_loops: IntCounterVec,
    tokens: IntCounterVec,
    evaluations: IntCounterVec,
    pub reloads: IntCounterVec,
    pub eval_dropped: IntCounter,
    /// OpenTelemetry: spans lost (queue full, export failed) and spans delivered.
    pub otel_dropped_spans: IntCounterVec,
    pub otel_exported_spans: IntCounter,
    pub eval_queue_depth: IntGauge,
    pub eval_skipped: IntCounterVec,
    /// `build_info{version, embedder}`, set by the signals pipeline.
    pub build_info: GaugeVec,
    pub eval_errors: IntCounterVec,
    pub tee_truncated: IntCounterVec,
    pub rate_limited: IntCounterVec,
    /// Rollback engine: `guard_state`, trips and findings by rule, state transitions.
    pub guard_state: IntGauge,
    pub trips: IntCounterVec,
    pub baseline_breaches: IntCounterVec,
    pub rule_warnings: IntCounterVec,
    pub transitions: IntCounterVec,
    /// Rollback hook runs by hook name and outcome (`hooks::HookOutcome`).
    pub hook_runs: IntCounterVec,
    /// Requests sent to `breaker.degrade_target` because their arm's breaker was open.
    pub breaker_fallbacks: IntCounterVec,
    /// Idempotency fence decisions (new, replay, conflict, wait).
    pub idempotency: IntCounterVec,
    /// Upstream executions of a key that already had a live receipt; must stay 0.
    pub duplicate_effects: IntCounter,
    /// Receipt store operations that failed (unreachable Redis, disk errors).
    pub receipt_store_errors: IntCounter,
    /// Failed calls of the budget's Redis backend (`driftguard_budget_backend_errors_total`).
    pub budget_backend_errors: IntCounter,
    origin: Instant,
    arms: Mutex<HashMap<String, Arc<ArmStats>>>,
}

/// Buckets of signals in [0, 1].
const SIGNAL_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85,
    0.9, 0.95, 1.0,
];

/// λ states in the order of their window counters (`Counter::LambdaConvergent` onwards).
pub const LAMBDA_STATES: [&str; 4] = ["convergent", "recursive", "divergent", "chaotic"];

pub const PROBES: [(Hist, &str); 3] = [
    (Hist::DeltaSQr, "qr"),
    (Hist::DeltaSRa, "ra"),
    (Hist::DeltaS, "max"),
];

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .expect("static metric definition is valid");
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    let h = HistogramVec::new(opts, labels).expect("static metric definition is valid");
    registry
        .register(Box::new(h.clone()))
        .expect("metric names are unique");
    h
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new_custom(Some(NAMESPACE.into()), None)
            .expect("static registry prefix is valid");
        let build_info = GaugeVec::new(
            Opts::new("build_info", "Build of this driftguard (value always 1)."),
            &["version", "embedder"],
        )
        .expect("static metric definition is valid");
        // Its one series is set by the signals pipeline, which knows the embedder.
        r.register(Box::new(build_info.clone()))
            .expect("metric names are unique");
        let eval_dropped = IntCounter::new(
            "eval_dropped_total",
            "Samples dropped because the evaluation queue was full.",
        )
        .expect("static metric definition is valid");
        let eval_queue_depth = IntGauge::new(
            "eval_queue_depth",
            "Samples waiting in the evaluation queue.",
        )
        .expect("static metric definition is valid");
        r.register(Box::new(eval_dropped.clone()))
            .expect("metric names are unique");
        r.register(Box::new(eval_queue_depth.clone()))
            .expect("metric names are unique");
        let guard_state = IntGauge::new(
            "guard_state",
            "Rollback engine state: 0 healthy, 1 tripped, 2 recovering, 3 escalated.",
        )
        .expect("static metric definition is valid");
        r.register(Box::new(guard_state.clone()))
            .expect("metric names are unique");
        let duplicate_effects = IntCounter::new(
            "duplicate_effects_total",
            "Upstream executions of an idempotency key that already had a live receipt (must stay 0).",
        )
        .expect("static metric definition is valid");
        let receipt_store_errors = IntCounter::new(
            "idempotency_store_errors_total",
            "Idempotency receipt store operations that failed.",
        )
        .expect("static metric definition is valid");
        r.register(Box::new(duplicate_effects.clone()))
            .expect("metric names are unique");
        r.register(Box::new(receipt_store_errors.clone()))
            .expect("metric names are unique");
        let budget_backend_errors = IntCounter::new(
            "budget_backend_errors_total",
            "Calls to the budget's Redis backend that failed or timed out.",
        )
        .expect("static metric definition is valid");
        r.register(Box::new(budget_backend_errors.clone()))
            .expect("metric names are unique");
        let m = Metrics {
            requests: counter_vec(&r, "requests_total", "Responses sent to clients, by arm and status class.", &["arm", "class"]),
            duration: histogram_vec(&r, "request_duration_seconds", "Time from request to the end of the response body.", LATENCY_BUCKETS, &["arm"]),
            ttfb: histogram_vec(&r, "ttfb_seconds", "Time from request to the first response body byte (TTFT for streams).", LATENCY_BUCKETS, &["arm"]),
            pin_mismatch: counter_vec(&r, "pin_mismatch_total", "Upstream-echoed x-pin-* values that differ from the stamped pin.", &["arm", "pin"]),
            proxy_errors: counter_vec(&r, "proxy_errors_total", "Responses the proxy made itself, by kind.", &["kind"]),
            delta_s: histogram_vec(&r, "semantic_drift", "Semantic drift ΔS of evaluated answers, by probe (qr, ra, max).", SIGNAL_BUCKETS, &["arm", "probe"]),
            coverage: histogram_vec(&r, "coverage", "Share of the answer's content tokens found in the retrieved chunks.", SIGNAL_BUCKETS, &["arm"]),
            lambda: counter_vec(&r, "lambda_total", "Evaluated answers by convergence state λ.", &["arm", "state"]),
            tool_loops: counter_vec(&r, "tool_loops_total", "Responses with a repeated tool call (3 in one response or 3 responses of a session).", &["arm"]),
            tokens: counter_vec(&r, "tokens_total", "Tokens reported in upstream usage, by kind (prompt, completion).", &["arm", "kind"]),
            evaluations: counter_vec(&r, "evaluations_total", "Responses whose quality signals were computed.", &["arm"]),
            reloads: counter_vec(&r, "config_reloads_total", "Configuration reloads, by outcome.", &["outcome"]),
            eval_skipped: counter_vec(&r, "eval_skipped_total", "Sampled responses not evaluated, by reason.", &["reason"]),
            otel_dropped_spans: counter_vec(&r, "otel_dropped_spans_total", "OpenTelemetry spans not delivered, by reason (queue_full, export_failed).", &["reason"]),
            otel_exported_spans: {
                let c = IntCounter::new("otel_exported_spans_total", "OpenTelemetry spans the collector accepted.")
                    .expect("static metric definition is valid");
                r.register(Box::new(c.clone())).expect("metric names are unique");
                c
            },
            build_info,
            eval_errors: counter_vec(&r, "eval_errors_total", "Evaluations that failed, by stage (embedder).", &["stage"]),
            rate_limited: counter_vec(
                &r,
                "rate_limited_total",
                "Requests refused by the token budget (429; 503 for backend_down), by reason.",
                &["reason"],
            ),
            hook_runs: counter_vec(&r, "hook_runs_total", "Rollback hook runs, by hook and outcome (ok, failed, timeout).", &["hook", "outcome"]),
            tee_truncated: counter_vec(&r, "tee_truncated_total", "Body copies stopped at signals.max_body_bytes, by direction.", &["direction"]),
            trips: counter_vec(&r, "trips_total", "Rule trips (dry-run trips included), by rule.", &["rule"]),
            baseline_breaches: counter_vec(&r, "baseline_breaches_total", "Rule breaches the baseline shared, so no trip, by rule.", &["rule"]),
            rule_warnings: counter_vec(&r, "rule_warnings_total", "Soft-rule breaches (warnings only), by rule.", &["rule"]),
            transitions: counter_vec(&r, "guard_transitions_total", "Rollback engine state changes, by new state.", &["state"]),
            breaker_fallbacks: counter_vec(&r, "breaker_fallbacks_total", "Requests routed to breaker.degrade_target because their arm's breaker was open.", &["arm", "target"]),
            idempotency: counter_vec(&r, "idempotency_total", "Idempotency fence decisions for keyed writes.", &["decision"]),
            receipt_store_errors,
            eval_dropped,
            eval_queue_depth,
            guard_state,
            duplicate_effects,
            budget_backend_errors,
            registry: r,
            origin: Instant::now(),
            arms: Mutex::new(HashMap::new()),
        };
        for outcome in ["ok", "refused"] {
            m.reloads.with_label_values(&[outcome]);
        }
        for direction in ["request", "response"] {
            m.tee_truncated.with_label_values(&[direction]);
        }
        m.eval_errors.with_label_values(&["embedder"]);
        for reason in ["over_budget", "too_large", "backend_down"] {
            m.rate_limited.with_label_values(&[reason]);
        }
        for state in crate::rollback::state::GuardState::ALL {
            m.transitions.with_label_values(&[state.as_str()]);
        }
        for rule in crate::rules::Rule::ALL {
            m.trips.with_label_values(&[rule.name()]);
        }
        for decision in crate::guards::fence::DECISIONS {
            m.idempotency.with_label_values(&[decision]);
        }
        m
    }

    /// The stats of an arm, created on first use and kept for the process's life.
    pub fn arm(&self, name: &str) -> Arc<ArmStats> {
        let mut arms = self.arms.lock().unwrap_or_else(|p| p.into_inner());
        arms.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(ArmStats {
                    name: name.to_string(),
                    window: Window::new(self.origin),
                    requests: CLASSES.map(|c| self.requests.with_label_values(&[name, c])),
                    duration: self.duration.with_label_values(&[name]),
                    ttfb: self.ttfb.with_label_values(&[name]),
                    pin_mismatch: self.pin_mismatch.clone(),
                    delta_s: PROBES
                        .map(|(_, probe)| self.delta_s.with_label_values(&[name, probe])),
                    coverage: self.coverage.with_label_values(&[name]),
                    lambda: LAMBDA_STATES
                        .map(|state| self.lambda.with_label_values(&[name, state])),
                    tool_loops: self.tool_loops.with_label_values(&[name]),
                    tokens: ["prompt", "completion"]
                        .map(|k| self.tokens.with_label_values(&[name, k])),
                    evaluations: self.evaluations.with_label_values(&[name]),
                    recent: Mutex::new(std::collections::VecDeque::with_capacity(RECENT)),
                })
            })
            .clone()
    }

    /// Counts a response the proxy made itself; `kind` is the label (`serve::error::ProxyError`).
    pub fn proxy_error(&self, kind: &'static str) {
        self.proxy_errors.with_label_values(&[kind]).inc();
    }

    /// Creates the `driftguard_proxy_errors_total` series of every kind at 0, so they exist before the
    /// first error; the request path passes its list of kinds.
    pub fn register_proxy_errors(&self, kinds: &[&'static str]) {
        for kind in kinds {
            self.proxy_errors.with_label_values(&[kind]);
        }
    }

    /// Clears the next window slot of every arm ahead of time; run every second or so.
    pub fn rotate_windows(&self) {
        let now = Instant::now();
        let arms: Vec<Arc<ArmStats>> = self
            .arms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for arm in arms {
            arm.window.prepare_next(now);
        }
    }

    /// The Prometheus text exposition of everything, with the live table's weights, pins and quantiles.
    /// `budget_available` is the token budget's headroom, when there is a budget.
    pub fn render(
        &self,
        table: &RoutingTable,
        window: Duration,
        budget_available: Option<u64>,
    ) -> String {
        let mut families = self.registry.gather();
        families.extend(table_families(table, window));
        if let Some(available) = budget_available {
            if let Ok(g) = IntGauge::new(
                format!("{NAMESPACE}_budget_available_tokens"),
                "Tokens the global budget would admit now.",
            ) {
                g.set(i64::try_from(available).unwrap_or(i64::MAX));
                families.extend(prometheus::core::Collector::collect(&g));
            }
        }
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Families derived from the routing table and the windows at scrape time.
fn table_families(table: &RoutingTable, window: Duration) -> Vec<MetricFamily> {
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
            .filter_map(|(q, _)| Some((*q, stats.hist(Hist::Latency).quantile(*q)? as f64 / 1e6)))
            .collect();
        let d = &arm.stats.duration;
        latency.push(summary(
            &[("arm", name)],
            &latency_q,
            d.get_sample_count(),
            d.get_sample_sum(),
        ));
        for ((hist, probe), h) in PROBES.iter().zip(&arm.stats.delta_s) {
            let q: Vec<(f64, f64)> = QUANTILES
                .iter()
                .filter_map(|(q, _)| Some((*q, stats.signal_quantile(*hist, *q)?)))
                .collect();
            delta_s.push(summary(
                &[("arm", name), ("probe", probe)],
                &q,
                h.get_sample_count(),
                h.get_sample_sum(),
            ));
        }
        if let (Some(g), Some(v)) = (&coverage, stats.signal_mean(Hist::Coverage)) {
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

fn summary(labels: &[(&str, &str)], quantiles: &[(f64, f64)], count: u64, sum: f64) -> Metric {
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

/// What one evaluation found, as recorded. `lambda` indexes [`LAMBDA_STATES`].
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    pub delta_s_qr: f64,
    pub delta_s_ra: f64,
    pub delta_s: f64,
    pub coverage: Option<f64>,
    pub lambda: usize,
}

const LAMBDA_COUNTERS: [Counter; 4] = [
    Counter::LambdaConvergent,
    Counter::LambdaRecursive,
    Counter::LambdaDivergent,
    Counter::LambdaChaotic,
];

// === impl ArmStats ===

/// Everything recorded for one arm: its window ring and its Prometheus children.
pub struct ArmStats {
    pub name: String,
    pub window: Window,
    requests: [IntCounter; 5],
    duration: Histogram,
    ttfb: Histogram,
    pin_mismatch: IntCounterVec,
    delta_s: [Histogram; 3],
    coverage: Histogram,
    lambda: [IntCounter; 4],
    tool_loops: IntCounter,
    tokens: [IntCounter; 2],
    evaluations: IntCounter,
    /// The last evaluations' (ΔS, coverage), newest last, for rollback snapshots.
    recent: Mutex<std::collections::VecDeque<(f64, Option<f64>)>>,
}

/// Evaluations kept per arm for snapshots.
const RECENT: usize = 50;

impl ArmStats {
    /// A response was sent to the client with `status` (counted when the head goes out).
    #[inline]
    pub fn response(&self, at: Instant, status: u16) {
        let class = Counter::class_of(status);
        self.requests[class as usize].inc();
        self.window.count(at, class, 1);
        if status == 429 {
            self.window.count(at, Counter::RateLimited, 1);
        }
    }

    /// The first body byte arrived `ttfb` after the request started.
    #[inline]
    pub fn first_byte(&self, at: Instant, ttfb: Duration) {
        self.ttfb.observe(ttfb.as_secs_f64());
        self.window.record(at, Hist::Ttfb, ttfb.as_micros() as u64);
    }

    /// The response body completed (or the client went away) `latency` after the request started.
    #[inline]
    pub fn completed(&self, at: Instant, latency: Duration) {
        self.duration.observe(latency.as_secs_f64());
        self.window
            .record(at, Hist::Latency, latency.as_micros() as u64);
    }

    pub fn upstream_error(&self, at: Instant, timeout: bool) {
        let counter = if timeout {
            Counter::Timeouts
        } else {
            Counter::UpstreamErrors
        };
        self.window.count(at, counter, 1);
    }

    /// The signals of one evaluated response.
    pub fn evaluated(&self, at: Instant, s: &Evaluation) {
        let w = &self.window;
        w.count(at, Counter::Evaluated, 1);
        self.evaluations.inc();
        for ((hist, _), (value, prom)) in PROBES.iter().zip(
            [s.delta_s_qr, s.delta_s_ra, s.delta_s]
                .iter()
                .zip(&self.delta_s),
        ) {
            w.record(at, *hist, Hist::scaled(*value));
            prom.observe(*value);
        }
        if let Some(c) = s.coverage {
            w.record(at, Hist::Coverage, Hist::scaled(c));
            self.coverage.observe(c);
        }
        w.count(at, LAMBDA_COUNTERS[s.lambda], 1);
        self.lambda[s.lambda].inc();
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back((s.delta_s, s.coverage));
    }

    /// The last evaluations' (ΔS, coverage), oldest first.
    pub fn recent(&self) -> Vec<(f64, Option<f64>)> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().copied().collect()
    }

    /// Usage and tool loops of a response, recorded whether or not its signals could be computed.
    pub fn usage(
        &self,
        at: Instant,
        prompt_tokens: Option<u64>,
        completion_tokens: Option<u64>,
        tool_loop: bool,
    ) {
        let w = &self.window;
        if tool_loop {
            w.count(at, Counter::ToolLoops, 1);
            self.tool_loops.inc();
        }
        for ((n, counter), prom) in [
            (prompt_tokens, Counter::PromptTokens),
            (completion_tokens, Counter::CompletionTokens),
        ]
        .into_iter()
        .zip(&self.tokens)
        {
            if let Some(n) = n {
                w.count(at, counter, n);
                prom.inc_by(n);
            }
        }
    }

    pub fn pin_mismatch(&self, at: Instant, pin: &str) {
        self.pin_mismatch
            .with_label_values(&[self.name.as_str(), pin])
            .inc();
        self.window.count(at, Counter::PinMismatches, 1);
    }
}
