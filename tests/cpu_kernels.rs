//! The CPU kernels against naive, obviously-correct references: a scalar dequantizer written
//! from ggml's `dequantize_row_*` formulas (independent of the kernels' block decoders), f64
//! dot products, and plain loops. Shapes come from proptest (T = 1, odd row counts, k a whole
//! number of blocks), plus real tensors of the default model.
//!
//! Tolerances: the kernels sum in f32 in a different order than the f64 references; each
//! output's error is bounded by a few ulps of the sum of the magnitudes of its terms, so the
//! checks use `1e-5 * sum_i |x_i| (|w_i| + |offset_i|)` (the offset term covers the
//! `d * dot(q, x) + m * sum(x)` split of formats with a minimum, whose two parts can be larger
//! than the result).

mod common;

use half::f16;
use m40_llm::backend::cpu::kernels::{
    self, AttentionShape, KernelError, RopeSpec, RopeStyle, Simd, WeightMatrix,
    attention::attention_with,
    matmul::{matmul_gate_up_swiglu_with, matmul_with},
};
use m40_llm::gguf::{GgmlType, GgufFile};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Reference dequantization, element by element, from ggml-quants.c's formulas. Returns each
// element's value and the magnitude of its block offset (for the tolerance).

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// One row of `k` elements of type `ty` from `row` (its bytes): (value, |offset|) per element.
fn ref_dequant(ty: GgmlType, row: &[u8], k: usize) -> Vec<(f32, f32)> {
    let mut out = Vec::with_capacity(k);
    match ty {
        GgmlType::F32 => {
            for c in row.chunks_exact(4) {
                out.push((f32::from_le_bytes(c.try_into().unwrap()), 0.0));
            }
        }
        GgmlType::F16 => {
            for c in row.chunks_exact(2) {
                out.push((h(c, 0), 0.0));
            }
        }
        GgmlType::BF16 => {
            for c in row.chunks_exact(2) {
                out.push((half::bf16::from_le_bytes([c[0], c[1]]).to_f32(), 0.0));
            }
        }
        GgmlType::Q4_0 => {
            for b in row.chunks_exact(18) {
                let d = h(b, 0);
                let mut y = [0.0; 32];
                for j in 0..16 {
                    y[j] = ((b[2 + j] & 0xF) as i32 - 8) as f32 * d;
                    y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
                out.extend(y.iter().map(|&v| (v, 0.0)));
            }
        }
        GgmlType::Q4_1 => {
            for b in row.chunks_exact(20) {
                let (d, m) = (h(b, 0), h(b, 2));
                let mut y = [0.0; 32];
                for j in 0..16 {
                    y[j] = (b[4 + j] & 0xF) as f32 * d + m;
                    y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
                out.extend(y.iter().map(|&v| (v, m.abs())));
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let has_m = ty == GgmlType::Q5_1;
            for b in row.chunks_exact(if has_m { 24 } else { 22 }) {
                let d = h(b, 0);
                let m = if has_m { h(b, 2) } else { 0.0 };
                let o = if has_m { 4 } else { 2 };
                let qh = u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
                let qs = &b[o + 4..];
                let mut y = [0.0; 32];
                for j in 0..16 {
                    let xh0 = (((qh >> j) << 4) & 0x10) as i32;
                    let xh1 = ((qh >> (j + 12)) & 0x10) as i32;
                    let x0 = ((qs[j] & 0xF) as i32) | xh0;
                    let x1 = ((qs[j] >> 4) as i32) | xh1;
                    if has_m {
                        y[j] = x0 as f32 * d + m;
                        y[j + 16] = x1 as f32 * d + m;
                    } else {
                        y[j] = (x0 - 16) as f32 * d;
                        y[j + 16] = (x1 - 16) as f32 * d;
                    }
                }
                out.extend(y.iter().map(|&v| (v, m.abs())));
            }
        }
        GgmlType::Q8_0 => {
            for b in row.chunks_exact(34) {
                let d = h(b, 0);
                out.extend(b[2..].iter().map(|&q| ((q as i8) as f32 * d, 0.0)));
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let q5 = ty == GgmlType::Q5_K;
            for b in row.chunks_exact(if q5 { 176 } else { 144 }) {
                let (d, min) = (h(b, 0), h(b, 2));
                let scales = &b[4..16];
                let (qh, mut ql) = if q5 {
                    (&b[16..48], &b[48..])
                } else {
                    (&b[0..0], &b[16..])
                };
                let (mut u1, mut u2) = (1u8, 2u8);
                for is in (0..8).step_by(2) {
                    let (sc, m) = scale_min_k4(is, scales);
                    let (d1, m1) = (d * sc as f32, min * m as f32);
                    let (sc, m) = scale_min_k4(is + 1, scales);
                    let (d2, m2) = (d * sc as f32, min * m as f32);
                    for l in 0..32 {
                        let hb = if q5 && qh[l] & u1 != 0 { 16 } else { 0 };
                        out.push((d1 * ((ql[l] & 0xF) + hb) as f32 - m1, m1.abs()));
                    }
                    for l in 0..32 {
                        let hb = if q5 && qh[l] & u2 != 0 { 16 } else { 0 };
                        out.push((d2 * ((ql[l] >> 4) + hb) as f32 - m2, m2.abs()));
                    }
                    ql = &ql[32..];
                    u1 <<= 2;
                    u2 <<= 2;
                }
            }
        }
        GgmlType::Q6_K => {
            for b in row.chunks_exact(210) {
                let d = h(b, 208);
                let mut y = [0.0f32; 256];
                for n in 0..2 {
                    let (ql, qh, sc) = (&b[64 * n..], &b[128 + 32 * n..], &b[192 + 8 * n..]);
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let s = |i: usize| sc[i] as i8 as f32;
                        y[128 * n + l] = d * s(is) * q1 as f32;
                        y[128 * n + l + 32] = d * s(is + 2) * q2 as f32;
                        y[128 * n + l + 64] = d * s(is + 4) * q3 as f32;
                        y[128 * n + l + 96] = d * s(is + 6) * q4 as f32;
                    }
                }
                out.extend(y.iter().map(|&v| (v, 0.0)));
            }
        }
        other => panic!("no reference for {other}"),
    }
    assert_eq!(out.len(), k);
    out
}

const TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

// ---------------------------------------------------------------------------------------------
// Random data.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Where a type's f16 scale fields are in a block (all other bytes are free).
fn scale_fields(ty: GgmlType) -> (usize, &'static [usize]) {
    match ty {
        GgmlType::Q4_0 => (18, &[0]),
        GgmlType::Q4_1 => (20, &[0, 2]),
        GgmlType::Q5_0 => (22, &[0]),
        GgmlType::Q5_1 => (24, &[0, 2]),
        GgmlType::Q8_0 => (34, &[0]),
        GgmlType::Q4_K => (144, &[0, 2]),
        GgmlType::Q5_K => (176, &[0, 2]),
        GgmlType::Q6_K => (210, &[208]),
        _ => (0, &[]),
    }
}

/// `n` rows of `k` elements of `ty`: random quants, random finite scales.
fn random_weight(ty: GgmlType, n: usize, k: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let len = ty.row_bytes(k as u64).unwrap() as usize * n;
    let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    match ty {
        GgmlType::F32 => {
            for c in b.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.f().to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in b.chunks_exact_mut(2) {
                c.copy_from_slice(&f16::from_f32(rng.f()).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for c in b.chunks_exact_mut(2) {
                c.copy_from_slice(&half::bf16::from_f32(rng.f()).to_le_bytes());
            }
        }
        _ => {
            let (block, fields) = scale_fields(ty);
            for blk in b.chunks_exact_mut(block) {
                for &at in fields {
                    let s = f16::from_f32(rng.f() * 0.05);
                    blk[at..at + 2].copy_from_slice(&s.to_le_bytes());
                }
            }
        }
    }
    b
}

fn random_x(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed | 1);
    (0..len).map(|_| 2.0 * rng.f()).collect()
}

/// The reference `y = x Wᵀ` in f64, and each output's tolerance.
fn ref_matmul(x: &[f32], w: &[u8], ty: GgmlType, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let row_bytes = ty.row_bytes(k as u64).unwrap() as usize;
    let rows: Vec<_> = w
        .chunks_exact(row_bytes)
        .map(|r| ref_dequant(ty, r, k))
        .collect();
    let t = x.len() / k;
    let (mut y, mut tol) = (vec![0.0; t * n], vec![0.0; t * n]);
    for r in 0..t {
        let xr = &x[r * k..(r + 1) * k];
        for (j, wr) in rows.iter().enumerate() {
            let (mut s, mut mag) = (0.0f64, 0.0f64);
            for (&xv, &(wv, off)) in xr.iter().zip(wr) {
                s += xv as f64 * wv as f64;
                mag += (xv as f64).abs() * ((wv as f64).abs() + off as f64);
            }
            y[r * n + j] = s;
            tol[r * n + j] = 1e-5 * mag + 1e-30;
        }
    }
    (y, tol)
}

fn check_matmul(ty: GgmlType, t: usize, n: usize, k: usize, seed: u64) -> Result<(), String> {
    let w = random_weight(ty, n, k, seed);
    let x = random_x(t * k, seed ^ 0xabcdef);
    let (want, tol) = ref_matmul(&x, &w, ty, n, k);
    let wm = WeightMatrix::new(&w, ty, n, k).map_err(|e| e.to_string())?;
    for simd in Simd::available() {
        let mut y = vec![f32::NAN; t * n];
        matmul_with(simd, &x, &wm, &mut y).map_err(|e| e.to_string())?;
        for (i, ((&got, &want), &tol)) in y.iter().zip(&want).zip(&tol).enumerate() {
            if (got as f64 - want).abs() > tol {
                return Err(format!(
                    "{ty} {simd:?} T={t} n={n} k={k}: y[{i}] = {got}, want {want} ± {tol}"
                ));
            }
        }
        // Each row alone gives the same bits as in the batch (prefill = decode).
        for r in [0, t / 2, t - 1] {
            let mut y1 = vec![0.0; n];
            matmul_with(simd, &x[r * k..(r + 1) * k], &wm, &mut y1).unwrap();
            let batch: Vec<u32> = y[r * n..(r + 1) * n].iter().map(|v| v.to_bits()).collect();
            let alone: Vec<u32> = y1.iter().map(|v| v.to_bits()).collect();
            if batch != alone {
                return Err(format!(
                    "{ty} {simd:?}: row {r} of {t} differs from the row alone"
                ));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn matmul_matches_the_reference(
        ty in prop::sample::select(TYPES.to_vec()),
        t in 1usize..=9,
        n in 1usize..=37,
        blocks in 1usize..=3,
        extra in 0usize..32,
        seed in any::<u64>(),
    ) {
        let block = ty.block_size() as usize;
        // Plain types take any k; block types whole blocks only.
        let k = if block == 1 { 32 * blocks + extra } else { block * blocks };
        check_matmul(ty, t, n, k, seed).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn embedding_is_ggml_dequantization(
        ty in prop::sample::select(TYPES.to_vec()),
        blocks in 1usize..=2,
        seed in any::<u64>(),
    ) {
        let (n, k) = (11, ty.block_size().max(32) as usize * blocks);
        let w = random_weight(ty, n, k, seed);
        let wm = WeightMatrix::new(&w, ty, n, k).unwrap();
        let ids = [3i32, 0, 10, 3];
        let mut y = vec![f32::NAN; ids.len() * k];
        kernels::embedding(&wm, &ids, &mut y).unwrap();
        let row_bytes = w.len() / n;
        for (r, &id) in ids.iter().enumerate() {
            let id = id as usize;
            let want = ref_dequant(ty, &w[id * row_bytes..(id + 1) * row_bytes], k);
            for (i, (&got, &(want, _))) in y[r * k..(r + 1) * k].iter().zip(&want).enumerate() {
                prop_assert_eq!(got.to_bits(), want.to_bits(), "{} row {} element {}", ty, id, i);
            }
        }
    }
}

#[test]
fn matmul_at_the_default_models_shapes() {
    for (ty, n, k) in [
        (GgmlType::Q4_1, 576, 576),
        (GgmlType::Q4_1, 64, 1536),
        (GgmlType::Q8_0, 300, 576),
        (GgmlType::Q6_K, 40, 1536),
    ] {
        for t in [1, 5, 64] {
            check_matmul(ty, t, n, k, 7 + t as u64).unwrap();
        }
    }
}

#[test]
fn gate_up_swiglu_is_the_two_matmuls_then_swiglu() {
    let (t, n, k) = (6, 45, 64);
    let wg = random_weight(GgmlType::Q4_1, n, k, 1);
    let wu = random_weight(GgmlType::Q6_K, n, 256, 2);
    let x = random_x(t * k, 3);
    let g = WeightMatrix::new(&wg, GgmlType::Q4_1, n, k).unwrap();
    let u_bad = WeightMatrix::new(&wu, GgmlType::Q6_K, n, 256).unwrap();
    let mut y = vec![0.0; t * n];
    let err = kernels::matmul_gate_up_swiglu(&x, &g, &u_bad, &mut y).unwrap_err();
    assert!(err.to_string().contains("row length"), "{err}");

    let wu = random_weight(GgmlType::Q8_0, n, k, 2);
    let u = WeightMatrix::new(&wu, GgmlType::Q8_0, n, k).unwrap();
    for simd in Simd::available() {
        let (mut gy, mut uy, mut want) = (vec![0.0; t * n], vec![0.0; t * n], vec![0.0; t * n]);
        matmul_with(simd, &x, &g, &mut gy).unwrap();
        matmul_with(simd, &x, &u, &mut uy).unwrap();
        kernels::swiglu(&gy, &uy, &mut want).unwrap();
        matmul_gate_up_swiglu_with(simd, &x, &g, &u, &mut y).unwrap();
        assert_eq!(y, want, "{simd:?}");
    }
}

#[test]
fn bad_weights_and_inputs_are_clear_errors() {
    let err = WeightMatrix::new(&[0; 66], GgmlType::IQ2_XXS, 1, 256).unwrap_err();
    assert!(matches!(
        err,
        KernelError::UnsupportedType {
            ty: GgmlType::IQ2_XXS,
            ..
        }
    ));
    assert!(err.to_string().contains("IQ2_XXS"), "{err}");
    assert!(
        err.to_string().contains("Q4_1"),
        "lists what is supported: {err}"
    );

    let err = WeightMatrix::new(&[0; 40], GgmlType::Q4_1, 1, 48).unwrap_err();
    assert!(
        err.to_string().contains("48") && err.to_string().contains("32"),
        "{err}"
    );
    let err = WeightMatrix::new(&[0; 39], GgmlType::Q4_1, 2, 32).unwrap_err();
    assert!(err.to_string().contains("40 bytes, got 39"), "{err}");

    let w = random_weight(GgmlType::Q8_0, 4, 32, 1);
    let wm = WeightMatrix::new(&w, GgmlType::Q8_0, 4, 32).unwrap();
    let mut y = vec![0.0; 8];
    assert!(kernels::matmul(&[0.0; 33], &wm, &mut y).is_err());
    assert!(kernels::matmul(&[0.0; 64], &wm, &mut y[..7]).is_err());
    let mut e = vec![0.0; 64];
    let err = kernels::embedding(&wm, &[1, 4], &mut e).unwrap_err();
    assert!(
        err.to_string().contains("token id 1 is 4, outside 0..4"),
        "{err}"
    );
    assert!(kernels::embedding(&wm, &[-1, 0], &mut e).is_err());
}

#[test]
fn real_tensors_of_the_default_model() {
    let Some(path) = common::default_model() else {
        return;
    };
    let file = GgufFile::open(&path).unwrap();
    for (name, rows) in [
        ("blk.0.attn_q.weight", 576),
        ("blk.3.ffn_down.weight", 576),
        ("token_embd.weight", 700),
    ] {
        let info = file.tensor(name).unwrap();
        let (k, ty) = (info.ne[0] as usize, info.ty);
        let row_bytes = ty.row_bytes(k as u64).unwrap() as usize;
        let data = &file.tensor_data(info)[..rows * row_bytes];
        let w = WeightMatrix::new(data, ty, rows, k).unwrap();
        for t in [1, 3] {
            let x = random_x(t * k, 99);
            let (want, tol) = ref_matmul(&x, data, ty, rows, k);
            let mut y = vec![0.0; t * rows];
            kernels::matmul(&x, &w, &mut y).unwrap();
            for (i, ((&got, &want), &tol)) in y.iter().zip(&want).zip(&tol).enumerate() {
                assert!(
                    (got as f64 - want).abs() <= tol,
                    "{name} y[{i}] = {got}, want {want}"
                );
            }
        }
        let ids = [0, 1, rows as i32 - 1];
        let mut e = vec![0.0; ids.len() * k];
        kernels::embedding(&w, &ids, &mut e).unwrap();
        for (r, &id) in ids.iter().enumerate() {
            let id = id as usize;
            let want = ref_dequant(ty, &data[id * row_bytes..(id + 1) * row_bytes], k);
            let got = &e[r * k..(r + 1) * k];
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.0.to_bits()),
                "{name}"
            );
        }
    }
    // The whole tied output projection (49152 x 576 Q8_0) against the reference on a few rows.
    let info = file.tensor("token_embd.weight").unwrap();
    let (k, n) = (info.ne[0] as usize, info.ne[1] as usize);
    let w = WeightMatrix::new(file.tensor_data(info), info.ty, n, k).unwrap();
    let x = random_x(k, 5);
    let mut y = vec![0.0; n];
    kernels::matmul(&x, &w, &mut y).unwrap();
    let row_bytes = w.data().len() / n;
    for j in [0, 1, 12345, n - 1] {
        let row = &w.data()[j * row_bytes..(j + 1) * row_bytes];
        let (want, tol) = ref_matmul(&x, row, info.ty, 1, k);
        assert!(
            (y[j] as f64 - want[0]).abs() <= tol[0],
            "logit {j}: {} vs {}",
            y[j],
            want[0]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Norms and elementwise ops.

fn ref_rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f64> {
    let g = w.len();
    let mut y = Vec::new();
    for grp in x.chunks(g) {
        let ms = grp.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / g as f64;
        let s = 1.0 / (ms + eps as f64).sqrt();
        y.extend(grp.iter().zip(w).map(|(&v, &w)| v as f64 * s * w as f64));
    }
    y
}

proptest! {
    #[test]
    fn rms_norm_matches_the_reference(rows in 1usize..6, groups in 1usize..4, g in 1usize..80, seed in any::<u64>()) {
        let x = random_x(rows * groups * g, seed);
        let w = random_x(g, seed ^ 1);
        let mut y = vec![0.0; x.len()];
        kernels::rms_norm(&x, &w, 1e-5, &mut y).unwrap();
        for (i, (&got, want)) in y.iter().zip(ref_rms_norm(&x, &w, 1e-5)).enumerate() {
            prop_assert!((got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "y[{}] {} vs {}", i, got, want);
        }
        // Fused add + norm: the same bits as the two ops.
        let b = random_x(x.len(), seed ^ 2);
        let (mut sum, mut normed, mut s2, mut n2) = (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()]);
        kernels::add_rms_norm(&x, &b, &w, 1e-6, &mut sum, &mut normed).unwrap();
        kernels::add(&x, &b, &mut s2).unwrap();
        kernels::rms_norm(&s2, &w, 1e-6, &mut n2).unwrap();
        prop_assert_eq!(sum, s2);
        prop_assert_eq!(normed, n2);
    }

    #[test]
    fn elementwise_ops_match_plain_loops(rows in 1usize..5, n in 1usize..50, seed in any::<u64>()) {
        let a = random_x(rows * n, seed);
        let b = random_x(rows * n, seed ^ 1);
        let bias = random_x(n, seed ^ 2);
        let mut y = vec![0.0; a.len()];
        kernels::add(&a, &bias, &mut y).unwrap();
        for (i, &v) in y.iter().enumerate() { prop_assert_eq!(v, a[i] + bias[i % n]); }
        kernels::mul(&a, &b, &mut y).unwrap();
        for (i, &v) in y.iter().enumerate() { prop_assert_eq!(v, a[i] * b[i]); }
        kernels::silu(&a, &mut y).unwrap();
        for (i, &v) in y.iter().enumerate() {
            let want = a[i] as f64 / (1.0 + (-a[i] as f64).exp());
            prop_assert!((v as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()));
        }
        let mut s = vec![0.0; a.len()];
        kernels::swiglu(&a, &b, &mut s).unwrap();
        for (i, &v) in s.iter().enumerate() { prop_assert_eq!(v, y[i] * b[i]); }
        kernels::softmax(&a, n, &mut y).unwrap();
        for (yr, ar) in y.chunks(n).zip(a.chunks(n)) {
            let m = ar.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let z: f64 = ar.iter().map(|&v| (v as f64 - m).exp()).sum();
            for (&got, &v) in yr.iter().zip(ar) {
                let want = (v as f64 - m).exp() / z;
                prop_assert!((got as f64 - want).abs() <= 1e-6 * want + 1e-9, "{} vs {}", got, want);
            }
        }
    }
}

#[test]
fn shape_errors_are_reported() {
    let mut y = vec![0.0; 6];
    assert!(kernels::add(&[0.0; 6], &[0.0; 4], &mut y).is_err());
    assert!(kernels::rms_norm(&[0.0; 6], &[1.0; 4], 1e-5, &mut y).is_err());
    assert!(kernels::rms_norm(&[0.0; 6], &[1.0; 3], 1e-5, &mut y[..5]).is_err());
    assert!(kernels::softmax(&[0.0; 6], 4, &mut y).is_err());
    let err = kernels::select_rows(&[0.0; 6], 3, &[2], &mut y[..3]).unwrap_err();
    assert!(err.to_string().contains("outside 0..2"), "{err}");
    kernels::select_rows(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, &[1, 0], &mut y).unwrap();
    assert_eq!(y, [4.0, 5.0, 6.0, 1.0, 2.0, 3.0]);
}

// ---------------------------------------------------------------------------------------------
// Rope.

/// Rope with angles in f64 from the closed form.
fn ref_rope(x: &[f32], pos: &[i32], ff: Option<&[f32]>, s: &RopeSpec) -> Vec<f64> {
    let row = x.len() / pos.len();
    let mut y: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for (t, &p) in pos.iter().enumerate() {
        for head in (0..row).step_by(s.head_dim) {
            let base = t * row + head;
            for i in 0..s.n_rot / 2 {
                let inv = (s.freq_base as f64).powf(-2.0 * i as f64 / s.n_rot as f64);
                let theta = s.freq_scale as f64 * p as f64 * inv / ff.map_or(1.0, |f| f[i] as f64);
                let (a, b) = match s.style {
                    RopeStyle::Normal => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + s.n_rot / 2),
                };
                let (x0, x1) = (x[base + a] as f64, x[base + b] as f64);
                y[base + a] = x0 * theta.cos() - x1 * theta.sin();
                y[base + b] = x0 * theta.sin() + x1 * theta.cos();
            }
        }
    }
    y
}

proptest! {
    #[test]
    fn rope_matches_the_closed_form(
        neox in any::<bool>(),
        heads in 1usize..4,
        half_dim in 1usize..9,
        rot_less in 0usize..3,
        t in 1usize..5,
        base_pos in 0i32..2000,
        scaled in any::<bool>(),
        with_ff in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let head_dim = 2 * half_dim + 2 * rot_less;
        let spec = RopeSpec {
            style: if neox { RopeStyle::Neox } else { RopeStyle::Normal },
            head_dim,
            n_rot: 2 * half_dim,
            freq_base: 10000.0,
            freq_scale: if scaled { 0.25 } else { 1.0 },
        };
        let ff: Vec<f32> = (0..half_dim).map(|i| 1.0 + i as f32 * 0.5).collect();
        let ff = with_ff.then_some(ff.as_slice());
        let x = random_x(t * heads * head_dim, seed);
        let pos: Vec<i32> = (0..t as i32).map(|i| base_pos + 3 * i).collect();
        let mut y = vec![0.0; x.len()];
        kernels::rope(&x, &pos, ff, &spec, &mut y).unwrap();
        let want = ref_rope(&x, &pos, ff, &spec);
        for (i, (&got, &want)) in y.iter().zip(&want).enumerate() {
            // The angle is p * theta_scale^i by repeated f32 products, as ggml: its relative
            // error grows with i and p, a few 1e-7 each, i.e. ~1e-4 absolute at p ~ 2000.
            prop_assert!((got as f64 - want).abs() <= 2e-4 * (1.0 + base_pos as f64 / 1000.0), "y[{}] {} vs {}", i, got, want);
        }
        // Beyond n_rot, elements pass through exactly.
        for (i, (&got, &x)) in y.iter().zip(&x).enumerate() {
            if i % head_dim >= spec.n_rot { prop_assert_eq!(got, x); }
        }
    }
}

#[test]
fn rope_angles_follow_ggml_repeated_multiplication() {
    // theta for pair i is p * ts^i with ts = powf(base, -2/n_rot), each product rounded to f32
    // (ggml_rope_cache_init): check one element exactly against that recurrence.
    let spec = RopeSpec {
        style: RopeStyle::Normal,
        head_dim: 64,
        n_rot: 64,
        freq_base: 100000.0,
        freq_scale: 1.0,
    };
    let mut x = vec![0.0f32; 64];
    x[2 * 20] = 1.0; // pair 20: y = (cos θ, sin θ)
    let mut y = vec![0.0; 64];
    kernels::rope(&x, &[1234], None, &spec, &mut y).unwrap();
    let ts = 100000f32.powf(-2.0 / 64.0);
    let mut theta = 1234f32;
    for _ in 0..20 {
        theta *= ts;
    }
    assert_eq!(y[40].to_bits(), theta.cos().to_bits());
    assert_eq!(y[41].to_bits(), theta.sin().to_bits());
}

// ---------------------------------------------------------------------------------------------
// KV cache and attention.

#[test]
fn kv_write_rounds_to_nearest_even_at_the_cells() {
    let kv_dim = 4;
    let mut kc = vec![f16::ZERO; 5 * kv_dim];
    let mut vc = vec![f16::ZERO; 5 * kv_dim];
    // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even gives 1.
    let halfway = 1.0 + 2f32.powi(-11);
    let above = 1.0 + 3.0 * 2f32.powi(-11);
    let k = [halfway, above, -2.5, 65504.0, 1.0, 2.0, 3.0, 4.0];
    let v = [0.1, 0.2, 0.3, 0.4, 5.0, 6.0, 7.0, 8.0];
    kernels::kv_write(&k, &v, &[3, 0], kv_dim, &mut kc, &mut vc).unwrap();
    assert_eq!(kc[12].to_f32(), 1.0);
    assert_eq!(kc[13].to_f32(), 1.0 + 2.0 * 2f32.powi(-10));
    assert_eq!(&kc[14..16], &[f16::from_f32(-2.5), f16::MAX]);
    assert_eq!(vc[12], f16::from_f32(0.1));
    assert_eq!(&kc[0..4], &[1.0, 2.0, 3.0, 4.0].map(f16::from_f32));
    assert!(
        kc[4..12].iter().all(|&h| h == f16::ZERO),
        "other cells untouched"
    );
    let err = kernels::kv_write(&k, &v, &[5, 0], kv_dim, &mut kc, &mut vc).unwrap_err();
    assert!(err.to_string().contains("outside 0..5"), "{err}");
}

struct Cache {
    k: Vec<f16>,
    v: Vec<f16>,
}

fn random_cache(cells: usize, kv_dim: usize, seed: u64) -> Cache {
    let k = random_x(cells * kv_dim, seed)
        .iter()
        .map(|&v| f16::from_f32(v))
        .collect();
    let v = random_x(cells * kv_dim, seed ^ 9)
        .iter()
        .map(|&v| f16::from_f32(v))
        .collect();
    Cache { k, v }
}

fn ref_attention(q: &[f32], c: &Cache, cells: &[&[u32]], s: &AttentionShape) -> Vec<f64> {
    let (h, d, kv_dim) = (s.n_heads, s.head_dim, s.n_kv_heads * s.head_dim);
    let mut y = vec![0.0; q.len()];
    for (t, cs) in cells.iter().enumerate() {
        for head in 0..h {
            let g = head / (h / s.n_kv_heads);
            let qh = &q[(t * h + head) * d..][..d];
            let sc: Vec<f64> = cs
                .iter()
                .map(|&cell| {
                    let kr = &c.k[cell as usize * kv_dim + g * d..][..d];
                    s.scale as f64
                        * qh.iter()
                            .zip(kr)
                            .map(|(&a, b)| a as f64 * b.to_f64())
                            .sum::<f64>()
                })
                .collect();
            let m = sc.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = sc.iter().map(|v| (v - m).exp()).sum();
            for (j, &cell) in cs.iter().enumerate() {
                let w = (sc[j] - m).exp() / z;
                let vr = &c.v[cell as usize * kv_dim + g * d..][..d];
                for (i, v) in vr.iter().enumerate() {
                    y[(t * h + head) * d + i] += w * v.to_f64();
                }
            }
        }
    }
    y
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn attention_matches_the_reference(
        hkv in 1usize..4,
        group in 1usize..4,
        d in prop::sample::select(vec![4usize, 8, 13, 64]),
        t in 1usize..6,
        ctx in 1usize..40,
        seed in any::<u64>(),
    ) {
        let shape = AttentionShape { n_heads: hkv * group, n_kv_heads: hkv, head_dim: d, scale: 1.0 / (d as f32).sqrt() };
        let n_cells = ctx + t + 3;
        let cache = random_cache(n_cells, hkv * d, seed);
        // Two interleaved sequences: even cells and odd cells, each token a causal prefix.
        let seqs: [Vec<u32>; 2] = [
            (0..n_cells as u32).filter(|c| c % 2 == 0).collect(),
            (0..n_cells as u32).filter(|c| c % 2 == 1).rev().collect(),
        ];
        let cells: Vec<&[u32]> = (0..t).map(|i| {
            let s = &seqs[i % 2];
            &s[..(ctx / 2 + i).clamp(1, s.len())]
        }).collect();
        let q = random_x(t * shape.n_heads * d, seed ^ 5);
        let want = ref_attention(&q, &cache, &cells, &shape);
        for simd in Simd::available() {
            let mut y = vec![f32::NAN; q.len()];
            attention_with(simd, &q, &cache.k, &cache.v, &cells, &shape, &mut y).unwrap();
            for (i, (&got, &want)) in y.iter().zip(&want).enumerate() {
                // Outputs are convex combinations of values in [-2, 2].
                prop_assert!((got as f64 - want).abs() <= 2e-5, "{:?} y[{}] {} vs {}", simd, i, got, want);
            }
            // Each token alone gives the same bits.
            let last = t - 1;
            let row = shape.n_heads * d;
            let mut y1 = vec![0.0; row];
            attention_with(simd, &q[last * row..], &cache.k, &cache.v, &cells[last..], &shape, &mut y1).unwrap();
            prop_assert_eq!(&y[last * row..], &y1[..]);
        }
    }
}

#[test]
fn attention_errors_name_the_problem() {
    let shape = AttentionShape {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        scale: 0.5,
    };
    let cache = random_cache(3, 4, 1);
    let q = [0.0f32; 8];
    let mut y = [0.0f32; 8];
    let err = kernels::attention(&q, &cache.k, &cache.v, &[&[]], &shape, &mut y).unwrap_err();
    assert_eq!(err, KernelError::NoCells { token: 0 });
    let err = kernels::attention(&q, &cache.k, &cache.v, &[&[0, 3]], &shape, &mut y).unwrap_err();
    assert!(err.to_string().contains("3, outside 0..3"), "{err}");
    let bad = AttentionShape {
        n_kv_heads: 3,
        ..shape
    };
    assert!(kernels::attention(&q, &cache.k, &cache.v, &[&[0]], &bad, &mut y).is_err());
}

#[test]
fn rope_kv_write_is_rope_then_kv_write() {
    let spec = RopeSpec {
        style: RopeStyle::Neox,
        head_dim: 8,
        n_rot: 6,
        freq_base: 1e6,
        freq_scale: 1.0,
    };
    let (t, kv_dim) = (3, 16);
    let k = random_x(t * kv_dim, 1);
    let v = random_x(t * kv_dim, 2);
    let pos = [5, 6, 7];
    let cells = [4, 1, 2];
    let (mut k1, mut v1) = (vec![f16::ZERO; 6 * kv_dim], vec![f16::ZERO; 6 * kv_dim]);
    let (mut k2, mut v2) = (k1.clone(), v1.clone());
    kernels::rope_kv_write(&k, &v, &pos, None, &spec, &cells, &mut k1, &mut v1).unwrap();
    let mut roped = vec![0.0; k.len()];
    kernels::rope(&k, &pos, None, &spec, &mut roped).unwrap();
    kernels::kv_write(&roped, &v, &cells, kv_dim, &mut k2, &mut v2).unwrap();
    assert_eq!(k1, k2);
    assert_eq!(v1, v2);
}

// ---------------------------------------------------------------------------------------------
// Cross-checks with the crate's reference quantizer and dequantizer (`gguf::quants`): weights
// quantized from realistic floats (not random bytes), the kernels against its dequantization.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn kernels_agree_with_gguf_quants(
        ty in prop::sample::select(TYPES.to_vec()),
        t in 1usize..=5,
        n in 1usize..=19,
        blocks in 1usize..=3,
        seed in any::<u64>(),
    ) {
        use m40_llm::gguf::quants;
        prop_assume!(quants::can_quantize(ty));
        let k = ty.block_size().max(32) as usize * blocks;
        let floats = random_x(n * k, seed);
        let w: Vec<u8> = floats
            .chunks_exact(k)
            .flat_map(|row| quants::quantize_row(ty, row).unwrap())
            .collect();
        let wm = WeightMatrix::new(&w, ty, n, k).unwrap();
        let mut deq = vec![0.0f32; n * k];
        quants::dequantize_row_f32(ty, &w, &mut deq).unwrap();

        // Embedding: bit-identical to the crate's dequantizer.
        let ids: Vec<i32> = (0..n as i32).rev().collect();
        let mut e = vec![0.0f32; n * k];
        kernels::embedding(&wm, &ids, &mut e).unwrap();
        for (r, &id) in ids.iter().enumerate() {
            let want = &deq[id as usize * k..][..k];
            let got = &e[r * k..][..k];
            prop_assert!(got.iter().zip(want).all(|(g, w)| g.to_bits() == w.to_bits()), "{} row {}", ty, id);
        }

        // Matmul: within the summation tolerance of an f64 dot over the dequantized values
        // (offsets bounded by the row's largest |w|, covering the minimum split).
        let x = random_x(t * k, seed ^ 3);
        let mut y = vec![0.0f32; t * n];
        kernels::matmul(&x, &wm, &mut y).unwrap();
        for r in 0..t {
            for j in 0..n {
                let (xr, wr) = (&x[r * k..][..k], &deq[j * k..][..k]);
                let want: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                let wmax = wr.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
                let tol = 1e-5 * xr.iter().map(|&a| a.abs() as f64).sum::<f64>() * 2.0 * wmax + 1e-30;
                let got = y[r * n + j] as f64;
                prop_assert!((got - want).abs() <= tol, "{} y[{},{}] {} vs {} ± {}", ty, r, j, got, want, tol);
            }
        }
    }
}
