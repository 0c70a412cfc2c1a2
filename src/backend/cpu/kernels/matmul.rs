//! `y = x Wᵀ` with `W` read in its GGUF storage type: `y[r, n] = sum_k x[r, k] * w[n, k]`.
//!
//! Agrees with ggml's `ggml_compute_forward_mul_mat` up to float summation order, with one
//! deliberate difference: ggml quantizes the activations to 8 bits (`vec_dot_type`) before its
//! integer dot products, while m40-llm keeps them in FP32 (the precision policy), so m40-llm is
//! the more exact of the two.
//!
//! How it is fast without dequantizing a row:
//! - **Fused per-format dots.** A quantized sub-block of 32 elements is decoded into 32 small
//!   integers `v` and scales `d`, `m` (see `formats`); its contribution is
//!   `d * dot(v, x) + m * sum(x)`. The sums of `x` per 32 elements are computed once per input
//!   row and shared by every weight row.
//! - **Vectorized inner loops.** `dot(v, x)` runs over 8-lane accumulator arrays (`simd`) that
//!   LLVM maps onto vector registers; the per-sub-block scale goes into one running 8-lane
//!   accumulator per output, reduced once at the end of the row.
//! - **Tiles.** Each decoded sub-block is used for up to [`TILE_ROWS`] input rows at once, so a
//!   prefill decodes each weight block `T / 4` times instead of `T` times.
//! - **Threads.** Output columns are split into chunks of [`CHUNK`] weight rows that rayon
//!   spreads over the threads; a chunk's weights and a tile of `x` stay in L1 while the chunk
//!   runs.
//!
//! Every output is computed by the same sequence of operations whatever the tile or chunk it
//! falls in, so row `r` of a `T`-row product is bit-identical to the product of row `r` alone.

use super::formats::{
    BF16, F16, F32, Plain, Q4_0, Q4_1, Q4K, Q5_0, Q5_1, Q5K, Q6K, Q8_0, Quant, SUB,
};
#[cfg(target_arch = "x86_64")]
use super::simd::Avx2;
use super::simd::{LANES, Lanes, Simd, V8};
use super::{KernelError, check_len};
use crate::gguf::GgmlType;
use rayon::prelude::*;
use std::marker::PhantomData;
use std::ops::Range;

/// Input rows computed together against each decoded weight block.
pub const TILE_ROWS: usize = 4;
/// Weight rows per parallel work item.
pub const CHUNK: usize = 16;
/// Multiply-adds a rayon work item should at least have (about 20 µs of work): fewer, and the
/// cost of handing out work shows.
const MIN_MACS_PER_TASK: usize = 1 << 17;

/// The weight types the matmul and embedding kernels read: every type `gguf::quants`
/// dequantizes (the embedding gather dequantizes through it; the matmul has a fused dot product
/// for each).
pub const SUPPORTED: [GgmlType; 11] = crate::gguf::quants::DEQUANTIZE_TYPES;

/// `SUPPORTED` as a list for error messages.
pub(crate) fn supported_names() -> String {
    SUPPORTED.map(|t| t.name()).join(", ")
}

/// A weight matrix as GGUF stores it: `n` rows of `k` elements in type `ty`, each row
/// `ty.row_bytes(k)` bytes (IR shape `[n, k]`, GGUF `ne = [k, n]`).
#[derive(Clone, Copy, Debug)]
pub struct WeightMatrix<'a> {
    data: &'a [u8],
    ty: GgmlType,
    n: usize,
    k: usize,
    row_bytes: usize,
}

impl<'a> WeightMatrix<'a> {
    /// Checks that `data` holds exactly `n` rows of `k` elements of a supported type `ty`.
    pub fn new(data: &'a [u8], ty: GgmlType, n: usize, k: usize) -> Result<Self, KernelError> {
        if !SUPPORTED.contains(&ty) {
            return Err(KernelError::UnsupportedType { op: "matmul", ty });
        }
        let block = ty.block_size() as usize;
        let row_bytes = ty
            .row_bytes(k as u64)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or(KernelError::PartialBlock { ty, k, block })?;
        let expected = row_bytes
            .checked_mul(n)
            .ok_or_else(|| KernelError::Invalid(format!("a {n} x {k} {ty} weight overflows")))?;
        if data.len() != expected {
            return Err(KernelError::WeightBytes {
                ty,
                n,
                k,
                expected,
                got: data.len(),
            });
        }
        Ok(WeightMatrix {
            data,
            ty,
            n,
            k,
            row_bytes,
        })
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    /// Rows (output features).
    pub fn n(&self) -> usize {
        self.n
    }
    /// Elements per row (input features).
    pub fn k(&self) -> usize {
        self.k
    }
    pub fn data(&self) -> &'a [u8] {
        self.data
    }
    /// Bytes of row `i`.
    pub fn row(&self, i: usize) -> Option<&'a [u8]> {
        self.data.get(i * self.row_bytes..(i + 1) * self.row_bytes)
    }
    fn rows(&self, range: Range<usize>) -> &'a [u8] {
        &self.data[range.start * self.row_bytes..range.end * self.row_bytes]
    }
}

/// `y[r, n] = sum_k x[r, k] * w[n, k]` for the `T = x.len() / k` rows of `x`; `y` is `[T, n]`.
/// Agrees with ggml's `ggml_compute_forward_mul_mat` (see the module docs for the difference
/// in activation precision).
pub fn matmul(x: &[f32], w: &WeightMatrix, y: &mut [f32]) -> Result<(), KernelError> {
    matmul_with(Simd::detect(), x, w, y)
}

/// [`matmul`] with a chosen instruction set (tests and benchmarks compare them).
pub fn matmul_with(
    simd: Simd,
    x: &[f32],
    w: &WeightMatrix,
    y: &mut [f32],
) -> Result<(), KernelError> {
    let t = input_rows(x, w.k)?;
    check_len("matmul output length (rows x n)", y.len(), t * w.n)?;
    let kernel = Kernel::new(w.ty, simd)?;
    let xsums = kernel.xsums(x, w.k);
    run_chunks(t, w.n, w.k, y, |cols, r0, rt, tile| {
        kernel.tile(
            w.rows(cols),
            &x[r0 * w.k..(r0 + rt) * w.k],
            xsums.rows(r0, rt),
            w.k,
            tile,
        );
    });
    Ok(())
}

/// `y = silu(x W_gateᵀ) * (x W_upᵀ)`: the SwiGLU feed-forward's first half without
/// materializing the gate and up activations. The same numbers as [`matmul`] twice followed by
/// [`swiglu`](super::swiglu) (ggml: `ggml_swiglu_split` over two `mul_mat`s).
pub fn matmul_gate_up_swiglu(
    x: &[f32],
    w_gate: &WeightMatrix,
    w_up: &WeightMatrix,
    y: &mut [f32],
) -> Result<(), KernelError> {
    matmul_gate_up_swiglu_with(Simd::detect(), x, w_gate, w_up, y)
}

/// [`matmul_gate_up_swiglu`] with a chosen instruction set.
pub fn matmul_gate_up_swiglu_with(
    simd: Simd,
    x: &[f32],
    w_gate: &WeightMatrix,
    w_up: &WeightMatrix,
    y: &mut [f32],
) -> Result<(), KernelError> {
    check_len("up weight rows (must equal the gate's)", w_up.n, w_gate.n)?;
    check_len(
        "up weight row length (must equal the gate's)",
        w_up.k,
        w_gate.k,
    )?;
    let (n, k) = (w_gate.n, w_gate.k);
    let t = input_rows(x, k)?;
    check_len("gate_up_swiglu output length (rows x n)", y.len(), t * n)?;
    let (kg, ku) = (Kernel::new(w_gate.ty, simd)?, Kernel::new(w_up.ty, simd)?);
    let (sg, su) = (kg.xsums(x, k), ku.xsums(x, k));
    run_chunks(t, n, k, y, |cols, r0, rt, tile| {
        let xt = &x[r0 * k..(r0 + rt) * k];
        let mut up = [0.0f32; TILE_OUT];
        kg.tile(w_gate.rows(cols.clone()), xt, sg.rows(r0, rt), k, tile);
        ku.tile(w_up.rows(cols), xt, su.rows(r0, rt), k, &mut up);
        for (g, u) in tile.iter_mut().zip(&up) {
            *g = super::elementwise::silu1(*g) * u;
        }
    });
    Ok(())
}

fn input_rows(x: &[f32], k: usize) -> Result<usize, KernelError> {
    if k == 0 || !x.len().is_multiple_of(k) {
        return Err(KernelError::Invalid(format!(
            "matmul input has {} elements, not a whole number of rows of {k}",
            x.len()
        )));
    }
    Ok(x.len() / k)
}

/// Outputs of one tile: `out[r * CHUNK + i]` is input row `r`, weight row `i` of the chunk.
const TILE_OUT: usize = TILE_ROWS * CHUNK;
type TileOut = [f32; TILE_OUT];

/// Splits the `[t, n]` output into chunks of [`CHUNK`] columns run in parallel; within a chunk,
/// `tile(cols, r0, rt, out)` computes input rows `r0..r0 + rt` (at most [`TILE_ROWS`]) for the
/// weight rows `cols`, and the result is stored into `y`.
fn run_chunks<F>(t: usize, n: usize, k: usize, y: &mut [f32], tile: F)
where
    F: Fn(Range<usize>, usize, usize, &mut TileOut) + Sync,
{
    let n_chunks = n.div_ceil(CHUNK);
    let min_len = MIN_MACS_PER_TASK.div_ceil((CHUNK * k * t).max(1)).max(1);
    let out = DisjointColumns::new(y);
    (0..n_chunks)
        .into_par_iter()
        .with_min_len(min_len)
        .for_each(|c| {
            let cols = c * CHUNK..((c + 1) * CHUNK).min(n);
            let width = cols.len();
            let mut buf = [0.0f32; TILE_OUT];
            for r0 in (0..t).step_by(TILE_ROWS) {
                let rt = TILE_ROWS.min(t - r0);
                tile(cols.clone(), r0, rt, &mut buf);
                for r in 0..rt {
                    // SAFETY: chunk `c` alone writes columns `cols` of every row, and the
                    // chunks' column ranges are disjoint.
                    unsafe { out.write((r0 + r) * n + cols.start, &buf[r * CHUNK..][..width]) };
                }
            }
        });
}

/// Lets parallel work items write disjoint parts of one output slice.
struct DisjointColumns<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: the pointer comes from a `&mut [f32]` borrowed for 'a; `write` requires callers to
// write disjoint ranges, so sharing it across threads cannot race.
unsafe impl Send for DisjointColumns<'_> {}
unsafe impl Sync for DisjointColumns<'_> {}

impl<'a> DisjointColumns<'a> {
    fn new(y: &'a mut [f32]) -> Self {
        DisjointColumns {
            ptr: y.as_mut_ptr(),
            len: y.len(),
            _borrow: PhantomData,
        }
    }

    /// Copies `vals` to `y[start..start + vals.len()]`.
    ///
    /// # Safety
    /// No other thread reads or writes that range while this runs.
    unsafe fn write(&self, start: usize, vals: &[f32]) {
        assert!(start + vals.len() <= self.len, "write past the output");
        // SAFETY: in bounds (checked above) and not aliased (the caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(vals.as_ptr(), self.ptr.add(start), vals.len()) }
    }
}

/// Per-row sums of `x` over each 32 elements (for formats with a minimum), or nothing.
struct XSums {
    sums: Vec<f32>,
    per_row: usize,
}

impl XSums {
    fn rows(&self, r0: usize, rt: usize) -> &[f32] {
        if self.per_row == 0 {
            &[]
        } else {
            &self.sums[r0 * self.per_row..(r0 + rt) * self.per_row]
        }
    }
}

/// Computes a tile: `out[r * CHUNK + i] = dot(x[r], w[i])` for the rows of `x` (R of them, fixed
/// by the function) and the whole weight rows in `w`. `unsafe` because the vector versions need
/// the CPU features checked by [`Simd::detect`]; [`Kernel::new`] only hands out those the CPU has.
type TileFn = unsafe fn(w: &[u8], x: &[f32], xsums: &[f32], k: usize, out: &mut TileOut);

/// The tile functions of one weight type for one instruction set, for 1..=TILE_ROWS rows.
struct Kernel {
    tiles: [TileFn; TILE_ROWS],
    has_min: bool,
}

impl Kernel {
    fn new(ty: GgmlType, simd: Simd) -> Result<Kernel, KernelError> {
        let simd = simd.checked()?;
        Ok(match ty {
            GgmlType::F32 => Kernel::of::<PlainTile<F32>>(simd),
            GgmlType::F16 => Kernel::of::<PlainTile<F16>>(simd),
            GgmlType::BF16 => Kernel::of::<PlainTile<BF16>>(simd),
            GgmlType::Q4_0 => Kernel::of::<QuantTile<Q4_0>>(simd),
            GgmlType::Q4_1 => Kernel::of::<QuantTile<Q4_1>>(simd),
            GgmlType::Q5_0 => Kernel::of::<QuantTile<Q5_0>>(simd),
            GgmlType::Q5_1 => Kernel::of::<QuantTile<Q5_1>>(simd),
            GgmlType::Q8_0 => Kernel::of::<QuantTile<Q8_0>>(simd),
            GgmlType::Q4_K => Kernel::of::<QuantTile<Q4K>>(simd),
            GgmlType::Q5_K => Kernel::of::<QuantTile<Q5K>>(simd),
            GgmlType::Q6_K => Kernel::of::<QuantTile<Q6K>>(simd),
            ty => return Err(KernelError::UnsupportedType { op: "matmul", ty }),
        })
    }

    fn of<T: Tile>(simd: Simd) -> Kernel {
        let tiles: [TileFn; TILE_ROWS] = match simd {
            Simd::Portable => [
                portable::<T, 1>,
                portable::<T, 2>,
                portable::<T, 3>,
                portable::<T, 4>,
            ],
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2Fma => [avx2::<T, 1>, avx2::<T, 2>, avx2::<T, 3>, avx2::<T, 4>],
        };
        Kernel {
            tiles,
            has_min: T::HAS_MIN,
        }
    }

    fn tile(&self, w: &[u8], x: &[f32], xsums: &[f32], k: usize, out: &mut TileOut) {
        let rt = x.len() / k;
        // SAFETY: `Kernel::new` builds vector tile functions only for an instruction set this
        // CPU supports (`Simd::checked`).
        unsafe { (self.tiles[rt - 1])(w, x, xsums, k, out) }
    }

    fn xsums(&self, x: &[f32], k: usize) -> XSums {
        if !self.has_min {
            return XSums {
                sums: Vec::new(),
                per_row: 0,
            };
        }
        // Always the portable lanes: the sums are exact-order adds, the same on every path.
        let sums = x
            .chunks_exact(SUB)
            .map(|c| {
                let a = Lanes::load(&c[0..]).add(Lanes::load(&c[8..]));
                let b = Lanes::load(&c[16..]).add(Lanes::load(&c[24..]));
                a.add(b).hsum()
            })
            .collect();
        XSums {
            sums,
            per_row: k / SUB,
        }
    }
}

fn portable<T: Tile, const R: usize>(w: &[u8], x: &[f32], s: &[f32], k: usize, out: &mut TileOut) {
    T::run::<Lanes, R>(w, x, s, k, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2<T: Tile, const R: usize>(
    w: &[u8],
    x: &[f32],
    s: &[f32],
    k: usize,
    out: &mut TileOut,
) {
    T::run::<Avx2, R>(w, x, s, k, out)
}

/// A weight format's tile loop, generic over the vector type and the number of rows.
trait Tile {
    const HAS_MIN: bool;
    fn run<V: V8, const R: usize>(w: &[u8], x: &[f32], xsums: &[f32], k: usize, out: &mut TileOut);
}

struct QuantTile<Q>(PhantomData<Q>);
struct PlainTile<P>(PhantomData<P>);

impl<Q: Quant> Tile for QuantTile<Q> {
    const HAS_MIN: bool = Q::HAS_MIN;

    /// Per weight row and input row: an 8-lane accumulator `acc += d * p` where
    /// `p = v[0..8] x[0..8] + ... + v[24..32] x[24..32]` (Q6_K: one `p` per half, each with its
    /// scale), and a scalar `macc += m * sum(x_sub)`; the output is `hsum(acc) + macc`.
    #[inline(always)]
    fn run<V: V8, const R: usize>(w: &[u8], x: &[f32], xsums: &[f32], k: usize, out: &mut TileOut) {
        let row_bytes = k / Q::QK * Q::BYTES;
        let nsub = k / SUB;
        let xr: [&[f32]; R] = std::array::from_fn(|r| &x[r * k..(r + 1) * k]);
        let sr: [&[f32]; R] = std::array::from_fn(|r| {
            if Q::HAS_MIN {
                &xsums[r * nsub..(r + 1) * nsub]
            } else {
                &[]
            }
        });
        for (i, wrow) in w.chunks_exact(row_bytes).enumerate() {
            let mut acc = [V::zero(); R];
            let mut macc = [0.0f32; R];
            for (b, blk) in wrow.chunks_exact(Q::BYTES).enumerate() {
                let blk = &blk[..Q::BYTES];
                let sc = Q::scales(blk);
                for j in 0..Q::QK / SUB {
                    let (v, s) = Q::sub::<V>(blk, &sc, j);
                    let sub = b * (Q::QK / SUB) + j;
                    for r in 0..R {
                        let xs = &xr[r][sub * SUB..][..SUB];
                        let xv: [V; 4] = std::array::from_fn(|g| V::load(&xs[8 * g..]));
                        if Q::SPLIT {
                            let lo = v[0].mul(xv[0]).madd(v[1], xv[1]);
                            let hi = v[2].mul(xv[2]).madd(v[3], xv[3]);
                            acc[r] = acc[r].madd(V::splat(s.d), lo).madd(V::splat(s.d_hi), hi);
                        } else {
                            let p = v[0]
                                .mul(xv[0])
                                .madd(v[1], xv[1])
                                .madd(v[2], xv[2])
                                .madd(v[3], xv[3]);
                            acc[r] = acc[r].madd(V::splat(s.d), p);
                        }
                        if Q::HAS_MIN {
                            macc[r] = V::madd1(s.m, sr[r][sub], macc[r]);
                        }
                    }
                }
            }
            for r in 0..R {
                out[r * CHUNK + i] = acc[r].hsum() + macc[r];
            }
        }
    }
}

impl<P: Plain> Tile for PlainTile<P> {
    const HAS_MIN: bool = false;

    /// Per weight row and input row: four 8-lane accumulators over steps of 32 elements, a
    /// scalar tail for the last `k % 32`; the output is `hsum((a0 + a1) + (a2 + a3)) + tail`.
    #[inline(always)]
    fn run<V: V8, const R: usize>(w: &[u8], x: &[f32], _: &[f32], k: usize, out: &mut TileOut) {
        const STEP: usize = 4 * LANES;
        let row_bytes = k * P::SIZE;
        let xr: [&[f32]; R] = std::array::from_fn(|r| &x[r * k..(r + 1) * k]);
        let whole = k / STEP * STEP;
        for (i, wrow) in w.chunks_exact(row_bytes).enumerate() {
            let mut acc = [[V::zero(); 4]; R];
            for (c, wb) in wrow[..whole * P::SIZE]
                .chunks_exact(STEP * P::SIZE)
                .enumerate()
            {
                let wv: [V; 4] = std::array::from_fn(|a| P::load(&wb[a * LANES * P::SIZE..]));
                for r in 0..R {
                    let xs = &xr[r][c * STEP..][..STEP];
                    for a in 0..4 {
                        acc[r][a] = acc[r][a].madd(wv[a], V::load(&xs[a * LANES..]));
                    }
                }
            }
            let mut tail = [0.0f32; R];
            for e in whole..k {
                let we = P::get(&wrow[e * P::SIZE..]);
                for r in 0..R {
                    tail[r] = V::madd1(we, xr[r][e], tail[r]);
                }
            }
            for r in 0..R {
                let a = &acc[r];
                out[r * CHUNK + i] = a[0].add(a[1]).add(a[2].add(a[3])).hsum() + tail[r];
            }
        }
    }
}
