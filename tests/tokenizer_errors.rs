//! Broken or unsupported tokenizer metadata is a clear error, never a panic or a guess; a
//! minimal hand-made vocabulary works.

use m40_llm::gguf::{Array, GgufFile, GgufWriter, Value};
use m40_llm::tokenizer::{Tokenizer, TokenizerError};

fn tiny_bpe() -> GgufWriter {
    GgufWriter::new()
        .kv_str("tokenizer.ggml.model", "gpt2")
        .kv_str("tokenizer.ggml.pre", "gpt-2")
        .kv_strings(
            "tokenizer.ggml.tokens",
            ["a", "b", "ab", "Ġ", "Ġab", "<|end|>"],
        )
        .kv_strings("tokenizer.ggml.merges", ["a b", "Ġ ab"])
        .kv(
            "tokenizer.ggml.token_type",
            Value::Array(Array::I32(vec![1, 1, 1, 1, 1, 3])),
        )
}

fn build(w: GgufWriter) -> Result<Tokenizer, TokenizerError> {
    let file = GgufFile::from_bytes("test.gguf", w.to_bytes()).unwrap();
    Tokenizer::from_gguf(&file)
}

fn err(w: GgufWriter) -> String {
    build(w).unwrap_err().to_string()
}

#[test]
fn a_tiny_vocabulary_works() {
    let tok = build(tiny_bpe()).unwrap();
    assert_eq!(tok.encode("ab ab", false, false), [2, 4]);
    assert_eq!(tok.encode("ab<|end|>", false, true), [2, 5]);
    assert!(tok.is_eog(5) && tok.is_control(5));
    assert_eq!(tok.decode(&[2, 4, 5], false).unwrap(), "ab ab");
    // "c" is in no token: byte-level BPE drops it, as llama.cpp does.
    assert_eq!(tok.encode("c", false, false), Vec::<u32>::new());
    assert!(format!("{tok:?}").contains("n_vocab: 6"));
}

#[test]
fn broken_metadata_is_named() {
    let e = err(GgufWriter::new().kv_u32("general.alignment", 32));
    assert!(
        e.contains("no tokenizer") && e.contains("tokenizer.ggml.model"),
        "{e}"
    );

    let e = err(tiny_bpe().kv_u32("tokenizer.ggml.model", 3));
    assert!(e.contains("tokenizer.ggml.model"), "{e}");

    let e = err(tiny_bpe().kv(
        "tokenizer.ggml.tokens",
        Value::Array(Array::U32(vec![1, 2])),
    ));
    assert!(
        e.contains("tokenizer.ggml.tokens") && e.contains("expected strings"),
        "{e}"
    );

    let e = err(tiny_bpe().kv_strings("tokenizer.ggml.tokens", Vec::<String>::new()));
    assert!(
        e.contains("tokenizer.ggml.tokens") && e.contains("empty"),
        "{e}"
    );

    let e = err(tiny_bpe().kv(
        "tokenizer.ggml.token_type",
        Value::Array(Array::I32(vec![1])),
    ));
    assert!(
        e.contains("tokenizer.ggml.token_type") && e.contains("1 entries for 6 tokens"),
        "{e}"
    );

    let e = err(tiny_bpe().kv(
        "tokenizer.ggml.scores",
        Value::Array(Array::String(vec!["x".into()])),
    ));
    assert!(e.contains("tokenizer.ggml.scores"), "{e}");

    let no_merges = GgufWriter::new()
        .kv_str("tokenizer.ggml.model", "gpt2")
        .kv_strings("tokenizer.ggml.tokens", ["a"]);
    let e = err(no_merges);
    assert!(e.contains("tokenizer.ggml.merges is missing"), "{e}");

    let e = err(tiny_bpe()
        .kv("tokenizer.ggml.add_bos_token", Value::Bool(true))
        .kv_u32("tokenizer.ggml.bos_token_id", 99));
    assert!(e.contains("no BOS token"), "{e}");
}

#[test]
fn unsupported_tokenizers_are_named() {
    let e = err(tiny_bpe().kv_str("tokenizer.ggml.pre", "tekken"));
    assert!(e.contains("unsupported") && e.contains("tekken"), "{e}");
    let e = err(tiny_bpe().kv_str("tokenizer.ggml.model", "t5"));
    assert!(e.contains("Unigram"), "{e}");
    let e = err(tiny_bpe().kv_str("tokenizer.ggml.model", "rwkv"));
    assert!(e.contains("unsupported") && e.contains("rwkv"), "{e}");
}

#[test]
fn out_of_range_special_ids_are_ignored_not_trusted() {
    let tok = build(tiny_bpe().kv_u32("tokenizer.ggml.eos_token_id", 1000)).unwrap();
    // The default (11) is outside this 6-token vocabulary too: no EOS at all.
    assert_eq!(tok.special().eos, None);
    assert!(tok.decode(&[6], false).is_err());
}
