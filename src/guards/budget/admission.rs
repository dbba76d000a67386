//! The token budget on the request path: read a bounded prefix of the request body to estimate what it
//! will cost, reserve that in the [`Budget`](super::budget::Budget), and settle the reservation against
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
use serde::Deserialize;

use super::{
    completion_tokens, estimate_prompt_tokens, BackendDown, Budget, BudgetAdmission, BudgetPeek,
};
use crate::capture::Capture;

/// Why the budget step refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetRefusal {
    /// The request body broke off while its prefix was read (499 `client_closed`).
    BodyBroke,
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
            BudgetRefusal::BodyBroke => None,
            BudgetRefusal::Unavailable => Some("backend_down"),
            BudgetRefusal::OverBudget { .. } => Some("over_budget"),
            BudgetRefusal::TooLarge { .. } => Some("too_large"),
        }
    }

    /// The message of the JSON error.
    pub fn message(&self) -> String {
        match self {
            BudgetRefusal::BodyBroke => "the request body broke off".to_string(),
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

/// The budget step: reads a bounded prefix of the body into `prefix` (waiting `timeout` at most) to
/// price the request, then reserves that. `Ok(None)`: through unpriced (the backend is down and
/// `on_backend_error = "open"`). A slow upload is priced by what it declares; the frames read so far
/// are kept in `prefix` either way.
pub async fn admit(
    budget: Arc<Budget>,
    peek_at: BudgetPeek,
    timeout: Duration,
    body: &mut Incoming,
    headers: &HeaderMap,
    prefix: &mut VecDeque<Frame<Bytes>>,
) -> Result<Option<Reserved>, BudgetRefusal> {
    let read = tokio::time::timeout(timeout, peek(body, peek_at.peek_bytes, prefix)).await;
    let complete = match read {
        Ok(Ok(complete)) => complete,
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

/// Bytes kept from the end of a response however long it is: `usage` comes last.
const TAIL: usize = 16 * 1024;

/// What of a response the usage is read from: the whole body while it fits `cap`, and always its last
/// [`TAIL`] bytes, so a long stream's final usage event is never cut off.
pub struct UsageTap {
    head: Capture,
    tail: VecDeque<Bytes>,
    tail_len: usize,
}

impl UsageTap {
    pub fn new(cap: usize) -> Self {
        UsageTap {
            head: Capture::new(cap),
            tail: VecDeque::new(),
            tail_len: 0,
        }
    }

    #[inline]
    pub fn push(&mut self, data: &Bytes) {
        self.head.push(data);
        self.tail.push_back(data.clone());
        self.tail_len += data.len();
        while self
            .tail
            .front()
            .is_some_and(|f| self.tail_len - f.len() >= TAIL)
        {
            if let Some(f) = self.tail.pop_front() {
                self.tail_len -= f.len();
            }
        }
    }

    /// Total tokens the response reported.
    pub fn usage(self, sse: bool) -> Option<u64> {
        if !self.head.truncated {
            return reported_usage(&self.head.into_bytes(), sse);
        }
        let mut tail = BytesMut::with_capacity(self.tail_len);
        for part in &self.tail {
            tail.extend_from_slice(part);
        }
        if sse {
            reported_usage(&tail, true)
        } else {
            usage_in_tail(&tail)
        }
    }
}

/// The last `"usage": {...}` object in a (fragment of) JSON: found by a reverse substring search, so
/// only the end of a body is looked at, and only that object is parsed.
fn usage_in_tail(tail: &[u8]) -> Option<u64> {
    let key = memchr::memmem::rfind(tail, b"\"usage\"")?;
    let after = tail[key + 7..].trim_ascii_start().strip_prefix(b":")?;
    let open = tail.len() - after.trim_ascii_start().strip_prefix(b"{")?.len() - 1;
    let mut depth = 0usize;
    for (i, b) in tail[open..].iter().enumerate() {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    let usage: Usage = serde_json::from_slice(&tail[open..=open + i]).ok()?;
                    return usage.total();
                }
            }
            _ => {}
        }
    }
    None
}

#[derive(Deserialize)]
struct UsageDoc {
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
}

impl Usage {
    fn total(&self) -> Option<u64> {
        self.total_tokens
            .or(match (self.prompt_tokens, self.completion_tokens) {
                (None, None) => None,
                (p, c) => Some(p.unwrap_or(0).saturating_add(c.unwrap_or(0))),
            })
    }
}

/// Total tokens in the response's `usage` (OpenAI format); for SSE the last event that carries one.
///
/// A JSON body is read from its end: the last `"usage"` key's object (OpenAI puts it last), which spares
/// parsing the whole answer on every response; only when that fails is the whole body parsed.
pub fn reported_usage(body: &[u8], sse: bool) -> Option<u64> {
    if !sse {
        return usage_in_tail(body).or_else(|| {
            serde_json::from_slice::<UsageDoc>(body)
                .ok()?
                .usage?
                .total()
        });
    }
    let finder = memchr::memmem::Finder::new(b"\"usage\"");
    body.split(|b| *b == b'\n')
        .rev()
        .filter_map(|line| line.strip_prefix(b"data:"))
        .filter(|data| finder.find(data).is_some())
        .find_map(|data| {
            serde_json::from_slice::<UsageDoc>(data.trim_ascii())
                .ok()?
                .usage?
                .total()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_from_json_and_sse() {
        let json = br#"{"answer":"x","usage":{"prompt_tokens":10,"completion_tokens":5}}"#;
        assert_eq!(reported_usage(json, false), Some(15));
        assert_eq!(
            reported_usage(br#"{"usage":{"total_tokens":42}}"#, false),
            Some(42)
        );
        assert_eq!(reported_usage(br#"{"answer":"x"}"#, false), None);
        // Read from the end: the key, not an earlier string value; whitespace and later keys allowed.
        assert_eq!(
            reported_usage(
                br#"{"topic":"usage","usage" : {"total_tokens":5},"model":"m"}"#,
                false
            ),
            Some(5)
        );
        assert_eq!(
            reported_usage(br#"{"usage": null, "answer": "the "usage" policy"}"#, false),
            None
        );
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\ndata: [DONE]\n\n";
        assert_eq!(reported_usage(sse, true), Some(10));
        assert_eq!(reported_usage(b"data: {\"choices\":[]}\n\n", true), None);
    }

    #[test]
    fn usage_of_a_body_longer_than_the_cap() {
        let filler = Bytes::from(vec![b'x'; 10_000]);
        let mut json = UsageTap::new(4096);
        json.push(&Bytes::from_static(b"{\"answer\":\""));
        for _ in 0..10 {
            json.push(&filler);
        }
        json.push(&Bytes::from_static(
            b"\",\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":900}}",
        ));
        assert_eq!(json.usage(false), Some(907));
        let mut sse = UsageTap::new(4096);
        for _ in 0..10 {
            sse.push(&Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}}]}\n\n"));
            sse.push(&filler);
            sse.push(&Bytes::from_static(b"\n\n"));
        }
        sse.push(&Bytes::from_static(
            b"data: {\"choices\":[],\"usage\":{\"total_tokens\":15}}\n\ndata: [DONE]\n\n",
        ));
        assert_eq!(sse.usage(true), Some(15));
    }

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
