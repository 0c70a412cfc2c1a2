use super::*;
use crate::gguf::GgufWriter;
use proptest::prelude::*;

fn dequant(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / ty.type_size() as usize * ty.block_size() as usize;
    let mut out = vec![f32::NAN; n];
    dequantize_row_f32(ty, bytes, &mut out).unwrap();
    out
}

fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

#[test]
fn hand_made_legacy_blocks() {
    // Q4_0, d = 0.5: byte j = (lo = j, hi = 15 - j).
    let mut b = f16_bytes(0.5).to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let y = dequant(GgmlType::Q4_0, &b);
    for j in 0..16 {
        assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
        assert_eq!(y[j + 16], (7.0 - j as f32) * 0.5);
    }

    // Q4_1, d = 2, m = -3.
    let mut b = [f16_bytes(2.0), f16_bytes(-3.0)].concat();
    b.extend((0..16u8).map(|j| j | (j << 4)));
    let y = dequant(GgmlType::Q4_1, &b);
    for j in 0..16 {
        assert_eq!(y[j], j as f32 * 2.0 - 3.0);
        assert_eq!(y[j + 16], y[j]);
    }

    // Q5_0, d = 1: all low nibbles 15, fifth bit set on even elements.
    let mut b = f16_bytes(1.0).to_vec();
    b.extend(0x5555_5555u32.to_le_bytes());
    b.extend([0xffu8; 16]);
    let y = dequant(GgmlType::Q5_0, &b);
    for (i, v) in y.iter().enumerate() {
        let want = if i % 2 == 0 { 31.0 - 16.0 } else { 15.0 - 16.0 };
        assert_eq!(*v, want, "element {i}");
    }

    // Q5_1, d = 0.25, m = 1: quants 0..=31 in order.
    let mut b = [f16_bytes(0.25), f16_bytes(1.0)].concat();
    b.extend(0xffff_0000u32.to_le_bytes());
    b.extend((0..16u8).map(|j| j | (j << 4)));
    let y = dequant(GgmlType::Q5_1, &b);
    for (i, v) in y.iter().enumerate() {
        assert_eq!(*v, i as f32 * 0.25 + 1.0, "element {i}");
    }

    // Q8_0, d = -1.5: quants -128..=127 step 8.
    let mut b = f16_bytes(-1.5).to_vec();
    b.extend((0..32).map(|i| (-128 + 8 * i) as i8 as u8));
    let y = dequant(GgmlType::Q8_0, &b);
    for (i, v) in y.iter().enumerate() {
        assert_eq!(*v, (-128 + 8 * i as i32) as f32 * -1.5, "element {i}");
    }
}

#[test]
fn hand_made_k_blocks() {
    // Q4_K: d = 1, dmin = 0.5; sub-block j has scale j + 1 and min 2j (6-bit packing), all
    // quants of sub-block j equal to j.
    let mut scales = [0u8; 12];
    for j in 0..8u8 {
        let (sc, m) = (j + 1 + 40 * u8::from(j >= 4), 2 * j + 33 * u8::from(j >= 4));
        let j = j as usize;
        if j < 4 {
            scales[j] = sc;
            scales[j + 4] = m;
        } else {
            scales[j + 4] = (sc & 0x0f) | ((m & 0x0f) << 4);
            scales[j - 4] |= (sc >> 4) << 6;
            scales[j] |= (m >> 4) << 6;
        }
    }
    let mut qs = [0u8; 128];
    for g in 0..4 {
        for l in 0..32 {
            qs[32 * g + l] = (2 * g as u8) | ((2 * g as u8 + 1) << 4);
        }
    }
    let b = [&f16_bytes(1.0)[..], &f16_bytes(0.5), &scales, &qs].concat();
    let y = dequant(GgmlType::Q4_K, &b);
    for (i, v) in y.iter().enumerate() {
        let j = (i / 32) as u8;
        let (sc, m) = (j + 1 + 40 * u8::from(j >= 4), 2 * j + 33 * u8::from(j >= 4));
        assert_eq!(
            *v,
            f32::from(sc) * f32::from(j) - 0.5 * f32::from(m),
            "element {i}"
        );
    }

    // Q5_K: same scales, every quant 31 (low nibble 15, all fifth bits set).
    let b = [
        &f16_bytes(1.0)[..],
        &f16_bytes(0.5),
        &scales,
        &[0xffu8; 32],
        &[0xffu8; 128],
    ]
    .concat();
    let y = dequant(GgmlType::Q5_K, &b);
    for (i, v) in y.iter().enumerate() {
        let j = (i / 32) as u8;
        let (sc, m) = (j + 1 + 40 * u8::from(j >= 4), 2 * j + 33 * u8::from(j >= 4));
        assert_eq!(*v, f32::from(sc) * 31.0 - 0.5 * f32::from(m), "element {i}");
    }

    // Q6_K: d = 0.5, scales alternate 3 and -2, every quant 63 (value 31) or 0 (value -32).
    let sc: Vec<u8> = (0..16)
        .map(|i| if i % 2 == 0 { 3 } else { -2i8 as u8 })
        .collect();
    let b = [&[0xffu8; 128][..], &[0xffu8; 64], &sc, &f16_bytes(0.5)].concat();
    let y = dequant(GgmlType::Q6_K, &b);
    for (i, v) in y.iter().enumerate() {
        let s = if (i / 16) % 2 == 0 { 3.0 } else { -2.0 };
        assert_eq!(*v, 0.5 * s * 31.0, "element {i}");
    }
    let b = [&[0u8; 128][..], &[0u8; 64], &sc, &f16_bytes(0.5)].concat();
    let y = dequant(GgmlType::Q6_K, &b);
    for (i, v) in y.iter().enumerate() {
        let s = if (i / 16) % 2 == 0 { 3.0 } else { -2.0 };
        assert_eq!(*v, 0.5 * s * -32.0, "element {i}");
    }
}

#[test]
fn float_formats_convert_exactly() {
    let values = [
        0.0f32,
        -0.0,
        1.0,
        -2.5,
        65504.0,
        5.960_464_5e-8,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ];
    let f16s: Vec<u8> = values.iter().flat_map(|v| f16_bytes(*v)).collect();
    assert_eq!(dequant(GgmlType::F16, &f16s), values);
    let f32s: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(dequant(GgmlType::F32, &f32s), values);
    let bf16s: Vec<u8> = values
        .iter()
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    let y = dequant(GgmlType::BF16, &bf16s);
    for (v, y) in values.iter().zip(&y) {
        assert_eq!(y.to_bits(), v.to_bits() & 0xffff_0000);
    }
}

#[test]
fn bf16_rounding_follows_ggml() {
    let cases: [(u32, u16); 7] = [
        (0x3f80_0000, 0x3f80), // 1.0 exactly
        (0x3f80_8000, 0x3f80), // tie, even stays
        (0x3f81_8000, 0x3f82), // tie, odd rounds up
        (0x3f80_8001, 0x3f81), // above the tie
        (0x7f7f_ffff, 0x7f80), // f32::MAX overflows to infinity
        (0x7fa0_0001, 0x7fe0), // signalling NaN made quiet
        (0xffc0_1234, 0xffc0), // quiet negative NaN keeps its sign
    ];
    for (bits, want) in cases {
        let out = quantize_row(GgmlType::BF16, &[f32::from_bits(bits)]).unwrap();
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), want, "{bits:#010x}");
    }
}

#[test]
fn f16_quantize_rounds_to_nearest_even_and_canonicalizes_nan() {
    let out = quantize_row(
        GgmlType::F16,
        &[1.0 + f32::EPSILON, 70000.0, -f32::NAN, 2.0f32.powi(-25)],
    )
    .unwrap();
    let bits: Vec<u16> = out
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert_eq!(bits, [0x3c00, 0x7c00, 0xfe00, 0x0000]);
}

#[test]
fn all_zero_blocks_quantize_to_zero() {
    for ty in QUANTIZE_TYPES {
        let n = ty.block_size() as usize * 2;
        let q = quantize_row(ty, &vec![0.0; n]).unwrap();
        assert!(dequant(ty, &q).iter().all(|v| *v == 0.0), "{ty}");
    }
}

#[test]
fn quantizers_pick_ggml_extremes() {
    // Q4_0 scales by the signed extreme so that it maps to -8 exactly; the opposite extreme
    // saturates at 7.
    let mut x = [0.0f32; 32];
    x[3] = 4.0;
    x[9] = -4.0;
    let y = dequant(GgmlType::Q4_0, &quantize_row(GgmlType::Q4_0, &x).unwrap());
    assert_eq!((y[3], y[9]), (4.0, -3.5));
    // Q8_0 maps the largest magnitude to ±127.
    let mut x = [0.0f32; 32];
    x[0] = -127.0;
    x[1] = 63.5;
    let q = quantize_row(GgmlType::Q8_0, &x).unwrap();
    assert_eq!((q[2] as i8, q[3] as i8), (-127, 64));
}

#[test]
fn f16_output_is_f32_output_rounded() {
    let mut state = 0x1234_5678u32;
    for ty in DEQUANTIZE_TYPES {
        let n = 512;
        let mut bytes = vec![0u8; ty.row_bytes(n as u64).unwrap() as usize];
        for b in &mut bytes {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *b = (state >> 24) as u8;
        }
        let mut want = vec![0f32; n];
        let mut got = vec![f16::ZERO; n];
        dequantize_row_f32(ty, &bytes, &mut want).unwrap();
        dequantize_row_f16(ty, &bytes, &mut got).unwrap();
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let w16 = f16::from_f32(*w);
            if w.is_nan() {
                assert!(g.is_nan(), "{ty} element {i}");
            } else {
                assert_eq!(g.to_bits(), w16.to_bits(), "{ty} element {i}: {w}");
            }
        }
    }
}

#[test]
fn length_errors_say_what_is_wrong() {
    let mut out = [0f32; 32];
    let e = dequantize_row_f32(GgmlType::Q4_1, &[0u8; 19], &mut out).unwrap_err();
    assert_eq!(
        e.to_string(),
        "32 elements of Q4_1 take 20 bytes, but 19 bytes were given"
    );
    let e = dequantize_row_f32(GgmlType::Q4_1, &[0u8; 20], &mut out[..31]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "31 elements are not a whole number of Q4_1 blocks of 32 elements"
    );
    let e = quantize_row(GgmlType::Q8_0, &[0.0; 33]).unwrap_err();
    assert!(matches!(e.kind, QuantErrorKind::PartialBlock { .. }), "{e}");
    let mut small = [0u8; 33];
    let e = quantize_row_into(GgmlType::Q8_0, &[0.0; 32], &mut small).unwrap_err();
    assert!(matches!(e.kind, QuantErrorKind::ByteLength { .. }), "{e}");
    let e = dequantize_row_f32(GgmlType::IQ2_XXS, &[0u8; 66], &mut [0f32; 256]).unwrap_err();
    assert!(
        e.to_string().starts_with("cannot dequantize type IQ2_XXS"),
        "{e}"
    );
    let e = quantize_row(GgmlType::Q3_K, &[0.0; 256]).unwrap_err();
    assert!(
        e.to_string().starts_with("cannot quantize to type Q3_K"),
        "{e}"
    );
}

fn test_file() -> GgufFile {
    let bytes = GgufWriter::new()
        .kv_str("general.architecture", "test")
        .tensor("w.q2k", GgmlType::Q2_K, &[256, 2], vec![0u8; 2 * 84])
        .tensor(
            "w.q8",
            GgmlType::Q8_0,
            &[64, 3],
            quantize_row(
                GgmlType::Q8_0,
                &(0..192).map(|i| i as f32 - 96.0).collect::<Vec<_>>(),
            )
            .unwrap(),
        )
        .to_bytes();
    GgufFile::from_bytes("test.gguf", bytes).unwrap()
}

#[test]
fn tensor_errors_name_the_tensor_and_type() {
    let file = test_file();
    let t = file.tensor("w.q2k").unwrap();
    let e = dequantize_f32(&file, t).unwrap_err();
    assert_eq!(e.tensor.as_deref(), Some("w.q2k"));
    let msg = e.to_string();
    assert!(
        msg.starts_with("tensor \"w.q2k\": cannot dequantize type Q2_K"),
        "{msg}"
    );
    assert!(dequantize_f16(&file, t).is_err());

    let t = file.tensor("w.q8").unwrap();
    let e = dequantize_rows_f32(&file, t, 2..4).unwrap_err();
    assert_eq!(
        e.to_string(),
        "tensor \"w.q8\": rows 2..4 are outside the tensor's 3 rows"
    );
    #[allow(clippy::reversed_empty_ranges)]
    let e = dequantize_rows_f32(&file, t, 2..1).unwrap_err();
    assert!(matches!(e.kind, QuantErrorKind::RowsOutOfRange { .. }));

    // A TensorInfo that does not describe its bytes is an error, not a panic.
    let mut lying = t.clone();
    lying.ne = vec![32, 3];
    let e = dequantize_f32(&file, &lying).unwrap_err();
    assert!(matches!(e.kind, QuantErrorKind::ByteLength { .. }), "{e}");
}

#[test]
fn tensor_rows_match_the_whole_tensor() {
    let file = test_file();
    let t = file.tensor("w.q8").unwrap();
    let all = dequantize_f32(&file, t).unwrap();
    assert_eq!(all.len(), 192);
    // Values -96..96 quantize exactly (d = 96/127 rounds, so compare within a step).
    for (i, v) in all.iter().enumerate() {
        assert!((v - (i as f32 - 96.0)).abs() <= 0.4, "element {i}: {v}");
    }
    assert_eq!(dequantize_rows_f32(&file, t, 1..3).unwrap(), all[64..]);
    assert!(dequantize_rows_f32(&file, t, 3..3).unwrap().is_empty());
    let halves = dequantize_f16(&file, t).unwrap();
    assert_eq!(halves.len(), 192);
    assert_eq!(dequantize_rows_f16(&file, t, 0..1).unwrap(), halves[..64]);
}

/// The largest error quantizing then dequantizing a block may make, from ggml's rounding rules:
/// the step error (half a step for round-to-nearest, a whole step for the saturating `_0`
/// formats at their positive end), plus the f16 rounding of the scale times the largest quant
/// and of the offset, plus f32 rounding slack.
fn error_bound(ty: GgmlType, x: &[f32]) -> f32 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let (min, max) = x
        .iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    // Rounding a value to f16 errs by at most half an ulp: relative 2^-11 for normals,
    // absolute 2^-25 for subnormals.
    let f16_err = |v: f32| v.abs() * 2f32.powi(-11) + 2f32.powi(-25);
    let slack = amax * 1e-6;
    use GgmlType as T;
    match ty {
        T::F32 => 0.0,
        T::F16 => f16_err(amax),
        T::BF16 => amax * 2f32.powi(-8),
        T::Q8_0 => {
            let d = amax / 127.0;
            d * 0.5 + 128.0 * f16_err(d) + slack
        }
        T::Q4_0 | T::Q5_0 => {
            let levels = if ty == T::Q4_0 { 8.0 } else { 16.0 };
            let d = amax / levels;
            d + levels * f16_err(d) + slack
        }
        T::Q4_1 | T::Q5_1 => {
            let levels = if ty == T::Q4_1 { 15.0 } else { 31.0 };
            let d = (max - min) / levels;
            d * 0.5 + levels * f16_err(d) + f16_err(min) + slack
        }
        // The k-quants fit each sub-block's scale and min by least squares, which may clip the
        // extremes, then round the sub-block scales to 6 or 8 bits: their error has no simple
        // closed form. Over 140,000 random super-blocks the largest error was 0.132 (Q4_K),
        // 0.105 (Q5_K) and 0.073 (Q6_K) times the block's largest magnitude; allow twice that.
        // Their exact bytes are checked against ggml's C reference in tests/dequant.rs.
        T::Q4_K => 0.27 * amax + slack,
        T::Q5_K => 0.21 * amax + slack,
        T::Q6_K => 0.15 * amax + slack,
        _ => unreachable!("{ty}"),
    }
}

/// The k-quants' root-mean-square error relative to the block's RMS: at most 0.067 (Q4_K),
/// 0.039 (Q5_K) and 0.031 (Q6_K) over the same 140,000 blocks; twice that is allowed.
fn rms_error_bound(ty: GgmlType) -> Option<f32> {
    match ty {
        GgmlType::Q4_K => Some(0.135),
        GgmlType::Q5_K => Some(0.08),
        GgmlType::Q6_K => Some(0.062),
        _ => None,
    }
}

/// A row of 1–4 blocks for `ty`: values in ±`scale`, some exact zeros and repeats.
fn row_strategy() -> impl Strategy<Value = (GgmlType, Vec<f32>)> {
    (
        proptest::sample::select(QUANTIZE_TYPES.to_vec()),
        1usize..=4,
        -3i32..=3,
    )
        .prop_flat_map(|(ty, blocks, exp)| {
            let n = blocks * ty.block_size() as usize;
            let scale = 10f32.powi(exp);
            (
                Just(ty),
                proptest::collection::vec(
                    prop_oneof![
                        8 => (-1.0f32..=1.0).prop_map(move |v| v * scale),
                        1 => Just(0.0f32),
                        1 => Just(scale),
                    ],
                    n,
                ),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn quantize_then_dequantize_stays_within_the_format_bound((ty, x) in row_strategy()) {
        let q = quantize_row(ty, &x).unwrap();
        prop_assert_eq!(q.len() as u64, ty.row_bytes(x.len() as u64).unwrap());
        let y = dequant(ty, &q);
        let block = ty.block_size() as usize;
        for (b, (xb, yb)) in x.chunks(block.max(32)).zip(y.chunks(block.max(32))).enumerate() {
            let bound = error_bound(ty, xb);
            for (i, (a, r)) in xb.iter().zip(yb).enumerate() {
                prop_assert!(
                    (a - r).abs() <= bound,
                    "{} block {} element {}: {} -> {} (bound {})", ty, b, i, a, r, bound
                );
            }
            if let Some(rel) = rms_error_bound(ty) {
                let n = xb.len() as f32;
                let rms = (xb.iter().map(|v| v * v).sum::<f32>() / n).sqrt();
                let err = (xb.iter().zip(yb).map(|(a, r)| (a - r) * (a - r)).sum::<f32>() / n).sqrt();
                prop_assert!(err <= rel * rms + 1e-9, "{} block {}: rms error {} of {}", ty, b, err, rms);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        ty in proptest::sample::select(DEQUANTIZE_TYPES.to_vec()),
        blocks in 0usize..4,
        extra in 0usize..3,
        seed in any::<u64>(),
    ) {
        let mut s = seed;
        let len = blocks * ty.type_size() as usize + extra;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (s >> 56) as u8
            })
            .collect();
        let n = blocks * ty.block_size() as usize;
        let mut out = vec![0f32; n];
        let mut out16 = vec![f16::ZERO; n];
        let r = dequantize_row_f32(ty, &bytes, &mut out);
        prop_assert_eq!(r.is_ok(), extra == 0);
        let r16 = dequantize_row_f16(ty, &bytes, &mut out16);
        prop_assert_eq!(r16.is_ok(), extra == 0);
    }

    #[test]
    fn arbitrary_floats_never_panic(
        ty in proptest::sample::select(QUANTIZE_TYPES.to_vec()),
        bits in proptest::collection::vec(any::<u32>(), 256),
    ) {
        let x: Vec<f32> = bits.iter().map(|b| f32::from_bits(*b)).collect();
        let n = x.len() / ty.block_size() as usize * ty.block_size() as usize;
        let q = quantize_row(ty, &x[..n]).unwrap();
        let _ = dequant(ty, &q);
    }
}

#[test]
fn f16_rows_widen_every_bit_pattern_exactly() {
    let bytes: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
    let got = dequant(GgmlType::F16, &bytes);
    for (bits, g) in (0..=u16::MAX).zip(got) {
        let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
        let (e, m) = (i32::from((bits >> 10) & 0x1f), f64::from(bits & 0x3ff));
        if e == 0x1f && m != 0.0 {
            // NaN: same sign and payload, made quiet.
            let want =
                (u32::from(bits & 0x8000) << 16) | 0x7fc0_0000 | (u32::from(bits & 0x3ff) << 13);
            assert_eq!(g.to_bits(), want, "{bits:#06x}");
            continue;
        }
        let want = match e {
            0 => sign * m * 2f64.powi(-24),
            0x1f => sign * f64::INFINITY,
            _ => sign * (1.0 + m / 1024.0) * 2f64.powi(e - 15),
        };
        assert_eq!(g.to_bits(), (want as f32).to_bits(), "{bits:#06x}");
    }
}
