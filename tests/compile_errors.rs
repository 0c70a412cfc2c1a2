//! The compiler's error paths: every broken model or argument fails with a message that names
//! the key, tensor, pass or option at fault, and the CLI prints it as one line.

mod common;

use m40_llm::backend::target::Target;
use m40_llm::gguf::{GgmlType, GgufFile, GgufWriter};
use m40_llm::lower::{LowerError, TinyModel, TinyTensor, lower};
use m40_llm::plan::PlanOptions;
use m40_llm::{CompileError, CompileOptions, compile};
use std::path::PathBuf;
use std::process::Command;

/// A tiny llama with `edit` applied to its tensors, opened from memory.
fn llama_with(edit: impl FnOnce(&mut Vec<TinyTensor>)) -> GgufFile {
    let model = TinyModel::llama();
    let mut tensors = model.tensors().unwrap();
    edit(&mut tensors);
    let writer = tensors.into_iter().fold(model.metadata(), |w, t| {
        w.tensor(t.name, t.ty, &t.ne, t.data)
    });
    GgufFile::from_bytes("tiny/edited.gguf", writer.to_bytes()).unwrap()
}

/// A tiny llama with one metadata key set.
fn llama_with_key(key: &str, value: m40_llm::gguf::Value) -> GgufFile {
    let bytes = TinyModel::llama()
        .to_writer()
        .unwrap()
        .kv(key, value)
        .to_bytes();
    GgufFile::from_bytes("tiny/edited.gguf", bytes).unwrap()
}

fn lower_err(file: &GgufFile) -> String {
    lower(file).expect_err("lowering should fail").to_string()
}

#[test]
fn unsupported_architecture_names_it_and_the_supported_ones() {
    let file = llama_with_key(
        "general.architecture",
        m40_llm::gguf::Value::String("gpt2".into()),
    );
    assert_eq!(
        lower_err(&file),
        "tiny/edited.gguf: architecture `gpt2` is not supported (supported: llama, qwen2, qwen3)"
    );
}

#[test]
fn a_file_without_architecture_is_not_a_model() {
    let file = GgufFile::from_bytes("x.gguf", GgufWriter::new().to_bytes()).unwrap();
    assert!(matches!(
        lower(&file),
        Err(LowerError::NoArchitecture { .. })
    ));
}

#[test]
fn a_missing_tensor_is_named_with_its_role() {
    let file = llama_with(|t| t.retain(|t| t.name != "blk.1.ffn_up.weight"));
    assert_eq!(
        lower_err(&file),
        "tiny/edited.gguf: missing tensor `blk.1.ffn_up.weight` (ffn_up of the llama family)"
    );
}

#[test]
fn qwen3_without_head_norms_is_rejected() {
    let model = TinyModel {
        qk_norm: false,
        ..TinyModel::qwen3()
    };
    let err = lower_err(&model.open().unwrap());
    assert!(
        err.contains("missing tensor `blk.0.attn_q_norm.weight` (attn_q_norm of the qwen3 family)"),
        "{err}"
    );
}

#[test]
fn a_misshapen_tensor_names_expected_and_found_shapes() {
    // The file says 4 KV heads; attn_k holds 2 heads of 16.
    let file = llama_with_key(
        "llama.attention.head_count_kv",
        m40_llm::gguf::Value::U32(4),
    );
    assert_eq!(
        lower_err(&file),
        "tiny/edited.gguf: tensor `blk.0.attn_k.weight` (attn_k) has shape [64, 32], expected [64, 64] (ggml order, ne[0] first)"
    );
}

#[test]
fn a_quantized_norm_weight_is_rejected() {
    let file = llama_with(|t| {
        let norm = t
            .iter_mut()
            .find(|t| t.name == "output_norm.weight")
            .unwrap();
        *norm = norm.converted(GgmlType::F16).unwrap();
    });
    assert_eq!(
        lower_err(&file),
        "tiny/edited.gguf: tensor `output_norm.weight` (output_norm) is F16, expected F32"
    );
}

#[test]
fn tensors_no_role_uses_are_an_error_not_silently_ignored() {
    let file = llama_with(|t| t.push(TinyTensor::f32("blk.0.ffn_down.bias", &[64], &[0.0; 64])));
    assert_eq!(
        lower_err(&file),
        "tiny/edited.gguf: 1 tensor(s) are not used by the llama family, e.g. `blk.0.ffn_down.bias`: the model has parts m40-llm does not support"
    );
}

#[test]
fn inconsistent_hyperparameters_are_named() {
    use m40_llm::gguf::Value;
    let cases = [
        (
            "llama.attention.head_count_kv",
            Value::U32(3),
            "llama.attention.head_count_kv = 3: must divide attention.head_count = 4",
        ),
        (
            "llama.block_count",
            Value::U32(0),
            "llama.block_count = 0: must be between 1 and 4294967295",
        ),
        (
            "llama.rope.dimension_count",
            Value::U32(15),
            "llama.rope.dimension_count = 15: must be even and at most the head size 16",
        ),
        (
            "llama.rope.scaling.type",
            Value::String("yarn".into()),
            "llama.rope.scaling.type = yarn: is not supported (m40-llm supports none and linear)",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(-1.0),
            "llama.attention.layer_norm_rms_epsilon = -1: must be a positive number",
        ),
    ];
    for (key, value, message) in cases {
        let err = lower_err(&llama_with_key(key, value));
        assert_eq!(err, format!("tiny/edited.gguf: {message}"), "{key}");
    }
}

#[test]
fn a_mistyped_key_is_an_error() {
    let err = lower_err(&llama_with_key(
        "llama.embedding_length",
        m40_llm::gguf::Value::String("64".into()),
    ));
    assert!(err.contains("llama.embedding_length"), "{err}");
}

#[test]
fn bad_options_are_rejected_before_lowering() {
    let file = TinyModel::llama().open().unwrap();
    let options = CompileOptions {
        disabled_passes: vec!["qkv-merge".into(), "fuse-all".into()],
        fuse: false,
        ..CompileOptions::default()
    };
    let err = compile(&file, &options, &Target::cpu()).err().unwrap();
    assert!(matches!(err, CompileError::Pass(_)), "{err}");
    assert!(err.to_string().contains("unknown pass `fuse-all`"), "{err}");
    let options = CompileOptions {
        plan: PlanOptions {
            max_tokens: 4,
            max_outputs: 5,
            ..PlanOptions::default()
        },
        ..CompileOptions::default()
    };
    let err = compile(&file, &options, &Target::cpu())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        err,
        "invalid plan options: max_outputs must be between 1 and max_tokens (4), is 5"
    );
}

/// A file under the system's temp folder, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, bytes: &[u8]) -> TempFile {
        let path = std::env::temp_dir().join(format!("m40llm-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `m40-llm compile ARGS`, returning (success, stdout, stderr).
fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::bin())
        .arg("compile")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_reports_each_bad_input_in_one_line() {
    let model = TempFile::new("errors-llama.gguf", &TinyModel::llama().to_bytes().unwrap());
    let path = model.0.to_str().unwrap();
    let gpt2 = TinyModel::llama()
        .to_writer()
        .unwrap()
        .kv_str("general.architecture", "gpt2")
        .to_bytes();
    let gpt2 = TempFile::new("errors-gpt2.gguf", &gpt2);
    let not_gguf = TempFile::new("errors-text.gguf", b"hello");
    let cases: [(&[&str], &str); 6] = [
        (
            &[path, "--disable-pass", "nope"],
            "error: unknown pass `nope` (the passes are: swiglu, gate-up-merge, qkv-merge, add-rmsnorm, rope-kv-write, rope-qkv-write)\n",
        ),
        (
            &[path, "--max-tokens", "8", "--max-outputs", "9"],
            "error: invalid plan options: max_outputs must be between 1 and max_tokens (8), is 9\n",
        ),
        (
            &[gpt2.0.to_str().unwrap()],
            "architecture `gpt2` is not supported (supported: llama, qwen2, qwen3)\n",
        ),
        (&[not_gguf.0.to_str().unwrap()], "not a GGUF file"),
        (
            &["/no/such/model.gguf"],
            "error: /no/such/model.gguf: cannot read the file",
        ),
        (
            &[path, "--dump-graph", "-o", "/no/such/dir/plan.json"],
            "error: writing the plan to /no/such/dir/plan.json",
        ),
    ];
    for (args, expected) in cases {
        let (ok, _, stderr) = cli(args);
        assert!(!ok, "{args:?} should fail");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: one line, got {stderr}"
        );
    }
    // Argument errors come from clap, with usage.
    for args in [
        &[path, "--max-tokens", "0"][..],
        &[path, "--format", "svg", "--dump-graph"],
        &[path, "--format", "dot"],
    ] {
        let (ok, _, stderr) = cli(args);
        assert!(!ok && stderr.starts_with("error:"), "{args:?}: {stderr}");
    }
}

/// A plan read from a file is untrusted: `Plan::from_json` rejects one whose operands or
/// buffers a backend could not safely use.
#[test]
fn a_tampered_plan_is_rejected_on_load() {
    use m40_llm::ir::Op;
    use m40_llm::plan::{Operand, Plan, ValueRef};
    let file = TinyModel::llama().open().unwrap();
    let plan = compile(&file, &CompileOptions::default(), &Target::cpu())
        .unwrap()
        .plan;
    assert_eq!(Plan::from_json(&plan.to_json()).unwrap(), plan);

    let rejects = |edit: &dyn Fn(&mut Plan), expected: &str| {
        let mut bad = plan.clone();
        edit(&mut bad);
        let err = Plan::from_json(&bad.to_json())
            .map(|_| ())
            .expect_err(expected)
            .to_string();
        assert!(err.contains(expected), "expected {expected:?} in {err}");
    };
    rejects(&|p| p.format = 99, "format 99");
    rejects(
        &|p| p.steps[3].inputs[1] = Operand::Value(ValueRef { step: 7, port: 0 }),
        "not available",
    );
    rejects(
        &|p| p.steps[3].inputs[0] = Operand::Weight(9999),
        "not available",
    );
    rejects(
        &|p| {
            // Give the embedding's output the range of the token ids it reads.
            let ids = p.steps[0].outputs[0].buffer.unwrap();
            let out = p.steps[3].outputs[0].buffer.as_mut().unwrap();
            out.offset = ids.offset;
        },
        "overlap",
    );
    rejects(
        &|p| p.steps[4].outputs[0].buffer.as_mut().unwrap().bytes += 4,
        "needs",
    );
    rejects(
        &|p| p.steps[3].outputs[0].last_use = 3,
        "after its last use",
    );
    rejects(
        &|p| {
            // An attention whose head count does not match its q: a backend would index past it.
            let attn = p
                .steps
                .iter_mut()
                .find(|s| s.op.name() == "attention")
                .unwrap();
            if let Op::Attention(a) = &mut attn.op {
                a.n_heads = 8;
                a.n_kv_heads = 2;
            }
        },
        "input `q`",
    );
    rejects(
        &|p| p.steps[5].outputs[1].ty = p.steps[4].outputs[0].ty.clone(),
        "output types",
    );
    rejects(&|p| p.kv_cache.truncate(1), "kv_cache does not list");
    assert!(Plan::from_json("{\"format\": 1}").is_err());
}
