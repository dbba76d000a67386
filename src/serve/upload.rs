//! The client's request body on its way upstream ([`RequestBody`]): sent as it arrives, copied when
//! sampled, and watched ([`Upload`]) so the request path can tell the client's time from the
//! upstream's. A slow or broken upload is the client's doing: `serve::handle` times it against
//! `listen.body_timeout` (408) and answers a broken one itself (400 or 499), and starts the upstream's
//! clock only once the body is sent. `serve::handle` builds it; `serve::upstream` sends it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::Ordering::{Acquire, Release};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context as TaskContext, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::Notify;

use crate::capture::Capture;

/// Where a request body's copy lands once the body has been read, for the response side to pick up.
pub type RequestSlot = Arc<Mutex<Option<Capture>>>;

/// How a client's upload ended, as far as the proxy has read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadEnd {
    /// Still arriving.
    Uploading,
    /// Read to its end and handed on.
    Sent,
    /// Broke off: the client went away or reset its stream.
    Left,
    /// Malformed framing (a broken chunked encoding).
    Malformed,
}

impl UploadEnd {
    fn code(self) -> u8 {
        match self {
            UploadEnd::Uploading => 0,
            UploadEnd::Sent => 1,
            UploadEnd::Left => 2,
            UploadEnd::Malformed => 3,
        }
    }

    fn from_code(code: u8) -> Self {
        match code {
            0 => UploadEnd::Uploading,
            1 => UploadEnd::Sent,
            2 => UploadEnd::Left,
            _ => UploadEnd::Malformed,
        }
    }

    /// What a failed read of the client's body means (see `guards::body_malformed`): malformed
    /// framing, or else the client leaving.
    pub fn of_error(e: &hyper::Error) -> Self {
        if crate::guards::body_malformed(e) {
            UploadEnd::Malformed
        } else {
            UploadEnd::Left
        }
    }
}

/// The progress of one upload, shared by the body being sent and the request waiting on it.
#[derive(Default)]
pub struct Upload {
    end: AtomicU8,
    ended: Notify,
}

impl Upload {
    fn finish(&self, end: UploadEnd) {
        if self
            .end
            .compare_exchange(0, end.code(), Release, Acquire)
            .is_ok()
        {
            self.ended.notify_waiters();
        }
    }

    pub fn end(&self) -> UploadEnd {
        UploadEnd::from_code(self.end.load(Acquire))
    }

    /// Resolves once the upload has ended, however it ended.
    pub async fn ended(&self) -> UploadEnd {
        loop {
            let notified = self.ended.notified();
            tokio::pin!(notified);
            // Registered before the look, so an end between the two is not missed.
            notified.as_mut().enable();
            match self.end() {
                UploadEnd::Uploading => notified.await,
                end => return end,
            }
        }
    }
}

/// The client's request body on its way upstream, copied into a [`RequestSlot`] when sampled.
pub struct RequestBody {
    inner: Incoming,
    tee: Option<(Capture, RequestSlot)>,
    /// Frames read ahead of the stream (the budget's peek, the fence's hash), sent first.
    prefix: VecDeque<Frame<Bytes>>,
    /// Told how the upload ends, when someone waits on it.
    upload: Option<Arc<Upload>>,
}

impl RequestBody {
    pub fn plain(inner: Incoming) -> Self {
        RequestBody {
            inner,
            tee: None,
            prefix: VecDeque::new(),
            upload: None,
        }
    }

    /// A body whose copy (up to `cap`) is stored in `slot` when it ends or is dropped.
    pub fn teed(inner: Incoming, cap: usize, slot: RequestSlot) -> Self {
        RequestBody {
            inner,
            tee: Some((Capture::new(cap), slot)),
            prefix: VecDeque::new(),
            upload: None,
        }
    }

    /// Sends `prefix` — frames already read from `inner` — before the rest of the stream.
    pub fn with_prefix(mut self, prefix: VecDeque<Frame<Bytes>>) -> Self {
        self.prefix = prefix;
        self
    }

    /// The upload's progress, when part of the body is still to come from the client; `None` when it
    /// has all been read already (no body, or one the guards read whole).
    pub fn watch(&mut self) -> Option<Arc<Upload>> {
        if self.inner.is_end_stream() {
            return None;
        }
        let upload = Arc::new(Upload::default());
        self.upload = Some(upload.clone());
        Some(upload)
    }

    fn store(&mut self, complete: bool) {
        if let Some((mut capture, slot)) = self.tee.take() {
            capture.incomplete |= !complete;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(capture);
        }
    }

    fn ended(&self, end: UploadEnd) {
        if let Some(upload) = &self.upload {
            upload.finish(end);
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(frame) = this.prefix.pop_front() {
            if let (Some((capture, _)), Some(data)) = (this.tee.as_mut(), frame.data_ref()) {
                capture.push(data);
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some((capture, _)), Some(data)) = (this.tee.as_mut(), f.data_ref()) {
                    capture.push(data);
                }
                // With a length, hyper knows the body is over after its last byte and may not poll
                // for the end.
                if this.inner.is_end_stream() {
                    this.ended(UploadEnd::Sent);
                }
            }
            Some(Err(e)) => {
                this.ended(UploadEnd::of_error(e));
                this.store(false);
            }
            None => {
                this.ended(UploadEnd::Sent);
                this.store(true);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let extra: u64 = self
            .prefix
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + extra);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + extra);
        }
        hint
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.store(complete);
    }
}
