//! The AVX-512 steps against candle's own operations (the f32 reference path).

use candle_core::{Device, Tensor, D};

use super::*;
use crate::signals::embed::bert::int8::available;

/// Deterministic values in `[-range, range]`.
fn values(n: usize, salt: usize, range: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i * 2_654_435_761 + salt * 40_503) % 10_000;
            (h as f32 / 5_000.0 - 1.0) * range
        })
        .collect()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn gelu_and_exp_match_candle() {
    if !available() {
        eprintln!("SKIPPED: no AVX-512 VNNI on this CPU");
        return;
    }
    use std::arch::x86_64::*;
    let mut x = values(4096, 1, 12.0);
    x.extend([0.0, -0.0, 1e-6, -1e-6, 30.0, -30.0, 100.0, -100.0]);
    x.extend([-87.5, -86.5, 88.0, 0.5, -0.5, 3.0, -3.0, 7.0]);
    assert_eq!(x.len() % 16, 0);
    let t = Tensor::new(x.as_slice(), &Device::Cpu).unwrap();
    let (erf_ref, tanh_ref) = (flat(&t.gelu_erf().unwrap()), flat(&t.gelu().unwrap()));
    let mut erf = vec![0f32; x.len()];
    let mut tanh = vec![0f32; x.len()];
    let mut exp = vec![0f32; x.len()];
    for i in (0..x.len()).step_by(16) {
        // SAFETY: available() checked above.
        unsafe {
            let v = _mm512_loadu_ps(x.as_ptr().add(i));
            _mm512_storeu_ps(erf.as_mut_ptr().add(i), kernels::gelu_erf(v));
            _mm512_storeu_ps(tanh.as_mut_ptr().add(i), kernels::gelu_tanh(v));
            _mm512_storeu_ps(exp.as_mut_ptr().add(i), kernels::exp(v));
        }
    }
    assert!(
        worst(&erf, &erf_ref) < 1e-5,
        "gelu_erf: {}",
        worst(&erf, &erf_ref)
    );
    assert!(
        worst(&tanh, &tanh_ref) < 1e-5,
        "gelu: {}",
        worst(&tanh, &tanh_ref)
    );
    for (x, e) in x.iter().zip(&exp) {
        let want = x.exp();
        if *x < -87.0 {
            assert_eq!(*e, 0.0, "exp({x})");
        } else {
            assert!(
                (e - want).abs() <= 1e-6 * want,
                "exp({x}) = {e}, want {want}"
            );
        }
    }
}

#[test]
fn masked_softmax_matches_candle_and_zeroes_padding() {
    if !available() {
        eprintln!("SKIPPED: no AVX-512 VNNI on this CPU");
        return;
    }
    let cpu = &Device::Cpu;
    // Lengths with and without a partial last vector of 16.
    for seq in [1, 7, 16, 37] {
        let (batch, heads) = (2, 3);
        let scores = Tensor::from_vec(
            values(batch * heads * seq * seq, seq, 8.0),
            (batch, heads, seq, seq),
            cpu,
        )
        .unwrap();
        // The second text is padded after its first token.
        let mut bias = vec![0f32; batch * seq];
        bias[seq + 1..].fill(-1e9);
        let bias = Tensor::from_vec(bias, (batch, 1, 1, seq), cpu).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&bias).unwrap()).unwrap();
        let got = masked_softmax(&scores, &bias).unwrap();
        assert!(worst(&flat(&got), &flat(&want)) < 1e-6, "seq {seq}");
        let padded = got.get(1).unwrap().narrow(D::Minus1, 1, seq - 1).unwrap();
        assert!(
            flat(&padded).iter().all(|&w| w == 0.0),
            "seq {seq}: padding weighs 0"
        );
    }
}

/// Against the definition in f64 (candle's own layer norm takes the variance as E[x²] - E[x]², which
/// loses digits to a large mean).
#[test]
fn add_layer_norm_matches_the_definition() {
    if !available() {
        eprintln!("SKIPPED: no AVX-512 VNNI on this CPU");
        return;
    }
    let cpu = &Device::Cpu;
    for width in [16, 40, 384] {
        let rows = 5;
        let x: Vec<f32> = values(rows * width, 1, 3.0)
            .iter()
            .map(|v| v + 50.0)
            .collect();
        let residual = values(rows * width, 2, 1.0);
        let weight = values(width, 3, 2.0);
        let bias = values(width, 4, 0.5);
        let mut want = Vec::new();
        for r in 0..rows {
            let row: Vec<f64> = (r * width..(r + 1) * width)
                .map(|i| f64::from(x[i]) + f64::from(residual[i]))
                .collect();
            let mean = row.iter().sum::<f64>() / width as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / width as f64;
            for (k, v) in row.iter().enumerate() {
                let y = (v - mean) / (var + 1e-12).sqrt();
                want.push((y * f64::from(weight[k]) + f64::from(bias[k])) as f32);
            }
        }
        let norm = candle_nn::LayerNorm::new(
            Tensor::new(weight.as_slice(), cpu).unwrap(),
            Tensor::new(bias.as_slice(), cpu).unwrap(),
            1e-12,
        );
        let x = Tensor::from_vec(x, (1, rows, width), cpu).unwrap();
        let residual = Tensor::from_vec(residual, (1, rows, width), cpu).unwrap();
        let got = add_layer_norm(&x, &residual, &Norm::new(&norm, 1e-12).unwrap()).unwrap();
        assert!(
            worst(&flat(&got), &want) < 2e-5,
            "width {width}: {}",
            worst(&flat(&got), &want)
        );
    }
}

#[test]
fn quantized_rows_round_to_the_row_scale() {
    if !available() {
        eprintln!("SKIPPED: no AVX-512 VNNI on this CPU");
        return;
    }
    for inp in [16usize, 21, 384] {
        let inp4 = inp.div_ceil(4) * 4;
        let rows = 3;
        let mut x = values(rows * inp, inp, 4.0);
        x[inp + 2] = -9.0;
        let mut acts = vec![128u8; rows * inp4];
        let mut scales = vec![0f32; rows];
        // SAFETY: available() checked above.
        unsafe { kernels::quantize_rows(&x, inp, inp4, &mut acts, &mut scales) };
        for r in 0..rows {
            let row = &x[r * inp..(r + 1) * inp];
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(scales[r], max / 127.0);
            for (k, v) in row.iter().enumerate() {
                let q = i32::from(acts[r * inp4 + k]) - 128;
                assert!(
                    (q as f32 - v * 127.0 / max).abs() <= 0.5 + 1e-4,
                    "[{r}][{k}]"
                );
            }
            // The padding of the row to 4 stays at the zero point.
            assert!(acts[r * inp4 + inp..(r + 1) * inp4]
                .iter()
                .all(|&a| a == 128));
        }
    }
}
