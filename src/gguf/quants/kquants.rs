//! The k-quants: 256-element super-blocks with quantized sub-block scales (Q4_K, Q5_K, Q6_K).
//!
//! | type | bytes | layout |
//! | --- | --- | --- |
//! | Q4_K | 144 | d, dmin (f16), scales\[12\], qs\[128\] |
//! | Q5_K | 176 | d, dmin (f16), scales\[12\], qh\[32\], qs\[128\] |
//! | Q6_K | 210 | ql\[128\], qh\[64\], scales\[16\] (i8), d (f16) |
//!
//! Q4_K and Q5_K have eight sub-blocks of 32 with a 6-bit scale `sc` and a 6-bit min `m` each,
//! packed into 12 bytes (see [`scale_min`]); element value `d * sc * q - dmin * m`, where the
//! products `d * sc` and `dmin * m` are rounded to f32 first, as in ggml. Q6_K has sixteen
//! sub-blocks of 16 with an i8 scale each; value `d * sc * (q - 32)`, left to right.
//!
//! Elements are grouped in 64s (Q4_K, Q5_K) or 128s (Q6_K) whose quants share bytes; the loops
//! below follow ggml's `dequantize_row_q*_K` group by group.

use super::f16_at;

const QK_K: usize = 256;

/// Sub-block `j`'s 6-bit scale and min from the 12 packed bytes of Q4_K/Q5_K (ggml's
/// `get_scale_min_k4`): bytes 0–3 hold the scales of sub-blocks 0–3 in their low 6 bits, bytes
/// 4–7 their mins; sub-blocks 4–7 keep their low 4 bits in the nibbles of bytes 8–11 and their
/// top 2 bits in the top bits of bytes 0–7.
#[inline(always)]
fn scale_min(j: usize, s: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The scales field of a Q4_K/Q5_K block.
#[inline(always)]
fn scales_of(b: &[u8]) -> &[u8; 12] {
    super::array(&b[4..16])
}

pub(super) fn dequantize_q4_k(b: &[u8; 144], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = scales_of(b);
    let qs = &b[16..144];
    // Group g: 64 elements from 32 bytes; low nibbles are sub-block 2g, high nibbles 2g + 1.
    for (g, (q, out)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min(2 * g, scales);
        let (sc2, m2) = scale_min(2 * g + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let (lo, hi) = out.split_at_mut(32);
        for ((&q, l), h) in q.iter().zip(lo).zip(hi) {
            *l = d1 * f32::from(q & 0x0f) - m1;
            *h = d2 * f32::from(q >> 4) - m2;
        }
    }
}

pub(super) fn dequantize_q5_k(b: &[u8; 176], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = scales_of(b);
    let qh = &b[16..48];
    let qs = &b[48..176];
    // Group g: like Q4_K, with the fifth bits in bits 2g and 2g + 1 of the 32 qh bytes.
    for (g, (q, out)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min(2 * g, scales);
        let (sc2, m2) = scale_min(2 * g + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let (u1, u2) = (1u8 << (2 * g), 2u8 << (2 * g));
        let (lo, hi) = out.split_at_mut(32);
        for (((&q, &h), l), hv) in q.iter().zip(qh).zip(lo).zip(hi) {
            let q1 = (q & 0x0f) + if h & u1 != 0 { 16 } else { 0 };
            let q2 = (q >> 4) + if h & u2 != 0 { 16 } else { 0 };
            *l = d1 * f32::from(q1) - m1;
            *hv = d2 * f32::from(q2) - m2;
        }
    }
}

pub(super) fn dequantize_q6_k(b: &[u8; 210], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 208);
    let ql = &b[0..128];
    let qh = &b[128..192];
    let sc = &b[192..208];
    // Group g of 128 elements: 64 ql bytes, 32 qh bytes, 8 scales. Element l (l < 32) of each
    // quarter takes a nibble of ql[l] or ql[l + 32] and two bits of qh[l].
    for (g, out) in y.chunks_exact_mut(128).enumerate() {
        let ql = &ql[64 * g..64 * g + 64];
        let qh = &qh[32 * g..32 * g + 32];
        let sc = &sc[8 * g..8 * g + 8];
        // Elements 16h..16h + 16 of each quarter share one scale: with the scales hoisted
        // (`d * sc` first, as ggml's left-to-right `d * sc * q`) the inner loop vectorizes.
        for h in 0..2 {
            let ds = |k: usize| d * f32::from(sc[h + 2 * k] as i8);
            let (s1, s2, s3, s4) = (ds(0), ds(1), ds(2), ds(3));
            let r = 16 * h..16 * h + 16;
            let (a, b, hb) = (&ql[r.clone()], &ql[32 + 16 * h..48 + 16 * h], &qh[r]);
            for l in 0..16 {
                let (a, b, hb) = (a[l], b[l], hb[l]);
                let q1 = ((a & 0x0f) | ((hb & 3) << 4)) as i8 - 32;
                let q2 = ((b & 0x0f) | (((hb >> 2) & 3) << 4)) as i8 - 32;
                let q3 = ((a >> 4) | (((hb >> 4) & 3) << 4)) as i8 - 32;
                let q4 = ((b >> 4) | (((hb >> 6) & 3) << 4)) as i8 - 32;
                let i = 16 * h + l;
                out[i] = s1 * f32::from(q1);
                out[32 + i] = s2 * f32::from(q2);
                out[64 + i] = s3 * f32::from(q3);
                out[96 + i] = s4 * f32::from(q4);
            }
        }
    }
}
