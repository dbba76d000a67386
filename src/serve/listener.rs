//! Listener: accepts TCP connections and serves HTTP/1.1 and HTTP/2 cleartext (prior knowledge) on them,
//! until shutdown; then stops accepting and lets open connections finish up to the drain deadline.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

/// Serves every connection accepted by `listener` with the handler `connection` makes for its peer (so
/// per-connection work happens once), until `shutdown` fires, then waits up to
/// `drain` for in-flight requests (streams included) to complete. Returns whether everything drained
/// before the deadline.
pub async fn serve<M, H, F, B>(
    name: &'static str,
    listener: TcpListener,
    mut shutdown: Shutdown,
    drain: Duration,
    connection: M,
) -> bool
where
    M: Fn(SocketAddr) -> H,
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors or the like: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = connection(peer);
        let service = service_fn(handler);
        let conn = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(listener = name, %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let open = graceful.count();
    tracing::info!(listener = name, open_connections = open, drain_timeout = ?drain, "stopped accepting; draining");
    tokio::select! {
        _ = graceful.shutdown() => true,
        _ = tokio::time::sleep(drain) => {
            tracing::warn!(listener = name, "drain deadline passed with requests still in flight");
            false
        }
    }
}
