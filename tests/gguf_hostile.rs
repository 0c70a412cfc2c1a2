//! Hostile GGUF files: every class of corruption the reader must reject, each built by corrupting
//! the real default model at offsets found by an independent walker (tests/common/layout.rs), or
//! with the writer where a real file cannot express the case. Each test checks the error kind and
//! that the message names the file and the right offset, key or tensor.
//!
//! Most classes are caught while reading the header, so they corrupt a copy of the header alone
//! (1.8 MB); the classes that need the data section (overlap, data out of the file, model keys
//! checked after a successful open) corrupt a copy of the whole file.

mod common;

use common::layout::{self, Layout, put_bytes, put_u32, put_u64};
use m40_llm::gguf::{GgmlType, GgufError, GgufErrorKind as K, GgufFile, GgufWriter, Value};
use m40_llm::inspect::ModelSummary;
use std::sync::OnceLock;

const NAME: &str = "hostile.gguf";

struct Model {
    bytes: Vec<u8>,
    layout: Layout,
}

impl Model {
    /// A copy of the header: everything before the data section.
    fn header(&self) -> Vec<u8> {
        self.bytes[..self.layout.data_start as usize].to_vec()
    }

    /// A copy of the whole file.
    fn whole(&self) -> Vec<u8> {
        self.bytes.clone()
    }

    fn kv(&self, key: &str) -> &layout::Kv {
        self.layout.kv(key)
    }

    fn tensor(&self, name: &str) -> &layout::Tensor {
        self.layout.tensor(name)
    }
}

/// The default model, read once per test binary; `None` (skip) when absent and not required.
fn model() -> Option<&'static Model> {
    static MODEL: OnceLock<Option<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = common::default_model()?;
            let bytes = std::fs::read(&path).expect("cannot read the default model");
            let layout = Layout::of(&bytes);
            Some(Model { bytes, layout })
        })
        .as_ref()
}

/// Opens `bytes`, which must be rejected.
fn reject(bytes: Vec<u8>) -> GgufError {
    let err = GgufFile::from_bytes(NAME, bytes).expect_err("the hostile file was accepted");
    assert!(err.to_string().starts_with(NAME), "{err}");
    err
}

/// Opens `bytes`, which must be a valid file, and summarises it: the summary must fail.
fn reject_model(bytes: Vec<u8>) -> GgufError {
    let file = GgufFile::from_bytes(NAME, bytes).expect("the corrupted file should still open");
    let err = ModelSummary::from_gguf(&file).expect_err("the summary accepted a broken model");
    assert!(err.to_string().starts_with(NAME), "{err}");
    err
}

/// Asserts the message contains every part.
fn says(err: &GgufError, parts: &[&str]) {
    let msg = err.to_string();
    for p in parts {
        assert!(msg.contains(p), "message lacks {p:?}: {msg}");
    }
}

#[test]
fn the_unmodified_model_opens() {
    let Some(m) = model() else { return };
    let file = GgufFile::from_bytes(NAME, m.whole()).unwrap();
    assert_eq!(file.tensors().len(), m.layout.tensors.len());
    assert_eq!(file.data_offset(), m.layout.data_start);
    // The walker and the reader agree on where every entry is.
    for kv in &m.layout.kvs {
        assert_eq!(file.key_offset(&kv.key), Some(kv.offset), "{}", kv.key);
    }
}

// --- magic and version -------------------------------------------------------------------------

#[test]
fn bad_magic() {
    let Some(m) = model() else { return };
    let mut b = m.header();
    put_bytes(&mut b, 0, b"GGML");
    let err = reject(b);
    assert!(
        matches!(&err.kind, K::BadMagic { found } if found == b"GGML"),
        "{err}"
    );
    says(&err, &["not a GGUF file", "47 47 55 46"]);

    let err = reject(b"PK\x03\x04 a zip, not a model".to_vec());
    assert!(matches!(err.kind, K::BadMagic { .. }), "{err}");
}

#[test]
fn files_shorter_than_the_magic() {
    for bytes in [&b""[..], b"G", b"GGU"] {
        let err = reject(bytes.to_vec());
        assert!(
            matches!(
                err.kind,
                K::Truncated {
                    offset: 0,
                    need: 4,
                    ..
                }
            ),
            "{err}"
        );
        says(&err, &["truncated at offset 0", "magic"]);
    }
    let err = reject(b"XY".to_vec());
    assert!(matches!(err.kind, K::BadMagic { .. }), "{err}");
}

#[test]
fn unsupported_versions() {
    let Some(m) = model() else { return };
    for (version, hint) in [
        (1u32, "version 1 files predate"),
        (0, "version 0: m40-llm reads versions 2 and 3"),
        (4, "version 4: m40-llm reads versions 2 and 3"),
        (3u32.swap_bytes(), "big-endian"),
        (u32::MAX, "version 4294967295"),
    ] {
        let mut b = m.header();
        put_u32(&mut b, layout::VERSION_OFFSET, version);
        let err = reject(b);
        assert!(
            matches!(err.kind, K::UnsupportedVersion { version: v, .. } if v == version),
            "{err}"
        );
        says(&err, &[hint, "reads versions 2 and 3"]);
        if version == 0 || version == 4 {
            assert!(!err.to_string().contains("big-endian"), "{err}");
        }
    }
}

#[test]
fn version_2_files_are_read() {
    let Some(m) = model() else { return };
    let mut b = m.whole();
    put_u32(&mut b, layout::VERSION_OFFSET, 2);
    let file = GgufFile::from_bytes(NAME, b).unwrap();
    assert_eq!(file.version(), 2);
}

// --- truncation --------------------------------------------------------------------------------

/// Cuts the header at many points (inside the fixed header, every metadata entry's fields, inside
/// long arrays, tensor infos): every cut is reported as a truncation at or before the cut.
#[test]
fn truncation_anywhere_in_the_header() {
    let Some(m) = model() else { return };
    let l = &m.layout;
    let mut cuts: Vec<u64> = vec![4, 6, 8, 15, 16, 23, 24];
    for kv in &l.kvs {
        cuts.extend([kv.offset, kv.offset + 3, kv.offset + 9, kv.type_offset + 2]);
        cuts.extend([kv.value_offset, kv.value_offset + 1]);
        if let Some(a) = &kv.array {
            cuts.extend([a.count_offset + 4, a.elements_offset + 5]);
            // Deep inside the array.
            cuts.push(a.elements_offset + a.count * 3);
        }
    }
    for t in l.tensors.iter().take(12).chain(l.tensors.last()) {
        cuts.extend([t.offset, t.offset + 12, t.n_dims_offset + 1]);
        cuts.extend(t.dims_offsets.iter().map(|d| d + 5));
        cuts.extend([t.type_offset + 1, t.data_offset_field + 7]);
    }
    cuts.retain(|&c| c < l.infos_end);
    cuts.sort_unstable();
    cuts.dedup();
    assert!(cuts.len() > 200, "{} cuts", cuts.len());

    for cut in cuts {
        let err = reject(m.bytes[..cut as usize].to_vec());
        match err.kind {
            K::Truncated {
                offset, need, have, ..
            } => {
                assert!(offset <= cut && offset + need > cut, "cut {cut}: {err}");
                assert_eq!(have, cut - offset, "cut {cut}: {err}");
            }
            K::ImplausibleCount {
                offset, remaining, ..
            } => {
                assert!(offset < cut && remaining < cut, "cut {cut}: {err}");
                // A cut in the metadata is reported there, not as a bad tensor count.
                if cut < l.tensors[0].offset {
                    assert_ne!(offset, layout::N_TENSORS_OFFSET, "cut {cut}: {err}");
                }
            }
            _ => panic!("cut at {cut}: expected a truncation, got {err}"),
        }
        says(&err, &["truncated"]);
    }
}

#[test]
fn truncation_in_the_middle_of_a_tensor_info_names_the_tensor() {
    let Some(m) = model() else { return };
    let t = m.tensor("blk.3.ffn_up.weight");
    let err = reject(m.bytes[..t.type_offset as usize + 2].to_vec());
    assert!(
        matches!(err.kind, K::Truncated { offset, .. } if offset == t.type_offset),
        "{err}"
    );
    says(&err, &["the type of tensor \"blk.3.ffn_up.weight\""]);
}

#[test]
fn truncated_tensor_data() {
    let Some(m) = model() else { return };
    // Header only: the first tensor's data is missing.
    let err = reject(m.header());
    assert!(matches!(err.kind, K::TensorOutOfFile { .. }), "{err}");
    says(
        &err,
        &[
            "\"token_embd.weight\"",
            "past the end of the file",
            "truncated",
        ],
    );

    // The last 100 bytes missing: the tensor stored last is cut short.
    let mut b = m.whole();
    b.truncate(b.len() - 100);
    let len = b.len() as u64;
    let err = reject(b);
    let last = m.tensor("output_norm.weight");
    assert!(
        matches!(&err.kind, K::TensorOutOfFile { tensor, offset, file_len, .. }
            if tensor == "output_norm.weight" && *offset == last.offset && *file_len == len),
        "{err}"
    );
    says(&err, &[&format!("{len} bytes")]);
}

// --- absurd counts and lengths -----------------------------------------------------------------

#[test]
fn absurd_tensor_and_key_counts() {
    let Some(m) = model() else { return };
    for (at, value, what) in [
        (layout::N_TENSORS_OFFSET, u64::MAX, "the tensor count"),
        (layout::N_TENSORS_OFFSET, 1 << 40, "the tensor count"),
        (layout::N_KV_OFFSET, u64::MAX / 13, "the metadata key count"),
        (layout::N_KV_OFFSET, 1 << 20, "the metadata key count"),
    ] {
        let mut b = m.header();
        put_u64(&mut b, at, value);
        let err = reject(b);
        assert!(
            matches!(err.kind, K::ImplausibleCount { offset, count, .. } if offset == at && count == value),
            "{err}"
        );
        says(&err, &[what, &format!("at offset {at}")]);
    }
}

#[test]
fn absurd_string_lengths() {
    let Some(m) = model() else { return };
    // A key longer than GGUF allows.
    for len in [u64::MAX, 65536] {
        let mut b = m.header();
        let kv = m.kv("general.name");
        put_u64(&mut b, kv.offset, len);
        let err = reject(b);
        assert!(
            matches!(err.kind, K::TooLong { offset, len: l, max: 65535, .. } if offset == kv.offset && l == len),
            "{err}"
        );
        says(&err, &["key #2", "65535"]);
    }
    // A string value longer than the file.
    let mut b = m.header();
    let kv = m.kv("general.name");
    put_u64(&mut b, kv.value_offset, u64::MAX - 7);
    let err = reject(b);
    assert!(
        matches!(err.kind, K::ImplausibleCount { offset, .. } if offset == kv.value_offset),
        "{err}"
    );
    says(&err, &["value of key \"general.name\""]);
    // A tensor name longer than GGUF allows.
    let mut b = m.header();
    let t = m.tensor("blk.0.attn_norm.weight");
    put_u64(&mut b, t.offset, 1 << 50);
    let err = reject(b);
    assert!(
        matches!(err.kind, K::TooLong { offset, .. } if offset == t.offset),
        "{err}"
    );
    says(&err, &["the name of tensor #1"]);
    // An element of a string array longer than the file.
    let mut b = m.header();
    let a = m.kv("tokenizer.ggml.merges").array.clone().unwrap();
    put_u64(&mut b, a.elements_offset, 1 << 40);
    let err = reject(b);
    assert!(
        matches!(err.kind, K::ImplausibleCount { offset, .. } if offset == a.elements_offset),
        "{err}"
    );
    says(&err, &["element 0 of array \"tokenizer.ggml.merges\""]);
}

#[test]
fn absurd_array_counts() {
    let Some(m) = model() else { return };
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type"] {
        for count in [u64::MAX, 1 << 61, m.bytes.len() as u64] {
            let mut b = m.header();
            let a = m.kv(key).array.clone().unwrap();
            put_u64(&mut b, a.count_offset, count);
            let err = reject(b);
            assert!(
                matches!(err.kind, K::ImplausibleCount { offset, count: c, .. } if offset == a.count_offset && c == count),
                "{err}"
            );
            says(&err, &[&format!("element count of array \"{key}\"")]);
        }
    }
}

#[test]
fn absurd_dimensions() {
    let Some(m) = model() else { return };
    let t = m.tensor("blk.0.ffn_norm.weight");
    for (value, reason) in [
        (u64::MAX, "signed 64-bit"),
        (1 << 63, "signed 64-bit"),
        (0, "at least 1"),
    ] {
        let mut b = m.header();
        put_u64(&mut b, t.dims_offsets[0], value);
        let err = reject(b);
        assert!(
            matches!(&err.kind, K::BadDimension { offset, tensor, index: 0, .. }
                if *offset == t.dims_offsets[0] && tensor == "blk.0.ffn_norm.weight"),
            "{err}"
        );
        says(&err, &[reason]);
    }
}

#[test]
fn too_many_dimensions() {
    let Some(m) = model() else { return };
    let t = m.tensor("token_embd.weight");
    for n_dims in [5, u32::MAX] {
        let mut b = m.header();
        put_u32(&mut b, t.n_dims_offset, n_dims);
        let err = reject(b);
        assert!(
            matches!(&err.kind, K::TooManyDims { offset, tensor, n_dims: n }
                if *offset == t.n_dims_offset && tensor == "token_embd.weight" && *n == n_dims),
            "{err}"
        );
        says(&err, &["at most 4"]);
    }
}

#[test]
fn dimension_products_that_overflow() {
    let Some(m) = model() else { return };
    let t = m.tensor("token_embd.weight");
    let mut b = m.header();
    put_u64(&mut b, t.dims_offsets[0], 1 << 32);
    put_u64(&mut b, t.dims_offsets[1], 1 << 32);
    let err = reject(b);
    assert!(
        matches!(&err.kind, K::BadDimension { offset, index: 1, .. } if *offset == t.dims_offsets[1]),
        "{err}"
    );
    says(
        &err,
        &[
            "\"token_embd.weight\"",
            "product of the dimensions overflows",
        ],
    );

    // Elements fit in an i64 but bytes do not: 2^62 F64 elements are 2^65 bytes.
    let t = m.tensor("output_norm.weight");
    let mut b = m.header();
    put_u64(&mut b, t.dims_offsets[0], 1 << 62);
    put_u32(&mut b, t.type_offset, GgmlType::F64.id());
    let err = reject(b);
    assert!(matches!(err.kind, K::BadDimension { .. }), "{err}");
    says(&err, &["\"output_norm.weight\"", "size in bytes overflows"]);
}

// --- value types -------------------------------------------------------------------------------

#[test]
fn nested_arrays() {
    let Some(m) = model() else { return };
    let mut b = m.header();
    let a = m.kv("tokenizer.ggml.tokens").array.clone().unwrap();
    put_u32(&mut b, a.elem_type_offset, 9);
    let err = reject(b);
    assert!(
        matches!(&err.kind, K::NestedArray { offset, key } if *offset == a.elem_type_offset && key == "tokenizer.ggml.tokens"),
        "{err}"
    );
    says(&err, &["array of arrays"]);
}

#[test]
fn unknown_value_types() {
    let Some(m) = model() else { return };
    let kv = m.kv("general.name");
    for id in [13, 255, u32::MAX] {
        let mut b = m.header();
        put_u32(&mut b, kv.type_offset, id);
        let err = reject(b);
        assert!(
            matches!(&err.kind, K::UnknownValueType { offset, key, id: i } if *offset == kv.type_offset && key == "general.name" && *i == id),
            "{err}"
        );
        says(&err, &["unknown value type"]);
    }
    // In an array's element type.
    let mut b = m.header();
    let a = m.kv("tokenizer.ggml.token_type").array.clone().unwrap();
    put_u32(&mut b, a.elem_type_offset, 77);
    let err = reject(b);
    assert!(
        matches!(&err.kind, K::UnknownValueType { offset, id: 77, .. } if *offset == a.elem_type_offset),
        "{err}"
    );
    says(&err, &["\"tokenizer.ggml.token_type\""]);
}

#[test]
fn bools_must_be_0_or_1() {
    let Some(m) = model() else { return };
    let kv = m.kv("tokenizer.ggml.add_bos_token");
    let mut b = m.header();
    b[kv.value_offset as usize] = 2;
    let err = reject(b);
    assert!(
        matches!(&err.kind, K::InvalidValue { offset, key, .. } if *offset == kv.value_offset && key == "tokenizer.ggml.add_bos_token"),
        "{err}"
    );
    says(&err, &["0 or 1"]);
}

#[test]
fn invalid_utf8_in_keys_and_names() {
    let Some(m) = model() else { return };
    let kv = m.kv("general.license");
    let mut b = m.header();
    b[kv.offset as usize + 8 + 3] = 0xff;
    let err = reject(b);
    assert!(
        matches!(err.kind, K::InvalidUtf8 { offset, .. } if offset == kv.offset + 8 + 3),
        "{err}"
    );
    says(&err, &["not valid UTF-8", "key #7"]);

    let t = m.tensor("blk.2.attn_q.weight");
    let mut b = m.header();
    b[t.offset as usize + 8] = 0xc0;
    let err = reject(b);
    assert!(
        matches!(err.kind, K::InvalidUtf8 { offset, .. } if offset == t.offset + 8),
        "{err}"
    );
    says(&err, &["the name of tensor #"]);
}

#[test]
fn empty_keys() {
    let Some(m) = model() else { return };
    let kv = m.kv("general.type");
    let mut b = m.header();
    put_u64(&mut b, kv.offset, 0);
    let err = reject(b);
    assert!(
        matches!(err.kind, K::EmptyKey { offset, index: 1 } if offset == kv.offset),
        "{err}"
    );
    says(&err, &["key #1 is empty"]);
}

// --- duplicates --------------------------------------------------------------------------------

#[test]
fn duplicate_keys() {
    let Some(m) = model() else { return };
    // "general.basename" and "general.finetune" have the same length: rename one to the other.
    let first = m.kv("general.finetune");
    let second = m.kv("general.basename");
    let mut b = m.header();
    put_bytes(&mut b, second.offset + 8, b"general.finetune");
    let err = reject(b);
    assert!(
        matches!(&err.kind, K::DuplicateKey { offset, key, first: f }
            if *offset == second.offset && key == "general.finetune" && *f == first.offset),
        "{err}"
    );
    says(&err, &["appears a second time"]);
}

#[test]
fn duplicate_tensor_names() {
    let Some(m) = model() else { return };
    let renamed = m.tensor("blk.0.attn_k.weight");
    let original = m.tensor("blk.0.attn_q.weight");
    assert!(renamed.offset < original.offset);
    let mut b = m.header();
    put_bytes(&mut b, renamed.offset + 8, b"blk.0.attn_q.weight");
    let err = reject(b);
    assert!(
        matches!(&err.kind, K::DuplicateTensor { offset, tensor, first }
            if *offset == original.offset && tensor == "blk.0.attn_q.weight" && *first == renamed.offset),
        "{err}"
    );
}

// --- tensor types and blocks -------------------------------------------------------------------

#[test]
fn unknown_tensor_types() {
    let Some(m) = model() else { return };
    let t = m.tensor("blk.1.attn_v.weight");
    // 4 and 5 are ggml's removed Q4_2/Q4_3; 40 is past the end.
    for id in [4, 5, 40, u32::MAX] {
        let mut b = m.header();
        put_u32(&mut b, t.type_offset, id);
        let err = reject(b);
        assert!(
            matches!(&err.kind, K::UnknownTensorType { offset, tensor, id: i }
                if *offset == t.type_offset && tensor == "blk.1.attn_v.weight" && *i == id),
            "{err}"
        );
        says(&err, &["unknown ggml type"]);
    }
}

#[test]
fn rows_that_are_not_whole_blocks() {
    let Some(m) = model() else { return };
    let t = m.tensor("blk.0.ffn_down.weight");
    assert_eq!(t.ty, GgmlType::Q4_1.id());
    let mut b = m.header();
    put_u64(&mut b, t.dims_offsets[0], 1537);
    let err = reject(b);
    assert!(
        matches!(&err.kind, K::PartialBlock { offset, tensor, ty: GgmlType::Q4_1, ne0: 1537, block: 32 }
            if *offset == t.offset && tensor == "blk.0.ffn_down.weight"),
        "{err}"
    );
    says(&err, &["32-element blocks"]);

    // A k-quant type needs rows of 256.
    let mut b = m.header();
    put_u32(&mut b, t.type_offset, GgmlType::Q6_K.id());
    put_u64(&mut b, t.dims_offsets[0], 1536 + 32);
    let err = reject(b);
    assert!(
        matches!(err.kind, K::PartialBlock { block: 256, .. }),
        "{err}"
    );
}

// --- alignment ---------------------------------------------------------------------------------

/// The model has no general.alignment; "llama.block_count" has the same length and is a u32, so
/// renaming it makes one (the block count is not needed to open the file).
fn with_alignment(m: &Model, alignment: u32) -> (Vec<u8>, u64) {
    let kv = m.kv("llama.block_count");
    assert_eq!(kv.ty, 4);
    let mut b = m.header();
    put_bytes(&mut b, kv.offset + 8, b"general.alignment");
    put_u32(&mut b, kv.value_offset, alignment);
    (b, kv.offset)
}

#[test]
fn alignment_zero_or_not_a_power_of_two() {
    let Some(m) = model() else { return };
    for alignment in [0, 3, 48, 0x8000_0001] {
        let (b, at) = with_alignment(m, alignment);
        let err = reject(b);
        assert!(
            matches!(err.kind, K::BadAlignment { offset, alignment: a } if offset == at && a == u64::from(alignment)),
            "{err}"
        );
        says(&err, &["general.alignment", "power of two"]);
    }
}

#[test]
fn alignment_of_the_wrong_type() {
    let Some(m) = model() else { return };
    let (mut b, at) = with_alignment(m, 32);
    put_u32(&mut b, m.kv("llama.block_count").type_offset, 5); // i32, same size
    let err = reject(b);
    assert!(
        matches!(&err.kind, K::MistypedKey { offset, key, expected: "u32", .. } if *offset == at && key == "general.alignment"),
        "{err}"
    );
    says(&err, &["has type i32, expected u32"]);
}

#[test]
fn a_larger_alignment_misaligns_the_tensors() {
    let Some(m) = model() else { return };
    let (b, _) = with_alignment(m, 1 << 30);
    let err = reject(b);
    // token_embd is at data offset 0; the second tensor is not at a multiple of 2^30.
    let t = &m.layout.tensors[1];
    assert!(
        matches!(&err.kind, K::MisalignedTensor { offset, tensor, alignment: 1073741824, .. }
            if *offset == t.data_offset_field && *tensor == t.name),
        "{err}"
    );
}

// --- tensor data placement ---------------------------------------------------------------------

#[test]
fn misaligned_tensor_data() {
    let Some(m) = model() else { return };
    let t = m.tensor("blk.0.attn_norm.weight");
    let mut b = m.header();
    put_u64(&mut b, t.data_offset_field, t.data_offset + 4);
    let err = reject(b);
    assert!(
        matches!(&err.kind, K::MisalignedTensor { offset, tensor, data_offset, alignment: 32 }
            if *offset == t.data_offset_field && tensor == "blk.0.attn_norm.weight" && *data_offset == t.data_offset + 4),
        "{err}"
    );
    says(&err, &["not a multiple of the alignment 32"]);
}

#[test]
fn tensor_data_outside_the_file() {
    let Some(m) = model() else { return };
    // Far past the end, and so far that start + size overflows a u64.
    for offset in [1u64 << 40, u64::MAX - 31] {
        let t = m.tensor("output_norm.weight");
        let mut b = m.whole();
        put_u64(&mut b, t.data_offset_field, offset);
        let err = reject(b);
        assert!(
            matches!(&err.kind, K::TensorOutOfFile { offset: o, tensor, .. }
                if *o == t.offset && tensor == "output_norm.weight"),
            "{err}"
        );
        says(&err, &["past the end of the file"]);
    }
}

#[test]
fn overlapping_tensors() {
    let Some(m) = model() else { return };
    let norm = m.tensor("blk.0.attn_norm.weight");
    let down = m.tensor("blk.0.ffn_down.weight");
    let mut b = m.whole();
    put_u64(&mut b, down.data_offset_field, norm.data_offset);
    let err = reject(b);
    assert!(
        matches!(&err.kind, K::OverlappingTensors { first, second, .. }
            if first == "blk.0.attn_norm.weight" && second == "blk.0.ffn_down.weight"),
        "{err}"
    );
    says(&err, &["overlap"]);

    // Partial overlap: the next tensor starts 32 bytes into ffn_down.
    let gate = m.tensor("blk.0.ffn_gate.weight");
    let mut b = m.whole();
    put_u64(&mut b, gate.data_offset_field, down.data_offset + 32);
    let err = reject(b);
    assert!(
        matches!(&err.kind, K::OverlappingTensors { first, second, .. }
            if first == "blk.0.ffn_down.weight" && second == "blk.0.ffn_gate.weight"),
        "{err}"
    );
}

// --- keys every model needs --------------------------------------------------------------------

#[test]
fn missing_model_keys_are_named() {
    let Some(m) = model() else { return };
    for key in [
        "general.architecture",
        "llama.block_count",
        "llama.context_length",
        "llama.embedding_length",
        "llama.attention.head_count",
    ] {
        let kv = m.kv(key);
        let mut b = m.whole();
        // Change the key's last character: the key is then absent.
        b[kv.offset as usize + 8 + key.len() - 1] = b'~';
        let err = reject_model(b);
        assert!(
            matches!(&err.kind, K::MissingKey { key: k } if k == key),
            "{key}: {err}"
        );
        says(&err, &["required key", key]);
    }
}

#[test]
fn mistyped_model_keys_are_named() {
    let Some(m) = model() else { return };
    for key in [
        "llama.block_count",
        "llama.context_length",
        "llama.embedding_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.feed_forward_length",
        "general.file_type",
    ] {
        let kv = m.kv(key);
        assert_eq!(kv.ty, 4, "{key} is a u32");
        let mut b = m.whole();
        put_u32(&mut b, kv.type_offset, 6); // f32, same size
        let err = reject_model(b);
        assert!(
            matches!(&err.kind, K::MistypedKey { key: k, offset, .. } if k == key && *offset == kv.offset),
            "{key}: {err}"
        );
        says(&err, &[key, "has type f32"]);
    }
    // A float key stored as an integer.
    let kv = m.kv("llama.rope.freq_base");
    let mut b = m.whole();
    put_u32(&mut b, kv.type_offset, 4);
    let err = reject_model(b);
    says(
        &err,
        &["llama.rope.freq_base", "has type u32, expected float"],
    );
}

#[test]
fn zero_model_sizes_are_invalid() {
    let Some(m) = model() else { return };
    for key in [
        "llama.block_count",
        "llama.embedding_length",
        "llama.attention.head_count",
    ] {
        let kv = m.kv(key);
        let mut b = m.whole();
        put_u32(&mut b, kv.value_offset, 0);
        let err = reject_model(b);
        assert!(
            matches!(&err.kind, K::InvalidValue { key: k, .. } if k == key),
            "{key}: {err}"
        );
        says(&err, &["at least 1"]);
    }
}

// --- cases the writer expresses more simply ----------------------------------------------------

#[test]
fn writer_made_hostile_files() {
    // An empty key.
    let b = GgufWriter::new().kv("", Value::U8(1)).to_bytes();
    let err = reject(b);
    assert!(
        matches!(
            err.kind,
            K::EmptyKey {
                offset: 24,
                index: 0
            }
        ),
        "{err}"
    );

    // A tensor with zero dimensions is a scalar: one element.
    let b = GgufWriter::new()
        .tensor_f32("scalar", &[], &[2.5])
        .to_bytes();
    let f = GgufFile::from_bytes(NAME, b).unwrap();
    assert_eq!(f.tensor("scalar").unwrap().n_elements(), 1);

    // Alignment given as a u64.
    let b = GgufWriter::new()
        .kv("general.alignment", Value::U64(32))
        .to_bytes();
    let err = reject(b);
    assert!(matches!(err.kind, K::MistypedKey { .. }), "{err}");
}
