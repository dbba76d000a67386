//! Self-attention of the int8 encoder path in one AVX-512 pass: from the fused query/key/value
//! product `(batch, seq, 3 · hidden)` straight to the context `(batch, seq, hidden)`.
//!
//! candle's route (permute and copy into heads, a batched f32 product per head on its AVX2 kernel,
//! bias, softmax, a second product, transpose and copy back) cost as much as a fifth of a forward pass
//! once the linear layers ran in int8. Here each head's keys are transposed once into a small buffer,
//! four query rows at a time get their scores, softmax ([`super::simd`]) and weighted sum of the
//! values while they are in L1, and the result is written where the next layer reads it.
//!
//! Built only with the int8 layers ([`super::Layer`] decides) and for head sizes of 16, 32, 48 or
//! 64 (MiniLM and BGE-small have 32); anything else keeps candle's route.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Whether [`attention`] handles heads of `head_size`.
pub fn supports(head_size: usize) -> bool {
    matches!(head_size, 16 | 32 | 48 | 64)
}

/// `softmax(q · kᵀ + bias) · v` per head, `qkv` `(batch, seq, 3 · heads · head_size)` (query columns
/// already scaled by 1 / √head_size), `bias` `(batch, 1, 1, seq)` → `(batch, seq, heads · head_size)`.
pub fn attention(qkv: &Tensor, bias: &Tensor, heads: usize, head_size: usize) -> Result<Tensor> {
    qkv.apply_op2_no_bwd(bias, &Attention { heads, head_size })
}

struct Attention {
    heads: usize,
    head_size: usize,
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let qkv = super::simd::contiguous(s1, l1, self.name())?;
        let bias = super::simd::contiguous(s2, l2, self.name())?;
        let (batch, seq, width) = l1.shape().dims3()?;
        let hidden = self.heads * self.head_size;
        if width != 3 * hidden || !supports(self.head_size) {
            bail!(
                "attention: {:?} for {} heads of {}",
                l1.shape(),
                self.heads,
                self.head_size
            );
        }
        if l2.shape().dims4()? != (batch, 1, 1, seq) {
            bail!("attention: bias {:?} for {:?}", l2.shape(), l1.shape());
        }
        // Not zeroed first: the kernel writes every element of every text.
        let mut out = Vec::<f32>::with_capacity(batch * seq * hidden);
        #[cfg(target_arch = "x86_64")]
        {
            let shape = kernels::Shape {
                seq,
                heads: self.heads,
                head: self.head_size,
            };
            for (b, (qkv, bias)) in qkv
                .chunks_exact(seq * width)
                .zip(bias.chunks_exact(seq))
                .enumerate()
            {
                // SAFETY: built only with the int8 layers, i.e. where `int8::available()` (AVX-512)
                // holds; the buffers have the sizes checked above; `text` stores all `seq · hidden`
                // values of its text (every row block of every head).
                unsafe { kernels::text(qkv, bias, shape, out.as_mut_ptr().add(b * seq * hidden)) };
            }
            // SAFETY: every text's values were written just above.
            unsafe { out.set_len(batch * seq * hidden) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        bail!("attention: x86-64 only");
        Ok((CpuStorage::F32(out), Shape::from((batch, seq, hidden))))
    }
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use std::arch::x86_64::*;

    use super::super::simd::kernels::softmax_row;

    /// Query rows per block: 4 rows × 4 vectors of scores (or of values) in registers.
    const R: usize = 4;

    #[derive(Clone, Copy)]
    pub struct Shape {
        pub seq: usize,
        pub heads: usize,
        pub head: usize,
    }

    /// One text: `qkv` (seq × 3 · hidden) → `out` (seq × hidden, every element written).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn text(qkv: &[f32], bias: &[f32], s: Shape, out: *mut f32) {
        let hidden = s.heads * s.head;
        let stride = 3 * hidden;
        // Keys transposed (head × seq16), rows padded to whole vectors with zeros.
        let seq16 = s.seq.div_ceil(16) * 16;
        let mut kt = vec![0f32; s.head * seq16];
        let mut scores = vec![0f32; R * seq16];
        for h in 0..s.heads {
            for j in 0..s.seq {
                let key = &qkv[j * stride + hidden + h * s.head..][..s.head];
                for (d, k) in key.iter().enumerate() {
                    kt[d * seq16 + j] = *k;
                }
            }
            for i0 in (0..s.seq).step_by(R) {
                let rows = R.min(s.seq - i0);
                // Rows past the end repeat the last one; their results are not used.
                let query = |r: usize| {
                    qkv.as_ptr()
                        .add((i0 + r.min(rows - 1)) * stride + h * s.head)
                };
                let q = [query(0), query(1), query(2), query(3)];
                let mut j0 = 0;
                while j0 < seq16 {
                    match (seq16 - j0) / 16 {
                        1 => scores_block::<1>(q, &kt, seq16, s.head, j0, &mut scores),
                        2 => scores_block::<2>(q, &kt, seq16, s.head, j0, &mut scores),
                        3 => scores_block::<3>(q, &kt, seq16, s.head, j0, &mut scores),
                        _ => scores_block::<4>(q, &kt, seq16, s.head, j0, &mut scores),
                    }
                    j0 += 64;
                }
                for r in 0..rows {
                    softmax_row(&mut scores[r * seq16..r * seq16 + s.seq], bias);
                }
                let values = qkv.as_ptr().add(2 * hidden + h * s.head);
                let dst = out.add(i0 * hidden + h * s.head);
                match s.head / 16 {
                    1 => context::<1>(&scores, seq16, s.seq, values, stride, rows, hidden, dst),
                    2 => context::<2>(&scores, seq16, s.seq, values, stride, rows, hidden, dst),
                    3 => context::<3>(&scores, seq16, s.seq, values, stride, rows, hidden, dst),
                    _ => context::<4>(&scores, seq16, s.seq, values, stride, rows, hidden, dst),
                }
            }
        }
    }

    /// Scores of the R query rows `q` against keys `j0..j0 + 16 · V`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn scores_block<const V: usize>(
        q: [*const f32; R],
        kt: &[f32],
        seq16: usize,
        head: usize,
        j0: usize,
        scores: &mut [f32],
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let k = kt.as_ptr().add(j0);
        for d in 0..head {
            let mut kv = [_mm512_setzero_ps(); V];
            for (v, kv) in kv.iter_mut().enumerate() {
                *kv = _mm512_loadu_ps(k.add(d * seq16 + v * 16));
            }
            for (acc, q) in acc.iter_mut().zip(q) {
                let qd = _mm512_set1_ps(*q.add(d));
                for (acc, kv) in acc.iter_mut().zip(&kv) {
                    *acc = _mm512_fmadd_ps(qd, *kv, *acc);
                }
            }
        }
        let s = scores.as_mut_ptr().add(j0);
        for (r, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(s.add(r * seq16 + v * 16), *acc);
            }
        }
    }

    /// `dst` rows `0..rows` (`hidden` apart) = the weights in `scores` · the values (`stride` apart,
    /// `C` vectors of 16 wide).
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn context<const C: usize>(
        scores: &[f32],
        seq16: usize,
        seq: usize,
        values: *const f32,
        stride: usize,
        rows: usize,
        hidden: usize,
        dst: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let w = scores.as_ptr();
        for j in 0..seq {
            let mut vv = [_mm512_setzero_ps(); C];
            for (c, vv) in vv.iter_mut().enumerate() {
                *vv = _mm512_loadu_ps(values.add(j * stride + c * 16));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let wr = _mm512_set1_ps(*w.add(r * seq16 + j));
                for (acc, vv) in acc.iter_mut().zip(&vv) {
                    *acc = _mm512_fmadd_ps(wr, *vv, *acc);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate().take(rows) {
            for (c, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(dst.add(r * hidden + c * 16), *acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::signals::embed::bert::int8::available;

    /// Against candle's route (the f32 path of [`super::super::Layer`]), with a padded text and a
    /// length that is not a multiple of the 4-row blocks or the 16-wide vectors.
    #[test]
    fn matches_candle_with_padding() {
        if !available() {
            eprintln!("SKIPPED: no AVX-512 VNNI on this CPU");
            return;
        }
        let cpu = &Device::Cpu;
        for (seq, heads, head) in [(37, 3, 32), (5, 2, 16), (70, 2, 64), (16, 1, 48)] {
            let (batch, hidden) = (2, heads * head);
            let values: Vec<f32> = (0..batch * seq * 3 * hidden)
                .map(|i| ((i * 2_654_435_761) % 10_000) as f32 / 5_000.0 - 1.0)
                .collect();
            let qkv = Tensor::from_vec(values, (batch, seq, 3 * hidden), cpu).unwrap();
            let mut bias = vec![0f32; batch * seq];
            bias[seq + seq / 2..].fill(-1e9);
            let bias = Tensor::from_vec(bias, (batch, 1, 1, seq), cpu).unwrap();

            let split = qkv
                .reshape((batch, seq, 3, heads, head))
                .unwrap()
                .permute((2, 0, 3, 1, 4))
                .unwrap()
                .contiguous()
                .unwrap();
            let (q, k, v) = (
                split.get(0).unwrap(),
                split.get(1).unwrap(),
                split.get(2).unwrap(),
            );
            let scores = q
                .matmul(&k.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let weights = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            let want = weights
                .matmul(&v)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((batch, seq, hidden))
                .unwrap();

            let got = attention(&qkv, &bias, heads, head).unwrap();
            assert_eq!(got.dims(), want.dims());
            let (got, want) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "seq {seq}, {heads} × {head}: off by {worst}");
        }
    }
}
