//! The `local` embedder: a sentence-transformers BERT model folder run in process, on the evaluation
//! threads, with candle's CPU backend — no Python, no server, no download.
//!
//! The folder is what `SentenceTransformer.save()` writes: `config.json`, `model.safetensors`,
//! `tokenizer.json` and `1_Pooling/config.json`. Everything is read and checked by [`Local::load`] —
//! a missing file, bad JSON, or a weight of another shape than `config.json` says is a [`LoadError`]
//! naming the file, at startup, `driftguard check` or reload; a model that loaded then embeds a probe
//! text once, so a model that cannot run is refused there too.
//!
//! Texts are truncated at `max_tokens`, batched by similar length (padding costs as much as tokens),
//! pooled as the pooling config says (mean or `[CLS]`) and L2 normalised. Vectors go through the
//! shared [`VectorCache`], so a chunk retrieved again and again is embedded once.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

pub use crate::signals::embed::bert::Precision;
use crate::signals::embed::bert::{self, Bert, BertConfig};
use crate::signals::embed::cache::VectorCache;
use crate::signals::embed::{EmbedError, Embedder};

/// Texts per forward pass at most.
const MAX_BATCH: usize = 16;
/// A batch grows while its padded size stays under this multiple of its real tokens.
const MAX_PADDING: f64 = 1.25;

/// A model folder that cannot be used, and which file says so.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", file.display())]
pub struct LoadError {
    pub file: PathBuf,
    pub reason: String,
}

fn load_error(file: &Path, reason: impl std::fmt::Display) -> LoadError {
    LoadError {
        file: file.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// How token states become one vector (`1_Pooling/config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
}

pub struct Local {
    model: Bert,
    tokenizer: Tokenizer,
    pooling: Pooling,
    max_tokens: usize,
    dims: usize,
    cache: VectorCache,
}

// === impl Local ===

impl Local {
    /// Loads and checks the model folder `dir`; `max_tokens` truncates every input. The linear
    /// layers run at [`Precision::DEFAULT`] (int8 where the CPU can, in optimised builds).
    pub fn load(dir: &Path, max_tokens: usize, cache_entries: usize) -> Result<Local, LoadError> {
        Local::load_with(dir, max_tokens, cache_entries, Precision::DEFAULT)
    }

    /// [`Local::load`] at the given precision ([`Precision::F32`]: the reference vectors).
    pub fn load_with(
        dir: &Path,
        max_tokens: usize,
        cache_entries: usize,
        precision: Precision,
    ) -> Result<Local, LoadError> {
        // candle hands row-wise work (softmax, layer norm) to rayon's global pool: one thread, at the
        // evaluation threads' low priority, so the model never competes with traffic. An error means
        // the pool exists already (a second load, or an embedding host that built its own).
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "driftguard-embed".into())
            .start_handler(|_| crate::signals::priority::lower_priority())
            .build_global();
        if !dir.is_dir() {
            return Err(load_error(dir, "not a model folder (no such directory)"));
        }
        let config_path = dir.join("config.json");
        let config: BertConfig = read_json(&config_path)?;
        if max_tokens == 0 || max_tokens > config.max_position_embeddings {
            return Err(load_error(
                &config_path,
                format!(
                    "signals.local.max_tokens = {max_tokens} must be between 1 and the model's max_position_embeddings ({})",
                    config.max_position_embeddings
                ),
            ));
        }

        let pooling_path = dir.join("1_Pooling").join("config.json");
        let pooling = read_pooling(&pooling_path, config.hidden_size)?;

        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(load_error(&tokenizer_path, "missing"));
        }
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| load_error(&tokenizer_path, format!("not a tokenizer: {e}")))?;
        // Batches are padded here, to their own longest text; truncation is ours too.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| load_error(&tokenizer_path, e))?;
        let vocab = tokenizer.get_vocab_size(true);
        if vocab > config.vocab_size {
            return Err(load_error(
                &tokenizer_path,
                format!(
                    "{vocab} tokens, but config.json's vocab_size is {}",
                    config.vocab_size
                ),
            ));
        }

        let weights_path = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights_path).map_err(|e| load_error(&weights_path, e))?;
        // Read into memory, not mapped: a file truncated or replaced while mapped would crash the
        // process, while a bad buffer is only an error.
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu)
            .map_err(|e| load_error(&weights_path, format!("not a safetensors file: {e}")))?;
        let model = Bert::load(vb, &config, precision).map_err(|e| {
            load_error(
                &weights_path,
                format!("does not match config.json: {}", first_line(&e)),
            )
        })?;

        let local = Local {
            model,
            tokenizer,
            pooling,
            max_tokens,
            dims: config.hidden_size,
            cache: VectorCache::new(cache_entries),
        };
        // One forward pass now, so a model that cannot run is refused here, not on every sample.
        local
            .compute(&["driftguard checks that the model runs."])
            .map_err(|e| load_error(&weights_path, format!("the model does not run: {e}")))?;
        Ok(local)
    }

    /// Dimensions of the vectors.
    pub fn dims(&self) -> usize {
        self.dims
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Vectors of `texts`, uncached: tokenise, batch by length, encode, pool, normalise.
    fn compute(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut ids: Vec<Vec<u32>> = Vec::with_capacity(texts.len());
        for text in texts {
            let encoding = self
                .tokenizer
                .encode(*text, true)
                .map_err(|e| EmbedError::Model(format!("tokenizer: {e}")))?;
            ids.push(encoding.get_ids().to_vec());
        }
        let mut out = vec![Vec::new(); texts.len()];
        // Texts without a word are the zero vector, as with `hashed`: ΔS against them is 1.
        let mut order: Vec<usize> = (0..texts.len())
            .filter(|&i| {
                if texts[i].trim().is_empty() {
                    out[i] = vec![0.0; self.dims];
                    false
                } else {
                    true
                }
            })
            .collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut start = 0;
        while start < order.len() {
            let mut end = start + 1;
            let mut real = ids[order[start]].len();
            while end < order.len() && end - start < MAX_BATCH {
                let next = ids[order[end]].len();
                // Sorted ascending: the next text sets the padded length.
                if (next * (end - start + 1)) as f64 > MAX_PADDING * (real + next) as f64 {
                    break;
                }
                real += next;
                end += 1;
            }
            let batch = &order[start..end];
            let vectors = self
                .forward(batch.iter().map(|&i| ids[i].as_slice()))
                .map_err(|e| EmbedError::Model(first_line(&e)))?;
            for (&i, v) in batch.iter().zip(vectors) {
                out[i] = v;
            }
            start = end;
        }
        Ok(out)
    }

    fn forward<'a>(
        &self,
        batch: impl ExactSizeIterator<Item = &'a [u32]> + Clone,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let n = batch.len();
        let seq = batch.clone().map(<[u32]>::len).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; n * seq];
        let mut mask = vec![0u32; n * seq];
        for (row, tokens) in batch.enumerate() {
            ids[row * seq..row * seq + tokens.len()].copy_from_slice(tokens);
            mask[row * seq..row * seq + tokens.len()].fill(1);
        }
        let ids = Tensor::from_vec(ids, (n, seq), &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, (n, seq), &Device::Cpu)?;
        let hidden = self.model.forward(&ids, &mask)?;
        let pooled = match self.pooling {
            Pooling::Mean => bert::mean_pool(&hidden, &mask)?,
            Pooling::Cls => bert::cls_pool(&hidden)?,
        };
        let norms = pooled
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        pooled.broadcast_div(&norms)?.to_vec2::<f32>()
    }
}

impl Embedder for Local {
    fn name(&self) -> &'static str {
        "local"
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.cache
            .embed_through(texts, usize::MAX, |batch| self.compute(batch))
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| load_error(path, e))?;
    serde_json::from_str(&text).map_err(|e| load_error(path, format!("bad JSON: {e}")))
}

fn read_pooling(path: &Path, hidden_size: usize) -> Result<Pooling, LoadError> {
    #[derive(serde::Deserialize)]
    struct PoolingConfig {
        word_embedding_dimension: Option<usize>,
        #[serde(default)]
        pooling_mode_cls_token: bool,
        #[serde(default)]
        pooling_mode_mean_tokens: bool,
        #[serde(default)]
        pooling_mode_max_tokens: bool,
        #[serde(default)]
        pooling_mode_mean_sqrt_len_tokens: bool,
    }
    let p: PoolingConfig = read_json(path)?;
    if let Some(dims) = p.word_embedding_dimension.filter(|&d| d != hidden_size) {
        return Err(load_error(
            path,
            format!("word_embedding_dimension {dims} differs from config.json's hidden_size {hidden_size}"),
        ));
    }
    match (
        p.pooling_mode_mean_tokens,
        p.pooling_mode_cls_token,
        p.pooling_mode_max_tokens || p.pooling_mode_mean_sqrt_len_tokens,
    ) {
        (true, false, false) => Ok(Pooling::Mean),
        (false, true, false) => Ok(Pooling::Cls),
        _ => Err(load_error(
            path,
            "exactly one of pooling_mode_mean_tokens and pooling_mode_cls_token must be true (other pooling modes are not supported)",
        )),
    }
}

/// candle errors can carry a backtrace after the message.
fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests;
