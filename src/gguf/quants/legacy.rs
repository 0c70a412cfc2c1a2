//! The legacy 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0.
//!
//! Each block holds an f16 scale `d` (and for the `_1` formats an f16 offset `m`), then the
//! quants. 4- and 5-bit quants are split across nibbles: byte `j` of `qs` holds element `j` in
//! its low nibble and element `j + 16` in its high nibble; the 5-bit formats keep each element's
//! fifth bit in bit `j` of the little-endian u32 `qh`.
//!
//! | type | bytes | layout | value |
//! | --- | --- | --- | --- |
//! | Q4_0 | 18 | d, qs\[16\] | `(q - 8) * d` |
//! | Q4_1 | 20 | d, m, qs\[16\] | `q * d + m` |
//! | Q5_0 | 22 | d, qh\[4\], qs\[16\] | `(q - 16) * d` |
//! | Q5_1 | 24 | d, m, qh\[4\], qs\[16\] | `q * d + m` |
//! | Q8_0 | 34 | d, qs\[32\] (i8) | `q * d` |
//!
//! Dequantization computes exactly ggml's `dequantize_row_*` expressions (integer quant widened
//! to f32, one multiply, one add, never fused). Quantization is ggml's `quantize_row_*_ref`:
//! scale from the block's extreme values, round to nearest.

use super::{f16_at, put_f16};

const QK: usize = 32;
const HALF: usize = QK / 2;

/// Splits a 32-element output block into its first and second halves.
#[inline(always)]
fn halves(y: &mut [f32; QK]) -> (&mut [f32], &mut [f32]) {
    y.split_at_mut(HALF)
}

pub(super) fn dequantize_q4_0(b: &[u8; 18], y: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    let (lo, hi) = halves(y);
    for ((&q, l), h) in qs.iter().zip(lo).zip(hi) {
        *l = ((q & 0x0f) as i32 - 8) as f32 * d;
        *h = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

pub(super) fn dequantize_q4_1(b: &[u8; 20], y: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    let (lo, hi) = halves(y);
    for ((&q, l), h) in qs.iter().zip(lo).zip(hi) {
        *l = (q & 0x0f) as f32 * d + m;
        *h = (q >> 4) as f32 * d + m;
    }
}

/// `FIFTH_BITS[b]` has byte `k` equal to `0x10` where bit `k` of `b` is set: it moves eight
/// fifth bits of `qh` onto their eight quants at once, where shifting by each element's index
/// would keep the loop from vectorizing. The dequantizers here and the CPU matmul kernels'
/// Q5_0/Q5_1 decoders share it.
pub(crate) static FIFTH_BITS: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < 8 {
            if b & (1 << k) != 0 {
                table[b] |= 0x10 << (8 * k);
            }
            k += 1;
        }
        b += 1;
    }
    table
};

/// Bit `k` of the little-endian `qh` as `0x10` in byte `k`, for the 32 quants of a block
/// (ggml's `((qh >> j) << 4) & 0x10` and `(qh >> (j + 12)) & 0x10`).
#[inline(always)]
fn fifth_bits(qh: &[u8]) -> [u8; QK] {
    let mut out = [0u8; QK];
    for (o, &b) in out.chunks_exact_mut(8).zip(qh) {
        o.copy_from_slice(&FIFTH_BITS[usize::from(b)].to_le_bytes());
    }
    out
}

pub(super) fn dequantize_q5_0(b: &[u8; 22], y: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    let h = fifth_bits(&b[2..6]);
    let qs = &b[6..22];
    let (lo, hi) = halves(y);
    let (h0, h1) = h.split_at(HALF);
    for ((((&q, l), hv), &b0), &b1) in qs.iter().zip(lo).zip(hi).zip(h0).zip(h1) {
        *l = (i32::from((q & 0x0f) | b0) - 16) as f32 * d;
        *hv = (i32::from((q >> 4) | b1) - 16) as f32 * d;
    }
}

pub(super) fn dequantize_q5_1(b: &[u8; 24], y: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let h = fifth_bits(&b[4..8]);
    let qs = &b[8..24];
    let (lo, hi) = halves(y);
    let (h0, h1) = h.split_at(HALF);
    for ((((&q, l), hv), &b0), &b1) in qs.iter().zip(lo).zip(hi).zip(h0).zip(h1) {
        *l = f32::from((q & 0x0f) | b0) * d + m;
        *hv = f32::from((q >> 4) | b1) * d + m;
    }
}

pub(super) fn dequantize_q8_0(b: &[u8; 34], y: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    for (&q, out) in b[2..34].iter().zip(y.iter_mut()) {
        *out = f32::from(q as i8) * d;
    }
}

/// The element of largest magnitude (the first one on ties) and its magnitude, as the `_0`
/// quantizers pick it. NaNs are never picked.
#[inline(always)]
fn signed_absmax(x: &[f32; QK]) -> f32 {
    let mut amax = 0f32;
    let mut max = 0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// The block's minimum and maximum, as the `_1` quantizers compute them (NaNs are skipped).
#[inline(always)]
fn min_max(x: &[f32; QK]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// `1 / d`, or 0 for a zero scale (a block of zeros).
#[inline(always)]
fn inverse(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

pub(super) fn quantize_q4_0(x: &[f32; QK], b: &mut [u8; 18]) {
    let d = signed_absmax(x) / -8.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    for j in 0..HALF {
        // Float-to-int casts truncate toward zero, like C's; values lie in [0.5, 16.5].
        let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let q1 = ((x[j + HALF] * id + 8.5) as i8).min(15) as u8;
        b[2 + j] = q0 | (q1 << 4);
    }
}

pub(super) fn quantize_q4_1(x: &[f32; QK], b: &mut [u8; 20]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    for j in 0..HALF {
        let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let q1 = (((x[j + HALF] - min) * id + 0.5) as i8).min(15) as u8;
        b[4 + j] = q0 | (q1 << 4);
    }
}

pub(super) fn quantize_q5_0(x: &[f32; QK], b: &mut [u8; 22]) {
    let d = signed_absmax(x) / -16.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    let mut qh = 0u32;
    for j in 0..HALF {
        let q0 = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let q1 = ((x[j + HALF] * id + 16.5) as i8).min(31) as u8;
        b[6 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
        qh |= u32::from((q0 & 0x10) >> 4) << j;
        qh |= u32::from((q1 & 0x10) >> 4) << (j + HALF);
    }
    b[2..6].copy_from_slice(&qh.to_le_bytes());
}

pub(super) fn quantize_q5_1(x: &[f32; QK], b: &mut [u8; 24]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    let mut qh = 0u32;
    for j in 0..HALF {
        // ggml does not clamp here because the value cannot exceed 31.5; clamping changes
        // nothing for finite input and keeps a stray 32 from wrapping to 0.
        let q0 = (((x[j] - min) * id + 0.5) as u8).min(31);
        let q1 = (((x[j + HALF] - min) * id + 0.5) as u8).min(31);
        b[8 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
        qh |= u32::from((q0 & 0x10) >> 4) << j;
        qh |= u32::from((q1 & 0x10) >> 4) << (j + HALF);
    }
    b[4..8].copy_from_slice(&qh.to_le_bytes());
}

pub(super) fn quantize_q8_0(x: &[f32; QK], b: &mut [u8; 34]) {
    // ggml's MAX(a, b) macro: `a > b ? a : b`.
    let mut amax = 0f32;
    for &v in x {
        let a = v.abs();
        amax = if amax > a { amax } else { a };
    }
    let d = amax / 127.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    for (&v, q) in x.iter().zip(&mut b[2..34]) {
        // `round` rounds halves away from zero, like C's roundf.
        *q = ((v * id).round() as i8) as u8;
    }
}
