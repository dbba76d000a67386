//! Telemetry: the Prometheus registry, OpenTelemetry tracing and the JSON log writer.

pub mod log;
pub mod metrics;
pub mod otel;
