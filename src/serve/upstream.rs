//! Upstream: one keep-alive connection pool per upstream address, and the sending of one request.
//!
//! A pool is a LIFO stack of idle HTTP/1.1 connections (`hyper::client::conn::http1`). A connection is
//! taken for one exchange and given back when the response body has been read to its end, so a
//! connection is never shared by two exchanges and a half-read one is never reused. The stack is
//! guarded by a mutex held for a push or a pop only; with one runtime thread it is never contended.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::Upstream as UpstreamConfig;
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
            UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. }
        )
    }

    /// Whether the client's request body failed (the client went away mid-upload): not the upstream's
    /// fault, and not to be counted against the arm.
    pub fn is_client_abort(&self) -> bool {
        matches!(self, UpstreamError::Exchange { detail, .. } if detail.is_user())
    }
}

/// Pool settings, from `[upstream]`.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub max_idle: usize,
    pub idle_timeout: Duration,
}

impl From<&UpstreamConfig> for PoolSettings {
    fn from(c: &UpstreamConfig) -> Self {
        PoolSettings {
            connect_timeout: c.connect_timeout.0,
            max_idle: c.pool_max_idle,
            idle_timeout: c.pool_idle_timeout.0,
        }
    }
}

/// The pools of all upstreams, by address; a reload that keeps an address keeps its pool.
pub struct Pools {
    settings: PoolSettings,
    pools: Mutex<HashMap<Authority, Arc<Pool>>>,
}

impl Pools {
    pub fn new(settings: PoolSettings) -> Self {
        Pools {
            settings,
            pools: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, authority: &Authority) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .entry(authority.clone())
            .or_insert_with(|| {
                Arc::new(Pool {
                    addr: authority.as_str().to_string(),
                    settings: self.settings.clone(),
                    idle: Mutex::new(Vec::new()),
                })
            })
            .clone()
    }
}

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// Idle keep-alive connections to one upstream address.
pub struct Pool {
    addr: String,
    settings: PoolSettings,
    idle: Mutex<Vec<Idle>>,
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
                    return Err(UpstreamError::Exchange {
                        addr: self.addr.clone(),
                        detail: source,
                    });
                }
                // Closed by the upstream while idle; the request was not touched.
                stale += 1;
                continue;
            }
            match sender.try_send_request(req).await {
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
                    _ => {
                        return Err(UpstreamError::Exchange {
                            addr: self.addr.clone(),
                            detail: e.into_error(),
                        })
                    }
                },
            }
        }
    }

    /// The most recently used idle connection that can take a request now. One that is still busy —
    /// the upstream answered early and the client is still uploading — stays in the pool for later
    /// rather than making this request wait behind someone else's upload.
    fn checkout(&self) -> Option<SendRequest<RequestBody>> {
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
                return Some(idle.remove(i).sender);
            }
        }
        None
    }

    fn checkin(&self, sender: SendRequest<RequestBody>) {
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

    async fn connect(&self) -> Result<SendRequest<RequestBody>, UpstreamError> {
        let timeout = self.settings.connect_timeout;
        let stream =
            match tokio::time::timeout(timeout, TcpStream::connect(self.addr.as_str())).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(detail)) => {
                    return Err(UpstreamError::Connect {
                        addr: self.addr.clone(),
                        detail,
                    })
                }
                Err(_) => {
                    return Err(UpstreamError::ConnectTimeout {
                        addr: self.addr.clone(),
                        timeout,
                    })
                }
            };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|detail| UpstreamError::Exchange {
                addr: self.addr.clone(),
                detail,
            })?;
        let addr = self.addr.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = addr.as_str(), error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
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
    sender: Option<SendRequest<RequestBody>>,
}

impl Lease {
    pub fn release(mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.checkin(sender);
        }
    }
}
