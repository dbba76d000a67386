//! The words of a text — maximal runs of `char::is_alphanumeric` chars, lowercased char by char — split
//! into one reused buffer: the `hashed` embedder and coverage (`signals::measure`) both read text through
//! it, so both signals see the same words.

use super::hashed::{hash_block, hash_bytes};

/// The lowercased words of a text, in one reused buffer.
#[derive(Debug, Default)]
pub(crate) struct Words {
    /// The words at `spans`; between them, whatever is cheapest to leave there.
    lowered: String,
    spans: Vec<Span>,
    /// Total chars of all words.
    chars: usize,
}

#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    chars: usize,
}

/// One lowercased word, with what the hot loops need of it precomputed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Word<'a> {
    pub text: &'a str,
    /// Its length in chars.
    pub chars: usize,
    /// Its first (up to) 8 bytes as a little-endian block, zero past the word's end.
    pub head: u64,
    /// Its last (up to) 8 bytes, last byte lowest, zero before the word's start: `ing` is
    /// `0x69_6e_67`.
    pub tail: u64,
}

impl Word<'_> {
    /// Every char is one byte.
    pub fn is_ascii(&self) -> bool {
        self.chars == self.text.len()
    }

    /// [`hash_bytes`] of the word's first `len` bytes (`len` ≤ the word's byte length); words of up
    /// to 8 bytes take no loop.
    pub fn hash_prefix(&self, state: u64, len: usize) -> u64 {
        match self.text.as_bytes().get(..len) {
            Some(_) if len <= 8 => hash_block(state, self.head & low_bytes(len), len),
            Some(prefix) => hash_bytes(state, prefix),
            None => hash_bytes(state, self.text.as_bytes()),
        }
    }
}

/// A mask of the low `n` bytes of a u64.
pub(crate) const fn low_bytes(n: usize) -> u64 {
    if n >= 8 {
        u64::MAX
    } else {
        (1 << (8 * n)) - 1
    }
}

/// Zero bytes kept before and after the words, so that the 8-byte loads that make [`Word::head`]
/// and [`Word::tail`] are always in bounds.
const PAD: usize = 8;

/// `0x01` / `0x80` in every byte of a u64.
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// For a block of ASCII bytes: the high bit of each byte that is `>= lo`. No carry crosses bytes:
/// each byte is < 0x80 and the addend ≤ 0x80.
const fn at_least(block: u64, lo: u8) -> u64 {
    block.wrapping_add(ONES * (0x80 - lo as u64)) & HIGH
}

/// For a block of ASCII bytes: the high bit of each byte that is `> hi`.
const fn above(block: u64, hi: u8) -> u64 {
    block.wrapping_add(ONES * (0x7f - hi as u64)) & HIGH
}

impl Words {
    /// Replaces the content with the words of `text`.
    ///
    /// ASCII goes 8 bytes at a time: which bytes are letters or digits is found with a few word-wide
    /// operations, lowercasing is an OR, and word boundaries come from the bit mask — no branch per
    /// byte. Other chars take the `char` path.
    pub fn split(&mut self, text: &str) {
        let mut out = Splitter {
            lowered: std::mem::take(&mut self.lowered).into_bytes(),
            spans: &mut self.spans,
            chars: 0,
            start: None,
            multibyte: 0,
        };
        out.lowered.clear();
        out.spans.clear();
        // Lowercasing grows UTF-8 by at most 3/2.
        out.lowered.reserve(PAD + text.len() + text.len() / 2 + PAD);
        out.lowered.extend_from_slice(&[0; PAD]);

        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let Some(block) = bytes.get(i..i + 8) else {
                break;
            };
            let mut buf = [0u8; 8];
            buf.copy_from_slice(block);
            let block = u64::from_le_bytes(buf);
            if block & HIGH != 0 {
                i = out.char_at(text, i);
                continue;
            }
            let folded = block | (ONES * 0x20); // lowercases letters, keeps digits
            let letters = at_least(folded, b'a') & !above(folded, b'z');
            let digits = at_least(block, b'0') & !above(block, b'9');
            let word = letters | digits;
            let base = out.lowered.len();
            out.lowered
                .extend_from_slice(&(block | (word >> 2)).to_le_bytes());
            // One bit per byte, then one per change between word and non-word.
            let bits = ((word >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56) as u32;
            let mut changes = (bits ^ ((bits << 1) | u32::from(out.start.is_some()))) & 0xff;
            while changes != 0 {
                let at = base + changes.trailing_zeros() as usize;
                changes &= changes - 1;
                out.toggle(at);
            }
            i += 8;
        }
        while i < bytes.len() {
            i = out.char_at(text, i);
        }
        let end = out.lowered.len();
        out.close(end);
        self.chars = out.chars;
        let mut lowered = out.lowered;
        lowered.extend_from_slice(&[0; PAD]);
        // Always valid: ASCII bytes and whole encoded chars only.
        self.lowered = String::from_utf8(lowered)
            .unwrap_or_else(|invalid| String::from_utf8_lossy(invalid.as_bytes()).into_owned());
    }

    /// The words in order.
    pub fn iter(&self) -> impl Iterator<Item = Word<'_>> {
        let bytes = self.lowered.as_bytes();
        let load = move |at: usize| {
            let mut buf = [0u8; 8];
            if let Some(block) = bytes.get(at..at + 8) {
                buf.copy_from_slice(block);
            }
            buf
        };
        self.spans.iter().map(move |s| {
            let len = s.end - s.start;
            Word {
                text: self.lowered.get(s.start..s.end).unwrap_or_default(),
                chars: s.chars,
                head: u64::from_le_bytes(load(s.start)) & low_bytes(len),
                tail: u64::from_be_bytes(load(s.end.saturating_sub(8))) & low_bytes(len),
            }
        })
    }

    /// The word count.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Total chars of all words.
    pub fn chars(&self) -> usize {
        self.chars
    }

    /// The split buffer the words are slices of.
    pub fn lowered(&self) -> &str {
        &self.lowered
    }

    /// Where `word`, a slice of [`Words::lowered`], starts in it.
    pub fn offset_of(&self, word: &str) -> usize {
        word.as_ptr() as usize - self.lowered.as_ptr() as usize
    }
}

/// The state of one [`Words::split`].
struct Splitter<'a> {
    lowered: Vec<u8>,
    spans: &'a mut Vec<Span>,
    chars: usize,
    /// Where the current word started in `lowered`, while inside one.
    start: Option<usize>,
    /// Bytes beyond the first of each multi-byte char in the current word (bytes − chars).
    multibyte: usize,
}

impl Splitter<'_> {
    fn toggle(&mut self, at: usize) {
        if self.start.is_some() {
            self.close(at);
        } else {
            self.start = Some(at);
            self.multibyte = 0;
        }
    }

    fn close(&mut self, end: usize) {
        if let Some(start) = self.start.take() {
            let chars = end - start - self.multibyte;
            self.spans.push(Span { start, end, chars });
            self.chars += chars;
        }
    }

    /// One char at `i` (a char boundary), the slow way; returns the index after it.
    fn char_at(&mut self, text: &str, i: usize) -> usize {
        let Some(c) = text.get(i..).and_then(|rest| rest.chars().next()) else {
            return text.len();
        };
        let is_word = if c.is_ascii() {
            c.is_ascii_alphanumeric()
        } else {
            c.is_alphanumeric()
        };
        let at = self.lowered.len();
        if !is_word {
            self.close(at);
        } else {
            if self.start.is_none() {
                self.start = Some(at);
                self.multibyte = 0;
            }
            for lower in c.to_lowercase() {
                let mut buf = [0; 4];
                let encoded = lower.encode_utf8(&mut buf);
                self.lowered.extend_from_slice(encoded.as_bytes());
                self.multibyte += encoded.len() - 1;
            }
        }
        i + c.len_utf8()
    }
}
