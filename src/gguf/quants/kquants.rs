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

use super::{f16_at, put_f16};

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

// ------------------------------------------------------------------------------------------
// Reference quantization (ggml's `quantize_row_q{4,5,6}_K_ref`).
//
// Unlike the legacy formats these search for good scales: for each sub-block a weighted least
// squares fit over a few candidate scales (`make_qkx2_quants` for Q4_K/Q5_K, `make_qx_quants`
// for Q6_K), then the sub-block scales are themselves quantized to 6 or 8 bits and the quants
// recomputed against the rounded scales. Every sum runs in ggml's order with separate roundings,
// so the bytes match ggml's C reference built without FMA contraction (the x86-64 default).

/// ggml's `GROUP_MAX_EPS`: sub-blocks whose largest magnitude is below it quantize to zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round to nearest, ties to even, by adding 1.5 * 2^23 and reading the
/// mantissa. Exact for |x| < 2^22; beyond that (never reached for finite blocks) it returns the
/// same meaningless value as ggml, without panicking.
#[inline(always)]
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's `make_qkx2_quants` for 32 elements without `use_mad`: quants in `0..=nmax`, a scale
/// and a min (returned as `-min`, a non-negative offset) minimizing the weighted squared error,
/// trying `nstep + 1` candidate scales `(nmax + rmin + rdelta * is) / (max - min)`.
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32; 32],
    w: &[f32; 32],
    l: &mut [u8; 32],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..32 {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..32 {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * f32::from(l[i]) + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..32 {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let qf = q as f32;
            sum_l += w[i] * qf;
            sum_l2 += w[i] * qf * qf;
            sum_xl += w[i] * qf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..32 {
                let diff = this_scale * f32::from(laux[i]) + this_min - x[i];
                cur_error += w[i] * (diff * diff);
            }
            if cur_error < best_error {
                *l = laux;
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// The shared first half of Q4_K and Q5_K quantization: per-sub-block scales and mins fitted
/// with weights `sqrt(mean(x^2)) + |x|`, quantized to 6 bits into `b[4..16]`, the super-block
/// scales `d`, `dmin` into `b[0..4]`, and the quants (`0..=nmax`) against the rounded scales.
fn quantize_scales_and_quants(
    x: &[f32; QK_K],
    b: &mut [u8],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> [u8; QK_K] {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut max_scale = 0f32;
    let mut max_min = 0f32;
    for j in 0..8 {
        let xs: &[f32; 32] = super::array(&x[32 * j..32 * j + 32]);
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let w: [f32; 32] = std::array::from_fn(|i| av_x + xs[i].abs());
        let lj = super::array_mut(&mut l[32 * j..32 * j + 32]);
        (scales[j], mins[j]) = make_qkx2_quants(nmax, xs, &w, lj, rmin, 0.1, nstep);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut b[4..16];
    for j in 0..8 {
        // ggml stores nearest_int's result in a u8 (wrapping), then caps it at 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(b, 0, max_scale / 63.0);
    put_f16(b, 2, max_min / 63.0);
    let (d_all, dmin_all) = (f16_at(b, 0), f16_at(b, 2));
    let scales = *scales_of(b);
    for j in 0..8 {
        let (sc, m) = scale_min(j, &scales);
        let d = d_all * f32::from(sc);
        if d == 0.0 {
            // ggml keeps the quants of the fit for a sub-block whose scale rounds to zero.
            continue;
        }
        let dm = dmin_all * f32::from(m);
        for i in 32 * j..32 * j + 32 {
            l[i] = nearest_int((x[i] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    l
}

pub(super) fn quantize_q4_k(x: &[f32; QK_K], b: &mut [u8; 144]) {
    let l = quantize_scales_and_quants(x, b, 15, -1.0, 20);
    let qs = &mut b[16..144];
    for (g, q) in qs.chunks_exact_mut(32).enumerate() {
        for (i, q) in q.iter_mut().enumerate() {
            *q = l[64 * g + i] | (l[64 * g + i + 32] << 4);
        }
    }
}

pub(super) fn quantize_q5_k(x: &[f32; QK_K], b: &mut [u8; 176]) {
    let l = quantize_scales_and_quants(x, b, 31, -0.5, 15);
    let (qh, qs) = b[16..176].split_at_mut(32);
    qh.fill(0);
    for (g, q) in qs.chunks_exact_mut(32).enumerate() {
        let (m1, m2) = (1u8 << (2 * g), 2u8 << (2 * g));
        for (i, q) in q.iter_mut().enumerate() {
            let (mut l1, mut l2) = (l[64 * g + i], l[64 * g + i + 32]);
            if l1 > 15 {
                l1 -= 16;
                qh[i] |= m1;
            }
            if l2 > 15 {
                l2 -= 16;
                qh[i] |= m2;
            }
            *q = l1 | (l2 << 4);
        }
    }
}

/// ggml's `make_qx_quants` with `rmse_type` 1 (weights `x^2`) for 16 elements: quants
/// `-nmax..nmax` stored offset by `nmax`, and the scale of the best of 19 candidate fits.
fn make_qx_quants(nmax: i32, x: &[f32; 16], l: &mut [u8; 16]) -> f32 {
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let fit = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let quantize = |iscale: f32, l: &mut [u8; 16]| {
        for (q, &v) in l.iter_mut().zip(x) {
            *q = (nmax + nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as u8;
        }
    };
    let iscale = -nmax_f / max;
    quantize(iscale, l);
    let (sumlx, suml2) = fit(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        let iscale = -(nmax_f + 0.1 * is as f32) / max;
        let (sumlx, suml2) = fit(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            quantize(iscale, l);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

pub(super) fn quantize_q6_k(x: &[f32; QK_K], b: &mut [u8; 210]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let mut max_scale = 0f32;
    let mut max_abs_scale = 0f32;
    for ib in 0..16 {
        let xs = super::array(&x[16 * ib..16 * ib + 16]);
        scales[ib] = make_qx_quants(32, xs, super::array_mut(&mut l[16 * ib..16 * ib + 16]));
        if scales[ib].abs() > max_abs_scale {
            max_abs_scale = scales[ib].abs();
            max_scale = scales[ib];
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        b.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(b, 208, 1.0 / iscale);
    for (s, &v) in b[192..208].iter_mut().zip(&scales) {
        // ggml stores the capped nearest_int in an i8 (wrapping).
        *s = nearest_int(iscale * v).min(127) as i8 as u8;
    }
    let d_all = f16_at(b, 208);
    for j in 0..16 {
        let d = d_all * f32::from(b[192 + j] as i8);
        if d == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            l[i] = (nearest_int(x[i] / d).clamp(-32, 31) + 32) as u8;
        }
    }
    let (ql, rest) = b.split_at_mut(128);
    let qh = &mut rest[..64];
    for g in 0..2 {
        let l = &l[128 * g..128 * g + 128];
        for i in 0..32 {
            let (q1, q2, q3, q4) = (l[i], l[i + 32], l[i + 64], l[i + 96]);
            ql[64 * g + i] = (q1 & 0x0f) | ((q3 & 0x0f) << 4);
            ql[64 * g + i + 32] = (q2 & 0x0f) | ((q4 & 0x0f) << 4);
            qh[32 * g + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}
