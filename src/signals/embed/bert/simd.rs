//! The element-wise and row-wise steps of the int8 encoder path in AVX-512, next to the int8 products
//! of [`super::int8`]: with those products fast, candle's scalar `erf`/`exp` (GELU, softmax), the
//! activation quantisation and the layer norms were most of a forward pass.
//!
//! Used only where [`super::int8::available`] holds (the layer built as [`super::Dense::Int8`]
//! says so); the f32 reference path keeps candle's operations. The approximations: `exp` to ~2 ulp
//! (degree-6 polynomial after range reduction), `erf` to 1.5e-7 absolute (Abramowitz & Stegun
//! 7.1.26) — both far below the int8 products' own rounding.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `softmax(scores + bias)` over the last dimension of `scores` `(batch, heads, seq, seq)`, with
/// `bias` `(batch, 1, 1, seq)`: 0 on tokens, a large negative number on padding, whose weight comes
/// out exactly 0.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor) -> Result<Tensor> {
    scores.apply_op2_no_bwd(bias, &MaskedSoftmax)
}

/// `layer_norm(x + residual)` over the last dimension, `x` and `residual` of the same shape.
pub fn add_layer_norm(x: &Tensor, residual: &Tensor, norm: &Norm) -> Result<Tensor> {
    x.apply_op2_no_bwd(residual, norm)
}

struct MaskedSoftmax;

/// A layer norm's weight and bias, unpacked from candle's [`candle_nn::LayerNorm`] at load.
pub struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl Norm {
    pub fn new(norm: &candle_nn::LayerNorm, eps: f64) -> Result<Norm> {
        let weight = norm.weight().to_vec1::<f32>()?;
        let bias = match norm.bias() {
            Some(b) => b.to_vec1::<f32>()?,
            None => vec![0.0; weight.len()],
        };
        Ok(Norm {
            weight,
            bias,
            eps: eps as f32,
        })
    }
}

pub fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: f32 input expected");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: input is not contiguous");
    };
    Ok(&data[start..end])
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let scores = contiguous(s1, l1, self.name())?;
        let bias = contiguous(s2, l2, self.name())?;
        let (batch, heads, rows, seq) = l1.shape().dims4()?;
        if l2.shape().dims4()? != (batch, 1, 1, seq) {
            bail!(
                "masked-softmax: bias {:?} for scores {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        let mut out = scores.to_vec();
        let per_text = heads * rows * seq;
        for (b, text) in out.chunks_exact_mut(per_text).enumerate() {
            let bias = &bias[b * seq..(b + 1) * seq];
            for row in text.chunks_exact_mut(seq) {
                softmax_row(row, bias)?;
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

impl CustomOp2 for Norm {
    fn name(&self) -> &'static str {
        "add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, self.name())?;
        let residual = contiguous(s2, l2, self.name())?;
        let width = self.weight.len();
        if l1.shape() != l2.shape() || l1.shape().dims().last() != Some(&width) {
            bail!(
                "add-layer-norm: {:?} + {:?}, norm of {width}",
                l1.shape(),
                l2.shape()
            );
        }
        let mut out = vec![0f32; x.len()];
        for ((out, x), residual) in out
            .chunks_exact_mut(width)
            .zip(x.chunks_exact(width))
            .zip(residual.chunks_exact(width))
        {
            add_layer_norm_row(x, residual, self, out)?;
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

fn softmax_row(row: &mut [f32], bias: &[f32]) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: these ops are only used where `int8::available()` (AVX-512 F, BW, VNNI) holds.
        unsafe { kernels::softmax_row(row, bias) };
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (row, bias);
        bail!("masked-softmax: x86-64 only")
    }
}

fn add_layer_norm_row(x: &[f32], residual: &[f32], norm: &Norm, out: &mut [f32]) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: as for the softmax.
        unsafe { kernels::add_layer_norm_row(x, residual, norm, out) };
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, residual, norm, out);
        bail!("add-layer-norm: x86-64 only")
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod kernels {
    use std::arch::x86_64::*;

    use super::Norm;

    /// Below this, `exp` is taken as exactly 0 (the true value is under 1.7e-38): padding weights in
    /// the softmax come out 0, not merely tiny.
    const EXP_MIN: f32 = -87.0;

    /// `e^x` of 16 lanes: `x = n · ln 2 + r`, `|r| ≤ ln 2 / 2`, `e^r` by its Taylor polynomial to r⁶
    /// (relative error ~2e-7), scaled by `2^n`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn exp(x: __m512) -> __m512 {
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(EXP_MIN));
        let x = _mm512_min_ps(x, _mm512_set1_ps(88.5));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n))
    }

    /// `x · Φ(x) = x / 2 · (1 + erf(x / √2))` of 16 lanes (`hidden_act = "gelu"`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn gelu_erf(x: __m512) -> __m512 {
        // erf(|z|) = 1 - t (a1 + t (a2 + … a5)) e^(-z²), t = 1 / (1 + p |z|).
        let z = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let az = _mm512_abs_ps(z);
        let t = _mm512_div_ps(
            _mm512_set1_ps(1.0),
            _mm512_fmadd_ps(az, _mm512_set1_ps(0.327_591_1), _mm512_set1_ps(1.0)),
        );
        let mut p = _mm512_set1_ps(1.061_405_4);
        for c in [-1.453_152_1, 1.421_413_8, -0.284_496_72, 0.254_829_6] {
            p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c));
        }
        let e = exp(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), az), az));
        let erf_abs = _mm512_fnmadd_ps(_mm512_mul_ps(p, t), e, _mm512_set1_ps(1.0));
        // erf is odd: take the sign of z back.
        let sign = _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(i32::MIN));
        let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs), sign));
        let half_x = _mm512_mul_ps(x, _mm512_set1_ps(0.5));
        _mm512_fmadd_ps(half_x, erf, half_x)
    }

    /// `x / 2 · (1 + tanh(√(2/π) (x + 0.044715 x³)))` of 16 lanes (`gelu_new`), with
    /// `1 + tanh(u) = 2 - 2 / (e^(2u) + 1)`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn gelu_tanh(x: __m512) -> __m512 {
        let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
        let u = _mm512_mul_ps(
            _mm512_fmadd_ps(x3, _mm512_set1_ps(0.044_715), x),
            _mm512_set1_ps(2.0 * 0.797_884_6),
        );
        let e = exp(u);
        let one_plus_tanh = _mm512_sub_ps(
            _mm512_set1_ps(2.0),
            _mm512_div_ps(_mm512_set1_ps(2.0), _mm512_add_ps(e, _mm512_set1_ps(1.0))),
        );
        _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5)), one_plus_tanh)
    }

    /// Lanes `0..n` of `p` (the tail of a row), the rest 0.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load(p: *const f32, n: usize) -> __m512 {
        if n >= 16 {
            _mm512_loadu_ps(p)
        } else {
            _mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, p)
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store(p: *mut f32, v: __m512, n: usize) {
        if n >= 16 {
            _mm512_storeu_ps(p, v)
        } else {
            _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as u16, v)
        }
    }

    /// `row = softmax(row + bias)` in place.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_row(row: &mut [f32], bias: &[f32]) {
        let n = row.len().min(bias.len());
        let (r, b) = (row.as_mut_ptr(), bias.as_ptr());
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..n).step_by(16) {
            let v = _mm512_add_ps(load(r.add(i), n - i), load(b.add(i), n - i));
            let lanes = ((1u32 << (n - i).min(16)) - 1) as u16;
            max = _mm512_mask_max_ps(max, lanes, max, v);
            store(r.add(i), v, n - i);
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
        let mut sum = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            let e = exp(_mm512_sub_ps(load(r.add(i), n - i), max));
            let lanes = ((1u32 << (n - i).min(16)) - 1) as u16;
            sum = _mm512_mask_add_ps(sum, lanes, sum, e);
            store(r.add(i), e, n - i);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for i in (0..n).step_by(16) {
            store(r.add(i), _mm512_mul_ps(load(r.add(i), n - i), inv), n - i);
        }
    }

    /// `out = layer_norm(x + residual)` of one row.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn add_layer_norm_row(x: &[f32], residual: &[f32], norm: &Norm, out: &mut [f32]) {
        let n = out.len();
        let (xp, rp, op) = (x.as_ptr(), residual.as_ptr(), out.as_mut_ptr());
        let mut sum = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            let v = _mm512_add_ps(load(xp.add(i), n - i), load(rp.add(i), n - i));
            sum = _mm512_add_ps(sum, v);
            store(op.add(i), v, n - i);
        }
        let mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / n as f32);
        // Variance around the mean (two passes: the sum of squares minus the squared mean loses
        // digits when the mean is large).
        let mut squares = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            let lanes = ((1u32 << (n - i).min(16)) - 1) as u16;
            let d = _mm512_maskz_sub_ps(lanes, load(op.add(i), n - i), mean);
            squares = _mm512_fmadd_ps(d, d, squares);
        }
        let var = _mm512_reduce_add_ps(squares) / n as f32;
        let inv = _mm512_set1_ps(1.0 / (var + norm.eps).sqrt());
        let (w, b) = (norm.weight.as_ptr(), norm.bias.as_ptr());
        for i in (0..n).step_by(16) {
            let d = _mm512_mul_ps(_mm512_sub_ps(load(op.add(i), n - i), mean), inv);
            let v = _mm512_fmadd_ps(d, load(w.add(i), n - i), load(b.add(i), n - i));
            store(op.add(i), v, n - i);
        }
    }

    /// Each row of `x` (`inp` wide) → `acts` row (`inp4` wide) of `round(x / scale) + 128`, and the
    /// row's scale (`max |x| / 127`) in `scales`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_rows(
        x: &[f32],
        inp: usize,
        inp4: usize,
        acts: &mut [u8],
        scales: &mut [f32],
    ) {
        for (r, row) in x.chunks_exact(inp).enumerate() {
            let p = row.as_ptr();
            let mut max = _mm512_setzero_ps();
            for i in (0..inp).step_by(16) {
                max = _mm512_max_ps(max, _mm512_abs_ps(load(p.add(i), inp - i)));
            }
            let max = _mm512_reduce_max_ps(max);
            scales[r] = max / 127.0;
            let inv = _mm512_set1_ps(if max > 0.0 { 127.0 / max } else { 0.0 });
            let offset = _mm512_set1_epi32(128);
            let a = acts.as_mut_ptr().add(r * inp4);
            for i in (0..inp).step_by(16) {
                let q = _mm512_cvtps_epi32(_mm512_mul_ps(load(p.add(i), inp - i), inv));
                let bytes = _mm512_cvtepi32_epi8(_mm512_add_epi32(q, offset));
                let n = (inp - i).min(16);
                if n == 16 {
                    _mm_storeu_si128(a.add(i).cast(), bytes);
                } else {
                    let mut tail = [0u8; 16];
                    _mm_storeu_si128(tail.as_mut_ptr().cast(), bytes);
                    std::ptr::copy_nonoverlapping(tail.as_ptr(), a.add(i), n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
