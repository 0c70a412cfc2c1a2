//! Softmax over rows, max-subtracted.

use super::{KernelError, check_len};

/// Softmax of `s` in place: `exp(s - max) / sum`, the sum accumulated in f64 and applied as one
/// f32 factor, as ggml's `ggml_compute_forward_soft_max_f32` / `ggml_vec_soft_max_f32` do.
/// `s` must not be empty.
pub(crate) fn softmax_in_place(s: &mut [f32]) {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for v in s.iter_mut() {
        *v = (*v - max).exp();
        sum += f64::from(*v);
    }
    let inv = (1.0 / sum) as f32;
    for v in s.iter_mut() {
        *v *= inv;
    }
}

/// Softmax of each row of `n` elements of `x` into `y`: `y[i] = exp(x[i] - max) / sum_j
/// exp(x[j] - max)`. ggml: `ggml_soft_max` (no mask, scale 1).
pub fn softmax(x: &[f32], n: usize, y: &mut [f32]) -> Result<(), KernelError> {
    check_len("softmax output length", y.len(), x.len())?;
    if n == 0 || !x.len().is_multiple_of(n) {
        return Err(KernelError::Invalid(format!(
            "softmax: {} elements are not whole rows of {n}",
            x.len()
        )));
    }
    y.copy_from_slice(x);
    for row in y.chunks_exact_mut(n) {
        softmax_in_place(row);
    }
    Ok(())
}
