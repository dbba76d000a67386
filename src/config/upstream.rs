//! `[upstream]`: timeouts and pooling of the connections to the arms' upstreams; read by
//! `serve::upstream` when it builds the pool. `parse_upstream` turns an arm's URL into the authority
//! the pool dials, so config check and the pool agree on what a valid upstream is.

use serde::Deserialize;

use super::dur::{secs, Dur};
use super::tls::Trust;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    /// Time to establish a TCP connection to an upstream.
    pub connect_timeout: Dur,
    /// Time from sending the request until the upstream's response headers arrive (a stream may then
    /// run as long as it likes).
    pub request_timeout: Dur,
    /// Idle keep-alive connections kept per upstream.
    pub pool_max_idle: usize,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Dur,
    /// How long a response body may go without a byte from the upstream once its head arrived: past it
    /// the response is cut off and counted as an upstream timeout of the arm.
    pub body_idle_timeout: Dur,
    /// What its TLS connections trust (https arms: `[tls] ca_file`); filled in by `Config::parse`.
    #[serde(skip)]
    pub trust: Trust,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            connect_timeout: secs(1),
            request_timeout: secs(30),
            pool_max_idle: 256,
            // Below the 5 s keep-alive of uvicorn and Node, so a pooled connection is dropped here
            // before the upstream closes it under a request in flight.
            pool_idle_timeout: secs(4),
            // Above the gaps a model leaves between streamed tokens or SSE keep-alives.
            body_idle_timeout: secs(60),
            trust: Trust::default(),
        }
    }
}

/// An arm's upstream as the pool dials it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamUrl {
    /// `host:port` (the scheme's default port when the URL names none).
    pub authority: http::uri::Authority,
    /// `https://`: TLS, with the host as the server name.
    pub tls: bool,
}

/// Parses an upstream base URL into its authority (`host:port`); `http://` or `https://`.
pub fn parse_upstream(url: &str) -> Result<http::uri::Authority, String> {
    parse_upstream_url(url).map(|u| u.authority)
}

/// Parses an upstream base URL, `http://host[:port]` or `https://host[:port]`, without a path.
/// Credentials in the URL (`http://user:pass@host`) are refused: the proxy would not send them, and an
/// URL that holds them ends up in error bodies, logs and `/status`. Errors show the URL redacted.
pub fn parse_upstream_url(url: &str) -> Result<UpstreamUrl, String> {
    let shown = redact_userinfo(url);
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{shown:?} is not a URL: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("{shown:?}: an http:// or https:// URL is required")),
    };
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "{shown:?}: credentials in an upstream URL (user:password@) are not supported; \
             remove them (the upstream is reached as it is, without authentication)"
        ));
    }
    if uri
        .path_and_query()
        .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return Err(format!("{shown:?}: give the base URL without a path"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{shown:?} has no host"))?;
    let authority = match authority.port_u16() {
        Some(_) => authority,
        None => format!("{}:{}", authority.host(), if tls { 443 } else { 80 })
            .parse()
            .map_err(|e| format!("{shown:?}: {e}"))?,
    };
    Ok(UpstreamUrl { authority, tls })
}

/// `url` with the userinfo of its authority (`user:pass@`) replaced by `***@`, for messages and logs.
pub fn redact_userinfo(url: &str) -> std::borrow::Cow<'_, str> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => std::borrow::Cow::Owned(format!("{}***{}", &url[..start], &url[start + at..])),
        None => std::borrow::Cow::Borrowed(url),
    }
}
