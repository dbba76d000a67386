//! The responses the proxy makes itself: [`ProxyError`] (the `kind` of `driftguard_proxy_errors_total`
//! and the `error` field) and its JSON body, and the mapping of each guard's typed refusal to its status,
//! headers and metrics. `serve::handle` calls these; the guards never see a response.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use serde_json::json;

use crate::guards::breaker::BreakerOpen;
use crate::guards::budget::admission::BudgetRefusal;
use crate::guards::fence::{FenceAnswer, FenceSettings, Receipt};
use crate::serve::body::{access_log, ProxyBody, RequestInfo};
use crate::serve::headers::{stamp, X_DRIFTGUARD_BREAKER, X_REQUEST_ID};
use crate::serve::router::Arm;
use crate::telemetry::metrics::Metrics;

/// Why the proxy answered a request itself; the `kind` label of `driftguard_proxy_errors_total` and the
/// `error` field of the JSON error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// Upstream refused or reset the connection, or failed before a response: 502.
    UpstreamUnreachable,
    /// Upstream did not connect or answer in time: 504.
    UpstreamTimeout,
    /// The TLS handshake with an https upstream failed (certificate, protocol): 502, counted as an
    /// upstream error like an unreachable one.
    UpstreamTls,
    /// Strict pins: the client's pins differ: 409.
    PinMismatch,
    /// No arm has a weight above 0: 503.
    NoUpstream,
    /// The client went away while its request was in flight (its upload broke off): 499, not counted
    /// against the arm's upstream.
    ClientClosed,
    /// A write while writes are frozen: 503.
    WritesFrozen,
    /// The arm's circuit breaker is open: 503 with `x-driftguard-breaker: open`.
    BreakerOpen,
    /// Refused by the token budget: 429.
    OverBudget,
    /// A write without an idempotency key while `writes.require_key` is set: 400.
    IdempotencyKeyRequired,
    /// An idempotency key that is empty, not visible ASCII, or too long: 400.
    IdempotencyKeyInvalid,
    /// A fenced write whose body is above `writes.max_body_bytes`: 413.
    BodyTooLarge,
    /// The key's receipt (or its execution in flight) is for another request, or the first request
    /// with the key is still in flight when this one's wait runs out: 409.
    IdempotencyConflict,
    /// The receipt store cannot be reached: a fenced write is refused rather than run unfenced: 503.
    ReceiptStoreUnavailable,
    /// The budget's Redis fails and `budget.on_backend_error = "closed"`: 503.
    BudgetUnavailable,
    /// The client did not send its request body within `listen.body_timeout`: 408, the client's fault,
    /// not counted against the arm.
    BodyTimeout,
    /// The client's request body is malformed (a broken chunked encoding): 400, not counted against
    /// the arm.
    BadRequest,
    /// A request the proxy does not pass on: `CONNECT`, or a transfer coding other than `chunked`: 501.
    NotImplemented,
}

impl ProxyError {
    pub const ALL: [ProxyError; 18] = [
        ProxyError::ClientClosed,
        ProxyError::WritesFrozen,
        ProxyError::BreakerOpen,
        ProxyError::OverBudget,
        ProxyError::BudgetUnavailable,
        ProxyError::UpstreamUnreachable,
        ProxyError::UpstreamTimeout,
        ProxyError::UpstreamTls,
        ProxyError::PinMismatch,
        ProxyError::NoUpstream,
        ProxyError::IdempotencyKeyRequired,
        ProxyError::IdempotencyKeyInvalid,
        ProxyError::BodyTooLarge,
        ProxyError::IdempotencyConflict,
        ProxyError::ReceiptStoreUnavailable,
        ProxyError::BodyTimeout,
        ProxyError::BadRequest,
        ProxyError::NotImplemented,
    ];

    /// The `kind` label and the `error` field.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyError::UpstreamUnreachable => "upstream_unreachable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::UpstreamTls => "upstream_tls",
            ProxyError::PinMismatch => "pin_mismatch",
            ProxyError::NoUpstream => "no_upstream",
            ProxyError::ClientClosed => "client_closed",
            ProxyError::WritesFrozen => "writes_frozen",
            ProxyError::BreakerOpen => "breaker_open",
            ProxyError::OverBudget => "budget",
            ProxyError::IdempotencyKeyRequired => "idempotency_key_required",
            ProxyError::IdempotencyKeyInvalid => "idempotency_key_invalid",
            ProxyError::BodyTooLarge => "body_too_large",
            ProxyError::IdempotencyConflict => "idempotency_conflict",
            ProxyError::ReceiptStoreUnavailable => "receipt_store_unavailable",
            ProxyError::BudgetUnavailable => "budget_unavailable",
            ProxyError::BodyTimeout => "body_timeout",
            ProxyError::BadRequest => "bad_request",
            ProxyError::NotImplemented => "not_implemented",
        }
    }

    /// The status the client gets.
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::UpstreamUnreachable | ProxyError::UpstreamTls => StatusCode::BAD_GATEWAY,
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
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BadRequest => StatusCode::BAD_REQUEST,
            ProxyError::NotImplemented => StatusCode::NOT_IMPLEMENTED,
        }
    }
}

/// nginx's "client closed request": the client left before the response.
pub const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// Counts a refusal in `driftguard_proxy_errors_total` and answers it with its JSON error.
pub fn refuse(
    metrics: &Metrics,
    arm: Option<&Arc<Arm>>,
    info: RequestInfo,
    kind: ProxyError,
    message: &str,
    start: Instant,
) -> Response<ProxyBody> {
    metrics.proxy_error(kind.as_str());
    error_response(arm, info, kind, message, start)
}

/// A JSON error made by the proxy: `{"error": kind, "message": .., "request_id": ..}`.
pub fn error_response(
    arm: Option<&Arc<Arm>>,
    info: RequestInfo,
    kind: ProxyError,
    message: &str,
    start: Instant,
) -> Response<ProxyBody> {
    if let (
        Some(arm),
        ProxyError::UpstreamUnreachable | ProxyError::UpstreamTimeout | ProxyError::UpstreamTls,
    ) = (arm, kind)
    {
        arm.stats
            .upstream_error(Instant::now(), kind == ProxyError::UpstreamTimeout);
    }
    let body =
        json!({"error": kind.as_str(), "message": message, "request_id": info.request_id_str()});
    // Not the arm failing: a frozen write, an unreachable receipt store, a Redis outage of the budget,
    // a client too slow to upload or sending a broken body.
    let deliberate = matches!(
        kind,
        ProxyError::WritesFrozen
            | ProxyError::ReceiptStoreUnavailable
            | ProxyError::BudgetUnavailable
            | ProxyError::BodyTimeout
            | ProxyError::BadRequest
    );
    json_response(
        arm,
        info,
        kind.status(),
        body.to_string(),
        start,
        deliberate,
    )
}

/// A JSON response made by the proxy, stamped, counted in the arm's windows unless `deliberate`, logged.
pub fn json_response(
    arm: Option<&Arc<Arm>>,
    info: RequestInfo,
    status: StatusCode,
    body: String,
    start: Instant,
    deliberate: bool,
) -> Response<ProxyBody> {
    let bytes = body.len() as u64;
    let mut response = Response::new(ProxyBody::full(Bytes::from(body)));
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

/// The budget step refused: 429 (with `Retry-After` when waiting helps), 503 when its Redis is down
/// and `on_backend_error = "closed"`, 499 when the client left while its body was priced, 400 when the
/// body's framing is broken (neither counted against the arm).
pub fn budget_refused(
    metrics: &Metrics,
    arm: &Arc<Arm>,
    info: RequestInfo,
    refusal: BudgetRefusal,
    start: Instant,
) -> Response<ProxyBody> {
    if let Some(reason) = refusal.rate_limited_reason() {
        metrics.rate_limited.with_label_values(&[reason]).inc();
    }
    let message = refusal.message();
    let mut response = match refusal {
        BudgetRefusal::BodyBroke => refuse(
            metrics,
            Some(arm),
            info,
            ProxyError::ClientClosed,
            &message,
            start,
        ),
        BudgetRefusal::BodyMalformed => {
            let kind = ProxyError::BadRequest;
            refuse(metrics, Some(arm), info, kind, &message, start)
        }
        // error_response adds `Retry-After: 1` to every 503.
        BudgetRefusal::Unavailable => {
            let kind = ProxyError::BudgetUnavailable;
            refuse(metrics, Some(arm), info, kind, &message, start)
        }
        BudgetRefusal::OverBudget { .. } | BudgetRefusal::TooLarge { .. } => {
            error_response(Some(arm), info, ProxyError::OverBudget, &message, start)
        }
    };
    if let Some(secs) = refusal.retry_after_secs() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// The arm's breaker is open and no degrade target took the request: 503 with
/// `x-driftguard-breaker: open` and the time until the breaker probes again.
pub fn breaker_open(
    metrics: &Metrics,
    arm: &Arc<Arm>,
    info: RequestInfo,
    open: BreakerOpen,
    start: Instant,
) -> Response<ProxyBody> {
    let message = format!("the circuit breaker of arm {:?} is open", arm.name);
    let kind = ProxyError::BreakerOpen;
    let mut response = refuse(metrics, Some(arm), info, kind, &message, start);
    let headers = response.headers_mut();
    headers.insert(X_DRIFTGUARD_BREAKER, HeaderValue::from_static("open"));
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from(open.retry_after_secs()),
    );
    response
}

/// The fence answered a keyed write itself: a replay, a 409, or a refusal.
pub fn fence_answered(
    metrics: &Metrics,
    arm: &Arc<Arm>,
    info: RequestInfo,
    answer: FenceAnswer,
    settings: &FenceSettings,
    start: Instant,
) -> Response<ProxyBody> {
    let kind = match &answer {
        FenceAnswer::Replay(receipt) => return replay_response(arm, info, receipt, start),
        FenceAnswer::Conflict { diff, .. } => {
            metrics.proxy_error(ProxyError::IdempotencyConflict.as_str());
            let body = json!({
                "error": ProxyError::IdempotencyConflict.as_str(),
                "message": answer.message(settings),
                "request_id": info.request_id_str(),
                "diff": diff,
            });
            let (status, body) = (StatusCode::CONFLICT, body.to_string());
            return json_response(Some(arm), info, status, body, start, false);
        }
        FenceAnswer::KeyRequired => ProxyError::IdempotencyKeyRequired,
        FenceAnswer::KeyInvalid => ProxyError::IdempotencyKeyInvalid,
        FenceAnswer::BodyTooLarge => ProxyError::BodyTooLarge,
        FenceAnswer::BodyBroke => ProxyError::ClientClosed,
        FenceAnswer::BodyMalformed => ProxyError::BadRequest,
        // The client was too slow sending the body the fence hashes.
        FenceAnswer::BodyLate => ProxyError::BodyTimeout,
        FenceAnswer::StillInFlight { .. } => ProxyError::IdempotencyConflict,
        FenceAnswer::Unavailable(_) => ProxyError::ReceiptStoreUnavailable,
    };
    let message = answer.message(settings);
    let mut response = refuse(metrics, Some(arm), info, kind, &message, start);
    if let FenceAnswer::StillInFlight { .. } = answer {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// A receipt replayed: the first response's status, headers and body (see
/// [`Receipt::replay_headers`]). Not counted in the arm's windows: the upstream did nothing.
fn replay_response(
    arm: &Arc<Arm>,
    info: RequestInfo,
    receipt: &Receipt,
    start: Instant,
) -> Response<ProxyBody> {
    let bytes = receipt.body.len() as u64;
    let mut response = Response::new(ProxyBody::full(receipt.body.clone()));
    *response.status_mut() = receipt.status();
    *response.headers_mut() = receipt.replay_headers(&info.request_id);
    access_log(
        &info,
        Some(arm),
        receipt.status,
        start.elapsed(),
        bytes,
        true,
    );
    response
}
