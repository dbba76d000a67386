//! `[upstream]`: timeouts and pooling of the connections to the arms' upstreams; read by
//! `serve::upstream` when it builds the pool. `parse_upstream` turns an arm's URL into the authority
//! the pool dials, so config check and the pool agree on what a valid upstream is.

use serde::Deserialize;

use super::dur::{secs, Dur};
use super::{err, ConfigError};

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
        }
    }
}

impl Upstream {
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        if self.connect_timeout.0.is_zero() {
            errors.push(err("upstream.connect_timeout", "must be above 0"));
        }
        if self.request_timeout.0.is_zero() {
            errors.push(err("upstream.request_timeout", "must be above 0"));
        }
        let body_idle = self.body_idle_timeout.0;
        if body_idle.is_zero() || body_idle > std::time::Duration::from_secs(86_400) {
            errors.push(err(
                "upstream.body_idle_timeout",
                "must be above 0 and at most 24h",
            ));
        }
    }
}

/// Parses an upstream base URL into its authority (`host:port`); only plain `http://` is supported.
pub fn parse_upstream(url: &str) -> Result<http::uri::Authority, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url:?}: only http:// upstreams are supported"));
    }
    if uri
        .path_and_query()
        .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return Err(format!("{url:?}: give the base URL without a path"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{url:?} has no host"))?;
    if authority.port_u16().is_none() {
        return format!("{}:80", authority.host())
            .parse()
            .map_err(|e| format!("{url:?}: {e}"));
    }
    Ok(authority)
}
