//! The fence's step on the request path (SPEC §5): `serve::handle` calls [`admit`] for a write; it reads
//! and hashes the body, asks the [`Fence`], and either lets the request lead or says how the fence answers
//! it instead ([`FenceAnswer`], which `serve` turns into a response).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use http::request::Parts;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{
    BodyHash, Fence, FenceError, FenceOutcome, FenceSettings, Fingerprint, Lead, Receipt,
    IDEMPOTENT_REPLAY, IDEMPOTENT_REPLAY_BODY, MAX_KEY_LEN,
};
use crate::guards::X_REQUEST_ID;

/// How the fence answers a keyed write itself, without the upstream.
pub enum FenceAnswer {
    /// The key's receipt: replay it.
    Replay(Arc<Receipt>),
    /// No key while `writes.require_key` is set.
    KeyRequired,
    /// The key is empty, not visible ASCII, or too long.
    KeyInvalid,
    /// The body is above `writes.max_body_bytes` (declared or read).
    BodyTooLarge,
    /// The client went away while its request body was read (499).
    BodyBroke,
    /// The request body's framing is broken (a malformed chunked encoding): the client's fault (400).
    BodyMalformed,
    /// The request body did not arrive within `listen.body_timeout` (408): the client's time, never
    /// the arm's.
    BodyLate,
    /// The key was used for another request: the fields that differ.
    Conflict {
        key: String,
        diff: serde_json::Map<String, serde_json::Value>,
    },
    /// The first request with the key was still in flight when this one's wait ran out.
    StillInFlight { key: String },
    /// The receipt store could not be asked.
    Unavailable(FenceError),
}

impl FenceAnswer {
    /// The message of the JSON error (all but [`FenceAnswer::Replay`], which answers with the receipt).
    pub fn message(&self, settings: &FenceSettings) -> String {
        match self {
            FenceAnswer::Replay(_) => String::new(),
            FenceAnswer::KeyRequired => {
                format!("writes need an idempotency key in {}", settings.header)
            }
            FenceAnswer::KeyInvalid => format!(
                "{} must be 1-{} visible ASCII characters",
                settings.header, MAX_KEY_LEN
            ),
            FenceAnswer::BodyTooLarge => format!(
                "a write with an idempotency key may carry at most {} bytes (writes.max_body_bytes)",
                settings.max_body_bytes
            ),
            FenceAnswer::BodyBroke => {
                "the client went away while sending the request body".to_string()
            }
            FenceAnswer::BodyMalformed => {
                "the request body is malformed (broken chunked encoding)".to_string()
            }
            FenceAnswer::BodyLate => {
                "the request body was not received within listen.body_timeout".to_string()
            }
            FenceAnswer::Conflict { key, .. } => {
                format!("idempotency key {key:?} was used for another request")
            }
            FenceAnswer::StillInFlight { key } => format!(
                "the first request with idempotency key {key:?} is still in flight; retry later"
            ),
            FenceAnswer::Unavailable(e) => {
                format!("a write with an idempotency key cannot be fenced now: {e}")
            }
        }
    }
}

/// The idempotency fence of one write (the caller has checked `writes.routes`). A write carrying the
/// idempotency header has its body read whole into `prefix` (bounded by `writes.max_body_bytes`) and
/// hashed; the fence then lets it lead — `Ok(Some(..))`: the upstream executes it and its response
/// becomes the key's receipt — or answers it itself (`Err`). A write without a key passes with `Ok(None)`.
///
/// The body is the client's to send by `body_deadline` (`listen.body_timeout` from the request's
/// start); `request_timeout` bounds only the wait for another request executing the same key, from
/// when this one's body is in.
pub async fn admit(
    fence: &Arc<Fence>,
    settings: &FenceSettings,
    request_timeout: Duration,
    parts: &mut Parts,
    body: &mut Incoming,
    prefix: &mut VecDeque<Frame<Bytes>>,
    body_deadline: tokio::time::Instant,
) -> Result<Option<(Lead, Fingerprint)>, FenceAnswer> {
    let key = match parts.headers.get(&settings.header) {
        None if settings.require_key => return Err(FenceAnswer::KeyRequired),
        None => return Ok(None),
        Some(v) => match v.to_str() {
            // Visible ASCII only: `to_str` lets spaces and tabs through, and a key that differs from
            // another by a trailing space would fence a second execution of the same write.
            Ok(k) if valid_key(k) => k.to_string(),
            _ => return Err(FenceAnswer::KeyInvalid),
        },
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > settings.max_body_bytes as u64) {
        return Err(FenceAnswer::BodyTooLarge);
    }
    let request = read_body(parts, body, prefix, settings.max_body_bytes, body_deadline).await?;
    // `request_timeout` is bounded by config, but a deadline is never worth an overflow panic.
    let now = tokio::time::Instant::now();
    let deadline = now
        .checked_add(request_timeout)
        .unwrap_or_else(|| now + crate::config::MAX_DURATION);
    // Another replica waits this long for a pending key should this one die while executing it.
    let lease = request_timeout.saturating_mul(2);
    match fence.admit(&key, request.clone(), deadline, lease).await {
        FenceOutcome::Lead(lead) => Ok(Some((lead, request))),
        FenceOutcome::Replay(receipt) => Err(FenceAnswer::Replay(receipt)),
        FenceOutcome::Conflict(diff) => Err(FenceAnswer::Conflict { key, diff }),
        FenceOutcome::StillInFlight => Err(FenceAnswer::StillInFlight { key }),
        FenceOutcome::Unavailable(e) => Err(FenceAnswer::Unavailable(e)),
    }
}

/// Reads the whole body into `prefix` (at most `max` bytes, by `deadline`), hashing it, and gives the
/// request its length; returns the request's fingerprint. A body that fails is the client's: broken
/// framing (400), the client gone (499), too slow (408).
async fn read_body(
    parts: &mut Parts,
    body: &mut Incoming,
    prefix: &mut VecDeque<Frame<Bytes>>,
    max: usize,
    deadline: tokio::time::Instant,
) -> Result<Fingerprint, FenceAnswer> {
    let mut hash = BodyHash::default();
    let read = tokio::time::timeout_at(deadline, async {
        let mut len = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            if let Some(data) = frame.data_ref() {
                len += data.len();
                if len > max {
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
        Ok(Ok(None)) => return Err(FenceAnswer::BodyTooLarge),
        Ok(Err(e)) if crate::guards::body_malformed(&e) => return Err(FenceAnswer::BodyMalformed),
        Ok(Err(_)) => return Err(FenceAnswer::BodyBroke),
        Err(_) => return Err(FenceAnswer::BodyLate),
    };
    // The body is whole now: send it with its length, however the client framed it.
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    parts.headers.remove(header::TRANSFER_ENCODING);
    Ok(Fingerprint {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        body_sha256: hash.finish(),
    })
}

impl Receipt {
    /// The head of a replay: the first response's headers (pins included: they say what produced it)
    /// with this request's id and `idempotent-replay: true`.
    pub fn replay_headers(&self, request_id: &HeaderValue) -> HeaderMap {
        let mut headers = self.header_map();
        headers.insert(X_REQUEST_ID, request_id.clone());
        headers.insert(IDEMPOTENT_REPLAY, HeaderValue::from_static("true"));
        if self.body_omitted {
            headers.insert(IDEMPOTENT_REPLAY_BODY, HeaderValue::from_static("omitted"));
        }
        headers
    }
}

/// An idempotency key is 1 to [`MAX_KEY_LEN`] visible ASCII characters: no space, tab or control.
fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(|b| b.is_ascii_graphic())
}
