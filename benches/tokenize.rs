//! Tokenizing 1 MB of mixed text (English prose, code, many scripts, emoji, chat markup) with
//! the committed vocabularies and, when present, the default model; and decoding it back.
//!
//!     cargo bench --bench tokenize
//!
//! The text is built from the repository's own test data and sources, so it is the same on
//! every machine with the same checkout.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use m40_llm::gguf::GgufFile;
use m40_llm::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

const SIZE: usize = 1 << 20;

/// 1 MiB of text: the test strings, chat renders and Rust sources of the repository, repeated.
fn corpus() -> String {
    let mut parts = Vec::new();
    for f in [
        "tests/data/tokenizer/ggml-vocab-gpt-2.gguf.inp",
        "tests/data/smollm2/tokenize.json",
        "tests/data/chat/expected.json",
    ] {
        parts.push(std::fs::read_to_string(f).unwrap_or_default());
    }
    let mut sources: Vec<PathBuf> = Vec::new();
    collect_rs(Path::new("src"), &mut sources);
    sources.sort();
    for f in sources {
        parts.push(std::fs::read_to_string(f).unwrap_or_default());
    }
    let base = parts.concat();
    assert!(!base.is_empty(), "run from the repository root");
    let mut text = String::with_capacity(SIZE + base.len());
    while text.len() < SIZE {
        text.push_str(&base);
    }
    let mut end = SIZE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_rs(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn bench(c: &mut Criterion) {
    let text = corpus();
    let mut vocabs = vec![
        (
            "gpt-2",
            PathBuf::from("tests/data/tokenizer/ggml-vocab-gpt-2.gguf"),
        ),
        (
            "qwen2",
            PathBuf::from("tests/data/tokenizer/ggml-vocab-qwen2.gguf"),
        ),
        (
            "llama-spm",
            PathBuf::from("tests/data/tokenizer/ggml-vocab-llama-spm.gguf"),
        ),
    ];
    let smollm2 = std::env::var_os("M40LLM_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // Where `m40-llm fetch` puts it.
            std::env::var_os("M40LLM_MODELS_DIR")
                .filter(|d| !d.is_empty())
                .map_or_else(|| PathBuf::from("models"), PathBuf::from)
                .join("SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if smollm2.exists() {
        vocabs.insert(0, ("smollm2", smollm2));
    } else {
        eprintln!("the default model is missing: benchmarking the committed vocabularies only");
    }
    let mut g = c.benchmark_group("tokenize_1MiB");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(text.len() as u64));
    for (name, path) in &vocabs {
        let tok = Tokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap();
        g.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| tok.encode(std::hint::black_box(&text), false, true))
        });
        let ids = tok.encode(&text, false, true);
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| tok.decode(std::hint::black_box(&ids), true).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
