//! OpenTelemetry end to end (SPEC §7): driftguard exports its spans over OTLP/HTTP to a test collector
//! (a scripted server decoding each `ExportTraceServiceRequest`); a client's W3C trace is kept and passed
//! on to the upstream; evaluations arrive as child spans with the signals; a collector that is down or
//! failing costs spans (counted), never requests or latency, and is logged a bounded number of times.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::rag::*;
use common::*;
use http::StatusCode;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::json;

/// A test OTLP/HTTP collector answering `status` (200 unless changed) to every export.
fn collector(status: Arc<AtomicU16>) -> Scripted {
    Scripted::start("collector", move |_req, _body| {
        let status = StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap();
        Canned::body("application/x-protobuf", Bytes::new()).status(status)
    })
}

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Got {
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: BTreeMap<String, String>,
    service: String,
}

impl Got {
    fn attr(&self, key: &str) -> &str {
        self.attrs
            .get(key)
            .unwrap_or_else(|| panic!("no attribute {key} on {self:#?}"))
    }

    fn num(&self, key: &str) -> f64 {
        self.attr(key)
            .parse()
            .unwrap_or_else(|_| panic!("{key} is no number on {self:#?}"))
    }
}

fn any_text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// Every span the collector received, decoded from the protobuf bodies of `POST /v1/traces`.
fn spans(collector: &Scripted) -> Vec<Got> {
    let mut out = Vec::new();
    for ex in collector.exchanges() {
        assert_eq!(ex.request.path, "/v1/traces");
        assert_eq!(
            ex.request.header("content-type").as_deref(),
            Some("application/x-protobuf")
        );
        let req = ExportTraceServiceRequest::decode(ex.body.as_ref()).expect("OTLP protobuf");
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| any_text(&kv.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Got {
                        name: s.name,
                        kind: s.kind,
                        trace_id: hex::encode(&s.trace_id),
                        span_id: hex::encode(&s.span_id),
                        parent: hex::encode(&s.parent_span_id),
                        attrs: s
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), any_text(&kv.value)))
                            .collect(),
                        service: service.clone(),
                    });
                }
            }
        }
    }
    out
}

fn config() -> String {
    format!("{LISTEN}\n[pins]\nBUILD_ID = \"b-1\"\n\n[rules]\ndry_run = true\n\n[signals]\nsample = 1.0\nworkers = 1\n\n")
}

fn two_arms(a: &Scripted, b: &Scripted) -> String {
    let mut text = config();
    text.push_str(&arm("grounded", &a.url(), 1, &[("MODEL_VER", "m-1")]));
    text.push('\n');
    text.push_str(&arm("drifted", &b.url(), 1, &[("MODEL_VER", "m-2")]));
    text
}

fn upstream_traceparent(ups: &[&Scripted], request_id: &str) -> String {
    ups.iter()
        .flat_map(|u| u.exchanges())
        .find(|e| e.request.header("x-request-id").as_deref() == Some(request_id))
        .unwrap_or_else(|| panic!("no upstream saw {request_id}"))
        .request
        .header("traceparent")
        .unwrap_or_else(|| panic!("no traceparent upstream for {request_id}"))
}

#[tokio::test]
async fn spans_carry_the_client_trace_pins_arm_and_signals() {
    let status = Arc::new(AtomicU16::new(200));
    let otlp = collector(status);
    let grounded = rag_service("grounded", false);
    let drifted = rag_service("off-topic", true);
    let proxy = Proxy::start_with_env(
        &two_arms(&grounded, &drifted),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url().as_str()),
            ("OTEL_SERVICE_NAME", "dg-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-otlp-token=s3cret"),
        ],
    );
    let client = client();

    const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const CLIENT_SPAN: &str = "00f067aa0ba902b7";
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    const N: usize = 8;
    for i in 0..N {
        let t = &TOPICS[i % TOPICS.len()];
        let id = format!("req-{i}");
        let mut headers = vec![("x-request-id", id.as_str())];
        if i == 0 {
            headers.push(("traceparent", traceparent.as_str()));
            headers.push(("tracestate", "vendor=abc"));
        }
        let reply = post_json(
            &client,
            &proxy.url("/v1/ask"),
            &json!({"question": t.question}),
            &headers,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }

    // A request span and an evaluation span for each request.
    let got = eventually(WAIT, "request and evaluation spans exported", || {
        let got = spans(&otlp);
        let requests = got.iter().filter(|s| s.name == "POST /v1/ask").count();
        let evals = got
            .iter()
            .filter(|s| s.name == "driftguard.evaluate")
            .count();
        async move { (requests >= N && evals >= N).then_some(got) }
    })
    .await;

    let request_span = |id: &str| -> Got {
        got.iter()
            .find(|s| {
                s.name == "POST /v1/ask"
                    && s.attrs.get("driftguard.request_id").map(String::as_str) == Some(id)
            })
            .cloned()
            .unwrap_or_else(|| panic!("no request span for {id}: {got:#?}"))
    };
    let mut arms = BTreeMap::new();
    for i in 0..N {
        let id = format!("req-{i}");
        let span = request_span(&id);
        assert_eq!(span.kind, SpanKind::Server as i32);
        assert_eq!(span.service, "dg-test");
        assert_eq!(span.attr("driftguard.pin.BUILD_ID"), "b-1");
        assert_eq!(span.attr("http.response.status_code"), "200");
        assert_eq!(span.attr("http.request.method"), "POST");
        assert!(span.num("driftguard.latency_ms") > 0.0, "{span:#?}");
        let arm = span.attr("driftguard.arm").to_string();
        let model = if arm == "grounded" { "m-1" } else { "m-2" };
        assert_eq!(span.attr("driftguard.pin.MODEL_VER"), model, "{span:#?}");
        *arms.entry(arm.clone()).or_insert(0) += 1;

        // The upstream request names driftguard's span as its parent, in the same trace.
        let up = upstream_traceparent(&[&grounded, &drifted], &id);
        assert_eq!(up, format!("00-{}-{}-01", span.trace_id, span.span_id));
        if i == 0 {
            assert_eq!(span.trace_id, CLIENT_TRACE, "the client's trace is kept");
            assert_eq!(span.parent, CLIENT_SPAN, "the client's span is the parent");
            let tracestate = [&grounded, &drifted]
                .iter()
                .flat_map(|u| u.exchanges())
                .find(|e| e.request.header("x-request-id").as_deref() == Some("req-0"))
                .and_then(|e| e.request.header("tracestate"));
            assert_eq!(tracestate.as_deref(), Some("vendor=abc"));
        } else {
            assert_ne!(
                span.trace_id, CLIENT_TRACE,
                "a new trace without traceparent"
            );
            assert!(span.parent.is_empty(), "a root span: {span:#?}");
        }

        // The evaluation is a child of the request's span, with the signals.
        let eval = got
            .iter()
            .find(|s| s.name == "driftguard.evaluate" && s.parent == span.span_id)
            .unwrap_or_else(|| panic!("no evaluation span under {id}: {got:#?}"));
        assert_eq!(eval.trace_id, span.trace_id);
        assert_eq!(eval.attr("driftguard.request_id"), id);
        assert_eq!(eval.attr("driftguard.arm"), span.attr("driftguard.arm"));
        for key in [
            "driftguard.delta_s",
            "driftguard.delta_s.qr",
            "driftguard.delta_s.ra",
            "driftguard.coverage",
        ] {
            let v = eval.num(key);
            assert!((0.0..=1.0).contains(&v), "{key} = {v}");
        }
        assert!(
            ["convergent", "recursive", "divergent", "chaotic"]
                .contains(&eval.attr("driftguard.lambda")),
            "{eval:#?}"
        );
        if arm == "grounded" {
            assert!(eval.num("driftguard.coverage") > 0.5, "{eval:#?}");
        }
    }
    assert_eq!(arms.values().sum::<usize>(), N);
    assert!(otlp
        .exchanges()
        .iter()
        .all(|e| e.request.header("x-otlp-token").as_deref() == Some("s3cret")));

    let samples = wait_metric(
        &client,
        &proxy,
        "driftguard_otel_exported_spans_total",
        &[],
        WAIT,
        |v| v >= (2 * N) as f64,
    )
    .await;
    assert_eq!(
        metric(
            &samples,
            "driftguard_otel_dropped_spans_total",
            &[("reason", "queue_full")]
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn disabled_sdk_leaves_the_trace_alone() {
    let otlp = collector(Arc::new(AtomicU16::new(200)));
    let up = rag_service("up", false);
    let mut text = config();
    text.push_str(&arm("main", &up.url(), 1, &[]));
    let proxy = Proxy::start_with_env(
        &text,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url().as_str()),
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );
    let client = client();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let reply = post_json(
        &client,
        &proxy.url("/v1/ask"),
        &json!({"question": TOPICS[0].question}),
        &[("x-request-id", "plain"), ("traceparent", traceparent)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(upstream_traceparent(&[&up], "plain"), traceparent);
    // Evaluation has run (its log line is there), and still nothing was exported.
    proxy
        .wait_log("signals line", |v| {
            v["event"] == "signals" && v["request_id"] == "plain"
        })
        .await;
    // Nothing to wait on for an absence: give a 50 ms export schedule six rounds to show a span.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        otlp.request_count(),
        0,
        "OTEL_SDK_DISABLED=true exports nothing"
    );
    let (_, samples) = scrape(&client, &proxy).await;
    assert_eq!(
        metric(&samples, "driftguard_otel_exported_spans_total", &[]),
        Some(0.0)
    );
}

/// Sends `n` requests one by one; returns the slowest latency.
async fn traffic(client: &HttpClient, proxy: &Proxy, n: usize) -> Duration {
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let t = &TOPICS[i % TOPICS.len()];
        let started = Instant::now();
        let reply = post_json(
            client,
            &proxy.url("/v1/ask"),
            &json!({"question": t.question}),
            &[],
        )
        .await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    slowest
}

fn export_failure_logs(proxy: &Proxy) -> usize {
    proxy.count_log(|v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("span export failed"))
    })
}

/// A collector that is down, then one that answers 500: traffic is served at its usual pace, the spans
/// are dropped and counted, and the failure is logged once, not per request or per batch.
#[tokio::test]
async fn a_failing_collector_costs_spans_not_requests() {
    let status = Arc::new(AtomicU16::new(500));
    let failing = collector(status.clone());
    for (what, endpoint) in [("down", closed_port_url()), ("500", failing.url())] {
        let up = rag_service("up", false);
        let mut text = config();
        text.push_str(&arm("main", &up.url(), 1, &[]));
        let proxy = Proxy::start_with_env(
            &text,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "200"),
                ("OTEL_BSP_SCHEDULE_DELAY", "50"),
                ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4"),
            ],
        );
        let client = client();
        const N: usize = 40;
        let slowest = traffic(&client, &proxy, N).await;
        assert!(
            slowest < Duration::from_secs(2),
            "collector {what}: slowest request took {slowest:?}"
        );
        let samples = wait_metric(
            &client,
            &proxy,
            "driftguard_otel_dropped_spans_total",
            &[("reason", "export_failed")],
            WAIT,
            // Ten failed exports at least (batches of 4); a slow one fails by its 200 ms timeout.
            |v| v >= 40.0,
        )
        .await;
        assert_eq!(
            metric(&samples, "driftguard_otel_exported_spans_total", &[]),
            Some(0.0),
            "collector {what}"
        );
        let logged = export_failure_logs(&proxy);
        assert!(
            (1..=2).contains(&logged),
            "collector {what}: {logged} export failure lines for {N} requests\n{}",
            proxy
                .log_lines()
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
        if what == "500" {
            assert!(failing.request_count() >= 2, "exports were attempted");
        }
    }
}

/// SIGTERM exports what is still queued before the process exits; a collector that does not answer
/// holds the exit up by the flush deadline (3 s) at most.
#[tokio::test]
async fn shutdown_flushes_with_a_deadline() {
    let otlp = collector(Arc::new(AtomicU16::new(200)));
    let stuck = Scripted::start("stuck-collector", |_req, _body| {
        Canned::body("application/x-protobuf", Bytes::new()).delay(Duration::from_secs(60))
    });
    for (what, endpoint) in [("healthy", otlp.url()), ("stuck", stuck.url())] {
        let up = rag_service("up", false);
        let mut text = config();
        text.push_str(&arm("main", &up.url(), 1, &[]));
        let mut proxy = Proxy::start_with_env(
            &text,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                // Nothing is exported before the shutdown but by the flush.
                ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "60000"),
            ],
        );
        let client = client();
        traffic(&client, &proxy, 3).await;
        let evaluated = || proxy.count_log(|v| v["event"] == "signals");
        eventually(WAIT, "3 evaluations", || {
            let n = evaluated();
            async move { (n >= 3).then_some(()) }
        })
        .await;
        let stopping = Instant::now();
        proxy.signal(libc::SIGTERM);
        let exit = proxy.wait_exit(WAIT).await;
        let took = stopping.elapsed();
        assert!(exit.is_some_and(|s| s.success()), "{what}: {exit:?}");
        if what == "healthy" {
            let got = spans(&otlp);
            let requests = got.iter().filter(|s| s.name == "POST /v1/ask").count();
            let evals = got
                .iter()
                .filter(|s| s.name == "driftguard.evaluate")
                .count();
            assert_eq!((requests, evals), (3, 3), "{got:#?}");
        } else {
            // The README's claim: the flush waits 3 s at most. Plus 2 s of margin for the drain
            // and the process exit of a debug build on a loaded machine.
            assert!(
                took < Duration::from_secs(5),
                "{what}: the exit took {took:?}, the flush deadline is 3 s"
            );
            assert!(stuck.request_count() >= 1, "the flush was attempted");
        }
    }
}
