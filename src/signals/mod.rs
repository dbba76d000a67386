//! Signals: the quality of each answer — ΔS, coverage, λ, tool loops (SPEC §3) — computed off the
//! request path from the teed bodies.
//!
//! [`extract`] finds the question, chunks and answer in the bodies, [`embed`] turns text into vectors
//! (`hashed` built in, [`openai`] for a remote endpoint), [`measure`] holds the SPEC definitions, and
//! [`pipeline`] runs it all on worker threads behind a bounded queue.

pub mod embed;
pub mod extract;
pub mod gold;
pub mod measure;
pub mod openai;
pub mod pipeline;

use std::sync::Arc;

use crate::config::{EmbedderKind, Signals as SignalsConfig};
use embed::{EmbedError, Embedder, Hashed};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Extract(#[from] extract::ExtractError),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error("{0}")]
    Setup(String),
}

/// The embedder the config asks for.
pub fn embedder(config: &SignalsConfig) -> Result<Arc<dyn Embedder>, EvalError> {
    Ok(match config.embedder {
        EmbedderKind::Hashed => Arc::new(Hashed),
        EmbedderKind::Openai => {
            let o = &config.openai;
            let api_key = (!o.api_key_env.is_empty())
                .then(|| std::env::var(&o.api_key_env).ok())
                .flatten();
            Arc::new(openai::OpenAi::new(
                &o.url,
                &o.model,
                o.timeout.0,
                api_key,
                o.cache_entries,
            )?)
        }
    })
}
