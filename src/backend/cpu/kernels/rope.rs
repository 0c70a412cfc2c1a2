//! Rotary position embedding, with the angles computed as ggml's CPU rope computes them.
//!
//! ggml (`ggml_compute_forward_rope_flt`, `ggml_rope_cache_init`, `rope_yarn`) computes, per
//! token at position `p`: `theta_scale = powf(freq_base, -2.0f / n_rot)`, then for each pair
//! `i` a running `theta_i = p * theta_scale^i` obtained by *repeated f32 multiplication*
//! (`theta *= theta_scale`), then `freq_scale * (theta_i / ff[i])`, then `cosf`/`sinf` of that.
//! This kernel does the same float operations in the same order (YaRN's extrapolation mix is
//! off for the models m40-llm runs: `ext_factor = 0`, `attn_factor = 1`), so the angles match
//! ggml bit for bit on the same libm; the rotation itself is `x0 cos - x1 sin`,
//! `x0 sin + x1 cos` without fused multiply-adds.

use super::{KernelError, check_len};
use half::f16;
use rayon::prelude::*;

/// How rope pairs the dimensions it rotates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])` (ggml `GGML_ROPE_TYPE_NORMAL`, llama).
    Normal,
    /// Pairs half a rotation apart, `(x[i], x[i + n_rot/2])` (`GGML_ROPE_TYPE_NEOX`, qwen2/3).
    Neox,
}

/// The rope parameters (see `ir::op::RopeParams`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeSpec {
    pub style: RopeStyle,
    /// Elements per head.
    pub head_dim: usize,
    /// Rotated elements per head (even, at most `head_dim`); the rest pass through.
    pub n_rot: usize,
    pub freq_base: f32,
    /// `1 / scaling factor` for linear scaling, else 1.
    pub freq_scale: f32,
}

impl RopeSpec {
    fn check(&self) -> Result<(), KernelError> {
        if self.head_dim == 0 || !self.n_rot.is_multiple_of(2) || self.n_rot > self.head_dim {
            return Err(KernelError::Invalid(format!(
                "rope: n_rot {} must be even and at most head_dim {} (> 0)",
                self.n_rot, self.head_dim
            )));
        }
        Ok(())
    }

    /// cos and sin of each pair's angle for position `p`, into `cs[2i]`, `cs[2i + 1]`.
    fn angles(&self, p: i32, freq_factors: Option<&[f32]>, cs: &mut [f32]) {
        let theta_scale = self.freq_base.powf(-2.0 / self.n_rot as f32);
        let mut theta = p as f32;
        for (i, cs) in cs.chunks_exact_mut(2).enumerate() {
            let ff = freq_factors.map_or(1.0, |f| f[i]);
            let angle = self.freq_scale * (theta / ff);
            cs[0] = angle.cos();
            cs[1] = angle.sin();
            theta *= theta_scale;
        }
    }

    /// Rotates one head `x` into `y` with the angles `cs`.
    #[inline]
    fn rotate(&self, cs: &[f32], x: &[f32], y: &mut [f32]) {
        let half = self.n_rot / 2;
        for (i, cs) in cs.chunks_exact(2).enumerate() {
            let (a, b) = match self.style {
                RopeStyle::Normal => (2 * i, 2 * i + 1),
                RopeStyle::Neox => (i, i + half),
            };
            let (x0, x1) = (x[a], x[b]);
            y[a] = x0 * cs[0] - x1 * cs[1];
            y[b] = x0 * cs[1] + x1 * cs[0];
        }
        y[self.n_rot..].copy_from_slice(&x[self.n_rot..]);
    }

    /// Checks the inputs of a rope over `pos.len()` tokens of `x_len` elements in all; returns
    /// the row length.
    fn check_inputs(
        &self,
        x_len: usize,
        pos: &[i32],
        freq_factors: Option<&[f32]>,
    ) -> Result<usize, KernelError> {
        self.check()?;
        if let Some(ff) = freq_factors {
            check_len(
                "rope freq_factors length (n_rot / 2)",
                ff.len(),
                self.n_rot / 2,
            )?;
        }
        let t = pos.len();
        if t == 0 || !x_len.is_multiple_of(t) || !(x_len / t).is_multiple_of(self.head_dim) {
            return Err(KernelError::Invalid(format!(
                "rope: {x_len} elements are not {t} rows of whole {}-element heads",
                self.head_dim
            )));
        }
        Ok(x_len / t)
    }
}

/// Rotary embedding of `x [T, H * head_dim]` at positions `pos [T]` into `y`: each head of
/// token `t` rotated by `theta_i = freq_scale * pos[t] * freq_base^(-2i/n_rot) / ff[i]`, with
/// `ff = freq_factors` (llama 3's `rope_freqs`) or 1. ggml: `ggml_rope_ext` on the CPU.
pub fn rope(
    x: &[f32],
    pos: &[i32],
    freq_factors: Option<&[f32]>,
    spec: &RopeSpec,
    y: &mut [f32],
) -> Result<(), KernelError> {
    check_len("rope output length", y.len(), x.len())?;
    let row = spec.check_inputs(x.len(), pos, freq_factors)?;
    let d = spec.head_dim;
    y.par_chunks_mut(row)
        .zip(x.par_chunks(row).zip(pos.par_iter()))
        .with_min_len(8)
        .for_each_init(
            || vec![0.0f32; spec.n_rot],
            |cs, (y, (x, &p))| {
                spec.angles(p, freq_factors, cs);
                for (yh, xh) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    spec.rotate(cs, xh, yh);
                }
            },
        );
    Ok(())
}

/// `kv_write(rope(k, pos), v)`: the rotated keys and the values of `T` tokens rounded to FP16
/// into the caches at `cells[t]`; caches are `[cell, kv_dim]` with `kv_dim = k.len() / T`.
/// The same numbers as [`rope`] then [`kv_write`](super::kv_write).
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_write(
    k: &[f32],
    v: &[f32],
    pos: &[i32],
    freq_factors: Option<&[f32]>,
    spec: &RopeSpec,
    cells: &[u32],
    k_cache: &mut [f16],
    v_cache: &mut [f16],
) -> Result<(), KernelError> {
    check_len(
        "rope_kv_write cells (one per token)",
        cells.len(),
        pos.len(),
    )?;
    let row = spec.check_inputs(k.len(), pos, freq_factors)?;
    super::attention::check_kv_write(k, v, cells, row, k_cache, v_cache)?;
    let d = spec.head_dim;
    let mut cs = vec![0.0f32; spec.n_rot];
    let mut rotated = vec![0.0f32; row];
    for (t, (&cell, &p)) in cells.iter().zip(pos).enumerate() {
        spec.angles(p, freq_factors, &mut cs);
        for (yh, xh) in rotated
            .chunks_exact_mut(d)
            .zip(k[t * row..][..row].chunks_exact(d))
        {
            spec.rotate(&cs, xh, yh);
        }
        let c = cell as usize;
        super::attention::store_f16(&rotated, &mut k_cache[c * row..][..row]);
        super::attention::store_f16(&v[t * row..][..row], &mut v_cache[c * row..][..row]);
    }
    Ok(())
}
