//! The BERT encoder behind the `local` embedder ([`super::local`]): the forward pass of a
//! sentence-transformers BERT (MiniLM, BGE-small, …) on candle's CPU backend, inference only.
//!
//! Written out here rather than taken from candle-transformers: the whole of that crate (80k lines of
//! models) would be compiled for these 150, and every weight is fetched through [`VarBuilder`], so a
//! weight missing from `model.safetensors` or of another shape than `config.json` says is an error at
//! load time, never a panic at evaluation time.

mod attention;
mod int8;
mod simd;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use int8::{Epilogue, Int8Linear};

/// How the linear layers compute: [`Precision::Int8`] where the CPU has AVX-512 VNNI (see
/// [`int8`]), else f32; [`Precision::F32`] always f32 (the reference the int8 vectors are held to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Int8,
    F32,
}

impl Precision {
    /// What `signals.embedder = "local"` runs: int8 in optimised builds. Debug builds keep f32: there
    /// the int8 kernel's intrinsics become function calls and it is slower than candle's f32
    /// products, which Cargo.toml optimises even in dev builds.
    pub const DEFAULT: Precision = if cfg!(debug_assertions) {
        Precision::F32
    } else {
        Precision::Int8
    };
}

/// The fields of a Hugging Face `config.json` the encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn gelu() -> String {
    "gelu".into()
}
fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}

/// Added to the attention scores of padding positions: their softmax weight becomes exactly 0, so a
/// text embeds the same alone and padded in a batch.
const MASKED: f64 = -1e9;

pub struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    /// The activation after the intermediate layer.
    gelu: Epilogue,
    /// Softmax and layer norms in AVX-512 ([`simd`]), with the int8 products.
    fast: bool,
}

struct Layer {
    /// Query, key and value as one product (hidden → 3 · hidden): one pass over the activations, and
    /// the query's columns pre-scaled by 1 / √head_size.
    qkv: Dense,
    attention_out: Dense,
    attention_norm: AddNorm,
    intermediate: Dense,
    output: Dense,
    output_norm: AddNorm,
    heads: usize,
    head_size: usize,
}

// === impl Bert ===

impl Bert {
    /// Fetches every weight `config` implies from `vb`; the weights may sit under a `bert.` prefix.
    pub fn load(vb: VarBuilder, config: &BertConfig, precision: Precision) -> Result<Bert> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let gelu = match config.hidden_act.as_str() {
            "gelu" => Epilogue::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" => Epilogue::GeluTanh,
            other => candle_core::bail!("hidden_act {other:?} is not supported (gelu, gelu_new)"),
        };
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            candle_core::bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size,
                config.num_attention_heads
            );
        }
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let fast = precision == Precision::Int8 && int8::available();
        let dense =
            |inp: usize, out: usize, vb: VarBuilder| Dense::new(linear(inp, out, vb)?, precision);
        let norm = |vb: VarBuilder| AddNorm::new(layer_norm(h, eps, vb)?, eps, fast);
        let e = vb.pp("embeddings");
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let a = l.pp("attention");
                Ok(Layer {
                    qkv: fused_qkv(h, h / config.num_attention_heads, &a, precision)?,
                    attention_out: dense(h, h, a.pp("output.dense"))?,
                    attention_norm: norm(a.pp("output.LayerNorm"))?,
                    intermediate: dense(h, config.intermediate_size, l.pp("intermediate.dense"))?,
                    output: dense(config.intermediate_size, h, l.pp("output.dense"))?,
                    output_norm: norm(l.pp("output.LayerNorm"))?,
                    heads: config.num_attention_heads,
                    head_size: h / config.num_attention_heads,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Bert {
            word: embedding(config.vocab_size, h, e.pp("word_embeddings"))?,
            position: embedding(
                config.max_position_embeddings,
                h,
                e.pp("position_embeddings"),
            )?,
            token_type: embedding(config.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            embeddings_norm: layer_norm(h, eps, e.pp("LayerNorm"))?,
            layers,
            gelu,
            fast,
        })
    }

    /// The last hidden states `(batch, seq, hidden)` of `ids` `(batch, seq)`, with `mask` `(batch,
    /// seq)` 1 for tokens and 0 for padding.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (_, seq) = ids.dims2()?;
        let positions = Tensor::arange(0u32, seq as u32, ids.device())?;
        let types = ids.zeros_like()?;
        let x = self
            .word
            .forward(ids)?
            .add(&self.token_type.forward(&types)?)?
            .broadcast_add(&self.position.forward(&positions)?)?;
        let mut x = self.embeddings_norm.forward(&x)?;
        // (batch, 1, 1, seq): 0 where attended, MASKED on padding.
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * -MASKED)?
            .unsqueeze(1)?
            .unsqueeze(1)?;
        for layer in &self.layers {
            x = layer.forward(&x, &bias, self.gelu, self.fast)?;
            // A forward pass takes milliseconds: yielding per layer keeps a runnable proxy thread from
            // waiting on it for a whole scheduler tick (see `yield_to_traffic`).
            crate::signals::priority::yield_to_traffic();
        }
        Ok(x)
    }
}

// === impl Layer ===

impl Layer {
    fn forward(&self, x: &Tensor, bias: &Tensor, gelu: Epilogue, fast: bool) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        let context = if fast && attention::supports(self.head_size) {
            attention::attention(&qkv, bias, self.heads, self.head_size)?
        } else {
            self.attention(&qkv, bias, fast)?
        };
        let attended = self
            .attention_norm
            .forward(&self.attention_out.forward(&context)?, x)?;
        let inner = self.intermediate.forward_then(&attended, gelu)?;
        self.output_norm
            .forward(&self.output.forward(&inner)?, &attended)
    }

    /// Self-attention with candle's operations: `qkv` `(batch, seq, 3 · hidden)` → the context
    /// `(batch, seq, hidden)`.
    fn attention(&self, qkv: &Tensor, bias: &Tensor, fast: bool) -> Result<Tensor> {
        let (batch, seq, width) = qkv.dims3()?;
        let hidden = width / 3;
        // (batch, seq, 3 · hidden) → (3, batch, heads, seq, head_size) in one copy.
        let qkv = qkv
            .reshape((batch, seq, 3, self.heads, self.head_size))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let scores = q.matmul(&k.t()?)?;
        let weights = if fast {
            simd::masked_softmax(&scores, bias)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores.broadcast_add(bias)?)?
        };
        weights
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch, seq, hidden))
    }
}

/// The query, key and value layers under `attention` stacked into one, the query's weights and bias
/// multiplied by 1 / √head_size (the scaling of the scores, done once at load).
fn fused_qkv(h: usize, head_size: usize, a: &VarBuilder, precision: Precision) -> Result<Dense> {
    let scale = 1.0 / (head_size as f64).sqrt();
    let q = linear(h, h, a.pp("self.query"))?;
    let k = linear(h, h, a.pp("self.key"))?;
    let v = linear(h, h, a.pp("self.value"))?;
    let bias = |l: &Linear| match l.bias() {
        Some(b) => Ok(b.clone()),
        None => Tensor::zeros(h, DType::F32, l.weight().device()),
    };
    let weight = Tensor::cat(&[&(q.weight() * scale)?, k.weight(), v.weight()], 0)?;
    let bias = Tensor::cat(&[&(bias(&q)? * scale)?, &bias(&k)?, &bias(&v)?], 0)?;
    Dense::new(Linear::new(weight, Some(bias)), precision)
}

/// One linear layer, int8 where the CPU and [`Precision`] allow it.
enum Dense {
    F32(Linear),
    Int8(Int8Linear),
}

impl Dense {
    fn new(linear: Linear, precision: Precision) -> Result<Dense> {
        if precision == Precision::Int8 {
            if let Some(q) = Int8Linear::new(linear.weight(), linear.bias())? {
                return Ok(Dense::Int8(q));
            }
        }
        Ok(Dense::F32(linear))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_then(x, Epilogue::None)
    }

    /// The layer, then `epilogue` (fused into the int8 product's output).
    fn forward_then(&self, x: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
        match self {
            Dense::Int8(q) => q.forward_then(x, epilogue),
            Dense::F32(l) => {
                let y = l.forward(x)?;
                match epilogue {
                    Epilogue::None => Ok(y),
                    Epilogue::GeluErf => y.gelu_erf(),
                    Epilogue::GeluTanh => y.gelu(),
                }
            }
        }
    }
}

/// `layer_norm(x + residual)`: candle's operations, or one AVX-512 pass with the int8 layers.
enum AddNorm {
    Candle(LayerNorm),
    Simd(simd::Norm),
}

impl AddNorm {
    fn new(norm: LayerNorm, eps: f64, fast: bool) -> Result<AddNorm> {
        Ok(if fast {
            AddNorm::Simd(simd::Norm::new(&norm, eps)?)
        } else {
            AddNorm::Candle(norm)
        })
    }

    fn forward(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self {
            AddNorm::Candle(norm) => norm.forward(&(x + residual)?),
            AddNorm::Simd(norm) => simd::add_layer_norm(x, residual, norm),
        }
    }
}

/// Mean of the hidden states over the real tokens: `(batch, seq, hidden)` → `(batch, hidden)`.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1.0, f64::MAX)?;
    summed.broadcast_div(&counts)
}

/// The hidden state of the first token (`[CLS]`): `(batch, seq, hidden)` → `(batch, hidden)`.
pub fn cls_pool(hidden: &Tensor) -> Result<Tensor> {
    hidden.narrow(1, 0, 1)?.squeeze(1)
}
