//! The one outgoing HTTP client of every caller that is not the proxy: the admin CLI, the gold-set audit,
//! the openai embedder, the webhook hooks, the OTLP exporter and the demo's load. One place owns the
//! timeout, the pooling, the response cap and the error wording, and TLS (`tls`: rustls, the
//! platform's roots plus `[tls] ca_file`), so every caller speaks `http://` and `https://` alike.
//!
//! Blocking callers wrap a [`Client`] in a [`Blocking`] runtime.

mod blocking;
pub mod tls;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub use blocking::Blocking;
pub use tls::Roots;

/// Largest response body read when the builder does not say.
pub const DEFAULT_MAX_RESPONSE: usize = 16 << 20;

/// Why an exchange failed, naming the host (`host:port`) it was with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{url:?} is not a URL: {reason}")]
    Url { url: String, reason: String },
    #[error("{url:?}: an http:// or https:// URL is required")]
    Scheme { url: String },
    #[error("TLS with {host}: {reason}")]
    Tls { host: String, reason: String },
    #[error("cannot build the request: {0}")]
    Build(#[from] http::Error),
    #[error("cannot reach {host}: {cause}")]
    Connect { host: String, cause: String },
    #[error("reading the response from {host}: {cause}")]
    Read { host: String, cause: String },
    #[error("the response from {host} is larger than {limit} bytes")]
    TooLarge { host: String, limit: usize },
    #[error("no answer from {host} within {after:?}")]
    Timeout { host: String, after: Duration },
    #[error("cannot start the HTTP client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("the HTTP client's runtime is shutting down")]
    ShuttingDown,
}

/// Parses `url` as a URL this client can call: `http://` or `https://`.
pub fn url(url: &str) -> Result<Uri, Error> {
    let uri: Uri = url.parse().map_err(|e: http::uri::InvalidUri| Error::Url {
        url: url.to_string(),
        reason: e.to_string(),
    })?;
    match uri.scheme_str() {
        Some("http" | "https") => Ok(uri),
        Some(_) => Err(Error::Scheme {
            url: url.to_string(),
        }),
        None => Err(Error::Url {
            url: url.to_string(),
            reason: "no scheme (expected http:// or https://)".into(),
        }),
    }
}

/// How much of a response body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// All of it, failing with [`Error::TooLarge`] past the limit.
    Whole(usize),
    /// Only when the status is not 2xx, best effort: a body past the limit or cut short reads as empty.
    /// For callers that only want the reason a receiver gives for a refusal.
    OnFailure(usize),
}

/// How a [`Client`] is made; [`Client::builder`].
#[derive(Debug, Clone)]
pub struct Builder {
    timeout: Duration,
    connect_timeout: Option<Duration>,
    nodelay: bool,
    pool_idle_per_host: Option<usize>,
    read: Read,
    roots: Option<Roots>,
}

impl Builder {
    /// What `https://` answers must be signed by; without it, the platform's roots only.
    pub fn roots(mut self, roots: Roots) -> Self {
        self.roots = Some(roots);
        self
    }

    /// The connect phase alone gives up after `timeout` (the overall timeout still applies).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Sets TCP_NODELAY on new connections (small request/response exchanges).
    pub fn nodelay(mut self) -> Self {
        self.nodelay = true;
        self
    }

    /// Keeps no idle connection: every request opens its own. For callers that send minutes apart,
    /// where a pooled connection would mostly be one the peer has already closed.
    pub fn no_pool(mut self) -> Self {
        self.pool_idle_per_host = Some(0);
        self
    }

    /// Reads at most `limit` bytes of a response body; more is [`Error::TooLarge`].
    pub fn max_response(mut self, limit: usize) -> Self {
        self.read = Read::Whole(limit);
        self
    }

    /// Reads the body only of a non-2xx answer, at most `limit` bytes and never failing on it (too
    /// large or cut short: an empty body). A 2xx answer comes back with an empty body, unread.
    pub fn failure_body_only(mut self, limit: usize) -> Self {
        self.read = Read::OnFailure(limit);
        self
    }

    pub fn build(self) -> Client {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(self.connect_timeout);
        connector.set_nodelay(self.nodelay);
        connector.enforce_http(false);
        let roots = self.roots.unwrap_or_else(Roots::platform);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*roots.client_config(&[])).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let mut builder = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
        if let Some(idle) = self.pool_idle_per_host {
            builder.pool_max_idle_per_host(idle);
        }
        Client {
            inner: builder.build(connector),
            timeout: self.timeout,
            read: self.read,
        }
    }
}

/// A pooled HTTP/1 client, over TLS for `https://`; cheap to clone (clones share the pool). Must be used
/// within a tokio runtime.
#[derive(Debug, Clone)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    read: Read,
}

impl Client {
    /// A client whose exchanges (connect, send, read the whole answer) end within `timeout`.
    pub fn builder(timeout: Duration) -> Builder {
        Builder {
            timeout,
            connect_timeout: None,
            nodelay: false,
            pool_idle_per_host: None,
            read: Read::Whole(DEFAULT_MAX_RESPONSE),
            roots: None,
        }
    }

    /// [`Client::builder`] with the defaults: pooled, answers up to [`DEFAULT_MAX_RESPONSE`].
    pub fn new(timeout: Duration) -> Client {
        Client::builder(timeout).build()
    }

    /// The overall timeout of [`Client::send`].
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `request` and reads its answer, all within the client's timeout.
    pub async fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, Error> {
        self.send_within(request, self.timeout).await
    }

    /// [`Client::send`] with a timeout of its own for this exchange.
    pub async fn send_within(
        &self,
        request: Request<Bytes>,
        timeout: Duration,
    ) -> Result<Response<Bytes>, Error> {
        let host = host(request.uri());
        match tokio::time::timeout(timeout, self.exchange(request, &host)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                host,
                after: timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        request: Request<Bytes>,
        host: &str,
    ) -> Result<Response<Bytes>, Error> {
        let (parts, body) = request.into_parts();
        let response = self
            .inner
            .request(Request::from_parts(parts, Full::new(body)))
            .await
            .map_err(|e| match tls::describe(&e) {
                Some(reason) => Error::Tls {
                    host: host.to_string(),
                    reason,
                },
                None => Error::Connect {
                    host: host.to_string(),
                    cause: crate::error::chain(&e),
                },
            })?;
        let (parts, body) = response.into_parts();
        let body = match self.read {
            Read::Whole(limit) => match Limited::new(body, limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Err(Error::TooLarge {
                        host: host.to_string(),
                        limit,
                    })
                }
                Err(e) => {
                    return Err(Error::Read {
                        host: host.to_string(),
                        cause: crate::error::chain(&*e),
                    })
                }
            },
            Read::OnFailure(_) if parts.status.is_success() => Bytes::new(),
            Read::OnFailure(limit) => Limited::new(body, limit)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default(),
        };
        Ok(Response::from_parts(parts, body))
    }
}

/// `host:port` of `uri`, for error messages.
fn host(uri: &Uri) -> String {
    uri.authority()
        .map(|a| a.to_string())
        .unwrap_or_else(|| uri.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(url("http://127.0.0.1:9901/status").is_ok());
        assert!(url("https://x").is_ok());
        assert!(matches!(url("ftp://x"), Err(Error::Scheme { .. })));
        assert!(matches!(url("not a url"), Err(Error::Url { .. })));
        assert!(matches!(url("/status"), Err(Error::Url { .. })));
    }

    /// One answer from a bare TCP listener: `head` then `body` (the connection then closes).
    async fn serve_once(answer: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        });
        format!("http://{addr}/")
    }

    fn get(url: &str) -> Request<Bytes> {
        Request::get(url).body(Bytes::new()).unwrap()
    }

    #[tokio::test]
    async fn reads_the_answer_and_caps_it() {
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello";
        let client = Client::new(Duration::from_secs(5));
        let resp = client.send(get(&serve_once(ok).await)).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.body().as_ref(), b"hello");

        let small = Client::builder(Duration::from_secs(5))
            .max_response(2)
            .build();
        let err = small.send(get(&serve_once(ok).await)).await.unwrap_err();
        assert!(matches!(err, Error::TooLarge { limit: 2, .. }), "{err}");

        let only_failures = Client::builder(Duration::from_secs(5))
            .failure_body_only(64)
            .build();
        let resp = only_failures
            .send(get(&serve_once(ok).await))
            .await
            .unwrap();
        assert!(resp.body().is_empty());
        let refused = "HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\nconnection: close\r\n\r\nno";
        let resp = only_failures
            .send(get(&serve_once(refused).await))
            .await
            .unwrap();
        assert_eq!(
            (resp.status().as_u16(), resp.body().as_ref()),
            (403, &b"no"[..])
        );
    }

    #[tokio::test]
    async fn names_the_host_when_it_fails() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = Client::new(Duration::from_secs(5));
        let err = client
            .send(get(&format!("http://{addr}/")))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");

        // Accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let err = client
            .send_within(get(&format!("http://{addr}/")), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        drop(silent);
    }
}
