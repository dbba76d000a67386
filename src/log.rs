//! Logs: every event as one JSON line on stdout — access-log lines (target `driftguard::access`) and
//! operational ones alike — written by a background thread so the request path never waits on I/O.
//!
//! A field whose name ends in `_json` carries ready-made JSON (the pins object) and is written raw under
//! the name without the suffix, so `pins` is an object a log pipeline can query, not an escaped string.

use std::fmt::{self, Write as _};
use std::io::BufWriter;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Target of access-log events.
pub const ACCESS: &str = "driftguard::access";

/// Installs the JSON subscriber. Keep the guard alive until exit: dropping it flushes the last lines.
pub fn init(level: &str) -> WorkerGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(64 * 1024)
        .thread_name("driftguard-log")
        .finish(BufWriter::with_capacity(64 * 1024, std::io::stdout()));
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .event_format(JsonLines)
        .finish();
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        eprintln!("driftguard: a log subscriber was already installed");
    }
    guard
}

/// Formats an event as `{"ts":..,"level":..,"target":..,"message":..,<fields>}`.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let mut line = String::with_capacity(256);
        line.push_str("{\"ts\":\"");
        SystemTime.format_time(&mut Writer::new(&mut line))?;
        line.push_str("\",\"level\":\"");
        line.push_str(meta.level().as_str());
        line.push_str("\",\"target\":");
        push_json_str(&mut line, meta.target());
        event.record(&mut JsonFields { out: &mut line });
        line.push_str("}\n");
        writer.write_str(&line)
    }
}

struct JsonFields<'a> {
    out: &'a mut String,
}

impl JsonFields<'_> {
    fn key(&mut self, field: &Field) -> bool {
        let name = field.name();
        let (name, raw) = match name.strip_suffix("_json") {
            Some(base) => (base, true),
            None => (name, false),
        };
        self.out.push(',');
        push_json_str(self.out, name);
        self.out.push(':');
        raw
    }
}

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.key(field) {
            self.out.push_str(value);
        } else {
            push_json_str(self.out, value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        if value.is_finite() {
            let _ = write!(self.out, "{value}");
        } else {
            self.out.push_str("null");
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        push_json_str(self.out, &format!("{value:?}"));
    }
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_json_strings() {
        let mut s = String::new();
        push_json_str(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
        let parsed: String = serde_json::from_str(&s).unwrap();
        assert_eq!(parsed, "a\"b\\c\nd\u{1}é");
    }
}
