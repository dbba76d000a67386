//! OpenTelemetry (SPEC §7): a SERVER span per proxied request and, once its signals are evaluated off
//! the request path, a `driftguard.evaluate` child span, exported over OTLP/HTTP (protobuf) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set.
//!
//! Without either, nothing here runs: `App::otel` is `None` and a request pays one `Option` check.
//! With one, a finished span goes into a bounded lock-free queue (full → dropped and counted), drained
//! by one exporter thread. Its HTTP requests run on the proxy's runtime as ordinary tasks with a timeout,
//! so a collector that is down, slow or failing costs spans, never latency or requests; its errors are
//! logged at most once a minute.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http::{HeaderMap, Method, Request, Response};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter as _, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus::{IntCounter, IntCounterVec};

use crate::net;
use crate::telemetry::metrics::Metrics;

/// The name of the span a sample's evaluation gets.
pub const EVALUATE_SPAN: &str = "driftguard.evaluate";

#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    #[error("OpenTelemetry needs the proxy's runtime to send spans")]
    NoRuntime,
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("cannot start the OpenTelemetry exporter thread: {0}")]
    Thread(std::io::Error),
}

/// Tracing, when the environment asks for it.
pub struct Otel {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    propagator: TraceContextPropagator,
}

/// The OTLP endpoint the environment names, unless `OTEL_SDK_DISABLED=true`.
pub fn endpoint_from_env() -> Option<String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return None;
    }
    var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

impl Otel {
    /// Starts tracing when the environment names an OTLP endpoint; `Ok(None)` when it does not. Must be
    /// called on the proxy's runtime: the exporter's HTTP requests are spawned on it.
    /// An `https://` endpoint is trusted through `roots` (the platform's and `[tls] ca_file`).
    pub fn from_env(metrics: &Metrics, roots: net::Roots) -> Result<Option<Arc<Otel>>, OtelError> {
        let Some(endpoint) = endpoint_from_env() else {
            return Ok(None);
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| OtelError::NoRuntime)?;
        let timeout = env_ms("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
            .or_else(|| env_ms("OTEL_EXPORTER_OTLP_TIMEOUT"))
            .unwrap_or(Duration::from_secs(10));
        let http = TokioHttp {
            client: net::Client::builder(timeout)
                .roots(roots)
                .max_response(MAX_RESPONSE_BYTES)
                .build(),
            runtime,
        };
        // The exporter reads the endpoints and OTEL_EXPORTER_OTLP_(TRACES_)HEADERS itself.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(http)
            .with_timeout(timeout)
            .build()
            .map_err(|e| OtelError::Exporter(e.to_string()))?;
        let batch = BatchConfig::from_env();
        let service = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "driftguard".into());
        let resource = Resource::builder()
            .with_service_name(service.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let mut exporter = exporter;
        exporter.set_resource(&resource);
        let processor = Batcher::start(exporter, batch, metrics)?;
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("driftguard");
        tracing::info!(
            endpoint = endpoint.as_str(),
            service = service.as_str(),
            "OpenTelemetry tracing on"
        );
        Ok(Some(Arc::new(Otel {
            tracer,
            provider,
            propagator: TraceContextPropagator::new(),
        })))
    }

    /// Starts the span of a request, a child of the client's `traceparent` when it sent one.
    pub fn start_request(
        self: &Arc<Self>,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        request_id: &str,
    ) -> RequestSpan {
        let parent = self.propagator.extract(&HeaderExtractor(headers));
        let span = self
            .tracer
            .span_builder(route(method, path))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.as_str().to_string()),
                KeyValue::new("url.path", path.to_string()),
                KeyValue::new("driftguard.request_id", request_id.to_string()),
            ])
            .start_with_context(&self.tracer, &parent);
        RequestSpan {
            otel: self.clone(),
            context: span.span_context().clone(),
            span: Mutex::new(Some(span)),
        }
    }

    /// Starts the evaluation span of a request's sample, a child of the request's span.
    pub fn start_evaluation(&self, parent: &SpanContext, request_id: &str) -> Span {
        let cx = Context::new().with_remote_span_context(parent.clone());
        self.tracer
            .span_builder(EVALUATE_SPAN)
            .with_kind(SpanKind::Internal)
            .with_attributes([KeyValue::new(
                "driftguard.request_id",
                request_id.to_string(),
            )])
            .start_with_context(&self.tracer, &cx)
    }

    /// Exports what is queued, waiting at most `limit`. Never blocks the runtime.
    pub async fn shutdown(&self, limit: Duration) {
        let provider = self.provider.clone();
        let done = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(limit));
        match tokio::time::timeout(limit + Duration::from_millis(200), done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "OpenTelemetry: spans not flushed at shutdown")
            }
            _ => tracing::warn!("OpenTelemetry: spans not flushed at shutdown (timed out)"),
        }
    }
}

/// `METHOD /path` with id-like path segments folded, so span names stay few.
pub fn route(method: &Method, path: &str) -> String {
    let mut name = String::with_capacity(method.as_str().len() + path.len() + 1);
    name.push_str(method.as_str());
    name.push(' ');
    let mut first = true;
    for segment in path.split('/') {
        if !first {
            name.push('/');
        }
        first = false;
        let digits = segment.bytes().filter(u8::is_ascii_digit).count();
        let id_like =
            !segment.is_empty() && (digits == segment.len() || (segment.len() >= 16 && digits > 0));
        name.push_str(if id_like { "{id}" } else { segment });
    }
    if path.is_empty() {
        name.push('/');
    }
    name
}

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|v| u64::from_str(v.trim()).ok())
        .map(Duration::from_millis)
}

// === impl RequestSpan ===

/// A request's span, shared by the paths that can end the request; the first to end it wins.
pub struct RequestSpan {
    otel: Arc<Otel>,
    context: SpanContext,
    span: Mutex<Option<Span>>,
}

impl RequestSpan {
    /// Writes `traceparent` (and `tracestate`) naming this span as the upstream request's parent.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let cx = Context::new().with_remote_span_context(self.context.clone());
        self.otel
            .propagator
            .inject_context(&cx, &mut HeaderInjector(headers));
    }

    /// What the evaluation of this request's sample needs to trace itself.
    pub fn follow_up(&self) -> FollowUp {
        FollowUp {
            otel: self.otel.clone(),
            parent: self.context.clone(),
        }
    }

    /// Ends the span with what the access log says about the request: the arm that served it (its
    /// name and pins), when one did.
    pub fn end(
        &self,
        arm: Option<(&str, &BTreeMap<String, String>)>,
        status: u16,
        latency: Duration,
        complete: bool,
    ) {
        let Some(mut span) = self.span.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        if !span.is_recording() {
            return;
        }
        if let Some((name, pins)) = arm {
            span.set_attribute(KeyValue::new("driftguard.arm", name.to_string()));
            for (pin, value) in pins {
                span.set_attribute(KeyValue::new(
                    format!("driftguard.pin.{pin}"),
                    value.clone(),
                ));
            }
        }
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        span.set_attribute(KeyValue::new(
            "driftguard.latency_ms",
            latency.as_secs_f64() * 1e3,
        ));
        span.set_attribute(KeyValue::new("driftguard.complete", complete));
        if status >= 500 {
            span.set_status(Status::error(format!("HTTP {status}")));
        }
        span.end();
    }
}

/// The request span an evaluation reports to, carried in its sample.
pub struct FollowUp {
    otel: Arc<Otel>,
    parent: SpanContext,
}

impl FollowUp {
    /// Starts the `driftguard.evaluate` span, a child of the request's span.
    pub fn start(&self, request_id: &str) -> Span {
        self.otel.start_evaluation(&self.parent, request_id)
    }
}

// === impl Batcher ===

/// Queue and batch sizes: the standard `OTEL_BSP_*` variables, with their defaults.
#[derive(Debug, Clone, Copy)]
struct BatchConfig {
    queue: usize,
    batch: usize,
    delay: Duration,
}

impl BatchConfig {
    fn from_env() -> Self {
        let num = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| usize::from_str(v.trim()).ok())
                .filter(|n| *n > 0)
        };
        let queue = num("OTEL_BSP_MAX_QUEUE_SIZE").unwrap_or(2048);
        BatchConfig {
            queue,
            batch: num("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
                .unwrap_or(512)
                .min(queue),
            delay: env_ms("OTEL_BSP_SCHEDULE_DELAY").unwrap_or(Duration::from_secs(5)),
        }
    }
}

/// The span processor: `on_end` only pushes into a bounded queue; one thread exports.
#[derive(Debug)]
struct Batcher {
    queue: Arc<ArrayQueue<SpanData>>,
    batch: usize,
    stop: Arc<AtomicBool>,
    thread: Arc<OnceLock<Thread>>,
    stopped: Mutex<Option<mpsc::Receiver<()>>>,
    dropped: IntCounter,
}

impl Batcher {
    fn start(
        exporter: opentelemetry_otlp::SpanExporter,
        config: BatchConfig,
        metrics: &Metrics,
    ) -> Result<Batcher, OtelError> {
        let queue = Arc::new(ArrayQueue::new(config.queue));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = Arc::new(OnceLock::new());
        let (stopped_tx, stopped) = mpsc::channel();
        let export = Export {
            queue: queue.clone(),
            stop: stop.clone(),
            exporter,
            config,
            exported: metrics.otel_exported_spans.clone(),
            dropped: metrics.otel_dropped_spans.clone(),
            health: Health::default(),
        };
        let handle = std::thread::Builder::new()
            .name("driftguard-otel".into())
            .spawn(move || {
                export.run();
                let _ = stopped_tx.send(());
            })
            .map_err(OtelError::Thread)?;
        let _ = thread.set(handle.thread().clone());
        let dropped = metrics
            .otel_dropped_spans
            .with_label_values(&["queue_full"]);
        metrics
            .otel_dropped_spans
            .with_label_values(&["export_failed"]);
        Ok(Batcher {
            queue,
            batch: config.batch,
            stop,
            thread,
            stopped: Mutex::new(Some(stopped)),
            dropped,
        })
    }

    fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }
}

impl SpanProcessor for Batcher {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.queue.push(span).is_err() {
            self.dropped.inc();
        } else if self.queue.len() == self.batch {
            self.wake();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.wake();
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let Some(stopped) = self
            .stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return Err(OTelSdkError::AlreadyShutdown);
        };
        self.stop.store(true, SeqCst);
        self.wake();
        stopped
            .recv_timeout(timeout)
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

/// The exporter thread's side of the queue.
struct Export {
    queue: Arc<ArrayQueue<SpanData>>,
    stop: Arc<AtomicBool>,
    exporter: opentelemetry_otlp::SpanExporter,
    config: BatchConfig,
    exported: IntCounter,
    dropped: IntCounterVec,
    health: Health,
}

impl Export {
    fn run(mut self) {
        loop {
            std::thread::park_timeout(self.config.delay);
            let stopping = self.stop.load(SeqCst);
            // A full batch wakes the thread early; export whatever there is, a batch at a time.
            while !self.queue.is_empty() {
                let mut batch = Vec::with_capacity(self.config.batch.min(self.queue.len()));
                while batch.len() < self.config.batch {
                    match self.queue.pop() {
                        Some(span) => batch.push(span),
                        None => break,
                    }
                }
                self.export(batch);
                if self.stop.load(SeqCst) && !stopping {
                    break;
                }
            }
            if stopping {
                let _ = self.exporter.shutdown();
                return;
            }
        }
    }

    fn export(&mut self, batch: Vec<SpanData>) {
        let n = batch.len() as u64;
        match futures_executor::block_on(self.exporter.export(batch)) {
            Ok(()) => {
                self.exported.inc_by(n);
                self.health.ok();
            }
            Err(e) => {
                self.dropped.with_label_values(&["export_failed"]).inc_by(n);
                self.health.failed(&e, n);
            }
        }
    }
}

/// Exporter failures are logged once when they start, then at most once a minute with a count.
#[derive(Default)]
struct Health {
    failing: bool,
    last_report: Option<Instant>,
    failures: u64,
    spans: u64,
}

const REPORT_EVERY: Duration = Duration::from_secs(60);

impl Health {
    fn failed(&mut self, error: &OTelSdkError, spans: u64) {
        self.failing = true;
        self.failures += 1;
        self.spans += spans;
        if self
            .last_report
            .is_some_and(|at| at.elapsed() < REPORT_EVERY)
        {
            return;
        }
        tracing::warn!(
            error = %error,
            failed_exports = self.failures,
            dropped_spans = self.spans,
            "OpenTelemetry: span export failed; spans dropped, traffic unaffected (next report in a minute at most)"
        );
        self.last_report = Some(Instant::now());
        self.failures = 0;
        self.spans = 0;
    }

    fn ok(&mut self) {
        if std::mem::take(&mut self.failing) {
            tracing::info!(
                failed_exports = self.failures,
                dropped_spans = self.spans,
                "OpenTelemetry: span export works again"
            );
            self.failures = 0;
            self.spans = 0;
            self.last_report = None;
        }
    }
}

// === impl TokioHttp ===

/// The exporter's HTTP client: each request is a task on the proxy's runtime, bounded by the client's
/// timeout, awaited from the exporter thread.
#[derive(Debug)]
struct TokioHttp {
    client: net::Client,
    runtime: tokio::runtime::Handle,
}

/// A collector's answer is a small protobuf; more is not read.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

#[async_trait::async_trait]
impl HttpClient for TokioHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let task = self
            .runtime
            .spawn(async move { client.send(request).await });
        Ok(task.await??)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_fold_ids() {
        assert_eq!(route(&Method::POST, "/v1/ask"), "POST /v1/ask");
        assert_eq!(route(&Method::GET, "/docs/12345"), "GET /docs/{id}");
        assert_eq!(
            route(&Method::GET, "/d/3f2a9c0e4b1d5a6f7e8d/x"),
            "GET /d/{id}/x"
        );
        assert_eq!(route(&Method::GET, "/"), "GET /");
    }
}
