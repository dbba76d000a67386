//! The built-in `hashed` embedder: signed feature hashing, no model and no I/O, so ΔS works out of the box
//! and identically everywhere. Built by `signals::embedder`; its feature hash is reused by coverage.

use std::cell::RefCell;

use super::words::Words;
use super::{normalise, EmbedError, Embedder, Probe};

/// Dimensions of a [`Hashed`] vector.
pub const DIMS: usize = 1024;

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
        let mut vector = vec![0.0f32; DIMS];
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => scratch.embed(text, &mut vector),
            // Unreachable (embedding never re-enters), but costs nothing to survive.
            Err(_) => Scratch::default().embed(text, &mut vector),
        });
        vector
    }

    /// The vector of a text already split into `words`, written into `out` ([`DIMS`] long): what
    /// the evaluation calls, as it splits each text once for all its measures. Allocates nothing.
    pub(crate) fn vector_of(&self, words: &Words, out: &mut [f32]) {
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => scratch.features.embed(words, out),
            Err(_) => Features::default().embed(words, out),
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

    fn hashed(&self) -> Option<Hashed> {
        Some(*self)
    }

    fn calibrate(&self, probe: Probe, raw: f64) -> f64 {
        let knots = match probe {
            Probe::Retrieval => &RETRIEVAL_KNOTS,
            Probe::Answer => &ANSWER_KNOTS,
        };
        piecewise_linear(knots, raw)
    }
}

/// Calibration of the `hashed` ΔS (SPEC §3 bands): (raw, calibrated) knots of a monotone
/// piecewise-linear map per probe. A lexical ΔS(question, retrieved) sits near 0.7 even when the
/// retriever is right (a short question shares few words with a long passage), so the raw scores put
/// every answer in risk or danger. The knots were fitted on 116 human-written RAG items (the Python
/// FAQ set of tests/fixtures): raw grounded ΔS(question, retrieved) p50 0.72 / p95 0.85 map to
/// 0.30 / 0.55; raw grounded ΔS(retrieved, answer) p50 0.24 / p95 0.51 to 0.19 / 0.46, and an
/// ungrounded answer's raw p5 0.60 / p50 0.73 to 0.61 / 0.81 — so grounded answers land in
/// stable/transitional and ungrounded ones in risk/danger, as with a semantic embedder
/// (all-MiniLM-L6-v2 on the same set: grounded p95 0.58 / 0.45, ungrounded p50 0.83).
const RETRIEVAL_KNOTS: [(f64, f64); 6] = [
    (0.0, 0.0),
    (0.55, 0.15),
    (0.72, 0.30),
    (0.88, 0.60),
    (0.96, 0.85),
    (1.0, 1.0),
];
const ANSWER_KNOTS: [(f64, f64); 6] = [
    (0.0, 0.0),
    (0.25, 0.20),
    (0.50, 0.45),
    (0.60, 0.60),
    (0.75, 0.85),
    (1.0, 1.0),
];

/// The map of `knots` (ascending in both coordinates) at `x`, clamped to [0, 1]; NaN stays NaN.
fn piecewise_linear(knots: &[(f64, f64)], x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let x = x.clamp(0.0, 1.0);
    for pair in knots.windows(2) {
        let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
        if x <= x1 {
            return y0 + (x - x0) / (x1 - x0) * (y1 - y0);
        }
    }
    1.0
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
    /// Per-thread buffers of [`Hashed`], reused so that embedding allocates at most the output vector.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Default)]
struct Scratch {
    /// The split of [`Hashed::vector`]'s text.
    words: Words,
    features: Features,
}

/// The feature counting of one text.
struct Features {
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

impl Default for Features {
    fn default() -> Self {
        let mut weights = [0.0; 64];
        for (tf, w) in weights.iter_mut().enumerate() {
            *w = weight(tf as u32);
        }
        Features {
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
    fn embed(&mut self, text: &str, out: &mut [f32]) {
        self.words.split(text);
        self.features.embed(&self.words, out);
    }
}

impl Features {
    /// Writes the vector of `words` into `out` (its first [`DIMS`] values; zeros for no words).
    fn embed(&mut self, words: &Words, out: &mut [f32]) {
        let Features {
            table,
            filled,
            weights,
        } = self;
        let dims = out.len().min(DIMS);
        let vector = &mut out[..dims];
        vector.fill(0.0);
        if words.len() == 0 {
            return;
        }
        // At most one distinct feature per word, per bigram and per char (a word of n chars has n
        // 3-grams): with room for 3/2 of that, linear probing rarely goes past the first slot.
        let bound = 2 * words.len() - 1 + words.chars();
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

        for &i in &filled[..n] {
            let Slot { hash, count } = std::mem::take(&mut table[i]);
            let w = weights
                .get(count as usize)
                .copied()
                .unwrap_or_else(|| weight(count));
            // The sign bit of the hash onto the weight: a branch on it would be mispredicted half the
            // time.
            let signed = f32::from_bits(w.to_bits() ^ (((hash >> 63) as u32) << 31));
            if let Some(x) = vector.get_mut((hash % DIMS as u64) as usize) {
                *x += signed;
            }
        }
        normalise(vector);
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
pub(super) const fn hash_block(state: u64, block: u64, len: usize) -> u64 {
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

#[cfg(test)]
mod tests;
