//! The evaluation pipeline: a bounded queue fed by the proxy when a sampled response completes, drained
//! by dedicated worker threads (not the proxy's runtime) that extract, embed, measure and record.
//!
//! The bound is taken when a request is sampled, before anything is copied: [`Pipeline::reserve`] hands
//! out a [`Place`] per sample teed, queued or being evaluated, and none past `signals.queue`
//! — a sample that would find the queue full is dropped (counted) before its bodies are teed. `submit`
//! never blocks nor waits for a worker, and makes no system call under load: with every sample holding
//! a place, the lock-free array always has a free cell for it (a push into a full array would spin
//! until the worker popping its head cell runs again, and a worker that only gets the CPU the proxy
//! leaves may not run for a long time), and a worker is unparked only when it had gone to sleep.
//! Nothing here can delay or fail a request.
//!
//! Layout: this file is the proxy's side (sampled exchanges in, the bounded queue, flush on shutdown);
//! `worker` drains the queue and records into the arm's windows; `evaluator` embeds and measures the
//! extracted pieces (also used by `cmd eval` on a gold set); `sessions` remembers λ and tool calls per
//! client session. Built by `app`, fed by `serve::handle`.

mod evaluator;
pub mod rate;
mod sessions;
mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use prometheus::{GaugeVec, IntCounter, IntCounterVec};

use crate::capture::Capture;
use crate::config::Signals as SignalsConfig;
use crate::signals::extract::Skip;
use crate::signals::retrieval::DocFrequency;
use crate::signals::EvalError;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::otel::FollowUp;
use crate::windows::ArmStats;

pub use evaluator::{Evaluator, Scored};
pub use sessions::Sessions;
use worker::{Wakeup, Worker};

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
    /// Its place in the queue's bound, given back when its evaluation is done.
    pub place: Place,
}

/// One of the `signals.queue` places of the pipeline, held from the moment a request is sampled until its
/// sample is evaluated; given back when dropped (also when the exchange is never submitted).
pub struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl Sample {
    /// Bytes of body copies this sample holds.
    fn bytes(&self) -> usize {
        self.response.len() + self.request.as_ref().map_or(0, Capture::len)
    }
}

/// The document-frequency sketch of each arm's retrieved chunks (retrieval coverage weighs the
/// question's tokens by it). One per arm name ever evaluated, 32 KiB each; kept across reloads, as the
/// arms' windows are.
#[derive(Default)]
pub(crate) struct Frequencies {
    arms: Mutex<HashMap<String, Arc<Mutex<DocFrequency>>>>,
}

impl Frequencies {
    pub(crate) fn of(&self, arm: &str) -> Arc<Mutex<DocFrequency>> {
        let mut arms = self.arms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(df) = arms.get(arm) {
            return df.clone();
        }
        let df = Arc::new(Mutex::new(DocFrequency::new()));
        arms.insert(arm.to_string(), df.clone());
        df
    }
}

/// The proxy's handle on the pipeline.
pub struct Pipeline {
    queue: Arc<ArrayQueue<Sample>>,
    /// Places taken (see [`Place`]), at most the queue's capacity.
    places: Arc<AtomicUsize>,
    /// Bytes of body copies in the queue, bounded by `max_queue_bytes`.
    queued_bytes: Arc<AtomicUsize>,
    /// Samples taken off the queue and not yet fully evaluated.
    busy: Arc<AtomicUsize>,
    /// Told by a worker that finds the queue empty: what [`Pipeline::flush`] waits on.
    drained: Arc<tokio::sync::Notify>,
    /// Set by a flush: the workers leave `SCHED_IDLE` (see `signals::priority::drain_priority`).
    flushing: Arc<AtomicBool>,
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
impl Pipeline {
    /// Starts `config.workers` evaluation threads behind a queue of `config.queue` samples.
    pub fn start(config: &SignalsConfig, metrics: &Metrics) -> Result<Pipeline, EvalError> {
        let evaluator = Arc::new(ArcSwap::from_pointee(Evaluator::from_config(config)?));
        let queue = Arc::new(ArrayQueue::new(config.queue.max(1)));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let busy = Arc::new(AtomicUsize::new(0));
        let drained = Arc::new(tokio::sync::Notify::new());
        let flushing = Arc::new(AtomicBool::new(false));
        let sessions = Arc::new(Sessions::new(config.max_sessions, config.session_ttl.0));
        let frequencies = Arc::new(Frequencies::default());
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
                drained: drained.clone(),
                flushing: flushing.clone(),
                wakeup: wakeup.clone(),
                evaluator: evaluator.clone(),
                sessions: sessions.clone(),
                frequencies: frequencies.clone(),
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
            places: Arc::new(AtomicUsize::new(0)),
            queue,
            queued_bytes,
            busy,
            drained,
            flushing,
            max_queue_bytes: config.max_queue_bytes,
            workers,
            dropped: metrics.eval_dropped.clone(),
            truncated: metrics.tee_truncated.clone(),
            skipped: metrics.eval_skipped.clone(),
            evaluator,
            build_info: metrics.build_info.clone(),
        })
    }

    /// A place for a sampled exchange, or `None` — the sample dropped and counted — when every place is
    /// taken: the request is then proxied without a copy of its bodies. One atomic operation.
    pub fn reserve(&self) -> Option<Place> {
        let taken = self.places.fetch_add(1, SeqCst);
        if taken >= self.queue.capacity() {
            self.places.fetch_sub(1, SeqCst);
            self.dropped.inc();
            return None;
        }
        Some(Place(self.places.clone()))
    }

    /// Queues a sample, or drops and counts it when its copies would pass `signals.max_queue_bytes`.
    /// Never blocks.
    pub fn submit(&self, mut sample: Sample) {
        if sample.response.truncated {
            self.truncated.with_label_values(&["response"]).inc();
        }
        if sample.request.as_ref().is_some_and(|c| c.truncated) {
            self.truncated.with_label_values(&["request"]).inc();
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
    /// The workers run at nice 19 from then on, no longer only on idle CPU: the flush has a deadline.
    pub async fn flush(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        if !self.flushing.swap(true, SeqCst) {
            for w in &self.workers {
                if let Some(t) = w.thread.get() {
                    t.unpark();
                }
            }
        }
        loop {
            // Listening before looking, so a worker's word in between is not missed.
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.queue.is_empty() && self.busy.load(SeqCst) == 0 {
                return true;
            }
            // A worker tells when it finds the queue empty; the timer only bounds a missed word.
            let poll = tokio::time::Instant::now() + Duration::from_millis(50);
            tokio::select! {
                () = drained => {}
                () = tokio::time::sleep_until(poll.min(deadline)) => {
                    if tokio::time::Instant::now() >= deadline {
                        return self.queue.is_empty() && self.busy.load(SeqCst) == 0;
                    }
                }
            }
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

#[cfg(test)]
mod tests;
