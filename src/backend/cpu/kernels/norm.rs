//! RMS normalization, per row or per group of `G` elements, and the fused residual add + norm.

use super::{KernelError, check_len};
use rayon::prelude::*;

/// Groups per parallel work item.
const PAR_MIN_ELEMS: usize = 1 << 15;

fn check_groups(x: usize, g: usize) -> Result<(), KernelError> {
    if g == 0 || !x.is_multiple_of(g) {
        return Err(KernelError::Invalid(format!(
            "rms_norm: the weight has {g} elements, which does not divide the input's {x}"
        )));
    }
    Ok(())
}

/// `1 / sqrt(mean(x²) + eps)` the way ggml's `ggml_compute_forward_rms_norm_f32` computes it:
/// squares in f32, summed in f64, the mean rounded to f32.
#[inline]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let mut acc = [0.0f64; 4];
    let chunks = x.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..4 {
            acc[l] += f64::from(c[l] * c[l]);
        }
    }
    let mut sum = (acc[0] + acc[2]) + (acc[1] + acc[3]);
    for &v in rest {
        sum += f64::from(v * v);
    }
    let mean = (sum / x.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

#[inline]
fn norm_group(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let scale = inv_rms(x, eps);
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
        *y = x * scale * w;
    }
}

/// RMS norm of each run of `G = w.len()` consecutive elements (a whole row when `G` is the row
/// length, each head for qwen3's q/k norms — a group never straddles rows since `G` divides the
/// row): `y = x / sqrt(mean(x²) + eps) * w`. ggml: `ggml_compute_forward_rms_norm_f32`
/// followed by `ggml_mul` (`x * scale * w`).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) -> Result<(), KernelError> {
    check_len("rms_norm output length", y.len(), x.len())?;
    check_groups(x.len(), w.len())?;
    let g = w.len();
    y.par_chunks_mut(g)
        .zip(x.par_chunks(g))
        .with_min_len(PAR_MIN_ELEMS.div_ceil(g))
        .for_each(|(y, x)| norm_group(x, w, eps, y));
    Ok(())
}

/// `sum = a + b`, `normed = rms_norm(sum, w)`: the residual add and the next norm in one pass.
/// The same numbers as [`add`](super::add) then [`rms_norm`].
pub fn add_rms_norm(
    a: &[f32],
    b: &[f32],
    w: &[f32],
    eps: f32,
    sum: &mut [f32],
    normed: &mut [f32],
) -> Result<(), KernelError> {
    check_len("add_rms_norm b length", b.len(), a.len())?;
    check_len("add_rms_norm sum length", sum.len(), a.len())?;
    check_len("add_rms_norm normed length", normed.len(), a.len())?;
    check_groups(a.len(), w.len())?;
    let g = w.len();
    sum.par_chunks_mut(g)
        .zip(normed.par_chunks_mut(g))
        .zip(a.par_chunks(g).zip(b.par_chunks(g)))
        .with_min_len(PAR_MIN_ELEMS.div_ceil(g))
        .for_each(|((s, n), (a, b))| {
            for ((s, &a), &b) in s.iter_mut().zip(a).zip(b) {
                *s = a + b;
            }
            norm_group(s, w, eps, n);
        });
    Ok(())
}
