//! A [`Client`] for callers that are not async (the CLI verbs, the embedder's evaluation threads): it
//! owns a small runtime and blocks on each exchange, never touching the proxy's runtime.

use bytes::Bytes;
use http::{Request, Response};

use super::{Client, Error};

/// A client with its own runtime. Dropping it is allowed anywhere, even on a runtime thread.
pub struct Blocking {
    client: Client,
    /// Always `Some` until drop; see `Drop`.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Blocking {
    /// On a current-thread runtime: for a single caller thread (the CLI).
    pub fn current_thread(client: Client) -> Result<Blocking, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        Ok(Blocking {
            client,
            runtime: Some(runtime),
        })
    }

    /// On one I/O thread named `thread_name`: for several caller threads at once, and so the pool's
    /// idle connections are looked after between calls.
    pub fn with_io_thread(client: Client, thread_name: &str) -> Result<Blocking, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(thread_name)
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        Ok(Blocking {
            client,
            runtime: Some(runtime),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// [`Client::send`], blocking the calling thread. Must not be called from within a runtime.
    pub fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, Error> {
        self.runtime
            .as_ref()
            .ok_or(Error::ShuttingDown)?
            .block_on(self.client.send(request))
    }
}

impl Drop for Blocking {
    /// A reload or shutdown can drop the owner on a thread of the proxy's runtime, where dropping a
    /// runtime would panic; shutting it down in the background is allowed anywhere.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
