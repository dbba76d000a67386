//! The bodies of the request path: [`ProxyBody`], what the client receives (an upstream stream being
//! observed, or a response the proxy made itself), with the per-exchange record ([`Observed`]: timing,
//! the tee for evaluation, the budget's spend, the fence's recording, the breaker's outcome) and the
//! access-log line. A body that breaks off or goes silent for `upstream.body_idle_timeout` after its
//! head is the arm's failure, for the breaker and the `error_rate` rule alike, though its head said
//! 2xx. `serve::handle` builds them; the client's body on its way upstream is [`RequestBody`]
//! (`serve::upload`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Method, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::capture::Capture;
use crate::eval::{Pipeline, Place, Sample};
use crate::guards::breaker::Ticket;
use crate::guards::budget::admission::{Reserved, UsageTap};
use crate::guards::fence::{FenceError, Recording};
use crate::serve::router::Arm;
use crate::serve::upstream::Lease;
use crate::telemetry::log;
use crate::telemetry::otel::RequestSpan;

pub use crate::serve::upload::{RequestBody, RequestSlot};

/// What the access log needs to know about the request.
#[derive(Clone)]
pub struct RequestInfo {
    pub request_id: HeaderValue,
    method: Method,
    /// The request target as received (shares the parsed bytes; the log prints its path).
    uri: Uri,
    version: Version,
    pub authority: Option<HeaderValue>,
    /// The request's OpenTelemetry span, when tracing is on; ended with the access-log line.
    pub trace: Option<Arc<RequestSpan>>,
}

impl RequestInfo {
    pub fn new(
        parts: &http::request::Parts,
        request_id: HeaderValue,
        trace: Option<Arc<RequestSpan>>,
    ) -> Self {
        RequestInfo {
            trace,
            request_id,
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            authority: parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        }
    }

    pub fn request_id_str(&self) -> &str {
        self.request_id.to_str().unwrap_or("")
    }
}

/// The copies of a sampled exchange, handed to the evaluation pipeline when the response completes.
pub struct Tee {
    pub request: RequestSlot,
    pub response: Capture,
    pub sse: bool,
    pub session: Option<String>,
    /// Its place in the evaluation queue, taken when the request was sampled.
    pub place: Place,
    pub pipeline: Arc<Pipeline>,
}

/// The budget reservation of a request and the response copy its usage is read from.
pub struct Spend {
    pub reserved: Reserved,
    pub response: UsageTap,
    pub sse: bool,
}

/// Timing and identity of a response in flight, reported once when its body ends or is dropped.
pub struct Observed {
    pub tee: Option<Tee>,
    /// A fenced write's response, copied for its idempotency receipt.
    pub fence: Option<Recording>,
    /// The budget reservation of this request and the response copy its usage is read from.
    pub spend: Option<Spend>,
    pub arm: Arc<Arm>,
    pub info: RequestInfo,
    pub status: u16,
    pub start: Instant,
    pub first_byte: bool,
    pub bytes: u64,
    pub access_log: bool,
    /// The breaker's ticket of a response whose head was no failure, with the upstream's time to that
    /// head: the body decides the outcome.
    pub ticket: Option<(Ticket, Duration)>,
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Read to its end and sent.
    Complete,
    /// The client went away first: no outcome for the arm.
    Left,
    /// The upstream broke it off, or went silent past `upstream.body_idle_timeout` (`timeout`).
    Broke { timeout: bool },
}

impl Observed {
    fn finish(&mut self, end: End) {
        let complete = end == End::Complete;
        let now = Instant::now();
        if let End::Broke { timeout } = end {
            self.arm.stats.upstream_error(now, timeout);
            self.arm.stats.broken_off(now);
        }
        match (self.ticket.take(), end) {
            (Some((ticket, duration)), End::Complete) => ticket.complete(now, duration, false),
            (Some((ticket, duration)), End::Broke { .. }) => ticket.complete(now, duration, true),
            // Dropped uncompleted: neither success nor failure.
            (_, End::Left) | (None, _) => {}
        }
        if !self.first_byte {
            self.arm.stats.first_byte(now, now - self.start);
        }
        self.arm.stats.completed(now, now - self.start);
        if let (false, Some(trace)) = (self.access_log, &self.info.trace) {
            trace.end(
                Some((&self.arm.name, self.arm.pins.map())),
                self.status,
                now - self.start,
                complete,
            );
        }
        if self.access_log {
            access_log(
                &self.info,
                Some(&self.arm),
                self.status,
                now - self.start,
                self.bytes,
                complete,
            );
        }
        if let Some(recording) = self.fence.take() {
            recording.finish(complete);
        }
        if let Some(spend) = self.spend.take() {
            if complete {
                spend
                    .reserved
                    .settle(self.status, spend.response, spend.sse);
            } else {
                spend.reserved.keep();
            }
        }
        if let Some(tee) = self.tee.take() {
            if complete {
                let request = tee.request.lock().unwrap_or_else(|p| p.into_inner()).take();
                tee.pipeline.submit(Sample {
                    arm: self.arm.stats.clone(),
                    request_id: self.info.request_id_str().to_string(),
                    session: tee.session,
                    request,
                    response: tee.response,
                    sse: tee.sse,
                    at: now,
                    trace: self.info.trace.as_ref().map(|t| t.follow_up()),
                    place: tee.place,
                });
            } else {
                tee.pipeline.skip_incomplete();
            }
        }
    }
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_09 => "HTTP/0.9",
        _ => "HTTP/3",
    }
}

/// One access-log line. `arm` is `None` when no arm could take the request.
pub fn access_log(
    info: &RequestInfo,
    arm: Option<&Arm>,
    status: u16,
    latency: Duration,
    bytes: u64,
    complete: bool,
) {
    if let Some(trace) = &info.trace {
        trace.end(
            arm.map(|a| (a.name.as_str(), a.pins.map())),
            status,
            latency,
            complete,
        );
    }
    log::access(|line| {
        line.str("request_id", info.request_id_str());
        line.str("arm", arm.map(|a| a.name.as_str()).unwrap_or(""));
        line.raw("pins", arm.map(|a| a.pins.json()).unwrap_or("{}"));
        line.str("method", info.method.as_str());
        line.str("path", info.uri.path());
        line.str("version", version_str(info.version));
        line.u64("status", status.into());
        line.millis("latency_ms", latency);
        line.u64("bytes", bytes);
        line.bool("complete", complete);
    });
}

/// Why a response body failed on its way to the client.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("upstream body: {0}")]
    Upstream(#[from] hyper::Error),
    #[error("the upstream sent no body bytes for {0:?} (upstream.body_idle_timeout)")]
    Idle(Duration),
    #[error("the idempotency receipt could not be stored: {0}")]
    Receipt(#[from] FenceError),
}

/// The body the proxy sends to clients: an upstream stream being observed, or a response it made itself.
pub struct ProxyBody(Kind);

impl ProxyBody {
    /// A response the proxy made itself (an error, a replay).
    #[inline]
    pub fn full(bytes: Bytes) -> Self {
        ProxyBody(Kind::Full(Full::new(bytes)))
    }

    /// An upstream response on its way to the client, observed until it ends; `lease` goes back to the
    /// pool once the body is read to its end.
    #[inline]
    pub fn upstream(inner: Incoming, observed: Observed, lease: Lease, idle: Duration) -> Self {
        ProxyBody(Kind::Upstream {
            inner,
            observed: Some(observed),
            lease: Some(lease),
            committing: None,
            idle: Silence {
                limit: idle,
                timer: None,
            },
        })
    }
}

/// A fenced write's receipt being stored (`Recording::commit`).
type Committing = Pin<Box<dyn Future<Output = Result<(), FenceError>> + Send>>;

// Boxing `Observed` would cost an allocation per proxied response; the enum is moved once.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Upstream {
        inner: Incoming,
        observed: Option<Observed>,
        lease: Option<Lease>,
        /// A fenced write's receipt being stored: the end of the body waits for it, so a client that
        /// saw the whole response can count on its replay; a receipt that cannot be stored fails the
        /// body (fail closed: the client never sees a clean end it could not retry safely).
        committing: Option<Committing>,
        idle: Silence,
    },
    Full(Full<Bytes>),
}

/// The upstream's silence in a response body, timed against `upstream.body_idle_timeout`. The timer is
/// made the first time the body has nothing to give, so a response that arrives in one go costs none.
struct Silence {
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Silence {
    /// A frame arrived: the silence starts over.
    fn heard(&mut self) {
        if let Some(timer) = self.timer.as_mut() {
            timer
                .as_mut()
                .reset(tokio::time::Instant::now() + self.limit);
        }
    }

    /// The body had nothing to give: whether the silence has lasted too long (else a wake-up is set).
    fn too_long(&mut self, cx: &mut TaskContext<'_>) -> bool {
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        timer.as_mut().poll(cx).is_ready()
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    /// The upstream's error or silence, or the fence's when a receipt cannot be stored.
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().0 {
            Kind::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Kind::Upstream {
                inner,
                observed,
                lease,
                committing,
                idle,
            } => {
                if let Some(commit) = committing.as_mut() {
                    let stored = ready!(commit.as_mut().poll(cx));
                    *committing = None;
                    return Poll::Ready(stored.err().map(|e| Err(e.into())));
                }
                let frame = match Pin::new(inner).poll_frame(cx) {
                    Poll::Ready(frame) => {
                        idle.heard();
                        frame.map(|f| f.map_err(BodyError::from))
                    }
                    Poll::Pending if !idle.too_long(cx) => return Poll::Pending,
                    // The upstream went silent: cut the response off (its connection is dropped with
                    // the lease) and fail it like a break.
                    Poll::Pending => Some(Err(BodyError::Idle(idle.limit))),
                };
                if frame.is_none() {
                    if let Some(lease) = lease.take() {
                        lease.release();
                    }
                }
                if let Some(obs) = observed.as_mut() {
                    match &frame {
                        Some(Ok(f)) => {
                            if let Some(data) = f.data_ref() {
                                if !obs.first_byte && !data.is_empty() {
                                    obs.first_byte = true;
                                    let now = Instant::now();
                                    obs.arm.stats.first_byte(now, now - obs.start);
                                }
                                obs.bytes += data.len() as u64;
                                if let Some(tee) = obs.tee.as_mut() {
                                    tee.response.push(data);
                                }
                                if let Some(spend) = obs.spend.as_mut() {
                                    spend.response.push(data);
                                }
                                if let Some(recording) = obs.fence.as_mut() {
                                    recording.push(data);
                                }
                            }
                        }
                        Some(Err(e)) => {
                            if let Some(mut obs) = observed.take() {
                                // The upstream broke off mid-body: its failure, though the head said 2xx.
                                let timeout = matches!(e, BodyError::Idle(_));
                                obs.finish(End::Broke { timeout });
                            }
                        }
                        None => {
                            if let Some(mut obs) = observed.take() {
                                if let Some(recording) = obs.fence.take() {
                                    *committing = Some(Box::pin(recording.commit(true)));
                                }
                                obs.finish(End::Complete);
                            }
                        }
                    }
                }
                if let Some(commit) = committing.as_mut() {
                    let stored = ready!(commit.as_mut().poll(cx));
                    *committing = None;
                    if let Err(e) = stored {
                        return Poll::Ready(Some(Err(e.into())));
                    }
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Full(full) => full.is_end_stream(),
            Kind::Upstream {
                inner,
                observed,
                committing,
                ..
            } => {
                inner.is_end_stream()
                    && committing.is_none()
                    && observed.as_ref().is_none_or(|o| o.fence.is_none())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Full(full) => full.size_hint(),
            Kind::Upstream {
                inner,
                observed,
                committing,
                ..
            } => {
                if committing.is_some() || observed.as_ref().is_some_and(|o| o.fence.is_some()) {
                    SizeHint::default()
                } else {
                    inner.size_hint()
                }
            }
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Kind::Upstream {
            observed,
            inner,
            lease,
            committing,
            ..
        } = &mut self.0
        {
            // The client left while the receipt was being stored: the store goes on without it.
            if let (Some(commit), Ok(rt)) =
                (committing.take(), tokio::runtime::Handle::try_current())
            {
                rt.spawn(async move {
                    let _ = commit.await;
                });
            }
            // An empty body is never polled; anything else dropped early means the client went away.
            let complete = inner.is_end_stream();
            if let (true, Some(lease)) = (complete, lease.take()) {
                lease.release();
            }
            if let Some(mut obs) = observed.take() {
                obs.finish(if complete { End::Complete } else { End::Left });
            }
        }
    }
}
