//! Chat templates rendered by minijinja against Python jinja2 with Hugging Face's settings
//! (tests/data/chat/expected.json, made by tools/chat_reference.py): the default model's own
//! template, and llama.cpp's templates (fetched into .cache/templates) that minijinja renders.

mod common;

use m40_llm::gguf::GgufFile;
use m40_llm::tokenizer::Tokenizer;
use m40_llm::tokenizer::chat::{ChatError, ChatMessage, ChatTemplate};
use serde_json::Value;
use std::collections::BTreeMap;

fn expected() -> Value {
    let text = std::fs::read_to_string(common::data("chat/expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn conversations() -> BTreeMap<String, Vec<ChatMessage>> {
    let text = std::fs::read_to_string(common::data("chat/conversations.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn default_model_tokenizer() -> Option<Tokenizer> {
    let path = common::default_model()?;
    Some(Tokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap())
}

/// Renders every reference case whose template is available; returns the mismatches.
fn check(filter: impl Fn(&str) -> bool) -> (usize, Vec<String>) {
    let exp = expected();
    let convs = conversations();
    let tok = default_model_tokenizer();
    let mut n = 0;
    let mut failures = Vec::new();
    for r in exp["renders"].as_array().unwrap() {
        let name = r["template"].as_str().unwrap();
        if !filter(name) {
            continue;
        }
        let template = if name == "default-model" {
            let Some(tok) = &tok else { continue };
            ChatTemplate::from_tokenizer(tok)
        } else {
            let Some(path) = common::cached(&format!("templates/{name}.jinja")) else {
                continue;
            };
            let source = std::fs::read_to_string(path).unwrap();
            ChatTemplate::new(
                &source,
                r["bos_token"].as_str().unwrap(),
                r["eos_token"].as_str().unwrap(),
            )
        };
        let conv = &convs[r["conversation"].as_str().unwrap()];
        let got = template.and_then(|t| t.with_date(2024, 7, 26).render(conv, true));
        n += 1;
        match got {
            Ok(out) if out == r["output"].as_str().unwrap() => {}
            Ok(out) => failures.push(format!(
                "{name} / {}: differs from jinja2\n--- minijinja\n{out}\n--- jinja2\n{}",
                r["conversation"],
                r["output"].as_str().unwrap()
            )),
            Err(e) => failures.push(format!("{name} / {}: {e}", r["conversation"])),
        }
    }
    (n, failures)
}

#[test]
fn default_model_template_matches_jinja2() {
    let (n, failures) = check(|name| name == "default-model");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    if default_model_tokenizer().is_some() {
        assert_eq!(n, 2, "both conversations rendered");
    }
}

#[test]
fn llama_cpp_templates_match_jinja2() {
    let (n, failures) = check(|name| name != "default-model");
    assert!(
        failures.is_empty(),
        "{} of {n} renders differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn default_model_renders_chatml() {
    let Some(tok) = default_model_tokenizer() else {
        return;
    };
    let t = ChatTemplate::from_tokenizer(&tok).unwrap();
    let out = t
        .render(
            &[
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // The rendered prompt tokenizes with its control tokens parsed.
    let ids = tok.encode(&out, false, true);
    assert_eq!(
        ids.iter()
            .filter(|&&i| Some(i) == tok.token_id("<|im_start|>"))
            .count(),
        3
    );
}

#[test]
fn a_model_without_template_is_a_clear_error() {
    let path = common::data("tokenizer/ggml-vocab-gpt-2.gguf");
    let tok = Tokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap();
    assert!(matches!(
        ChatTemplate::from_tokenizer(&tok),
        Err(ChatError::NoTemplate)
    ));
}

#[test]
fn raise_exception_is_reported_as_the_templates_message() {
    let Some(path) = common::cached("templates/google-gemma-2-2b-it.jinja") else {
        return;
    };
    let t = ChatTemplate::new(&std::fs::read_to_string(path).unwrap(), "<bos>", "<eos>").unwrap();
    let err = t.render(&conversations()["system_user"], true).unwrap_err();
    assert!(
        matches!(&err, ChatError::Raised(m) if m == "System role not supported"),
        "{err}"
    );
}

#[test]
fn unsupported_jinja_extensions_are_clear_errors() {
    // HF's {% generation %} tag (assistant-mask tracking) is not Jinja and minijinja lacks it.
    let Some(path) = common::cached("templates/LFM2.5-8B-A1B.jinja") else {
        return;
    };
    let err =
        ChatTemplate::new(&std::fs::read_to_string(path).unwrap(), "<s>", "</s>").unwrap_err();
    assert!(matches!(err, ChatError::Syntax(_)), "{err}");
    assert!(err.to_string().contains("generation"), "{err}");
}
