//! The evaluation threads: each drains the queue the [`Pipeline`](super::Pipeline) fills, turns a sample
//! into an `Evaluation` (extract, embed, measure, λ) and records it — and the usage, even of a skipped
//! sample — into the arm's windows, with its access-log line and span.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use opentelemetry::trace::{Span as _, Status};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::Span;
use prometheus::IntCounterVec;

use super::{Evaluator, Frequencies, Sample, Sessions};
use crate::signals::measure::{self, ToolCall};
use crate::signals::priority::{drain_priority, lower_priority, yield_to_traffic};
use crate::telemetry::log::ACCESS;
use crate::windows::{Evaluation, LAMBDA_STATES};

/// How long an idle worker keeps polling before it parks until woken. Under load samples arrive well
/// within it, so the request path almost never pays for a wake-up.
const LINGER: Duration = Duration::from_millis(2);

/// A worker's parking spot: the producer wakes it only when it went to sleep.
pub(super) struct Wakeup {
    pub(super) sleeping: AtomicBool,
    pub(super) thread: OnceLock<Thread>,
}

/// One evaluation thread: the queue it drains and what it records into.
pub(super) struct Worker {
    pub(super) queue: Arc<ArrayQueue<Sample>>,
    pub(super) queued_bytes: Arc<AtomicUsize>,
    pub(super) busy: Arc<AtomicUsize>,
    pub(super) drained: Arc<tokio::sync::Notify>,
    pub(super) flushing: Arc<AtomicBool>,
    pub(super) wakeup: Arc<Wakeup>,
    pub(super) evaluator: Arc<ArcSwap<Evaluator>>,
    pub(super) sessions: Arc<Sessions>,
    pub(super) frequencies: Arc<Frequencies>,
    pub(super) skipped: IntCounterVec,
    pub(super) errors: IntCounterVec,
}

impl Worker {
    pub(super) fn run(self) {
        lower_priority();
        let mut raised = false;
        loop {
            loop {
                if !raised && self.flushing.load(SeqCst) {
                    drain_priority();
                    raised = true;
                }
                // Busy before the pop, so a flush never sees an empty queue and an idle worker while a
                // sample is between the two.
                self.busy.fetch_add(1, SeqCst);
                let Some(sample) = self.queue.pop() else {
                    self.busy.fetch_sub(1, SeqCst);
                    // For a flush waiting on it (an atomic load when none is).
                    self.drained.notify_waiters();
                    break;
                };
                self.queued_bytes.fetch_sub(sample.bytes(), SeqCst);
                self.evaluate(sample);
                self.busy.fetch_sub(1, SeqCst);
                yield_to_traffic();
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
            // After the usage above: the skip counter is this sample's "done", bumped last.
            self.skipped.with_label_values(&[skip.as_str()]).inc();
            tracing::debug!(
                request_id = sample.request_id.as_str(),
                reason = skip.as_str(),
                "sample skipped"
            );
            return Err(skip.as_str());
        }
        let frequencies = self.frequencies.of(&sample.arm.name);
        let scored = match evaluator.score(&extracted, &frequencies) {
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
            retrieval_coverage: scored.retrieval_coverage,
            lambda: lambda.index(),
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
            retrieval_coverage = evaluation.retrieval_coverage,
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
            if let Some(c) = evaluation.retrieval_coverage {
                span.set_attribute(KeyValue::new("driftguard.retrieval_coverage", c));
            }
        }
        Ok(())
    }
}
