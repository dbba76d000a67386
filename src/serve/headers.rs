//! The headers of the request path: the names driftguard stamps, hop-by-hop stripping, `x-forwarded-*`,
//! the request id, what is refused rather than passed on, and the tests `serve::handle` makes on content
//! types. Pure functions on header maps.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;
use http_body::Body;
use hyper::body::Incoming;

use crate::serve::router::Arm;

pub use crate::guards::X_REQUEST_ID;
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

/// Stamps pins, arm, request id and cache namespace.
pub fn stamp(headers: &mut HeaderMap, arm: &Arm, request_id: &HeaderValue) {
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

/// Appends the peer to `x-forwarded-for` and sets `x-forwarded-proto` unless a front proxy did. Several
/// `x-forwarded-for` fields are one list (RFC 9110 §5.3): all of them are kept, joined, in order.
pub fn forwarded_for(headers: &mut HeaderMap, peer: &Peer) {
    let mut prior = headers.get_all(X_FORWARDED_FOR).iter().peekable();
    let value = if prior.peek().is_none() {
        Some(peer.ip.clone())
    } else {
        let mut joined: Vec<u8> = Vec::new();
        for field in prior {
            joined.extend_from_slice(field.as_bytes());
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(peer.ip.as_bytes());
        HeaderValue::from_bytes(&joined).ok()
    };
    if let Some(value) = value {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers
        .entry(X_FORWARDED_PROTO)
        .or_insert(HeaderValue::from_static("http"));
}

/// The client's request id when it sent a usable one — 1 to 200 bytes of printable ASCII, so it logs
/// as sent — else a new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(X_REQUEST_ID) {
        Some(v)
            if !v.is_empty()
                && v.len() <= 200
                && v.as_bytes().iter().all(|b| (b' '..=b'~').contains(b)) =>
        {
            v.clone()
        }
        _ => new_request_id(),
    }
}

/// Why a request is refused rather than passed on (501), if it is: `CONNECT` (a reverse proxy opens
/// no tunnels), or a transfer coding other than `chunked` (passing `gzip, chunked` on re-framed would
/// drop the gzip coding and hand the upstream a body it cannot read).
pub fn not_passed_on(parts: &http::request::Parts) -> Option<&'static str> {
    if parts.method == Method::CONNECT {
        return Some(
            "CONNECT is not supported: driftguard is a reverse proxy and opens no tunnels",
        );
    }
    let other_coding = parts
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"chunked"));
    other_coding.then_some("transfer codings other than chunked are not supported")
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

/// A request body sent without a length (chunked, or an h2c stream without content-length).
pub fn has_chunked_body(headers: &HeaderMap, body: &Incoming) -> bool {
    !body.is_end_stream() && !headers.contains_key(header::CONTENT_LENGTH)
}

/// RFC 9113 §8.2.3: an HTTP/2 client may split `cookie` into several fields; HTTP/1.1 wants one.
pub fn join_cookies(headers: &mut HeaderMap) {
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
pub fn carries_query(parts: &http::request::Parts) -> bool {
    matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
        && parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_none_or(|v| contains(v.as_bytes(), b"json"))
}

/// `Some(is_sse)` when a response can carry an answer: JSON (or unstated) or an event stream.
pub fn answer_format(headers: &HeaderMap) -> Option<bool> {
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

    #[test]
    fn request_id_must_be_printable_ascii() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-1"));
        assert_eq!(request_id(&h), "abc-1");
        h.insert(
            X_REQUEST_ID,
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        );
        let replaced = request_id(&h);
        assert_ne!(replaced, h[X_REQUEST_ID]);
        assert_eq!(replaced.len(), 32);
    }
}
