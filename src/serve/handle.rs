//! Proxy: one request through the data path of SPEC §1 — pins stamp, arm router, upstream forward, and
//! the response streamed back with its headers stamped and its timing observed.
//!
//! Bodies are never buffered: the client's request body is handed to the upstream as it arrives, and the
//! upstream's response body reaches the client frame by frame through [`ObservedBody`], which notes the
//! first byte and the end of the stream for the windows and the access log.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::capture::{Capture, RequestBody, RequestSlot};
use crate::eval::{Pipeline, Sample};
use crate::guards::breaker::Admission;
use crate::guards::budget::admission::{self, Reserved, UsageTap};
use crate::guards::budget::{Admission as BudgetAdmission, BackendDown};
use crate::guards::fence::{self, Decision, Fingerprint, Lead, Receipt, Recording};
use crate::serve::context::Context;
use crate::serve::pins;
use crate::serve::router::{Arm, RoutingTable};
use crate::serve::upstream::Lease;
use crate::telemetry::log::ACCESS;
use crate::telemetry::metrics::ProxyError;
use crate::telemetry::otel::RequestSpan;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_DRIFTGUARD_ARM: HeaderName = HeaderName::from_static("x-driftguard-arm");
pub const X_CACHE_NS: HeaderName = HeaderName::from_static("x-cache-ns");
pub const X_DRIFTGUARD_DEGRADE: HeaderName = HeaderName::from_static("x-driftguard-degrade");
pub const X_DRIFTGUARD_FLAGS: HeaderName = HeaderName::from_static("x-driftguard-flags");
pub const X_DRIFTGUARD_BREAKER: HeaderName = HeaderName::from_static("x-driftguard-breaker");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Connection-specific header fields of RFC 9110 §7.6.1; never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    PROXY_CONNECTION,
    KEEP_ALIVE,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Handles one client request. Never fails: upstream problems become JSON error responses.
pub async fn handle(
    cx: Arc<Context>,
    peer: Peer,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let start = Instant::now();
    let table = cx.table();
    let (parts, body) = req.into_parts();

    let request_id = match parts.headers.get(X_REQUEST_ID) {
        Some(v) if !v.is_empty() && v.len() <= 200 => v.clone(),
        _ => new_request_id(),
    };
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
        .and_then(|h| parts.headers.get(h))
        .map(HeaderValue::as_bytes);
    let Some(arm) = table.pick(sticky).cloned() else {
        cx.metrics.proxy_error(ProxyError::NoUpstream);
        let info = RequestInfo::new(&parts, request_id, trace.clone());
        tracing::warn!(
            request_id = info.request_id_str(),
            "no arm has a weight above 0"
        );
        return Ok(error_response(
            None,
            info,
            ProxyError::NoUpstream,
            "no upstream arm has a weight above 0",
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
    let response = forward(&cx, &table, &arm, &peer, info, parts, body, start).await;
    guard.disarm();
    Ok(response)
}

/// The request path once an arm is chosen.
#[allow(clippy::too_many_arguments)]
async fn forward(
    cx: &Arc<Context>,
    table: &RoutingTable,
    arm: &Arc<Arm>,
    peer: &Peer,
    info: RequestInfo,
    mut parts: http::request::Parts,
    mut body: Incoming,
    start: Instant,
) -> Response<ProxyBody> {
    let diffs = arm.pins.strip_client_pins(&mut parts.headers);
    if table.settings.strict_pins && !diffs.is_empty() {
        cx.metrics.proxy_error(ProxyError::PinMismatch);
        let body = pins::diff_json(&diffs, info.request_id_str());
        return json_response(
            Some(arm),
            info,
            StatusCode::CONFLICT,
            body.to_string(),
            start,
            false,
        );
    }

    // The fence comes before the freeze: a replay never reaches the upstream, so it is no write.
    let mut prefix = VecDeque::new();
    let lead = match fence_step(
        cx,
        table,
        arm,
        &info,
        &mut parts,
        &mut body,
        &mut prefix,
        start,
    )
    .await
    {
        Ok(lead) => lead,
        Err(response) => return response,
    };
    let controls = &table.controls;
    if controls.frozen
        && table
            .settings
            .writes
            .is_write(&parts.method, parts.uri.path())
    {
        cx.metrics.proxy_error(ProxyError::WritesFrozen);
        return error_response(
            Some(arm),
            info,
            ProxyError::WritesFrozen,
            "writes are frozen",
            start,
        );
    }
    // Budget: read a bounded prefix to price the request, then reserve it.
    let mut reserved = None;
    if let (Some(budget), Some(peek)) = (cx.budget(), table.settings.budget) {
        if carries_query(&parts) {
            let read = tokio::time::timeout(
                table.settings.request_timeout,
                admission::peek(&mut body, peek.peek_bytes, &mut prefix),
            )
            .await;
            let complete = match read {
                Ok(Ok(complete)) => complete,
                Ok(Err(_)) => {
                    let kind = ProxyError::ClientClosed;
                    cx.metrics.proxy_error(kind);
                    return error_response(
                        Some(arm),
                        info,
                        kind,
                        "the request body broke off",
                        start,
                    );
                }
                // A slow upload is priced by what it declares; the frames read so far are kept.
                Err(_) => false,
            };
            let tokens = admission::estimate(&prefix, complete, &parts.headers, peek);
            match budget.admit(tokens, Instant::now()).await {
                Ok(BudgetAdmission::Admitted(r)) => {
                    reserved = Some(Reserved::new(budget, r.tokens))
                }
                // The budget's Redis fails and on_backend_error = "open": through, unpriced.
                Err(BackendDown::Admit) => {}
                Err(BackendDown::Refuse) => {
                    cx.metrics
                        .rate_limited
                        .with_label_values(&["backend_down"])
                        .inc();
                    cx.metrics.proxy_error(ProxyError::BudgetUnavailable);
                    // error_response adds `Retry-After: 1` to every 503.
                    return error_response(
                        Some(arm),
                        info,
                        ProxyError::BudgetUnavailable,
                        "the token budget cannot be checked (its Redis is unreachable or slow) and budget.on_backend_error = \"closed\"",
                        start,
                    );
                }
                Ok(BudgetAdmission::OverBudget { retry_after }) => {
                    cx.metrics
                        .rate_limited
                        .with_label_values(&["over_budget"])
                        .inc();
                    let message = format!(
                        "the token budget is spent; {tokens} tokens fit again in {retry_after:?}"
                    );
                    let mut response =
                        error_response(Some(arm), info, ProxyError::OverBudget, &message, start);
                    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
                    return response;
                }
                Ok(BudgetAdmission::TooLarge { tokens, burst }) => {
                    cx.metrics
                        .rate_limited
                        .with_label_values(&["too_large"])
                        .inc();
                    let message = format!(
                        "this request needs about {tokens} tokens, more than budget.burst ({burst}): it can never be admitted"
                    );
                    return error_response(
                        Some(arm),
                        info,
                        ProxyError::OverBudget,
                        &message,
                        start,
                    );
                }
            }
        }
    }
    let (arm, ticket) = match arm.breaker.admit(Instant::now()) {
        Admission::Allowed(ticket) => (arm, ticket),
        Admission::Rejected { retry_after } => {
            // `breaker.degrade_target`: another arm takes the request, if its own breaker lets it.
            let fallback = table
                .settings
                .degrade_target
                .and_then(|i| table.arms().get(i))
                .filter(|target| target.name != arm.name)
                .and_then(|target| match target.breaker.admit(Instant::now()) {
                    Admission::Allowed(ticket) => Some((target, ticket)),
                    Admission::Rejected { .. } => None,
                });
            if let Some((target, ticket)) = fallback {
                cx.metrics
                    .breaker_fallbacks
                    .with_label_values(&[arm.name.as_str(), target.name.as_str()])
                    .inc();
                (target, ticket)
            } else {
                cx.metrics.proxy_error(ProxyError::BreakerOpen);
                let message = format!("the circuit breaker of arm {:?} is open", arm.name);
                let mut response =
                    error_response(Some(arm), info, ProxyError::BreakerOpen, &message, start);
                let headers = response.headers_mut();
                headers.insert(X_DRIFTGUARD_BREAKER, HeaderValue::from_static("open"));
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
                return response;
            }
        }
    };
    let chunked = has_chunked_body(&parts.headers, &body);
    strip_hop_by_hop(&mut parts.headers);
    // One growth up front instead of rehashing as the stamped headers go in.
    parts.headers.reserve(arm.pins.len() + 5);
    forwarded_for(&mut parts.headers, peer);
    stamp(&mut parts.headers, arm, &info.request_id);
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
        join_cookies(&mut parts.headers);
    }

    // Origin form for the upstream; Host is the client's (h1), its :authority (h2c), else the upstream's.
    let host = match parts.headers.get(header::HOST) {
        Some(_) => None,
        None => Some(
            info.authority
                .clone()
                .unwrap_or_else(|| arm.host_header.clone()),
        ),
    };
    if let Some(host) = host {
        parts.headers.insert(header::HOST, host);
    }
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let origin = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::try_from(origin).unwrap_or_else(|_| Uri::from_static("/"));
    }
    parts.version = Version::HTTP_11;

    let settings = &table.settings;
    let (body, tee) = if carries_query(&parts) && settings.sampled() {
        let slot = RequestSlot::default();
        let session = settings
            .session_header
            .as_ref()
            .and_then(|h| parts.headers.get(h))
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let body =
            RequestBody::teed(body, settings.max_body_bytes, slot.clone()).with_prefix(prefix);
        (body, Some((slot, session)))
    } else {
        (RequestBody::plain(body).with_prefix(prefix), None)
    };
    // One deadline for the whole wait, the budget's peek included; the breaker times the upstream only.
    let deadline = tokio::time::Instant::from_std(start + settings.request_timeout);
    let sent_at = Instant::now();
    let sent = tokio::time::timeout_at(deadline, arm.pool.send(Request::from_parts(parts, body)));
    let (response, lease) = match sent.await {
        Ok(Ok(exchange)) => {
            let failed = exchange.0.status().is_server_error();
            ticket.complete(Instant::now(), sent_at.elapsed(), failed);
            exchange
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
            } else {
                ProxyError::UpstreamUnreachable
            };
            let message = format!("upstream {}: {}", arm.upstream, crate::error::chain(&e));
            cx.metrics.proxy_error(kind);
            return error_response(Some(arm), info, kind, &message, start);
        }
        Err(_) => {
            ticket.complete(Instant::now(), sent_at.elapsed(), true);
            if let Some(r) = reserved.take() {
                r.keep();
            }
            let message = format!(
                "upstream {} sent no response within {:?}",
                arm.upstream, table.settings.request_timeout
            );
            cx.metrics.proxy_error(ProxyError::UpstreamTimeout);
            return error_response(
                Some(arm),
                info,
                ProxyError::UpstreamTimeout,
                &message,
                start,
            );
        }
    };

    let (mut parts, body) = response.into_parts();
    let now = Instant::now();
    for (_, pin) in arm.pins.echoed_mismatches(&parts.headers) {
        arm.stats.pin_mismatch(now, &pin.name);
    }
    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        // RFC 9112 §6.3: with both, the length is wrong; the client gets the stream re-framed.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.reserve(arm.pins.len() + 3);
    stamp(&mut parts.headers, arm, &info.request_id);
    let status = parts.status.as_u16();
    arm.stats.response(now, status);
    let tee = match (
        tee,
        parts.status.is_success(),
        answer_format(&parts.headers),
    ) {
        (Some((request, session)), true, Some(sse)) => Some(Tee {
            request,
            response: Capture::new(settings.max_body_bytes),
            sse,
            session,
            pipeline: cx.eval.clone(),
        }),
        (Some(_), true, None) => {
            cx.eval.skip_not_json();
            None
        }
        _ => None,
    };
    let spend = reserved.map(|reserved| Spend {
        reserved,
        response: UsageTap::new(settings.max_body_bytes),
        sse: answer_format(&parts.headers) == Some(true),
    });
    let fence = lead.map(|(lead, request)| {
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
        start,
        first_byte: false,
        bytes: 0,
        access_log: settings.access_log,
        tee,
    };
    let upstream = Kind::Upstream {
        inner: body,
        observed: Some(observed),
        lease: Some(lease),
        committing: None,
    };
    Response::from_parts(parts, ProxyBody(upstream))
}

/// The idempotency fence (SPEC §5) of one request. A write carrying the idempotency header has its body
/// read whole into `prefix` (bounded by `writes.max_body_bytes`) and hashed; the fence then either lets
/// it lead — `Ok(Some(..))`, the upstream executes it and its response becomes the key's receipt — or
/// answers it here: a replay, a 409 conflict, or a refusal. Other requests pass with `Ok(None)`.
#[allow(clippy::too_many_arguments)]
async fn fence_step(
    cx: &Arc<Context>,
    table: &RoutingTable,
    arm: &Arc<Arm>,
    info: &RequestInfo,
    parts: &mut http::request::Parts,
    body: &mut Incoming,
    prefix: &mut VecDeque<Frame<Bytes>>,
    start: Instant,
) -> Result<Option<(Lead, Fingerprint)>, Response<ProxyBody>> {
    let settings = &table.settings;
    if !settings.writes.is_write(&parts.method, parts.uri.path()) {
        return Ok(None);
    }
    let (Some(fence), config) = (cx.fence.as_ref(), &settings.fence) else {
        return Ok(None);
    };
    let refuse = |kind: ProxyError, message: &str| {
        cx.metrics.proxy_error(kind);
        error_response(Some(arm), info.clone(), kind, message, start)
    };
    let key = match parts.headers.get(&config.header) {
        None if config.require_key => {
            let message = format!("writes need an idempotency key in {}", config.header);
            return Err(refuse(ProxyError::IdempotencyKeyRequired, &message));
        }
        None => return Ok(None),
        Some(v) => match v.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= fence::MAX_KEY_LEN => k.to_string(),
            _ => {
                let message = format!(
                    "{} must be 1-{} visible ASCII characters",
                    config.header,
                    fence::MAX_KEY_LEN
                );
                return Err(refuse(ProxyError::IdempotencyKeyInvalid, &message));
            }
        },
    };

    let too_large = format!(
        "a write with an idempotency key may carry at most {} bytes (writes.max_body_bytes)",
        config.max_body_bytes
    );
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > config.max_body_bytes as u64) {
        return Err(refuse(ProxyError::BodyTooLarge, &too_large));
    }
    let deadline = tokio::time::Instant::from_std(start + settings.request_timeout);
    let mut hash = fence::BodyHash::default();
    let read = tokio::time::timeout_at(deadline, async {
        let mut len = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            if let Some(data) = frame.data_ref() {
                len += data.len();
                if len > config.max_body_bytes {
                    return Ok(None);
                }
                hash.update(data);
            }
            prefix.push_back(frame);
        }
        Ok::<_, hyper::Error>(Some(len))
    })
    .await;
    let len = match read {
        Ok(Ok(Some(len))) => len,
        Ok(Ok(None)) => return Err(refuse(ProxyError::BodyTooLarge, &too_large)),
        Ok(Err(_)) => {
            return Err(refuse(
                ProxyError::ClientClosed,
                "the request body broke off",
            ))
        }
        Err(_) => {
            let message = "the request body did not arrive within upstream.request_timeout";
            return Err(refuse(ProxyError::ClientClosed, message));
        }
    };
    // The body is whole now: send it with its length, however the client framed it.
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    parts.headers.remove(header::TRANSFER_ENCODING);
    let request = Fingerprint {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        body_sha256: hash.finish(),
    };
    // Another replica waits this long for a pending key should this one die while executing it.
    let lease = settings.request_timeout * 2;
    match fence.admit(&key, request.clone(), deadline, lease).await {
        Decision::Lead(lead) => Ok(Some((lead, request))),
        Decision::Replay(receipt) => Err(replay_response(arm, info.clone(), &receipt, start)),
        Decision::Conflict(diff) => {
            cx.metrics.proxy_error(ProxyError::IdempotencyConflict);
            let body = serde_json::json!({
                "error": ProxyError::IdempotencyConflict.as_str(),
                "message": format!("idempotency key {key:?} was used for another request"),
                "request_id": info.request_id_str(),
                "diff": diff,
            });
            Err(json_response(
                Some(arm),
                info.clone(),
                StatusCode::CONFLICT,
                body.to_string(),
                start,
                false,
            ))
        }
        Decision::StillInFlight => {
            let message = format!(
                "the first request with idempotency key {key:?} is still in flight; retry later"
            );
            let mut response = refuse(ProxyError::IdempotencyConflict, &message);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            Err(response)
        }
        Decision::Unavailable(e) => Err(refuse(
            ProxyError::ReceiptStoreUnavailable,
            &format!("a write with an idempotency key cannot be fenced now: {e}"),
        )),
    }
}

/// A receipt replayed: the first response's status, headers (pins included: they say what produced it)
/// and body, with this request's id and `idempotent-replay: true`. Not counted in the arm's windows: the
/// upstream did nothing.
fn replay_response(
    arm: &Arc<Arm>,
    info: RequestInfo,
    receipt: &Receipt,
    start: Instant,
) -> Response<ProxyBody> {
    let bytes = receipt.body.len() as u64;
    let mut response = Response::new(ProxyBody(Kind::Full(Full::new(receipt.body.clone()))));
    *response.status_mut() = receipt.status();
    let headers = response.headers_mut();
    *headers = receipt.header_map();
    headers.insert(X_REQUEST_ID, info.request_id.clone());
    headers.insert(fence::IDEMPOTENT_REPLAY, HeaderValue::from_static("true"));
    if receipt.body_omitted {
        headers.insert(
            fence::IDEMPOTENT_REPLAY_BODY,
            HeaderValue::from_static("omitted"),
        );
    }
    let status = receipt.status;
    access_log(&info, Some(arm), status, start.elapsed(), bytes, true);
    response
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
            access_log(
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

/// nginx's "client closed request": the client left before the response.
const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// A request body sent without a length (chunked, or an h2c stream without content-length).
fn has_chunked_body(headers: &HeaderMap, body: &Incoming) -> bool {
    !body.is_end_stream() && !headers.contains_key(header::CONTENT_LENGTH)
}

/// RFC 9113 §8.2.3: an HTTP/2 client may split `cookie` into several fields; HTTP/1.1 wants one.
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(value) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, value);
    }
}

/// Whether a request can carry a question: a body-bearing method with a JSON (or unstated) content type.
/// Only these are sampled, so plain GETs and uploads never pay for the tee.
fn carries_query(parts: &http::request::Parts) -> bool {
    matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
        && parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_none_or(|v| contains(v.as_bytes(), b"json"))
}

/// `Some(is_sse)` when a response can carry an answer: JSON (or unstated) or an event stream.
fn answer_format(headers: &HeaderMap) -> Option<bool> {
    let Some(ct) = headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes) else {
        return Some(false);
    };
    if ct.starts_with(b"text/event-stream") {
        Some(true)
    } else if contains(ct, b"json") {
        Some(false)
    } else {
        None
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// Stamps pins, arm, request id and cache namespace.
fn stamp(headers: &mut HeaderMap, arm: &Arm, request_id: &HeaderValue) {
    arm.pins.stamp(headers);
    headers.insert(X_DRIFTGUARD_ARM, arm.arm_header.clone());
    headers.insert(X_REQUEST_ID, request_id.clone());
    headers.insert(X_CACHE_NS, arm.cache_ns_header.clone());
}

/// Removes hop-by-hop fields, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds the (rare) hop-by-hop fields; removing blindly would hash six names
    // per message.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::try_from(name.trim()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The client end of a connection, with its address ready as a header value.
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    ip: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        let ip = HeaderValue::try_from(addr.ip().to_string())
            .unwrap_or(HeaderValue::from_static("unknown"));
        Peer { addr, ip }
    }
}

/// Appends the peer to `x-forwarded-for` and sets `x-forwarded-proto` unless a front proxy did.
fn forwarded_for(headers: &mut HeaderMap, peer: &Peer) {
    let value = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) => HeaderValue::try_from(format!("{prior}, {}", peer.addr.ip())).ok(),
        None => Some(peer.ip.clone()),
    };
    if let Some(value) = value {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers
        .entry(X_FORWARDED_PROTO)
        .or_insert(HeaderValue::from_static("http"));
}

/// 32 random hex digits.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut id = [0u8; 32];
    for b in id.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("0"))
}

/// A JSON error made by the proxy: `{"error": kind, "message": .., "request_id": ..}`.
fn error_response(
    arm: Option<&Arc<Arm>>,
    info: RequestInfo,
    kind: ProxyError,
    message: &str,
    start: Instant,
) -> Response<ProxyBody> {
    let status = match kind {
        ProxyError::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
        ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        ProxyError::PinMismatch => StatusCode::CONFLICT,
        ProxyError::NoUpstream => StatusCode::SERVICE_UNAVAILABLE,
        ProxyError::ClientClosed => CLIENT_CLOSED,
        ProxyError::WritesFrozen | ProxyError::BreakerOpen | ProxyError::BudgetUnavailable => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ProxyError::OverBudget => StatusCode::TOO_MANY_REQUESTS,
        ProxyError::IdempotencyKeyRequired | ProxyError::IdempotencyKeyInvalid => {
            StatusCode::BAD_REQUEST
        }
        ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ProxyError::IdempotencyConflict => StatusCode::CONFLICT,
        ProxyError::ReceiptStoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
    };
    if let (Some(arm), ProxyError::UpstreamUnreachable | ProxyError::UpstreamTimeout) = (arm, kind)
    {
        arm.stats
            .upstream_error(Instant::now(), kind == ProxyError::UpstreamTimeout);
    }
    let body = serde_json::json!({"error": kind.as_str(), "message": message, "request_id": info.request_id_str()});
    // Not the arm failing: a frozen write, an unreachable receipt store, a Redis outage of the budget.
    let deliberate = matches!(
        kind,
        ProxyError::WritesFrozen
            | ProxyError::ReceiptStoreUnavailable
            | ProxyError::BudgetUnavailable
    );
    json_response(arm, info, status, body.to_string(), start, deliberate)
}

fn json_response(
    arm: Option<&Arc<Arm>>,
    info: RequestInfo,
    status: StatusCode,
    body: String,
    start: Instant,
    deliberate: bool,
) -> Response<ProxyBody> {
    let bytes = body.len() as u64;
    let mut response = Response::new(ProxyBody(Kind::Full(Full::new(Bytes::from(body)))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::GATEWAY_TIMEOUT {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    let now = Instant::now();
    match arm {
        Some(arm) => {
            stamp(headers, arm, &info.request_id);
            // A frozen write is a rollback step doing its job, not the arm failing: counting it would
            // hold the error rate up while the freeze is what recovery waits on.
            if !deliberate {
                arm.stats.response(now, status.as_u16());
                arm.stats.completed(now, now - start);
            }
        }
        None => {
            headers.insert(X_REQUEST_ID, info.request_id.clone());
        }
    }
    access_log(
        &info,
        arm.map(|a| a.as_ref()),
        status.as_u16(),
        now - start,
        bytes,
        true,
    );
    response
}

/// What the access log needs to know about the request.
#[derive(Clone)]
struct RequestInfo {
    request_id: HeaderValue,
    method: Method,
    /// The request target as received (shares the parsed bytes; the log prints its path).
    uri: Uri,
    version: Version,
    authority: Option<HeaderValue>,
    /// The request's OpenTelemetry span, when tracing is on; ended with the access-log line.
    trace: Option<Arc<RequestSpan>>,
}

impl RequestInfo {
    fn new(
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

    fn request_id_str(&self) -> &str {
        self.request_id.to_str().unwrap_or("")
    }
}

/// The copies of a sampled exchange, handed to the evaluation pipeline when the response completes.
struct Tee {
    request: RequestSlot,
    response: Capture,
    sse: bool,
    session: Option<String>,
    pipeline: Arc<Pipeline>,
}

struct Spend {
    reserved: Reserved,
    response: UsageTap,
    sse: bool,
}

/// Timing and identity of a response in flight, reported once when its body ends or is dropped.
struct Observed {
    tee: Option<Tee>,
    /// A fenced write's response, copied for its idempotency receipt.
    fence: Option<Recording>,
    /// The budget reservation of this request and the response copy its usage is read from.
    spend: Option<Spend>,
    arm: Arc<Arm>,
    info: RequestInfo,
    status: u16,
    start: Instant,
    first_byte: bool,
    bytes: u64,
    access_log: bool,
}

impl Observed {
    fn finish(&mut self, complete: bool) {
        let now = Instant::now();
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
fn access_log(
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
    tracing::info!(
        target: ACCESS,
        request_id = info.request_id_str(),
        arm = arm.map(|a| a.name.as_str()).unwrap_or(""),
        pins_json = arm.map(|a| a.pins.json()).unwrap_or("{}"),
        method = info.method.as_str(),
        path = info.uri.path(),
        version = version_str(info.version),
        status,
        latency_ms = latency.as_micros() as f64 / 1e3,
        bytes,
        complete,
    );
}

/// The body the proxy sends to clients: an upstream stream being observed, or a response it made itself.
pub struct ProxyBody(Kind);

// Boxing `Observed` would cost an allocation per proxied response; the enum is moved once.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Upstream {
        inner: Incoming,
        observed: Option<Observed>,
        lease: Option<Lease>,
        /// A fenced write's receipt being stored: the end of the body waits for it, so a client that
        /// saw the whole response can count on its replay.
        committing: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    },
    Full(Full<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().0 {
            Kind::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Kind::Upstream {
                inner,
                observed,
                lease,
                committing,
            } => {
                if let Some(commit) = committing.as_mut() {
                    ready!(commit.as_mut().poll(cx));
                    *committing = None;
                    return Poll::Ready(None);
                }
                let frame = ready!(Pin::new(inner).poll_frame(cx));
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
                        Some(Err(_)) => {
                            if let Some(mut obs) = observed.take() {
                                // The upstream broke off mid-body: its failure, though the head said 2xx.
                                obs.arm.stats.upstream_error(Instant::now(), false);
                                obs.finish(false);
                            }
                        }
                        None => {
                            if let Some(mut obs) = observed.take() {
                                if let Some(recording) = obs.fence.take() {
                                    *committing = Some(Box::pin(recording.commit(true)));
                                }
                                obs.finish(true);
                            }
                        }
                    }
                }
                if let Some(commit) = committing.as_mut() {
                    ready!(commit.as_mut().poll(cx));
                    *committing = None;
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
        } = &mut self.0
        {
            // The client left while the receipt was being stored: the store goes on without it.
            if let (Some(commit), Ok(rt)) =
                (committing.take(), tokio::runtime::Handle::try_current())
            {
                rt.spawn(commit);
            }
            // An empty body is never polled; anything else dropped early means the client went away.
            let complete = inner.is_end_stream();
            if let (true, Some(lease)) = (complete, lease.take()) {
                lease.release();
            }
            if let Some(mut obs) = observed.take() {
                obs.finish(complete);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        forwarded_for(&mut h, &Peer::new("10.0.0.2:5000".parse().unwrap()));
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.2");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        forwarded_for(&mut h, &Peer::new("10.0.0.3:5000".parse().unwrap()));
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.2, 10.0.0.3");
        assert_eq!(h[X_FORWARDED_PROTO], "https");
    }
}
