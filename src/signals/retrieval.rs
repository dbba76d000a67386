//! Retrieval coverage (SPEC §3): the share of the question's distinct content tokens found in the
//! retrieved chunks, each token weighted by its inverse document frequency over recent chunks, so that
//! rare tokens — names, identifiers, numbers spelled out — count more than words every passage has.
//! A lexical signal of "did the retriever fetch what was asked" that needs no model.
//!
//! The document frequencies live in a [`DocFrequency`] sketch: a count-min sketch of fixed size whose
//! counts halve every [`HALF_LIFE_DOCS`] chunks, so it follows the recent corpus in bounded memory. The
//! evaluation workers keep one per arm (an arm's index is what is being judged) and call
//! [`retrieval_coverage`] with it; `eval --gold` keeps one for the run.

use std::cell::RefCell;

use super::embed::{mix, Words};
use super::measure::content_stem;

/// Counters per row of the sketch (a power of two).
const WIDTH: usize = 4096;
/// Rows of the sketch: a token's count is the least of its rows' counters.
const ROWS: usize = 2;
/// Chunks after which every count (and the number of chunks) is halved: the sketch weighs the last
/// few thousand chunks.
pub const HALF_LIFE_DOCS: u32 = 2048;
/// Start state of the token hash.
const TOKEN_STATE: u64 = mix(0x7265_7472_6965_7665, 0); // "retrieve"

/// Document frequencies of content tokens over recent chunks, in 32 KiB.
#[derive(Clone)]
pub struct DocFrequency {
    counts: Vec<u32>,
    docs: u32,
}

impl Default for DocFrequency {
    fn default() -> Self {
        DocFrequency {
            counts: vec![0; WIDTH * ROWS],
            docs: 0,
        }
    }
}

impl std::fmt::Debug for DocFrequency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocFrequency")
            .field("docs", &self.docs)
            .finish_non_exhaustive()
    }
}

impl DocFrequency {
    pub fn new() -> Self {
        Self::default()
    }

    /// Chunks counted (after halving).
    pub fn docs(&self) -> u32 {
        self.docs
    }

    fn slots(hash: u64) -> [usize; ROWS] {
        [
            (hash as usize) & (WIDTH - 1),
            WIDTH + ((hash >> 32) as usize & (WIDTH - 1)),
        ]
    }

    /// Chunks that held the token (an over-estimate only when tokens share both counters).
    fn df(&self, hash: u64) -> u32 {
        Self::slots(hash)
            .iter()
            .map(|&i| self.counts[i])
            .min()
            .unwrap_or(0)
    }

    /// Smoothed inverse document frequency: ln((N + 1) / (df + 1)) + 1, at least 1.
    fn idf(&self, hash: u64) -> f64 {
        ((f64::from(self.docs) + 1.0) / (f64::from(self.df(hash)) + 1.0)).ln() + 1.0
    }

    /// Counts one chunk given its distinct token hashes.
    fn add(&mut self, tokens: &[u64]) {
        for &hash in tokens {
            for i in Self::slots(hash) {
                self.counts[i] = self.counts[i].saturating_add(1);
            }
        }
        self.docs += 1;
        if self.docs >= HALF_LIFE_DOCS {
            self.counts.iter_mut().for_each(|c| *c /= 2);
            self.docs /= 2;
        }
    }
}

/// Retrieval coverage of one exchange: Σ idf of the question's distinct content tokens (stemmed, as
/// coverage tokenizes) found in any chunk / Σ idf of all of them, with the frequencies `df` held
/// before this exchange; then the chunks are counted into `df`. `None` when the question has no
/// content tokens (the sample is not counted).
pub fn retrieval_coverage(question: &str, chunks: &[&str], df: &mut DocFrequency) -> Option<f64> {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => scratch.split_and_measure(question, chunks, df),
        // Unreachable (retrieval coverage never re-enters), but costs nothing to survive.
        Err(_) => Scratch::default().split_and_measure(question, chunks, df),
    })
}

/// [`retrieval_coverage`] of texts already split: the evaluation splits each text once for all its
/// measures.
pub(crate) fn retrieval_coverage_of_words(
    question: &Words,
    chunks: &[Words],
    df: &mut DocFrequency,
) -> Option<f64> {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => scratch.tokens.measure(question, chunks, df),
        Err(_) => Tokens::default().measure(question, chunks, df),
    })
}

thread_local! {
    /// Per-thread buffers of [`retrieval_coverage`]: it allocates nothing once they have grown.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Default)]
struct Scratch {
    /// The splits of [`retrieval_coverage`]'s texts.
    question: Words,
    chunks: Vec<Words>,
    tokens: Tokens,
}

impl Scratch {
    fn split_and_measure(
        &mut self,
        question: &str,
        chunks: &[&str],
        df: &mut DocFrequency,
    ) -> Option<f64> {
        self.question.split(question);
        if self.chunks.len() < chunks.len() {
            self.chunks.resize_with(chunks.len(), Words::default);
        }
        for (words, chunk) in self.chunks.iter_mut().zip(chunks) {
            words.split(chunk);
        }
        let split = self.chunks.get(..chunks.len()).unwrap_or_default();
        self.tokens.measure(&self.question, split, df)
    }
}

/// The distinct token hashes of one exchange: an open-addressing set (linear probing) of every
/// token of the question and the chunks, remembering for each which question token it is and the
/// last chunk it was seen in — so one pass tells the distinct tokens of each chunk and which
/// question tokens any chunk has.
struct Tokens {
    table: Vec<Token>,
    /// The slots filled, to empty them again after use.
    used: Vec<usize>,
    /// The question's distinct token hashes in order of first use, and whether a chunk has each.
    asked: Vec<(u64, bool)>,
    /// Each chunk's distinct token hashes, chunk after chunk, and where each chunk's end.
    per_chunk: Vec<u64>,
    ends: Vec<usize>,
    /// Mixed into the slot index, random per thread: texts cannot be crafted to collide in `table`.
    key: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Token {
    hash: u64,
    /// 1 + the last chunk that held the token; 0 for none (yet).
    chunk: u32,
    /// 1 + its index in `asked`; 0 when the question does not have it.
    asked: u32,
    filled: bool,
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens {
            table: Vec::new(),
            used: Vec::new(),
            asked: Vec::new(),
            per_chunk: Vec::new(),
            ends: Vec::new(),
            key: mix(fastrand::u64(..), 7),
        }
    }
}

impl Tokens {
    fn measure(
        &mut self,
        question: &Words,
        chunks: &[Words],
        df: &mut DocFrequency,
    ) -> Option<f64> {
        let Tokens {
            table,
            used,
            asked,
            per_chunk,
            ends,
            key,
        } = self;
        let words = question.len() + chunks.iter().map(Words::len).sum::<usize>();
        let capacity = (2 * words).next_power_of_two().max(16);
        if table.len() < capacity {
            table.resize(capacity, Token::default());
        }
        let table = &mut table[..capacity];
        let key = *key;
        asked.clear();
        per_chunk.clear();
        ends.clear();
        for hash in token_hashes(question) {
            let t = &mut table[slot(table, key, hash, used)];
            if t.asked == 0 {
                asked.push((hash, false));
                t.asked = u32::try_from(asked.len()).unwrap_or(u32::MAX);
            }
        }
        for (c, chunk) in chunks.iter().enumerate() {
            let mark = u32::try_from(c + 1).unwrap_or(u32::MAX);
            for hash in token_hashes(chunk) {
                let t = &mut table[slot(table, key, hash, used)];
                if t.chunk != mark {
                    t.chunk = mark;
                    per_chunk.push(hash);
                    if let Some(a) = asked.get_mut((t.asked as usize).wrapping_sub(1)) {
                        a.1 = true;
                    }
                }
            }
            ends.push(per_chunk.len());
        }
        for &i in used.iter() {
            table[i] = Token::default();
        }
        used.clear();

        let coverage = (!asked.is_empty()).then(|| {
            let (mut found, mut total) = (0.0, 0.0);
            for &(hash, in_chunks) in asked.iter() {
                let w = df.idf(hash);
                total += w;
                if in_chunks {
                    found += w;
                }
            }
            found / total
        });
        let mut start = 0;
        for &end in ends.iter() {
            df.add(per_chunk.get(start..end).unwrap_or_default());
            start = end;
        }
        coverage
    }
}

/// The slot of `table` (a power of two long) holding `hash`, or the empty one where it belongs, then
/// filled with it and noted in `used`.
fn slot(table: &mut [Token], key: u64, hash: u64, used: &mut Vec<usize>) -> usize {
    let mask = table.len() - 1;
    let mut i = (mix(key, hash) >> 32) as usize & mask;
    loop {
        let t = &mut table[i];
        if !t.filled {
            *t = Token {
                hash,
                chunk: 0,
                asked: 0,
                filled: true,
            };
            used.push(i);
            return i;
        }
        if t.hash == hash {
            return i;
        }
        i = (i + 1) & mask;
    }
}

/// The hashes of the content tokens of a split text, in order, repeats kept.
fn token_hashes(words: &Words) -> impl Iterator<Item = u64> + '_ {
    words.iter().filter_map(|word| {
        content_stem(&word).map(|stem| word.hash_prefix(TOKEN_STATE, stem.len()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rare_tokens_weigh_more() {
        let mut df = DocFrequency::new();
        // "python" is in every chunk seen, "pickle" in none.
        for _ in 0..50 {
            retrieval_coverage("", &["Python code runs everywhere"], &mut df);
        }
        let only_common =
            retrieval_coverage("python pickle", &["Python lists and tuples"], &mut df).unwrap();
        let only_rare =
            retrieval_coverage("python pickle", &["the pickle module saves"], &mut df).unwrap();
        assert!(only_rare > 0.7, "{only_rare}");
        assert!(only_common < 0.3, "{only_common}");
    }

    #[test]
    fn cold_sketch_is_the_plain_share_and_no_tokens_is_none() {
        let mut df = DocFrequency::new();
        let c = retrieval_coverage("reset password email", &["send the reset email"], &mut df);
        assert!((c.unwrap() - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(retrieval_coverage("the of and", &["x"], &mut df), None);
    }

    #[test]
    fn the_sketch_stays_bounded_and_forgets() {
        let mut df = DocFrequency::new();
        for i in 0..(3 * HALF_LIFE_DOCS) {
            retrieval_coverage("", &[&format!("token{i} common words")], &mut df);
        }
        assert!(df.docs() < HALF_LIFE_DOCS);
        assert_eq!(df.counts.len(), WIDTH * ROWS);
    }
}
