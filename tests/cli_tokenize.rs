//! `m40-llm tokenize` on vocabulary-only GGUFs: output formats, flags and clear errors.

mod common;

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(common::bin())
        .arg("tokenize")
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn qwen2() -> String {
    common::data("tokenizer/ggml-vocab-qwen2.gguf")
        .display()
        .to_string()
}

#[test]
fn prints_ids_on_one_line() {
    let out = stdout(&run(&[
        "--model",
        &qwen2(),
        "--text",
        "Hello world<|im_end|>",
    ]));
    // Without --special the control token's text is plain text.
    assert_eq!(out, "9707 1879 27 91 318 6213 91 29\n");
    let out = stdout(&run(&[
        "--model",
        &qwen2(),
        "--text",
        "Hello world<|im_end|>",
        "--special",
    ]));
    assert_eq!(out, "9707 1879 151645\n");
}

#[test]
fn add_bos_and_files() {
    let spm = common::data("tokenizer/ggml-vocab-llama-spm.gguf")
        .display()
        .to_string();
    assert_eq!(
        stdout(&run(&["--model", &spm, "--text", "Hello", "--add-bos"])),
        "1 15043\n"
    );
    assert_eq!(
        stdout(&run(&["--model", &spm, "--text", "Hello"])),
        "15043\n"
    );
    let path = std::env::temp_dir().join(format!("m40-tokenize-{}.txt", std::process::id()));
    std::fs::write(&path, "Hello").unwrap();
    let out = stdout(&run(&["--model", &spm, "--file", path.to_str().unwrap()]));
    std::fs::remove_file(&path).unwrap();
    assert_eq!(out, "15043\n");
}

#[test]
fn json_has_pieces() {
    let gpt2 = common::data("tokenizer/ggml-vocab-gpt-2.gguf")
        .display()
        .to_string();
    let out = stdout(&run(&["--model", &gpt2, "--text", "Hi 🦙", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ids"], serde_json::json!([17250, 12520, 99, 247]));
    assert_eq!(v["n_tokens"], 4);
    let t = v["tokens"].as_array().unwrap();
    assert_eq!(t[0]["piece"], "Hi");
    assert!(t[0].get("piece_hex").is_none());
    // GPT-2 splits the llama's four bytes over three tokens: their exact bytes are given.
    let hex: Vec<&str> = t[1..]
        .iter()
        .map(|t| t["piece_hex"].as_str().unwrap())
        .collect();
    assert_eq!(hex, ["20f09f", "a6", "99"]);
}

#[test]
fn bad_input_is_a_clear_error() {
    for (args, expect) in [
        (
            vec!["--model", "no/such.gguf", "--text", "x"],
            "no/such.gguf",
        ),
        (
            vec!["--model", "Cargo.toml", "--text", "x"],
            "not a GGUF file",
        ),
        (
            vec!["--model", "tests/data/tokenizer/ggml-vocab-gpt-2.gguf"],
            "--text",
        ),
        (
            vec![
                "--model",
                "tests/data/tokenizer/ggml-vocab-gpt-2.gguf",
                "--text",
                "x",
                "--file",
                "y",
            ],
            "cannot be used with",
        ),
        (
            vec![
                "--model",
                "tests/data/tokenizer/ggml-vocab-gpt-2.gguf",
                "--file",
                "no/such.txt",
            ],
            "cannot read no/such.txt",
        ),
    ] {
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}
