//! Checked launches of the non-matmul kernels, for the executor: each validates the sizes it is
//! given against the buffers, picks the launch configuration (and, for attention, the kernel),
//! and reports a failure as a [`CudaError::Launch`] naming the kernel and the sizes. All
//! asynchronous on the stream. Buffers are anything with a device address and a length
//! ([`DeviceSpan`]): the executor's arena regions or, in tests, whole slices.

use super::mem::{DeviceSpan, Span};
use super::{CudaError, KernelSet};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Flash-decoding splits a context of `len` positions into `ceil(len / min_split)` chunks (at
/// most [`DecodeSplits::max_splits`]): this many positions by default.
pub const DECODE_MIN_SPLIT: usize = 128;
/// Blocks per multiprocessor that one token's decode attention aims at by default (its split
/// count's ceiling is this times the multiprocessors over the blocks of one split).
pub const DECODE_BLOCKS_PER_SM: usize = 4;
/// The most splits of one context on any device (bounds the scratch and the graph key).
pub const DECODE_MAX_SPLITS: usize = 128;
/// A chunk is a multiple of this many positions (`DEC_GRAN` in kernels/attention.cu).
const DECODE_GRAN: usize = 32;
/// The largest group of query heads one decode block takes (`attention_decode_g<G>_f16`).
pub const DECODE_MAX_GROUP: usize = 8;
/// The head dimensions the lane-a-position decode kernels are compiled for
/// (`attention_decode_lanes_d<D>_g<G>_f16`, kernels/attention.cu): a lane computes one
/// position's scores, then the warp's lanes split the head's elements for V. Other head
/// dimensions take `attention_decode[_g<G>]_f16`, whose lanes split each position's dot.
pub const DECODE_LANES_HEAD_DIMS: [usize; 2] = [64, 128];
/// Decode kernel families: the general one, then one per [`DECODE_LANES_HEAD_DIMS`].
pub const DECODE_FAMILIES: usize = 1 + DECODE_LANES_HEAD_DIMS.len();
/// Contexts of at least this many positions take the grouped decode kernel by default, shorter
/// ones the per-head kernel over the same splits (the same bits). Measured on the H200 (8B
/// shape, `kernel_timings_for_the_record`, decode plus combine, after the lean page walk):
/// at depth 512 the per-head kernel takes 0.015 ms and the grouped one 0.020, at 4 096 0.026
/// and 0.024, at 16 384 0.062 and 0.045; 8B Q4_0 tg128 at depth 4 096 ran 285.0 tokens/s
/// per-head and 294.4 grouped. With one split (SmolLM2's first 128 positions: 3 blocks a token
/// instead of 9) the grouped kernel cost its decode 11% (1 589 to 1 408 tokens/s).
pub const DECODE_GROUPED_FROM: usize = 4096;
/// [`DECODE_GROUPED_FROM`] for the lane-a-position kernels: on the H200 (8B Q4_0 tg128 from
/// depth 2 048) grouped 316.9 tokens/s, per-head 304.6 (the general kernels per-head 314.7).
/// Shorter contexts are not measured grouped.
pub const DECODE_LANES_GROUPED_FROM: usize = 2048;
/// Merge counters at the front of the decode scratch (see [`DecodeSplits::scratch_len`]): a
/// launch whose tokens times blocks a split exceed it merges in `attention_combine` instead
/// (the same bits).
pub const DECODE_COUNTERS: usize = 1 << 14;
/// Largest head_dim of the prefill kernel (`PF_MAX_D`) and of the decode kernel (`MAX_D`).
pub const PREFILL_MAX_HEAD_DIM: usize = 128;
/// (token, head) query rows per block of the prefill kernel (`PF_R`).
pub const PREFILL_ROWS: usize = 16;
pub const DECODE_MAX_HEAD_DIM: usize = 256;

/// The paged KV cache of one layer and the page tables (see docs/cuda.md).
#[derive(Clone, Copy, Debug)]
pub struct PagedKv {
    /// `[n_cells, n_kv_heads * head_dim]` FP16 each.
    pub k: Span<u16>,
    pub v: Span<u16>,
    /// `[max_slots, table_stride]` page numbers.
    pub tables: Span<i32>,
    pub table_stride: usize,
    pub page_size: usize,
}

impl PagedKv {
    /// Cells of the cache for rows of `row` values.
    fn n_cells(&self, row: usize) -> usize {
        self.k.len().min(self.v.len()).checked_div(row).unwrap_or(0)
    }
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
    /// Flash-decoding over `splits` chunks, `group` query heads a block (0: the per-head
    /// kernel `attention_decode_f16`).
    Decode {
        splits: usize,
        group: usize,
    },
    Prefill,
}

/// How flash-decoding splits a context and groups query heads: a function of the device and
/// the head layout only, so a token's chunks (and its bits) are the same in every step and
/// batch (kernels/attention.cu, `attn_decode_chunk`). A token of `len` positions takes
/// `min(ceil(len / min_split), max_splits)` chunks, each `ceil(len / chunks)` rounded up to 32
/// positions; `max_splits` aims at `blocks_per_sm` blocks on each multiprocessor for one token
/// alone, no more than fit at once (one wave). A launch runs the most chunks any of its tokens
/// needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeSplits {
    /// The device's multiprocessors.
    pub sms: usize,
    pub blocks_per_sm: usize,
    pub min_split: usize,
    /// A block takes the query heads of one KV head together (`attention_decode_g<G>_f16`,
    /// each K/V row read once for them all); `false`: one head a block (`attention_decode_f16`).
    pub grouped: bool,
    /// With `grouped`, the contexts (in positions, as [`Self::context_units`] counts them) that
    /// take the grouped kernel, by [family](Self::family): at least this long
    /// ([`DECODE_GROUPED_FROM`], [`DECODE_LANES_GROUPED_FROM`]; 0: every one).
    pub grouped_from: [usize; DECODE_FAMILIES],
    /// Head dimensions in [`DECODE_LANES_HEAD_DIMS`] take the lane-a-position kernels
    /// (`false`: the general ones, the A/B baseline `M40LLM_ATTN_LANES=0`). Either family gives
    /// the same bits for every G, so all of a shape's launches take one family.
    pub lanes: bool,
    /// The lane-a-position kernels, one head a block, merge a split context's partials in each
    /// head's last block ([`Self::merges`]; the counters at the front of the scratch), with
    /// `attention_combine`'s arithmetic and bits; `false` (`M40LLM_ATTN_MERGE=0`): an
    /// `attention_combine` launch after every split launch.
    pub merge: bool,
    /// Blocks of each decode kernel (index [family](Self::family), then G, 0 the per-head
    /// kernel) a multiprocessor holds at once, from the driver (their registers decide it: 3 at
    /// G 4, 2 at G 6-8 in the general family); 0: not known (no cap).
    pub resident: [[usize; DECODE_MAX_GROUP + 1]; DECODE_FAMILIES],
}

impl DecodeSplits {
    /// The defaults for a device of `sms` multiprocessors.
    pub fn new(sms: usize) -> DecodeSplits {
        DecodeSplits {
            sms: sms.max(1),
            blocks_per_sm: DECODE_BLOCKS_PER_SM,
            min_split: DECODE_MIN_SPLIT,
            grouped: true,
            grouped_from: [
                DECODE_GROUPED_FROM,
                DECODE_LANES_GROUPED_FROM,
                DECODE_LANES_GROUPED_FROM,
            ],
            lanes: true,
            merge: true,
            resident: [[0; DECODE_MAX_GROUP + 1]; DECODE_FAMILIES],
        }
    }

    /// The kernel family of a head dimension: 0 the general kernels, `1 + i` the
    /// lane-a-position kernels of `DECODE_LANES_HEAD_DIMS[i]` (with [`Self::lanes`]).
    pub fn family(&self, head_dim: usize) -> usize {
        match DECODE_LANES_HEAD_DIMS.iter().position(|&d| d == head_dim) {
            Some(i) if self.lanes => 1 + i,
            _ => 0,
        }
    }

    /// The decode kernel of a family and group (`Self::group`; 0 one query head a block, which
    /// in a lanes family is its G = 1 kernel).
    pub fn kernel_name(family: usize, group: usize) -> String {
        match (family, group) {
            (0, 0) => "attention_decode_f16".to_string(),
            (0, g) => format!("attention_decode_g{g}_f16"),
            (f, g) => format!(
                "attention_decode_lanes_d{}_g{}_f16",
                DECODE_LANES_HEAD_DIMS[f - 1],
                g.max(1)
            ),
        }
    }

    /// The defaults for the kernels' device (its multiprocessors, each decode kernel's resident
    /// blocks), with the A/B switches `M40LLM_ATTN_LANES=0` (the general kernels at every head
    /// dimension), `M40LLM_ATTN_MERGE=0` (an `attention_combine` launch after the lanes
    /// kernels), `M40LLM_ATTN_GROUPED=0` (one query head a block),
    /// `M40LLM_ATTN_GROUPED_FROM=N` (the grouped kernel from N positions on),
    /// `M40LLM_ATTN_MIN_SPLIT=N` and `M40LLM_ATTN_BLOCKS_PER_SM=N`.
    pub fn for_kernels(ks: &KernelSet) -> Result<DecodeSplits, CudaError> {
        let driver = |what: &str, e: cudarc::driver::DriverError| CudaError::Launch {
            kernel: "attention".into(),
            reason: format!("cannot read {what}: {e}"),
        };
        let sms = ks
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver("the multiprocessor count", e))?;
        let mut d = DecodeSplits::new(usize::try_from(sms).unwrap_or(1));
        for (family, row) in d.resident.iter_mut().enumerate() {
            for (g, resident) in row.iter_mut().enumerate() {
                let name = Self::kernel_name(family, g);
                let f = ks.function("attention", &name)?;
                let n = f
                    .occupancy_max_active_blocks_per_multiprocessor(128, 0, None)
                    .map_err(|e| driver(&format!("the occupancy of {name}"), e))?;
                *resident = n as usize;
            }
        }
        let var = |name: &str| std::env::var(name).ok();
        d.grouped = var("M40LLM_ATTN_GROUPED").is_none_or(|v| v.trim() != "0");
        d.lanes = var("M40LLM_ATTN_LANES").is_none_or(|v| v.trim() != "0");
        let count_from = |name: &str, least: usize, default: usize| match var(name) {
            None => default,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (least..=1 << 20).contains(&n) => n,
                _ => {
                    tracing::warn!(
                        "{name}={v} ignored (a count from {least} to 1048576 is expected)"
                    );
                    default
                }
            },
        };
        let count = |name: &str, default: usize| count_from(name, 1, default);
        d.min_split = count("M40LLM_ATTN_MIN_SPLIT", d.min_split);
        d.blocks_per_sm = count("M40LLM_ATTN_BLOCKS_PER_SM", d.blocks_per_sm);
        // 0: the grouped kernel at every context.
        if var("M40LLM_ATTN_GROUPED_FROM").is_some() {
            d.grouped_from =
                [count_from("M40LLM_ATTN_GROUPED_FROM", 0, d.grouped_from[0]); DECODE_FAMILIES];
        }
        d.merge = var("M40LLM_ATTN_MERGE").is_none_or(|v| v.trim() != "0");
        Ok(d)
    }

    /// Query heads a block takes (0: the per-head kernel): the largest G of 1..=8 that divides
    /// `n_heads / n_kv_heads`, so that a block's heads share one KV head.
    pub fn group(&self, shape: AttnShape) -> usize {
        if !self.grouped || shape.n_kv_heads == 0 {
            return 0;
        }
        let ratio = shape.n_heads / shape.n_kv_heads;
        (1..=DECODE_MAX_GROUP)
            .rev()
            .find(|g| ratio.is_multiple_of(*g))
            .unwrap_or(1)
    }

    /// The kernel a launch over these positions takes (0: the per-head kernel): the grouped
    /// one ([`Self::group`]) for contexts of at least `grouped_from` (of the shape's family)
    /// positions whose grouped
    /// launch still gives every multiprocessor a block for one token (`H / G` blocks a split):
    /// below that the per-head kernel's `G` times the blocks win (SmolLM2 at depth 4 096, 3 x 32
    /// grouped blocks on an H200's 132 SMs: 1 109 tokens/s grouped, 1 162 per-head).
    /// A launch of several tokens takes the grouped kernel once its longest context has more
    /// than one split, whatever `grouped_from`: its tokens multiply the blocks, so the per-head
    /// kernel's `G` times more buy nothing and its `G` reads of each K/V row cost (H200, 8B
    /// Q4_0, i12-tiled: 8 sequences at depth 1 024 895 tokens/s per-head, 961 grouped; at 512
    /// 953 and 997; 2 at 1 024 388 and 402; 32 at 256 1 638 and 1 708; at depth 0, one split,
    /// 8 sequences 1 048 per-head against 1 037).
    /// `grouped_from` 0 takes the grouped kernel at every context (the tests' and A/Bs'
    /// override). The splits are the grouped policy's either way, so the choice changes no
    /// result; it is a function of the graph key's token count and [`Self::context_units`].
    pub fn kernel_group(&self, positions: &[u32], shape: AttnShape) -> usize {
        let longest = Self::longest(positions, shape);
        let group = self.group(shape);
        let from = self.grouped_from[self.family(shape.head_dim)];
        if from == 0 {
            return group;
        }
        let splits = self.splits_of(longest, shape);
        if positions.len() > 1 && splits > 1 {
            return group;
        }
        let long = self.context_units(longest) >= self.context_units(from);
        let blocks = self.blocks_per_split(shape) * splits;
        if long && blocks >= self.sms { group } else { 0 }
    }

    /// Blocks of one split of one token.
    fn blocks_per_split(&self, shape: AttnShape) -> usize {
        match self.group(shape) {
            0 => shape.n_heads,
            g => shape.n_heads / g,
        }
        .max(1)
    }

    /// The most chunks one context of this shape is split into on this device: one token's
    /// blocks fill `blocks_per_sm` on every multiprocessor, or as many as fit at once.
    pub fn max_splits(&self, shape: AttnShape) -> usize {
        let fit = self.resident[self.family(shape.head_dim)]
            .get(self.group(shape))
            .copied()
            .filter(|&n| n > 0)
            .unwrap_or(usize::MAX);
        (self.sms * self.blocks_per_sm.min(fit) / self.blocks_per_split(shape))
            .clamp(1, DECODE_MAX_SPLITS)
    }

    /// The positions a context attends: `pos + 1`, or the window.
    fn context_len(p: u32, window: usize) -> usize {
        let len = p as usize + 1;
        if window > 0 { len.min(window) } else { len }
    }

    /// The longest context a launch over these positions attends (1 for none).
    fn longest(positions: &[u32], shape: AttnShape) -> usize {
        positions
            .iter()
            .map(|&p| Self::context_len(p, shape.window))
            .max()
            .unwrap_or(1)
    }

    /// Chunks of a context of `len` positions.
    pub fn splits_of(&self, len: usize, shape: AttnShape) -> usize {
        len.max(1)
            .div_ceil(self.min_split.max(1))
            .clamp(1, self.max_splits(shape))
    }

    /// Positions of each chunk of a context of `len` positions (`attn_decode_chunk`).
    pub fn chunk_of(&self, len: usize, shape: AttnShape) -> usize {
        let len = len.max(1);
        len.div_ceil(self.splits_of(len, shape))
            .next_multiple_of(DECODE_GRAN)
    }

    /// Splits of a launch for these positions: the most any token needs (the split count grows
    /// with the context, so that is the longest context's).
    pub fn splits(&self, positions: &[u32], shape: AttnShape) -> usize {
        self.splits_of(Self::longest(positions, shape), shape)
    }

    /// Floats of decode scratch for these positions: [`DECODE_COUNTERS`] merge counters (zero
    /// between launches: allocate the scratch zeroed; each merge resets its counter), then
    /// `(m, l, acc[D])` per token, head and split.
    pub fn scratch_len(&self, positions: &[u32], shape: AttnShape) -> usize {
        DECODE_COUNTERS
            + positions.len() * shape.n_heads * self.splits(positions, shape) * (shape.head_dim + 2)
    }

    /// Whether a launch of `tokens` tokens over `splits` splits with kernel `group`
    /// ([`Self::kernel_group`]) merges in the decode kernel (else in `attention_combine`): a
    /// lanes family with [`Self::merge`], one query head a block, several splits, and a
    /// counter for each (token, block of a split). A grouped block's merge takes its G heads'
    /// elements with its 128 threads, G elements a thread one after another (each a chain of
    /// loads over the splits): on the H200 the 8B shape at depth 4 096 (G 4, 33 splits) ran
    /// 278 tokens/s merged against 304 with `attention_combine`'s 32 blocks, while one head a
    /// block (an element a thread, as the combine has) saves the launch: SmolLM2 at 4 096
    /// 1 177 against 1 153. A grouped merge with four consecutive elements a thread (one float4
    /// load a split, 16 splits in flight) lost too: 292.8 against 307.0 (2026-12-04), so a merge
    /// that waits on the group's last block costs more than the combine launch it saves.
    pub fn merges(&self, tokens: usize, splits: usize, shape: AttnShape, group: usize) -> bool {
        self.merge
            && self.family(shape.head_dim) > 0
            && group <= 1
            && splits > 1
            && tokens * shape.n_heads <= DECODE_COUNTERS
    }

    /// What of a step's longest context (`max(pos) + 1`) its launches depend on: every split
    /// count of every attention (any shape, any window) is a function of
    /// `min(ceil(longest / min_split), DECODE_MAX_SPLITS)` (the decode graphs' key).
    pub fn context_units(&self, longest: usize) -> usize {
        longest
            .div_ceil(self.min_split.max(1))
            .min(DECODE_MAX_SPLITS)
    }
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

/// The norm kernel (`rms_norm_f32` or `add_rms_norm_f32`, as `base`) for groups of `g` elements
/// and its block: a thread an element up to 1 024, then the `_e<E>` kernel that keeps a
/// thread's E (2, 4 or 8) elements in registers, and past 8 192 the loop kernel again
/// (kernels/norm.cu). The same bits whichever runs at a given block.
pub fn norm_kernel(base: &str, g: usize) -> (String, u32) {
    let block = (g.div_ceil(32) * 32).clamp(32, 1024);
    let per_thread = g.div_ceil(block);
    let name = match per_thread {
        2..=8 => format!("{base}_e{}", per_thread.next_power_of_two()),
        _ => base.to_string(),
    };
    (name, block as u32)
}

impl Ops<'_> {
    /// `y = rms_norm(x, w)` over groups of `w.len()` elements of the first `n` of `x`.
    pub fn rms_norm(
        &self,
        x: &impl DeviceSpan<f32>,
        w: &impl DeviceSpan<f32>,
        y: &mut impl DeviceSpan<f32>,
        n: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let (x, w, y) = (x.span(), w.span(), y.span());
        let k = "rms_norm_f32";
        let g = w.len();
        check(
            k,
            g > 0 && n.is_multiple_of(g) && x.len() >= n && y.len() >= n,
            || format!("{n} values in groups of {g}, x {} y {}", x.len(), y.len()),
        )?;
        let gi = i32_of(k, "group", g)?;
        let (name, block) = norm_kernel(k, g);
        let f = self.ks.function("norm", &name)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x.ptr()).arg(w.ptr()).arg(y.ptr()).arg(&gi).arg(&eps);
        launch(&name, b, grid(n / g, 1, 1, block))
    }

    /// Attention of `t` query rows over the paged cache. `positions` and `host_slots` (host
    /// copies of the step's positions and slots) size the decode splits and pick the kernel:
    /// prefill's tiled kernel where tokens come in runs of one sequence
    /// ([`Ops::prefill_attention_pays`]) and `head_dim <= 128`, flash-decoding split as `decode`
    /// says otherwise (a batch of sequences decoding one token each). `part` is scratch of at
    /// least [`DecodeSplits::scratch_len`] floats (only decode uses it).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &impl DeviceSpan<f32>,
        kv: &PagedKv,
        pos: &impl DeviceSpan<i32>,
        slots: &impl DeviceSpan<i32>,
        positions: &[u32],
        host_slots: &[u32],
        shape: AttnShape,
        decode: &DecodeSplits,
        y: &mut impl DeviceSpan<f32>,
        part: &mut impl DeviceSpan<f32>,
    ) -> Result<AttnPath, CudaError> {
        check("attention", host_slots.len() == positions.len(), || {
            format!(
                "{} positions but {} slots",
                positions.len(),
                host_slots.len()
            )
        })?;
        if Self::prefill_attention_pays(host_slots) && shape.head_dim <= PREFILL_MAX_HEAD_DIM {
            self.attention_prefill(q, kv, pos, slots, positions.len(), shape, y)?;
            return Ok(AttnPath::Prefill);
        }
        self.attention_decode(q, kv, pos, slots, positions, shape, decode, y, part)
    }

    /// The checks and the kernels' common integer arguments (table stride, page size, heads,
    /// KV heads, head_dim, window) of an attention of `t` rows.
    #[allow(clippy::too_many_arguments)]
    fn attention_args(
        kernel: &str,
        q: Span<f32>,
        kv: &PagedKv,
        pos: Span<i32>,
        slots: Span<i32>,
        t: usize,
        shape: AttnShape,
        y: Span<f32>,
        max_d: usize,
    ) -> Result<[i32; 6], CudaError> {
        let AttnShape {
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: d,
            window,
            ..
        } = shape;
        // The decode kernel reads K and V rows as 16-byte vectors.
        let aligned = kv.k.ptr().is_multiple_of(16) && kv.v.ptr().is_multiple_of(16);
        check(
            kernel,
            t > 0
                && hkv > 0
                && h.is_multiple_of(hkv)
                && d.is_multiple_of(32)
                && d <= max_d
                && q.len() >= t * h * d
                && y.len() >= t * h * d
                && pos.len() >= t
                && slots.len() >= t
                && kv.page_size > 0
                && aligned,
            || {
                format!(
                    "{t} tokens, {h} heads over {hkv} KV heads of {d} (head_dim a multiple of 32, \
                     at most {max_d}), q {} y {}, K and V 16-byte aligned: {aligned}",
                    q.len(),
                    y.len()
                )
            },
        )?;
        Ok([
            i32_of(kernel, "table stride", kv.table_stride)?,
            i32_of(kernel, "page size", kv.page_size)?,
            i32_of(kernel, "heads", h)?,
            i32_of(kernel, "KV heads", hkv)?,
            i32_of(kernel, "head_dim", d)?,
            i32_of(kernel, "window", window)?,
        ])
    }

    /// Tiled prefill attention (`attention_prefill_f16`) of `t` query rows: blocks of
    /// [`PREFILL_ROWS`] (token, head) rows share each tile of K and V. `head_dim` at most
    /// [`PREFILL_MAX_HEAD_DIM`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill(
        &self,
        q: &impl DeviceSpan<f32>,
        kv: &PagedKv,
        pos: &impl DeviceSpan<i32>,
        slots: &impl DeviceSpan<i32>,
        t: usize,
        shape: AttnShape,
        y: &mut impl DeviceSpan<f32>,
    ) -> Result<(), CudaError> {
        let (q, pos, slots, y) = (q.span(), pos.span(), slots.span(), y.span());
        let name = "attention_prefill_f16";
        let [stride, page, hi, hkvi, di, win] =
            Self::attention_args(name, q, kv, pos, slots, t, shape, y, PREFILL_MAX_HEAD_DIM)?;
        let ratio = shape.n_heads / shape.n_kv_heads;
        let blocks_x = shape.n_kv_heads * ratio.div_ceil(PREFILL_ROWS);
        let tokens_per_block = PREFILL_ROWS / ratio.min(PREFILL_ROWS);
        let ti = i32_of(name, "tokens", t)?;
        let f = self.ks.function("attention", name)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(q.ptr())
            .arg(kv.k.ptr())
            .arg(kv.v.ptr())
            .arg(pos.ptr())
            .arg(slots.ptr())
            .arg(kv.tables.ptr());
        b.arg(&stride)
            .arg(&page)
            .arg(&ti)
            .arg(&hi)
            .arg(&hkvi)
            .arg(&di)
            .arg(&shape.scale)
            .arg(&win)
            .arg(y.ptr());
        launch(
            name,
            b,
            grid(blocks_x, t.div_ceil(tokens_per_block), 1, 128),
        )
    }

    /// Flash-decoding of every query row on its own: `attention_decode_g<G>_f16` (G query heads
    /// of one KV head a block, [`DecodeSplits::group`]) or `attention_decode_f16` (one head a
    /// block), at head dimensions 64 and 128 their lane-a-position counterparts
    /// (`attention_decode_lanes_d<D>_g<G>_f16`, [`DecodeSplits::family`]), over the splits
    /// `decode` gives, then `attention_combine` when there are several.
    /// Returns the path (split count and group). `part` is scratch of at least
    /// [`DecodeSplits::scratch_len`] floats.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode(
        &self,
        q: &impl DeviceSpan<f32>,
        kv: &PagedKv,
        pos: &impl DeviceSpan<i32>,
        slots: &impl DeviceSpan<i32>,
        positions: &[u32],
        shape: AttnShape,
        decode: &DecodeSplits,
        y: &mut impl DeviceSpan<f32>,
        part: &mut impl DeviceSpan<f32>,
    ) -> Result<AttnPath, CudaError> {
        let (q, pos, slots, y, part) = (q.span(), pos.span(), slots.span(), y.span(), part.span());
        let t = positions.len();
        let k = "attention";
        let [stride, page, hi, hkvi, di, win] =
            Self::attention_args(k, q, kv, pos, slots, t, shape, y, DECODE_MAX_HEAD_DIM)?;
        let (h, d) = (shape.n_heads, shape.head_dim);
        let splits = decode.splits(positions, shape);
        let need = decode.scratch_len(positions, shape);
        check(k, part.len() >= need, || {
            format!("scratch of {} floats, {need} needed", part.len())
        })?;
        let parts = t * h * splits;
        let min_split = i32_of(k, "min split", decode.min_split)?;
        let max_splits = i32_of(k, "max splits", decode.max_splits(shape))?;
        let s_i = i32_of(k, "splits", splits)?;
        let counters = part.sub(0, DECODE_COUNTERS, k)?;
        let pm = part.sub(DECODE_COUNTERS, parts, k)?;
        let pl = part.sub(DECODE_COUNTERS + parts, parts, k)?;
        let pa = part.sub(DECODE_COUNTERS + 2 * parts, parts * d, k)?;
        let group = decode.kernel_group(positions, shape);
        let family = decode.family(d);
        let merges = decode.merges(t, splits, shape, group);
        // The lanes kernels take the counters (0: no merge in the kernel).
        let no_counters: u64 = 0;
        {
            let name = DecodeSplits::kernel_name(family, group);
            let f = self.ks.function("attention", &name)?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(q.ptr())
                .arg(kv.k.ptr())
                .arg(kv.v.ptr())
                .arg(pos.ptr())
                .arg(slots.ptr())
                .arg(kv.tables.ptr());
            b.arg(&stride)
                .arg(&page)
                .arg(&hi)
                .arg(&hkvi)
                .arg(&di)
                .arg(&shape.scale)
                .arg(&win)
                .arg(&min_split)
                .arg(&max_splits);
            b.arg(pm.ptr()).arg(pl.ptr()).arg(pa.ptr()).arg(y.ptr());
            if family > 0 {
                b.arg(if merges { counters.ptr() } else { &no_counters });
            }
            launch(&name, b, grid(h / group.max(1), t, splits, 128))?;
        }
        let path = AttnPath::Decode { splits, group };
        if splits == 1 || merges {
            // The decode kernel wrote y itself.
            return Ok(path);
        }
        let name = "attention_combine";
        let f = self.ks.function("attention", name)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(pm.ptr())
            .arg(pl.ptr())
            .arg(pa.ptr())
            .arg(y.ptr())
            .arg(&hi)
            .arg(&di)
            .arg(&s_i);
        // A thread an element (D is a multiple of 32, at most 256).
        launch(name, b, grid(h, t, 1, d as u32))?;
        Ok(path)
    }

    /// Whether the prefill kernel pays for a step whose tokens belong to `slots`: its blocks
    /// share K/V tiles among neighbouring tokens of one sequence, so it needs runs (at least
    /// half the tokens follow a token of their own sequence). A batch of sequences decoding one
    /// token each has none and takes flash-decoding, the kernel a token alone takes.
    pub fn prefill_attention_pays(slots: &[u32]) -> bool {
        let continued = slots.windows(2).filter(|w| w[0] == w[1]).count();
        slots.len() > 1 && 2 * continued >= slots.len()
    }

    /// Per row of `x` (`rows` rows of `n`): the argmax (`ids[r]`, `vals[r]`) or, with `k > 0`,
    /// the top `k` (`ids[r * k + j]`).
    pub fn top_k(
        &self,
        x: &impl DeviceSpan<f32>,
        rows: usize,
        n: usize,
        k: usize,
        ids: &mut impl DeviceSpan<i32>,
        vals: &mut impl DeviceSpan<f32>,
    ) -> Result<(), CudaError> {
        let (x, ids, vals) = (x.span(), ids.span(), vals.span());
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
        b.arg(x.ptr()).arg(&ni);
        if k > 0 {
            b.arg(&ki);
        }
        b.arg(ids.ptr()).arg(vals.ptr());
        // kernels/sample.cu's SAMPLE_THREADS: a block per row, its threads' loads in flight.
        launch(name, b, grid(rows, 1, 1, 1024))
    }
}

/// Launch configuration of the grid-stride elementwise kernels: enough blocks to fill a large
/// GPU, never more than the elements need.
fn stride_grid(n: usize) -> LaunchConfig {
    grid(n.div_ceil(256).clamp(1, 4096), 1, 1, 256)
}

impl Ops<'_> {
    /// `y[r] = dequantize(table[ids[r]])` for `r < rows`: the embedding gather, for every
    /// weight type. An id outside the table gives a row of NaN (the step was validated first).
    pub fn embedding(
        &self,
        table: &super::matmul::DeviceWeight,
        ids: &impl DeviceSpan<i32>,
        rows: usize,
        y: &mut impl DeviceSpan<f32>,
    ) -> Result<(), CudaError> {
        let (ids, y) = (ids.span(), y.span());
        let sfx = super::weight_kernel_suffix(table.ty).unwrap_or("unsupported");
        let name = format!("embedding_{sfx}");
        check(
            &name,
            rows > 0 && ids.len() >= rows && y.len() >= rows * table.k,
            || {
                format!(
                    "{rows} ids of rows of {}, ids {} y {}",
                    table.k,
                    ids.len(),
                    y.len()
                )
            },
        )?;
        let (nr, e) = (
            i32_of(&name, "rows", table.n)?,
            i32_of(&name, "width", table.k)?,
        );
        let rb = table.row_bytes as i64;
        let f = self.ks.function("gather", &name)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&table.data)
            .arg(ids.ptr())
            .arg(y.ptr())
            .arg(&nr)
            .arg(&e)
            .arg(&rb);
        launch(&name, b, grid(rows, 1, 1, 128))
    }

    /// `y = a + b` or `y = a * b` (`mul`) over `n` values; `b` of `b_len` values repeats over
    /// `a`'s rows (a bias or scale vector) when shorter.
    pub fn binary(
        &self,
        mul: bool,
        a: &impl DeviceSpan<f32>,
        b: &impl DeviceSpan<f32>,
        b_len: usize,
        y: &mut impl DeviceSpan<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        let (a, bb, y) = (a.span(), b.span(), y.span());
        let name = if mul { "mul_f32" } else { "add_f32" };
        check(
            name,
            n > 0
                && b_len > 0
                && n.is_multiple_of(b_len)
                && a.len() >= n
                && bb.len() >= b_len
                && y.len() >= n,
            || format!("{n} values, b of {b_len}, a {} y {}", a.len(), y.len()),
        )?;
        let (ni, bl) = (n as i64, b_len as i64);
        let f = self.ks.function("elementwise", name)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(a.ptr()).arg(bb.ptr()).arg(y.ptr()).arg(&ni).arg(&bl);
        launch(name, l, stride_grid(n))
    }

    /// `y = silu(x)` over `n` values.
    pub fn silu(
        &self,
        x: &impl DeviceSpan<f32>,
        y: &mut impl DeviceSpan<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        let (x, y) = (x.span(), y.span());
        let name = "silu_f32";
        check(name, n > 0 && x.len() >= n && y.len() >= n, || {
            format!("{n} values, x {} y {}", x.len(), y.len())
        })?;
        let ni = n as i64;
        let f = self.ks.function("elementwise", name)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x.ptr()).arg(y.ptr()).arg(&ni);
        launch(name, b, stride_grid(n))
    }

    /// `y = silu(gate) * up` over `n` values (`y` may be `gate`).
    pub fn swiglu(
        &self,
        gate: &impl DeviceSpan<f32>,
        up: &impl DeviceSpan<f32>,
        y: &mut impl DeviceSpan<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        let (g, u, y) = (gate.span(), up.span(), y.span());
        let name = "swiglu_f32";
        check(
            name,
            n > 0 && g.len() >= n && u.len() >= n && y.len() >= n,
            || format!("{n} values, gate {} up {} y {}", g.len(), u.len(), y.len()),
        )?;
        let ni = n as i64;
        let f = self.ks.function("elementwise", name)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(g.ptr()).arg(u.ptr()).arg(y.ptr()).arg(&ni);
        launch(name, b, stride_grid(n))
    }

    /// `sum = a + b`, `normed = rms_norm(sum, w)` over groups of `w.len()` of the first `n`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rms_norm(
        &self,
        a: &impl DeviceSpan<f32>,
        b: &impl DeviceSpan<f32>,
        w: &impl DeviceSpan<f32>,
        sum: &mut impl DeviceSpan<f32>,
        normed: &mut impl DeviceSpan<f32>,
        n: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let (a, bb, w, s, y) = (a.span(), b.span(), w.span(), sum.span(), normed.span());
        let k = "add_rms_norm_f32";
        let g = w.len();
        check(
            k,
            g > 0
                && n.is_multiple_of(g)
                && a.len() >= n
                && bb.len() >= n
                && s.len() >= n
                && y.len() >= n,
            || format!("{n} values in groups of {g}"),
        )?;
        let gi = i32_of(k, "group", g)?;
        let (name, block) = norm_kernel(k, g);
        let f = self.ks.function("norm", &name)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(a.ptr())
            .arg(bb.ptr())
            .arg(w.ptr())
            .arg(s.ptr())
            .arg(y.ptr())
            .arg(&gi)
            .arg(&eps);
        launch(&name, l, grid(n / g, 1, 1, block))
    }

    /// Rotates `t` rows of heads of `rope.head_dim` in `x` into `y` by each row's position.
    pub fn rope(
        &self,
        x: &impl DeviceSpan<f32>,
        y: &mut impl DeviceSpan<f32>,
        pos: &impl DeviceSpan<i32>,
        t: usize,
        rope: &Rope,
    ) -> Result<(), CudaError> {
        let (x, y, pos) = (x.span(), y.span(), pos.span());
        let name = "rope_f32";
        let d = rope.head_dim;
        let row = x.len().checked_div(t.max(1)).unwrap_or(0);
        check(
            name,
            t > 0
                && d > 0
                && row > 0
                && row.is_multiple_of(d)
                && y.len() >= t * row
                && pos.len() >= t
                && rope.freq_factors_fit(),
            || format!("{t} rows of {row} in heads of {d}, y {}", y.len()),
        )?;
        let h = row / d;
        let f = self.ks.function("rope", name)?;
        let mut b = self.stream.launch_builder(&f);
        let null: u64 = 0;
        b.arg(x.ptr()).arg(y.ptr()).arg(pos.ptr());
        match &rope.freq_factors {
            Some(ff) => b.arg(ff.ptr()),
            None => b.arg(&null),
        };
        let args = rope.args(name, h)?;
        b.arg(&args.0)
            .arg(&args.1)
            .arg(&args.2)
            .arg(&args.3)
            .arg(&rope.freq_base)
            .arg(&rope.freq_scale);
        launch(name, b, grid(t * h, 1, 1, 64))
    }

    /// Writes `t` rows of K and V (`row` values each) as FP16 into their cells: the cell of
    /// token `i` is position `pos[i]` of slot `slots[i]`'s page table.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_write(
        &self,
        k: &impl DeviceSpan<f32>,
        v: &impl DeviceSpan<f32>,
        kv: &PagedKv,
        pos: &impl DeviceSpan<i32>,
        slots: &impl DeviceSpan<i32>,
        t: usize,
        row: usize,
    ) -> Result<(), CudaError> {
        let (k, v, pos, slots) = (k.span(), v.span(), pos.span(), slots.span());
        let name = "kv_write_f16";
        let n_cells = kv.n_cells(row);
        check(
            name,
            t > 0
                && row > 0
                && k.len() >= t * row
                && v.len() >= t * row
                && pos.len() >= t
                && slots.len() >= t
                && n_cells > 0,
            || format!("{t} rows of {row}, k {} v {}", k.len(), v.len()),
        )?;
        let (st, ps) = (
            i32_of(name, "table stride", kv.table_stride)?,
            i32_of(name, "page size", kv.page_size)?,
        );
        let (nc, rw) = (n_cells as i64, i32_of(name, "row", row)?);
        let f = self.ks.function("rope", name)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(k.ptr())
            .arg(v.ptr())
            .arg(kv.k.ptr())
            .arg(kv.v.ptr())
            .arg(pos.ptr())
            .arg(slots.ptr())
            .arg(kv.tables.ptr())
            .arg(&st)
            .arg(&ps)
            .arg(&nc)
            .arg(&rw);
        launch(name, b, grid(t, 1, 1, 128))
    }

    /// `kv_write(rope(k), v)` in one kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv_write(
        &self,
        k: &impl DeviceSpan<f32>,
        v: &impl DeviceSpan<f32>,
        kv: &PagedKv,
        pos: &impl DeviceSpan<i32>,
        slots: &impl DeviceSpan<i32>,
        t: usize,
        rope: &Rope,
    ) -> Result<(), CudaError> {
        let (k, v, pos, slots) = (k.span(), v.span(), pos.span(), slots.span());
        let name = "rope_kv_write_f16";
        let d = rope.head_dim;
        let row = k.len().checked_div(t.max(1)).unwrap_or(0);
        let n_cells = kv.n_cells(row);
        check(
            name,
            t > 0
                && d > 0
                && row > 0
                && row.is_multiple_of(d)
                && v.len() >= t * row
                && pos.len() >= t
                && slots.len() >= t
                && n_cells > 0
                && rope.freq_factors_fit(),
            || format!("{t} rows of {row} in heads of {d}, v {}", v.len()),
        )?;
        let hkv = row / d;
        let (st, ps) = (
            i32_of(name, "table stride", kv.table_stride)?,
            i32_of(name, "page size", kv.page_size)?,
        );
        let nc = n_cells as i64;
        let f = self.ks.function("rope", name)?;
        let mut b = self.stream.launch_builder(&f);
        let null: u64 = 0;
        b.arg(k.ptr())
            .arg(v.ptr())
            .arg(kv.k.ptr())
            .arg(kv.v.ptr())
            .arg(pos.ptr())
            .arg(slots.ptr())
            .arg(kv.tables.ptr())
            .arg(&st)
            .arg(&ps)
            .arg(&nc);
        match &rope.freq_factors {
            Some(ff) => b.arg(ff.ptr()),
            None => b.arg(&null),
        };
        let args = rope.args(name, hkv)?;
        b.arg(&args.0)
            .arg(&args.1)
            .arg(&args.2)
            .arg(&args.3)
            .arg(&rope.freq_base)
            .arg(&rope.freq_scale);
        launch(name, b, grid(t * hkv, 1, 1, 64))
    }

    /// `(rope(q), kv_write(rope(k), v))` in one kernel: the rotated queries into `q_rope`, the
    /// rotated keys and the values into their cells, as [`Ops::rope`] then
    /// [`Ops::rope_kv_write`].
    #[allow(clippy::too_many_arguments)]
    pub fn rope_qkv_write(
        &self,
        q: &impl DeviceSpan<f32>,
        q_rope: &mut impl DeviceSpan<f32>,
        k: &impl DeviceSpan<f32>,
        v: &impl DeviceSpan<f32>,
        kv: &PagedKv,
        pos: &impl DeviceSpan<i32>,
        slots: &impl DeviceSpan<i32>,
        t: usize,
        rope: &Rope,
    ) -> Result<(), CudaError> {
        let (q, q_rope, k, v) = (q.span(), q_rope.span(), k.span(), v.span());
        let (pos, slots) = (pos.span(), slots.span());
        let name = "rope_qkv_write_f16";
        let d = rope.head_dim;
        let q_row = q.len().checked_div(t.max(1)).unwrap_or(0);
        let row = k.len().checked_div(t.max(1)).unwrap_or(0);
        let n_cells = kv.n_cells(row);
        check(
            name,
            t > 0
                && d > 0
                && q_row > 0
                && q_row.is_multiple_of(d)
                && q_rope.len() >= t * q_row
                && row > 0
                && row.is_multiple_of(d)
                && v.len() >= t * row
                && pos.len() >= t
                && slots.len() >= t
                && n_cells > 0
                && rope.freq_factors_fit(),
            || {
                format!(
                    "{t} rows of q {q_row} and k {row} in heads of {d}, q_rope {}, v {}",
                    q_rope.len(),
                    v.len()
                )
            },
        )?;
        let (h, hkv) = (q_row / d, row / d);
        let (st, ps) = (
            i32_of(name, "table stride", kv.table_stride)?,
            i32_of(name, "page size", kv.page_size)?,
        );
        let tt = i32_of(name, "tokens", t)?;
        let nh = i32_of(name, "query heads", h)?;
        let nc = n_cells as i64;
        let f = self.ks.function("rope", name)?;
        let mut b = self.stream.launch_builder(&f);
        let null: u64 = 0;
        b.arg(q.ptr())
            .arg(q_rope.ptr())
            .arg(k.ptr())
            .arg(v.ptr())
            .arg(kv.k.ptr())
            .arg(kv.v.ptr())
            .arg(pos.ptr())
            .arg(slots.ptr())
            .arg(kv.tables.ptr())
            .arg(&st)
            .arg(&ps)
            .arg(&nc);
        match &rope.freq_factors {
            Some(ff) => b.arg(ff.ptr()),
            None => b.arg(&null),
        };
        let args = rope.args(name, hkv)?;
        b.arg(&tt)
            .arg(&nh)
            .arg(&args.0)
            .arg(&args.1)
            .arg(&args.2)
            .arg(&args.3)
            .arg(&rope.freq_base)
            .arg(&rope.freq_scale);
        launch(name, b, grid(t * (h + hkv), 1, 1, 64))
    }

    /// `y[o] = x[rows[o]]` for `o < n_out`, rows of `n` values out of `t`.
    pub fn select_rows(
        &self,
        x: &impl DeviceSpan<f32>,
        rows: &impl DeviceSpan<i32>,
        y: &mut impl DeviceSpan<f32>,
        t: usize,
        n_out: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        let (x, rows, y) = (x.span(), rows.span(), y.span());
        let name = "select_rows";
        check(
            name,
            n_out > 0 && n > 0 && x.len() >= t * n && rows.len() >= n_out && y.len() >= n_out * n,
            || format!("{n_out} of {t} rows of {n}, x {} y {}", x.len(), y.len()),
        )?;
        let (ti, ni) = (i32_of(name, "rows", t)?, i32_of(name, "width", n)?);
        let f = self.ks.function("gather", name)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x.ptr())
            .arg(rows.ptr())
            .arg(y.ptr())
            .arg(&ti)
            .arg(&ni);
        launch(name, b, grid(n_out, 1, 1, 128))
    }

    /// `flag[0] = min(flag[0], first index of a NaN or ±inf among x[..n])`; the caller sets
    /// `flag[0] = n` first.
    pub fn first_non_finite(
        &self,
        x: &impl DeviceSpan<f32>,
        n: usize,
        flag: &mut impl DeviceSpan<i32>,
    ) -> Result<(), CudaError> {
        let (x, flag) = (x.span(), flag.span());
        let name = "first_non_finite_f32";
        check(name, x.len() >= n && !flag.is_empty(), || {
            format!("{n} values, x {}", x.len())
        })?;
        let ni = i32_of(name, "n", n)?;
        let f = self.ks.function("sample", name)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x.ptr()).arg(&ni).arg(flag.ptr());
        launch(name, b, stride_grid(n.max(1)))
    }
}

/// A rotary embedding as the rope kernels take it (see `ir::op::RopeParams`).
#[derive(Clone, Debug)]
pub struct Rope {
    pub head_dim: usize,
    pub n_rot: usize,
    /// NeoX style (rotate halves) rather than adjacent pairs.
    pub neox: bool,
    pub freq_base: f32,
    pub freq_scale: f32,
    /// `n_rot / 2` frequency factors (Llama 3's long-context scaling), if the model has them.
    pub freq_factors: Option<Span<f32>>,
}

impl Rope {
    fn freq_factors_fit(&self) -> bool {
        self.n_rot <= self.head_dim
            && self.n_rot.is_multiple_of(2)
            && self.n_rot > 0
            && self.freq_factors.is_none_or(|f| f.len() >= self.n_rot / 2)
    }

    /// `(heads, head_dim, n_rot, neox)` as the kernels' 32-bit arguments.
    fn args(&self, kernel: &str, heads: usize) -> Result<(i32, i32, i32, i32), CudaError> {
        Ok((
            i32_of(kernel, "heads", heads)?,
            i32_of(kernel, "head_dim", self.head_dim)?,
            i32_of(kernel, "n_rot", self.n_rot)?,
            i32::from(self.neox),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::{
        AttnShape, DECODE_COUNTERS, DECODE_FAMILIES, DECODE_GROUPED_FROM,
        DECODE_LANES_GROUPED_FROM, DECODE_MAX_SPLITS, DECODE_MIN_SPLIT, DecodeSplits, Ops,
        norm_kernel,
    };

    fn shape(n_heads: usize, n_kv_heads: usize, window: usize) -> AttnShape {
        AttnShape {
            n_heads,
            n_kv_heads,
            head_dim: 128,
            scale: 1.0,
            window,
        }
    }

    #[test]
    fn decode_blocks_group_the_query_heads_of_a_kv_head() {
        let d = DecodeSplits::new(132);
        // llama3-8b 32/8, SmolLM2 9/3, qwen2.5-7b 28/4, MHA, 16/1 (8 of 16), 12/1 (6), 11/1.
        for (h, hkv, g) in [(32, 8, 4), (9, 3, 3), (28, 4, 7), (8, 8, 1), (16, 1, 8)] {
            assert_eq!(d.group(shape(h, hkv, 0)), g, "{h}/{hkv}");
        }
        assert_eq!(d.group(shape(12, 1, 0)), 6);
        assert_eq!(d.group(shape(11, 1, 0)), 1);
        let off = DecodeSplits {
            grouped: false,
            ..d
        };
        assert_eq!(off.group(shape(32, 8, 0)), 0);
    }

    #[test]
    fn head_dims_64_and_128_take_the_lane_a_position_kernels_unless_switched_off() {
        let d = DecodeSplits::new(132);
        assert_eq!(d.family(64), 1);
        assert_eq!(d.family(128), 2);
        for other in [32, 96, 160, 256] {
            assert_eq!(d.family(other), 0, "{other}");
        }
        let off = DecodeSplits { lanes: false, ..d };
        assert_eq!(off.family(128), 0);
        // One query head a block is a lanes family's G = 1 kernel.
        let names =
            [(0, 0), (0, 4), (1, 0), (2, 1), (2, 7)].map(|(f, g)| DecodeSplits::kernel_name(f, g));
        assert_eq!(
            names,
            [
                "attention_decode_f16",
                "attention_decode_g4_f16",
                "attention_decode_lanes_d64_g1_f16",
                "attention_decode_lanes_d128_g1_f16",
                "attention_decode_lanes_d128_g7_f16",
            ]
        );
    }

    #[test]
    fn long_contexts_take_the_grouped_kernel_over_the_same_splits() {
        // The general kernels first.
        let d = DecodeSplits {
            lanes: false,
            ..DecodeSplits::new(132)
        };
        let s8b = shape(32, 8, 0);
        // Positions are 0-based: a context of len positions ends at len - 1.
        let at = |len: usize| [len as u32 - 1];
        for len in [1, 128, 2048, DECODE_GROUPED_FROM - DECODE_MIN_SPLIT] {
            assert_eq!(d.kernel_group(&at(len), s8b), 0, "{len}");
        }
        for len in [DECODE_GROUPED_FROM, DECODE_GROUPED_FROM + 1, 8192, 100_000] {
            assert_eq!(d.kernel_group(&at(len), s8b), 4, "{len}");
        }
        // The longest context of a batch decides; a window caps it.
        assert_eq!(d.kernel_group(&[3, 9000, 5], s8b), 4);
        assert_eq!(d.kernel_group(&[9000], shape(32, 8, 2048)), 0);
        // A function of the graph key: contexts with one key take one kernel.
        for len in (1..20_000).step_by(97) {
            let same = d.context_units(len) == d.context_units(DECODE_GROUPED_FROM);
            if same {
                assert_eq!(d.kernel_group(&at(len), s8b), 4, "{len}");
            }
        }
        let always = DecodeSplits {
            grouped_from: [0; DECODE_FAMILIES],
            ..d
        };
        assert_eq!(always.kernel_group(&at(1), s8b), 4);
        // The splits do not depend on the kernel taken.
        assert_eq!(d.splits(&at(4096), s8b), always.splits(&at(4096), s8b));
        // A grouped launch that would leave multiprocessors without a block for one token
        // takes the per-head kernel: SmolLM2's shape (9 heads over 3) splits 4 096 positions
        // in 32, 3 x 32 grouped blocks < 132; 16 384 in 128, 3 x 128 >= 132.
        let smol = shape(9, 3, 0);
        assert_eq!(d.splits(&at(4096), smol), 32);
        assert_eq!(d.kernel_group(&at(4096), smol), 0);
        assert_eq!(d.kernel_group(&at(16384), smol), 3);
        assert_eq!(always.kernel_group(&at(4096), smol), 3);
        // On an M40 (24 SMs) the 8B shape goes grouped at 4 096 (8 x its splits >= 24).
        let m40 = DecodeSplits::new(24);
        assert_eq!(m40.kernel_group(&at(4096), s8b), 4);
        // The lane-a-position kernels (head_dim 128) group from DECODE_LANES_GROUPED_FROM on,
        // where the grouped launch fills the device: 2 048 positions are 16 splits, 8 x 16 =
        // 128 blocks < 132; 2 176 are 17.
        let lanes = DecodeSplits::new(132);
        assert_eq!(lanes.family(128), 2);
        for len in [1, 128, DECODE_LANES_GROUPED_FROM - DECODE_MIN_SPLIT, 2048] {
            assert_eq!(lanes.kernel_group(&at(len), s8b), 0, "{len}");
        }
        for len in [2176, DECODE_GROUPED_FROM, 100_000] {
            assert_eq!(lanes.kernel_group(&at(len), s8b), 4, "{len}");
        }
        assert_eq!(m40.kernel_group(&at(DECODE_LANES_GROUPED_FROM), s8b), 4);
        // Several tokens go grouped once a context splits (more than DECODE_MIN_SPLIT
        // positions), in both families; one split keeps one head a block.
        for d in [
            lanes,
            DecodeSplits {
                lanes: false,
                ..lanes
            },
        ] {
            let len = DECODE_MIN_SPLIT as u32;
            assert_eq!(d.kernel_group(&[len - 1, 3], s8b), 0);
            assert_eq!(d.kernel_group(&[len, 3], s8b), 4);
            assert_eq!(d.kernel_group(&[1023; 8], s8b), 4);
            assert_eq!(d.kernel_group(&[1023], s8b), 0);
            assert_eq!(d.kernel_group(&[1023, 1023], smol), 3);
        }
        // Without grouping there is nothing to take.
        let per_head = DecodeSplits {
            grouped: false,
            ..lanes
        };
        assert_eq!(per_head.kernel_group(&[1023; 8], s8b), 0);
    }

    #[test]
    fn norms_keep_several_elements_a_thread_in_registers() {
        let k = |g| norm_kernel("rms_norm_f32", g);
        assert_eq!(k(64), ("rms_norm_f32".to_string(), 64));
        assert_eq!(k(576), ("rms_norm_f32".to_string(), 576));
        assert_eq!(k(1024), ("rms_norm_f32".to_string(), 1024));
        assert_eq!(k(1025), ("rms_norm_f32_e2".to_string(), 1024));
        assert_eq!(k(2048), ("rms_norm_f32_e2".to_string(), 1024));
        assert_eq!(k(3072), ("rms_norm_f32_e4".to_string(), 1024));
        assert_eq!(k(4096), ("rms_norm_f32_e4".to_string(), 1024));
        assert_eq!(k(5120), ("rms_norm_f32_e8".to_string(), 1024));
        assert_eq!(k(8192), ("rms_norm_f32_e8".to_string(), 1024));
        assert_eq!(k(8193), ("rms_norm_f32".to_string(), 1024));
    }

    #[test]
    fn the_lanes_kernels_merge_split_contexts_that_have_counters() {
        let d = DecodeSplits::new(132);
        let s8b = shape(32, 8, 0);
        // One split: the kernel writes y; several: the last block of a head merges (G = 1 is
        // one head a block too); grouped launches leave it to attention_combine.
        assert!(!d.merges(1, 1, s8b, 0));
        assert!(d.merges(1, 32, s8b, 0));
        assert!(d.merges(1, 32, s8b, 1));
        assert!(!d.merges(1, 32, s8b, 4));
        // A counter for each (token, block of a split), else attention_combine.
        assert!(d.merges(DECODE_COUNTERS / 32, 2, s8b, 0));
        assert!(!d.merges(DECODE_COUNTERS / 32 + 1, 2, s8b, 0));
        // Not in the general kernels, nor with the switch off.
        assert!(!DecodeSplits { lanes: false, ..d }.merges(1, 32, s8b, 0));
        assert!(!DecodeSplits { merge: false, ..d }.merges(1, 32, s8b, 0));
        // The counters come first in the scratch.
        assert_eq!(d.scratch_len(&[4095], s8b), DECODE_COUNTERS + 32 * 32 * 130);
    }

    #[test]
    fn decode_splits_aim_at_blocks_per_sm_and_keep_short_contexts_whole() {
        let s8b = shape(32, 8, 0);
        let h200 = DecodeSplits::new(132);
        // 4 blocks on each of 132 SMs over 8 blocks a split (4 heads a block).
        assert_eq!(h200.max_splits(s8b), 66);
        // Short contexts: one split (no combine launch).
        for len in [1, 7, 128] {
            assert_eq!(h200.splits_of(len, s8b), 1, "{len}");
        }
        assert_eq!(h200.splits_of(129, s8b), 2);
        // Depth 4096: 32 splits of 128 (256 blocks); 16384: 66 of 256 (the last two empty).
        assert_eq!(h200.splits(&[4095], s8b), 32);
        assert_eq!(h200.chunk_of(4096, s8b), 128);
        assert_eq!(h200.splits(&[16383], s8b), 66);
        assert_eq!(h200.chunk_of(16384, s8b), 256);
        // One head a block: four times the blocks a split, a quarter of the splits.
        let per_head = DecodeSplits {
            grouped: false,
            ..h200
        };
        assert_eq!(per_head.max_splits(s8b), 16);
        // No more than fit at once: 3 blocks of the G 4 kernel a multiprocessor (head_dim 128:
        // the lane-a-position family; the general family's residency does not apply to it).
        let mut resident = [[0; 9]; DECODE_FAMILIES];
        resident[h200.family(128)][4] = 3;
        let fit = DecodeSplits { resident, ..h200 };
        assert_eq!(fit.max_splits(s8b), 49);
        let general = DecodeSplits {
            lanes: false,
            ..fit
        };
        assert_eq!(general.max_splits(s8b), 66);
        // Unknown residency (G 3 here): 4 a multiprocessor, 176 splits, capped at 128.
        assert_eq!(fit.max_splits(shape(9, 3, 0)), DECODE_MAX_SPLITS);
        // The M40's 24 SMs: 12 splits at most for the 8B shape.
        let m40 = DecodeSplits::new(24);
        assert_eq!(m40.splits(&[4095], s8b), 12);
        assert_eq!(m40.chunk_of(4096, s8b), 352);
        // A launch runs the longest context's splits; a window caps the context.
        assert_eq!(h200.splits(&[3, 4095, 700], s8b), 32);
        assert_eq!(h200.splits(&[3, 4095, 700], shape(32, 8, 300)), 3);
        // Scratch: (m, l, acc[128]) per token, head and split.
        assert_eq!(
            h200.scratch_len(&[4095, 3], s8b),
            DECODE_COUNTERS + 2 * 32 * 32 * 130
        );
        assert!(h200.max_splits(shape(64, 1, 0)) <= DECODE_MAX_SPLITS);
    }

    #[test]
    fn decode_chunks_cover_the_context_and_match_the_kernels_formula() {
        // The values tests/host/kernels.cpp checks attn_decode_chunk against.
        let chunk = |len, min_split, max_splits| {
            let d = DecodeSplits {
                sms: 1,
                blocks_per_sm: max_splits,
                min_split,
                grouped: false,
                grouped_from: [0; DECODE_FAMILIES],
                lanes: true,
                merge: true,
                resident: [[0; 9]; DECODE_FAMILIES],
            };
            d.chunk_of(len, shape(1, 1, 0))
        };
        for (len, min_split, max_splits, want) in [
            (4096, 128, 66, 128),
            (4097, 128, 66, 128),
            (16384, 128, 66, 256),
            (300, 128, 64, 128),
            (1000, 128, 3, 352),
            (1, 128, 64, 32),
            (600, 128, 1, 608),
        ] {
            assert_eq!(chunk(len, min_split, max_splits), want, "{len}");
        }
        for d in [
            DecodeSplits::new(132),
            DecodeSplits::new(24),
            DecodeSplits::new(1),
        ] {
            for sh in [
                shape(32, 8, 0),
                shape(9, 3, 0),
                shape(28, 4, 0),
                shape(11, 1, 0),
            ] {
                let mut last = 1;
                for len in 1..20_000 {
                    let (s, c) = (d.splits_of(len, sh), d.chunk_of(len, sh));
                    assert!(s * c >= len && c % 32 == 0, "{len}: {s} x {c}");
                    // Monotone: the longest context's splits are the most any token needs.
                    assert!(s >= last, "{len}: {s} after {last}");
                    last = s;
                }
            }
        }
    }

    #[test]
    fn the_context_units_determine_every_split_count() {
        // The graph key: two steps of the same units launch the same splits at every shape
        // and window (so a replayed graph is the right one).
        for d in [DecodeSplits::new(132), DecodeSplits::new(24)] {
            let mut by_units = std::collections::HashMap::new();
            for longest in 1..20_000usize {
                let u = d.context_units(longest);
                let got: Vec<usize> = [shape(32, 8, 0), shape(9, 3, 0), shape(4, 4, 0)]
                    .into_iter()
                    .flat_map(|sh| {
                        [0, 1, 100, 129, 4096]
                            .map(|w| d.splits(&[longest as u32 - 1], AttnShape { window: w, ..sh }))
                    })
                    .collect();
                let want = by_units.entry(u).or_insert_with(|| got.clone());
                assert_eq!(*want, got, "longest {longest}, units {u}");
            }
        }
    }

    #[test]
    fn the_prefill_kernel_takes_runs_of_one_sequence_and_decode_batches_do_not() {
        let pays = Ops::prefill_attention_pays;
        // One token, or one token for each of several sequences: flash-decoding.
        assert!(!pays(&[]));
        assert!(!pays(&[3]));
        assert!(!pays(&[0, 1, 2, 3, 4, 5, 6, 7]));
        assert!(!pays(&[0, 1, 0, 1]));
        // A prompt, two prompts, a prompt chunk beside a few decoding sequences.
        assert!(pays(&[0, 0]));
        assert!(pays(&[2; 37]));
        assert!(pays(&[0, 0, 1, 1]));
        assert!(pays(&[4, 4, 4, 4, 4, 4, 1, 2, 3]));
        // Mostly single tokens with one short run: decode.
        assert!(!pays(&[0, 0, 0, 1, 2, 3, 4]));
    }
}
