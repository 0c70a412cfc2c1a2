//! Weights on the device in their GGUF block layout, and `y = x Wᵀ` over them, by row count:
//! the unit kernels (kernels/matvec.cu) for up to [`UNIT_MAX_ROWS`] rows (decode of a few
//! sequences: each weight read once per launch of up to 8 rows), the tiled kernels (kernels/mmq.cu) for up to
//! [`TILED_MAX_ROWS`] (batched decode: each weight block decoded once per launch into shared
//! memory, then a register-tiled FP32 GEMM), and cuBLAS SGEMM on weights dequantized tile-wise
//! into FP32 scratch for more rows (prefill); with cuBLAS off (`M40LLM_ENABLE_CUBLAS=0`) the
//! tiled kernels take every count above [`UNIT_MAX_ROWS`], in launches of 64 rows. On sm_70 and
//! newer, prefill's cuBLAS calls may instead take FP16 operands on tensor cores
//! ([`GemmPrecision::F16`]: weights dequantized tile-wise to FP16, F16 weights read in place, the
//! activations rounded to FP16, `cublasGemmEx` with FP32 output and accumulation) or TF32 math
//! ([`GemmPrecision::Tf32`], sm_80+): [`Matmul::set_gemm`]. Shapes the
//! unit and tiled kernels do not take (K not a multiple of 32, activations not 16-byte aligned)
//! run on the plain reference kernel.
//!
//! # Batch invariance
//! Each path computes a row the same way whatever the other rows are: the unit kernels' sum order
//! does not depend on R (nor on the columns a block: the K-quants' one-column-a-warp kernels at
//! one row emulate the one-column block, bit for bit, so row 0 of their R = 2, 4 and 8 kernels
//! agrees with them; tests/host/kernels.cpp checks it), and the tiled kernels sum each output in one FMA chain over k (per
//! split of K, the splits added in order) with the split count a function of N, K and the device
//! only ([`Matmul::tiled_splits`]). So a sequence's logits are bit for bit the same in any batch
//! of 1 to 8 rows, and in any batch of 9 to 64 (any count above 8 with cuBLAS off); between the
//! two ranges (and past 64 with cuBLAS) the sum order changes and the results differ in the last
//! bits. With [`GemmPrecision::Tf32`] the ranges are 1 to 7 rows (the unit kernels) and
//! [`TC_MIN_ROWS`] to 64 (the tensor-core tiled kernels, kernels/mmqt.cu: each output's MMAs
//! depend on its own weight row and x row only, over the same split of K).
//!
//! # The cuBLAS contract (row-major activations, column-major cuBLAS)
//! m40-llm's activations and dequantized weights are row-major: `x` is `[R, K]`, `W` is
//! `[N, K]` (GGUF `ne = [K, N]`), `y` is `[R, N]`, each row contiguous. cuBLAS is column-major.
//! A row-major `[A, B]` array is the column-major `B × A` matrix of the same bytes (its
//! transpose), so `y = x Wᵀ` (row-major) is `yᵀ = W xᵀ` (column-major), computed as
//! `sgemm(transa = T, transb = N, m = N, n = R, k = K, A = W, lda = K, B = x, ldb = K, C = y,
//! ldc = N)`: `A` holds `W` as the column-major `K × N` matrix `Wᵀ`, which `transa = T` turns back
//! into `W` (`N × K`); `B` holds `x` as the column-major `K × R` matrix `xᵀ`; `C` receives the
//! column-major `N × R` matrix `yᵀ`, i.e. row-major `y`. A tile of output columns `n0..n0+m` of
//! `y` (rows `n0..n0+m` of `W`, dequantized alone) is the same call with `m` rows, `A` the tile,
//! `C = y + n0` and `ldc = N` still.

use super::mem::DeviceSpan;
use super::{CudaError, KernelSet, weight_kernel_suffix};
use crate::backend::target::GemmPrecision;
use crate::gguf::GgmlType;
use cudarc::cublas::{CudaBlas, sys::cublasOperation_t};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Zero bytes after each weight matrix on the device: the walking unit decoders (Q4_0, Q8_0 in
/// kernels/matvec.cu) read the aligned word after a unit's last one whatever the alignment, up to
/// 8 bytes past the last row.
pub const UNIT_OVERREAD: usize = 16;

/// A weight matrix `[n, k]` on the device, in its GGUF storage type, byte for byte, then
/// [`UNIT_OVERREAD`] zero bytes (`data` holds `n * row_bytes + UNIT_OVERREAD`).
pub struct DeviceWeight {
    pub ty: GgmlType,
    pub n: usize,
    pub k: usize,
    pub row_bytes: usize,
    pub data: CudaSlice<u8>,
}

impl DeviceWeight {
    /// Uploads `bytes` (`n` rows of `k` elements of type `ty`). `name` is for errors.
    pub fn upload(
        stream: &Arc<CudaStream>,
        name: &str,
        ty: GgmlType,
        n: usize,
        k: usize,
        bytes: &[u8],
    ) -> Result<DeviceWeight, CudaError> {
        let bad = |reason: String| CudaError::Launch {
            kernel: format!("upload of {name}"),
            reason,
        };
        if weight_kernel_suffix(ty).is_none() {
            return Err(bad(format!("the CUDA kernels cannot read {ty:?} weights")));
        }
        let row_bytes = ty
            .row_bytes(k as u64)
            .ok_or_else(|| bad(format!("{k} is not a whole number of {ty:?} blocks")))?
            as usize;
        if Some(bytes.len()) != n.checked_mul(row_bytes) {
            return Err(bad(format!(
                "{} bytes for {n} rows of {row_bytes} bytes",
                bytes.len()
            )));
        }
        let what = format!("uploading {name} ({} bytes)", bytes.len());
        let mut data = stream
            .alloc_zeros::<u8>(bytes.len() + UNIT_OVERREAD)
            .map_err(CudaError::driver(what.clone()))?;
        stream
            .memcpy_htod(bytes, &mut data.slice_mut(..bytes.len()))
            .map_err(CudaError::driver(what))?;
        Ok(DeviceWeight {
            ty,
            n,
            k,
            row_bytes,
            data,
        })
    }
}

/// Whether multi-token matmuls use cuBLAS: yes unless `M40LLM_ENABLE_CUBLAS=0`.
pub fn cublas_enabled_by_env() -> bool {
    std::env::var("M40LLM_ENABLE_CUBLAS").map_or(true, |v| v.trim() != "0")
}

/// FP32 elements of dequantized weight tiles the cuBLAS path keeps in scratch (64 MiB), or the
/// largest matrix if smaller: a bounded scratch, not a copy of every weight in FP32.
pub const TILE_SCRATCH_FLOATS: usize = 16 << 20;

/// FP16 elements of dequantized weight tiles the FP16 GEMM keeps in scratch: the same 64 MiB,
/// twice the rows a tile (fewer, larger GEMMs).
pub const TILE_SCRATCH_HALVES: usize = 2 * TILE_SCRATCH_FLOATS;

/// FP16 elements the activations of an FP16 GEMM of `rows` rows of `k` take at the start of the
/// scratch: rounded up to 256 bytes, so the weight tile after them is 256-byte aligned.
fn f16_activation_halves(rows: usize, k: usize) -> usize {
    (rows * k).div_ceil(128) * 128
}

/// Up to this many rows run on the unit kernels (`mmv_<ty>_r<R>`, R = 8, 4, 2, 1: launches of
/// the largest that fits what is left, so 8 rows are one launch and 7 are three). Past 8 rows a unit launch would read and decode every
/// weight again per 8 rows, and at 8 rows the units already spend an FMA per weight per row on
/// top of the decode; the tiled kernels decode once and keep every thread's FMAs fed from
/// registers (4 x 4 outputs per thread), which is what a batch of 9 and more needs.
pub const UNIT_MAX_ROWS: usize = 8;

/// Up to this many rows run on the tiled kernels (kernels/mmq.cu) even with cuBLAS on, and
/// every decode step of up to this many tokens is captured as a CUDA graph (no cuBLAS in it).
/// cuBLAS first writes and reads each weight as FP32 (8 bytes a weight against 0.56 for Q4_0),
/// and at these row counts both are FP32 FMA bound, so the tiled kernel should be no slower (not
/// yet timed against cuBLAS: `kernel_timings_for_the_record` prints both paths' numbers); 64 is
/// the widest row tile the tiled kernels are compiled for, so a batch of up to 64 reads and
/// decodes each weight once.
pub const TILED_MAX_ROWS: usize = 64;

/// The row counts the unit kernels are compiled for (`mmv_<ty>_r<R>`), largest first: a launch
/// takes the largest that fits what is left.
const UNIT_ROWS: [usize; 4] = [8, 4, 2, 1];

/// The row tiles the tiled kernels are compiled for (`mmq_<ty>_r<BR>`) and their threads a
/// block (`4 BR`: a thread computes 4 rows x 8 columns of the block's BR x 128, kernels/mmq.cu
/// `MMQ`), smallest first: a launch of R rows takes the smallest
/// tile of at least R (rows past R are zeros in shared memory and cost FMAs, not loads), so
/// 9..16 rows run 64 threads a block, 17..32 128, 33..64 256.
const TILED_TILES: [(usize, u32); 3] = [(16, 64), (32, 128), (64, 256)];

/// With [`GemmPrecision::Tf32`] (sm_80+), launches of this many rows up to [`TILED_MAX_ROWS`]
/// run the tensor-core tiled kernels (`mmqt_<ty>_r<8 NT>`, kernels/mmqt.cu): TF32 MMAs, so
/// each weight is decoded once a launch and the rows cost tensor-core steps, not FP32 FMAs.
/// Fewer rows stay on the unit kernels: on the H200 (8B Q4_0, tg32xB) the tensor-core kernels
/// lost at 2 and 4 rows (290 / 572 tokens/s against 422 / 690: too few weight loads in flight
/// a warp to keep the memory busy) and won at 8 (1 091 against 1 050), 16 (1 995 / 1 124) and
/// past.
pub const TC_MIN_ROWS: usize = 8;

/// The row tiles the tensor-core tiled kernels are compiled for (128 threads each: 4 warps of
/// 32 columns, `8 NT` rows as NT MMA n-tiles), smallest first.
const TC_TILES: [(usize, u32); 4] = [(8, 128), (16, 128), (32, 128), (64, 128)];

/// Output columns a tiled block computes (128 weight rows: for gate/up 64 of each matrix).
const TILED_COLS: usize = 128;

/// The K-slab a tiled block decodes at a time: the split of K is in whole slabs.
const TILED_SLAB: usize = 32;

/// The tiled kernels split K until the grid has about this many blocks per SM (so N = 4096 on
/// an H200's 132 SMs, 32 column tiles, runs in 16 splits; an 8B's FFN, 112 tiles, in 10):
/// smaller blocks of work even out the SMs' shares, more splits cost partial sums. Measuring:
/// `M40LLM_TILED_BLOCKS` ([`tiled_blocks_from_env`]).
const TILED_BLOCKS_PER_SM: usize = 8;

/// `M40LLM_TILED_BLOCKS`: the tiled kernels' target blocks per SM (1 to 64; unset or empty:
/// [`TILED_BLOCKS_PER_SM`]). Another value changes the split of K, hence the last bits of a
/// batch's results, for the whole process (batch invariance holds for any one value).
pub fn tiled_blocks_from_env(value: Option<&str>) -> Result<usize, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(TILED_BLOCKS_PER_SM),
        Some(v) => match v.parse::<usize>() {
            Ok(b @ 1..=64) => Ok(b),
            _ => Err(format!(
                "M40LLM_TILED_BLOCKS=`{v}`: the tiled kernels' blocks per SM are 1 to 64 \
                 (unset: {TILED_BLOCKS_PER_SM})"
            )),
        },
    }
}

/// ...but no split shorter than this many elements (a super-block of the K-quants): the
/// partial sums each split writes and the reduction reads stay small beside the weights. A
/// matrix whose splits of this length would leave SMs without a block splits further, until
/// each has one (SmolLM2's 576 x 576 on an H200: 5 column tiles, 18 splits of a slab).
const TILED_MIN_SPLIT: usize = 256;

/// Which path a matmul took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPath {
    /// The unit kernels on the stored blocks, in `launches` launches of up to 8 rows.
    Units { launches: usize },
    /// The tiled kernels on the stored blocks, in `launches` launches of up to 64 rows, K split
    /// in `splits` (more than one: partial sums in scratch, then a reduction launch per launch).
    Tiled { launches: usize, splits: usize },
    /// The tensor-core tiled kernels (kernels/mmqt.cu: TF32 MMAs, FP32 accumulation; sm_80+
    /// with [`GemmPrecision::Tf32`]) for [`TC_MIN_ROWS`] to [`TILED_MAX_ROWS`] rows a launch,
    /// K split as [`MatmulPath::Tiled`]'s.
    TiledTf32 { launches: usize, splits: usize },
    /// Dequantize tiles of `W` into scratch, cuBLAS SGEMM per tile (TF32 math with
    /// [`GemmPrecision::Tf32`]).
    CublasSgemm { tiles: usize },
    /// The activations rounded to FP16 in scratch, then `cublasGemmEx` on FP16 operands per tile
    /// of `W` dequantized to FP16, FP32 output and accumulation ([`GemmPrecision::F16`]); `tiles`
    /// is 0 for an F16 weight, read in place by one call.
    CublasF16 { tiles: usize },
    /// The plain reference kernel (a shape the unit kernels do not take).
    PlainKernel,
    /// One launch of the unit kernels over `matrices` matrices of one type and K at one row
    /// (`mmv3_<ty>_r1[_c1|_wc]`: the plan's multi_matmul, Q, K and V).
    UnitsMulti { matrices: usize },
}

/// The most matrices one `mmv3_<ty>_r1` launch takes.
pub const MULTI_MAX: usize = 3;

/// Whether the unit and tiled kernels take this shape: whole units of 32 along K, and 16-byte
/// aligned activation rows (they are read as float4).
fn units_take(k: usize, x: u64) -> bool {
    k.is_multiple_of(32) && x.is_multiple_of(16)
}

/// The weights of a one-row multi_matmul grouped by type and K (indices into `ws`, a group at
/// most [`MULTI_MAX`]), in the order of each group's first weight.
fn multi_groups(ws: &[&DeviceWeight]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, w) in ws.iter().enumerate() {
        let same =
            |g: &&mut Vec<usize>| g.len() < MULTI_MAX && ws[g[0]].ty == w.ty && ws[g[0]].k == w.k;
        match groups.iter_mut().find(same) {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    groups
}

/// Output columns per block of `mmv_<ty>_r<rows>` and `gate_up_swiglu_<ty>_r<rows>`
/// (kernels/matvec.cu `Cols`): 4 (2 for gate/up, whose two matrices share the x loads too),
/// but 2 (1) for the K-quants at 8 rows, whose scale shuffles and accumulators at 4 columns
/// held 168 registers a thread. The `_r1_c1` variants compute one, the `_r1_wc` ones one a warp
/// ([`unit_kernel`]).
pub fn unit_cols(ty: GgmlType, gate_up: bool, rows: usize) -> usize {
    let cols = if is_k_quant(ty) && rows == 8 { 2 } else { 4 };
    if gate_up { cols / 2 } else { cols }
}

/// The types whose unit kernels are sub-block scaled (kernels/matvec.cu `IsScaled`: super-blocks
/// of 256, a scale a half unit), with their own column counts and `_r1_wc` kernels.
fn is_k_quant(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K)
}

/// Rows at least this many take the several-column kernel at one row (blocks to spare).
const COLS_MIN_ROWS: usize = 4096;

/// The unit kernel `prefix_<sfx>_r<rows>[_c1|_wc<W>]` for an `[n, k]` weight of `ty` on a
/// device of `sms` multiprocessors, and its output columns per block (launched with
/// `unit_block(k)` threads). At one row, several columns only for the 32-element-block quantized
/// types with at least `COLS_MIN_ROWS` rows (measured on the H200: 7% faster for an 8B's Q4_0
/// and Q8_0; for F16, and for matrices as narrow as SmolLM2's, one column is 10-16% faster, as
/// 4x the blocks stay in flight). The K-quants take one column at one row: four columns left an
/// 8B's 4096-row Q4_K matrices at a quarter of the blocks (1024), and its Q4_K_M decode at 129
/// tokens/s. Where their block is 128 threads (K >= 1024) they take the one-column-a-warp
/// kernels (`_wc`, 4 columns a block): a warp computes what the one-column kernel's whole block
/// computes, bit for bit (its 4 warps emulated, kernels/matvec.cu `wc_impl`), without the
/// block's reduction and with 4x the units a thread over which to spread the walk setup and the
/// warp sum; and with two or four warps a column (`_wc2`, `_wc4`: the same bits) where one
/// would leave the device short of blocks ([`wc_warps`]).
pub fn unit_kernel(
    prefix: &str,
    ty: GgmlType,
    gate_up: bool,
    rows: usize,
    n: usize,
    k: usize,
    wc: WcWarps,
) -> (String, usize) {
    let sfx = weight_kernel_suffix(ty).unwrap_or("unsupported");
    let cols = unit_cols(ty, gate_up, rows);
    let float = matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
    let k_quant = is_k_quant(ty);
    if rows == 1 && k_quant && unit_block(k) == WC_BLOCK {
        let warps = wc.warps(ty, n, k);
        let tag = if warps == 1 {
            String::new()
        } else {
            warps.to_string()
        };
        (format!("{prefix}_{sfx}_r1_wc{tag}"), WC_COLUMNS / warps)
    } else if rows == 1 && cols > 1 && (float || k_quant || n < COLS_MIN_ROWS) {
        (format!("{prefix}_{sfx}_r1_c1"), 1)
    } else {
        (format!("{prefix}_{sfx}_r{rows}"), cols)
    }
}

/// How many warps the `_wc` kernels give a column: chosen per launch from the device's
/// multiprocessors ([`wc_warps`]), or one count for every launch (`M40LLM_WC_WARPS`, for
/// measuring; every count gives the same bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WcWarps {
    /// [`wc_warps`] on a device of this many multiprocessors.
    Auto { sms: usize },
    /// This many (1, 2 or 4).
    Fixed(usize),
}

impl WcWarps {
    /// From `M40LLM_WC_WARPS` (unset or empty: [`WcWarps::Auto`]); anything but 1, 2 or 4 is
    /// an error naming the value.
    pub fn from_env(value: Option<&str>, sms: usize) -> Result<WcWarps, String> {
        match value.map(str::trim) {
            None | Some("") => Ok(WcWarps::Auto { sms }),
            Some(v) => match v.parse::<usize>() {
                Ok(w @ (1 | 2 | 4)) => Ok(WcWarps::Fixed(w)),
                _ => Err(format!(
                    "M40LLM_WC_WARPS=`{v}`: the K-quant decode kernels take 1, 2 or 4 warps a \
                     column (unset: chosen per matrix)"
                )),
            },
        }
    }

    /// The warps a column for an `[n, k]` weight of `ty`.
    pub fn warps(self, ty: GgmlType, n: usize, k: usize) -> usize {
        match self {
            WcWarps::Auto { sms } => wc_warps(ty, n, k, sms),
            WcWarps::Fixed(w) => w,
        }
    }
}

/// Blocks an SM under which (at one warp a column) any K-quant's column takes 4 warps.
const WC_FEW_BLOCKS_PER_SM: usize = 4;
/// Blocks an SM under which a Q6_K column of at least [`WC_LONG_K`] takes 4 warps.
const WC_BLOCKS_PER_SM: usize = 16;
/// See [`WC_BLOCKS_PER_SM`].
const WC_LONG_K: usize = 8192;

/// The warps a column of the `_wc` kernels for an `[n, k]` weight of `ty` on `sms`
/// multiprocessors: 4 where one warp a column (4 columns a block) gives fewer than
/// [`WC_FEW_BLOCKS_PER_SM`] blocks an SM, or a Q6_K matrix of K >= [`WC_LONG_K`] fewer than
/// [`WC_BLOCKS_PER_SM`]; else 1. Measured on the H200 (132 SMs; docs/perf.md): an 8B's
/// 1024-column V (256 blocks) and its Q6_K `ffn_down` (4096 x 14336, 1024 blocks) ran
/// (ncu) 42% and (kernel timings) 24% shorter at more warps a column, where every 4096- and
/// 6144-column Q4_K matrix, and Q6_K at K = 4096, ran 10-30% longer: fewer loads in flight a
/// warp (a pass of 4 / W unit steps) costs more there than the longer single wave gains. A Tesla
/// M40 (24 SMs) keeps one warp a column for every matrix of an 8B.
pub fn wc_warps(ty: GgmlType, n: usize, k: usize, sms: usize) -> usize {
    let blocks = n.div_ceil(WC_COLUMNS);
    let long_q6 = ty == GgmlType::Q6_K && k >= WC_LONG_K && blocks < WC_BLOCKS_PER_SM * sms;
    if blocks < WC_FEW_BLOCKS_PER_SM * sms || long_q6 {
        4
    } else {
        1
    }
}

/// The block of the `_wc` kernels: a column per warp, each warp the one-column kernel's block of
/// this many threads (kernels/matvec.cu `MMV_THREADS`).
const WC_BLOCK: u32 = 128;

/// Columns a block of the `_wc` kernels at one warp a column (`WC_BLOCK / 32`).
const WC_COLUMNS: usize = (WC_BLOCK / 32) as usize;

/// The unit kernels' block: a warp per 32 units of 8 weights (the narrowest units), at most 4.
fn unit_block(k: usize) -> u32 {
    ((k / 8).div_ceil(32) * 32).clamp(32, 128) as u32
}

/// Splits `rows` into launches of the compiled row counts: `(first row, rows)`.
fn unit_chunks(rows: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut r0 = 0;
    while r0 < rows {
        let left = rows - r0;
        let r = UNIT_ROWS.into_iter().find(|&r| r <= left).unwrap_or(1);
        out.push((r0, r));
        r0 += r;
    }
    out
}

/// [`Matmul::tiled_splits`] on a device of `sms` multiprocessors, aiming at `blocks_per_sm`.
fn tiled_splits(
    n: usize,
    k: usize,
    gate_up: bool,
    sms: usize,
    blocks_per_sm: usize,
) -> (usize, usize) {
    let cols = if gate_up { TILED_COLS / 2 } else { TILED_COLS };
    let tiles = n.div_ceil(cols).max(1);
    let slabs = k.div_ceil(TILED_SLAB).max(1);
    let want = (blocks_per_sm * sms).div_ceil(tiles);
    // Splits of at least TILED_MIN_SPLIT, unless that leaves an SM without a block: then as
    // many as give every SM one (down to a slab a split).
    let most = (k / TILED_MIN_SPLIT).max(sms.div_ceil(tiles)).min(slabs);
    let splits = want.clamp(1, most);
    let per = slabs.div_ceil(splits);
    (slabs.div_ceil(per), per * TILED_SLAB)
}

/// [`Matmul::cublas_scratch_floats`] with cuBLAS on, for GEMMs in `gemm`.
fn cublas_scratch_floats(
    gemm: GemmPrecision,
    matrices: &[(GgmlType, usize, usize)],
    max_rows: usize,
) -> usize {
    let largest = |f16_in_place: bool| {
        matrices
            .iter()
            .filter(|(ty, _, _)| !(f16_in_place && *ty == GgmlType::F16))
            .map(|&(_, n, k)| n * k)
            .max()
            .unwrap_or(0)
    };
    if gemm != GemmPrecision::F16 {
        return largest(false).min(TILE_SCRATCH_FLOATS);
    }
    // Steps of at most TILED_MAX_ROWS rows never reach cuBLAS.
    if max_rows <= TILED_MAX_ROWS {
        return 0;
    }
    let k_max = matrices.iter().map(|&(_, _, k)| k).max().unwrap_or(0);
    let x = f16_activation_halves(max_rows, k_max);
    (x + largest(true).min(TILE_SCRATCH_HALVES)).div_ceil(2)
}

/// Matmuls on one stream; see the [module docs](self).
pub struct Matmul {
    stream: Arc<CudaStream>,
    blas: Option<CudaBlas>,
    gemm: GemmPrecision,
    /// The device's compute capability as `10 * major + minor` (tensor cores from 70).
    sm: u32,
    /// The device's multiprocessors (the tiled kernels' split of K aims at blocks per SM).
    sms: usize,
    /// The K-quant decode kernels' warps a column.
    wc: WcWarps,
    /// The tiled kernels' target blocks per SM ([`TILED_BLOCKS_PER_SM`] unless
    /// `M40LLM_TILED_BLOCKS`).
    tiled_blocks: usize,
}

impl Matmul {
    /// With cuBLAS when `use_cublas` (and it loads), else the plain kernel for every matmul.
    pub fn new(stream: Arc<CudaStream>, use_cublas: bool) -> Result<Matmul, CudaError> {
        let blas = if use_cublas {
            if !super::cublas_present() {
                return Err(CudaError::Launch {
                    kernel: "cuBLAS".into(),
                    reason: "libcublas could not be loaded; install CUDA's cuBLAS or set \
                             M40LLM_ENABLE_CUBLAS=0"
                        .into(),
                });
            }
            Some(
                CudaBlas::new(stream.clone()).map_err(|e| CudaError::Launch {
                    kernel: "cuBLAS".into(),
                    reason: format!("cannot create a handle: {e}"),
                })?,
            )
        } else {
            None
        };
        let attribute = |a: CUdevice_attribute, what: &str| {
            stream
                .context()
                .attribute(a)
                .map_err(|e| CudaError::Launch {
                    kernel: "matmul".into(),
                    reason: format!("cannot read the {what}: {e}"),
                })
        };
        let sms = attribute(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            "multiprocessor count",
        )?;
        let major = attribute(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            "compute capability",
        )?;
        let minor = attribute(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            "compute capability",
        )?;
        let sms = usize::try_from(sms).unwrap_or(1).max(1);
        let wc = WcWarps::from_env(std::env::var("M40LLM_WC_WARPS").ok().as_deref(), sms).map_err(
            |reason| CudaError::Launch {
                kernel: "matmul".into(),
                reason,
            },
        )?;
        let tiled_blocks = tiled_blocks_from_env(
            std::env::var("M40LLM_TILED_BLOCKS").ok().as_deref(),
        )
        .map_err(|reason| CudaError::Launch {
            kernel: "matmul".into(),
            reason,
        })?;
        Ok(Matmul {
            stream,
            blas,
            gemm: GemmPrecision::F32,
            sm: u32::try_from(major * 10 + minor).unwrap_or(0),
            sms,
            wc,
            tiled_blocks,
        })
    }

    /// The tiled kernels' split of K for an `[n, k]` weight (`gate_up`: a gate/up pair of that
    /// shape): `(splits, elements a split)`. A function of the shape and the device alone, never
    /// of the row count, so a row's sum order is the same in every batch (see the module docs):
    /// enough splits for [`TILED_BLOCKS_PER_SM`] blocks per SM (`M40LLM_TILED_BLOCKS`), none
    /// shorter than [`TILED_MIN_SPLIT`] unless that leaves an SM without a block, each a whole
    /// number of 32-element slabs.
    pub fn tiled_splits(&self, n: usize, k: usize, gate_up: bool) -> (usize, usize) {
        tiled_splits(n, k, gate_up, self.sms, self.tiled_blocks)
    }

    /// FP32 elements of scratch the tiled kernels need for an `[n, k]` weight (`gate_up`: a
    /// gate/up pair) at up to [`TILED_MAX_ROWS`] rows a launch: the partial sums of every split,
    /// none when K is not split.
    pub fn tiled_scratch_floats(&self, n: usize, k: usize, gate_up: bool) -> usize {
        match self.tiled_splits(n, k, gate_up) {
            (1, _) => 0,
            (s, _) => s * if gate_up { 2 } else { 1 } * TILED_MAX_ROWS * n,
        }
    }

    /// Whether a matmul of `rows` rows (within the tiled kernels' reach) runs the tensor-core
    /// tiled kernels: TF32 asked for ([`Matmul::set_gemm`] checked the arch) and at least
    /// [`TC_MIN_ROWS`] rows.
    pub fn tensor_core_rows(&self, rows: usize) -> bool {
        self.gemm == GemmPrecision::Tf32 && (TC_MIN_ROWS..=TILED_MAX_ROWS).contains(&rows)
    }

    pub fn uses_cublas(&self) -> bool {
        self.blas.is_some()
    }

    /// Sets the operand precision of the cuBLAS path's GEMMs (prefill): FP32 SGEMM (the default),
    /// TF32 tensor-core math in SGEMM, or FP16 operands in `cublasGemmEx`. TF32 also moves
    /// matmuls of [`TC_MIN_ROWS`] to [`TILED_MAX_ROWS`] rows (batched decode) onto the
    /// tensor-core tiled kernels ([`MatmulPath::TiledTf32`]). A tensor-core
    /// precision is refused, naming the device's arch, on a GPU older than its
    /// [`GemmPrecision::min_sm`], and without cuBLAS; nothing falls back silently.
    pub fn set_gemm(&mut self, gemm: GemmPrecision) -> Result<(), CudaError> {
        let refuse = |reason: String| {
            Err(CudaError::Launch {
                kernel: "cuBLAS".into(),
                reason,
            })
        };
        if gemm.tensor_cores() {
            if self.blas.is_none() {
                return refuse(format!(
                    "the {gemm} prefill GEMM needs the cuBLAS path (M40LLM_ENABLE_CUBLAS is 0)"
                ));
            }
            if self.sm < gemm.min_sm() {
                return refuse(format!(
                    "the {gemm} prefill GEMM needs tensor cores of sm_{} or newer; this GPU is \
                     sm_{}",
                    gemm.min_sm(),
                    self.sm
                ));
            }
        }
        if let Some(blas) = &self.blas {
            use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode, cublasStatus_t};
            // FP16 operands take tensor cores in the default math mode (cuBLAS 11 and newer).
            let mode = if gemm == GemmPrecision::Tf32 {
                cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
            } else {
                cublasMath_t::CUBLAS_DEFAULT_MATH
            };
            // SAFETY: the handle is live for as long as `blas`; the call only sets its math mode.
            let status = unsafe { cublasSetMathMode(*blas.handle(), mode) };
            if status != cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(CudaError::Launch {
                    kernel: "cublasSetMathMode".into(),
                    reason: format!("{status:?}"),
                });
            }
        }
        self.gemm = gemm;
        Ok(())
    }

    /// The operand precision of the cuBLAS path's GEMMs ([`Matmul::set_gemm`]).
    pub fn gemm(&self) -> GemmPrecision {
        self.gemm
    }

    /// The device's compute capability, `10 * major + minor` (90 for an H200).
    pub fn compute_capability(&self) -> u32 {
        self.sm
    }

    /// [`Matmul::set_gemm`] with TF32 (`on`) or FP32.
    pub fn set_tf32(&mut self, on: bool) -> Result<(), CudaError> {
        self.set_gemm(if on {
            GemmPrecision::Tf32
        } else {
            GemmPrecision::F32
        })
    }

    /// Whether SGEMM may use TF32 tensor cores ([`Matmul::set_gemm`]).
    pub fn uses_tf32(&self) -> bool {
        self.gemm == GemmPrecision::Tf32
    }

    /// FP32 elements of scratch the cuBLAS path needs for these `(type, n, k)` matrices at up to
    /// `max_rows` rows a matmul (0 without cuBLAS): a dequantized FP32 tile of at most
    /// [`TILE_SCRATCH_FLOATS`]; with FP16 operands, the activations in FP16 and an FP16 tile of
    /// at most [`TILE_SCRATCH_HALVES`] (none for F16 weights, read in place), in FP32 units.
    pub fn cublas_scratch_floats(
        &self,
        matrices: &[(GgmlType, usize, usize)],
        max_rows: usize,
    ) -> usize {
        if self.blas.is_none() {
            return 0;
        }
        cublas_scratch_floats(self.gemm, matrices, max_rows)
    }

    /// `y[r, n] = sum_k x[r, k] w[n, k]` for `r < rows`. `scratch` holds dequantized tiles on the
    /// cuBLAS path (any length of at least one weight row of FP32; with FP16 operands the
    /// activations in FP16 first, then at least one FP16 weight row unless `W` is F16) and the
    /// partial sums of the tiled path ([`Matmul::tiled_scratch_floats`]; too short is an error).
    /// Asynchronous on the stream.
    pub fn run(
        &self,
        ks: &KernelSet,
        x: &impl DeviceSpan<f32>,
        rows: usize,
        w: &DeviceWeight,
        y: &mut impl DeviceSpan<f32>,
        scratch: &mut impl DeviceSpan<f32>,
    ) -> Result<MatmulPath, CudaError> {
        let (x, y, scratch) = (x.span(), y.span(), scratch.span());
        let sfx = weight_kernel_suffix(w.ty).unwrap_or("unsupported");
        let shape = format!("x [{rows}, {}] · W [{}, {}] ({:?})", w.k, w.n, w.k, w.ty);
        let bad = |kernel: &str, reason: String| CudaError::Launch {
            kernel: kernel.to_string(),
            reason: format!("{reason}: {shape}"),
        };
        let as_i32 = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| bad("matmul", format!("{what} {v} exceeds i32")))
        };
        if rows == 0 || x.len() < rows * w.k || y.len() < rows * w.n {
            return Err(bad(
                "matmul",
                format!(
                    "buffers of {} and {} floats are too small",
                    x.len(),
                    y.len()
                ),
            ));
        }
        let (n, k) = (as_i32(w.n, "N")?, as_i32(w.k, "K")?);
        let rows_i = as_i32(rows, "rows")?;
        let row_bytes = w.row_bytes as i64;
        let blas = self.blas.as_ref().filter(|_| rows > TILED_MAX_ROWS);
        if blas.is_none() && units_take(w.k, *x.ptr()) {
            if rows > UNIT_MAX_ROWS || self.tensor_core_rows(rows) {
                return self.launch_tiled(ks, &[w], x, y, rows, scratch, &shape);
            }
            let launches = self.launch_units(ks, &[w], x, y, rows, &shape)?;
            return Ok(MatmulPath::Units { launches });
        }
        let Some(blas) = blas else {
            let name = format!("matvec_{sfx}");
            let f = ks.function("matvec", &name)?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&w.data)
                .arg(x.ptr())
                .arg(y.ptr())
                .arg(&n)
                .arg(&k)
                .arg(&row_bytes);
            // SAFETY: the arguments match matvec_<ty>'s signature and the sizes were checked.
            unsafe { b.launch(matvec_grid(w.n, rows_i)) }.map_err(|e| bad(&name, e.to_string()))?;
            return Ok(MatmulPath::PlainKernel);
        };
        if self.gemm == GemmPrecision::F16 {
            return self.run_f16(ks, blas, x, rows, w, y, scratch, &shape);
        }
        let tile_rows = (scratch.len() / w.k).min(w.n);
        if tile_rows == 0 {
            return Err(bad(
                "matmul",
                format!("scratch of {} floats holds no weight row", scratch.len()),
            ));
        }
        let deq_name = format!("dequantize_{sfx}");
        let deq = ks.function("dequant", &deq_name)?;
        let mut tiles = 0;
        for n0 in (0..w.n).step_by(tile_rows) {
            let m = tile_rows.min(w.n - n0);
            let m_i64 = m as i64;
            let elems = m * w.k;
            let cfg = LaunchConfig {
                grid_dim: (elems.div_ceil(256).min(65535) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let tile = w.data.slice(n0 * w.row_bytes..(n0 + m) * w.row_bytes);
            let mut b = self.stream.launch_builder(&deq);
            b.arg(&tile)
                .arg(scratch.ptr())
                .arg(&m_i64)
                .arg(&k)
                .arg(&row_bytes);
            // SAFETY: the arguments match dequantize_<ty>'s signature; scratch holds m rows.
            unsafe { b.launch(cfg) }.map_err(|e| bad(&deq_name, e.to_string()))?;
            let c = y.sub(n0, y.len() - n0, "matmul")?;
            let (alpha, beta) = (1.0f32, 0.0f32);
            // SAFETY: A is m x K (lda K) in scratch, B is rows x K (ldb K) in x, C is rows
            // columns of ldc = N from y + n0: all within the checked lengths. The handle runs on
            // this stream (`CudaBlas::new`), after the dequantization above.
            unsafe {
                cudarc::cublas::result::sgemm(
                    *blas.handle(),
                    cublasOperation_t::CUBLAS_OP_T,
                    cublasOperation_t::CUBLAS_OP_N,
                    as_i32(m, "tile rows")?,
                    rows_i,
                    k,
                    &alpha,
                    *scratch.ptr() as *const f32,
                    k,
                    *x.ptr() as *const f32,
                    k,
                    &beta,
                    *c.ptr() as *mut f32,
                    n,
                )
            }
            .map_err(|e| bad("cublasSgemm", e.to_string()))?;
            tiles += 1;
        }
        Ok(MatmulPath::CublasSgemm { tiles })
    }

    /// `ys[i] = x wsᵀ[i]` for the plan's multi_matmul (one input, several weights). At one row
    /// the weights of one type and K (up to [`MULTI_MAX`]) on the unit kernels share a launch
    /// (`mmv3_<ty>_r1[_c1|_wc<W>]`, the same arithmetic per output column as [`Matmul::run`], so
    /// the same bits), in the order of their first weight: a Q4_K_M layer's Q4_K Q and K in one,
    /// its Q6_K V alone; every other weight (and every weight past one row) is a
    /// [`Matmul::run`]. The paths taken, a launch group each.
    pub fn multi(
        &self,
        ks: &KernelSet,
        x: &impl DeviceSpan<f32>,
        rows: usize,
        ws: &[&DeviceWeight],
        ys: &mut [super::mem::Span<f32>],
        scratch: &mut impl DeviceSpan<f32>,
    ) -> Result<Vec<MatmulPath>, CudaError> {
        let x = x.span();
        if ws.len() != ys.len() {
            return Err(CudaError::Launch {
                kernel: "multi_matmul".into(),
                reason: format!("{} weights and {} outputs", ws.len(), ys.len()),
            });
        }
        if rows != 1 {
            let mut paths = Vec::with_capacity(ws.len());
            for (w, y) in ws.iter().zip(ys.iter_mut()) {
                paths.push(self.run(ks, &x, rows, w, y, scratch)?);
            }
            return Ok(paths);
        }
        let mut paths = Vec::with_capacity(ws.len());
        for group in multi_groups(ws) {
            if group.len() >= 2 && units_take(ws[group[0]].k, *x.ptr()) {
                let gw: Vec<&DeviceWeight> = group.iter().map(|&i| ws[i]).collect();
                let gy: Vec<super::mem::Span<f32>> = group.iter().map(|&i| ys[i]).collect();
                paths.push(self.multi_launch(ks, x, &gw, &gy)?);
            } else {
                for &i in &group {
                    paths.push(self.run(ks, &x, rows, ws[i], &mut ys[i], scratch)?);
                }
            }
        }
        Ok(paths)
    }

    /// One `mmv3_<ty>_r1*` launch at one row over 2 to [`MULTI_MAX`] weights of one type and K
    /// (the caller's grouping, [`multi_groups`]).
    fn multi_launch(
        &self,
        ks: &KernelSet,
        x: super::mem::Span<f32>,
        ws: &[&DeviceWeight],
        ys: &[super::mem::Span<f32>],
    ) -> Result<MatmulPath, CudaError> {
        let w0 = ws[0];
        let shapes = ws
            .iter()
            .map(|w| format!("[{}, {}]", w.n, w.k))
            .collect::<Vec<_>>()
            .join(", ");
        let shape = format!("x [1, {}] · W {shapes} ({:?})", w0.k, w0.ty);
        let bad = |kernel: &str, reason: String| CudaError::Launch {
            kernel: kernel.to_string(),
            reason: format!("{reason}: {shape}"),
        };
        if x.len() < w0.k {
            return Err(bad("mmv3", format!("x of {} floats is too small", x.len())));
        }
        let mut ns = [0i32; MULTI_MAX];
        let mut total = 0usize;
        for (i, (w, y)) in ws.iter().zip(ys.iter()).enumerate() {
            if y.len() < w.n {
                return Err(bad(
                    "mmv3",
                    format!("output {i} of {} floats is too small", y.len()),
                ));
            }
            ns[i] =
                i32::try_from(w.n).map_err(|_| bad("mmv3", format!("N {} exceeds i32", w.n)))?;
            total += w.n;
        }
        let k = i32::try_from(w0.k).map_err(|_| bad("mmv3", format!("K {} exceeds i32", w0.k)))?;
        let row_bytes = w0.row_bytes as i64;
        // The kernel and column count `unit_kernel` would pick for one matrix of all the rows
        // (neither changes a column's arithmetic).
        let (single, cols) = unit_kernel("mmv", w0.ty, false, 1, total, w0.k, self.wc);
        let name = format!("mmv3_{}", single.trim_start_matches("mmv_"));
        let f = ks.function("matvec", &name)?;
        let blocks: usize = ws.iter().map(|w| w.n.div_ceil(cols)).sum();
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(blocks).map_err(|_| bad(&name, "too many blocks".into()))?,
                1,
                1,
            ),
            block_dim: (unit_block(w0.k), 1, 1),
            shared_mem_bytes: 0,
        };
        // Absent matrices (two of three): any valid pointer, never read (their N is 0).
        let w_at = |i: usize| ws.get(i).copied().unwrap_or(w0);
        let y_at = |i: usize| ys.get(i).map_or(*ys[0].ptr(), |y| *y.ptr());
        let (y0, y1, y2) = (y_at(0), y_at(1), y_at(2));
        let mut b = self.stream.launch_builder(&f);
        b.arg(&w_at(0).data)
            .arg(&w_at(1).data)
            .arg(&w_at(2).data)
            .arg(x.ptr())
            .arg(&y0)
            .arg(&y1)
            .arg(&y2)
            .arg(&ns[0])
            .arg(&ns[1])
            .arg(&ns[2])
            .arg(&k)
            .arg(&row_bytes);
        // SAFETY: the arguments match mmv3_<ty>_r1[_c1|_wc]'s signature: one row of x (K floats,
        // checked), each output at least its N floats (checked), the weights of one type and K
        // (so one row_bytes), K a whole number of units (`units_take`).
        unsafe { b.launch(cfg) }.map_err(|e| bad(&name, e.to_string()))?;
        Ok(MatmulPath::UnitsMulti { matrices: ws.len() })
    }

    /// `y[r, n] = silu(x[r] · gate[n]) * (x[r] · up[n])` in one kernel that reads both weights
    /// (they must share a type and shape): the fused FFN input for decode rows, on the unit
    /// kernels up to [`UNIT_MAX_ROWS`] rows and the tiled kernels (gate and up columns in one
    /// block, silu(g) * u applied to the sums) above, whatever cuBLAS says (the executor takes
    /// two cuBLAS matmuls past [`TILED_MAX_ROWS`] itself). `scratch` holds the tiled path's
    /// partial sums ([`Matmul::tiled_scratch_floats`] with `gate_up`). Returns the path.
    #[allow(clippy::too_many_arguments)]
    pub fn gate_up_swiglu(
        &self,
        ks: &KernelSet,
        x: &impl DeviceSpan<f32>,
        rows: usize,
        gate: &DeviceWeight,
        up: &DeviceWeight,
        y: &mut impl DeviceSpan<f32>,
        scratch: &mut impl DeviceSpan<f32>,
    ) -> Result<MatmulPath, CudaError> {
        let (x, y, scratch) = (x.span(), y.span(), scratch.span());
        let sfx = weight_kernel_suffix(gate.ty).unwrap_or("unsupported");
        let name = format!("gate_up_swiglu_{sfx}");
        let same = gate.ty == up.ty && gate.n == up.n && gate.k == up.k;
        if !same || rows == 0 || x.len() < rows * gate.k || y.len() < rows * gate.n {
            return Err(CudaError::Launch {
                kernel: name,
                reason: format!(
                    "gate {:?} [{}, {}] and up {:?} [{}, {}] over {rows} rows, x {} y {}",
                    gate.ty,
                    gate.n,
                    gate.k,
                    up.ty,
                    up.n,
                    up.k,
                    x.len(),
                    y.len()
                ),
            });
        }
        let too_big = |what: &str| CudaError::Launch {
            kernel: format!("gate_up_swiglu_{sfx}"),
            reason: format!("{what} exceeds i32"),
        };
        let n = i32::try_from(gate.n).map_err(|_| too_big("N"))?;
        let k = i32::try_from(gate.k).map_err(|_| too_big("K"))?;
        let rows_i = i32::try_from(rows).map_err(|_| too_big("rows"))?;
        let row_bytes = gate.row_bytes as i64;
        if units_take(gate.k, *x.ptr()) {
            let shape = format!("x [{rows}, {}] · gate, up [{}, {}]", gate.k, gate.n, gate.k);
            if rows > UNIT_MAX_ROWS || self.tensor_core_rows(rows) {
                return self.launch_tiled(ks, &[gate, up], x, y, rows, scratch, &shape);
            }
            let launches = self.launch_units(ks, &[gate, up], x, y, rows, &shape)?;
            return Ok(MatmulPath::Units { launches });
        }
        let f = ks.function("matvec", &name)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&gate.data)
            .arg(&up.data)
            .arg(x.ptr())
            .arg(y.ptr())
            .arg(&n)
            .arg(&k)
            .arg(&row_bytes);
        // SAFETY: the arguments match gate_up_swiglu_<ty>'s signature; sizes checked above.
        unsafe { b.launch(matvec_grid(gate.n, rows_i)) }.map_err(|e| CudaError::Launch {
            kernel: name.clone(),
            reason: e.to_string(),
        })?;
        Ok(MatmulPath::PlainKernel)
    }
}

impl Matmul {
    /// The FP16 tensor-core GEMM of [`Matmul::run`] (sizes of `x` and `y` checked there): `x`
    /// rounded to FP16 into the start of `scratch` (`f32_to_f16`), then per tile of `W`'s rows
    /// `dequantize_to_f16_<ty>` into the rest and one `cublasGemmEx` (FP16 A and B, FP32 C,
    /// `CUBLAS_COMPUTE_32F`); an F16 `W` is A itself, one call. The operands' layout is the
    /// SGEMM's (the module docs' cuBLAS contract) with halves for floats.
    #[allow(clippy::too_many_arguments)]
    fn run_f16(
        &self,
        ks: &KernelSet,
        blas: &CudaBlas,
        x: super::mem::Span<f32>,
        rows: usize,
        w: &DeviceWeight,
        y: super::mem::Span<f32>,
        scratch: super::mem::Span<f32>,
        shape: &str,
    ) -> Result<MatmulPath, CudaError> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
        let bad = |kernel: &str, reason: String| CudaError::Launch {
            kernel: kernel.to_string(),
            reason: format!("{reason}: {shape}"),
        };
        let as_i32 = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| bad("cublasGemmEx", format!("{what} {v} exceeds i32")))
        };
        let (n, k, rows_i) = (as_i32(w.n, "N")?, as_i32(w.k, "K")?, as_i32(rows, "rows")?);
        let row_bytes = w.row_bytes as i64;
        let halves = scratch.len() * 2;
        let x_halves = f16_activation_halves(rows, w.k);
        let in_place = w.ty == GgmlType::F16;
        let tile_rows = if in_place {
            w.n
        } else {
            (halves.saturating_sub(x_halves) / w.k).min(w.n)
        };
        if halves < x_halves || tile_rows == 0 {
            return Err(bad(
                "cublasGemmEx",
                format!(
                    "scratch of {} floats holds not the FP16 activations ({x_halves} halves){}",
                    scratch.len(),
                    if in_place { "" } else { " and a weight row" }
                ),
            ));
        }
        let x16 = *scratch.ptr();
        let w16 = x16 + 2 * x_halves as u64;
        let grid = |elems: usize| LaunchConfig {
            grid_dim: (elems.div_ceil(256).min(65535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let conv = ks.function("elementwise", "f32_to_f16")?;
        let x_len = (rows * w.k) as i64;
        let mut b = self.stream.launch_builder(&conv);
        b.arg(x.ptr()).arg(&x16).arg(&x_len);
        // SAFETY: f32_to_f16(x, y, n): x holds rows * K floats (checked by `run`), the scratch
        // at least x_halves >= rows * K halves (checked above).
        unsafe { b.launch(grid(rows * w.k)) }.map_err(|e| bad("f32_to_f16", e.to_string()))?;
        let sfx = weight_kernel_suffix(w.ty).unwrap_or("unsupported");
        let deq_name = format!("dequantize_to_f16_{sfx}");
        let deq = if in_place {
            None
        } else {
            Some(ks.function("dequant", &deq_name)?)
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let mut tiles = 0;
        for n0 in (0..w.n).step_by(tile_rows) {
            let m = tile_rows.min(w.n - n0);
            let tile = w.data.slice(n0 * w.row_bytes..(n0 + m) * w.row_bytes);
            let a: u64 = match &deq {
                None => *super::mem::Span::of(&w.data)
                    .sub(n0 * w.row_bytes, m * w.row_bytes, "weight tile")?
                    .ptr(),
                Some(deq) => {
                    let m_i64 = m as i64;
                    let mut b = self.stream.launch_builder(deq);
                    b.arg(&tile).arg(&w16).arg(&m_i64).arg(&k).arg(&row_bytes);
                    // SAFETY: the arguments match dequantize_to_f16_<ty>'s signature; the
                    // scratch after the activations holds tile_rows >= m rows of K halves.
                    unsafe { b.launch(grid(m * w.k)) }
                        .map_err(|e| bad(&deq_name, e.to_string()))?;
                    tiles += 1;
                    w16
                }
            };
            let c = y.sub(n0, y.len() - n0, "matmul")?;
            // SAFETY: A is m x K FP16 (lda K): the F16 weight's rows n0..n0+m in place, or the
            // tile just dequantized into scratch; B is rows x K FP16 (ldb K) at the start of the
            // scratch; C is rows columns of ldc = N FP32 from y + n0: all within the checked
            // lengths. alpha and beta are host FP32 values, as CUBLAS_COMPUTE_32F reads them. The
            // handle runs on this stream (`CudaBlas::new`), after the conversions above.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *blas.handle(),
                    cublasOperation_t::CUBLAS_OP_T,
                    cublasOperation_t::CUBLAS_OP_N,
                    as_i32(m, "tile rows")?,
                    rows_i,
                    k,
                    (&alpha as *const f32).cast(),
                    a as *const std::ffi::c_void,
                    cudaDataType::CUDA_R_16F,
                    k,
                    x16 as *const std::ffi::c_void,
                    cudaDataType::CUDA_R_16F,
                    k,
                    (&beta as *const f32).cast(),
                    *c.ptr() as *mut std::ffi::c_void,
                    cudaDataType::CUDA_R_32F,
                    n,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| bad("cublasGemmEx", e.to_string()))?;
        }
        Ok(MatmulPath::CublasF16 { tiles })
    }

    /// The unit kernels over `rows` rows in launches of 8, 4, 2 and 1 rows: `mmv_<ty>` for one
    /// weight, `gate_up_swiglu_<ty>` for two (gate, up: one type and shape, checked by the
    /// caller, as are the sizes of `x` and `y`). Returns the launch count.
    fn launch_units(
        &self,
        ks: &KernelSet,
        weights: &[&DeviceWeight],
        x: super::mem::Span<f32>,
        y: super::mem::Span<f32>,
        rows: usize,
        shape: &str,
    ) -> Result<usize, CudaError> {
        let w = weights[0];
        let gate_up = weights.len() > 1;
        let prefix = if gate_up { "gate_up_swiglu" } else { "mmv" };
        let sfx = weight_kernel_suffix(w.ty).unwrap_or("unsupported");
        let too_big = |what: &str| CudaError::Launch {
            kernel: format!("{prefix}_{sfx}"),
            reason: format!("{what} exceeds i32: {shape}"),
        };
        let n = i32::try_from(w.n).map_err(|_| too_big("N"))?;
        let k = i32::try_from(w.k).map_err(|_| too_big("K"))?;
        let row_bytes = w.row_bytes as i64;
        let chunks = unit_chunks(rows);
        for &(r0, r) in &chunks {
            let (name, cols) = unit_kernel(prefix, w.ty, gate_up, r, w.n, w.k, self.wc);
            let f = ks.function("matvec", &name)?;
            let xr = x.sub(r0 * w.k, r * w.k, "matmul rows")?;
            let yr = y.sub(r0 * w.n, r * w.n, "matmul rows")?;
            let mut b = self.stream.launch_builder(&f);
            for w in weights {
                b.arg(&w.data);
            }
            b.arg(xr.ptr())
                .arg(yr.ptr())
                .arg(&n)
                .arg(&k)
                .arg(&row_bytes);
            // SAFETY: the arguments match mmv_<ty>_r<R>'s (one weight) or
            // gate_up_swiglu_<ty>_r<R>'s (two) signature: R rows of x and y (checked by `sub`),
            // K a whole number of units (`units_take`).
            unsafe { b.launch(unit_grid(w.n, w.k, cols)) }.map_err(|e| CudaError::Launch {
                kernel: name.clone(),
                reason: format!("{e}: {shape}"),
            })?;
        }
        Ok(chunks.len())
    }

    /// The tiled kernels over `rows` rows in launches of up to [`TILED_MAX_ROWS`]:
    /// `mmq_<ty>_r<BR>` for one weight, `gate_up_mmq_<ty>_r<BR>` for two (gate, up: one type and
    /// shape, checked by the caller, as are the sizes of `x` and `y`), each followed by
    /// `mmq_reduce_m<M>` when K is split; with [`GemmPrecision::Tf32`] the tensor-core
    /// `mmqt_` / `gate_up_mmqt_` kernels (same arguments, grid and split) instead.
    #[allow(clippy::too_many_arguments)]
    fn launch_tiled(
        &self,
        ks: &KernelSet,
        weights: &[&DeviceWeight],
        x: super::mem::Span<f32>,
        y: super::mem::Span<f32>,
        rows: usize,
        scratch: super::mem::Span<f32>,
        shape: &str,
    ) -> Result<MatmulPath, CudaError> {
        let w = weights[0];
        let gate_up = weights.len() > 1;
        let tc = self.gemm == GemmPrecision::Tf32;
        let (family, tiles) = if tc {
            ("mmqt", &TC_TILES[..])
        } else {
            ("mmq", &TILED_TILES[..])
        };
        let (prefix, m) = match (gate_up, tc) {
            (true, false) => ("gate_up_mmq", 2),
            (false, false) => ("mmq", 1),
            (true, true) => ("gate_up_mmqt", 2),
            (false, true) => ("mmqt", 1),
        };
        let sfx = weight_kernel_suffix(w.ty).unwrap_or("unsupported");
        let bad = |kernel: &str, reason: String| CudaError::Launch {
            kernel: kernel.to_string(),
            reason: format!("{reason}: {shape}"),
        };
        let too_big = |what: &str| bad(&format!("{prefix}_{sfx}"), format!("{what} exceeds i32"));
        let (splits, chunk) = self.tiled_splits(w.n, w.k, gate_up);
        let n = i32::try_from(w.n).map_err(|_| too_big("N"))?;
        let k = i32::try_from(w.k).map_err(|_| too_big("K"))?;
        let chunk = i32::try_from(chunk).map_err(|_| too_big("the split"))?;
        let splits_i = i32::try_from(splits).map_err(|_| too_big("the split count"))?;
        let row_bytes = w.row_bytes as i64;
        let grid_x = u32::try_from(w.n.div_ceil(TILED_COLS / m)).map_err(|_| too_big("N"))?;
        let mut launches = 0;
        for r0 in (0..rows).step_by(TILED_MAX_ROWS) {
            let r = (rows - r0).min(TILED_MAX_ROWS);
            let (br, threads) = tiles
                .iter()
                .copied()
                .find(|&(b, _)| b >= r)
                .unwrap_or(tiles[tiles.len() - 1]);
            let name = format!("{prefix}_{sfx}_r{br}");
            let f = ks.function(family, &name)?;
            let xr = x.sub(r0 * w.k, r * w.k, "matmul rows")?;
            let yr = y.sub(r0 * w.n, r * w.n, "matmul rows")?;
            let rn = r * w.n;
            // Null: the kernel writes y itself.
            let part: u64 = if splits > 1 {
                let need = splits * m * rn;
                if scratch.len() < need {
                    return Err(bad(
                        &name,
                        format!(
                            "scratch of {} floats is too small for {splits} splits' partial sums ({need})",
                            scratch.len()
                        ),
                    ));
                }
                *scratch.ptr()
            } else {
                0
            };
            let r_i = r as i32;
            let mut b = self.stream.launch_builder(&f);
            for w in weights {
                b.arg(&w.data);
            }
            b.arg(xr.ptr())
                .arg(yr.ptr())
                .arg(&part)
                .arg(&r_i)
                .arg(&n)
                .arg(&k)
                .arg(&row_bytes)
                .arg(&chunk);
            let cfg = LaunchConfig {
                grid_dim: (grid_x, splits as u32, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match mmq[t]_<ty>_r<BR>'s (one weight) or
            // gate_up_mmq[t]_<ty>_r<BR>'s (two) signature: r <= BR rows of x and y (checked by
            // `sub`), K a whole number of 32-element slabs (`units_take`), `part` null or
            // `splits * m * r * N` floats of scratch (checked above).
            unsafe { b.launch(cfg) }.map_err(|e| bad(&name, e.to_string()))?;
            if splits > 1 {
                let red = format!("mmq_reduce_m{m}");
                let f = ks.function("mmq", &red)?;
                let rn_i = rn as i64;
                let mut b = self.stream.launch_builder(&f);
                b.arg(&part).arg(yr.ptr()).arg(&rn_i).arg(&splits_i);
                let cfg = LaunchConfig {
                    grid_dim: (
                        u32::try_from(rn.div_ceil(256)).map_err(|_| too_big("R N"))?,
                        1,
                        1,
                    ),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: `part` holds `splits * m * rn` floats written by the launch above (same
                // stream), `yr` `rn` floats.
                unsafe { b.launch(cfg) }.map_err(|e| bad(&red, e.to_string()))?;
            }
            launches += 1;
        }
        Ok(if tc {
            MatmulPath::TiledTf32 { launches, splits }
        } else {
            MatmulPath::Tiled { launches, splits }
        })
    }
}

/// The unit kernels' grid: a block per `cols` output columns.
fn unit_grid(n: usize, k: usize, cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(cols) as u32, 1, 1),
        block_dim: (unit_block(k), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The plain kernel's grid: four output elements (warps) per block of 128, one row per y.
fn matvec_grid(n: usize, rows: i32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(4) as u32, rows as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Uploads the tensors `names` of `file` once, in their own types, with a progress bar of bytes
/// on stderr (hidden when stderr is not a terminal). Returns the weights and the bytes now
/// resident on the device.
pub fn upload_tensors(
    stream: &Arc<CudaStream>,
    file: &crate::gguf::GgufFile,
    names: &[&str],
) -> Result<(Vec<DeviceWeight>, u64), CudaError> {
    let mut infos = Vec::with_capacity(names.len());
    for name in names {
        let t = file.tensor(name).ok_or_else(|| CudaError::Launch {
            kernel: format!("upload of {name}"),
            reason: "no such tensor in the model".into(),
        })?;
        infos.push(t);
    }
    let total: u64 = infos.iter().map(|t| t.n_bytes).sum();
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "uploading weights {bar:30} {binary_bytes}/{binary_total_bytes} {msg}",
    ) {
        bar.set_style(style);
    }
    let mut out = Vec::with_capacity(infos.len());
    for t in infos {
        bar.set_message(t.name.clone());
        let w = DeviceWeight::upload(
            stream,
            &t.name,
            t.ty,
            t.n_rows() as usize,
            t.row_len() as usize,
            file.tensor_data(t),
        )?;
        bar.inc(t.n_bytes);
        out.push(w);
    }
    bar.finish_and_clear();
    Ok((out, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tiled_split_of_k_covers_k_in_whole_slabs_and_fills_the_device() {
        for sms in [1usize, 24, 132] {
            let want_of = |n: usize, cols: usize| {
                (TILED_BLOCKS_PER_SM * sms).div_ceil(n.div_ceil(cols).max(1))
            };
            for (n, k) in [
                (67, 1024),
                (4096, 4096),
                (14336, 4096),
                (4096, 14336),
                (1024, 576),
            ] {
                for gate_up in [false, true] {
                    let (s, chunk) = tiled_splits(n, k, gate_up, sms, TILED_BLOCKS_PER_SM);
                    let what = format!("[{n}, {k}] gate_up={gate_up} on {sms} SMs: {s} x {chunk}");
                    assert!(s >= 1 && chunk.is_multiple_of(TILED_SLAB), "{what}");
                    // Every split has work and together they cover K.
                    assert!(s * chunk >= k && (s - 1) * chunk < k, "{what}");
                    let cols = if gate_up { TILED_COLS / 2 } else { TILED_COLS };
                    let blocks = n.div_ceil(cols) * s;
                    // Short splits only where long ones would leave SMs without a block, and
                    // then about as many as give each one (whole slabs a split round down to
                    // at worst half).
                    assert!(
                        s == 1
                            || chunk >= TILED_MIN_SPLIT
                            || n.div_ceil(cols) * (k / TILED_MIN_SPLIT) < sms,
                        "{what}"
                    );
                    assert!(
                        2 * blocks >= sms || s == k.div_ceil(TILED_SLAB) || s == want_of(n, cols),
                        "{what}: {blocks} blocks"
                    );
                    assert!(
                        blocks >= TILED_BLOCKS_PER_SM * sms || chunk <= 2 * TILED_MIN_SPLIT,
                        "{what}: {blocks} blocks"
                    );
                }
            }
        }
        // An H200 (132 SMs): q/o of an 8B in 16 splits, its FFN in 10 (gate/up: 5), K = 256 in
        // 1 where the 133 tiles fill the SMs, in 4 where 33 would not; at 4 blocks an SM the
        // FFN in 5 (gate/up: 3).
        let b = TILED_BLOCKS_PER_SM;
        assert_eq!(tiled_splits(4096, 4096, false, 132, b), (16, 256));
        assert_eq!(tiled_splits(14336, 4096, false, 132, b).0, 10);
        assert_eq!(tiled_splits(14336, 4096, true, 132, b).0, 5);
        assert_eq!(tiled_splits(16899, 256, false, 132, b), (1, 256));
        assert_eq!(tiled_splits(4099, 256, false, 132, b), (4, 64));
        assert_eq!(tiled_splits(14336, 4096, false, 132, 4).0, 5);
        assert_eq!(tiled_splits(14336, 4096, true, 132, 4).0, 3);
        // SmolLM2 (hidden 576, FFN 1536): 5 tiles of 576 columns in 18 splits of one slab
        // (576 / 256 = 2 would be 10 blocks), its gate/up (24 tiles) in 6; an 8B's K and V
        // (8 tiles of 1024) stay at 16 (17 wanted, whole slabs of 4096 round it down).
        assert_eq!(tiled_splits(576, 576, false, 132, b), (18, 32));
        assert_eq!(tiled_splits(1536, 576, true, 132, b).0, 6);
        assert_eq!(tiled_splits(576, 1536, false, 132, b), (24, 64));
        assert_eq!(tiled_splits(1024, 4096, false, 132, b).0, 16);
        // An M40 keeps the long splits for the 8B's K and V (8 x 16 blocks on 24 SMs).
        assert_eq!(tiled_splits(1024, 4096, false, 24, b).0, 16);
        assert_eq!(tiled_blocks_from_env(None), Ok(TILED_BLOCKS_PER_SM));
        assert_eq!(tiled_blocks_from_env(Some(" 16 ")), Ok(16));
        for bad in ["0", "65", "x", "-1"] {
            let e = tiled_blocks_from_env(Some(bad)).unwrap_err();
            assert!(e.contains("M40LLM_TILED_BLOCKS") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn the_k_quants_take_a_warp_per_column_at_one_row_where_their_block_is_128_threads() {
        // An M40 (24 SMs): every matrix of an 8B has blocks to spare at a warp a column.
        let m40 = WcWarps::Auto { sms: 24 };
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
            let sfx = super::super::weight_kernel_suffix(ty).unwrap();
            for gate_up in [false, true] {
                let p = if gate_up { "gate_up_swiglu" } else { "mmv" };
                for k in [1024, 1280, 4096, 14336] {
                    assert_eq!(unit_block(k), WC_BLOCK);
                    let want = (format!("{p}_{sfx}_r1_wc"), 4);
                    assert_eq!(unit_kernel(p, ty, gate_up, 1, 4096, k, m40), want);
                    assert_eq!(unit_kernel(p, ty, gate_up, 1, 14336, k, m40), want);
                    // Fixed counts: two and one columns a block.
                    let two = unit_kernel(p, ty, gate_up, 1, 4096, k, WcWarps::Fixed(2));
                    assert_eq!(two, (format!("{p}_{sfx}_r1_wc2"), 2));
                    let four = unit_kernel(p, ty, gate_up, 1, 4096, k, WcWarps::Fixed(4));
                    assert_eq!(four, (format!("{p}_{sfx}_r1_wc4"), 1));
                    // More rows keep their kernels (row 0's bits are the same: kernel_host).
                    let r2 = unit_kernel(p, ty, gate_up, 2, 4096, k, m40).0;
                    assert_eq!(r2, format!("{p}_{sfx}_r2"));
                }
                // Shorter K: a block of fewer warps, the one-column kernel.
                for k in [256, 512, 768] {
                    assert!(unit_block(k) < WC_BLOCK);
                    let want = (format!("{p}_{sfx}_r1_c1"), 1);
                    assert_eq!(unit_kernel(p, ty, gate_up, 1, 4096, k, m40), want);
                    assert_eq!(
                        unit_kernel(p, ty, gate_up, 1, 4096, k, WcWarps::Fixed(4)),
                        want
                    );
                }
            }
        }
        // The other types never.
        let (name, _) = unit_kernel("mmv", GgmlType::Q4_0, false, 1, 4096, 4096, m40);
        assert_eq!(name, "mmv_q4_0_r1");
    }

    #[test]
    fn a_column_takes_more_warps_only_where_one_each_leaves_the_device_short_of_blocks() {
        use GgmlType::*;
        for sms in [1usize, 24, 80, 132] {
            for ty in [Q4_K, Q5_K, Q6_K] {
                for k in [1024usize, 4096, 8192, 14336] {
                    for n in [1usize, 67, 576, 1024, 4096, 6144, 14336, 128256] {
                        let w = wc_warps(ty, n, k, sms);
                        let blocks = n.div_ceil(WC_COLUMNS);
                        let what = format!("{ty:?} [{n}, {k}] on {sms} SMs: {w}");
                        assert!([1, 4].contains(&w), "{what}");
                        // Few blocks: always more warps; many: never.
                        if blocks < WC_FEW_BLOCKS_PER_SM * sms {
                            assert_eq!(w, 4, "{what}");
                        }
                        if blocks >= WC_BLOCKS_PER_SM * sms {
                            assert_eq!(w, 1, "{what}");
                        }
                        // More columns never take more warps.
                        assert!(wc_warps(ty, 2 * n, k, sms) <= w, "{what}");
                    }
                }
            }
        }
        // An H200 (132 SMs), an 8B Q4_K_M: the Q6_K V (1024 columns) and down (K = 14336) take
        // 4 warps a column; q/o, QKV, down in Q4_K, gate/up and the output head one.
        assert_eq!(wc_warps(Q6_K, 1024, 4096, 132), 4);
        assert_eq!(wc_warps(Q4_K, 1024, 4096, 132), 4);
        assert_eq!(wc_warps(Q6_K, 4096, 14336, 132), 4);
        for (ty, n, k) in [
            (Q4_K, 4096, 4096),
            (Q6_K, 4096, 4096),
            (Q4_K, 6144, 4096),
            (Q4_K, 4096, 14336),
            (Q4_K, 14336, 4096),
            (Q6_K, 128256, 4096),
        ] {
            assert_eq!(wc_warps(ty, n, k, 132), 1, "{ty:?} [{n}, {k}]");
        }
        // A Tesla M40 (24 SMs): one warp a column for every matrix of an 8B.
        for (ty, n, k) in [(Q6_K, 1024, 4096), (Q6_K, 4096, 14336), (Q4_K, 4096, 4096)] {
            assert_eq!(wc_warps(ty, n, k, 24), 1, "{ty:?} [{n}, {k}]");
        }
    }

    #[test]
    fn m40llm_wc_warps_fixes_the_count_or_is_refused_naming_the_value() {
        assert_eq!(WcWarps::from_env(None, 132), Ok(WcWarps::Auto { sms: 132 }));
        assert_eq!(
            WcWarps::from_env(Some(" "), 24),
            Ok(WcWarps::Auto { sms: 24 })
        );
        for w in [1, 2, 4] {
            let v = format!(" {w}");
            assert_eq!(WcWarps::from_env(Some(&v), 132), Ok(WcWarps::Fixed(w)));
            assert_eq!(WcWarps::Fixed(w).warps(GgmlType::Q4_K, 14336, 4096), w);
        }
        for bad in ["0", "3", "8", "two", "-1"] {
            let e = WcWarps::from_env(Some(bad), 132).unwrap_err();
            assert!(e.contains(&format!("M40LLM_WC_WARPS=`{bad}`")), "{e}");
            assert!(e.contains("1, 2 or 4"), "{e}");
        }
    }

    #[test]
    fn the_tiles_threads_and_columns_are_what_the_kernels_are_compiled_for() {
        let src = super::super::kernels::family_source("mmq").unwrap();
        let line = |start: &str| {
            src.lines()
                .find(|l| l.trim_start().starts_with(start))
                .unwrap_or_else(|| panic!("no line `{start}` in mmq.cu"))
                .trim()
                .to_string()
        };
        assert_eq!(
            line("#define MMQ_BN"),
            format!("#define MMQ_BN {TILED_COLS}")
        );
        assert_eq!(
            line("#define MMQ_BK"),
            format!("#define MMQ_BK {TILED_SLAB}")
        );
        // The kernel's block is 4 BR threads (a thread's 4 rows x 8 columns of BR x 128).
        assert!(line("const int T = ").starts_with("const int T = 4 * BR,"));
        let tiles = line("#define MMQ(name, P)");
        for (br, threads) in TILED_TILES {
            assert!(tiles.contains(&format!("MMQ_R(name, P, {br})")), "{tiles}");
            assert_eq!(threads as usize, 4 * br, "BR {br}");
        }
    }

    #[test]
    fn row_counts_take_the_smallest_tile_that_holds_them() {
        let tile = |r: usize| TILED_TILES.into_iter().find(|&(b, _)| b >= r).map(|t| t.0);
        assert_eq!(tile(UNIT_MAX_ROWS + 1), Some(16));
        assert_eq!(
            (tile(16), tile(17), tile(32), tile(33)),
            (Some(16), Some(32), Some(32), Some(64))
        );
        assert_eq!(tile(TILED_MAX_ROWS), Some(TILED_MAX_ROWS));
        assert_eq!(unit_chunks(UNIT_MAX_ROWS), vec![(0, 8)]);
    }

    #[test]
    fn the_cublas_scratch_holds_a_tile_and_the_fp16_activations() {
        use GgmlType::{F16, Q4_0, Q4_K};
        // An 8B's shapes: q [4096, 4096], down [4096, 14336], the output [128256, 4096].
        let eight_b = [
            (Q4_0, 4096, 4096),
            (Q4_K, 4096, 14336),
            (Q4_0, 128256, 4096),
        ];
        for p in [GemmPrecision::F32, GemmPrecision::Tf32] {
            assert_eq!(cublas_scratch_floats(p, &eight_b, 512), TILE_SCRATCH_FLOATS);
            assert_eq!(cublas_scratch_floats(p, &[(Q4_0, 64, 256)], 512), 64 * 256);
        }
        // FP16: 512 rows of the widest K as halves, then 64 MiB of FP16 tiles.
        let f16 = cublas_scratch_floats(GemmPrecision::F16, &eight_b, 512);
        assert_eq!(f16, (512 * 14336 + TILE_SCRATCH_HALVES) / 2);
        // What `run_f16` takes from it at 512 rows of K = 14336: the activations, then rows.
        let left = 2 * f16 - f16_activation_halves(512, 14336);
        assert_eq!(left / 14336, TILE_SCRATCH_HALVES / 14336);
        // A small model's matrix fits whole; F16 weights need no tile, only the activations
        // (rounded up to 256 bytes).
        assert_eq!(
            cublas_scratch_floats(GemmPrecision::F16, &[(Q4_0, 100, 256)], 65),
            (f16_activation_halves(65, 256) + 100 * 256) / 2
        );
        assert_eq!(
            cublas_scratch_floats(
                GemmPrecision::F16,
                &[(F16, 4096, 4096), (Q4_0, 64, 512)],
                96
            ),
            (f16_activation_halves(96, 4096) + 64 * 512) / 2
        );
        assert_eq!(f16_activation_halves(65, 3) % 128, 0);
        assert!(f16_activation_halves(65, 3) >= 65 * 3);
        // Steps that never reach cuBLAS need none.
        assert_eq!(
            cublas_scratch_floats(GemmPrecision::F16, &eight_b, TILED_MAX_ROWS),
            0
        );
    }
}
