//! The evaluation pipeline: a bounded queue fed by the proxy when a sampled response completes, drained
//! by dedicated worker threads (not the proxy's runtime) that extract, embed, measure and record.
//!
//! `submit` never blocks and makes no system call under load: the queue is a lock-free array, and a
//! worker is unparked only when it had gone to sleep. A full queue drops the sample and counts it.
//! Nothing here can delay or fail a request.

pub mod rate;

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use lru::LruCache;
use prometheus::{GaugeVec, IntCounter, IntCounterVec};

use crate::config::{EmbedderKind, LocalEmbedder, Signals as SignalsConfig};
use crate::telemetry::log::ACCESS;
use opentelemetry::trace::{Span as _, Status};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::Span;

use crate::capture::Capture;
use crate::signals::embed::Embedder;
use crate::signals::extract::{Extracted, Extractor, Skip};
use crate::signals::measure::{self, Lambda, SessionTools, ToolCall};
use crate::signals::EvalError;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::otel::FollowUp;
use crate::windows::{ArmStats, Evaluation, LAMBDA_STATES};

/// A completed, sampled exchange waiting for evaluation.
pub struct Sample {
    pub arm: Arc<ArmStats>,
    pub request_id: String,
    pub session: Option<String>,
    /// The request body copy; `None` when the request body never finished.
    pub request: Option<Capture>,
    pub response: Capture,
    pub sse: bool,
    pub at: Instant,
    /// The request's span, when tracing is on: the evaluation reports to it as a child span.
    pub trace: Option<FollowUp>,
}

impl Sample {
    /// Bytes of body copies this sample holds.
    fn bytes(&self) -> usize {
        self.response.len() + self.request.as_ref().map_or(0, Capture::len)
    }
}

/// What the workers need, swapped as a whole on reload.
pub struct Evaluator {
    pub extractor: Extractor,
    pub embedder: Arc<dyn Embedder>,
    /// The `local` model's settings, so a reload that keeps them keeps the loaded model.
    local: Option<LocalEmbedder>,
}

impl Evaluator {
    pub fn from_config(config: &SignalsConfig) -> Result<Evaluator, EvalError> {
        Evaluator::reusing(config, None)
    }

    /// Like [`Evaluator::from_config`], but keeps `previous`'s local model when its settings did not
    /// change: loading one reads and checks ~100 MB.
    fn reusing(
        config: &SignalsConfig,
        previous: Option<&Evaluator>,
    ) -> Result<Evaluator, EvalError> {
        let local = (config.embedder == EmbedderKind::Local).then(|| config.local.clone());
        let embedder = match previous {
            Some(p) if local.is_some() && p.local == local => p.embedder.clone(),
            _ => crate::signals::embedder(config)?,
        };
        Ok(Evaluator {
            extractor: Extractor::new(
                &config.question,
                &config.retrieved,
                &config.answer,
                &config.anchor,
            )?,
            embedder,
            local,
        })
    }
}

/// Signals of one exchange, before they are attributed to an arm.
#[derive(Debug, Clone)]
pub struct Scored {
    pub delta_s_qr: f64,
    pub delta_s_ra: f64,
    pub delta_s: f64,
    pub coverage: Option<f64>,
}

impl Evaluator {
    /// Embeds and measures extracted pieces. The anchor defaults to the answer.
    pub fn score(&self, e: &Extracted) -> Result<Scored, EvalError> {
        let question = e.question.as_deref().unwrap_or_default();
        let answer = e.answer.as_deref().unwrap_or_default();
        let anchor = e.anchor.as_deref().unwrap_or(answer);
        let mut texts: Vec<&str> = Vec::with_capacity(e.chunks.len() + 2);
        texts.push(question);
        texts.extend(e.chunks.iter().map(String::as_str));
        texts.push(anchor);
        let vectors = self.embedder.embed_batch(&texts)?;
        let (q, rest) = vectors
            .split_first()
            .ok_or(EvalError::Setup("the embedder returned no vectors".into()))?;
        let (a, chunks) = rest.split_last().ok_or(EvalError::Setup(
            "the embedder returned too few vectors".into(),
        ))?;
        let ds = measure::delta_s_probes(q, chunks, a);
        let chunk_texts: Vec<&str> = e.chunks.iter().map(String::as_str).collect();
        Ok(Scored {
            delta_s_qr: ds.qr,
            delta_s_ra: ds.ra,
            delta_s: ds.max,
            coverage: measure::coverage(answer, &chunk_texts),
        })
    }
}

/// Per-session memory for λ and tool loops: bounded in count and age.
struct Session {
    last_delta_s: Option<f64>,
    tools: SessionTools,
    seen: Instant,
}

/// Sessions are keyed by a keyed hash of their id, so a client's long ids cost no memory here.
pub struct Sessions {
    map: Mutex<LruCache<u64, Session>>,
    ttl: Duration,
    hasher: std::collections::hash_map::RandomState,
}

impl Sessions {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Sessions {
            map: Mutex::new(LruCache::new(capacity)),
            ttl,
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The λ state of this response: against the session's previous ΔS, or — without a session or on
    /// its first evaluated response — from the two-step series [qr, ra].
    fn lambda(&self, session: Option<&str>, s: &Scored, now: Instant) -> Lambda {
        let two_step = measure::lambda(s.delta_s_qr, s.delta_s_ra);
        let Some(id) = session else {
            return two_step;
        };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let state = self.entry(&mut map, id, now);
        let lambda = state
            .last_delta_s
            .map_or(two_step, |previous| measure::lambda(previous, s.delta_s));
        state.last_delta_s = Some(s.delta_s);
        lambda
    }

    /// Whether a session has now made the same tool call in 3 consecutive responses.
    fn tools(&self, session: Option<&str>, calls: &[ToolCall], now: Instant) -> bool {
        let Some(id) = session else {
            return false;
        };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        self.entry(&mut map, id, now).tools.observe(calls)
    }

    /// The live state of a session, started afresh when unknown or older than the TTL.
    fn entry<'m>(
        &self,
        map: &'m mut LruCache<u64, Session>,
        id: &str,
        now: Instant,
    ) -> &'m mut Session {
        let key = std::hash::BuildHasher::hash_one(&self.hasher, id);
        let stale = map
            .peek(&key)
            .is_some_and(|s| now.saturating_duration_since(s.seen) > self.ttl);
        if stale {
            map.pop(&key);
        }
        let state = map.get_or_insert_mut(key, || Session {
            last_delta_s: None,
            tools: SessionTools::default(),
            seen: now,
        });
        state.seen = now;
        state
    }
}

/// The proxy's handle on the pipeline.
pub struct Pipeline {
    queue: Arc<ArrayQueue<Sample>>,
    /// Bytes of body copies in the queue, bounded by `max_queue_bytes`.
    queued_bytes: Arc<AtomicUsize>,
    /// Samples taken off the queue and not yet fully evaluated.
    busy: Arc<AtomicUsize>,
    max_queue_bytes: usize,
    workers: Vec<Arc<Wakeup>>,
    dropped: IntCounter,
    truncated: IntCounterVec,
    skipped: IntCounterVec,
    evaluator: Arc<ArcSwap<Evaluator>>,
    build_info: GaugeVec,
}

/// Skip reason of a response that did not complete.
const INCOMPLETE: &str = "incomplete";
/// Skip reason of a response whose content type holds no JSON.
pub const NOT_JSON: &str = "response_not_json";
/// Skip reason of a sampled request over `signals.max_evals_per_sec`.
pub const RATE_LIMITED: &str = "rate_limited";

/// How long an idle worker keeps polling before it parks until woken. Under load samples arrive well
/// within it, so the request path almost never pays for a wake-up.
const LINGER: Duration = Duration::from_millis(2);

/// A worker's parking spot: the producer wakes it only when it went to sleep.
struct Wakeup {
    sleeping: AtomicBool,
    thread: OnceLock<Thread>,
}

impl Pipeline {
    /// Starts `config.workers` evaluation threads behind a queue of `config.queue` samples.
    pub fn start(config: &SignalsConfig, metrics: &Metrics) -> Result<Pipeline, EvalError> {
        let evaluator = Arc::new(ArcSwap::from_pointee(Evaluator::from_config(config)?));
        let queue = Arc::new(ArrayQueue::new(config.queue.max(1)));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let busy = Arc::new(AtomicUsize::new(0));
        let sessions = Arc::new(Sessions::new(config.max_sessions, config.session_ttl.0));
        let mut workers = Vec::with_capacity(config.workers);
        for i in 0..config.workers {
            let wakeup = Arc::new(Wakeup {
                sleeping: AtomicBool::new(false),
                thread: OnceLock::new(),
            });
            let worker = Worker {
                queue: queue.clone(),
                queued_bytes: queued_bytes.clone(),
                busy: busy.clone(),
                wakeup: wakeup.clone(),
                evaluator: evaluator.clone(),
                sessions: sessions.clone(),
                skipped: metrics.eval_skipped.clone(),
                errors: metrics.eval_errors.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("driftguard-eval-{i}"))
                .spawn(move || worker.run())
                .map_err(|e| EvalError::Setup(format!("cannot start an evaluation thread: {e}")))?;
            let _ = wakeup.thread.set(handle.thread().clone());
            workers.push(wakeup);
        }
        for reason in Skip::ALL
            .iter()
            .map(|s| s.as_str())
            .chain([INCOMPLETE, RATE_LIMITED])
        {
            metrics.eval_skipped.with_label_values(&[reason]);
        }
        set_build_info(&metrics.build_info, evaluator.load().embedder.name());
        Ok(Pipeline {
            queue,
            queued_bytes,
            busy,
            max_queue_bytes: config.max_queue_bytes,
            workers,
            dropped: metrics.eval_dropped.clone(),
            truncated: metrics.tee_truncated.clone(),
            skipped: metrics.eval_skipped.clone(),
            evaluator,
            build_info: metrics.build_info.clone(),
        })
    }

    /// Queues a sample, or drops and counts it when the queue is full. Never blocks.
    pub fn submit(&self, mut sample: Sample) {
        if sample.response.truncated {
            self.truncated.with_label_values(&["response"]).inc();
        }
        if sample.request.as_ref().is_some_and(|c| c.truncated) {
            self.truncated.with_label_values(&["request"]).inc();
        }
        if self.queue.is_full() {
            self.dropped.inc();
            return;
        }
        let bytes = sample.bytes();
        if self.queued_bytes.fetch_add(bytes, SeqCst) + bytes > self.max_queue_bytes {
            self.queued_bytes.fetch_sub(bytes, SeqCst);
            self.dropped.inc();
            return;
        }
        sample.response = sample.response.compact();
        sample.request = sample.request.map(Capture::compact);
        if self.queue.push(sample).is_err() {
            self.queued_bytes.fetch_sub(bytes, SeqCst);
            self.dropped.inc();
            return;
        }
        for w in &self.workers {
            if w.sleeping.swap(false, SeqCst) {
                if let Some(t) = w.thread.get() {
                    t.unpark();
                }
                break;
            }
        }
    }

    /// Samples waiting for a worker.
    pub fn depth(&self) -> usize {
        self.queue.len()
    }

    /// Waits (up to `limit`) until every queued sample has been evaluated, so a shutdown does not drop
    /// the signals — and their log lines — of requests already served.
    pub async fn flush(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.queue.is_empty() && self.busy.load(SeqCst) == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Name of the embedder in use.
    pub fn embedder_name(&self) -> &'static str {
        self.evaluator.load().embedder.name()
    }

    /// A sampled response that ended early (client gone, upstream error) is not evaluated.
    pub fn skip_incomplete(&self) {
        self.skipped.with_label_values(&[INCOMPLETE]).inc();
    }

    /// A sampled response that is neither JSON nor an event stream is not evaluated.
    pub fn skip_not_json(&self) {
        self.skipped.with_label_values(&[NOT_JSON]).inc();
    }

    /// Swaps in a new extractor and embedder (config reload).
    /// The new embedder is built (a model loaded and checked) before the swap; an error leaves the
    /// running evaluator in place.
    pub fn reconfigure(&self, config: &SignalsConfig) -> Result<(), EvalError> {
        let next = Evaluator::reusing(config, Some(&self.evaluator.load()))?;
        let name = next.embedder.name();
        self.evaluator.store(Arc::new(next));
        set_build_info(&self.build_info, name);
        Ok(())
    }
}

/// `driftguard_build_info{version, embedder}`: one series, naming the embedder in use.
fn set_build_info(build_info: &GaugeVec, embedder: &str) {
    build_info.reset();
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION"), embedder])
        .set(1.0);
}

/// Evaluation yields the CPU to traffic: a sidecar usually has one core, and an evaluation costs more
/// than proxying the request it scores. At nice 19 the workers take what the proxy leaves; when that is
/// not enough the queue fills and samples are dropped (counted) instead of requests slowing down.
pub(crate) fn lower_priority() {
    // SAFETY: setpriority has no memory effects; on Linux, PRIO_PROCESS with who = 0 is this thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, EVAL_NICE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the evaluation thread's priority");
    }
}

const EVAL_NICE: libc::c_int = 19;

struct Worker {
    queue: Arc<ArrayQueue<Sample>>,
    queued_bytes: Arc<AtomicUsize>,
    busy: Arc<AtomicUsize>,
    wakeup: Arc<Wakeup>,
    evaluator: Arc<ArcSwap<Evaluator>>,
    sessions: Arc<Sessions>,
    skipped: IntCounterVec,
    errors: IntCounterVec,
}

impl Worker {
    fn run(self) {
        lower_priority();
        loop {
            loop {
                // Busy before the pop, so a flush never sees an empty queue and an idle worker while a
                // sample is between the two.
                self.busy.fetch_add(1, SeqCst);
                let Some(sample) = self.queue.pop() else {
                    self.busy.fetch_sub(1, SeqCst);
                    break;
                };
                self.queued_bytes.fetch_sub(sample.bytes(), SeqCst);
                self.evaluate(sample);
                self.busy.fetch_sub(1, SeqCst);
            }
            std::thread::park_timeout(LINGER);
            if !self.queue.is_empty() {
                continue;
            }
            // Announce the sleep, then look once more so a sample pushed in between is not missed.
            self.wakeup.sleeping.store(true, SeqCst);
            if self.queue.is_empty() {
                std::thread::park();
            }
            self.wakeup.sleeping.store(false, SeqCst);
        }
    }

    fn evaluate(&self, mut sample: Sample) {
        let Some(follow_up) = sample.trace.take() else {
            let _ = self.score(sample, None);
            return;
        };
        let mut span = follow_up.start(&sample.request_id);
        let outcome = self.score(sample, Some(&mut span));
        if let Err(reason) = outcome {
            span.set_attribute(KeyValue::new("driftguard.skipped", reason));
        }
        span.end();
    }

    /// Evaluates a sample; `Err` names why it was not scored. `span` gets the signals as attributes.
    fn score(&self, sample: Sample, span: Option<&mut Span>) -> Result<(), &'static str> {
        let evaluator = self.evaluator.load();
        let (request, request_cut) = match sample.request {
            Some(c) => {
                let cut = c.truncated || c.incomplete;
                (c.into_bytes(), cut)
            }
            None => (Bytes::new(), true),
        };
        let response_cut = sample.response.truncated;
        let response = sample.response.into_bytes();
        let (extracted, skip) =
            evaluator
                .extractor
                .gather(&request, request_cut, &response, response_cut, sample.sse);
        let tool_calls: Vec<ToolCall> = extracted
            .tool_calls
            .iter()
            .map(|(name, arguments)| ToolCall {
                name: name.clone(),
                arguments: arguments.clone(),
            })
            .collect();
        let tool_loop = self
            .sessions
            .tools(sample.session.as_deref(), &tool_calls, Instant::now())
            || measure::loops_in_response(&tool_calls);
        sample.arm.usage(
            sample.at,
            extracted.prompt_tokens,
            extracted.completion_tokens,
            tool_loop,
        );
        if let Some(skip) = skip {
            self.skipped.with_label_values(&[skip.as_str()]).inc();
            tracing::debug!(
                request_id = sample.request_id.as_str(),
                reason = skip.as_str(),
                "sample skipped"
            );
            return Err(skip.as_str());
        }
        let scored = match evaluator.score(&extracted) {
            Ok(s) => s,
            Err(e) => {
                self.errors.with_label_values(&["embedder"]).inc();
                tracing::warn!(request_id = sample.request_id.as_str(), error = %e, "evaluation failed; sample skipped");
                if let Some(span) = span {
                    span.set_status(Status::error(e.to_string()));
                }
                return Err("embedder_error");
            }
        };
        let lambda = self
            .sessions
            .lambda(sample.session.as_deref(), &scored, Instant::now());
        let evaluation = Evaluation {
            delta_s_qr: scored.delta_s_qr,
            delta_s_ra: scored.delta_s_ra,
            delta_s: scored.delta_s,
            coverage: scored.coverage,
            lambda: Lambda::ALL.iter().position(|l| *l == lambda).unwrap_or(0),
        };
        sample.arm.evaluated(sample.at, &evaluation);
        tracing::info!(
            target: ACCESS,
            request_id = sample.request_id.as_str(),
            arm = sample.arm.name.as_str(),
            event = "signals",
            delta_s = evaluation.delta_s,
            delta_s_qr = evaluation.delta_s_qr,
            delta_s_ra = evaluation.delta_s_ra,
            band = measure::band(evaluation.delta_s).as_str(),
            coverage = evaluation.coverage,
            lambda = LAMBDA_STATES[evaluation.lambda],
            tool_loop,
            prompt_tokens = extracted.prompt_tokens,
            completion_tokens = extracted.completion_tokens,
        );
        if let Some(span) = span {
            span.set_attributes([
                KeyValue::new("driftguard.arm", sample.arm.name.clone()),
                KeyValue::new("driftguard.delta_s", evaluation.delta_s),
                KeyValue::new("driftguard.delta_s.qr", evaluation.delta_s_qr),
                KeyValue::new("driftguard.delta_s.ra", evaluation.delta_s_ra),
                KeyValue::new(
                    "driftguard.band",
                    measure::band(evaluation.delta_s).as_str(),
                ),
                KeyValue::new("driftguard.lambda", LAMBDA_STATES[evaluation.lambda]),
                KeyValue::new("driftguard.tool_loop", tool_loop),
            ]);
            if let Some(coverage) = evaluation.coverage {
                span.set_attribute(KeyValue::new("driftguard.coverage", coverage));
            }
        }
        Ok(())
    }
}
