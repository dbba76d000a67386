//! One arm's record: the one write API for a request's outcome and an evaluation ([`ArmStats`]), and the
//! registry of arms keyed by name ([`Arms`]) that survives reloads. The request path (serve) and the
//! evaluation workers (eval) write here; each event lands in the window ring and, through a [`Mirror`],
//! in its lifetime counterpart (telemetry's Prometheus children) — windows knows no Prometheus type.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Counter, Hist, Window, PROBES};

/// What one evaluation found, as recorded. `lambda` indexes [`super::LAMBDA_STATES`].
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    pub delta_s_qr: f64,
    pub delta_s_ra: f64,
    pub delta_s: f64,
    pub coverage: Option<f64>,
    pub retrieval_coverage: Option<f64>,
    pub lambda: usize,
}

impl Evaluation {
    /// The three ΔS probes in the order of [`PROBES`].
    pub fn probes(&self) -> [f64; 3] {
        [self.delta_s_qr, self.delta_s_ra, self.delta_s]
    }
}

/// The lifetime counterpart of an arm's window events (Prometheus in telemetry). Resolved once per arm
/// so each event costs one dynamic call and no label hashing.
pub trait Mirror: Send + Sync {
    /// A response of status class `class` (`Counter::Class1xx` ..= `Counter::Class5xx`).
    fn response(&self, class: Counter);
    fn first_byte(&self, ttfb: Duration);
    fn completed(&self, latency: Duration);
    fn evaluated(&self, evaluation: &Evaluation);
    fn usage(&self, prompt_tokens: Option<u64>, completion_tokens: Option<u64>, tool_loop: bool);
    fn pin_mismatch(&self, pin: &str);
}

/// Builds the [`Mirror`] of a new arm.
pub trait Mirrors: Send + Sync {
    fn arm(&self, name: &str) -> Box<dyn Mirror>;
}

/// No lifetime counterpart: for tests and tools that only need the windows.
pub struct NoMirror;

impl Mirror for NoMirror {
    fn response(&self, _: Counter) {}
    fn first_byte(&self, _: Duration) {}
    fn completed(&self, _: Duration) {}
    fn evaluated(&self, _: &Evaluation) {}
    fn usage(&self, _: Option<u64>, _: Option<u64>, _: bool) {}
    fn pin_mismatch(&self, _: &str) {}
}

impl Mirrors for NoMirror {
    fn arm(&self, _: &str) -> Box<dyn Mirror> {
        Box::new(NoMirror)
    }
}

/// Evaluations kept per arm for snapshots.
const RECENT: usize = 50;

/// Everything recorded for one arm: its window ring and its lifetime mirror.
pub struct ArmStats {
    pub name: String,
    pub window: Window,
    mirror: Box<dyn Mirror>,
    /// The last evaluations' (ΔS, coverage), newest last, for rollback snapshots.
    recent: Mutex<VecDeque<(f64, Option<f64>)>>,
}

impl ArmStats {
    /// An arm whose window counts slot periods from `origin` (see [`Window::new`]).
    pub fn new(name: &str, origin: Instant, mirror: Box<dyn Mirror>) -> Self {
        ArmStats {
            name: name.to_string(),
            window: Window::new(origin),
            mirror,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
        }
    }

    /// A response was sent to the client with `status` (counted when the head goes out).
    #[inline]
    pub fn response(&self, at: Instant, status: u16) {
        let class = Counter::class_of(status);
        self.mirror.response(class);
        self.window.count(at, class, 1);
        if status == 429 {
            self.window.count(at, Counter::RateLimited, 1);
        }
    }

    /// The first body byte arrived `ttfb` after the request started.
    #[inline]
    pub fn first_byte(&self, at: Instant, ttfb: Duration) {
        self.mirror.first_byte(ttfb);
        self.window.record(at, Hist::Ttfb, ttfb.as_micros() as u64);
    }

    /// The response body completed (or the client went away) `latency` after the request started.
    #[inline]
    pub fn completed(&self, at: Instant, latency: Duration) {
        self.mirror.completed(latency);
        self.window
            .record(at, Hist::Latency, latency.as_micros() as u64);
    }

    /// The upstream failed this request: it timed out (`timeout`), or was unreachable or broke off.
    pub fn upstream_error(&self, at: Instant, timeout: bool) {
        let counter = if timeout {
            Counter::Timeouts
        } else {
            Counter::UpstreamErrors
        };
        self.window.count(at, counter, 1);
    }

    /// A response was broken off (or left silent too long) by the upstream after its head went out.
    pub fn broken_off(&self, at: Instant) {
        self.window.count(at, Counter::BrokenOff, 1);
    }

    /// The signals of one evaluated response.
    pub fn evaluated(&self, at: Instant, e: &Evaluation) {
        let w = &self.window;
        w.count(at, Counter::Evaluated, 1);
        for ((hist, _), value) in PROBES.iter().zip(e.probes()) {
            w.record(at, *hist, Hist::scaled(value));
        }
        if let Some(c) = e.coverage {
            w.record(at, Hist::Coverage, Hist::scaled(c));
        }
        if let Some(c) = e.retrieval_coverage {
            w.record(at, Hist::RetrievalCoverage, Hist::scaled(c));
        }
        if let Some(counter) = Counter::LAMBDA.get(e.lambda) {
            w.count(at, *counter, 1);
        }
        self.mirror.evaluated(e);
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back((e.delta_s, e.coverage));
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
        }
        for (n, counter) in [
            (prompt_tokens, Counter::PromptTokens),
            (completion_tokens, Counter::CompletionTokens),
        ] {
            if let Some(n) = n {
                w.count(at, counter, n);
            }
        }
        self.mirror
            .usage(prompt_tokens, completion_tokens, tool_loop);
    }

    /// The upstream echoed pin `pin` with a value other than the stamped one.
    pub fn pin_mismatch(&self, at: Instant, pin: &str) {
        self.mirror.pin_mismatch(pin);
        self.window.count(at, Counter::PinMismatches, 1);
    }
}

/// Every arm's stats by name, kept for the process's life so a reload that keeps an arm keeps its
/// window. All windows share one origin so they rotate together.
pub struct Arms {
    origin: Instant,
    mirrors: Box<dyn Mirrors>,
    arms: Mutex<HashMap<String, Arc<ArmStats>>>,
}

impl Arms {
    pub fn new(mirrors: Box<dyn Mirrors>) -> Self {
        Arms {
            origin: Instant::now(),
            mirrors,
            arms: Mutex::new(HashMap::new()),
        }
    }

    /// The stats of an arm, created on first use.
    pub fn arm(&self, name: &str) -> Arc<ArmStats> {
        let mut arms = self.arms.lock().unwrap_or_else(|p| p.into_inner());
        arms.entry(name.to_string())
            .or_insert_with(|| Arc::new(ArmStats::new(name, self.origin, self.mirrors.arm(name))))
            .clone()
    }

    /// Clears the next window slot of every arm ahead of time; run every second or so.
    pub fn rotate(&self) {
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
}

impl Default for Arms {
    fn default() -> Self {
        Arms::new(Box::new(NoMirror))
    }
}
