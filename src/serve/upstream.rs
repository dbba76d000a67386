//! Upstream: one keep-alive connection pool per upstream address, and the sending of one request.
//!
//! A pool is a LIFO stack of idle HTTP/1.1 connections (`hyper::client::conn::http1`). A connection is
//! taken for one exchange and given back when the response body has been read to its end, so a
//! connection is never shared by two exchanges and a half-read one is never reused. The stack is
//! guarded by a mutex held for a push or a pop only; with one runtime thread it is never contended.
//!
//! An `https://` upstream is dialled through `net::tls` (SNI from the URL's host, ALPN h2 and
//! http/1.1). When the server picks h2, the pool keeps that one multiplexed connection and every
//! exchange opens a stream on it; otherwise its TLS connections are pooled like plain ones. A failed
//! handshake is [`UpstreamError::Tls`], with the host and the reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{header, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{Upstream as UpstreamConfig, UpstreamUrl};
use crate::net::{self, tls};
use crate::serve::body::RequestBody;

/// Why an exchange with the upstream failed before a response head arrived.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr}: {detail}")]
    Connect {
        addr: String,
        detail: std::io::Error,
    },
    #[error("connect to {addr}: no connection within {timeout:?}")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("{addr}: {detail}")]
    Exchange { addr: String, detail: hyper::Error },
    #[error("TLS with {addr}: {reason}")]
    Tls { addr: String, reason: String },
}

impl UpstreamError {
    /// Whether this is a timeout (504) rather than an unreachable or failing upstream (502).
    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::ConnectTimeout { .. })
    }

    /// Whether no connection could be made: the upstream never saw the request.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Tls { .. }
        )
    }

    /// Whether the TLS handshake failed (certificate, protocol): a 502 `upstream_tls`.
    pub fn is_tls(&self) -> bool {
        matches!(self, UpstreamError::Tls { .. })
    }

    /// Whether the client's request body failed (the client went away mid-upload): not the upstream's
    /// fault, and not to be counted against the arm.
    pub fn is_client_abort(&self) -> bool {
        matches!(self, UpstreamError::Exchange { detail, .. } if detail.is_user())
    }
}

/// Pool settings, from `[upstream]` (and `[tls]` for https upstreams).
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Bounds the TCP connect and, for https, the TLS handshake together.
    pub connect_timeout: Duration,
    pub max_idle: usize,
    pub idle_timeout: Duration,
    /// What https upstreams are trusted through, offering h2 and http/1.1.
    pub tls: Arc<rustls::ClientConfig>,
}

impl From<&UpstreamConfig> for PoolSettings {
    fn from(c: &UpstreamConfig) -> Self {
        // `check` already refused an unusable ca_file; a file broken since is said and skipped.
        let roots = net::Roots::load(&c.trust).unwrap_or_else(|e| {
            tracing::error!(error = %e, "https upstreams: the platform's roots only");
            net::Roots::platform()
        });
        PoolSettings {
            connect_timeout: c.connect_timeout.0,
            max_idle: c.pool_max_idle,
            idle_timeout: c.pool_idle_timeout.0,
            tls: roots.client_config(tls::ALPN_H2_HTTP1),
        }
    }
}

/// The pools of all upstreams, by address; a reload that keeps an address keeps its pool.
pub struct Pools {
    settings: PoolSettings,
    pools: Mutex<HashMap<UpstreamUrl, Arc<Pool>>>,
}

impl Pools {
    pub fn new(settings: PoolSettings) -> Self {
        Pools {
            settings,
            pools: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, upstream: &UpstreamUrl) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .entry(upstream.clone())
            .or_insert_with(|| {
                Arc::new(Pool {
                    addr: upstream.authority.as_str().to_string(),
                    tls: upstream.tls.then(|| upstream.authority.host().to_string()),
                    settings: self.settings.clone(),
                    idle: Mutex::new(Vec::new()),
                    h2: Mutex::new(None),
                })
            })
            .clone()
    }
}

/// One connection's request sender: HTTP/1.1 (one exchange at a time) or h2 (multiplexed).
enum Sender {
    H1(http1::SendRequest<RequestBody>),
    H2(http2::SendRequest<RequestBody>),
}

impl Sender {
    async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    /// Sends `req`, in origin form for HTTP/1.1; for h2 the URI carries scheme and authority (the
    /// `Host` the request would have had), which h2 sends as `:scheme` and `:authority`.
    async fn try_send(
        &mut self,
        mut req: Request<RequestBody>,
        addr: &str,
    ) -> Result<Response<Incoming>, TrySendError<Request<RequestBody>>> {
        match self {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2(s) => {
                let authority = req
                    .headers_mut()
                    .remove(header::HOST)
                    .and_then(|h| h.to_str().ok().map(String::from))
                    .unwrap_or_else(|| addr.to_string());
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                if let Ok(uri) = Uri::try_from(format!("https://{authority}{path}")) {
                    *req.uri_mut() = uri;
                }
                *req.version_mut() = http::Version::HTTP_2;
                s.try_send_request(req).await
            }
        }
    }
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

/// Idle keep-alive connections to one upstream address.
pub struct Pool {
    addr: String,
    /// The server name of an https upstream (its URL's host); `None` for plain http.
    tls: Option<String>,
    settings: PoolSettings,
    idle: Mutex<Vec<Idle>>,
    /// The h2 connection of an https upstream that picked h2; shared by every exchange.
    h2: Mutex<Option<http2::SendRequest<RequestBody>>>,
}

/// Stale pooled connections tried before a fresh one is opened.
const MAX_STALE_RETRIES: usize = 3;

impl Pool {
    /// Sends a request (its URI in origin form) and waits for the response head. The connection comes
    /// back with the response and must be [released](Lease::release) once the body is read.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        let mut stale = 0;
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) if stale < MAX_STALE_RETRIES => (sender, true),
                _ => (self.connect().await?, false),
            };
            if let Err(source) = sender.ready().await {
                if !reused {
                    return Err(self.exchange_error(source));
                }
                // Closed by the upstream while idle; the request was not touched.
                stale += 1;
                continue;
            }
            match sender.try_send(req, &self.addr).await {
                Ok(response) => {
                    return Ok((
                        response,
                        Lease {
                            pool: self.clone(),
                            sender: Some(sender),
                        },
                    ))
                }
                Err(mut e) => match e.take_message() {
                    // The connection died before the request went out: safe to try another.
                    Some(returned) if reused => {
                        req = returned;
                        stale += 1;
                    }
                    _ => return Err(self.exchange_error(e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that can take a request now. One that is still busy —
    /// the upstream answered early and the client is still uploading — stays in the pool for later
    /// rather than making this request wait behind someone else's upload.
    fn checkout(&self) -> Option<Sender> {
        if let Some(h2) = self
            .h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|s| !s.is_closed())
        {
            return Some(Sender::H2(h2.clone()));
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let conn = &idle[i];
            if conn.sender.is_closed()
                || now.duration_since(conn.since) >= self.settings.idle_timeout
            {
                idle.remove(i);
            } else if conn.sender.is_ready() {
                return Some(Sender::H1(idle.remove(i).sender));
            }
        }
        None
    }

    fn checkin(&self, sender: Sender) {
        // An h2 connection stays in its slot; its clone only ends this exchange's use of it.
        let Sender::H1(sender) = sender else { return };
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.settings.max_idle {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<Sender, UpstreamError> {
        let timeout = self.settings.connect_timeout;
        match tokio::time::timeout(timeout, self.dial()).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::ConnectTimeout {
                addr: self.addr.clone(),
                timeout,
            }),
        }
    }

    /// A new connection: TCP, then for https the TLS handshake and the protocol the server picked.
    async fn dial(&self) -> Result<Sender, UpstreamError> {
        let stream = TcpStream::connect(self.addr.as_str())
            .await
            .map_err(|detail| UpstreamError::Connect {
                addr: self.addr.clone(),
                detail,
            })?;
        let _ = stream.set_nodelay(true);
        let Some(host) = &self.tls else {
            return self.http1(stream).await;
        };
        let tls_error = |reason: String| UpstreamError::Tls {
            addr: self.addr.clone(),
            reason,
        };
        let name: ServerName<'static> =
            tls::server_name(host).map_err(|e| tls_error(e.to_string()))?;
        let stream = TlsConnector::from(self.settings.tls.clone())
            .connect(name, stream)
            .await
            .map_err(|e| tls_error(tls::describe(&e).unwrap_or_else(|| e.to_string())))?;
        if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            return self.http1(stream).await;
        }
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|detail| self.exchange_error(detail))?;
        self.drive(conn);
        *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender.clone());
        Ok(Sender::H2(sender))
    }

    async fn http1<S>(&self, stream: S) -> Result<Sender, UpstreamError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        // One flat buffer per write, sent with send(2): hyper's default for a TCP stream queues head
        // and body for writev(2), which costs the kernel's vfs layer on every message.
        let (sender, conn) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|detail| self.exchange_error(detail))?;
        self.drive(conn);
        Ok(Sender::H1(sender))
    }

    fn exchange_error(&self, detail: hyper::Error) -> UpstreamError {
        UpstreamError::Exchange {
            addr: self.addr.clone(),
            detail,
        }
    }

    /// Runs a connection's I/O (h1 or h2) in its own task until the connection ends.
    fn drive(&self, conn: impl std::future::Future<Output = hyper::Result<()>> + Send + 'static) {
        let addr = self.addr.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = addr.as_str(), error = %e, "upstream connection ended with an error");
            }
        });
    }

    /// Idle connections held now.
    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A connection in use by one exchange. Released to the pool when the response body ended; dropped
/// (and so closed once its exchange is over) otherwise.
pub struct Lease {
    pool: Arc<Pool>,
    sender: Option<Sender>,
}

impl Lease {
    pub fn release(mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.checkin(sender);
        }
    }
}
