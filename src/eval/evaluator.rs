//! What a worker (and `cmd eval`, on a gold set) runs per exchange: the extractor and the embedder the
//! config asks for, swapped as a whole on reload, and the scoring of extracted pieces into ΔS (on the
//! embedder's calibrated scale), coverage and retrieval coverage.

use std::sync::{Arc, Mutex};

use crate::config::{EmbedderKind, LocalEmbedder, Signals as SignalsConfig};
use crate::signals::embed::Embedder;
use crate::signals::exchange::{self, Texts};
use crate::signals::extract::{Extracted, Extractor};
use crate::signals::retrieval::DocFrequency;
use crate::signals::EvalError;

/// What the workers need, swapped as a whole on reload.
pub struct Evaluator {
    pub extractor: Extractor,
    pub embedder: Arc<dyn Embedder>,
    /// The `local` model's settings, so a reload that keeps them keeps the loaded model.
    local: Option<LocalEmbedder>,
}

impl Evaluator {
    pub fn from_config(config: &SignalsConfig) -> Result<Evaluator, EvalError> {
        Evaluator::reusing(config, None)
    }

    /// Like [`Evaluator::from_config`], but keeps `previous`'s local model when its settings did not
    /// change: loading one reads and checks ~100 MB.
    pub(super) fn reusing(
        config: &SignalsConfig,
        previous: Option<&Evaluator>,
    ) -> Result<Evaluator, EvalError> {
        let local = (config.embedder == EmbedderKind::Local).then(|| config.local.clone());
        let embedder = match previous {
            Some(p) if local.is_some() && p.local == local => p.embedder.clone(),
            _ => crate::signals::embedder(config)?,
        };
        Ok(Evaluator {
            extractor: Extractor::new(
                &config.question,
                &config.retrieved,
                &config.answer,
                &config.anchor,
            )?,
            embedder,
            local,
        })
    }
}

/// Signals of one exchange, before they are attributed to an arm.
#[derive(Debug, Clone)]
pub struct Scored {
    pub delta_s_qr: f64,
    pub delta_s_ra: f64,
    pub delta_s: f64,
    pub coverage: Option<f64>,
    /// IDF-weighted share of the question's content tokens found in the chunks.
    pub retrieval_coverage: Option<f64>,
}

impl Evaluator {
    /// Embeds and measures extracted pieces. The anchor defaults to the answer. `df` is the document
    /// frequency sketch of the arm the exchange went to (locked only while retrieval coverage is
    /// measured, not while embedding).
    pub fn score(&self, e: &Extracted, df: &Mutex<DocFrequency>) -> Result<Scored, EvalError> {
        let texts = Texts {
            question: e.question.as_deref().unwrap_or_default(),
            chunks: &e.chunks,
            answer: e.answer.as_deref().unwrap_or_default(),
            anchor: e.anchor.as_deref(),
        };
        let measured = exchange::measure(self.embedder.as_ref(), texts, df)?;
        let ds = measured
            .delta_s
            .calibrated(|probe, raw| self.embedder.calibrate(probe, raw));
        Ok(Scored {
            retrieval_coverage: measured.retrieval_coverage,
            delta_s_qr: ds.qr,
            delta_s_ra: ds.ra,
            delta_s: ds.max,
            coverage: measured.coverage,
        })
    }
}
