//! `[upstream]`: timeouts and pooling of the connections to the arms' upstreams; read by
//! `serve::upstream` when it builds the pool. `parse_upstream` turns an arm's URL into the authority
//! the pool dials, so config check and the pool agree on what a valid upstream is.

use serde::Deserialize;

use super::dur::{secs, Dur};
use super::tls::Trust;
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
            trust: Trust::default(),
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
pub fn parse_upstream_url(url: &str) -> Result<UpstreamUrl, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("{url:?}: an http:// or https:// URL is required")),
    };
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
    let authority = match authority.port_u16() {
        Some(_) => authority,
        None => format!("{}:{}", authority.host(), if tls { 443 } else { 80 })
            .parse()
            .map_err(|e| format!("{url:?}: {e}"))?,
    };
    Ok(UpstreamUrl { authority, tls })
}
