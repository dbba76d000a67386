//! Metrics: the Prometheus registry of SPEC §7 — it registers the families and renders them; what to
//! record comes from its callers. The per-arm families are written through [`crate::windows::Mirror`]
//! ([`PromMirror`], label children resolved once per arm) so the request path never hashes label values.
//! `admin::metrics` adds the families that follow the live routing table at scrape time.

use std::time::Duration;

use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

use crate::windows::{Arms, Counter, Evaluation, Mirror, Mirrors, LAMBDA_STATES, PROBES};

pub const NAMESPACE: &str = "driftguard";

/// Latency buckets, seconds: LLM answers range from a cached hit to a minute-long stream.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Label values registered up front so their series read 0 before the first event; the caller (app)
/// names them, since they belong to modules telemetry does not use.
#[derive(Debug, Clone, Copy, Default)]
pub struct Labels<'a> {
    /// `driftguard_guard_transitions_total{state}`.
    pub guard_states: &'a [&'a str],
    /// `driftguard_trips_total{rule}`.
    pub rules: &'a [&'a str],
    /// `driftguard_idempotency_total{decision}`.
    pub fence_decisions: &'a [&'a str],
    /// `driftguard_proxy_errors_total{kind}`.
    pub proxy_errors: &'a [&'a str],
}

/// The fleet's series; see [`Metrics::fleet`].
#[derive(Clone)]
pub struct FleetMetrics {
    pub replicas: IntGauge,
    pub generation: IntGauge,
    pub errors: IntCounterVec,
}

/// Process-wide metrics, and the per-arm stats (keyed by arm name so they survive reloads).
pub struct Metrics {
    registry: Registry,
    /// Read back for the lifetime `_sum`/`_count` of the table's quantile summaries.
    duration: HistogramVec,
    delta_s: HistogramVec,
    proxy_errors: IntCounterVec,
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
    /// Client connections closed at accept because the proxy held `listen.max_connections`.
    pub connections_refused: IntCounter,
    /// Every arm's window and its mirror into the per-arm families; `arms.arm(name)` for the routing
    /// table, `arms.rotate()` for the rotation tick.
    pub arms: Arms,
}

/// Buckets of signals in [0, 1].
const SIGNAL_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85,
    0.9, 0.95, 1.0,
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
    /// A registry without the caller's label values (tests, tools).
    pub fn new() -> Self {
        Self::with_labels(Labels::default())
    }

    /// The registry, with `labels` registered up front.
    pub fn with_labels(labels: Labels<'_>) -> Self {
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
        let connections_refused = IntCounter::new(
            "connections_refused_total",
            "Client connections closed at accept because the proxy listener held listen.max_connections.",
        )
        .expect("static metric definition is valid");
        r.register(Box::new(connections_refused.clone()))
            .expect("metric names are unique");
        let requests = counter_vec(
            &r,
            "requests_total",
            "Responses sent to clients, by arm and status class.",
            &["arm", "class"],
        );
        let duration = histogram_vec(
            &r,
            "request_duration_seconds",
            "Time from request to the end of the response body.",
            LATENCY_BUCKETS,
            &["arm"],
        );
        let ttfb = histogram_vec(
            &r,
            "ttfb_seconds",
            "Time from request to the first response body byte (TTFT for streams).",
            LATENCY_BUCKETS,
            &["arm"],
        );
        let pin_mismatch = counter_vec(
            &r,
            "pin_mismatch_total",
            "Upstream-echoed x-pin-* values that differ from the stamped pin.",
            &["arm", "pin"],
        );
        let delta_s = histogram_vec(
            &r,
            "semantic_drift",
            "Semantic drift ΔS of evaluated answers, by probe (qr, ra, max).",
            SIGNAL_BUCKETS,
            &["arm", "probe"],
        );
        let coverage = histogram_vec(
            &r,
            "coverage",
            "Share of the answer's content tokens found in the retrieved chunks.",
            SIGNAL_BUCKETS,
            &["arm"],
        );
        let retrieval_coverage = histogram_vec(
            &r,
            "retrieval_coverage",
            "IDF-weighted share of the question's content tokens found in the retrieved chunks.",
            SIGNAL_BUCKETS,
            &["arm"],
        );
        let lambda = counter_vec(
            &r,
            "lambda_total",
            "Evaluated answers by convergence state λ.",
            &["arm", "state"],
        );
        let tool_loops = counter_vec(
            &r,
            "tool_loops_total",
            "Responses with a repeated tool call (3 in one response or 3 responses of a session).",
            &["arm"],
        );
        let tokens = counter_vec(
            &r,
            "tokens_total",
            "Tokens reported in upstream usage, by kind (prompt, completion).",
            &["arm", "kind"],
        );
        let evaluations = counter_vec(
            &r,
            "evaluations_total",
            "Responses whose quality signals were computed.",
            &["arm"],
        );
        let arms = Arms::new(Box::new(PromMirrors {
            requests,
            duration: duration.clone(),
            ttfb,
            pin_mismatch,
            delta_s: delta_s.clone(),
            coverage,
            retrieval_coverage,
            lambda,
            tool_loops,
            tokens,
            evaluations,
        }));
        let m = Metrics {
            duration,
            delta_s,
            arms,
            proxy_errors: counter_vec(
                &r,
                "proxy_errors_total",
                "Responses the proxy made itself, by kind.",
                &["kind"],
            ),
            reloads: counter_vec(
                &r,
                "config_reloads_total",
                "Configuration reloads, by outcome.",
                &["outcome"],
            ),
            eval_skipped: counter_vec(
                &r,
                "eval_skipped_total",
                "Sampled responses not evaluated, by reason.",
                &["reason"],
            ),
            otel_dropped_spans: counter_vec(
                &r,
                "otel_dropped_spans_total",
                "OpenTelemetry spans not delivered, by reason (queue_full, export_failed).",
                &["reason"],
            ),
            otel_exported_spans: {
                let c = IntCounter::new(
                    "otel_exported_spans_total",
                    "OpenTelemetry spans the collector accepted.",
                )
                .expect("static metric definition is valid");
                r.register(Box::new(c.clone()))
                    .expect("metric names are unique");
                c
            },
            build_info,
            eval_errors: counter_vec(
                &r,
                "eval_errors_total",
                "Evaluations that failed, by stage (embedder).",
                &["stage"],
            ),
            rate_limited: counter_vec(
                &r,
                "rate_limited_total",
                "Requests refused by the token budget (429; 503 for backend_down), by reason.",
                &["reason"],
            ),
            hook_runs: counter_vec(
                &r,
                "hook_runs_total",
                "Rollback hook runs, by hook and outcome (ok, failed, timeout).",
                &["hook", "outcome"],
            ),
            tee_truncated: counter_vec(
                &r,
                "tee_truncated_total",
                "Body copies stopped at signals.max_body_bytes, by direction.",
                &["direction"],
            ),
            trips: counter_vec(
                &r,
                "trips_total",
                "Rule trips (dry-run trips included), by rule.",
                &["rule"],
            ),
            baseline_breaches: counter_vec(
                &r,
                "baseline_breaches_total",
                "Rule breaches the baseline shared, so no trip, by rule.",
                &["rule"],
            ),
            rule_warnings: counter_vec(
                &r,
                "rule_warnings_total",
                "Soft-rule breaches (warnings only), by rule.",
                &["rule"],
            ),
            transitions: counter_vec(
                &r,
                "guard_transitions_total",
                "Rollback engine state changes, by new state.",
                &["state"],
            ),
            breaker_fallbacks: counter_vec(
                &r,
                "breaker_fallbacks_total",
                "Requests routed to breaker.degrade_target because their arm's breaker was open.",
                &["arm", "target"],
            ),
            idempotency: counter_vec(
                &r,
                "idempotency_total",
                "Idempotency fence decisions for keyed writes.",
                &["decision"],
            ),
            receipt_store_errors,
            eval_dropped,
            eval_queue_depth,
            guard_state,
            duplicate_effects,
            budget_backend_errors,
            connections_refused,
            registry: r,
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
        for state in labels.guard_states {
            m.transitions.with_label_values(&[state]);
        }
        for rule in labels.rules {
            m.trips.with_label_values(&[rule]);
        }
        for kind in labels.proxy_errors {
            m.proxy_errors.with_label_values(&[kind]);
        }
        for decision in labels.fence_decisions {
            m.idempotency.with_label_values(&[decision]);
        }
        m
    }

    /// The fleet's series (`driftguard_fleet_replicas`, `_generation`, `_errors_total{op}`), registered
    /// once by app when a `[fleet]` is configured, so a single-pod driftguard shows none of them.
    pub fn fleet(&self, ops: &[&str]) -> FleetMetrics {
        let replicas = IntGauge::new(
            "fleet_replicas",
            "Replicas of this fleet scope with a heartbeat in the last rule window.",
        )
        .expect("static metric definition is valid");
        let generation = IntGauge::new(
            "fleet_generation",
            "Generation of the fleet state this replica applies (one per fleet-wide transition).",
        )
        .expect("static metric definition is valid");
        let errors = IntCounterVec::new(
            Opts::new(
                "fleet_errors_total",
                "Failed fleet calls to Redis, by operation.",
            ),
            &["op"],
        )
        .expect("static metric definition is valid");
        for c in [
            Box::new(replicas.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(generation.clone()),
            Box::new(errors.clone()),
        ] {
            if let Err(e) = self.registry.register(c) {
                tracing::warn!(error = %e, "fleet metrics already registered");
            }
        }
        for op in ops {
            errors.with_label_values(&[op]);
        }
        FleetMetrics {
            replicas,
            generation,
            errors,
        }
    }

    pub fn proxy_error(&self, kind: &'static str) {
        self.proxy_errors.with_label_values(&[kind]).inc();
    }

    /// Lifetime (count, sum in seconds) of an arm's request durations.
    pub fn duration_totals(&self, arm: &str) -> (u64, f64) {
        totals(&self.duration.with_label_values(&[arm]))
    }

    /// Lifetime (count, sum) of an arm's ΔS by probe (a label of [`PROBES`]).
    pub fn delta_s_totals(&self, arm: &str, probe: &str) -> (u64, f64) {
        totals(&self.delta_s.with_label_values(&[arm, probe]))
    }

    /// The Prometheus text exposition of the registry and of `extra` families (built by the caller at
    /// scrape time), sorted by name.
    pub fn render(&self, extra: Vec<MetricFamily>) -> String {
        let mut families = self.registry.gather();
        families.extend(extra);
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

fn totals(h: &Histogram) -> (u64, f64) {
    (h.get_sample_count(), h.get_sample_sum())
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

// === the per-arm mirror ===

/// The per-arm families, from which [`PromMirror`]s are resolved.
struct PromMirrors {
    requests: IntCounterVec,
    duration: HistogramVec,
    ttfb: HistogramVec,
    pin_mismatch: IntCounterVec,
    delta_s: HistogramVec,
    coverage: HistogramVec,
    retrieval_coverage: HistogramVec,
    lambda: IntCounterVec,
    tool_loops: IntCounterVec,
    tokens: IntCounterVec,
    evaluations: IntCounterVec,
}

impl Mirrors for PromMirrors {
    fn arm(&self, name: &str) -> Box<dyn Mirror> {
        Box::new(PromMirror {
            name: name.to_string(),
            requests: CLASSES.map(|c| self.requests.with_label_values(&[name, c])),
            duration: self.duration.with_label_values(&[name]),
            ttfb: self.ttfb.with_label_values(&[name]),
            pin_mismatch: self.pin_mismatch.clone(),
            delta_s: PROBES.map(|(_, probe)| self.delta_s.with_label_values(&[name, probe])),
            coverage: self.coverage.with_label_values(&[name]),
            retrieval_coverage: self.retrieval_coverage.with_label_values(&[name]),
            lambda: LAMBDA_STATES.map(|state| self.lambda.with_label_values(&[name, state])),
            tool_loops: self.tool_loops.with_label_values(&[name]),
            tokens: ["prompt", "completion"].map(|k| self.tokens.with_label_values(&[name, k])),
            evaluations: self.evaluations.with_label_values(&[name]),
        })
    }
}

/// One arm's Prometheus children: the lifetime counterpart of its window.
struct PromMirror {
    name: String,
    /// By status class, in the order of `Counter::Class1xx ..= Counter::Class5xx`.
    requests: [IntCounter; 5],
    duration: Histogram,
    ttfb: Histogram,
    /// Pins are few but open-ended, so their children are resolved per event (mismatches are rare).
    pin_mismatch: IntCounterVec,
    delta_s: [Histogram; 3],
    coverage: Histogram,
    retrieval_coverage: Histogram,
    lambda: [IntCounter; 4],
    tool_loops: IntCounter,
    tokens: [IntCounter; 2],
    evaluations: IntCounter,
}

impl Mirror for PromMirror {
    #[inline]
    fn response(&self, class: Counter) {
        if let Some(c) = self.requests.get(class as usize) {
            c.inc();
        }
    }

    #[inline]
    fn first_byte(&self, ttfb: Duration) {
        self.ttfb.observe(ttfb.as_secs_f64());
    }

    #[inline]
    fn completed(&self, latency: Duration) {
        self.duration.observe(latency.as_secs_f64());
    }

    fn evaluated(&self, e: &Evaluation) {
        for (h, value) in self.delta_s.iter().zip(e.probes()) {
            h.observe(value);
        }
        if let Some(c) = e.coverage {
            self.coverage.observe(c);
        }
        if let Some(c) = e.retrieval_coverage {
            self.retrieval_coverage.observe(c);
        }
        if let Some(c) = self.lambda.get(e.lambda) {
            c.inc();
        }
        // Last: a reader that sees the evaluation counted sees its signals too (in one scrape only if
        // it reads this family last — tests wait for every value they assert).
        self.evaluations.inc();
    }

    fn usage(&self, prompt_tokens: Option<u64>, completion_tokens: Option<u64>, tool_loop: bool) {
        if tool_loop {
            self.tool_loops.inc();
        }
        for (n, c) in [prompt_tokens, completion_tokens].iter().zip(&self.tokens) {
            if let Some(n) = n {
                c.inc_by(*n);
            }
        }
    }

    fn pin_mismatch(&self, pin: &str) {
        self.pin_mismatch
            .with_label_values(&[self.name.as_str(), pin])
            .inc();
    }
}
