//! Logs: every event as one JSON line on stdout — access-log lines (target `driftguard::access`) and
//! operational ones alike — written by a background thread so the request path never waits on I/O.
//!
//! A field whose name ends in `_json` carries ready-made JSON (the pins object) and is written raw under
//! the name without the suffix, so `pins` is an object a log pipeline can query, not an escaped string.

use std::fmt::{self, Write as _};
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
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
        .with_writer(writer)
        .event_format(JsonLines)
        .finish();
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        eprintln!("driftguard: a log subscriber was already installed");
    }
    guard
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

impl Write for BatchWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut batch = self.0.batch.lock().unwrap_or_else(|p| p.into_inner());
        if batch.stopping {
            drop(batch);
            self.0.write_out(bytes);
            return Ok(bytes.len());
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
        let mut line = String::with_capacity(256);
        line.push_str("{\"ts\":\"");
        push_timestamp(&mut line);
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
    let _ = write!(out, ".{:06}Z", since_epoch.subsec_micros());
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
}
