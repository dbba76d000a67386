//! One request through the data path of SPEC §1, as its stages in order: request id and trace, arm pick,
//! strict pins, the guards (fence, freeze, budget, breaker), the upstream request's head and body, the
//! send, and the response streamed back with its headers stamped and its timing observed.
//!
//! Bodies are never buffered (but for a fenced write, whose body is hashed whole): the client's body is
//! handed to the upstream as it arrives, and the upstream's reaches the client frame by frame through
//! [`ProxyBody`], which records the exchange when it ends. `serve::listener` calls [`handle`].

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Frame;
use hyper::body::Incoming;

use crate::capture::Capture;
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
    // Tracing off: this one check is all it costs.
    let trace = cx.tracer.as_ref().map(|otel| {
        Arc::new(otel.start_request(
            &parts.method,
            parts.uri.path(),
            &parts.headers,
            request_id.to_str().unwrap_or(""),
        ))
    });
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
    /// A sampled request: where its body's copy lands, and its session.
    tee: Option<(RequestSlot, Option<String>)>,
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
        Ok((response, lease)) => respond(x, arm, info, response, lease, carry),
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
                x.start,
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
            let timeout = settings.request_timeout;
            reserved = admission::admit(budget, peek, timeout, body, &parts.headers, prefix)
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

/// The body the upstream gets: the frames the guards read first, then the rest; copied when sampled.
fn request_body(
    x: &Exchange<'_>,
    parts: &Parts,
    body: Incoming,
    prefix: VecDeque<Frame<Bytes>>,
) -> (RequestBody, Option<(RequestSlot, Option<String>)>) {
    let settings = &x.table.settings;
    if !(h::carries_query(parts) && settings.sampled()) {
        return (RequestBody::plain(body).with_prefix(prefix), None);
    }
    let slot = RequestSlot::default();
    let session = settings
        .session_header
        .as_ref()
        .and_then(|name| parts.headers.get(name))
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let body = RequestBody::teed(body, settings.max_body_bytes, slot.clone()).with_prefix(prefix);
    (body, Some((slot, session)))
}

/// Sends the request and waits for the response head; the breaker's ticket gets the outcome. A failure
/// comes back as the error kind and message the client gets.
async fn send(
    x: &Exchange<'_>,
    arm: &Arc<Arm>,
    parts: Parts,
    body: RequestBody,
    ticket: Ticket,
    reserved: &mut Option<Reserved>,
) -> Result<(Response<Incoming>, Lease), (ProxyError, String)> {
    let timeout = x.table.settings.request_timeout;
    // One deadline for the whole wait, the budget's peek included; the breaker times the upstream only.
    let deadline = tokio::time::Instant::from_std(x.start + timeout);
    let sent_at = Instant::now();
    let sent = tokio::time::timeout_at(deadline, arm.pool.send(Request::from_parts(parts, body)));
    match sent.await {
        Ok(Ok(exchange)) => {
            let failed = exchange.0.status().is_server_error();
            ticket.complete(Instant::now(), sent_at.elapsed(), failed);
            Ok(exchange)
        }
        Ok(Err(e)) => {
            if !e.is_client_abort() {
                ticket.complete(Instant::now(), sent_at.elapsed(), true);
            }
            // The upstream got the request unless it could not even be connected to: it may well have
            // spent the tokens, so the reservation stands.
            if let (Some(r), false) = (reserved.take(), e.is_connect()) {
                r.keep();
            }
            let kind = if e.is_client_abort() {
                ProxyError::ClientClosed
            } else if e.is_timeout() {
                ProxyError::UpstreamTimeout
            } else if e.is_tls() {
                ProxyError::UpstreamTls
            } else {
                ProxyError::UpstreamUnreachable
            };
            let message = format!("upstream {}: {}", arm.upstream, crate::error::chain(&e));
            Err((kind, message))
        }
        Err(_) => {
            ticket.complete(Instant::now(), sent_at.elapsed(), true);
            if let Some(r) = reserved.take() {
                r.keep();
            }
            let message = format!(
                "upstream {} sent no response within {:?}",
                arm.upstream, timeout
            );
            Err((ProxyError::UpstreamTimeout, message))
        }
    }
}

/// The response head back to the client, stamped, with its body observed until it ends: the tee for
/// evaluation, the budget's settlement, the fence's receipt.
fn respond(
    x: &Exchange<'_>,
    arm: &Arc<Arm>,
    info: RequestInfo,
    response: Response<Incoming>,
    lease: Lease,
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
        (Some((request, session)), true, Some(sse)) => Some(Tee {
            request,
            response: Capture::new(settings.max_body_bytes),
            sse,
            session,
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
    };
    Response::from_parts(parts, ProxyBody::upstream(body, observed, lease))
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
