//! Dequantization and quantization against an independent reference: the `gguf` Python package
//! (`gguf.quants.dequantize` / `quantize`, numpy ports of ggml's C reference) and, for the
//! k-quant quantizers that gguf-py lacks, ggml's C reference itself. The vectors in
//! tests/data/dequant/ were made by tools/dequant_reference.py (docs/quants.md says how to
//! regenerate them). Every comparison is bit for bit; only NaN outputs (from infinite scales,
//! whose NaN bit pattern is the CPU's choice) are compared as "both NaN".

mod common;

use half::f16;
use m40_llm::gguf::quants::{
    DEQUANTIZE_TYPES, QUANTIZE_TYPES, dequantize_f16, dequantize_f32, dequantize_row_f16,
    dequantize_row_f32, dequantize_rows_f32, quantize_row,
};
use m40_llm::gguf::{GgmlType, GgufFile};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

#[derive(Deserialize)]
struct Manifest {
    gguf_py: String,
    type_sizes: Vec<TypeSize>,
    model: Model,
    dequantize: Vec<DequantCase>,
    quantize: Vec<QuantCase>,
}

#[derive(Deserialize)]
struct TypeSize {
    name: String,
    id: u32,
    block_size: u64,
    type_size: u64,
}

#[derive(Deserialize)]
struct Model {
    sha256: String,
    tensors: Vec<TensorDigest>,
    rows: Vec<TensorRows>,
}

#[derive(Deserialize)]
struct TensorDigest {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    ne: Vec<u64>,
    f32_sha256: String,
    f16_sha256: String,
}

#[derive(Deserialize)]
struct TensorRows {
    tensor: String,
    rows: Vec<u64>,
    expected_f32: String,
}

#[derive(Deserialize)]
struct DequantCase {
    #[serde(rename = "type")]
    ty: String,
    case: String,
    n_elements: usize,
    input: String,
    expected_f32: String,
}

#[derive(Deserialize)]
struct QuantCase {
    #[serde(rename = "type")]
    ty: String,
    case: String,
    /// "gguf-py" or "ggml C".
    reference: String,
    n_elements: usize,
    input_f32: String,
    expected: String,
}

fn path(rel: &str) -> PathBuf {
    common::data("dequant").join(rel)
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(path("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn read_f32(rel: &str) -> Vec<f32> {
    read(rel)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn type_named(name: &str) -> GgmlType {
    GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("unknown type {name}"))
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `got` equals `want` bit for bit, except that a NaN only has to be a NaN.
fn assert_same_f32(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut bad = Vec::new();
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let same = g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
        if !same {
            bad.push(format!(
                "[{i}] got {g:e} ({:#010x}) want {w:e} ({:#010x})",
                g.to_bits(),
                w.to_bits()
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} values differ, first: {:?}",
        bad.len(),
        got.len(),
        &bad[..bad.len().min(8)]
    );
}

/// Types whose sizes gguf-py gets wrong or that m40-llm does not know yet, with the reason.
const SIZE_EXCEPTIONS: [(&str, &str); 3] = [
    // gguf-py lists 4 + 4 + 32 bytes; ggml's block_q8_1 is two f16s and 32 quants (36 bytes,
    // static_assert in ggml-common.h). Q8_1 is a compute-only type that files do not contain.
    ("Q8_1", "gguf-py's size is stale"),
    // Newer than the ggml our type table follows; files using them are rejected as unknown.
    ("NVFP4", "not in m40-llm's type table"),
    ("Q1_0", "not in m40-llm's type table"),
];

#[test]
fn type_table_matches_gguf_py() {
    let m = manifest();
    let mut seen = Vec::new();
    for r in &m.type_sizes {
        if let Some((_, why)) = SIZE_EXCEPTIONS.iter().find(|(n, _)| *n == r.name) {
            eprintln!("{}: not compared ({why})", r.name);
            continue;
        }
        let ty = GgmlType::from_id(r.id).unwrap_or_else(|| {
            panic!(
                "gguf-py {} {}: id {} unknown to m40-llm",
                m.gguf_py, r.name, r.id
            )
        });
        assert_eq!(ty.name(), r.name, "id {}", r.id);
        assert_eq!(ty.block_size(), r.block_size, "{} block size", r.name);
        assert_eq!(ty.type_size(), r.type_size, "{} type size", r.name);
        seen.push(ty);
    }
    for ty in GgmlType::ALL {
        assert!(
            seen.contains(&ty) || SIZE_EXCEPTIONS.iter().any(|(n, _)| *n == ty.name()),
            "{ty} is missing from gguf-py's GGML_QUANT_SIZES"
        );
    }
}

#[test]
fn dequantize_matches_gguf_py() {
    let m = manifest();
    let mut covered = Vec::new();
    for c in &m.dequantize {
        let ty = type_named(&c.ty);
        let what = format!("{} {}", c.ty, c.case);
        let input = read(&c.input);
        let want = read_f32(&c.expected_f32);
        assert_eq!(want.len(), c.n_elements, "{what}");

        let mut got = vec![0f32; c.n_elements];
        dequantize_row_f32(ty, &input, &mut got).unwrap();
        assert_same_f32(&what, &got, &want);

        // f16 output: the reference rounded to f16, to nearest even.
        let mut got16 = vec![f16::ZERO; c.n_elements];
        dequantize_row_f16(ty, &input, &mut got16).unwrap();
        for (i, (g, w)) in got16.iter().zip(&want).enumerate() {
            let w16 = f16::from_f32(*w);
            assert!(
                g.to_bits() == w16.to_bits() || (g.is_nan() && w.is_nan()),
                "{what} f16 [{i}]: got {g} want {w16}"
            );
        }
        covered.push(ty);
    }
    for ty in DEQUANTIZE_TYPES {
        assert!(covered.contains(&ty), "no reference vectors for {ty}");
    }
}

#[test]
fn quantize_matches_reference() {
    let m = manifest();
    let mut covered = Vec::new();
    for c in &m.quantize {
        let ty = type_named(&c.ty);
        let x = read_f32(&c.input_f32);
        assert_eq!(x.len(), c.n_elements);
        let want = read(&c.expected);
        let got = quantize_row(ty, &x).unwrap();
        assert_eq!(got.len(), want.len(), "{} {}", c.ty, c.case);
        let block = ty.type_size() as usize;
        for (i, (g, w)) in got.chunks(block).zip(want.chunks(block)).enumerate() {
            assert_eq!(
                g, w,
                "{} {}: block {i} differs from {}",
                c.ty, c.case, c.reference
            );
        }
        covered.push(ty);
    }
    for ty in QUANTIZE_TYPES.into_iter().filter(|t| *t != GgmlType::F32) {
        assert!(covered.contains(&ty), "no reference vectors for {ty}");
    }
}

fn open_default_model() -> Option<(GgufFile, Manifest)> {
    let model = common::default_model()?;
    let m = manifest();
    let bytes = std::fs::read(&model).unwrap();
    assert_eq!(
        sha256_hex(&bytes),
        m.model.sha256,
        "{} is not the model the reference was made from",
        model.display()
    );
    Some((GgufFile::open(&model).unwrap(), m))
}

#[test]
fn default_model_rows_match_gguf_py() {
    let Some((file, m)) = open_default_model() else {
        return;
    };
    assert!(!m.model.rows.is_empty());
    for r in &m.model.rows {
        let t = file.tensor(&r.tensor).unwrap();
        let want = read_f32(&r.expected_f32);
        let row_len = t.row_len() as usize;
        assert_eq!(want.len(), r.rows.len() * row_len, "{}", r.tensor);
        for (row, want) in r.rows.iter().zip(want.chunks(row_len)) {
            let got = dequantize_rows_f32(&file, t, *row..row + 1).unwrap();
            assert_same_f32(&format!("{} row {row}", r.tensor), &got, want);
        }
    }
}

/// Every tensor of the default model, dequantized whole to f32 and to f16, hashes to what
/// gguf-py's dequantization (and numpy's f16 rounding of it) hashes to.
#[test]
fn default_model_tensors_match_gguf_py_digests() {
    let Some((file, m)) = open_default_model() else {
        return;
    };
    assert_eq!(m.model.tensors.len(), file.tensors().len());
    assert_eq!(m.model.tensors.len(), 272);
    for d in &m.model.tensors {
        let t = file.tensor(&d.name).unwrap();
        assert_eq!(t.ty.name(), d.ty, "{}", d.name);
        assert_eq!(t.ne, d.ne, "{}", d.name);
        let values = dequantize_f32(&file, t).unwrap();
        assert_eq!(
            sha256_hex(&le_bytes(&values)),
            d.f32_sha256,
            "{} ({}): f32 output differs from gguf-py",
            d.name,
            d.ty
        );
        let halves = dequantize_f16(&file, t).unwrap();
        let bytes: Vec<u8> = halves
            .iter()
            .flat_map(|h| h.to_bits().to_le_bytes())
            .collect();
        assert_eq!(
            sha256_hex(&bytes),
            d.f16_sha256,
            "{} ({}): f16 output differs from numpy's rounding of gguf-py's",
            d.name,
            d.ty
        );
    }
}
