//! How each GGUF storage type is read, one block at a time, by the matmul and embedding kernels.
//!
//! A block-quantized row is split into *sub-blocks* of 32 elements. Every format decodes a
//! sub-block into 32 small integers `v` (exactly representable as `f32`) and scales such that
//! element `i` of the sub-block is
//!
//! - `d * v[i] + m` (formats with a minimum: Q4_1, Q5_1, Q4_K, Q5_K), or `d * v[i]`, and
//! - for Q6_K, whose scales cover 16 elements, `d_hi` replaces `d` for `i >= 16`;
//!
//! with `d`, `m` computed exactly as ggml's `dequantize_row_*` computes them (`d * sc` in f32 for
//! the k-quants), so `d * v + m` is bit-identical to ggml's dequantized value. The matmul then
//! never dequantizes: it computes `d * dot(v, x) + m * sum(x)` per sub-block, with the sums of
//! `x` over each 32 elements computed once per input row.
//!
//! Layouts (ggml-common.h; all little-endian, `f16` scales):
//!
//! | type | bytes | block |
//! | --- | --- | --- |
//! | Q4_0 | 18 | `d`, 16 bytes: element `j` is the low nibble of byte `j`, `j + 16` its high nibble; `v = q - 8` |
//! | Q4_1 | 20 | `d`, `m`, nibbles as Q4_0; `v = q` |
//! | Q5_0 | 22 | `d`, `qh: u32` (bit `j` is element `j`'s fifth bit), nibbles as Q4_0; `v = q - 16` |
//! | Q5_1 | 24 | `d`, `m`, `qh`, nibbles; `v = q` |
//! | Q8_0 | 34 | `d`, 32 × i8 |
//! | Q4_K | 144 | `d`, `dmin`, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles (256 elements) |
//! | Q5_K | 176 | as Q4_K plus 32 bytes of fifth bits |
//! | Q6_K | 210 | 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 × i8 scales, `d` |

use super::simd::{V8, bf16_to_f32, f16_le, f16_to_f32};
use crate::gguf::quants::FIFTH_BITS;

/// Elements per sub-block.
pub(crate) const SUB: usize = 32;

/// The scales of one 32-element sub-block.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SubScale {
    /// Scale of the sub-block (of its first 16 elements when the format is [`Quant::SPLIT`]).
    pub d: f32,
    /// Scale of the last 16 elements (Q6_K only; equal to `d` elsewhere).
    pub d_hi: f32,
    /// Offset added to every element (0 unless [`Quant::HAS_MIN`]).
    pub m: f32,
}

/// A sub-block's 32 values as four 8-lane vectors, elements `8i..8i + 8` in `v[i]`.
pub(crate) type Sub<V> = [V; 4];

/// A block-quantized type, read sub-block by sub-block.
pub(crate) trait Quant: 'static {
    /// Elements per block (32, or 256 for the k-quants).
    const QK: usize;
    /// Bytes per block.
    const BYTES: usize;
    /// Whether elements carry an offset `m` (then the matmul needs sums of `x`).
    const HAS_MIN: bool;
    /// Whether the two halves of a sub-block have their own scales (`d`, `d_hi`).
    const SPLIT: bool = false;
    /// Per-block values decoded once and shared by its sub-blocks.
    type Scales: Copy;

    /// Decodes what the block's sub-blocks share. `blk` is `BYTES` long.
    fn scales(blk: &[u8]) -> Self::Scales;
    /// Decodes sub-block `j` (of `QK / 32`): its values `v` (small integers) and scales.
    fn sub<V: V8>(blk: &[u8], sc: &Self::Scales, j: usize) -> (Sub<V>, SubScale);
}

/// Low nibble of each byte.
const LO4: u64 = 0x0f0f_0f0f_0f0f_0f0f;

/// 8 bytes of `b` starting at `at`, as a little-endian u64 (one lane per byte).
#[inline(always)]
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The 32 4-bit values of a Q4_0/Q4_1/Q5_x block (`qs` 16 bytes: element `i` is the low nibble
/// of byte `i`, element `i + 16` its high nibble), with `hi[g]` ORed into group `g`'s bytes.
#[inline(always)]
fn nibbles<V: V8>(qs: &[u8], hi: [u64; 4], offset: f32) -> Sub<V> {
    let (a, b) = (u64_at(qs, 0), u64_at(qs, 8));
    let bytes = [a & LO4, b & LO4, (a >> 4) & LO4, (b >> 4) & LO4];
    let off = V::splat(offset);
    std::array::from_fn(|g| {
        let v = V::from_u8(bytes[g] | hi[g]);
        if offset == 0.0 { v } else { v.add(off) }
    })
}

/// The fifth bits of a Q5_0/Q5_1 block's groups of 8 (`qh` bit `i` belongs to element `i`).
#[inline(always)]
fn fifth_bits(qh: u32) -> [u64; 4] {
    std::array::from_fn(|g| FIFTH_BITS[((qh >> (8 * g)) & 0xff) as usize])
}

pub(crate) struct Q4_0;
impl Quant for Q4_0 {
    const QK: usize = 32;
    const BYTES: usize = 18;
    const HAS_MIN: bool = false;
    type Scales = ();
    #[inline(always)]
    fn scales(_: &[u8]) {}
    #[inline(always)]
    fn sub<V: V8>(blk: &[u8], _: &(), _: usize) -> (Sub<V>, SubScale) {
        let d = f16_le(&blk[0..2]);
        let v = nibbles(&blk[2..18], [0; 4], -8.0);
        (v, SubScale { d, d_hi: d, m: 0.0 })
    }
}

pub(crate) struct Q4_1;
impl Quant for Q4_1 {
    const QK: usize = 32;
    const BYTES: usize = 20;
    const HAS_MIN: bool = true;
    type Scales = ();
    #[inline(always)]
    fn scales(_: &[u8]) {}
    #[inline(always)]
    fn sub<V: V8>(blk: &[u8], _: &(), _: usize) -> (Sub<V>, SubScale) {
        let d = f16_le(&blk[0..2]);
        let m = f16_le(&blk[2..4]);
        let v = nibbles(&blk[4..20], [0; 4], 0.0);
        (v, SubScale { d, d_hi: d, m })
    }
}

pub(crate) struct Q5_0;
impl Quant for Q5_0 {
    const QK: usize = 32;
    const BYTES: usize = 22;
    const HAS_MIN: bool = false;
    type Scales = ();
    #[inline(always)]
    fn scales(_: &[u8]) {}
    #[inline(always)]
    fn sub<V: V8>(blk: &[u8], _: &(), _: usize) -> (Sub<V>, SubScale) {
        let d = f16_le(&blk[0..2]);
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let v = nibbles(&blk[6..22], fifth_bits(qh), -16.0);
        (v, SubScale { d, d_hi: d, m: 0.0 })
    }
}

pub(crate) struct Q5_1;
impl Quant for Q5_1 {
    const QK: usize = 32;
    const BYTES: usize = 24;
    const HAS_MIN: bool = true;
    type Scales = ();
    #[inline(always)]
    fn scales(_: &[u8]) {}
    #[inline(always)]
    fn sub<V: V8>(blk: &[u8], _: &(), _: usize) -> (Sub<V>, SubScale) {
        let d = f16_le(&blk[0..2]);
        let m = f16_le(&blk[2..4]);
        let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
        let v = nibbles(&blk[8..24], fifth_bits(qh), 0.0);
        (v, SubScale { d, d_hi: d, m })
    }
}

pub(crate) struct Q8_0;
impl Quant for Q8_0 {
    const QK: usize = 32;
    const BYTES: usize = 34;
    const HAS_MIN: bool = false;
    type Scales = ();
    #[inline(always)]
    fn scales(_: &[u8]) {}
    #[inline(always)]
    fn sub<V: V8>(blk: &[u8], _: &(), _: usize) -> (Sub<V>, SubScale) {
        let d = f16_le(&blk[0..2]);
        let qs = &blk[2..34];
        let v = std::array::from_fn(|g| V::from_i8(u64_at(qs, 8 * g)));
        (v, SubScale { d, d_hi: d, m: 0.0 })
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The shared part of a Q4_K/Q5_K block: `d * sc` and `-(dmin * m)` per sub-block, as ggml's
/// dequantizer computes them.
#[derive(Clone, Copy)]
pub(crate) struct KScales {
    d: [f32; 8],
    m: [f32; 8],
}

#[inline(always)]
fn k_scales(blk: &[u8]) -> KScales {
    let d = f16_le(&blk[0..2]);
    let dmin = f16_le(&blk[2..4]);
    let q = &blk[4..16];
    let mut s = KScales {
        d: [0.0; 8],
        m: [0.0; 8],
    };
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, q);
        s.d[j] = d * f32::from(sc);
        s.m[j] = -(dmin * f32::from(m));
    }
    s
}

pub(crate) struct Q4K;
impl Quant for Q4K {
    const QK: usize = 256;
    const BYTES: usize = 144;
    const HAS_MIN: bool = true;
    type Scales = KScales;
    #[inline(always)]
    fn scales(blk: &[u8]) -> KScales {
        k_scales(blk)
    }
    #[inline(always)]
    fn sub<V: V8>(blk: &[u8], sc: &KScales, j: usize) -> (Sub<V>, SubScale) {
        // Sub-blocks 2i and 2i+1 are the low and high nibbles of bytes 32i..32i+32.
        let q = &blk[16 + 32 * (j / 2)..][..32];
        let shift = 4 * (j % 2);
        let v = std::array::from_fn(|g| V::from_u8((u64_at(q, 8 * g) >> shift) & LO4));
        let s = SubScale {
            d: sc.d[j],
            d_hi: sc.d[j],
            m: sc.m[j],
        };
        (v, s)
    }
}

pub(crate) struct Q5K;
impl Quant for Q5K {
    const QK: usize = 256;
    const BYTES: usize = 176;
    const HAS_MIN: bool = true;
    type Scales = KScales;
    #[inline(always)]
    fn scales(blk: &[u8]) -> KScales {
        k_scales(blk)
    }
    #[inline(always)]
    fn sub<V: V8>(blk: &[u8], sc: &KScales, j: usize) -> (Sub<V>, SubScale) {
        // Fifth bits: bit j of qh[i] belongs to element i of sub-block j.
        let qh = &blk[16..48];
        let q = &blk[48 + 32 * (j / 2)..][..32];
        let shift = 4 * (j % 2);
        let v = std::array::from_fn(|g| {
            let lo = (u64_at(q, 8 * g) >> shift) & LO4;
            let hi = ((u64_at(qh, 8 * g) >> j) & 0x0101_0101_0101_0101) << 4;
            V::from_u8(lo | hi)
        });
        let s = SubScale {
            d: sc.d[j],
            d_hi: sc.d[j],
            m: sc.m[j],
        };
        (v, s)
    }
}

pub(crate) struct Q6K;
impl Quant for Q6K {
    const QK: usize = 256;
    const BYTES: usize = 210;
    const HAS_MIN: bool = false;
    const SPLIT: bool = true;
    type Scales = f32;
    #[inline(always)]
    fn scales(blk: &[u8]) -> f32 {
        f16_le(&blk[208..210])
    }
    #[inline(always)]
    fn sub<V: V8>(blk: &[u8], d: &f32, j: usize) -> (Sub<V>, SubScale) {
        // Halves of 128 elements; in half h, sub-block s (0..4) takes its low 4 bits from
        // ql[64h + 32(s%2) ..] (low nibbles for s < 2, high ones after) and its top 2 bits from
        // qh[32h ..] at bit 2s; values are stored plus 32.
        let (h, s) = (j / 4, j % 4);
        let ql = &blk[64 * h + 32 * (s % 2)..][..32];
        let qh = &blk[128 + 32 * h..][..32];
        let shift = 4 * (s / 2);
        let off = V::splat(-32.0);
        let v = std::array::from_fn(|g| {
            let lo = (u64_at(ql, 8 * g) >> shift) & LO4;
            let hi = ((u64_at(qh, 8 * g) >> (2 * s)) & 0x0303_0303_0303_0303) << 4;
            V::from_u8(lo | hi).add(off)
        });
        let sc = &blk[192 + 8 * h..][..8];
        let s = SubScale {
            d: d * f32::from(sc[2 * s] as i8),
            d_hi: d * f32::from(sc[2 * s + 1] as i8),
            m: 0.0,
        };
        (v, s)
    }
}

/// A plain (one number per element) type: read 8 at a time or one by one.
pub(crate) trait Plain: 'static {
    /// Bytes per element.
    const SIZE: usize;
    fn get(b: &[u8]) -> f32;
    /// Elements `0..8` of `b`.
    fn load<V: V8>(b: &[u8]) -> V;
}

pub(crate) struct F32;
impl Plain for F32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn get(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    #[inline(always)]
    fn load<V: V8>(b: &[u8]) -> V {
        V::load_f32_le(b)
    }
}

pub(crate) struct F16;
impl Plain for F16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn get(b: &[u8]) -> f32 {
        f16_to_f32(u16::from_le_bytes([b[0], b[1]]))
    }
    #[inline(always)]
    fn load<V: V8>(b: &[u8]) -> V {
        V::from_f16_le(b)
    }
}

pub(crate) struct BF16;
impl Plain for BF16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn get(b: &[u8]) -> f32 {
        bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))
    }
    #[inline(always)]
    fn load<V: V8>(b: &[u8]) -> V {
        V::from_bf16_le(b)
    }
}
