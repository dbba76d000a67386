//! The token budget on the request path: read a bounded prefix of the request body to estimate what it
//! will cost, reserve that in the [`Budget`](super::Budget), and settle the reservation against
//! the usage the upstream reports once the response is complete. `serve::handle` runs [`admit`] and
//! turns a [`BudgetRefusal`] into its 429 or 503.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{
    completion_tokens, estimate_prompt_tokens, BackendDown, Budget, BudgetAdmission, BudgetPeek,
};

/// Why the budget step refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetRefusal {
    /// The client went away while the body's prefix was read (499 `client_closed`).
    BodyBroke,
    /// The body's framing is broken (a malformed chunked encoding): 400 `bad_request`, the client's.
    BodyMalformed,
    /// The budget's Redis fails and `budget.on_backend_error = "closed"` (503 `budget_unavailable`).
    Unavailable,
    /// Not enough budget now; the same request fits again after `retry_after` (429 `budget`).
    OverBudget { tokens: u64, retry_after: Duration },
    /// The request needs more than `burst` tokens and can never be admitted (429 `budget`).
    TooLarge { tokens: u64, burst: u64 },
}

impl BudgetRefusal {
    /// The `reason` label of `driftguard_rate_limited_total`, for the refusals the budget itself made.
    pub fn rate_limited_reason(&self) -> Option<&'static str> {
        match self {
            BudgetRefusal::BodyBroke | BudgetRefusal::BodyMalformed => None,
            BudgetRefusal::Unavailable => Some("backend_down"),
            BudgetRefusal::OverBudget { .. } => Some("over_budget"),
            BudgetRefusal::TooLarge { .. } => Some("too_large"),
        }
    }

    /// The message of the JSON error.
    pub fn message(&self) -> String {
        match self {
            BudgetRefusal::BodyBroke => {
                "the client went away while sending the request body".to_string()
            }
            BudgetRefusal::BodyMalformed => {
                "the request body is malformed (broken chunked encoding)".to_string()
            }
            BudgetRefusal::Unavailable => "the token budget cannot be checked (its Redis is unreachable or slow) and budget.on_backend_error = \"closed\"".to_string(),
            BudgetRefusal::OverBudget { tokens, retry_after } => format!(
                "the token budget is spent; {tokens} tokens fit again in {retry_after:?}"
            ),
            BudgetRefusal::TooLarge { tokens, burst } => format!(
                "this request needs about {tokens} tokens, more than budget.burst ({burst}): it can never be admitted"
            ),
        }
    }

    /// Over budget: the `Retry-After` seconds (rounded up, at least 1).
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            BudgetRefusal::OverBudget { retry_after, .. } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                Some(secs.max(1))
            }
            _ => None,
        }
    }
}

/// The budget step: reads a bounded prefix of the body into `prefix` (until `body_deadline` at most:
/// `listen.body_timeout` from the request's start, the client's time) to price the request, then
/// reserves that. `Ok(None)`: through unpriced (the backend is down and `on_backend_error = "open"`).
/// A slow upload is priced by what it declares; the frames read so far are kept in `prefix` either
/// way, and `serve` answers the upload that is still late with 408.
pub async fn admit(
    budget: Arc<Budget>,
    peek_at: BudgetPeek,
    body_deadline: tokio::time::Instant,
    body: &mut Incoming,
    headers: &HeaderMap,
    prefix: &mut VecDeque<Frame<Bytes>>,
) -> Result<Option<Reserved>, BudgetRefusal> {
    let read = tokio::time::timeout_at(body_deadline, peek(body, peek_at.peek_bytes, prefix)).await;
    let complete = match read {
        Ok(Ok(complete)) => complete,
        Ok(Err(e)) if crate::guards::body_malformed(&e) => {
            return Err(BudgetRefusal::BodyMalformed)
        }
        Ok(Err(_)) => return Err(BudgetRefusal::BodyBroke),
        Err(_) => false,
    };
    let tokens = estimate(prefix, complete, headers, peek_at);
    match budget.admit(tokens, Instant::now()).await {
        Ok(BudgetAdmission::Admitted(r)) => Ok(Some(Reserved::new(budget, r.tokens))),
        Err(BackendDown::Admit) => Ok(None),
        Err(BackendDown::Refuse) => Err(BudgetRefusal::Unavailable),
        Ok(BudgetAdmission::OverBudget { retry_after }) => Err(BudgetRefusal::OverBudget {
            tokens,
            retry_after,
        }),
        Ok(BudgetAdmission::TooLarge { tokens, burst }) => {
            Err(BudgetRefusal::TooLarge { tokens, burst })
        }
    }
}

/// Reads frames into `into` until `limit` bytes or the end of the body. Returns whether the body ended.
/// The frames read stay in `into` even when the caller gives up waiting, so nothing is lost.
pub async fn peek(
    body: &mut Incoming,
    limit: usize,
    into: &mut VecDeque<Frame<Bytes>>,
) -> Result<bool, hyper::Error> {
    let mut len = 0;
    while len < limit {
        match body.frame().await {
            Some(Ok(frame)) => {
                len += frame.data_ref().map_or(0, Bytes::len);
                into.push_back(frame);
            }
            Some(Err(e)) => return Err(e),
            None => return Ok(true),
        }
    }
    Ok(body.is_end_stream())
}

/// Tokens a request will cost: the prompt estimated from its size, plus the completion it asks for
/// (`max_tokens` / `max_completion_tokens`, else the configured default).
pub fn estimate(
    peeked: &VecDeque<Frame<Bytes>>,
    complete: bool,
    headers: &HeaderMap,
    peek: BudgetPeek,
) -> u64 {
    let read: usize = peeked
        .iter()
        .filter_map(|f| f.data_ref())
        .map(Bytes::len)
        .sum();
    if !complete {
        let declared = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        return estimate_prompt_tokens(declared.unwrap_or(read).max(read))
            .saturating_add(peek.default_completion_tokens);
    }
    let mut body = BytesMut::with_capacity(read);
    for data in peeked.iter().filter_map(|f| f.data_ref()) {
        body.extend_from_slice(data);
    }
    let completion = serde_json::from_slice::<serde_json::Value>(&body)
        .map(|v| completion_tokens(&v, peek.default_completion_tokens))
        .unwrap_or(peek.default_completion_tokens);
    // A client names max_tokens: saturate, so an absurd one becomes "too large", never a tiny wrap.
    estimate_prompt_tokens(read).saturating_add(completion)
}

/// A reservation held by one request. Dropped unsettled (the request failed before the upstream
/// answered), it is given back in full. Settling never blocks (the Redis backend settles in a task).
pub struct Reserved {
    budget: Arc<Budget>,
    tokens: u64,
    settled: bool,
}

impl Reserved {
    pub fn new(budget: Arc<Budget>, tokens: u64) -> Self {
        Reserved {
            budget,
            tokens,
            settled: false,
        }
    }

    /// Settles against what the upstream reported: a 2xx with usage is charged its actual tokens, a 2xx
    /// without keeps the reservation, anything else is refunded.
    pub fn settle(mut self, status: u16, tap: UsageTap, sse: bool) {
        self.settled = true;
        let actual = if (200..300).contains(&status) {
            tap.usage(sse)
        } else {
            Some(0)
        };
        if let Some(actual) = actual {
            self.budget.reconcile(self.tokens, actual, Instant::now());
        }
    }

    /// Keeps the reservation as charged (the request reached the upstream, which likely spent it).
    pub fn keep(mut self) {
        self.settled = true;
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if !self.settled {
            self.budget.reconcile(self.tokens, 0, Instant::now());
        }
    }
}

/// The response's usage is read by the one usage parser of signals (its tail fast path included).
pub use crate::signals::usage::UsageTap;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_reads_max_tokens() {
        let peek = BudgetPeek {
            peek_bytes: 1024,
            default_completion_tokens: 256,
        };
        let body = br#"{"question":"0123456789abcdef","max_tokens":100}"#;
        let frames: VecDeque<Frame<Bytes>> = [Frame::data(Bytes::from_static(body))].into();
        let prompt = estimate_prompt_tokens(body.len());
        assert_eq!(
            estimate(&frames, true, &HeaderMap::new(), peek),
            prompt + 100
        );
        // Not all read: the declared length and the default completion.
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_LENGTH, "4000".parse().unwrap());
        assert_eq!(
            estimate(&frames, false, &headers, peek),
            estimate_prompt_tokens(4000) + 256
        );
    }

    #[test]
    fn unsettled_reservations_are_refunded() {
        let start = Instant::now();
        let budget = Arc::new(Budget::Local(super::super::LocalBudget::new(
            super::super::BudgetSettings {
                tokens_per_minute: 60,
                burst: 10,
            },
            start,
        )));
        let before = budget.available(start);
        let Budget::Local(local) = budget.as_ref() else {
            unreachable!()
        };
        match local.admit(10, start) {
            super::super::BudgetAdmission::Admitted(r) => {
                drop(Reserved::new(budget.clone(), r.tokens))
            }
            _ => panic!("admitted"),
        }
        assert_eq!(budget.available(Instant::now()), before);
    }
}
