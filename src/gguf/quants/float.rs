//! The plain float types: F32, F16 and BF16 (one element per block, little-endian).
//!
//! Widening (F16 or BF16 to f32) is exact; F16 NaNs keep sign and payload and are made quiet,
//! as ggml, F16C and `half`'s software path all do. Narrowing rounds to nearest, ties to even;
//! NaNs stay NaNs of the same sign, made quiet, with the payload ggml gives them (F16: `0x7e00`;
//! BF16: the top half of the f32 with the quiet bit set), so results do not depend on whether
//! the CPU has F16C.
//!
//! F16 rows go a chunk at a time through stack buffers so that `half`'s SIMD slice conversions
//! (F16C, eight values per instruction) do the work and input bytes need no alignment.

use super::array;
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

/// Elements converted per stack buffer.
const CHUNK: usize = 256;

pub(super) fn f32_to_f32(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *d = f32::from_le_bytes(*array(s));
    }
}

pub(super) fn f16_to_f32(src: &[u8], dst: &mut [f32]) {
    let mut bits = [0u16; CHUNK];
    for (s, d) in src.chunks(2 * CHUNK).zip(dst.chunks_mut(CHUNK)) {
        let b = &mut bits[..d.len()];
        for (x, c) in b.iter_mut().zip(s.chunks_exact(2)) {
            *x = u16::from_le_bytes(*array(c));
        }
        b.reinterpret_cast::<f16>().convert_to_f32_slice(d);
    }
}

pub(super) fn bf16_to_f32(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *d = bf16_bits_to_f32(u16::from_le_bytes(*array(s)));
    }
}

pub(super) fn f32_to_f16(src: &[u8], dst: &mut [f16]) {
    let mut tmp = [0f32; CHUNK];
    for (s, d) in src.chunks(4 * CHUNK).zip(dst.chunks_mut(CHUNK)) {
        let t = &mut tmp[..d.len()];
        f32_to_f32(s, t);
        narrow_to_f16(t, d);
    }
}

pub(super) fn f16_to_f16(src: &[u8], dst: &mut [f16]) {
    for (s, d) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *d = f16::from_bits(u16::from_le_bytes(*array(s)));
    }
}

pub(super) fn bf16_to_f16(src: &[u8], dst: &mut [f16]) {
    let mut tmp = [0f32; CHUNK];
    for (s, d) in src.chunks(2 * CHUNK).zip(dst.chunks_mut(CHUNK)) {
        let t = &mut tmp[..d.len()];
        bf16_to_f32(s, t);
        narrow_to_f16(t, d);
    }
}

pub(super) fn quantize_f32(src: &[f32], dst: &mut [u8]) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(4)) {
        d.copy_from_slice(&s.to_le_bytes());
    }
}

pub(super) fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    let mut tmp = [f16::ZERO; CHUNK];
    for (s, d) in src.chunks(CHUNK).zip(dst.chunks_mut(2 * CHUNK)) {
        let t = &mut tmp[..s.len()];
        narrow_to_f16(s, t);
        for (x, out) in t.iter().zip(d.chunks_exact_mut(2)) {
            out.copy_from_slice(&x.to_bits().to_le_bytes());
        }
    }
}

pub(super) fn quantize_bf16(src: &[f32], dst: &mut [u8]) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
        d.copy_from_slice(&f32_to_bf16_bits(*s).to_le_bytes());
    }
}

/// BF16 is the top half of an f32: widening is a shift.
#[inline(always)]
pub(super) fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// f32 to BF16 as ggml's `ggml_compute_fp32_to_bf16`: NaNs keep their sign and top payload bits
/// and are made quiet; everything else rounds to nearest, ties to even (overflowing to infinity).
#[inline(always)]
pub(super) fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    // No overflow: the largest non-NaN pattern is 0xff80_0000 (negative infinity).
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// f32 to f16, to nearest, ties to even; NaNs become ggml's quiet NaN `sign | 0x7e00`.
fn narrow_to_f16(src: &[f32], dst: &mut [f16]) {
    dst.convert_from_f32_slice(src);
    for (x, d) in src.iter().zip(dst.iter_mut()) {
        if x.is_nan() {
            *d = f16::from_bits(((x.to_bits() >> 16) as u16 & 0x8000) | 0x7e00);
        }
    }
}
