//! The default model's own tokenizer against llama.cpp (tests/data/smollm2/tokenize.json): ids
//! with and without special-token parsing, pieces, detokenization with and without rendering
//! special tokens, special ids and the end-of-generation set.

mod common;

use m40_llm::gguf::GgufFile;
use m40_llm::tokenizer::Tokenizer;
use serde_json::Value;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn reference() -> Value {
    let text = std::fs::read_to_string(common::data("smollm2/tokenize.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tokenizer() -> Option<Tokenizer> {
    let path = common::default_model()?;
    Some(Tokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap())
}

#[test]
fn strings_match_llama_cpp() {
    let Some(tok) = tokenizer() else { return };
    let r = reference();
    let mut checked = 0;
    for case in r["strings"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        assert_eq!(hex(text.as_bytes()), case["text_utf8_hex"], "{name}: text");
        for (key, parse_special) in [("special_true", true), ("special_false", false)] {
            let Some(want) = case.get(key) else { continue };
            let ids: Vec<u32> = want["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(
                tok.encode(text, false, parse_special),
                ids,
                "{name} {key}: ids"
            );
            let pieces: Vec<String> = ids
                .iter()
                .map(|&i| hex(tok.token_piece(i).unwrap()))
                .collect();
            assert_eq!(
                pieces,
                want["pieces_hex"].as_array().unwrap().clone(),
                "{name} {key}: pieces"
            );
            let rendered = tok.decode_bytes(&ids, true).unwrap();
            assert_eq!(
                hex(&rendered),
                want["detok_unparse_special"]["hex"],
                "{name} {key}: decode(special)"
            );
            let plain = tok.decode_bytes(&ids, false).unwrap();
            assert_eq!(
                hex(&plain),
                want["detok_no_special"]["hex"],
                "{name} {key}: decode"
            );
            if want["roundtrip_exact"] == true {
                assert_eq!(
                    tok.decode(&ids, true).unwrap(),
                    text,
                    "{name} {key}: round trip"
                );
            }
            // Streaming gives the same text, one id at a time.
            let mut stream = tok.stream_decoder(true);
            let mut streamed = String::new();
            for &id in &ids {
                streamed.push_str(&stream.push(id).unwrap());
            }
            streamed.push_str(&stream.finish());
            assert_eq!(streamed.as_bytes(), rendered, "{name} {key}: stream");
            checked += 1;
        }
    }
    assert_eq!(checked, 35, "every case of tokenize.json was checked");
}

#[test]
fn vocabulary_facts_match_llama_cpp() {
    let Some(tok) = tokenizer() else { return };
    let r = reference();
    let v = &r["vocab"];
    assert_eq!(tok.n_vocab() as u64, v["n_vocab"].as_u64().unwrap());
    let s = tok.special();
    assert_eq!(s.bos.map(u64::from), v["bos"].as_u64());
    assert_eq!(s.eos.map(u64::from), v["eos"].as_u64());
    assert_eq!(s.eot.map(u64::from), v["eot"].as_u64());
    assert_eq!(s.nl.map(u64::from), v["nl"].as_u64());
    assert_eq!(tok.add_bos(), v["add_bos"].as_bool().unwrap());
    assert_eq!(tok.add_eos(), v["add_eos"].as_bool().unwrap());
    for sp in v["specials"].as_array().unwrap() {
        let id = sp["id"].as_u64().unwrap() as u32;
        assert_eq!(tok.token_text(id), sp["text"].as_str(), "token {id}");
        assert_eq!(
            tok.is_eog(id),
            sp["is_eog"].as_bool().unwrap(),
            "is_eog({id})"
        );
        assert_eq!(
            tok.is_control(id),
            sp["is_control"].as_bool().unwrap(),
            "is_control({id})"
        );
    }
    for (i, t) in v["first_20_token_texts"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert_eq!(tok.token_text(i as u32), t.as_str());
    }
    assert_eq!(
        tok.token_text(tok.n_vocab() as u32 - 1),
        v["last_token_text"].as_str()
    );
    assert_eq!(tok.token_text(tok.n_vocab() as u32), None);
}

#[test]
fn add_special_follows_the_vocabulary() {
    let Some(tok) = tokenizer() else { return };
    // SmolLM2 asks for neither BOS nor EOS.
    assert_eq!(
        tok.encode("Hello world", true, false),
        tok.encode("Hello world", false, false)
    );
}

#[test]
fn unknown_ids_are_errors() {
    let Some(tok) = tokenizer() else { return };
    let err = tok.decode(&[19556, 49152], false).unwrap_err();
    assert!(err.to_string().contains("49152"), "{err}");
}
