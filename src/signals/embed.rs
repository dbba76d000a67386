//! Embedders (SPEC §3): text → unit vector, the input of every ΔS probe.
//!
//! The signals workers hold one `Box<dyn Embedder>` chosen by `signals.embedder`. [`Hashed`] is the
//! built-in default that needs no model: signed feature hashing of words, word bigrams and
//! boundary-marked character 3-grams into [`DIMS`] dimensions. The OpenAI-compatible embedder lives
//! beside it. [`cosine`] and [`centroid`] are the vector operations the measures
//! ([`super::measure`]) build on.
//!
//! The word definition here — a maximal run of `char::is_alphanumeric` chars, lowercased char by
//! char — is shared with coverage, so both signals see the same words.

#[cfg(feature = "local-embedder")]
pub mod bert;
pub mod cache;
#[cfg(feature = "local-embedder")]
pub mod local;
pub mod openai;

use std::cell::RefCell;
use std::time::Duration;

/// Dimensions of a [`Hashed`] vector.
pub const DIMS: usize = 1024;

/// Why an embedder produced no vectors. `hashed` never fails; a failure skips the sample.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The endpoint refused the request, was unreachable or answered with an error status.
    #[error("embedding endpoint failed: {0}")]
    Endpoint(String),
    /// The endpoint did not answer within its timeout.
    #[error("embedding endpoint timed out after {0:?}")]
    Timeout(Duration),
    /// The endpoint answered, but not with embeddings we can read.
    #[error("embedding endpoint sent a malformed response: {0}")]
    Malformed(String),
    /// The in-process model failed on this input.
    #[error("local model failed: {0}")]
    Model(String),
    /// The endpoint returned a different number of vectors than texts sent.
    #[error("embedder returned {got} vectors for {expected} texts")]
    Count { expected: usize, got: usize },
}

/// Text → vector. Object safe: the workers call it through `dyn Embedder`.
pub trait Embedder: Send + Sync {
    /// The name used in config (`signals.embedder`), logs and metrics.
    fn name(&self) -> &'static str;

    /// One vector per text, in the order of `texts`. Remote embedders send them as one batch.
    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError>;

    /// The vector of one text.
    fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let mut vectors = self.embed_batch(&[text])?;
        match (vectors.pop(), vectors.len()) {
            (Some(vector), 0) => Ok(vector),
            (last, rest) => Err(EmbedError::Count {
                expected: 1,
                got: rest + usize::from(last.is_some()),
            }),
        }
    }
}

/// Cosine similarity of two vectors; 0 when either is zero or their lengths differ.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    cosine_f64(a, b) as f32
}

/// [`cosine`] in f64, for ΔS. `dot / sqrt(|a|² |b|²)` rather than `dot / (|a| |b|)` because
/// `sqrt(x * x) == x` holds exactly in IEEE arithmetic: a vector's cosine with itself is exactly 1,
/// so ΔS of identical texts is exactly 0.
pub(crate) fn cosine_f64(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return 0.0;
    }
    let (mut dot, mut aa, mut bb) = ([0.0f64; LANES], [0.0f64; LANES], [0.0f64; LANES]);
    let (mut blocks_a, mut blocks_b) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (xs, ys) in (&mut blocks_a).zip(&mut blocks_b) {
        let (Ok(xs), Ok(ys)) = (<&[f32; LANES]>::try_from(xs), <&[f32; LANES]>::try_from(ys))
        else {
            continue;
        };
        for k in 0..LANES {
            let (x, y) = (f64::from(xs[k]), f64::from(ys[k]));
            dot[k] += x * y;
            aa[k] += x * x;
            bb[k] += y * y;
        }
    }
    for (k, (&x, &y)) in blocks_a
        .remainder()
        .iter()
        .zip(blocks_b.remainder())
        .enumerate()
    {
        let (x, y) = (f64::from(x), f64::from(y));
        dot[k] += x * y;
        aa[k] += x * x;
        bb[k] += y * y;
    }
    let (dot, aa, bb) = (fold_lanes(dot), fold_lanes(aa), fold_lanes(bb));
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    dot / (aa * bb).sqrt()
}

/// Sums over 1024 dims are kept in this many independent accumulators: one running sum is a chain
/// of dependent adds that the CPU cannot overlap nor the compiler vectorise. The lanes are added up
/// in a fixed order, so results stay identical on every run and platform.
const LANES: usize = 8;

fn fold_lanes(lanes: [f64; LANES]) -> f64 {
    lanes.iter().sum()
}

/// |v|, summed in lanes.
fn norm(v: &[f32]) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let mut blocks = v.chunks_exact(LANES);
    for xs in &mut blocks {
        let Ok(xs) = <&[f32; LANES]>::try_from(xs) else {
            continue;
        };
        for k in 0..LANES {
            lanes[k] += f64::from(xs[k]) * f64::from(xs[k]);
        }
    }
    for (k, &x) in blocks.remainder().iter().enumerate() {
        lanes[k] += f64::from(x) * f64::from(x);
    }
    fold_lanes(lanes).sqrt()
}

/// Normalised sum of the vectors (the retrieved centroid C of SPEC §3); a zero vector when the sum is
/// zero, an empty one when there are no vectors. Vectors shorter than the longest count as
/// zero-padded.
pub fn centroid(vectors: &[Vec<f32>]) -> Vec<f32> {
    let dims = vectors.iter().map(Vec::len).max().unwrap_or(0);
    let mut sum = vec![0.0f32; dims];
    for vector in vectors {
        for (s, &x) in sum.iter_mut().zip(vector) {
            *s += x;
        }
    }
    normalise(&mut sum);
    sum
}

/// Scales `v` to unit length in place; zeros when `|v|` is zero or not finite.
fn normalise(v: &mut [f32]) {
    let norm = norm(v);
    if norm == 0.0 || !norm.is_finite() {
        v.fill(0.0);
        return;
    }
    // A (vectorised) f32 multiply per dim: a division per dim would cost more than all the rest.
    let scale = (1.0 / norm) as f32;
    for x in v {
        *x *= scale;
    }
}

// === Hashed ===

/// The built-in embedder (SPEC §3 `hashed`): no model, no I/O, deterministic.
///
/// Features of a text, each identified by its kind and its content:
/// - every word (unigram): a maximal run of `char::is_alphanumeric` chars, each char lowercased with
///   `char::to_lowercase` (context-free: `Σ` is always `σ`);
/// - every pair of consecutive words (bigram), across punctuation and sentence ends;
/// - every character 3-gram of every word wrapped in boundary markers: `<word>` gives `<wo`, `wor`,
///   `ord`, `rd>`; `a` gives `<a>`; `ab` gives `<ab`, `ab>`. 3-grams are over chars, not bytes.
///
/// A word and a 3-gram with the same letters (`the`) are different features: the kind is part of the
/// hash. Each distinct feature adds `±(1 + ln tf)` to dimension `h % DIMS`, the sign from the top bit
/// of its 64-bit feature hash `h`; the result is L2 normalised. A text without words is the zero
/// vector.
///
/// The hash is written out here (not `std`'s, which may change between releases and is seeded per
/// process) so that vectors are identical on every platform, build and run. It is built from the
/// MurmurHash3 x64 multiply–rotate step over 8-byte little-endian blocks and its `fmix64`
/// finaliser, with a fixed seed; each feature kind starts from its own state (the seed with the
/// kind tag hashed in), so a word, a bigram and a 3-gram never hash the same input:
/// - word: its lowercased UTF-8 bytes in blocks (the last zero-padded), then its byte length;
/// - bigram: the hashes of its two words;
/// - 3-gram: its three chars packed into 63 bits (`c1 << 42 | c2 << 21 | c3`), xor the 3-gram
///   state, through `fmix64`.
///
/// For a fixed kind (and, for words, length) one block maps to the hash bijectively, so words of up
/// to 8 bytes never share a hash with each other, nor 3-grams — only their `h % DIMS` can coincide.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hashed;

impl Hashed {
    /// The vector of one text. Infallible, unlike [`Embedder::embed`].
    pub fn vector(&self, text: &str) -> Vec<f32> {
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => scratch.embed(text),
            // Unreachable (embedding never re-enters), but costs nothing to survive.
            Err(_) => Scratch::default().embed(text),
        })
    }
}

impl Embedder for Hashed {
    fn name(&self) -> &'static str {
        "hashed"
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts.iter().map(|text| self.vector(text)).collect())
    }

    fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        Ok(self.vector(text))
    }
}

/// The features of `text` as [`Hashed`] sees them, for tests and docs: all words in order, then all
/// bigrams (`"w1 w2"`), then the 3-grams of each word in order. Repeats are kept (they make tf).
pub fn features(text: &str) -> Vec<String> {
    let mut words = Words::default();
    words.split(text);
    let words: Vec<&str> = words.iter().map(|w| w.text).collect();
    let mut out: Vec<String> = words.iter().map(|w| w.to_string()).collect();
    out.extend(
        words
            .windows(2)
            .map(|pair| format!("{} {}", pair[0], pair[1])),
    );
    for word in &words {
        let marked: Vec<char> = std::iter::once('<')
            .chain(word.chars())
            .chain(std::iter::once('>'))
            .collect();
        out.extend(
            marked
                .windows(3)
                .map(|gram| gram.iter().collect::<String>()),
        );
    }
    out
}

thread_local! {
    /// Per-thread buffers of [`Hashed`], reused so that embedding allocates only the output vector.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

struct Scratch {
    words: Words,
    /// Open-addressing feature → tf table (linear probing; `count == 0` marks an empty slot). Its
    /// slots are emptied again after each text.
    table: Vec<Slot>,
    /// The slots filled by the current text, in insertion order (only the first `n` are valid).
    filled: Vec<usize>,
    /// `1 + ln(tf)` for small tf, so that common repeats cost no logarithm.
    weights: [f32; 64],
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    hash: u64,
    count: u32,
}

impl Default for Scratch {
    fn default() -> Self {
        let mut weights = [0.0; 64];
        for (tf, w) in weights.iter_mut().enumerate() {
            *w = weight(tf as u32);
        }
        Scratch {
            words: Words::default(),
            table: Vec::new(),
            filled: Vec::new(),
            weights,
        }
    }
}

fn weight(tf: u32) -> f32 {
    (1.0 + f64::from(tf).ln()) as f32
}

impl Scratch {
    fn embed(&mut self, text: &str) -> Vec<f32> {
        let Scratch {
            words,
            table,
            filled,
            weights,
        } = self;
        words.split(text);
        if words.spans.is_empty() {
            return vec![0.0; DIMS];
        }
        // At most one distinct feature per word, per bigram and per char (a word of n chars has n
        // 3-grams): with room for 3/2 of that, linear probing rarely goes past the first slot.
        let bound = 2 * words.spans.len() - 1 + words.chars;
        let capacity = (bound + bound / 2 + 1).next_power_of_two().max(16);
        if table.len() < capacity {
            table.resize(capacity, Slot::default());
            filled.resize(capacity, 0);
        }
        let table = &mut table[..capacity];
        let mask = table.len() - 1;
        let mut n = 0;
        let mut count = |hash: u64| {
            let mut i = (hash >> 32) as usize & mask;
            loop {
                let slot = &mut table[i];
                // `|`, not `||`: "new or a repeat" is almost always true, while "new" alone is a
                // coin flip the branch predictor would lose.
                if (slot.count == 0) | (slot.hash == hash) {
                    // Written every time, kept only when new: cheaper than a branch on "is new".
                    filled[n] = i;
                    n += usize::from(slot.count == 0);
                    *slot = Slot {
                        hash,
                        count: slot.count + 1,
                    };
                    return;
                }
                i = (i + 1) & mask;
            }
        };

        let mut previous = None;
        for word in words.iter() {
            let hash = word.hash_prefix(WORD, word.text.len());
            count(hash);
            if let Some(previous) = previous {
                count(bigram_hash(previous, hash));
            }
            previous = Some(hash);
            if word.is_ascii() {
                trigrams(word.text.bytes().map(u32::from), |packed| {
                    count(trigram_hash(packed))
                });
            } else {
                trigrams(word.text.chars().map(u32::from), |packed| {
                    count(trigram_hash(packed))
                });
            }
        }

        let mut vector = vec![0.0f32; DIMS];
        for &i in &filled[..n] {
            let Slot { hash, count } = std::mem::take(&mut table[i]);
            let w = weights
                .get(count as usize)
                .copied()
                .unwrap_or_else(|| weight(count));
            // The sign bit of the hash onto the weight: a branch on it would be mispredicted half the
            // time.
            let signed = f32::from_bits(w.to_bits() ^ (((hash >> 63) as u32) << 31));
            vector[(hash % DIMS as u64) as usize] += signed;
        }
        normalise(&mut vector);
        vector
    }
}

/// Calls `emit` with each boundary-marked 3-gram of a word given as its chars, packed as
/// `c1 << 42 | c2 << 21 | c3` (a char fits in 21 bits).
fn trigrams(mut chars: impl Iterator<Item = u32>, mut emit: impl FnMut(u64)) {
    let roll = |packed: u64, c: u32| ((packed << 21) | u64::from(c)) & ((1 << 63) - 1);
    let Some(first) = chars.next() else { return };
    let mut packed = roll(u64::from(u32::from('<')), first);
    for c in chars {
        packed = roll(packed, c);
        emit(packed);
    }
    emit(roll(packed, u32::from('>')));
}

// === Feature hash ===

const SEED: u64 = 0x6472_6966_7467_7561; // "driftgua"
const C1: u64 = 0x87c3_7b91_1142_53d5;
const C2: u64 = 0x4cf5_ad43_2745_937f;

/// One block into the state; a bijection of `block` for a fixed `state` and vice versa.
pub(crate) const fn mix(state: u64, block: u64) -> u64 {
    (state ^ block)
        .wrapping_mul(C1)
        .rotate_left(31)
        .wrapping_mul(C2)
}

/// MurmurHash3's 64-bit finaliser: a bijection in which every input bit flips each output bit with
/// probability ~½.
pub(crate) const fn fmix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Start states per feature kind: the kind tag is hashed first, so kinds never share an input.
const WORD: u64 = mix(SEED, 1);
const BIGRAM: u64 = mix(SEED, 2);
const TRIGRAM: u64 = mix(SEED, 3);

/// Hashes `bytes` in 8-byte little-endian blocks (the last zero-padded), then their length.
/// `const` so that tables of hashed words can be built at compile time.
pub(crate) const fn hash_bytes(state: u64, bytes: &[u8]) -> u64 {
    let mut h = state;
    let mut i = 0;
    while i + 8 <= bytes.len() {
        let mut block = 0;
        let mut k = 8;
        while k > 0 {
            k -= 1;
            block = (block << 8) | bytes[i + k] as u64;
        }
        h = mix(h, block);
        i += 8;
    }
    if i < bytes.len() {
        let mut block = 0;
        let mut k = bytes.len();
        while k > i {
            k -= 1;
            block = (block << 8) | bytes[k] as u64;
        }
        h = mix(h, block);
    }
    fmix(mix(h, bytes.len() as u64))
}

/// [`hash_bytes`] of at most 8 bytes given as one zero-padded little-endian block.
const fn hash_block(state: u64, block: u64, len: usize) -> u64 {
    fmix(mix(mix(state, block), len as u64))
}

/// The word hash from the word alone (the hot path uses [`Word::hash_prefix`]).
#[cfg(test)]
fn word_hash(word: &str) -> u64 {
    hash_bytes(WORD, word.as_bytes())
}

fn bigram_hash(first: u64, second: u64) -> u64 {
    fmix(mix(mix(BIGRAM, first), second))
}

fn trigram_hash(packed: u64) -> u64 {
    fmix(packed ^ TRIGRAM)
}

// === Words ===

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

#[cfg(test)]
mod tests;
