//! The reference math of the ops (`ir::op` is the spec), in f64 on the host, written without
//! the CPU backend's kernels: plain loops and `ndarray` products over inputs widened to f64.
//! Weights are dequantized with [`gguf::quants`](crate::gguf::quants) (the definition of each
//! block layout); the KV cache's FP16 storage is modelled by [`round_f16`].

use crate::gguf::GgmlType;
use crate::gguf::quants::{self, QuantError};
use crate::ir::{AttentionParams, RopeParams, RopeStyle};
use half::f16;
use ndarray::{Array1, Array2, ArrayView1, Axis};

/// A matrix of reference values, row-major like every activation.
pub type Mat = Array2<f64>;

/// The `n x k` values of `data`, a tensor of type `ty` (`n` rows of `k`).
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize, k: usize) -> Result<Mat, QuantError> {
    let mut out = vec![0f32; n * k];
    quants::dequantize_row_f32(ty, data, &mut out)?;
    Ok(Mat::from_shape_fn((n, k), |(r, c)| {
        f64::from(out[r * k + c])
    }))
}

/// `y[r] = table[ids[r]]`. Ids come from the harness, which keeps them below the table's rows.
pub fn gather(table: &Mat, ids: &[u32]) -> Mat {
    let ids: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
    table.select(Axis(0), &ids)
}

/// `y = x wᵀ`.
pub fn matmul(x: &Mat, w: &Mat) -> Mat {
    x.dot(&w.t())
}

/// `y = a + b`, a vector `b` added to every row.
pub fn add(a: &Mat, b: &Mat) -> Mat {
    broadcast(a, b, |x, y| x + y)
}

/// `y = a * b`, a vector `b` broadcast over rows.
pub fn mul(a: &Mat, b: &Mat) -> Mat {
    broadcast(a, b, |x, y| x * y)
}

/// `b` is either `a`'s shape or one row.
fn broadcast(a: &Mat, b: &Mat, f: impl Fn(f64, f64) -> f64) -> Mat {
    let one_row = b.nrows() == 1;
    Mat::from_shape_fn(a.dim(), |(r, c)| {
        f(a[(r, c)], b[(if one_row { 0 } else { r }, c)])
    })
}

pub fn silu(x: &Mat) -> Mat {
    x.mapv(|v| v / (1.0 + (-v).exp()))
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &Mat, up: &Mat) -> Mat {
    &silu(gate) * up
}

/// Each run of `w.len()` elements of a row normalized on its own, then scaled by `w`.
pub fn rms_norm(x: &Mat, w: ArrayView1<'_, f64>, eps: f64) -> Mat {
    let g = w.len();
    let mut y = x.clone();
    for mut row in y.rows_mut() {
        for c in 0..row.len() / g {
            let start = c * g;
            let mean = (0..g).map(|i| row[start + i].powi(2)).sum::<f64>() / g as f64;
            let inv = 1.0 / (mean + eps).sqrt();
            for i in 0..g {
                row[start + i] *= inv * w[i];
            }
        }
    }
    y
}

/// Rope of each row `t` at position `positions[t]`, with the closed-form angle
/// `freq_scale * p * freq_base^(-2i/n_rot) / ff[i]`.
pub fn rope(x: &Mat, positions: &[u32], p: &RopeParams, freq_factors: Option<&Array1<f64>>) -> Mat {
    let (d, n_rot) = (p.head_dim as usize, p.n_rot as usize);
    let half = n_rot / 2;
    let mut y = x.clone();
    for (t, mut row) in y.rows_mut().into_iter().enumerate() {
        let pos = f64::from(positions[t]);
        for h in 0..row.len() / d {
            for i in 0..half {
                let ff = freq_factors.map_or(1.0, |f| f[i]);
                let theta = f64::from(p.freq_scale)
                    * pos
                    * f64::from(p.freq_base).powf(-2.0 * i as f64 / n_rot as f64)
                    / ff;
                let (a, b) = match p.style {
                    RopeStyle::Normal => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + half),
                };
                let (x0, x1) = (x[(t, h * d + a)], x[(t, h * d + b)]);
                row[h * d + a] = x0 * theta.cos() - x1 * theta.sin();
                row[h * d + b] = x0 * theta.sin() + x1 * theta.cos();
            }
        }
    }
    y
}

/// Each value rounded to FP16 (nearest, ties to even), as the KV cache stores it.
pub fn round_f16(x: &Mat) -> Mat {
    x.mapv(|v| f16::from_f64(v).to_f64())
}

/// Attention of each query row `t` over `keys[t]` and `values[t]`: the `[C_t, Hkv*D]` rows it
/// attends (causal mask and window already applied by the caller, cache rounding too).
pub fn attention(q: &Mat, keys: &[Mat], values: &[Mat], p: &AttentionParams) -> Mat {
    let d = p.head_dim as usize;
    let group = (p.n_heads / p.n_kv_heads) as usize;
    let mut y = Mat::zeros(q.dim());
    for t in 0..q.nrows() {
        let (k, v) = (&keys[t], &values[t]);
        for h in 0..p.n_heads as usize {
            let g = h / group;
            let qh = q.row(t);
            let scores: Vec<f64> = (0..k.nrows())
                .map(|c| {
                    f64::from(p.scale)
                        * (0..d)
                            .map(|i| qh[h * d + i] * k[(c, g * d + i)])
                            .sum::<f64>()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = w.iter().sum();
            for i in 0..d {
                y[(t, h * d + i)] = (0..k.nrows())
                    .map(|c| w[c] * v[(c, g * d + i)])
                    .sum::<f64>()
                    / total;
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn rms_norm_normalizes_each_group() {
        let x = array![[3.0, 4.0, 1.0, 1.0]];
        let w = array![1.0, 2.0];
        let y = rms_norm(&x, w.view(), 0.0);
        let r = (12.5f64).sqrt();
        assert_eq!(y, array![[3.0 / r, 8.0 / r, 1.0, 2.0]]);
    }

    #[test]
    fn rope_rotates_pairs_by_position() {
        let p = RopeParams {
            style: RopeStyle::Neox,
            head_dim: 4,
            n_rot: 2,
            freq_base: 10000.0,
            freq_scale: 1.0,
            freq_factors: false,
        };
        // Pair (x[0], x[1]) at angle 2 (i = 0, position 2); x[2], x[3] pass through.
        let y = rope(&array![[1.0, 0.0, 5.0, 6.0]], &[2], &p, None);
        assert!((y[(0, 0)] - 2f64.cos()).abs() < 1e-15);
        assert!((y[(0, 1)] - 2f64.sin()).abs() < 1e-15);
        assert_eq!((y[(0, 2)], y[(0, 3)]), (5.0, 6.0));
    }

    #[test]
    fn attention_averages_values_by_softmax_weight() {
        let p = AttentionParams {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 1,
            scale: 1.0,
            sliding_window: None,
        };
        let q = array![[0.0, 1.0]];
        let k = array![[0.0], [2f64.ln()]];
        let v = array![[1.0], [4.0]];
        let y = attention(&q, &[k], &[v], &p);
        // Head 0: equal weights; head 1: weights 1:2.
        assert!((y[(0, 0)] - 2.5).abs() < 1e-15);
        assert!((y[(0, 1)] - 3.0).abs() < 1e-15);
    }
}
