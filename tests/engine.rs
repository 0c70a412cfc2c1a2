//! The engine's sequences and pages on a tiny model: dropped handles give their pages back,
//! forks share a prefix's pages (bit-identical logits, pages allocated once), truncation and
//! reservations, and a decode step's descriptor that does not grow with the context.

use m40_llm::backend::cpu::CpuBackend;
use m40_llm::backend::target::Target;
use m40_llm::backend::{KvGeometry, OutputKind, PageOp, StepOutputs};
use m40_llm::gguf::GgmlType;
use m40_llm::lower::TinyModel;
use m40_llm::plan::PlanOptions;
use m40_llm::runtime::engine::{Engine, EngineError, Part, WantLogits};
use m40_llm::{CompileOptions, compile};
use std::sync::Arc;

const PAGE: u32 = 16;

/// An engine over a tiny qwen2 (Q8_0) with `n_pages` pages of 16 cells, 8 slots.
fn engine(n_pages: u32, n_ctx: usize) -> Engine {
    let model = TinyModel::qwen2().with_weight_type(GgmlType::Q8_0);
    let file = Arc::new(model.open().unwrap());
    let options = CompileOptions {
        plan: PlanOptions {
            max_tokens: 64,
            max_outputs: 64,
            ..PlanOptions::default()
        },
        fuse: true,
        disabled_passes: Vec::new(),
    };
    let plan = compile(&file, &options, &Target::cpu()).unwrap().plan;
    let per_slot = (n_ctx as u32).div_ceil(PAGE);
    let kv = KvGeometry::new(PAGE, n_pages, 8, per_slot).unwrap();
    Engine::new(Box::new(CpuBackend::new(plan, file, kv).unwrap()), n_ctx)
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7 + seed * 13) % 97).collect()
}

fn used(e: &Engine) -> usize {
    let s = e.page_stats();
    s.total - s.free
}

#[test]
fn a_dropped_sequence_gives_its_pages_back_at_the_next_call() {
    let mut e = engine(16, 128);
    let mut a = e.new_sequence();
    e.prefill(&mut a, &tokens(40, 1)).unwrap();
    assert_eq!(used(&e), 3);
    drop(a);
    // The next step reclaims the dropped handle's pages (and its slot).
    let mut b = e.new_sequence();
    e.decode(&mut b, 5).unwrap();
    assert_eq!(used(&e), 1, "only b's page is in use");
    assert_eq!(e.backend().page_tables().pages_in_use(), 1);
    e.release(b);
    e.reclaim();
    assert_eq!(used(&e), 0);
    // Every slot comes back too: more sequences than slots, one after another.
    for i in 0..20 {
        let mut s = e.new_sequence();
        e.decode(&mut s, i).unwrap();
    }
    let mut last = e.new_sequence();
    e.decode(&mut last, 1).unwrap();
    assert_eq!(used(&e), 1);
}

#[test]
fn sequences_sharing_a_prefix_get_the_logits_each_gets_alone_and_share_its_pages() {
    let prefix = tokens(100, 3);
    let (sa, sb) = (tokens(20, 5), tokens(20, 9));
    // Each alone, in its own engine.
    let alone = |suffix: &[u32]| {
        let mut e = engine(64, 256);
        let mut s = e.new_sequence();
        let p = e.prefill(&mut s, &prefix).unwrap();
        let l = e.logits_all(&mut s, suffix).unwrap();
        let d = e.decode(&mut s, 11).unwrap();
        (p, l.data, d, used(&e))
    };
    let (pa, la, da, pages_alone) = alone(&sa);
    let (_, lb, db, _) = alone(&sb);
    assert_eq!(pages_alone, 8, "121 tokens in pages of 16");

    let mut e = engine(64, 256);
    let mut a = e.new_sequence();
    let p = e.prefill(&mut a, &prefix).unwrap();
    assert_eq!(p, pa);
    let mut b = e.fork(&a, prefix.len()).unwrap();
    assert_eq!(b.tokens(), &prefix[..]);
    assert_eq!(used(&e), 7, "the fork takes no page");
    assert_eq!(a.pages(), b.pages());
    // Both append: a copies the shared, partly filled 7th page; b then owns the original.
    let l = e.logits_all(&mut a, &sa).unwrap();
    assert_eq!(l.data, la, "a after the fork");
    let l = e.logits_all(&mut b, &sb).unwrap();
    assert_eq!(l.data, lb, "b after the fork");
    assert_eq!(e.decode(&mut a, 11).unwrap(), da);
    assert_eq!(e.decode(&mut b, 11).unwrap(), db);
    assert_eq!(a.pages()[..6], b.pages()[..6], "six full pages stay shared");
    assert_ne!(a.pages()[6], b.pages()[6]);
    // 6 shared + 2 each, against 8 each alone.
    assert_eq!(used(&e), 10);
    e.release(a);
    assert_eq!(used(&e), 8, "b keeps the shared pages");
    e.release(b);
    assert_eq!(used(&e), 0);
}

#[test]
fn a_fork_at_a_page_boundary_copies_nothing_and_a_failed_copy_on_write_loses_nothing() {
    let mut e = engine(32, 256);
    let mut a = e.new_sequence();
    e.prefill(&mut a, &tokens(40, 2)).unwrap();
    let mut b = e.fork(&a, 32).unwrap();
    assert_eq!(used(&e), 3);
    assert_eq!(b.pages(), &a.pages()[..2]);
    let before = e.page_stats();
    // A step that fails (token id 100 is past the vocabulary) after taking a page for b.
    let err = e.prefill(&mut b, &[1, 100]).unwrap_err();
    assert!(matches!(err, EngineError::Backend(_)), "{err}");
    assert_eq!(e.page_stats(), before);
    assert_eq!(b.len(), 32);
    // The backend's tables are as before too (the fork's maps are still to be sent).
    assert_eq!(e.backend().page_tables().pages_in_use(), 3);
    // a writes into its own third page: no copy.
    e.decode(&mut a, 3).unwrap();
    assert_eq!(used(&e), 3);
    // A fork in the middle of a page, then a failed step of the child (the copy it needs is
    // given back), then a good one (the copy happens).
    let mut c = e.fork(&a, 36).unwrap();
    assert!(e.prefill(&mut c, &[100]).is_err());
    assert_eq!(used(&e), 3);
    let fresh = {
        let mut f = engine(32, 256);
        let mut s = f.new_sequence();
        let mut t = tokens(40, 2)[..36].to_vec();
        t.push(9);
        f.prefill(&mut s, &t).unwrap()
    };
    assert_eq!(e.decode(&mut c, 9).unwrap(), fresh);
    assert_eq!(used(&e), 4);
}

#[test]
fn truncate_rolls_a_sequence_back_to_a_position() {
    let mut e = engine(16, 128);
    let mut s = e.new_sequence();
    let t = tokens(50, 4);
    e.prefill(&mut s, &t).unwrap();
    assert_eq!(used(&e), 4);
    e.truncate(&mut s, 20).unwrap();
    assert_eq!((s.len(), used(&e)), (20, 2));
    // Regenerate from position 20: the same logits as a sequence that never held the rest.
    let other = tokens(10, 8);
    let l = e.prefill(&mut s, &other).unwrap();
    let mut f = engine(16, 128);
    let mut fresh = f.new_sequence();
    let mut all = t[..20].to_vec();
    all.extend_from_slice(&other);
    assert_eq!(l, f.prefill(&mut fresh, &all).unwrap());
    // Truncating to nothing keeps the handle usable.
    e.truncate(&mut s, 0).unwrap();
    assert_eq!(used(&e), 0);
    e.decode(&mut s, 1).unwrap();
}

#[test]
fn reserved_pages_are_kept_for_their_sequence_and_a_full_cache_says_how_full() {
    let mut e = engine(8, 128);
    let mut a = e.new_sequence();
    e.prefill(&mut a, &tokens(10, 1)).unwrap();
    // a will generate up to 70 more tokens: 5 pages in all, 4 more.
    e.reserve(&mut a, 70).unwrap();
    assert_eq!(a.reserved_pages(), 4);
    assert_eq!(e.page_stats().reserved, 4);
    let mut b = e.new_sequence();
    let err = e.prefill(&mut b, &tokens(60, 2)).unwrap_err();
    match err {
        EngineError::CacheFull {
            needed,
            free,
            total,
        } => assert_eq!((needed, free, total), (4, 3, 8)),
        other => panic!("{other}"),
    }
    assert!(err_text(&e.reserve(&mut b, 60)).contains("4 more pages needed, 3 free"));
    // a's decode never runs out: its pages were set aside.
    e.prefill(&mut b, &tokens(48, 2)).unwrap();
    assert_eq!(e.page_stats().free, 4);
    for i in 0..70 {
        e.decode(&mut a, i % 97).unwrap();
    }
    assert_eq!(a.reserved_pages(), 0);
    assert_eq!(e.page_stats().free, 0);
    let err = e.reserve(&mut a, 100).unwrap_err();
    assert!(matches!(err, EngineError::ContextFull { .. }), "{err}");
}

fn err_text(r: &Result<(), EngineError>) -> String {
    r.as_ref().err().map(|e| e.to_string()).unwrap_or_default()
}

#[test]
fn a_sequence_of_another_engine_is_refused() {
    let mut e = engine(8, 64);
    let mut f = engine(8, 64);
    let mut s = f.new_sequence();
    f.decode(&mut s, 1).unwrap();
    let err = e.decode(&mut s, 2).unwrap_err();
    assert!(matches!(err, EngineError::ForeignSequence), "{err}");
    assert!(matches!(e.fork(&s, 1), Err(EngineError::ForeignSequence)));
    // Released into the wrong engine, it goes back to its own.
    e.release(s);
    f.reclaim();
    assert_eq!(used(&f), 0);
}

#[test]
fn a_decode_step_carries_one_token_and_at_most_one_op_at_any_context() {
    for n_ctx in [17usize, 1000] {
        let mut e = engine(64, 1024);
        let mut s = e.new_sequence();
        e.prefill(&mut s, &tokens(n_ctx - 1, 1)).unwrap();
        for _ in 0..PAGE {
            e.decode(&mut s, 5).unwrap();
            let step = e.last_step();
            assert_eq!(step.n_tokens(), 1);
            assert!(step.ops.len() <= 1, "{:?}", step.ops);
            assert!(
                step.ops
                    .iter()
                    .all(|op| matches!(op, PageOp::Map { index, .. } if *index as usize == (s.len() - 1) / PAGE as usize))
            );
        }
    }
}

#[test]
fn several_sequences_step_together_with_argmax_rows() {
    let mut e = engine(32, 128);
    let mut a = e.new_sequence();
    let mut b = e.new_sequence();
    let (ta, tb) = (tokens(20, 1), tokens(5, 2));
    let want_a = {
        let mut f = engine(32, 128);
        let mut s = f.new_sequence();
        f.prefill(&mut s, &ta).unwrap()
    };
    let mut out = StepOutputs::new();
    let mut parts = [
        Part::new(&mut a, &ta, WantLogits::Last).with_kind(OutputKind::Argmax),
        Part::new(&mut b, &tb, WantLogits::All).with_kind(OutputKind::TopK(3)),
    ];
    e.step(&mut parts, &mut out).unwrap();
    assert_eq!(out.len(), 1 + 5);
    let best = out.argmax(0).unwrap();
    assert_eq!(Some(best), m40_llm::backend::step::argmax(&want_a));
    assert!(out.logits(0).is_none(), "no full row was copied");
    assert!(out.all_logits().is_empty());
}
