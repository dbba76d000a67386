//! Metrics: the Prometheus registry, per-arm recording handles and the `/metrics` rendering (SPEC §7).
//!
//! Label children are resolved once per arm ([`ArmStats`]) so the request path never hashes label
//! values. Families whose label sets follow the live routing table (weights, pins, window quantiles) are
//! built fresh at scrape time, so an arm removed by a reload disappears from them.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};

use crate::router::RoutingTable;
use crate::windows::{Counter, Hist, Window};

pub const NAMESPACE: &str = "driftguard";

/// Latency buckets, seconds: LLM answers range from a cached hit to a minute-long stream.
const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

pub const QUANTILES: [(f64, &str); 3] = [(0.5, "0.5"), (0.95, "0.95"), (0.99, "0.99")];

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Why the proxy answered a request itself; the `kind` label of `driftguard_proxy_errors_total` and the
/// `error` field of the JSON error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// Upstream refused or reset the connection, or failed before a response: 502.
    UpstreamUnreachable,
    /// Upstream did not connect or answer in time: 504.
    UpstreamTimeout,
    /// Strict pins: the client's pins differ: 409.
    PinMismatch,
    /// No arm has a weight above 0: 503.
    NoUpstream,
}

impl ProxyError {
    pub const ALL: [ProxyError; 4] =
        [ProxyError::UpstreamUnreachable, ProxyError::UpstreamTimeout, ProxyError::PinMismatch, ProxyError::NoUpstream];

    pub fn as_str(self) -> &'static str {
        match self {
            ProxyError::UpstreamUnreachable => "upstream_unreachable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::PinMismatch => "pin_mismatch",
            ProxyError::NoUpstream => "no_upstream",
        }
    }
}

/// Process-wide metrics and the per-arm stats, keyed by arm name so they survive reloads.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    ttfb: HistogramVec,
    pin_mismatch: IntCounterVec,
    proxy_errors: IntCounterVec,
    pub reloads: IntCounterVec,
    origin: Instant,
    arms: Mutex<HashMap<String, Arc<ArmStats>>>,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some(NAMESPACE.into()), None).expect("static registry prefix is valid");
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Responses sent to clients, by arm and status class."),
            &["arm", "class"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Time from request to the end of the response body.")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["arm"],
        )
        .expect("valid metric");
        let ttfb = HistogramVec::new(
            HistogramOpts::new("ttfb_seconds", "Time from request to the first response body byte (TTFT for streams).")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["arm"],
        )
        .expect("valid metric");
        let pin_mismatch = IntCounterVec::new(
            Opts::new("pin_mismatch_total", "Upstream-echoed x-pin-* values that differ from the stamped pin."),
            &["arm", "pin"],
        )
        .expect("valid metric");
        let proxy_errors = IntCounterVec::new(
            Opts::new("proxy_errors_total", "Responses the proxy made itself, by kind."),
            &["kind"],
        )
        .expect("valid metric");
        let reloads =
            IntCounterVec::new(Opts::new("config_reloads_total", "Configuration reloads, by outcome."), &["outcome"])
                .expect("valid metric");
        let build_info = GaugeVec::new(Opts::new("build_info", "Build of this driftguard."), &["version"])
            .expect("valid metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1.0);
        for kind in ProxyError::ALL {
            proxy_errors.with_label_values(&[kind.as_str()]);
        }
        for outcome in ["ok", "refused"] {
            reloads.with_label_values(&[outcome]);
        }
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(ttfb.clone()),
            Box::new(pin_mismatch.clone()),
            Box::new(proxy_errors.clone()),
            Box::new(reloads.clone()),
            Box::new(build_info),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            duration,
            ttfb,
            pin_mismatch,
            proxy_errors,
            reloads,
            origin: Instant::now(),
            arms: Mutex::new(HashMap::new()),
        }
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
                })
            })
            .clone()
    }

    pub fn proxy_error(&self, kind: ProxyError) {
        self.proxy_errors.with_label_values(&[kind.as_str()]).inc();
    }

    /// Clears the next window slot of every arm ahead of time; run every second or so.
    pub fn rotate_windows(&self) {
        let now = Instant::now();
        let arms: Vec<Arc<ArmStats>> = self.arms.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for arm in arms {
            arm.window.prepare_next(now);
        }
    }

    /// The Prometheus text exposition of everything, with the live table's weights, pins and quantiles.
    pub fn render(&self, table: &RoutingTable, quantile_window: Duration) -> String {
        let mut families = self.registry.gather();
        families.extend(table_families(table, quantile_window));
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

/// Families derived from the routing table at scrape time.
fn table_families(table: &RoutingTable, quantile_window: Duration) -> Vec<prometheus::proto::MetricFamily> {
    let scratch = Registry::new_custom(Some(NAMESPACE.into()), None).expect("static registry prefix is valid");
    let weight = GaugeVec::new(Opts::new("arm_weight", "Current routing weight of each arm."), &["arm"])
        .expect("valid metric");
    let quantile = GaugeVec::new(
        Opts::new(
            "latency_quantile_seconds",
            "Request latency quantiles over the rule window (HDR histogram, <= 1% relative error).",
        ),
        &["arm", "quantile"],
    )
    .expect("valid metric");
    let pin_names: BTreeSet<String> =
        table.arms().iter().flat_map(|a| a.pins.map().keys().map(|k| k.to_ascii_lowercase())).collect();
    let mut labels: Vec<&str> = vec!["arm"];
    labels.extend(pin_names.iter().map(String::as_str));
    let pins = GaugeVec::new(Opts::new("pins_info", "Version pins stamped for each arm (value always 1)."), &labels)
        .expect("pin names are valid label names");

    let now = Instant::now();
    for (arm, w) in table.arms().iter().zip(table.weights()) {
        weight.with_label_values(&[arm.name.as_str()]).set(f64::from(*w));
        let stats = arm.stats.window.stats(now, quantile_window);
        let latency = stats.hist(Hist::Latency);
        for (q, label) in QUANTILES {
            if let Some(us) = latency.quantile(q) {
                quantile.with_label_values(&[arm.name.as_str(), label]).set(us as f64 / 1e6);
            }
        }
        let mut values: Vec<&str> = vec![arm.name.as_str()];
        for name in &pin_names {
            values.push(arm.pins.get(&name.to_ascii_uppercase()).unwrap_or(""));
        }
        pins.with_label_values(&values).set(1.0);
    }
    for c in [
        Box::new(weight) as Box<dyn prometheus::core::Collector>,
        Box::new(quantile),
        Box::new(pins),
    ] {
        if let Err(e) = scratch.register(c) {
            tracing::error!(error = %e, "cannot register table metrics");
        }
    }
    scratch.gather()
}

// === impl ArmStats ===

/// Everything recorded for one arm: its window ring and its Prometheus children.
pub struct ArmStats {
    pub name: String,
    pub window: Window,
    requests: [IntCounter; 5],
    duration: Histogram,
    ttfb: Histogram,
    pin_mismatch: IntCounterVec,
}

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
        self.window.record(at, Hist::Latency, latency.as_micros() as u64);
    }

    pub fn upstream_error(&self, at: Instant, kind: ProxyError) {
        let counter = if kind == ProxyError::UpstreamTimeout { Counter::Timeouts } else { Counter::UpstreamErrors };
        self.window.count(at, counter, 1);
    }

    pub fn pin_mismatch(&self, at: Instant, pin: &str) {
        self.pin_mismatch.with_label_values(&[self.name.as_str(), pin]).inc();
        self.window.count(at, Counter::PinMismatches, 1);
    }
}
