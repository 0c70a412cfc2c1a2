//! `m40-llm synth` through the binary: real shapes' hyperparameters, every type running on the
//! CPU with finite logits, the Q4_K_M mix, reproducible bytes, clear errors, bounded memory.

mod common;

use common::proc::{Input, Outcome, run};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A folder of its own under the system's temporary folder, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("m40llm-synth-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn m40(args: &[&str]) -> Outcome {
    run(
        Command::new(common::bin()).args(args),
        Input::Null,
        Duration::from_secs(300),
    )
}

/// `synth --shape SHAPE --type TY -o OUT --vocab VOCAB EXTRA...`, which must succeed.
fn synth(shape: &str, ty: &str, out: &Path, vocab: &Path, extra: &[&str]) -> Outcome {
    let mut args = vec![
        "synth",
        "--shape",
        shape,
        "--type",
        ty,
        "-o",
        out.to_str().unwrap(),
        "--vocab",
        vocab.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = m40(&args);
    o.succeeds();
    o
}

fn inspect(path: &Path) -> Value {
    let o = m40(&["inspect", "--json", path.to_str().unwrap()]);
    o.succeeds();
    serde_json::from_slice(&o.stdout).unwrap()
}

fn tensor<'a>(summary: &'a Value, name: &str) -> Option<&'a Value> {
    summary["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
}

fn metadata<'a>(summary: &'a Value, key: &str) -> Option<&'a str> {
    summary["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["key"] == key)
        .and_then(|m| m["preview"].as_str())
}

/// The published hyperparameters (Hugging Face config.json of each model).
struct Published {
    shape: &'static str,
    arch: &'static str,
    embd: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
    ff: u64,
    vocab: u64,
    ctx: u64,
    rope_base: f64,
    eps: f64,
    tied: bool,
}

const PUBLISHED: [Published; 5] = [
    Published {
        shape: "llama3-8b",
        arch: "llama",
        embd: 4096,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        ff: 14336,
        vocab: 128_256,
        ctx: 8192,
        rope_base: 500_000.0,
        eps: 1e-5,
        tied: false,
    },
    Published {
        shape: "llama2-7b",
        arch: "llama",
        embd: 4096,
        heads: 32,
        kv_heads: 32,
        head_dim: 128,
        ff: 11008,
        vocab: 32000,
        ctx: 4096,
        rope_base: 10_000.0,
        eps: 1e-5,
        tied: false,
    },
    Published {
        shape: "qwen2.5-7b",
        arch: "qwen2",
        embd: 3584,
        heads: 28,
        kv_heads: 4,
        head_dim: 128,
        ff: 18944,
        vocab: 152_064,
        ctx: 32768,
        rope_base: 1_000_000.0,
        eps: 1e-6,
        tied: false,
    },
    Published {
        shape: "qwen3-8b",
        arch: "qwen3",
        embd: 4096,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        ff: 12288,
        vocab: 151_936,
        ctx: 40960,
        rope_base: 1_000_000.0,
        eps: 1e-6,
        tied: false,
    },
    Published {
        shape: "smollm2-135m",
        arch: "llama",
        embd: 576,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        ff: 1536,
        vocab: 49152,
        ctx: 8192,
        rope_base: 100_000.0,
        eps: 1e-5,
        tied: true,
    },
];

#[test]
fn every_shape_has_its_published_hyperparameters() {
    let Some(model) = common::default_model() else {
        return;
    };
    // Llama 2's vocabulary (32000) is smaller than the default model's: its own tokenizer.
    let Some(spm) = common::cached("vocab/ggml-vocab-llama-spm.gguf") else {
        return;
    };
    let dir = Scratch::new("shapes");
    for p in &PUBLISHED {
        let out = dir.path(&format!("{}.gguf", p.shape));
        let vocab = if p.shape == "llama2-7b" { &spm } else { &model };
        synth(p.shape, "q4_0", &out, vocab, &["--layers", "1"]);
        let s = inspect(&out);
        let h = &s["hyperparameters"];
        let what = p.shape;
        assert_eq!(s["architecture"], p.arch, "{what}");
        assert_eq!(h["block_count"], 1, "{what}");
        assert_eq!(h["embedding_length"], p.embd, "{what}");
        assert_eq!(h["head_count"], p.heads, "{what}");
        assert_eq!(h["head_count_kv"], p.kv_heads, "{what}");
        assert_eq!(h["head_dim"], p.head_dim, "{what}");
        assert_eq!(h["feed_forward_length"], p.ff, "{what}");
        assert_eq!(h["vocab_size"], p.vocab, "{what}");
        assert_eq!(h["context_length"], p.ctx, "{what}");
        assert_eq!(h["rope_freq_base"].as_f64(), Some(p.rope_base), "{what}");
        let eps = h["rms_norm_eps"].as_f64().unwrap();
        assert!((eps - p.eps).abs() < p.eps * 1e-6, "{what}: {eps}");
        assert_eq!(s["file_type"]["name"], "MOSTLY_Q4_0", "{what}");
        assert_eq!(
            tensor(&s, "token_embd.weight").unwrap()["shape"],
            serde_json::json!([p.embd, p.vocab]),
            "{what}"
        );
        assert_eq!(tensor(&s, "output.weight").is_none(), p.tied, "{what}");
        assert_eq!(
            tensor(&s, "blk.0.attn_k.weight").unwrap()["shape"],
            serde_json::json!([p.embd, p.kv_heads * p.head_dim]),
            "{what}"
        );
        assert_eq!(
            tensor(&s, "blk.0.attn_q.bias").is_some(),
            p.arch == "qwen2",
            "{what}"
        );
        assert_eq!(
            tensor(&s, "blk.0.attn_k_norm.weight").is_some(),
            p.arch == "qwen3",
            "{what}"
        );
        // The token list has the shape's size; padding is said in the metadata.
        assert_eq!(s["tokenizer"]["tokens"], p.vocab, "{what}");
        let padded: u64 = metadata(&s, "m40llm.synth.padded_tokens")
            .unwrap()
            .parse()
            .unwrap();
        let original: u64 = metadata(&s, "m40llm.synth.vocab_tokens")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(padded + original, p.vocab, "{what}");
        std::fs::remove_file(&out).unwrap();
    }
}

/// The top logits of `ids` as `logits` prints them (which must all be finite numbers).
fn top_logits(model: &Path) -> Vec<f64> {
    let o = m40(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--ids",
        "1 2 3",
        "--top-k",
        "0",
    ]);
    o.succeeds();
    let line: Value = serde_json::from_str(o.stdout().lines().last().unwrap()).unwrap();
    line["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| pair[1].as_f64().expect("a finite logit"))
        .collect()
}

#[test]
fn every_type_runs_on_the_cpu_with_finite_logits() {
    let Some(vocab) = common::default_model() else {
        return;
    };
    let dir = Scratch::new("types");
    for ty in ["f16", "q8_0", "q4_0", "q4_k_m"] {
        let out = dir.path(&format!("{ty}.gguf"));
        synth("smollm2-135m", ty, &out, &vocab, &["--layers", "2"]);
        let logits = top_logits(&out);
        assert_eq!(logits.len(), 49152, "{ty}");
        assert!(logits.iter().all(|x| x.is_finite()), "{ty}");
        let spread = logits[0] - logits[logits.len() - 1];
        assert!(spread > 0.1 && spread < 100.0, "{ty}: {spread}");
        let o = m40(&[
            "run",
            "--model",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            "-n",
            "2",
            "--prompt",
            "Hello",
            "--json",
        ]);
        o.succeeds();
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["tokens"].as_array().unwrap().len(), 2, "{ty}");
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn q4_k_m_follows_llama_cpps_mix() {
    let Some(vocab) = common::default_model() else {
        return;
    };
    let dir = Scratch::new("q4km");
    let out = dir.path("q4km.gguf");
    synth("smollm2-135m", "q4_k_m", &out, &vocab, &["--layers", "8"]);
    let s = inspect(&out);
    let ty = |name: &str| {
        tensor(&s, name).unwrap()["type"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(s["file_type"]["name"], "MOSTLY_Q4_K_M");
    // Tied and 576 wide (not whole 256-blocks): the output's Q6_K falls back to Q8_0.
    assert_eq!(ty("token_embd.weight"), "Q8_0");
    // use_more_bits on 8 layers picks 0, 3, 6 and 7.
    for l in 0..8 {
        let more = [0, 3, 6, 7].contains(&l);
        // ffn_down rows are 1536 (whole blocks): Q6_K or Q4_K.
        let down = ty(&format!("blk.{l}.ffn_down.weight"));
        assert_eq!(down, if more { "Q6_K" } else { "Q4_K" }, "layer {l}");
        // attn_v rows are 576: Q6_K falls back to Q8_0, Q4_K to Q5_0.
        let v = ty(&format!("blk.{l}.attn_v.weight"));
        assert_eq!(v, if more { "Q8_0" } else { "Q5_0" }, "layer {l}");
        assert_eq!(ty(&format!("blk.{l}.attn_q.weight")), "Q5_0");
        assert_eq!(ty(&format!("blk.{l}.attn_norm.weight")), "F32");
    }
}

#[test]
fn the_same_seed_writes_the_same_bytes() {
    let Some(vocab) = common::default_model() else {
        return;
    };
    let dir = Scratch::new("seed");
    let (a, b, c) = (dir.path("a.gguf"), dir.path("b.gguf"), dir.path("c.gguf"));
    synth(
        "smollm2-135m",
        "q4_0",
        &a,
        &vocab,
        &["--layers", "1", "--seed", "7"],
    );
    synth(
        "smollm2-135m",
        "q4_0",
        &b,
        &vocab,
        &["--layers", "1", "--seed", "7"],
    );
    synth(
        "smollm2-135m",
        "q4_0",
        &c,
        &vocab,
        &["--layers", "1", "--seed", "8"],
    );
    let (a, b, c) = (
        std::fs::read(a).unwrap(),
        std::fs::read(b).unwrap(),
        std::fs::read(c).unwrap(),
    );
    assert!(a == b, "the same seed wrote different bytes");
    assert_eq!(a.len(), c.len());
    assert!(a != c, "another seed wrote the same bytes");
}

/// A clean failure: a non-zero exit, exactly one `error:` line naming `needle`, no panic.
fn fails_with(o: &Outcome, needle: &str) {
    assert!(!o.timed_out, "timed out: {o:?}");
    assert!(o.code.is_some_and(|c| c != 0), "expected a failure: {o:?}");
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    let errors: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {:?}", o.stderr);
    assert!(
        errors[0].contains(needle),
        "{:?} does not mention {needle:?}",
        errors[0]
    );
}

#[test]
fn bad_arguments_are_clear_errors() {
    let Some(vocab) = common::default_model() else {
        return;
    };
    let vocab = vocab.to_str().unwrap();
    let dir = Scratch::new("errors");
    let out = dir.path("x.gguf");
    let out_s = out.to_str().unwrap();
    let base = ["synth", "--vocab", vocab, "-o", out_s];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        m40(&a)
    };
    fails_with(
        &with(&["--shape", "llama9-1t", "--type", "q4_0"]),
        "invalid value 'llama9-1t' for '--shape",
    );
    fails_with(
        &with(&["--shape", "smollm2-135m", "--type", "q3_k"]),
        "invalid value 'q3_k' for '--type",
    );
    fails_with(
        &with(&["--shape", "smollm2-135m", "--type", "q4_0", "--layers", "0"]),
        "--layers",
    );
    // The default vocabulary (49152 tokens) does not fit Llama 2's 32000.
    fails_with(
        &with(&["--shape", "llama2-7b", "--type", "q4_0", "--layers", "1"]),
        "has 49152 tokens, more than the 32000 of the llama2-7b shape",
    );
    assert!(!out.exists());
    let o = m40(&[
        "synth",
        "--shape",
        "smollm2-135m",
        "--type",
        "q4_0",
        "--layers",
        "1",
        "--vocab",
        vocab,
        "-o",
        "/nonexistent-m40llm-dir/x.gguf",
    ]);
    fails_with(&o, "cannot write /nonexistent-m40llm-dir/x.gguf");
    // A synthetic file is a vocabulary too: writing over it is refused.
    synth(
        "smollm2-135m",
        "q4_0",
        &out,
        Path::new(vocab),
        &["--layers", "1"],
    );
    let before = std::fs::read(&out).unwrap();
    let o = m40(&[
        "synth",
        "--shape",
        "smollm2-135m",
        "--type",
        "q8_0",
        "--layers",
        "1",
        "--vocab",
        out_s,
        "-o",
        out_s,
    ]);
    fails_with(&o, "refusing to write the output over the input");
    assert!(std::fs::read(&out).unwrap() == before, "the input changed");
    // Nothing but the one output is left behind (no temporary files).
    let left: Vec<_> = std::fs::read_dir(&dir.0).unwrap().flatten().collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

#[test]
fn writing_streams_in_bounded_memory() {
    let Some(vocab) = common::default_model() else {
        return;
    };
    let dir = Scratch::new("memory");
    let out = dir.path("smollm2-f16.gguf");
    // The full SmolLM2-135M shape in F16: 30 layers, about 260 MiB.
    let o = synth("smollm2-135m", "f16", &out, &vocab, &[]);
    let file_kib = std::fs::metadata(&out).unwrap().len() / 1024;
    assert!(file_kib > 250 * 1024, "{file_kib} KiB");
    if o.max_rss_kib > 0 {
        assert!(
            o.max_rss_kib < file_kib / 4 && o.max_rss_kib < 96 * 1024,
            "peak RSS {} KiB for a file of {file_kib} KiB",
            o.max_rss_kib
        );
    }
    let s = inspect(&out);
    assert_eq!(s["hyperparameters"]["block_count"], 30);
}

#[cfg(unix)]
#[test]
fn an_interrupted_synth_removes_its_partial_file() {
    let Some(vocab) = common::default_model() else {
        return;
    };
    let dir = Scratch::new("interrupt");
    let out = dir.path("big.gguf");
    // An 8B shape takes far longer than the signal's delay.
    let mut child = Command::new(common::bin())
        .args([
            "synth",
            "--shape",
            "llama3-8b",
            "--type",
            "q4_k_m",
            "--vocab",
            vocab.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the temporary file exists, then interrupt.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(&dir.0).unwrap().next().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no temporary file appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&dir.0).unwrap().flatten().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
