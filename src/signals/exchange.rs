//! The measures of one exchange together (SPEC §3: the ΔS probes, coverage, retrieval coverage), with
//! each text split into words once: the `hashed` embedder, coverage and retrieval coverage all read
//! the same [`Words`], and the vectors go to per-thread buffers, so that an evaluation allocates
//! nothing once the buffers have grown. Called by `eval`'s evaluator, on the evaluation threads and in
//! `eval --gold`.

use std::cell::RefCell;
use std::sync::Mutex;

use super::embed::{normalise, Embedder, Words, DIMS};
use super::measure::{self, coverage_of_words, delta_s, DeltaS};
use super::retrieval::{retrieval_coverage_of_words, DocFrequency};
use super::EvalError;

/// The texts of one exchange, as extracted.
#[derive(Debug, Clone, Copy)]
pub struct Texts<'a> {
    pub question: &'a str,
    pub chunks: &'a [String],
    pub answer: &'a str,
    /// The gold anchor; `None` means the answer.
    pub anchor: Option<&'a str>,
}

/// The measures of one exchange; ΔS on the embedder's own scale (not calibrated).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub delta_s: DeltaS,
    pub coverage: Option<f64>,
    pub retrieval_coverage: Option<f64>,
}

thread_local! {
    /// Per-thread buffers of [`measure`].
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Default)]
struct Scratch {
    question: Words,
    chunks: Vec<Words>,
    answer: Words,
    anchor: Words,
    /// The vectors of the `hashed` path: the question, the anchor, the chunk being embedded and the
    /// sum of the chunks (then their centroid).
    vectors: [Vec<f32>; 4],
}

/// Measures one exchange. `df` is the document-frequency sketch of the exchange's arm, locked only
/// while retrieval coverage is measured.
pub fn measure(
    embedder: &dyn Embedder,
    texts: Texts,
    df: &Mutex<DocFrequency>,
) -> Result<Measured, EvalError> {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => scratch.measure(embedder, texts, df),
        // Unreachable (measuring never re-enters), but costs nothing to survive.
        Err(_) => Scratch::default().measure(embedder, texts, df),
    })
}

impl Scratch {
    fn measure(
        &mut self,
        embedder: &dyn Embedder,
        texts: Texts,
        df: &Mutex<DocFrequency>,
    ) -> Result<Measured, EvalError> {
        self.question.split(texts.question);
        if self.chunks.len() < texts.chunks.len() {
            self.chunks.resize_with(texts.chunks.len(), Words::default);
        }
        for (words, chunk) in self.chunks.iter_mut().zip(texts.chunks) {
            words.split(chunk);
        }
        let chunks = self.chunks.get(..texts.chunks.len()).unwrap_or_default();
        self.answer.split(texts.answer);
        let anchor = match texts.anchor {
            Some(anchor) => {
                self.anchor.split(anchor);
                &self.anchor
            }
            None => &self.answer,
        };

        let delta_s = match embedder.hashed() {
            Some(hashed) => {
                let [question, anchor_vector, chunk, centroid] = &mut self.vectors;
                for v in [
                    &mut *question,
                    &mut *anchor_vector,
                    &mut *chunk,
                    &mut *centroid,
                ] {
                    v.resize(DIMS, 0.0);
                }
                hashed.vector_of(&self.question, question);
                hashed.vector_of(anchor, anchor_vector);
                // The centroid as `embed::centroid` makes it: the chunk vectors summed in order,
                // then normalised.
                centroid.fill(0.0);
                for words in chunks {
                    hashed.vector_of(words, chunk);
                    for (s, &x) in centroid.iter_mut().zip(chunk.iter()) {
                        *s += x;
                    }
                }
                normalise(centroid);
                let qr = delta_s(question, centroid);
                let ra = delta_s(centroid, anchor_vector);
                DeltaS {
                    qr,
                    ra,
                    max: qr.max(ra),
                }
            }
            None => {
                let mut all: Vec<&str> = Vec::with_capacity(texts.chunks.len() + 2);
                all.push(texts.question);
                all.extend(texts.chunks.iter().map(String::as_str));
                all.push(texts.anchor.unwrap_or(texts.answer));
                let vectors = embedder.embed_batch(&all)?;
                let (q, rest) = vectors
                    .split_first()
                    .ok_or(EvalError::Setup("the embedder returned no vectors".into()))?;
                let (a, chunk_vectors) = rest.split_last().ok_or(EvalError::Setup(
                    "the embedder returned too few vectors".into(),
                ))?;
                measure::delta_s_probes(q, chunk_vectors, a)
            }
        };

        let coverage = coverage_of_words(&self.answer, chunks);
        let retrieval_coverage = {
            let mut df = df.lock().unwrap_or_else(|p| p.into_inner());
            retrieval_coverage_of_words(&self.question, chunks, &mut df)
        };
        Ok(Measured {
            delta_s,
            coverage,
            retrieval_coverage,
        })
    }
}
