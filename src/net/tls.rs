//! The one TLS client stack (rustls, ring; no OpenSSL) of every outgoing connection: the `net` client,
//! the https arms' pools (`serve::upstream`), and `rediss://` for the budget, the receipt store and the
//! fleet. [`Roots`] is what a connection trusts: the platform's root certificates plus the PEM bundles
//! of a [`Trust`] (`[tls] ca_file` and the target's own). Nothing here turns verification off.
//!
//! [`describe`] finds the rustls error in an error chain and words it for a person (expired, unknown
//! issuer, name mismatch), so every caller's log line and `check` name the host and the reason the same
//! way. [`verify`] is the blocking handshake that `check` and a `rediss://` store's start make, so a
//! certificate that does not verify is an error there, and not a connection that keeps failing later.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, RootCertStore};

use crate::config::Trust;

/// ALPN of the https arms: h2 when the server picks it, else HTTP/1.1.
pub const ALPN_H2_HTTP1: &[&[u8]] = &[b"h2", b"http/1.1"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("ca_file {path:?}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS with {host}: {reason}")]
    Handshake { host: String, reason: String },
    #[error("cannot reach {host}: {reason}")]
    Unreachable { host: String, reason: String },
}

impl TlsError {
    /// A connection could not be made at all (not a certificate or handshake problem).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, TlsError::Unreachable { .. })
    }
}

/// The root certificates of one target: the platform's plus its CA files. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Roots {
    store: Arc<RootCertStore>,
    /// The CA files' certificates, kept as DER for [`Roots::pem`].
    extra: Arc<Vec<CertificateDer<'static>>>,
}

impl Roots {
    /// The platform's roots only.
    pub fn platform() -> Roots {
        Roots::build(Vec::new())
    }

    /// The platform's roots plus every certificate of `trust`'s CA files.
    pub fn load(trust: &Trust) -> Result<Roots, TlsError> {
        let mut extra = Vec::new();
        for path in &trust.ca_files {
            let fail = |reason: String| TlsError::CaFile {
                path: path.clone(),
                reason,
            };
            let text = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
            let certs = CertificateDer::pem_slice_iter(&text)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fail(format!("not a PEM bundle: {e}")))?;
            if certs.is_empty() {
                return Err(fail("holds no PEM certificate".into()));
            }
            extra.extend(certs);
        }
        Ok(Roots::build(extra))
    }

    fn build(extra: Vec<CertificateDer<'static>>) -> Roots {
        let mut store = RootCertStore::empty();
        // The platform bundle holds a few certificates webpki cannot parse; they could not anchor a
        // chain anyway, so they are skipped as every other client skips them.
        store.add_parsable_certificates(platform().iter().cloned());
        store.add_parsable_certificates(extra.iter().cloned());
        Roots {
            store: Arc::new(store),
            extra: Arc::new(extra),
        }
    }

    /// Trust anchors held.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// A client config offering `alpn` (e.g. [`ALPN_H2_HTTP1`]; none for a connector that sets its own),
    /// TLS 1.2 and 1.3, no client certificate.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // The redis crate builds its own config through the process default; with one provider compiled
        // in it would find it anyway, this makes it independent of other crates' features.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let builder = match ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
        {
            Ok(builder) => builder,
            // ring supports the default versions; this cannot fail, but is not worth a panic.
            Err(_) => ClientConfig::builder(),
        };
        let mut config = builder
            .with_root_certificates(self.store.clone())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// The trust anchors as one PEM bundle: the platform's and the CA files' certificates, for a client
    /// that takes roots only as PEM and would otherwise replace the platform's with them (redis).
    pub fn pem(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for der in platform().iter().chain(self.extra.iter()) {
            out.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
            let encoded = base64(der.as_ref());
            for line in encoded.as_bytes().chunks(64) {
                out.extend_from_slice(line);
                out.push(b'\n');
            }
            out.extend_from_slice(b"-----END CERTIFICATE-----\n");
        }
        out
    }
}

/// The platform's root certificates, read once per process (`SSL_CERT_FILE` / `SSL_CERT_DIR` name
/// others, as for OpenSSL).
fn platform() -> &'static [CertificateDer<'static>] {
    static PLATFORM: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    PLATFORM.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "reading the platform's root certificates");
        }
        if found.certs.is_empty() {
            tracing::warn!("no platform root certificates found: only [tls] ca_file is trusted");
        }
        found.certs
    })
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The server name a URL's host verifies as (a DNS name or an IP address).
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_string()).map_err(|e| TlsError::Handshake {
        host: host.to_string(),
        reason: format!("not a valid server name: {e}"),
    })
}

/// The reason a TLS handshake failed, for a person, when `error`'s chain holds a rustls error; `None`
/// when the failure was not TLS's.
pub fn describe(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(word(tls));
        }
        // An io::Error's `source` skips the error it wraps: look into it (connectors wrap twice).
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(reason) = describe(inner) {
                return Some(reason);
            }
        }
        next = e.source();
    }
    None
}

fn word(error: &rustls::Error) -> String {
    use rustls::Error as E;
    match error {
        E::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "certificate expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "certificate not valid yet".into()
            }
            CertificateError::UnknownIssuer => {
                "unknown issuer: the certificate is not signed by a trusted CA (add the CA to [tls] ca_file)".into()
            }
            CertificateError::NotValidForName => {
                "name mismatch: the certificate is for another name".into()
            }
            CertificateError::NotValidForNameContext { expected, presented } => format!(
                "name mismatch: the certificate is for {}, not {}",
                presented.join(", "),
                expected.to_str()
            ),
            CertificateError::Revoked => "certificate revoked".into(),
            CertificateError::BadSignature => "bad certificate signature".into(),
            other => format!("invalid certificate: {other:?}"),
        },
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            format!("the server does not speak TLS as expected (is it plain http?): {error}")
        }
        E::AlertReceived(alert) => format!("the server refused the handshake (alert {alert:?})"),
        E::NoApplicationProtocol => "no common ALPN protocol".into(),
        other => other.to_string(),
    }
}

/// Connects to `host:port` and completes a TLS handshake with `roots`, all within `timeout`, blocking.
/// For `check` and for a `rediss://` store's start: a certificate that does not verify is
/// [`TlsError::Handshake`] with the reason; no connection at all is [`TlsError::Unreachable`].
pub fn verify(roots: &Roots, host: &str, port: u16, timeout: Duration) -> Result<(), TlsError> {
    let at = format!("{host}:{port}");
    let unreachable = |reason: String| TlsError::Unreachable {
        host: at.clone(),
        reason,
    };
    let addr = (host.trim_start_matches('[').trim_end_matches(']'), port)
        .to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("the name resolves to no address".into()))?;
    let mut tcp =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_read_timeout(Some(timeout));
    let _ = tcp.set_write_timeout(Some(timeout));
    let name = server_name(host)?;
    let handshake = |reason: String| TlsError::Handshake {
        host: at.clone(),
        reason,
    };
    let mut conn = rustls::ClientConnection::new(roots.client_config(&[]), name)
        .map_err(|e| handshake(word(&e)))?;
    while conn.is_handshaking() {
        match conn.complete_io(&mut tcp) {
            Ok(_) => {}
            Err(e) => {
                return Err(match describe(&e) {
                    Some(reason) => handshake(reason),
                    None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        handshake("the server closed the connection during the handshake".into())
                    }
                    None => handshake(e.to_string()),
                })
            }
        }
    }
    // A clean goodbye; the server's answer does not matter.
    conn.send_close_notify();
    let _ = conn.complete_io(&mut tcp);
    let _ = tcp.flush();
    let _ = tcp.read(&mut [0u8; 0]);
    Ok(())
}

/// A redis client for `url`; a `rediss://` one trusts `roots` (the platform's and `[tls] ca_file`).
pub fn redis_client(url: &str, roots: &Roots) -> redis::RedisResult<redis::Client> {
    if !url.starts_with("rediss://") {
        return redis::Client::open(url);
    }
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(roots.pem()),
        },
    )
}

/// For a `rediss://` URL, makes one TLS handshake with its server, so a certificate that does not
/// verify stops the start (and `check`) with the host and the reason. An unreachable server is only
/// logged: the stores have their own answer to a Redis outage (`on_backend_error`).
pub fn verify_redis(key: &str, url: &str, roots: &Roots) -> Result<(), TlsError> {
    let Some((host, port)) = redis_host(url) else {
        return Ok(());
    };
    match verify(roots, &host, port, REDIS_VERIFY_TIMEOUT) {
        Err(e) if e.is_unreachable() => {
            tracing::warn!(key, error = %e, "Redis not reachable to verify its certificate");
            Ok(())
        }
        other => other,
    }
}

/// Longest wait for the start's handshake with a `rediss://` server.
pub const REDIS_VERIFY_TIMEOUT: Duration = Duration::from_secs(2);

/// Host and port of a `rediss://` URL (default port 6379); `None` for another scheme.
pub fn redis_host(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("rediss://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => (h, p.parse().ok()?),
        _ => (hostport, 6379),
    };
    Some((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn redis_hosts() {
        assert_eq!(
            redis_host("rediss://:pw@cache.example.com:6380/2"),
            Some(("cache.example.com".into(), 6380))
        );
        assert_eq!(
            redis_host("rediss://127.0.0.1"),
            Some(("127.0.0.1".into(), 6379))
        );
        assert_eq!(redis_host("redis://127.0.0.1:6379"), None);
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let trust = Trust::resolve("/nonexistent/ca.pem", "");
        let err = Roots::load(&trust).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
