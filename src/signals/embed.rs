//! Embedders (SPEC §3): text → unit vector, the input of every ΔS probe.
//!
//! The evaluation workers (`eval`) hold one `Arc<dyn Embedder>` chosen by `signals.embedder` (built by
//! `signals::embedder`): [`Hashed`], the built-in default that needs no model (`hashed.rs`), the
//! OpenAI-compatible [`openai`] one, or the in-process `local` model. [`cosine`] and [`centroid`] are
//! the vector operations the measures ([`super::measure`]) build on; `words.rs` holds the word
//! definition the `hashed` embedder and coverage share.

#[cfg(feature = "local-embedder")]
pub mod bert;
pub mod cache;
mod hashed;
#[cfg(feature = "local-embedder")]
pub mod local;
pub mod openai;
mod words;

use std::time::Duration;

pub use super::measure::Probe;
pub use hashed::{features, Hashed, DIMS};
pub(crate) use hashed::{hash_bytes, mix};
pub(crate) use words::{low_bytes, Word, Words};

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

    /// ΔS of `probe` on this embedder's scale → ΔS on the scale SPEC §3's bands are written for
    /// (a semantic embedder's). Monotone, 0 → 0, 1 → 1. Identity unless the embedder says otherwise;
    /// `hashed` maps its lexical scores (see [`Hashed`]).
    fn calibrate(&self, probe: Probe, raw: f64) -> f64 {
        let _ = probe;
        raw
    }

    /// The built-in [`Hashed`] embedder when this is it: the evaluation then embeds the words it
    /// split once for all its measures instead of the texts (same vectors, less work).
    fn hashed(&self) -> Option<Hashed> {
        None
    }

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
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2::cosine_f64(a, b) };
    }
    cosine_lanes(a, b)
}

/// The vector loops below compiled a second time for AVX2 (x86-64 builds target the baseline, SSE2):
/// the same code, so the same operations in the same order and bit-identical results, with twice the
/// lanes per instruction. Rust never fuses a multiply and an add on its own, so no FMA creeps in.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn cosine_f64(a: &[f32], b: &[f32]) -> f64 {
        super::cosine_lanes(a, b)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn normalise(v: &mut [f32]) {
        super::normalise_lanes(v)
    }
}

#[inline(always)]
fn cosine_lanes(a: &[f32], b: &[f32]) -> f64 {
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
#[inline(always)]
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
pub(crate) fn normalise(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2::normalise(v) };
    }
    normalise_lanes(v)
}

#[inline(always)]
fn normalise_lanes(v: &mut [f32]) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors of varied magnitudes and signs, with a remainder past the last full lane block.
    fn vector(seed: u64, len: usize) -> Vec<f32> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = mix(x, 0x9e37_79b9_7f4a_7c15);
                (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_loops_give_the_baseline_bits() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("no AVX2 on this CPU: only the baseline loops run here");
            return;
        }
        for (seed, len) in [(1, DIMS), (2, DIMS), (3, 384), (4, 1027), (5, 7)] {
            let (a, b) = (vector(seed, len), vector(seed + 100, len));
            let mut baseline = a.clone();
            normalise_lanes(&mut baseline);
            let mut wide = a.clone();
            // SAFETY: the CPU has AVX2, checked above.
            unsafe { avx2::normalise(&mut wide) };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&baseline), bits(&wide), "normalise, len {len}");
            // SAFETY: as above.
            let wide = unsafe { avx2::cosine_f64(&a, &b) };
            assert_eq!(
                cosine_lanes(&a, &b).to_bits(),
                wide.to_bits(),
                "cosine, len {len}"
            );
        }
    }
}
