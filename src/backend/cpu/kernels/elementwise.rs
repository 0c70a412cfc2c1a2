//! Elementwise ops: `add`, `mul` (a vector `b` broadcast over rows), `silu`, `swiglu`.

use super::{KernelError, check_len};
use rayon::prelude::*;

/// Elements per parallel work item for the `exp`-bound ops (a few tens of µs each).
const PAR_MIN: usize = 1 << 14;

/// `b` must be as long as `a` or a whole number of times shorter (a row broadcast).
fn check_broadcast(op: &'static str, a: usize, b: usize, y: usize) -> Result<(), KernelError> {
    check_len(op, y, a)?;
    if b == 0 || !a.is_multiple_of(b) {
        return Err(KernelError::Invalid(format!(
            "{op}: b has {b} elements, which is neither a's {a} nor a row length dividing it"
        )));
    }
    Ok(())
}

/// `y = a + b`; a shorter `b` (a bias row) is added to every row of `a`. ggml: `ggml_vec_add_f32`
/// (`ggml_compute_forward_add` with a broadcast `src1`).
pub fn add(a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    check_broadcast("add output length", a.len(), b.len(), y.len())?;
    for (ya, aa) in y.chunks_exact_mut(b.len()).zip(a.chunks_exact(b.len())) {
        for ((y, &a), &b) in ya.iter_mut().zip(aa).zip(b) {
            *y = a + b;
        }
    }
    Ok(())
}

/// `y = a * b` elementwise; a shorter `b` is broadcast over the rows of `a`. ggml:
/// `ggml_vec_mul_f32`.
pub fn mul(a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    check_broadcast("mul output length", a.len(), b.len(), y.len())?;
    for (ya, aa) in y.chunks_exact_mut(b.len()).zip(a.chunks_exact(b.len())) {
        for ((y, &a), &b) in ya.iter_mut().zip(aa).zip(b) {
            *y = a * b;
        }
    }
    Ok(())
}

/// `x * sigmoid(x)` as ggml's scalar `ggml_silu_f32` writes it: `x / (1 + exp(-x))`.
#[inline]
pub(crate) fn silu1(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `y = x / (1 + exp(-x))`. ggml: `ggml_silu_f32`.
pub fn silu(x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    check_len("silu output length", y.len(), x.len())?;
    y.par_iter_mut()
        .zip(x.par_iter())
        .with_min_len(PAR_MIN)
        .for_each(|(y, &x)| *y = silu1(x));
    Ok(())
}

/// `y = silu(gate) * up`. ggml: `ggml_vec_swiglu_f32` (its scalar form).
pub fn swiglu(gate: &[f32], up: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    check_len("swiglu up length", up.len(), gate.len())?;
    check_len("swiglu output length", y.len(), gate.len())?;
    y.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .with_min_len(PAR_MIN)
        .for_each(|(y, (&g, &u))| *y = silu1(g) * u);
    Ok(())
}
