//! End-to-end speed of the CPU backend on the default model: one decode step (one token, the
//! whole model, logits over the vocabulary) and a 128-token prefill.
//!
//! `cargo bench --bench decode` (the model is found as the tests find it: `M40LLM_TEST_MODEL`,
//! else where `m40-llm fetch` puts it; without it the benchmark says so and measures nothing). Tokens per second are
//! `1 / time per step` for decode and `128 / time` for prefill; docs/perf.md records them.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use m40_llm::backend::device::DeviceChoice;
use m40_llm::runtime::model::{LoadOptions, load};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn model_path() -> Option<PathBuf> {
    let p = std::env::var_os("M40LLM_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // Where `m40-llm fetch` puts it.
            std::env::var_os("M40LLM_MODELS_DIR")
                .filter(|d| !d.is_empty())
                .map_or_else(|| PathBuf::from("models"), PathBuf::from)
                .join("SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    p.exists().then_some(p)
}

fn bench(c: &mut Criterion) {
    let Some(path) = model_path() else {
        eprintln!("SKIPPED: the default model is missing (run `m40-llm fetch`)");
        return;
    };
    let options = LoadOptions {
        device: DeviceChoice::Cpu,
        ctx_size: Some(1024),
        ..LoadOptions::default()
    };
    let mut model = load(&path, &options).expect("load the default model");
    let prompt = model.tokenizer.encode(
        "The history of computing is a story of people, machines and ideas.",
        false,
        false,
    );
    let engine = &mut model.engine;
    let mut group = c.benchmark_group("smollm2-135m-q4_1 cpu");

    // Decode at a context of 64..576 tokens: refill the sequence whenever it reaches 576.
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode step (1 token)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut seq = engine.new_sequence();
            let mut left = iters;
            while left > 0 {
                engine.clear(&mut seq);
                let filler: Vec<u32> = prompt.iter().copied().cycle().take(64).collect();
                engine.prefill(&mut seq, &filler).expect("prefill");
                let n = left.min(512);
                let t = Instant::now();
                for i in 0..n {
                    engine
                        .decode(&mut seq, prompt[i as usize % prompt.len()])
                        .expect("decode");
                }
                total += t.elapsed();
                left -= n;
            }
            engine.release(seq);
            total
        })
    });

    let tokens: Vec<u32> = prompt.iter().copied().cycle().take(128).collect();
    group.throughput(Throughput::Elements(tokens.len() as u64));
    group.bench_function("prefill (128 tokens)", |b| {
        b.iter(|| {
            let mut seq = engine.new_sequence();
            let logits = engine.prefill(&mut seq, &tokens).expect("prefill");
            engine.release(seq);
            logits
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(10));
    targets = bench
}
criterion_main!(benches);
