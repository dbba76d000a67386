//! One request through the data path of SPEC §1, as its stages in order: request id and trace, the
//! refusal of what is not passed on (`CONNECT`, transfer codings other than chunked), arm pick, strict
//! pins, the guards (fence, freeze, budget, breaker), the upstream request's head and body, the send,
//! and the response streamed back with its headers stamped and its timing observed.
//!
//! The client's upload and the upstream's answer are timed apart: the client has `listen.body_timeout`
//! to send its body (else 408, never the arm's), and the upstream's `request_timeout` starts once the
//! body is sent.
//!
//! Bodies are never buffered (but for a fenced write, whose body is hashed whole): the client's body is
//! handed to the upstream as it arrives, and the upstream's reaches the client frame by frame through
//! [`ProxyBody`], which records the exchange when it ends. `serve::listener` calls [`handle`].

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Frame;
use hyper::body::Incoming;

use crate::capture::Capture;
use crate::eval::Place;
use crate::guards::breaker::{self, BreakerOpen, Ticket};
use crate::guards::budget::admission::{self, BudgetRefusal, Reserved, UsageTap};
use crate::guards::fence::{self, FenceAnswer, Fingerprint, Lead};
use crate::guards::freeze;
use crate::serve::body::{Observed, ProxyBody, RequestBody, RequestInfo, RequestSlot, Spend, Tee};
use crate::serve::context::Context;
use crate::serve::error::{self, ProxyError, CLIENT_CLOSED};
use crate::serve::headers::{self as h, X_DRIFTGUARD_DEGRADE, X_DRIFTGUARD_FLAGS};
use crate::serve::pins;
use crate::serve::router::{Arm, RoutingTable};
use crate::serve::upload::{Upload, UploadEnd};
use crate::serve::upstream::Lease;

pub use crate::serve::headers::Peer;

/// Handles one client request. Never fails: upstream problems become JSON error responses.
pub async fn handle(
    cx: Arc<Context>,
    peer: Peer,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let start = Instant::now();
    let table = cx.table();
    let (parts, body) = req.into_parts();
    let request_id = h::request_id(&parts.headers);
    if let Some(sent) = parts.headers.get(h::X_REQUEST_ID) {
        if *sent != request_id {
            tracing::warn!(
                request_id = request_id.to_str().unwrap_or(""),
                client_request_id = String::from_utf8_lossy(sent.as_bytes()).as_ref(),
                "the client's x-request-id is not printable ASCII of 1-200 bytes; replaced"
            );
        }
    }
    // Tracing off: this one check is all it costs.
    let trace = cx.tracer.as_ref().map(|otel| {
        Arc::new(otel.start_request(
            &parts.method,
            parts.uri.path(),
            &parts.headers,
            request_id.to_str().unwrap_or(""),
        ))
    });
    if let Some(message) = h::not_passed_on(&parts) {
        let info = RequestInfo::new(&parts, request_id, trace);
        let kind = ProxyError::NotImplemented;
        return Ok(error::refuse(&cx.metrics, None, info, kind, message, start));
    }
    let sticky = table
        .sticky_header()
        .and_then(|name| parts.headers.get(name))
        .map(HeaderValue::as_bytes);
    let Some(arm) = table.pick(sticky).cloned() else {
        cx.metrics.proxy_error(ProxyError::NoUpstream.as_str());
        let info = RequestInfo::new(&parts, request_id, trace);
        tracing::warn!(
            request_id = info.request_id_str(),
            "no arm has a weight above 0"
        );
        let message = "no upstream arm has a weight above 0";
        return Ok(error::error_response(
            None,
            info,
            ProxyError::NoUpstream,
            message,
            start,
        ));
    };
    let info = RequestInfo::new(&parts, request_id, trace);
    // If the client goes away before the response head, hyper drops this future mid-await; the guard
    // still logs and counts the request.
    let guard = Cancelled {
        arm: arm.clone(),
        info: Some(info.clone()),
        start,
    };
    let x = Exchange {
        cx: &cx,
        table: &table,
        peer: &peer,
        start,
    };
    let response = forward(&x, &arm, info, parts, body).await;
    guard.disarm();
    Ok(response)
}

/// What every stage of one request reads.
struct Exchange<'a> {
    cx: &'a Context,
    /// The routing table the request started with.
    table: &'a RoutingTable,
    peer: &'a Peer,
    start: Instant,
}

/// What the guards and the tee hand on to the response body's record.
struct Carry {
    /// A fenced write leading its key, with its fingerprint.
    lead: Option<(Lead, Fingerprint)>,
    /// The budget's reservation.
    reserved: Option<Reserved>,
    /// A sampled request: where its body's copy lands, its session, and its place in the queue.
    tee: Option<(RequestSlot, Option<String>, Place)>,
}

/// The stages once an arm is chosen.
async fn forward(
    x: &Exchange<'_>,
    arm: &Arc<Arm>,
    info: RequestInfo,
    mut parts: Parts,
    mut body: Incoming,
) -> Response<ProxyBody> {
    let diffs = arm.pins.strip_client_pins(&mut parts.headers);
    if x.table.settings.strict_pins && !diffs.is_empty() {
        x.cx.metrics.proxy_error(ProxyError::PinMismatch.as_str());
        let body = pins::diff_json(&diffs, info.request_id_str()).to_string();
        return error::json_response(Some(arm), info, StatusCode::CONFLICT, body, x.start, false);
    }
    let mut prefix = VecDeque::new();
    let (picked, ticket, lead, reserved) =
        match guards(x, arm, &mut parts, &mut body, &mut prefix).await {
            Ok(passed) => passed,
            Err(refused) => return refused.respond(x, arm, info),
        };
    let arm = picked;
    upstream_head(x, arm, &info, &mut parts, &body);
    let (body, tee) = request_body(x, &parts, body, prefix);
    let mut carry = Carry {
        lead,
        reserved,
        tee,
    };
    let sent = send(x, arm, parts, body, ticket, &mut carry.reserved).await;
    match sent {
        Ok((response, lease, ticket)) => respond(x, arm, info, response, lease, ticket, carry),
        Err((kind, message)) => {
            error::refuse(&x.cx.metrics, Some(arm), info, kind, &message, x.start)
        }
    }
}

/// Why a guard stopped a request; answered by [`Refused::respond`].
enum Refused {
    Fence(FenceAnswer),
    Frozen,
    Budget(BudgetRefusal),
    Breaker(BreakerOpen),
}

impl Refused {
    fn respond(self, x: &Exchange<'_>, arm: &Arc<Arm>, info: RequestInfo) -> Response<ProxyBody> {
        let (metrics, start) = (&x.cx.metrics, x.start);
        match self {
            Refused::Fence(answer) => {
                let settings = &x.table.settings.fence;
                error::fence_answered(metrics, arm, info, answer, settings, start)
            }
            Refused::Frozen => {
                let kind = ProxyError::WritesFrozen;
                error::refuse(metrics, Some(arm), info, kind, "writes are frozen", start)
            }
            Refused::Budget(refusal) => error::budget_refused(metrics, arm, info, refusal, start),
            Refused::Breaker(open) => error::breaker_open(metrics, arm, info, open, start),
        }
    }
}

/// The arm that takes the request (its own, or the degrade target), its breaker ticket, the fence's
/// lead and the budget's reservation.
type Passed<'a> = (
    &'a Arc<Arm>,
    Ticket,
    Option<(Lead, Fingerprint)>,
    Option<Reserved>,
);

/// The guards in their order (SPEC §5). The fence comes before the freeze: a replay never reaches the
/// upstream, so it is no write. The budget reads a bounded prefix of the body into `prefix` to price it.
async fn guards<'a>(
    x: &Exchange<'a>,
    arm: &'a Arc<Arm>,
    parts: &mut Parts,
    body: &mut Incoming,
    prefix: &mut VecDeque<Frame<Bytes>>,
) -> Result<Passed<'a>, Refused> {
    let settings = &x.table.settings;
    let (method, path) = (&parts.method, parts.uri.path());
    // The guards that read the body ahead (the fence's hash, the budget's peek) wait for the client by
    // its own deadline, never by the arm's `request_timeout`.
    let body_deadline = tokio::time::Instant::from_std(x.start)
        .checked_add(settings.body_timeout)
        .unwrap_or_else(far_future);
    let lead = match x.cx.fence.as_ref() {
        Some(fence) if settings.writes.is_write(method, path) => {
            let timeout = settings.request_timeout;
            fence::step::admit(
                fence,
                &settings.fence,
                timeout,
                parts,
                body,
                prefix,
                body_deadline,
            )
            .await
            .map_err(Refused::Fence)?
        }
        _ => None,
    };
    let frozen = x.table.controls.frozen;
    freeze::admit(frozen, &settings.writes, &parts.method, parts.uri.path())
        .map_err(|_| Refused::Frozen)?;
    let mut reserved = None;
    if let (Some(budget), Some(peek)) = (x.cx.budget(), settings.budget) {
        if h::carries_query(parts) {
            reserved = admission::admit(budget, peek, body_deadline, body, &parts.headers, prefix)
                .await
                .map_err(Refused::Budget)?;
        }
    }
    // `breaker.degrade_target`: another arm takes the request, if its own breaker lets it.
    let target = || {
        settings
            .degrade_target
            .and_then(|i| x.table.arms().get(i))
            .filter(|target| target.name != arm.name)
    };
    let picked = breaker::pick(arm, target).map_err(Refused::Breaker)?;
    if picked.fell_back {
        x.cx.metrics
            .breaker_fallbacks
            .with_label_values(&[arm.name.as_str(), picked.arm.name.as_str()])
            .inc();
    }
    Ok((picked.arm, picked.ticket, lead, reserved))
}

/// The head the upstream gets: hop-by-hop fields gone, forwarded-for, pins and ids stamped, trace
/// context, the degrade directives and flags, origin form and HTTP/1.1.
fn upstream_head(
    x: &Exchange<'_>,
    arm: &Arc<Arm>,
    info: &RequestInfo,
    parts: &mut Parts,
    body: &Incoming,
) {
    let controls = &x.table.controls;
    let chunked = h::has_chunked_body(&parts.headers, body);
    h::strip_hop_by_hop(&mut parts.headers);
    // One growth up front instead of rehashing as the stamped headers go in.
    parts.headers.reserve(arm.pins.len() + 5);
    h::forwarded_for(&mut parts.headers, x.peer);
    h::stamp(&mut parts.headers, arm, &info.request_id);
    if let Some(trace) = &info.trace {
        trace.inject(&mut parts.headers);
    }
    // Only driftguard says what degrade mode and the flags are.
    parts.headers.remove(X_DRIFTGUARD_DEGRADE);
    parts.headers.remove(X_DRIFTGUARD_FLAGS);
    if let Some(directives) = &controls.degrade {
        parts
            .headers
            .insert(X_DRIFTGUARD_DEGRADE, directives.clone());
    }
    if let Some(flags) = controls.flags_header() {
        parts.headers.insert(X_DRIFTGUARD_FLAGS, flags.clone());
    }
    if chunked {
        // hyper sends a GET/HEAD/DELETE without a length as bodiless; say there is a body.
        parts.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    if parts.version == Version::HTTP_2 {
        h::join_cookies(&mut parts.headers);
    }
    // Origin form for the upstream; Host is the client's (h1), its :authority (h2c), else the upstream's.
    if !parts.headers.contains_key(header::HOST) {
        let host = info
            .authority
            .clone()
            .unwrap_or_else(|| arm.host_header.clone());
        parts.headers.insert(header::HOST, host);
    }
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let origin = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::try_from(origin).unwrap_or_else(|_| Uri::from_static("/"));
    }
    parts.version = Version::HTTP_11;
}

/// The body the upstream gets: the frames the guards read first, then the rest; copied when sampled
/// and the evaluation queue has a place for it (else nothing is copied: the sample would be dropped).
fn request_body(
    x: &Exchange<'_>,
    parts: &Parts,
    body: Incoming,
    prefix: VecDeque<Frame<Bytes>>,
) -> (RequestBody, Option<(RequestSlot, Option<String>, Place)>) {
    let settings = &x.table.settings;
    let place = (h::carries_query(parts) && settings.sampled())
        .then(|| x.cx.eval.reserve())
        .flatten();
    let Some(place) = place else {
        return (RequestBody::plain(body).with_prefix(prefix), None);
    };
    let slot = RequestSlot::default();
    let session = settings
        .session_header
        .as_ref()
        .and_then(|name| parts.headers.get(name))
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let body = RequestBody::teed(body, settings.max_body_bytes, slot.clone()).with_prefix(prefix);
    (body, Some((slot, session, place)))
}

/// The breaker's ticket of a response whose head was no failure, and the upstream's time to it.
type Pending = Option<(Ticket, Duration)>;

/// Sends the request and waits for the response head. While the client is still uploading, only the
/// client is timed (`listen.body_timeout`); the upstream's `request_timeout` starts once the body is
/// sent. A failing head (5xx) is the breaker's outcome at once; any other waits in the ticket for the
/// body's end. A failure comes back as the error kind and message the client gets.
async fn send(
    x: &Exchange<'_>,
    arm: &Arc<Arm>,
    parts: Parts,
    mut body: RequestBody,
    ticket: Ticket,
    reserved: &mut Option<Reserved>,
) -> Result<(Response<Incoming>, Lease, Pending), (ProxyError, String)> {
    let settings = &x.table.settings;
    let timeout = settings.request_timeout;
    let upload = body.watch();
    let exchange = arm.pool.send(Request::from_parts(parts, body));
    tokio::pin!(exchange);
    let mut sent_at = Instant::now();
    let mut answered = None;
    if let Some(upload) = &upload {
        match uploading(x, upload, exchange.as_mut()).await {
            Uploaded::Answered(result) => answered = Some(result),
            Uploaded::Sent => sent_at = Instant::now(),
            Uploaded::Failed(kind, message) => {
                // The client's doing: the ticket goes uncounted; the upstream saw part of a request.
                if let Some(r) = reserved.take() {
                    r.keep();
                }
                return Err((kind, message));
            }
        }
    }
    let result = match answered {
        Some(result) => Ok(result),
        None => {
            let deadline = tokio::time::Instant::from_std(sent_at)
                .checked_add(timeout)
                .unwrap_or_else(far_future);
            tokio::time::timeout_at(deadline, exchange).await
        }
    };
    match result {
        Ok(Ok((response, lease))) => {
            let elapsed = sent_at.elapsed();
            if response.status().is_server_error() {
                ticket.complete(Instant::now(), elapsed, true);
                Ok((response, lease, None))
            } else {
                Ok((response, lease, Some((ticket, elapsed))))
            }
        }
        Ok(Err(e)) => {
            // The client's body failed while the upstream was being sent it: not the upstream's doing.
            let client = e.is_client_abort().then(|| {
                let end = upload.as_ref().map_or(UploadEnd::Left, |u| u.end());
                client_fault(end)
            });
            if client.is_none() {
                ticket.complete(Instant::now(), sent_at.elapsed(), true);
            }
            // The upstream got the request unless it could not even be connected to: it may well have
            // spent the tokens, so the reservation stands.
            if let (Some(r), false) = (reserved.take(), e.is_connect()) {
                r.keep();
            }
            let message = format!("upstream {}: {}", arm.upstream, crate::error::chain(&e));
            let kind = match client {
                Some((kind, _)) => kind,
                None if e.is_timeout() => ProxyError::UpstreamTimeout,
                None if e.is_tls() => ProxyError::UpstreamTls,
                None => ProxyError::UpstreamUnreachable,
            };
            Err((kind, message))
        }
        Err(_) => {
            ticket.complete(Instant::now(), sent_at.elapsed(), true);
            if let Some(r) = reserved.take() {
                r.keep();
            }
            let message = format!(
                "upstream {} sent no response within {:?} of the request being sent",
                arm.upstream, timeout
            );
            Err((ProxyError::UpstreamTimeout, message))
        }
    }
}

/// How the client's upload went while the request was being sent.
enum Uploaded {
    /// The upstream answered (or failed) before the body was all sent.
    Answered(Result<(Response<Incoming>, Lease), crate::serve::upstream::UpstreamError>),
    /// The body is sent: the upstream's clock starts.
    Sent,
    /// The client was too slow, left or sent a broken body.
    Failed(ProxyError, String),
}

/// Waits for the client's upload to end (by `listen.body_timeout` from the request's start), or for
/// the upstream to answer first.
async fn uploading<F>(x: &Exchange<'_>, upload: &Upload, exchange: Pin<&mut F>) -> Uploaded
where
    F: std::future::Future<
        Output = Result<(Response<Incoming>, Lease), crate::serve::upstream::UpstreamError>,
    >,
{
    let limit = x.table.settings.body_timeout;
    let deadline = tokio::time::Instant::from_std(x.start)
        .checked_add(limit)
        .unwrap_or_else(far_future);
    tokio::select! {
        biased;
        result = exchange => Uploaded::Answered(result),
        end = upload.ended() => match end {
            UploadEnd::Sent | UploadEnd::Uploading => Uploaded::Sent,
            failed => {
                let (kind, message) = client_fault(failed);
                Uploaded::Failed(kind, message.to_string())
            }
        },
        _ = tokio::time::sleep_until(deadline) => Uploaded::Failed(
            ProxyError::BodyTimeout,
            format!("the request body was not received within {limit:?} (listen.body_timeout)"),
        ),
    }
}

/// The answer to a client whose upload failed: 400 for a malformed body, else 499 (it left).
fn client_fault(end: UploadEnd) -> (ProxyError, &'static str) {
    match end {
        UploadEnd::Malformed => (
            ProxyError::BadRequest,
            "the request body is malformed (broken chunked encoding)",
        ),
        _ => (
            ProxyError::ClientClosed,
            "the client went away while sending the request body",
        ),
    }
}

/// A deadline no configured duration reaches: what an overflowing one means.
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

/// The response head back to the client, stamped, with its body observed until it ends: the tee for
/// evaluation, the budget's settlement, the fence's receipt.
fn respond(
    x: &Exchange<'_>,
    arm: &Arc<Arm>,
    info: RequestInfo,
    response: Response<Incoming>,
    lease: Lease,
    ticket: Pending,
    carry: Carry,
) -> Response<ProxyBody> {
    let settings = &x.table.settings;
    let (mut parts, body) = response.into_parts();
    let now = Instant::now();
    for (_, pin) in arm.pins.echoed_mismatches(&parts.headers) {
        arm.stats.pin_mismatch(now, &pin.name);
    }
    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        // RFC 9112 §6.3: with both, the length is wrong; the client gets the stream re-framed.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    h::strip_hop_by_hop(&mut parts.headers);
    parts.headers.reserve(arm.pins.len() + 3);
    h::stamp(&mut parts.headers, arm, &info.request_id);
    let status = parts.status.as_u16();
    arm.stats.response(now, status);
    let tee = match (
        carry.tee,
        parts.status.is_success(),
        h::answer_format(&parts.headers),
    ) {
        (Some((request, session, place)), true, Some(sse)) => Some(Tee {
            request,
            response: Capture::new(settings.max_body_bytes),
            sse,
            session,
            place,
            pipeline: x.cx.eval.clone(),
        }),
        (Some(_), true, None) => {
            x.cx.eval.skip_not_json();
            None
        }
        _ => None,
    };
    let spend = carry.reserved.map(|reserved| Spend {
        reserved,
        response: UsageTap::new(settings.max_body_bytes),
        sse: h::answer_format(&parts.headers) == Some(true),
    });
    let fence = carry.lead.map(|(lead, request)| {
        // Sent chunked: with a length, hyper ends the message after the last byte without polling for
        // the end of the body, which is where the receipt's commit is awaited.
        parts.headers.remove(header::CONTENT_LENGTH);
        lead.record(request, parts.status, &parts.headers, &settings.fence)
    });
    let observed = Observed {
        fence,
        spend,
        arm: arm.clone(),
        info,
        status,
        start: x.start,
        first_byte: false,
        bytes: 0,
        access_log: settings.access_log,
        tee,
        ticket,
    };
    let body = ProxyBody::upstream(body, observed, lease, settings.body_idle_timeout);
    Response::from_parts(parts, body)
}

/// Logs and counts a request whose client went away before the response head (status 499).
struct Cancelled {
    arm: Arc<Arm>,
    info: Option<RequestInfo>,
    start: Instant,
}

impl Cancelled {
    fn disarm(mut self) {
        self.info = None;
    }
}

impl Drop for Cancelled {
    fn drop(&mut self) {
        if let Some(info) = self.info.take() {
            let now = Instant::now();
            self.arm.stats.response(now, CLIENT_CLOSED.as_u16());
            self.arm.stats.completed(now, now - self.start);
            crate::serve::body::access_log(
                &info,
                Some(&self.arm),
                CLIENT_CLOSED.as_u16(),
                now - self.start,
                0,
                false,
            );
        }
    }
}
