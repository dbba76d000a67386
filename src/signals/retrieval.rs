//! Retrieval coverage (SPEC §3): the share of the question's distinct content tokens found in the
//! retrieved chunks, each token weighted by its inverse document frequency over recent chunks, so that
//! rare tokens — names, identifiers, numbers spelled out — count more than words every passage has.
//! A lexical signal of "did the retriever fetch what was asked" that needs no model.
//!
//! The document frequencies live in a [`DocFrequency`] sketch: a count-min sketch of fixed size whose
//! counts halve every [`HALF_LIFE_DOCS`] chunks, so it follows the recent corpus in bounded memory. The
//! evaluation workers keep one per arm (an arm's index is what is being judged) and call
//! [`retrieval_coverage`] with it; `eval --gold` keeps one for the run.

use std::collections::HashSet;

use super::embed::{hash_bytes, mix};
use super::measure::content_tokens;

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
    fn add(&mut self, tokens: &HashSet<u64>) {
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

fn token_hashes(text: &str) -> HashSet<u64> {
    content_tokens(text)
        .map(|t| hash_bytes(TOKEN_STATE, t.as_bytes()))
        .collect()
}

/// Retrieval coverage of one exchange: Σ idf of the question's distinct content tokens (stemmed, as
/// coverage tokenizes) found in any chunk / Σ idf of all of them, with the frequencies `df` held
/// before this exchange; then the chunks are counted into `df`. `None` when the question has no
/// content tokens (the sample is not counted).
pub fn retrieval_coverage(question: &str, chunks: &[&str], df: &mut DocFrequency) -> Option<f64> {
    let asked = token_hashes(question);
    let per_chunk: Vec<HashSet<u64>> = chunks.iter().map(|c| token_hashes(c)).collect();
    let coverage = (!asked.is_empty()).then(|| {
        let (mut found, mut total) = (0.0, 0.0);
        for &hash in &asked {
            let w = df.idf(hash);
            total += w;
            if per_chunk.iter().any(|c| c.contains(&hash)) {
                found += w;
            }
        }
        found / total
    });
    for chunk in &per_chunk {
        df.add(chunk);
    }
    coverage
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
