//! Sampler cost per token on a SmolLM2-sized vocabulary (49152 logits), for each chain shape
//! that matters: greedy, the llama.cpp default chain, and the full-vocabulary paths (top-k off).
//!
//! `cargo bench --bench sample`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use m40_llm::sample::{Sampler, SamplerConfig};
use std::hint::black_box;

const VOCAB: usize = 49152;

/// Logits shaped like a language model's: a broad bulk around 0 and a few strong candidates.
/// Generated from a fixed xorshift so every run benches the same input.
fn logits() -> Vec<f32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 // [0, 1)
    };
    (0..VOCAB)
        .map(|i| {
            let bulk = (next() + next() + next() - 1.5) * 4.0;
            if i % 4099 == 7 { bulk + 12.0 } else { bulk }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let logits = logits();
    let history: Vec<u32> = (0..256u32).map(|i| (i * 193) % VOCAB as u32).collect();
    let default = SamplerConfig {
        seed: Some(1),
        ..SamplerConfig::default()
    };
    let configs = [
        ("greedy", SamplerConfig::greedy()),
        ("default", default.clone()),
        (
            "default+penalties",
            SamplerConfig {
                repeat_penalty: 1.1,
                frequency_penalty: 0.1,
                presence_penalty: 0.1,
                ..default.clone()
            },
        ),
        (
            "top_p_only",
            SamplerConfig {
                top_k: 0,
                min_p: 0.0,
                ..default.clone()
            },
        ),
        (
            "temperature_only",
            SamplerConfig {
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                ..default.clone()
            },
        ),
    ];
    let mut group = c.benchmark_group("sample_49152");
    for (name, config) in configs {
        let mut sampler = Sampler::new(config).expect("valid config");
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                sampler
                    .sample(black_box(&logits), black_box(&history))
                    .expect("logits are finite")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
