//! Exactness against llama.cpp's tokenizer test vectors: for every `.inp` string, the ids of its
//! `.out` line (add_special = false, parse_special = false), and back to the same text.
//!
//! tests/data/tokenizer holds three vocabularies; the rest come from scripts/fetch-testdata.sh
//! into .cache/vocab (these tests fail under M40LLM_REQUIRE_TESTDATA=1 when it was not run).

mod common;

use m40_llm::gguf::GgufFile;
use m40_llm::tokenizer::{ModelKind, Tokenizer};
use std::path::{Path, PathBuf};

/// The (text, ids) cases of a vocabulary's `.inp`/`.out` files.
fn cases(vocab: &Path) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(format!("{}.inp", vocab.display())).unwrap();
    let out = std::fs::read_to_string(format!("{}.out", vocab.display())).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    // Cases are separated by `sep`; the file may or may not end with one.
    let mut texts: Vec<&str> = inp.split(sep).collect();
    if texts.last() == Some(&"") {
        texts.pop();
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        texts.len(),
        ids.len(),
        "{}: .inp and .out disagree",
        vocab.display()
    );
    texts.into_iter().map(str::to_string).zip(ids).collect()
}

/// Checks every case; panics listing all mismatches. Returns the number of cases.
fn check(vocab: PathBuf) -> usize {
    let file = GgufFile::open(&vocab).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let cases = cases(&vocab);
    let mut failures = Vec::new();
    for (text, want) in &cases {
        let got = tok.encode(text, false, false);
        if &got != want {
            failures.push(format!(
                "encode {text:?}:\n   got  {got:?}\n   want {want:?}"
            ));
            continue;
        }
        // Back to text: the pieces are the text (SentencePiece adds one leading space)...
        let mut pieces: Vec<u8> = want
            .iter()
            .flat_map(|&id| tok.token_piece(id).unwrap().to_vec())
            .collect();
        if tok.model() == ModelKind::Spm && !pieces.is_empty() {
            assert_eq!(pieces.remove(0), b' ');
        }
        if pieces != text.as_bytes() {
            failures.push(format!(
                "pieces of {text:?}: {:?}",
                String::from_utf8_lossy(&pieces)
            ));
        }
        // ...and so is the decoded text, unless the vocabulary cleans up spaces on decoding.
        let decoded = tok.decode(want, false).unwrap();
        if !tok.cleans_spaces() && &decoded != text {
            failures.push(format!("decode {text:?}: {decoded:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{}: {} of {} cases differ from llama.cpp:\n{}",
        vocab.display(),
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!(
        "{}: {} of {} cases exact",
        vocab.display(),
        cases.len(),
        cases.len()
    );
    cases.len()
}

macro_rules! committed {
    ($($test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            check(common::data(concat!("tokenizer/ggml-vocab-", $name, ".gguf")));
        }
    )*};
}

macro_rules! fetched {
    ($($test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            if let Some(p) = common::cached(concat!("vocab/ggml-vocab-", $name, ".gguf")) {
                check(p);
            }
        }
    )*};
}

committed! {
    gpt2 => "gpt-2",
    qwen2 => "qwen2",
    llama_spm => "llama-spm",
}

fetched! {
    command_r => "command-r",
    deepseek_coder => "deepseek-coder",
    deepseek_llm => "deepseek-llm",
    falcon => "falcon",
    gemma4 => "gemma-4",
    llama_bpe => "llama-bpe",
    mpt => "mpt",
    phi3 => "phi-3",
    qwen35 => "qwen35",
    refact => "refact",
    starcoder => "starcoder",
}

/// bert-bge is WordPiece (tokenizer.ggml.model = bert), which m40-llm does not implement: it
/// must be refused with a clear error rather than tokenized wrongly.
#[test]
fn wordpiece_is_refused_clearly() {
    let Some(p) = common::cached("vocab/ggml-vocab-bert-bge.gguf") else {
        return;
    };
    let err = Tokenizer::from_gguf(&GgufFile::open(p).unwrap()).unwrap_err();
    assert!(err.to_string().contains("WordPiece"), "{err}");
}
