//! Property: whatever bytes it is given, opening a GGUF file returns `Ok` or `Err` and never
//! panics or hangs; when it returns `Ok`, every tensor's data is in bounds and the inspect summary
//! (text and JSON) is produced or refused without a panic.
//!
//! Inputs are real headers, truncated and mutated thousands of times: a small writer-made model
//! using every value type and several tensor types (complete, so mutations reach the tensor
//! checks), the first 4 KiB of the default model (all its hyperparameter keys and the start of
//! its vocabulary), and a committed llama.cpp vocabulary file.

mod common;

use m40_llm::gguf::{Array, GgmlType, GgufFile, GgufWriter, Value};
use m40_llm::inspect::ModelSummary;
use proptest::prelude::*;
use proptest::sample::Index;

/// One corruption of the input.
#[derive(Clone, Debug)]
enum Mutation {
    /// Overwrite one byte.
    Byte(Index, u8),
    /// Overwrite a u32 field with a value that stresses bounds.
    U32(Index, u32),
    /// Overwrite a u64 field (a count, length, dimension or offset) with such a value.
    U64(Index, u64),
    /// Cut the file here.
    Truncate(Index),
    /// Remove a few bytes, shifting everything after them.
    Delete(Index, u8),
    /// Insert a few bytes.
    Insert(Index, Vec<u8>),
}

fn interesting_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..16,
        Just(u32::MAX),
        Just(1 << 31),
        Just(30),
        Just(39),
        Just(65535),
        any::<u32>(),
    ]
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..64,
        Just(u64::MAX),
        Just(u64::MAX - 31),
        Just(i64::MAX as u64),
        Just(1 << 32),
        Just(1 << 62),
        Just(65536),
        1u64..100_000,
        any::<u64>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Byte(i, b)),
        2 => (any::<Index>(), interesting_u32()).prop_map(|(i, v)| Mutation::U32(i, v)),
        3 => (any::<Index>(), interesting_u64()).prop_map(|(i, v)| Mutation::U64(i, v)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), 1u8..9).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..9))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
    ]
}

/// Applies mutations; positions fall in the first `focus` bytes (the structure-dense header).
fn mutate(input: &[u8], focus: usize, mutations: &[Mutation]) -> Vec<u8> {
    let mut b = input.to_vec();
    for m in mutations {
        let span = focus.min(b.len()).max(1);
        match m {
            Mutation::Byte(i, v) => {
                if !b.is_empty() {
                    let at = i.index(span.min(b.len()));
                    b[at] = *v;
                }
            }
            Mutation::U32(i, v) => put(&mut b, i.index(span), &v.to_le_bytes()),
            Mutation::U64(i, v) => put(&mut b, i.index(span), &v.to_le_bytes()),
            Mutation::Truncate(i) => b.truncate(i.index(b.len() + 1)),
            Mutation::Delete(i, n) => {
                let at = i.index(span).min(b.len());
                let end = (at + *n as usize).min(b.len());
                b.drain(at..end);
            }
            Mutation::Insert(i, v) => {
                let at = i.index(span + 1).min(b.len());
                b.splice(at..at, v.iter().copied());
            }
        }
    }
    b
}

/// Writes `v` at `at`, clipped to the buffer.
fn put(b: &mut [u8], at: usize, v: &[u8]) {
    for (k, byte) in v.iter().enumerate() {
        if let Some(slot) = b.get_mut(at + k) {
            *slot = *byte;
        }
    }
}

/// The property itself: no panic, and an accepted file is usable.
fn check(bytes: Vec<u8>) {
    let len = bytes.len() as u64;
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", bytes) else {
        return;
    };
    for t in file.tensors() {
        assert!(file.data_offset() + t.offset + t.n_bytes <= len);
        assert_eq!(file.tensor_data(t).len() as u64, t.n_bytes);
        assert_eq!(file.tensor(&t.name), Some(t));
    }
    if let Ok(summary) = ModelSummary::from_gguf(&file) {
        let _ = summary.to_string();
        serde_json::to_string(&summary).expect("a summary always serializes");
    }
}

/// A small complete model: every metadata value type, arrays of several types, and tensors of
/// plain and quantized types.
fn tiny_model() -> Vec<u8> {
    GgufWriter::new()
        .kv_str("general.architecture", "llama")
        .kv_str("general.name", "fuzz")
        .kv("general.u8", Value::U8(7))
        .kv("general.i8", Value::I8(-7))
        .kv("general.u16", Value::U16(700))
        .kv("general.i16", Value::I16(-700))
        .kv("general.i32", Value::I32(-70000))
        .kv("general.u64", Value::U64(1 << 40))
        .kv("general.i64", Value::I64(-(1 << 40)))
        .kv("general.f64", Value::F64(0.5))
        .kv("general.flag", Value::Bool(true))
        .kv_u32("llama.context_length", 128)
        .kv_u32("llama.block_count", 2)
        .kv_u32("llama.embedding_length", 32)
        .kv_u32("llama.feed_forward_length", 64)
        .kv_u32("llama.attention.head_count", 4)
        .kv(
            "llama.attention.head_count_kv",
            Value::Array(Array::U32(vec![2, 4])),
        )
        .kv_f32("llama.rope.freq_base", 10000.0)
        .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .kv_str("tokenizer.ggml.model", "gpt2")
        .kv_strings("tokenizer.ggml.tokens", ["a", "b", "ab", "<s>"])
        .kv_strings("tokenizer.ggml.merges", ["a b"])
        .kv(
            "tokenizer.ggml.scores",
            Value::Array(Array::F32(vec![0.0; 4])),
        )
        .kv(
            "tokenizer.ggml.flags",
            Value::Array(Array::Bool(vec![true, false])),
        )
        .kv("tokenizer.ggml.i64s", Value::Array(Array::I64(vec![-1, 1])))
        .tensor_f32("token_embd.weight", &[32, 4], &[0.25; 128])
        .tensor("blk.0.attn_q.weight", GgmlType::Q4_1, &[32, 2], vec![1; 40])
        .tensor("blk.0.attn_k.weight", GgmlType::Q8_0, &[32, 1], vec![2; 34])
        .tensor("blk.0.ffn_up.weight", GgmlType::Q4_K, &[256], vec![3; 144])
        .tensor("blk.0.attn_norm.weight", GgmlType::F16, &[32], vec![0; 64])
        .tensor("blk.0.ids", GgmlType::I8, &[3, 1, 1, 2], vec![4; 6])
        .to_bytes()
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Shrinking large inputs is slow; a failure is reported with its mutation list anyway.
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    }
}

#[test]
fn the_fuzz_inputs_are_valid_before_mutation() {
    let tiny = GgufFile::from_bytes("tiny.gguf", tiny_model()).unwrap();
    assert_eq!(tiny.tensors().len(), 6);
    ModelSummary::from_gguf(&tiny).unwrap();
    let vocab = std::fs::read(common::data("tokenizer/ggml-vocab-llama-spm.gguf")).unwrap();
    GgufFile::from_bytes("vocab.gguf", vocab).unwrap();
}

proptest! {
    #![proptest_config(config(20_000))]
    #[test]
    fn mutated_tiny_models_never_panic(
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let input = tiny_model();
        check(mutate(&input, input.len(), &mutations));
    }
}

proptest! {
    #![proptest_config(config(10_000))]
    #[test]
    fn mutated_default_model_headers_never_panic(
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        // The first 4 KiB: the fixed header, every hyperparameter key, the start of the vocab.
        static HEAD: std::sync::OnceLock<Option<Vec<u8>>> = std::sync::OnceLock::new();
        let head = HEAD.get_or_init(|| {
            let path = common::default_model()?;
            let mut bytes = std::fs::read(path).unwrap();
            bytes.truncate(4096);
            Some(bytes)
        });
        if let Some(head) = head {
            check(mutate(head, 1100, &mutations));
        }
    }
}

proptest! {
    #![proptest_config(config(1000))]
    #[test]
    fn mutated_vocabulary_files_never_panic(
        mutations in prop::collection::vec(mutation(), 1..4),
        anywhere in any::<bool>(),
    ) {
        static VOCAB: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let vocab = VOCAB.get_or_init(|| {
            std::fs::read(common::data("tokenizer/ggml-vocab-llama-spm.gguf")).unwrap()
        });
        // Mostly the metadata before the token list; sometimes anywhere (inside the arrays).
        let focus = if anywhere { vocab.len() } else { 700 };
        check(mutate(vocab, focus, &mutations));
    }
}
