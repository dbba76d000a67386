//! Listener: accepts TCP connections and serves HTTP/1.1 and HTTP/2 cleartext (prior knowledge) on them,
//! until shutdown; then stops accepting and lets open connections finish up to the drain deadline.
//!
//! A listener holds at most [`Limits::max_connections`] connections: past it a new connection is closed
//! at accept and counted, so a flood of idle connections cannot take every file descriptor of the
//! process (and with them the admin listener's). A connection with no request in flight — before its
//! first byte, or between two requests — is closed after [`Limits::idle_timeout`]. `cmd::run` starts
//! one listener for the proxy and one for the admin API.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};

use crate::shutdown::Shutdown;

/// How many connections a listener holds and how long an idle one lives (`[listen]`).
#[derive(Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    /// Called for each connection closed at accept because the listener was full.
    pub on_refused: Arc<dyn Fn() + Send + Sync>,
}

impl Default for Limits {
    /// The `[listen]` defaults, refusals uncounted: for listeners of tools (the demo's arms).
    fn default() -> Self {
        let listen = crate::config::Listen::default();
        Limits {
            max_connections: listen.max_connections,
            idle_timeout: listen.idle_timeout.0,
            on_refused: Arc::new(|| {}),
        }
    }
}

/// File descriptors kept out of the connection budget: the admin listener's connections, the
/// upstream pool's, the state store, the log, the embedder.
const RESERVED_FDS: u64 = 128;

/// Raises the soft limit of open files to the hard limit (as most servers do) and returns the
/// connection cap it leaves room for: each proxied connection may hold two descriptors (the client's
/// and a pooled upstream's), so `max_connections` is lowered, with a warning, when the limit cannot
/// hold that many.
pub fn fitting_cap(max_connections: usize) -> usize {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return max_connections;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    let room = limit.rlim_cur.saturating_sub(RESERVED_FDS) / 2;
    let fits = usize::try_from(room).unwrap_or(usize::MAX).max(1);
    if fits < max_connections {
        tracing::warn!(
            max_connections,
            open_files_limit = limit.rlim_cur,
            effective = fits,
            "listen.max_connections does not fit the open-files limit (two per connection plus a reserve); lowered"
        );
        return fits;
    }
    max_connections
}

/// Serves every connection accepted by `listener` with the handler `connection` makes for its peer (so
/// per-connection work happens once), until `shutdown` fires, then waits up to
/// `drain` for in-flight requests (streams included) to complete. Returns whether everything drained
/// before the deadline.
pub async fn serve<M, H, F, B>(
    name: &'static str,
    listener: TcpListener,
    mut shutdown: Shutdown,
    drain: Duration,
    limits: Limits,
    connection: M,
) -> bool
where
    M: Fn(SocketAddr) -> H,
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body<Data = bytes::Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Head and body in one buffer, sent with send(2), not queued for writev(2) (see `upstream`).
        .writev(false)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Full: closed at once, before any byte is read; the client may retry elsewhere.
            (limits.on_refused)();
            tracing::debug!(listener = name, %peer, "connection refused: listen.max_connections reached");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let handler = connection(peer);
        let busy = activity.clone();
        let service = service_fn(move |req| {
            let guard = Busy::new(busy.clone());
            // Boxed once here: the proxy's request future is large, and hyper moves the future it is
            // given by value (into this block, then into its in-flight slot); a box makes each move
            // a pointer's copy instead of a memcpy of the whole state machine.
            let response = Box::pin(handler(req));
            async move {
                let Ok(response) = response.await;
                Ok::<_, Infallible>(response.map(|body| Tracked { body, _busy: guard }))
            }
        });
        let conn = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned(),
        );
        let idle_timeout = limits.idle_timeout;
        tokio::spawn(async move {
            tokio::select! {
                ended = conn => if let Err(e) = ended {
                    tracing::debug!(listener = name, %peer, error = %e, "connection ended with an error");
                },
                _ = activity.idle_for(idle_timeout) => {
                    tracing::debug!(listener = name, %peer, "idle connection closed");
                }
            }
            drop(slot);
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

/// Requests in flight on one connection, and a wake-up when the last one ends.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    /// Set when a request starts: one that began and ended during an idle wait restarts it.
    touched: AtomicBool,
    quiet: Notify,
}

impl Activity {
    /// Resolves once the connection has had no request in flight for `timeout` on end.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let quiet = self.quiet.notified();
            tokio::pin!(quiet);
            quiet.as_mut().enable();
            self.touched.store(false, SeqCst);
            if self.in_flight.load(SeqCst) == 0 {
                tokio::time::sleep(timeout).await;
                if self.in_flight.load(SeqCst) == 0 && !self.touched.load(SeqCst) {
                    return;
                }
                continue;
            }
            quiet.await;
        }
    }
}

/// Marks one request in flight on its connection until dropped (with the response body).
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, SeqCst);
        activity.touched.store(true, SeqCst);
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, SeqCst) == 1 {
            self.0.quiet.notify_waiters();
        }
    }
}

/// A response body that keeps its request counted as in flight until the body is done with.
struct Tracked<B> {
    body: B,
    _busy: Busy,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
