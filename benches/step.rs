//! Preparing and validating a decode step: the engine's side (pages, the step descriptor) and
//! the backend's (`PageTables::stage`, then rollback), without the model's compute, for 1, 8 and
//! 64 sequences at 512 and 4096 tokens of context (issue 9's goal: under 50 µs for 64 sequences
//! at 4096, flat in context).
//!
//! `cargo bench --bench step`. The sequences are a tiny model's (the cost measured does not
//! depend on the model): one is prefilled to the context, the others fork it (sharing its
//! pages), and one real decode step gives each its own last page; then each iteration is
//! `Engine::validate_step` of one more decode token per sequence. docs/perf.md records the
//! numbers, next to what the old `Batch::validate` cost at the same sizes.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use m40_llm::backend::cpu::CpuBackend;
use m40_llm::backend::target::Target;
use m40_llm::backend::{KvGeometry, OutputKind, StepOutputs};
use m40_llm::lower::TinyModel;
use m40_llm::plan::PlanOptions;
use m40_llm::runtime::engine::{Engine, Part, WantLogits};
use m40_llm::{CompileOptions, compile};
use std::sync::Arc;
use std::time::Duration;

fn engine(n_seqs: u32, ctx: u32) -> Engine {
    let file = Arc::new(TinyModel::llama().open().expect("tiny model"));
    let options = CompileOptions {
        plan: PlanOptions {
            max_tokens: 64,
            max_outputs: 64,
            ..PlanOptions::default()
        },
        fuse: true,
        disabled_passes: Vec::new(),
    };
    let plan = compile(&file, &options, &Target::cpu())
        .expect("compile")
        .plan;
    let per_seq = ctx / 16 + 2;
    let kv = KvGeometry::new(16, n_seqs * per_seq, n_seqs, per_seq).expect("geometry");
    let backend = CpuBackend::new(plan, file, kv).expect("backend");
    Engine::new(Box::new(backend), (per_seq * 16) as usize)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode step: prepare + validate");
    for ctx in [512u32, 4096] {
        for n in [1u32, 8, 64] {
            let mut e = engine(n, ctx);
            let mut first = e.new_sequence();
            let prompt: Vec<u32> = (0..ctx).map(|i| i % 97).collect();
            e.prefill(&mut first, &prompt).expect("prefill");
            let mut seqs = vec![first];
            for _ in 1..n {
                let child = e.fork(&seqs[0], ctx as usize).expect("fork");
                seqs.push(child);
            }
            let token = [7u32];
            let mut out = StepOutputs::new();
            let mut parts: Vec<Part> = seqs
                .iter_mut()
                .map(|s| Part::new(s, &token, WantLogits::Last).with_kind(OutputKind::Argmax))
                .collect();
            e.step(&mut parts, &mut out).expect("decode");
            group.bench_with_input(BenchmarkId::new(format!("{n} seqs"), ctx), &ctx, |b, _| {
                b.iter(|| e.validate_step(&mut parts).expect("valid"))
            });
            let step = e.last_step();
            assert_eq!(step.n_tokens(), n as usize);
            assert!(step.ops.is_empty(), "{:?}", step.ops);
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
