//! Properties beyond the reference vectors, on the committed vocabularies: any text survives
//! encode → pieces (and → decode where the vocabulary does not clean up spaces), streaming
//! decoding equals whole decoding for any id sequence, and special tokens are parsed only on
//! request.

mod common;

use m40_llm::gguf::GgufFile;
use m40_llm::tokenizer::{ModelKind, Tokenizer};
use proptest::prelude::*;
use std::sync::OnceLock;

fn load(name: &str) -> Tokenizer {
    let path = common::data(&format!("tokenizer/ggml-vocab-{name}.gguf"));
    Tokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap()
}

fn gpt2() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| load("gpt-2"))
}
fn qwen2() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| load("qwen2"))
}
fn spm() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| load("llama-spm"))
}

fn pieces(tok: &Tokenizer, ids: &[u32]) -> Vec<u8> {
    let mut out: Vec<u8> = ids
        .iter()
        .flat_map(|&i| tok.token_piece(i).unwrap().to_vec())
        .collect();
    if tok.model() == ModelKind::Spm && !out.is_empty() {
        assert_eq!(out.remove(0), b' ', "SentencePiece adds one leading space");
    }
    out
}

fn streamed(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut d = tok.stream_decoder(true);
    let mut s = String::new();
    for &id in ids {
        s.push_str(&d.push(id).unwrap());
    }
    s + &d.finish()
}

/// Text mixing scripts, emoji, digits, punctuation and white space of every kind.
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just(" ".to_string()),
            Just("\n".to_string()),
            Just("\t".to_string()),
            Just("\u{3000}".to_string()),
            Just("'s".to_string()),
            Just(" ?".to_string()),
            "[a-zA-Z]{1,8}",
            "[0-9]{1,5}",
            "[!-/:-@]{1,3}",
            "[а-я]{1,5}",
            "[一-龥]{1,3}",
            "[\u{1F300}-\u{1F6FF}]{1,2}",
            "\\PC{1,3}",
        ],
        0..24,
    )
    .prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_text_round_trips(s in text()) {
        for tok in [gpt2(), qwen2(), spm()] {
            let ids = tok.encode(&s, false, false);
            let p = pieces(tok, &ids);
            prop_assert_eq!(String::from_utf8_lossy(&p), s.as_str());
            if !tok.cleans_spaces() {
                prop_assert_eq!(tok.decode(&ids, false).unwrap(), s.as_str());
            }
            prop_assert_eq!(streamed(tok, &ids), tok.decode(&ids, true).unwrap());
        }
    }

    /// Any ids, including byte tokens that cut characters and the pieces the space clean-up
    /// rewrites: streaming agrees with decoding everything at once.
    #[test]
    fn streaming_equals_decoding(picks in prop::collection::vec(any::<prop::sample::Index>(), 0..40)) {
        for tok in [gpt2(), qwen2(), spm()] {
            let mut pool: Vec<u32> = [" ", "Ġ", "'", "s", "re", "?", ",", ".", "Ġ'", "Ġ?", "Ġ,", "<0xE2>", "<0x9C>",
                "<0x85>", "â", "ľ", "ħ", "▁", "▁'", "<|endoftext|>", "<s>", "</s>"]
                .iter()
                .filter_map(|t| tok.token_id(t))
                .collect();
            pool.extend([0, 1, 2, 100, 1000, tok.n_vocab() as u32 - 1]);
            let ids: Vec<u32> = picks.iter().map(|i| pool[i.index(pool.len())]).collect();
            prop_assert_eq!(streamed(tok, &ids), tok.decode(&ids, true).unwrap());
        }
    }
}

#[test]
fn special_tokens_are_parsed_only_on_request() {
    let tok = qwen2();
    let im_end = tok.token_id("<|im_end|>").unwrap();
    assert!(tok.is_control(im_end) && tok.is_eog(im_end));
    let text = "a<|im_end|>b";
    assert_eq!(
        tok.encode(text, false, true)
            .iter()
            .filter(|&&i| i == im_end)
            .count(),
        1
    );
    assert!(!tok.encode(text, false, false).contains(&im_end));
    // Rendered only when asked for.
    assert_eq!(tok.decode(&[im_end], true).unwrap(), "<|im_end|>");
    assert_eq!(tok.decode(&[im_end], false).unwrap(), "");
}

#[test]
fn sentencepiece_adds_bos_and_the_space_prefix() {
    let tok = spm();
    let bos = tok.special().bos.unwrap();
    assert!(tok.add_bos() && !tok.add_eos());
    let ids = tok.encode("Hello", true, false);
    assert_eq!(ids[0], bos);
    assert_eq!(&ids[1..], tok.encode("Hello", false, false));
    assert_eq!(tok.token_text(ids[1]), Some("▁Hello"));
    assert_eq!(tok.decode(&ids[1..], false).unwrap(), "Hello");
    assert_eq!(tok.special().nl, tok.token_id("<0x0A>"));
    assert!(tok.encode("", true, false) == vec![bos]);
}

#[test]
fn gpt2_decoding_cleans_up_spaces() {
    let tok = gpt2();
    assert!(tok.cleans_spaces());
    let ids = tok.encode("Hello , world !", false, false);
    assert_eq!(tok.decode(&ids, false).unwrap(), "Hello, world!");
}
