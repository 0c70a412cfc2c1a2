//! Checked launches of the non-matmul kernels, for the executor: each validates the sizes it is
//! given against the buffers, picks the launch configuration (and, for attention, the kernel),
//! and reports a failure as a [`CudaError::Launch`] naming the kernel and the sizes. All
//! asynchronous on the stream.

use super::{CudaError, KernelSet};
use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Positions per split of the flash-decoding kernel.
pub const DECODE_CHUNK: usize = 256;
/// Largest head_dim of the prefill kernel (`PF_MAX_D`) and of the decode kernel (`MAX_D`).
pub const PREFILL_MAX_HEAD_DIM: usize = 128;
pub const DECODE_MAX_HEAD_DIM: usize = 256;

/// The paged KV cache of one layer and the page tables (see docs/cuda.md).
pub struct PagedKv<'a> {
    pub k: &'a CudaSlice<u16>,
    pub v: &'a CudaSlice<u16>,
    /// `[max_slots, table_stride]` page numbers.
    pub tables: &'a CudaSlice<i32>,
    pub table_stride: usize,
    pub page_size: usize,
}

/// The head layout of an attention (see `ir::op::AttentionParams`).
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// 0: no sliding window.
    pub window: usize,
}

/// Which attention kernel ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnPath {
    Decode { splits: usize },
    Prefill,
}

/// Launches on one stream with one kernel set.
pub struct Ops<'a> {
    pub ks: &'a KernelSet,
    pub stream: &'a Arc<CudaStream>,
}

fn grid(x: usize, y: usize, z: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x as u32, y as u32, z as u32),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn i32_of(kernel: &str, what: &str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Launch {
        kernel: kernel.into(),
        reason: format!("{what} {v} does not fit the kernel's 32-bit argument"),
    })
}

fn check(kernel: &str, ok: bool, sizes: impl FnOnce() -> String) -> Result<(), CudaError> {
    if ok {
        Ok(())
    } else {
        Err(CudaError::Launch {
            kernel: kernel.into(),
            reason: sizes(),
        })
    }
}

fn launch(
    name: &str,
    mut b: cudarc::driver::LaunchArgs<'_>,
    cfg: LaunchConfig,
) -> Result<(), CudaError> {
    // SAFETY: each caller pushes its kernel's arguments in order, with the sizes checked.
    unsafe { b.launch(cfg) }.map_err(|e| CudaError::Launch {
        kernel: name.into(),
        reason: e.to_string(),
    })?;
    Ok(())
}

impl Ops<'_> {
    /// `y = rms_norm(x, w)` over groups of `w.len()` elements of the first `n` of `x`.
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        n: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let k = "rms_norm_f32";
        let g = w.len();
        check(
            k,
            g > 0 && n.is_multiple_of(g) && x.len() >= n && y.len() >= n,
            || format!("{n} values in groups of {g}, x {} y {}", x.len(), y.len()),
        )?;
        let gi = i32_of(k, "group", g)?;
        let block = (g.div_ceil(32) * 32).clamp(32, 1024) as u32;
        let f = self.ks.function("norm", k)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(w).arg(&mut *y).arg(&gi).arg(&eps);
        launch(k, b, grid(n / g, 1, 1, block))
    }

    /// Attention of `t` query rows over the paged cache. `positions` (host copies of the step's
    /// positions) size the decode splits. Prefill's tiled kernel for several tokens with
    /// `head_dim <= 128`, flash-decoding otherwise. `part` is scratch of at least
    /// [`Ops::attention_scratch_len`] floats.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &CudaSlice<f32>,
        kv: &PagedKv<'_>,
        pos: &CudaSlice<i32>,
        slots: &CudaSlice<i32>,
        positions: &[u32],
        shape: AttnShape,
        y: &mut CudaSlice<f32>,
        part: &mut CudaSlice<f32>,
    ) -> Result<AttnPath, CudaError> {
        let AttnShape {
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: d,
            scale,
            window,
        } = shape;
        let t = positions.len();
        let k = "attention";
        check(
            k,
            t > 0
                && hkv > 0
                && h.is_multiple_of(hkv)
                && d.is_multiple_of(32)
                && d <= DECODE_MAX_HEAD_DIM
                && q.len() >= t * h * d
                && y.len() >= t * h * d
                && pos.len() >= t
                && slots.len() >= t
                && kv.page_size > 0,
            || {
                format!(
                    "{t} tokens, {h} heads over {hkv} KV heads of {d} (head_dim a multiple of 32, \
                     at most {DECODE_MAX_HEAD_DIM}), q {} y {}",
                    q.len(),
                    y.len()
                )
            },
        )?;
        let args = [
            i32_of(k, "table stride", kv.table_stride)?,
            i32_of(k, "page size", kv.page_size)?,
            i32_of(k, "heads", h)?,
            i32_of(k, "KV heads", hkv)?,
            i32_of(k, "head_dim", d)?,
        ];
        let win = i32_of(k, "window", window)?;
        if t > 1 && d <= PREFILL_MAX_HEAD_DIM {
            let groups = hkv * (h / hkv).div_ceil(8);
            let name = "attention_prefill_f16";
            let f = self.ks.function("attention", name)?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(q)
                .arg(kv.k)
                .arg(kv.v)
                .arg(pos)
                .arg(slots)
                .arg(kv.tables);
            for a in &args {
                b.arg(a);
            }
            b.arg(&scale).arg(&win).arg(&mut *y);
            launch(name, b, grid(groups, t, 1, 128))?;
            return Ok(AttnPath::Prefill);
        }
        let splits = Self::decode_splits(positions, window);
        let need = Self::attention_scratch_len(positions, shape);
        check(k, part.len() >= need, || {
            format!("scratch of {} floats, {need} needed", part.len())
        })?;
        let parts = t * h * splits;
        let chunk = DECODE_CHUNK as i32;
        let s_i = i32_of(k, "splits", splits)?;
        {
            let (mut pm, mut rest) = part.split_at_mut(parts);
            let (mut pl, mut pa) = rest.split_at_mut(parts);
            let name = "attention_decode_f16";
            let f = self.ks.function("attention", name)?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(q)
                .arg(kv.k)
                .arg(kv.v)
                .arg(pos)
                .arg(slots)
                .arg(kv.tables);
            for a in &args {
                b.arg(a);
            }
            b.arg(&scale).arg(&win).arg(&chunk);
            b.arg(&mut pm).arg(&mut pl).arg(&mut pa);
            launch(name, b, grid(h, t, splits, 128))?;
        }
        let (pm, rest) = part.split_at(parts);
        let (pl, pa) = rest.split_at(parts);
        let name = "attention_combine";
        let f = self.ks.function("attention", name)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&pm)
            .arg(&pl)
            .arg(&pa)
            .arg(&mut *y)
            .arg(&args[2])
            .arg(&args[4])
            .arg(&s_i);
        launch(name, b, grid(h, t, 1, 64))?;
        Ok(AttnPath::Decode { splits })
    }

    /// Splits of the longest context among `positions`.
    pub fn decode_splits(positions: &[u32], window: usize) -> usize {
        let longest = positions
            .iter()
            .map(|&p| {
                let len = p as usize + 1;
                if window > 0 { len.min(window) } else { len }
            })
            .max()
            .unwrap_or(1);
        longest.div_ceil(DECODE_CHUNK).max(1)
    }

    /// Floats of decode scratch for these positions: `(m, l, acc[D])` per token, head, split.
    pub fn attention_scratch_len(positions: &[u32], shape: AttnShape) -> usize {
        positions.len()
            * shape.n_heads
            * Self::decode_splits(positions, shape.window)
            * (shape.head_dim + 2)
    }

    /// Per row of `x` (`rows` rows of `n`): the argmax (`ids[r]`, `vals[r]`) or, with `k > 0`,
    /// the top `k` (`ids[r * k + j]`).
    pub fn top_k(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        n: usize,
        k: usize,
        ids: &mut CudaSlice<i32>,
        vals: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let name = if k == 0 { "argmax_f32" } else { "top_k_f32" };
        let per = k.max(1);
        check(
            name,
            rows > 0
                && n > 0
                && k <= n
                && x.len() >= rows * n
                && ids.len() >= rows * per
                && vals.len() >= rows * per,
            || {
                format!(
                    "{rows} rows of {n}, k {k}, ids {} vals {}",
                    ids.len(),
                    vals.len()
                )
            },
        )?;
        let (ni, ki) = (i32_of(name, "n", n)?, i32_of(name, "k", k)?);
        let f = self.ks.function("sample", name)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(&ni);
        if k > 0 {
            b.arg(&ki);
        }
        b.arg(&mut *ids).arg(&mut *vals);
        launch(name, b, grid(rows, 1, 1, 256))
    }
}
