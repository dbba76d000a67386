//! Tee: copies of the request and response bodies, capped at `signals.max_body_bytes`, taken while the
//! bodies stream through (SPEC §1). The copy holds reference-counted slices of the frames that pass — no
//! byte is copied until evaluation — and stops at the cap; the stream itself is never touched.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Up to `cap` bytes of a body.
#[derive(Debug, Default)]
pub struct Capture {
    parts: Vec<Bytes>,
    len: usize,
    cap: usize,
    /// The body was longer than the cap: the copy stops there.
    pub truncated: bool,
    /// The body ended with an error or was abandoned before its end.
    pub incomplete: bool,
}

impl Capture {
    pub fn new(cap: usize) -> Self {
        Capture {
            parts: Vec::new(),
            len: 0,
            cap,
            truncated: false,
            incomplete: false,
        }
    }

    /// Takes a slice of `data`, up to the cap.
    #[inline]
    pub fn push(&mut self, data: &Bytes) {
        if self.truncated || data.is_empty() {
            return;
        }
        let room = self.cap - self.len;
        if data.len() <= room {
            self.parts.push(data.clone());
            self.len += data.len();
        } else {
            if room > 0 {
                self.parts.push(data.slice(..room));
                self.len += room;
            }
            self.truncated = true;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The captured bytes in one buffer.
    pub fn into_bytes(self) -> Bytes {
        match self.parts.len() {
            0 => Bytes::new(),
            1 => self.parts.into_iter().next().unwrap_or_default(),
            _ => self.copied(),
        }
    }

    /// The same capture in one buffer of its own. The slices a capture holds keep alive the whole
    /// read buffers they were cut from; a sample waiting in the queue must hold only its own bytes.
    pub fn compact(self) -> Capture {
        let (truncated, incomplete, cap, len) =
            (self.truncated, self.incomplete, self.cap, self.len);
        let parts = if len == 0 {
            Vec::new()
        } else {
            vec![self.copied()]
        };
        Capture {
            parts,
            len,
            cap,
            truncated,
            incomplete,
        }
    }

    fn copied(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.len);
        for p in &self.parts {
            buf.extend_from_slice(p);
        }
        buf.freeze()
    }
}

/// Where a request body's copy lands once the body has been read, for the response side to pick up.
pub type RequestSlot = Arc<Mutex<Option<Capture>>>;

/// The client's request body on its way upstream, copied into a [`RequestSlot`] when sampled.
pub struct RequestBody {
    inner: Incoming,
    tee: Option<(Capture, RequestSlot)>,
    /// Frames read ahead of the stream (the budget's peek), sent first.
    prefix: VecDeque<Frame<Bytes>>,
}

impl RequestBody {
    pub fn plain(inner: Incoming) -> Self {
        RequestBody {
            inner,
            tee: None,
            prefix: VecDeque::new(),
        }
    }

    /// A body whose copy (up to `cap`) is stored in `slot` when it ends or is dropped.
    pub fn teed(inner: Incoming, cap: usize, slot: RequestSlot) -> Self {
        RequestBody {
            inner,
            tee: Some((Capture::new(cap), slot)),
            prefix: VecDeque::new(),
        }
    }

    /// Sends `prefix` — frames already read from `inner` — before the rest of the stream.
    pub fn with_prefix(mut self, prefix: VecDeque<Frame<Bytes>>) -> Self {
        self.prefix = prefix;
        self
    }

    fn store(&mut self, complete: bool) {
        if let Some((mut capture, slot)) = self.tee.take() {
            capture.incomplete |= !complete;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(capture);
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
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
            }
            Some(Err(_)) => this.store(false),
            None => this.store(true),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_stops_at_the_cap() {
        let mut c = Capture::new(10);
        c.push(&Bytes::from_static(b"hello"));
        assert!(!c.truncated);
        c.push(&Bytes::from_static(b"world, and more"));
        c.push(&Bytes::from_static(b"ignored"));
        assert!(c.truncated);
        assert_eq!(c.len(), 10);
        let compact = c.compact();
        assert!(compact.truncated);
        assert_eq!(compact.parts.len(), 1);
        assert_eq!(&compact.into_bytes()[..], b"helloworld");
    }

    #[test]
    fn capture_exactly_at_the_cap_is_whole() {
        let mut c = Capture::new(4);
        c.push(&Bytes::from_static(b"ab"));
        c.push(&Bytes::from_static(b"cd"));
        assert!(!c.truncated);
        assert_eq!(&c.into_bytes()[..], b"abcd");
    }
}
