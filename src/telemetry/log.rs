//! Logs: every event as one JSON line on stdout — access-log lines (target `driftguard::access`) and
//! operational ones alike — written by a background thread so the request path never waits on I/O.
//!
//! A field whose name ends in `_json` carries ready-made JSON (the pins object) and is written raw under
//! the name without the suffix, so `pins` is an object a log pipeline can query, not an escaped string.
//!
//! The proxy's own access line ([`access`]) skips tracing's event dispatch: it is formatted by the same
//! [`Line`] code straight into the batch, in the same shape as any other line, and only when the
//! filter lets `driftguard::access` at INFO through.

use std::fmt::{self, Write as _};
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Target of access-log events.
pub const ACCESS: &str = "driftguard::access";

/// Installs the JSON subscriber. Keep the guard alive until exit: dropping it flushes the last lines.
pub fn init(level: &str) -> LogGuard {
    init_to(level, Box::new(std::io::stdout()))
}

/// [`init`] writing the JSON lines to `out` instead of stdout (the demo keeps its terminal for itself).
pub fn init_to(level: &str, out: Box<dyn Write + Send>) -> LogGuard {
    let (writer, guard) = BatchWriter::new(out);
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone())
        .event_format(JsonLines)
        .finish();
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        eprintln!("driftguard: a log subscriber was already installed");
    } else {
        let _ = ACCESS_OUT.set(writer);
    }
    guard
}

/// Where [`access`] lines go: the installed subscriber's writer (unset without one: no line).
static ACCESS_OUT: OnceLock<BatchWriter> = OnceLock::new();

/// Writes one access-log line — `ts`, `level`, `target` and the fields `fields` adds — to the log,
/// the same line a `tracing::info!(target: ACCESS, ..)` event gives, without the event's dispatch and
/// its copies. Nothing is formatted when the filter keeps `driftguard::access` INFO lines out.
pub fn access(fields: impl FnOnce(&mut Line)) {
    if !tracing::enabled!(target: ACCESS, tracing::Level::INFO) {
        return;
    }
    let Some(out) = ACCESS_OUT.get() else {
        return;
    };
    thread_local! {
        static BUF: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    BUF.with(|buf| {
        let mut buf = match buf.try_borrow_mut() {
            Ok(buf) => buf,
            // Unreachable (formatting never re-enters); a fresh buffer costs only an allocation.
            Err(_) => return out.append_line(ACCESS, fields, &mut String::new()),
        };
        buf.clear();
        out.append_line(ACCESS, fields, &mut buf);
    })
}

/// How long lines gather before the writer thread writes them out.
const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// Past this many buffered bytes the logging thread writes the batch itself: back-pressure, not loss.
const MAX_BUFFERED: usize = 4 << 20;

struct Batch {
    buf: Vec<u8>,
    stopping: bool,
}

struct BatchShared {
    batch: Mutex<Batch>,
    ready: Condvar,
    out: Mutex<Box<dyn Write + Send>>,
}

impl BatchShared {
    fn write_out(&self, bytes: &[u8]) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.write_all(bytes).and_then(|()| out.flush());
    }
}

/// A log writer that appends each line to a shared buffer — a memcpy under an uncontended lock, no
/// system call, no wake-up per line — and a thread that writes the buffer out every [`BATCH_WINDOW`].
#[derive(Clone)]
pub struct BatchWriter(Arc<BatchShared>);

/// Flushes what is buffered and stops the writer thread when dropped.
pub struct LogGuard {
    shared: Arc<BatchShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BatchWriter {
    pub fn stdout() -> (BatchWriter, LogGuard) {
        Self::new(Box::new(std::io::stdout()))
    }

    pub fn new(out: Box<dyn Write + Send>) -> (BatchWriter, LogGuard) {
        let shared = Arc::new(BatchShared {
            batch: Mutex::new(Batch {
                buf: Vec::with_capacity(64 * 1024),
                stopping: false,
            }),
            ready: Condvar::new(),
            out: Mutex::new(out),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("driftguard-log".into())
            .spawn(move || {
                let mut spare = Vec::with_capacity(64 * 1024);
                loop {
                    let stopping = {
                        let mut batch = worker.batch.lock().unwrap_or_else(|p| p.into_inner());
                        while batch.buf.is_empty() && !batch.stopping {
                            batch = worker.ready.wait(batch).unwrap_or_else(|p| p.into_inner());
                        }
                        batch.stopping
                    };
                    if !stopping {
                        std::thread::sleep(BATCH_WINDOW);
                    }
                    let stopping = {
                        let mut batch = worker.batch.lock().unwrap_or_else(|p| p.into_inner());
                        std::mem::swap(&mut batch.buf, &mut spare);
                        batch.stopping
                    };
                    worker.write_out(&spare);
                    spare.clear();
                    if stopping {
                        return;
                    }
                }
            });
        let thread = thread
            .map_err(|e| eprintln!("driftguard: cannot start the log writer: {e}"))
            .ok();
        (BatchWriter(shared.clone()), LogGuard { shared, thread })
    }
}

impl BatchWriter {
    /// Appends `bytes` to the batch (or writes them out when stopping or over [`MAX_BUFFERED`]).
    fn append(&self, bytes: &[u8]) {
        let mut batch = self.0.batch.lock().unwrap_or_else(|p| p.into_inner());
        if batch.stopping {
            drop(batch);
            self.0.write_out(bytes);
            return;
        }
        let was_empty = batch.buf.is_empty();
        batch.buf.extend_from_slice(bytes);
        if batch.buf.len() > MAX_BUFFERED {
            let full = std::mem::take(&mut batch.buf);
            drop(batch);
            self.0.write_out(&full);
        } else if was_empty {
            drop(batch);
            self.0.ready.notify_one();
        }
    }

    /// Formats an INFO line of `target` into `buf` and appends it.
    fn append_line(&self, target: &str, fields: impl FnOnce(&mut Line), buf: &mut String) {
        let mut line = Line::start(buf, tracing::Level::INFO, target);
        fields(&mut line);
        self.append(line.finish().as_bytes());
    }
}

impl Write for BatchWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.append(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared
            .batch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stopping = true;
        self.shared.ready.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Formats an event as `{"ts":..,"level":..,"target":..,"message":..,<fields>}`.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut buf = String::with_capacity(256);
        let mut line = Line::start(&mut buf, *meta.level(), meta.target());
        event.record(&mut line);
        writer.write_str(line.finish())
    }
}

/// One JSON log line being written: `{"ts":..,"level":..,"target":..` then one `,"key":value` per
/// field, closed by [`Line::finish`].
pub struct Line<'a> {
    out: &'a mut String,
}

impl<'a> Line<'a> {
    fn start(out: &'a mut String, level: tracing::Level, target: &str) -> Self {
        out.push_str("{\"ts\":\"");
        push_timestamp(out);
        out.push_str("\",\"level\":\"");
        out.push_str(level.as_str());
        out.push_str("\",\"target\":");
        push_json_str(out, target);
        Line { out }
    }

    fn finish(self) -> &'a str {
        self.out.push_str("}\n");
        self.out
    }

    /// `,"name":` — names are identifiers (Rust's, for tracing's fields), written without escaping.
    fn key(&mut self, name: &str) {
        self.out.push_str(",\"");
        self.out.push_str(name);
        self.out.push_str("\":");
    }

    /// A string field, escaped.
    pub fn str(&mut self, name: &str, value: &str) {
        self.key(name);
        push_json_str(self.out, value);
    }

    /// A field whose value is ready-made JSON, written as it is.
    pub fn raw(&mut self, name: &str, json: &str) {
        self.key(name);
        self.out.push_str(json);
    }

    pub fn u64(&mut self, name: &str, value: u64) {
        self.key(name);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    pub fn i64(&mut self, name: &str, value: i64) {
        self.key(name);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    /// A number, `null` when not finite (JSON has no NaN).
    pub fn f64(&mut self, name: &str, value: f64) {
        self.key(name);
        if value.is_finite() {
            let _ = write!(self.out, "{value}");
        } else {
            self.out.push_str("null");
        }
    }

    /// A duration in milliseconds with microsecond precision: what `f64(name, µs / 1e3)` prints,
    /// without formatting a float.
    pub fn millis(&mut self, name: &str, value: Duration) {
        self.key(name);
        let micros = value.as_micros();
        self.out.push_str(itoa::Buffer::new().format(micros / 1000));
        let frac = (micros % 1000) as u32;
        if frac != 0 {
            let mut digits = [b'.', 0, 0, 0];
            push_digits(&mut digits[1..], frac);
            let end = digits.iter().rposition(|&d| d != b'0').unwrap_or(0) + 1;
            self.out
                .push_str(std::str::from_utf8(&digits[..end]).unwrap_or_default());
        }
    }

    pub fn bool(&mut self, name: &str, value: bool) {
        self.key(name);
        self.out.push_str(if value { "true" } else { "false" });
    }
}

impl Visit for Line<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name().strip_suffix("_json") {
            Some(name) => self.raw(name, value),
            None => self.str(field.name(), value),
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.u64(field.name(), value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.i64(field.name(), value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.f64(field.name(), value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.bool(field.name(), value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.str(field.name(), &format!("{value:?}"));
    }
}

/// Appends the current UTC time as RFC 3339 with microseconds; the seconds part is formatted once per
/// second per thread.
fn push_timestamp(out: &mut String) {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let since_epoch = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since_epoch.as_secs();
    SECOND.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != secs {
            let whole = std::time::UNIX_EPOCH + Duration::from_secs(secs);
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            cache.1 = text.trim_end_matches('Z').to_string();
            cache.0 = secs;
        }
        out.push_str(&cache.1);
    });
    let mut frac = *b".000000Z";
    push_digits(&mut frac[1..7], since_epoch.subsec_micros());
    out.push_str(std::str::from_utf8(&frac).unwrap_or_default());
}

/// Writes `value`'s last `into.len()` decimal digits into `into`, zero-padded.
fn push_digits(into: &mut [u8], mut value: u32) {
    for digit in into.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(s);
        out.push('"');
        return;
    }
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

    #[test]
    fn millis_print_what_the_float_printed() {
        let micros = (0..20_000u64).chain([
            999_999,
            1_000_000,
            1_000_001,
            123_456_789,
            86_400_000_000,
            u32::MAX as u64,
        ]);
        for us in micros {
            let mut buf = String::new();
            let mut line = Line { out: &mut buf };
            line.millis("l", Duration::from_micros(us));
            assert_eq!(buf, format!(",\"l\":{}", us as f64 / 1e3), "{us} µs");
        }
    }

    #[test]
    fn a_line_is_one_json_object_with_its_fields_in_order() {
        let mut buf = String::new();
        let mut line = Line::start(&mut buf, tracing::Level::INFO, ACCESS);
        line.str("path", "/v1/\"ask\"");
        line.raw("pins", r#"{"BUILD_ID":"b-1"}"#);
        line.u64("status", 200);
        line.millis("latency_ms", Duration::from_micros(1_250));
        line.f64("nan", f64::NAN);
        line.bool("complete", true);
        let text = line.finish();
        assert!(text.ends_with("}\n") && text.matches('\n').count() == 1);
        let keys = [
            "ts",
            "level",
            "target",
            "path",
            "pins",
            "status",
            "latency_ms",
            "nan",
            "complete",
        ];
        let at: Vec<usize> = keys
            .iter()
            .map(|k| text.find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v.as_object().unwrap().len(), keys.len());
        let ts = v["ts"].as_str().unwrap();
        assert_eq!(ts.len(), "2026-12-04T08:12:50.123456Z".len(), "{ts}");
        let at = humantime::parse_rfc3339(ts).unwrap();
        let off = std::time::SystemTime::now().duration_since(at).unwrap();
        assert!(off < Duration::from_secs(60), "{ts}");
        assert_eq!(v["target"], ACCESS);
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["path"], "/v1/\"ask\"");
        assert_eq!(v["pins"]["BUILD_ID"], "b-1");
        assert_eq!(v["latency_ms"], 1.25);
        assert!(v["nan"].is_null());
        assert_eq!(v["complete"], true);
    }
}
