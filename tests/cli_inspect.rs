//! `m40-llm inspect` end to end: the built binary on the default model (text snapshot, JSON),
//! on a vocabulary-only file, and on hostile files, where it must exit non-zero with one
//! `error: ...` line naming the file and no panic.

mod common;

use common::layout::{Layout, put_bytes, put_u32, put_u64};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn inspect(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(common::bin())
        .arg("inspect")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("cannot run m40-llm")
}

fn inspect_path(path: &Path, json: bool) -> Output {
    let mut args = vec![path.as_os_str()];
    if json {
        args.push("--json".as_ref());
    }
    inspect(&args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("m40llm-cli-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The failure contract: non-zero exit, nothing on stdout, exactly one line on stderr that starts
/// with `error: `, names the file and contains `expect`, and no panic.
fn assert_clean_failure(o: &Output, path: &Path, expect: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(o.stdout.is_empty(), "stdout: {}", stdout(o));
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(&path.display().to_string()), "{err}");
    assert!(lines[0].contains(expect), "lacks {expect:?}: {err}");
}

#[test]
fn inspect_the_default_model() {
    let Some(model) = common::default_model() else {
        return;
    };
    let o = inspect_path(&model, false);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for needle in [
        "architecture    llama",
        "272 tensors",
        "block count          30",
        "vocab size           49152",
        "embedding length     576",
        "attention heads      9",
        "kv heads             3",
        "context length  8192",
        "file type       MOSTLY_Q4_1",
        "210 Q4_1",
        "61 F32",
        "1 Q8_0",
        "tokens               49152",
        "token_embd.weight",
    ] {
        assert!(text.contains(needle), "lacks {needle:?}:\n{text}");
    }
    let text = text.replace(&model.display().to_string(), "[model]");
    insta::with_settings!({snapshot_path => "../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!("inspect_default_model", text);
    });
}

#[test]
fn inspect_the_default_model_as_json() {
    let Some(model) = common::default_model() else {
        return;
    };
    let o = inspect_path(&model, true);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("--json must parse");
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["gguf_version"], 3);
    let h = &v["hyperparameters"];
    assert_eq!(h["block_count"], 30);
    assert_eq!(h["vocab_size"], 49152);
    assert_eq!(h["embedding_length"], 576);
    assert_eq!(h["feed_forward_length"], 1536);
    assert_eq!(h["head_count"], 9);
    assert_eq!(h["head_count_kv"], 3);
    assert_eq!(h["head_dim"], 64);
    assert_eq!(h["context_length"], 8192);
    assert_eq!(h["rope_dimension_count"], 64);
    assert_eq!(h["rope_freq_base"], 100000.0);
    assert_eq!(v["file_type"]["name"], "MOSTLY_Q4_1");
    assert_eq!(v["tokenizer"]["model"], "gpt2");
    assert_eq!(v["tokenizer"]["pre"], "smollm");
    assert_eq!(v["tokenizer"]["tokens"], 49152);

    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 272);
    let mut types: Vec<&str> = tensors
        .iter()
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    types.sort_unstable();
    types.dedup();
    assert_eq!(types, ["F32", "Q4_1", "Q8_0"]);
    let embd = &tensors[0];
    assert_eq!(embd["name"], "token_embd.weight");
    assert_eq!(embd["shape"], serde_json::json!([576, 49152]));
    assert_eq!(embd["bytes"], 576 / 32 * 34 * 49152);
    // The totals agree with the table.
    let sum = |field: &str| -> u64 { tensors.iter().map(|t| t[field].as_u64().unwrap()).sum() };
    assert_eq!(v["parameter_count"], sum("elements"));
    assert_eq!(v["tensor_bytes"], sum("bytes"));
    assert_eq!(v["parameter_count"], 134_515_008);
}

#[test]
fn inspect_without_a_path_uses_the_default_model() {
    let Some(model) = common::default_model() else {
        return;
    };
    // Only when the test model is the default model file (so nothing is fetched).
    if model.file_name() != Some(common::DEFAULT_MODEL_FILE.as_ref()) {
        eprintln!("SKIPPED: the test model is not named like the default model");
        return;
    }
    let dir = model.parent().unwrap();
    let o = Command::new(common::bin())
        .arg("inspect")
        .env(common::MODELS_DIR_ENV, dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("272 tensors"));
}

#[test]
fn inspect_a_vocabulary_only_file() {
    let path = common::data("tokenizer/ggml-vocab-llama-spm.gguf");
    let o = inspect_path(&path, false);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("0 tensors"), "{text}");
    assert!(text.contains("tokens               32000"), "{text}");
    insta::with_settings!({snapshot_path => "../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!("inspect_vocab_llama_spm", text);
    });

    for name in ["gpt-2", "qwen2"] {
        let path = common::data(&format!("tokenizer/ggml-vocab-{name}.gguf"));
        let o = inspect_path(&path, true);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(v["tokenizer"]["model"], "gpt2", "{name}");
        assert!(v["tensors"].as_array().unwrap().is_empty());
    }
}

#[test]
fn files_that_are_not_gguf_fail_cleanly() {
    let dir = TempDir::new("notgguf");
    let cases = [
        (dir.file("empty.gguf", b""), "truncated at offset 0"),
        (dir.file("text.gguf", b"hello, world\n"), "not a GGUF file"),
        (
            dir.file("v1.gguf", b"GGUF\x01\x00\x00\x00rest"),
            "unsupported GGUF version 1",
        ),
        (
            // A header claiming 2^64-1 tensors in a 24-byte file.
            dir.file(
                "count.gguf",
                &[b"GGUF\x03\x00\x00\x00".as_slice(), &[0xff; 8], &[0; 8]].concat(),
            ),
            "the tensor count is 18446744073709551615",
        ),
        (dir.0.join("missing.gguf"), "cannot read the file"),
        (dir.0.clone(), "not a regular file"),
    ];
    for (path, expect) in &cases {
        for json in [false, true] {
            let o = inspect_path(path, json);
            assert_clean_failure(&o, path, expect);
        }
    }
}

/// Hostile variants of the real model's header, one per class the reader checks while reading
/// the header, plus model-key classes on the whole file.
#[test]
fn hostile_models_fail_cleanly() {
    let Some(model) = common::default_model() else {
        return;
    };
    let bytes = std::fs::read(&model).unwrap();
    let l = Layout::of(&bytes);
    let header = &bytes[..l.data_start as usize];
    let dir = TempDir::new("hostile");
    let mut cases: Vec<(PathBuf, String)> = Vec::new();
    let mut hostile = |name: &str, expect: &str, patch: &dyn Fn(&mut Vec<u8>)| {
        let mut b = header.to_vec();
        patch(&mut b);
        cases.push((dir.file(name, &b), expect.to_string()));
    };
    let tokens = l.kv("tokenizer.ggml.tokens").array.clone().unwrap();
    let embd = l.tensor("token_embd.weight").clone();
    let down = l.tensor("blk.0.ffn_down.weight").clone();
    let norm = l.tensor("blk.0.attn_norm.weight").clone();
    let block_count = l.kv("llama.block_count").clone();
    let basename = l.kv("general.basename").clone();
    let attn_k = l.tensor("blk.0.attn_k.weight").clone();
    hostile("magic.gguf", "not a GGUF file", &|b| {
        put_bytes(b, 0, b"GGML")
    });
    hostile("version.gguf", "unsupported GGUF version 7", &|b| {
        put_u32(b, 4, 7)
    });
    hostile("n_kv.gguf", "the metadata key count", &|b| {
        put_u64(b, 16, 1 << 60)
    });
    hostile("array.gguf", "tokenizer.ggml.tokens", &|b| {
        put_u64(b, tokens.count_offset, u64::MAX)
    });
    hostile("nested.gguf", "array of arrays", &|b| {
        put_u32(b, tokens.elem_type_offset, 9)
    });
    hostile("dims.gguf", "product of the dimensions overflows", &|b| {
        put_u64(b, embd.dims_offsets[0], 1 << 40);
        put_u64(b, embd.dims_offsets[1], 1 << 40);
    });
    hostile("block.gguf", "32-element blocks", &|b| {
        put_u64(b, down.dims_offsets[0], 1000)
    });
    hostile("type.gguf", "unknown ggml type 99", &|b| {
        put_u32(b, down.type_offset, 99)
    });
    hostile("align.gguf", "power of two", &|b| {
        put_bytes(b, block_count.offset + 8, b"general.alignment");
        put_u32(b, block_count.value_offset, 0);
    });
    hostile("misaligned.gguf", "not a multiple of the alignment", &|b| {
        put_u64(b, norm.data_offset_field, norm.data_offset + 1)
    });
    hostile(
        "dupkey.gguf",
        "\"general.finetune\" appears a second time",
        &|b| put_bytes(b, basename.offset + 8, b"general.finetune"),
    );
    hostile("duptensor.gguf", "appears a second time", &|b| {
        put_bytes(b, attn_k.offset + 8, b"blk.0.attn_q.weight")
    });
    hostile("truncated-kv.gguf", "truncated", &|b| {
        b.truncate(tokens.elements_offset as usize + 5000)
    });
    hostile("truncated-infos.gguf", "truncated", &|b| {
        b.truncate(down.type_offset as usize + 1)
    });
    hostile("truncated-data.gguf", "past the end of the file", &|_| {});
    // Model keys: the whole file, with a key renamed or retyped.
    let mut missing = bytes.clone();
    let ctx = l.kv("llama.context_length");
    missing[ctx.offset as usize + 8 + 6] = b'C';
    cases.push((
        dir.file("missing-key.gguf", &missing),
        "required key \"llama.context_length\" is missing".into(),
    ));
    drop(missing);
    let mut mistyped = bytes.clone();
    put_u32(&mut mistyped, l.kv("llama.embedding_length").type_offset, 6);
    cases.push((
        dir.file("mistyped-key.gguf", &mistyped),
        "\"llama.embedding_length\"".into(),
    ));
    drop(mistyped);

    for (path, expect) in &cases {
        for json in [false, true] {
            let o = inspect_path(path, json);
            assert_clean_failure(&o, path, expect);
        }
    }
}
