//! Signals: the pure measures of each answer — ΔS, coverage, λ, tool loops (SPEC §3) — that the
//! evaluation workers (`eval`) compute off the request path from the teed bodies.
//!
//! [`extract`] finds the question, chunks and answer in the bodies, [`usage`] reads the token usage
//! (for extraction and for the budget in `guards`), [`embed`] turns text into vectors (`hashed` built in,
//! `openai` for a remote endpoint, `local` for a model run in process), [`measure`] holds the SPEC
//! definitions, [`exchange`] runs them all on one exchange's texts split once, [`retrieval`] the IDF-weighted retrieval coverage and its bounded document-frequency
//! sketch, and [`priority`] is the CPU priority all signal work runs at.

pub mod embed;
pub mod exchange;
pub mod extract;
pub mod measure;
pub mod priority;
pub mod retrieval;
pub mod usage;

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
    /// The `local` embedder's model folder cannot be used.
    #[error("signals.local.model_dir: {0}")]
    Model(String),
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
            Arc::new(embed::openai::OpenAi::new(
                &o.url,
                &o.model,
                o.timeout.0,
                api_key,
                o.cache_entries,
                &o.trust,
            )?)
        }
        EmbedderKind::Local => local(config)?,
    })
}

#[cfg(feature = "local-embedder")]
fn local(config: &SignalsConfig) -> Result<Arc<dyn Embedder>, EvalError> {
    let l = &config.local;
    let model = embed::local::Local::load(
        std::path::Path::new(&l.model_dir),
        l.max_tokens,
        l.cache_entries,
    )
    .map_err(|e| EvalError::Model(e.to_string()))?;
    tracing::info!(
        model_dir = l.model_dir.as_str(),
        dims = model.dims(),
        pooling = ?model.pooling(),
        max_tokens = model.max_tokens(),
        "local embedding model loaded"
    );
    Ok(Arc::new(model))
}

#[cfg(not(feature = "local-embedder"))]
fn local(_: &SignalsConfig) -> Result<Arc<dyn Embedder>, EvalError> {
    Err(EvalError::Model(
        "this driftguard was built without the cargo feature local-embedder".into(),
    ))
}
