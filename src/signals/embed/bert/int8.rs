//! The linear layers of the BERT encoder ([`super::Bert`]) in 8-bit integers, on x86-64 CPUs with
//! AVX-512 VNNI: ~90 % of a forward pass is these products, and one `vpdpbusd` does 64 multiply-adds
//! where an f32 FMA does 16.
//!
//! Weights are quantised once, at load, per output column (symmetric, scale = max |w| / 127);
//! activations per row on every call (scale = max |x| / 127, stored offset by +128 as the unsigned
//! operand `vpdpbusd` wants; the offset is taken back out with the column sums of the weights).
//! Accumulation is exact in i32 (255 · 127 · 4 per instruction, k ≤ 4096 terms stay far from 2³¹);
//! bias and scales are applied in f32. The sentence vectors stay within a cosine of 0.995 of the f32
//! model's (`tests/local_embedder.rs` holds them to 0.99).
//!
//! Built by [`Int8Linear::new`] only when the CPU has the instructions ([`available`]); elsewhere
//! the encoder keeps candle's f32 [`candle_nn::Linear`].

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

#[cfg(target_arch = "x86_64")]
use super::simd::kernels as simd;

/// Output columns per `vpdpbusd` (16 i32 lanes).
const LANES: usize = 16;
/// Rows of activations per micro-kernel call.
const ROWS: usize = 4;
/// Column tiles of 16 per micro-kernel call: ROWS · TILES accumulators + TILES weights + 1
/// broadcast stay within the 32 zmm registers.
const TILES: usize = 4;

/// Whether this CPU runs the int8 kernels (checked once per load, not per call).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x · Wᵀ + b` with `W` (out, in) quantised to i8.
pub struct Int8Linear {
    out: usize,
    inp: usize,
    /// `inp` rounded up to 4: one `vpdpbusd` consumes 4 bytes per lane.
    inp4: usize,
    /// `[out / 16][inp4 / 4][16][4]`: for each tile of 16 columns, 4 consecutive inputs of each
    /// column side by side, the order `vpdpbusd` multiplies them in.
    packed: Vec<i8>,
    scales: Vec<f32>,
    /// 128 · Σₖ w[j][k]: what the +128 offset of the activations adds to column j.
    offsets: Vec<i32>,
    bias: Vec<f32>,
}

impl Int8Linear {
    /// Quantises `weight` (out, in) and keeps `bias` (out). `None` when the CPU lacks the
    /// instructions or `out` is not a multiple of 16: the caller keeps the f32 layer.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Int8Linear>> {
        let (out, inp) = weight.dims2()?;
        if !available() || out % LANES != 0 || inp == 0 {
            return Ok(None);
        }
        let w = weight.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        let bias = match bias {
            Some(b) => b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?,
            None => vec![0.0; out],
        };
        if bias.len() != out {
            bail!("bias of {} for {out} outputs", bias.len());
        }
        let inp4 = inp.div_ceil(4) * 4;
        let mut packed = vec![0i8; out * inp4];
        let mut scales = Vec::with_capacity(out);
        let mut offsets = Vec::with_capacity(out);
        for (j, row) in w.iter().enumerate() {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
            let (tile, lane) = (j / LANES, j % LANES);
            let mut sum = 0i32;
            for (k, v) in row.iter().enumerate() {
                let q = (v / scale).round().clamp(-127.0, 127.0) as i8;
                sum += i32::from(q);
                packed[tile * inp4 * LANES + (k / 4) * LANES * 4 + lane * 4 + k % 4] = q;
            }
            scales.push(scale);
            offsets.push(128 * sum);
        }
        Ok(Some(Int8Linear {
            out,
            inp,
            inp4,
            packed,
            scales,
            offsets,
            bias,
        }))
    }

    /// `x · Wᵀ + b`, then `epilogue` applied to each output as it leaves the registers.
    pub fn forward_then(&self, x: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
        x.apply_op1_no_bwd(&Op {
            layer: self,
            epilogue,
        })
    }

    /// `rows` rows of `inp` values → `rows` rows of `out` values.
    fn matmul(&self, x: &[f32], rows: usize, epilogue: Epilogue) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        {
            // Rows padded to a multiple of ROWS with zeros (128 once offset), cut off at the end.
            let padded = rows.div_ceil(ROWS) * ROWS;
            let mut acts = vec![128u8; padded * self.inp4];
            let mut act_scales = vec![0f32; padded];
            // Not zeroed first: the kernel writes every element (a memset of up to ~0.8 MB a call).
            let mut dst = Vec::<f32>::with_capacity(padded * self.out);
            // SAFETY: `new` returned Some only if `available()`, so the CPU has the features the
            // kernels are compiled for; every pointer below stays within the buffers sized here, and
            // `matmul` stores all `padded · out` outputs before the length is set.
            unsafe {
                simd::quantize_rows(x, self.inp, self.inp4, &mut acts, &mut act_scales);
                kernels::matmul(self, &acts, &act_scales, padded, epilogue, dst.as_mut_ptr());
                dst.set_len(padded * self.out);
            }
            dst.truncate(rows * self.out);
            dst
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (x, rows, epilogue);
            unreachable!("Int8Linear is only built on x86-64")
        }
    }
}

/// What happens to each output of the product before it is stored: the activation that follows
/// the layer, fused so the values are not read and written a second time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    None,
    /// `x · Φ(x)` with the exact `erf` (`hidden_act = "gelu"`).
    GeluErf,
    /// The `tanh` approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

/// One call: the layer and its epilogue.
struct Op<'a> {
    layer: &'a Int8Linear,
    epilogue: Epilogue,
}

impl CustomOp1 for Op<'_> {
    fn name(&self) -> &'static str {
        "int8-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            bail!("int8-linear: f32 input expected");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("int8-linear: input is not contiguous");
        };
        let l = self.layer;
        let mut dims = layout.shape().dims().to_vec();
        if dims.last() != Some(&l.inp) {
            bail!(
                "int8-linear: input {dims:?}, expected last dimension {}",
                l.inp
            );
        }
        let x = &data[start..end];
        let rows = x.len() / l.inp;
        let dst = l.matmul(x, rows, self.epilogue);
        if let Some(last) = dims.last_mut() {
            *last = l.out;
        }
        Ok((CpuStorage::F32(dst), Shape::from(dims)))
    }
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use std::arch::x86_64::*;

    use super::super::simd::kernels::{gelu_erf, gelu_tanh};
    use super::{Epilogue, Int8Linear, LANES, ROWS, TILES};

    /// `dst` (rows × out, every element written) from the quantised activations; `rows` is a
    /// multiple of ROWS.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn matmul(
        l: &Int8Linear,
        acts: &[u8],
        act_scales: &[f32],
        rows: usize,
        epilogue: Epilogue,
        dst: *mut f32,
    ) {
        let tiles = l.out / LANES;
        let mut t0 = 0;
        // Column tiles outermost: a group's weights stay in cache while every row block passes.
        while t0 < tiles {
            let n = (tiles - t0).min(TILES);
            for r0 in (0..rows).step_by(ROWS) {
                match n {
                    4 => block::<4>(l, acts, act_scales, r0, t0, epilogue, dst),
                    3 => block::<3>(l, acts, act_scales, r0, t0, epilogue, dst),
                    2 => block::<2>(l, acts, act_scales, r0, t0, epilogue, dst),
                    _ => block::<1>(l, acts, act_scales, r0, t0, epilogue, dst),
                }
            }
            t0 += n;
        }
    }

    /// Rows `r0..r0 + ROWS` × column tiles `t0..t0 + T`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn block<const T: usize>(
        l: &Int8Linear,
        acts: &[u8],
        act_scales: &[f32],
        r0: usize,
        t0: usize,
        epilogue: Epilogue,
        dst: *mut f32,
    ) {
        debug_assert!(T <= TILES);
        let a = acts.as_ptr().add(r0 * l.inp4);
        let w = l.packed.as_ptr().add(t0 * l.inp4 * LANES);
        let mut acc = [[_mm512_setzero_si512(); T]; ROWS];
        for g in 0..l.inp4 / 4 {
            let mut wv = [_mm512_setzero_si512(); T];
            for (t, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(w.add(t * l.inp4 * LANES + g * LANES * 4).cast());
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let av =
                    _mm512_set1_epi32(a.add(r * l.inp4 + g * 4).cast::<i32>().read_unaligned());
                for (acc, wv) in acc.iter_mut().zip(&wv) {
                    *acc = _mm512_dpbusd_epi32(*acc, av, *wv);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let row = r0 + r;
            let sx = _mm512_set1_ps(act_scales[row]);
            for (t, acc) in acc.iter().enumerate() {
                let j = (t0 + t) * LANES;
                let offset = _mm512_loadu_si512(l.offsets.as_ptr().add(j).cast());
                let sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(*acc, offset));
                let scale = _mm512_mul_ps(sx, _mm512_loadu_ps(l.scales.as_ptr().add(j)));
                let out = _mm512_fmadd_ps(sum, scale, _mm512_loadu_ps(l.bias.as_ptr().add(j)));
                let out = match epilogue {
                    Epilogue::None => out,
                    Epilogue::GeluErf => gelu_erf(out),
                    Epilogue::GeluTanh => gelu_tanh(out),
                };
                _mm512_storeu_ps(dst.add(row * l.out + j), out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module, Tensor};

    use super::*;

    /// Against candle's f32 layer (and its GELUs) on values with an outlier column, rows not a multiple of ROWS
    /// and columns not a multiple of TILES tiles.
    #[test]
    fn matches_the_f32_layer() {
        if !available() {
            eprintln!("SKIPPED: no AVX-512 VNNI on this CPU");
            return;
        }
        let (rows, inp, out) = (7, 70, 48);
        let value = |i: usize, salt: usize| {
            let h = (i * 2_654_435_761 + salt * 40_503) % 1_000;
            h as f32 / 500.0 - 1.0
        };
        let mut x: Vec<f32> = (0..rows * inp).map(|i| value(i, 1)).collect();
        x[3] = 12.0;
        let w: Vec<f32> = (0..out * inp).map(|i| value(i, 2) * 0.1).collect();
        let b: Vec<f32> = (0..out).map(|i| value(i, 3)).collect();
        let cpu = &Device::Cpu;
        let x = Tensor::from_vec(x, (1, rows, inp), cpu).unwrap();
        let w = Tensor::from_vec(w, (out, inp), cpu).unwrap();
        let b = Tensor::from_vec(b, out, cpu).unwrap();
        let exact = candle_nn::Linear::new(w.clone(), Some(b.clone()))
            .forward(&x)
            .unwrap();
        let q = Int8Linear::new(&w, Some(&b)).unwrap().unwrap();
        for (epilogue, exact) in [
            (Epilogue::None, exact.clone()),
            (Epilogue::GeluErf, exact.gelu_erf().unwrap()),
            (Epilogue::GeluTanh, exact.gelu().unwrap()),
        ] {
            let got = q.forward_then(&x, epilogue).unwrap();
            assert_eq!(got.dims(), &[1, rows, out]);
            let (got, exact) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                exact.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (g, e)) in got.iter().zip(&exact).enumerate() {
                assert!(
                    (g - e).abs() < 0.02 * scale,
                    "{epilogue:?} [{i}]: int8 {g}, f32 {e}"
                );
            }
        }
    }
}
