//! The CPU backend on tiny models of every family: against an independent forward pass, fused
//! against unfused plans value by value, prefill against decode, several sequences in one step
//! against each alone, and the errors a caller can provoke.

mod common;

use common::reference::Reference;
use m40_llm::backend::cpu::CpuBackend;
use m40_llm::backend::target::Target;
use m40_llm::backend::{Backend, BackendError, KvGeometry, PageOp, Step, StepOutputs};
use m40_llm::gguf::{GgmlType, GgufFile};
use m40_llm::lower::TinyModel;
use m40_llm::plan::{PlanOptions, Reuse};
use m40_llm::runtime::engine::{Engine, EngineError, Part, WantLogits};
use m40_llm::{CompileOptions, compile};
use std::sync::Arc;

const TOKENS: [u32; 9] = [1, 5, 7, 3, 99, 0, 42, 42, 17];

/// Cells per KV-cache page in these tests (small, so that steps cross pages).
const PAGE: u32 = 4;

fn backend(
    file: &Arc<GgufFile>,
    fuse: bool,
    reuse: Reuse,
    max_tokens: u64,
    n_cells: u32,
) -> CpuBackend {
    paged_backend(file, fuse, reuse, max_tokens, n_cells, PAGE)
}

fn paged_backend(
    file: &Arc<GgufFile>,
    fuse: bool,
    reuse: Reuse,
    max_tokens: u64,
    n_cells: u32,
    page_size: u32,
) -> CpuBackend {
    let options = CompileOptions {
        plan: PlanOptions {
            max_tokens,
            max_outputs: max_tokens,
            reuse,
            ..PlanOptions::default()
        },
        fuse,
        disabled_passes: Vec::new(),
    };
    let plan = compile(file, &options, &Target::cpu()).unwrap().plan;
    let n_pages = n_cells / page_size;
    let kv = KvGeometry::new(page_size, n_pages, 8, n_pages).unwrap();
    CpuBackend::new(plan, file.clone(), kv).unwrap()
}

/// A fresh backend's slot 0 prefilled with `tokens`, every row's logits returned.
fn all_outputs(tokens: &[u32]) -> Step {
    Step::prefill(tokens, PAGE)
}

fn run(b: &mut CpuBackend, step: &Step) -> Result<StepOutputs, BackendError> {
    let mut out = StepOutputs::new();
    b.step(step, &mut out)?;
    Ok(out)
}

/// Largest |a - b| over the largest |b| of a row (how far off, relative to the row's scale).
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn families() -> Vec<TinyModel> {
    let mut models = Vec::new();
    for base in [TinyModel::llama(), TinyModel::qwen2(), TinyModel::qwen3()] {
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_1] {
            models.push(base.clone().with_weight_type(ty));
        }
    }
    models.push(TinyModel::llama().with_tied_embeddings(true).with_layers(3));
    models
}

#[test]
fn every_family_agrees_with_an_independent_forward_pass() {
    for model in families() {
        let file = Arc::new(model.open().unwrap());
        let expected = Reference::new(model.open().unwrap()).logits(&TOKENS);
        for fuse in [true, false] {
            let mut b = backend(&file, fuse, Reuse::Liveness, 16, 64);
            let logits = run(&mut b, &all_outputs(&TOKENS)).unwrap();
            assert_eq!(logits.len(), TOKENS.len());
            for (t, want) in expected.iter().enumerate() {
                let d = rel_diff(logits.logits(t).unwrap(), want);
                assert!(
                    d < 1e-4,
                    "{} fuse={fuse} token {t}: relative difference {d}",
                    model.label()
                );
            }
        }
    }
}

#[test]
fn fused_and_unfused_plans_agree_value_by_value() {
    for model in [TinyModel::llama(), TinyModel::qwen2(), TinyModel::qwen3()] {
        let model = model.with_weight_type(GgmlType::Q8_0);
        let file = Arc::new(model.open().unwrap());
        let mut fused = backend(&file, true, Reuse::None, 16, 64);
        let mut plain = backend(&file, false, Reuse::None, 16, 64);
        let batch = all_outputs(&TOKENS);
        assert_eq!(
            run(&mut fused, &batch).unwrap(),
            run(&mut plain, &batch).unwrap()
        );
        let mut compared = 0;
        for step in &fused.plan().steps {
            for out in &step.outputs {
                let (Ok(a), Ok(b)) = (fused.read_value(&out.name), plain.read_value(&out.name))
                else {
                    continue;
                };
                assert_eq!(a, b, "{}: value {}", model.label(), out.name);
                compared += 1;
            }
        }
        // Every tensor value of the fused plan exists unfused too (fusion keeps names).
        assert!(
            compared > 10 * model.n_layers as usize,
            "only {compared} values compared"
        );
    }
}

#[test]
fn prefill_and_token_by_token_decode_give_the_same_logits() {
    for model in [
        TinyModel::llama(),
        TinyModel::qwen3().with_weight_type(GgmlType::Q4_1),
    ] {
        let file = Arc::new(model.open().unwrap());
        let mut b = backend(&file, true, Reuse::Liveness, 16, 64);
        let prefill = run(&mut b, &all_outputs(&TOKENS)).unwrap();
        let mut one = backend(&file, true, Reuse::Liveness, 16, 64);
        for (t, _) in TOKENS.iter().enumerate() {
            // Only the newest token runs; earlier ones are in the cache.
            let mut decode = Step::new();
            let t32 = t as u32;
            if t32.is_multiple_of(PAGE) {
                decode.push_op(PageOp::Map {
                    slot: 0,
                    index: t32 / PAGE,
                    page: t32 / PAGE,
                });
            }
            let row = decode.push_token(0, t32, TOKENS[t]);
            decode.push_output(row, m40_llm::backend::OutputKind::Logits);
            let l = run(&mut one, &decode).unwrap();
            assert_eq!(
                l.logits(0),
                prefill.logits(t),
                "{} token {t}",
                model.label()
            );
        }
    }
}

#[test]
fn sequences_sharing_a_step_get_the_logits_they_get_alone() {
    let file = Arc::new(
        TinyModel::qwen2()
            .with_weight_type(GgmlType::Q8_0)
            .open()
            .unwrap(),
    );
    let prompts: [&[u32]; 3] = [&[1, 2, 3, 4, 5], &[9, 8], &[7, 7, 7, 50]];
    let next = [11u32, 12, 13];

    // Each alone: prefill, then one decode step.
    let alone: Vec<(Vec<f32>, Vec<f32>)> = prompts
        .iter()
        .zip(next)
        .map(|(p, n)| {
            let mut e = Engine::new(Box::new(backend(&file, true, Reuse::Liveness, 16, 64)), 32);
            let mut s = e.new_sequence();
            let a = e.prefill(&mut s, p).unwrap();
            let b = e.decode(&mut s, n).unwrap();
            (a, b)
        })
        .collect();

    // Together: one step prefills all three, one step decodes all three.
    let mut e = Engine::new(Box::new(backend(&file, true, Reuse::Liveness, 16, 64)), 32);
    let mut seqs: Vec<_> = (0..3).map(|_| e.new_sequence()).collect();
    let [s0, s1, s2] = &mut seqs[..] else {
        unreachable!()
    };
    let mut parts = [
        Part::new(s0, prompts[0], WantLogits::Last),
        Part::new(s1, prompts[1], WantLogits::Last),
        Part::new(s2, prompts[2], WantLogits::Last),
    ];
    let mut first = StepOutputs::new();
    e.step(&mut parts, &mut first).unwrap();
    let [s0, s1, s2] = &mut seqs[..] else {
        unreachable!()
    };
    let mut parts = [
        Part::new(s0, &next[0..1], WantLogits::Last),
        Part::new(s1, &next[1..2], WantLogits::Last),
        Part::new(s2, &next[2..3], WantLogits::Last),
    ];
    let mut second = StepOutputs::new();
    e.step(&mut parts, &mut second).unwrap();
    for (i, (prefill, decode)) in alone.iter().enumerate() {
        assert_eq!(first.logits(i).unwrap(), prefill, "sequence {i}, prefill");
        assert_eq!(second.logits(i).unwrap(), decode, "sequence {i}, decode");
    }
}

#[test]
fn read_value_says_why_a_value_cannot_be_read() {
    let file = Arc::new(TinyModel::llama().open().unwrap());
    let mut b = backend(&file, true, Reuse::Liveness, 16, 64);
    assert!(matches!(
        b.read_value("blk.0.attn_norm"),
        Err(BackendError::NotComputed(_))
    ));
    run(&mut b, &all_outputs(&TOKENS)).unwrap();
    assert!(matches!(
        b.read_value("no.such.value"),
        Err(BackendError::NoSuchValue(_))
    ));
    // The first norm's buffer is reused by later steps of a reusing plan.
    let err = b.read_value("blk.0.attn_norm").unwrap_err();
    assert!(matches!(err, BackendError::Overwritten { .. }), "{err}");
    assert!(err.to_string().contains("buffer reuse off"), "{err}");
    // Step inputs and the graph output stay readable.
    let ids = b.read_value("token_ids").unwrap();
    assert_eq!(
        ids.iter().copied().collect::<Vec<_>>(),
        TOKENS.iter().map(|&t| t as f32).collect::<Vec<_>>()
    );
    let logits = b.read_value("logits").unwrap();
    assert_eq!(logits.dim(), (TOKENS.len(), 100));

    let mut keep = backend(&file, true, Reuse::None, 16, 64);
    run(&mut keep, &all_outputs(&TOKENS)).unwrap();
    let norm = keep.read_value("blk.0.attn_norm").unwrap();
    assert_eq!(norm.dim(), (TOKENS.len(), 64));
}

#[test]
fn bad_batches_and_full_caches_are_clear_errors_that_lose_nothing() {
    let file = Arc::new(TinyModel::llama().open().unwrap());
    let mut b = backend(&file, true, Reuse::Liveness, 4, 8);
    let too_long = all_outputs(&[1, 2, 3, 4, 5]);
    let err = run(&mut b, &too_long).unwrap_err();
    assert!(err.to_string().contains("at most 4"), "{err}");
    let bad_token = all_outputs(&[1, 100]);
    let err = run(&mut b, &bad_token).unwrap_err();
    assert!(err.to_string().contains("token id"), "{err}");

    // The engine: a context limit, then a cache limit, each refused before anything runs
    // (pages of one cell, so that pages count tokens).
    let one_cell = |max_tokens| paged_backend(&file, true, Reuse::Liveness, max_tokens, 8, 1);
    let mut e = Engine::new(Box::new(one_cell(4)), 6);
    let mut s = e.new_sequence();
    e.prefill(&mut s, &[1, 2, 3, 4, 5]).unwrap();
    let err = e.prefill(&mut s, &[6, 7]).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::ContextFull {
                needed: 7,
                n_ctx: 6
            }
        ),
        "{err}"
    );
    assert_eq!(s.len(), 5, "the sequence keeps what it had");
    let mut other = e.new_sequence();
    let err = e.prefill(&mut other, &[1, 2, 3, 4]).unwrap_err();
    assert!(matches!(err, EngineError::CacheFull { .. }), "{err}");
    // A step the backend refuses returns its cells: after it, the free cells still fit 3 tokens.
    let err = e.prefill(&mut other, &[1, 100]).unwrap_err();
    assert!(matches!(err, EngineError::Backend(_)), "{err}");
    assert!(other.is_empty());
    e.prefill(&mut other, &[1, 2, 3]).unwrap();
    e.release(s);
    e.prefill(&mut other, &[4, 5]).unwrap();

    // A prompt prefilled in several steps is all or nothing: the second step fails, and the
    // sequence and the free cells are as before the call.
    let mut e = Engine::new(Box::new(one_cell(2)), 8);
    let mut s = e.new_sequence();
    e.prefill(&mut s, &[1, 2]).unwrap();
    let err = e.prefill(&mut s, &[3, 4, 5, 100]).unwrap_err();
    assert!(matches!(err, EngineError::Backend(_)), "{err}");
    assert_eq!(s.tokens(), [1, 2]);
    let mut t = e.new_sequence();
    e.prefill(&mut t, &[1, 2, 3, 4, 5, 6]).unwrap();
}
