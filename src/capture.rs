//! Capture: a capped copy of a body, taken while it streams through (SPEC §1) — the tee's request and
//! response copies, a receipt's body, the usage tap. It holds reference-counted slices of the frames that
//! pass — no byte is copied until it is read — and stops at the cap; the stream itself is never touched.

use bytes::{Bytes, BytesMut};

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
