//! Compiling for a target: the capability check (a weight type or op a target lacks is a compile
//! error naming the step, the op and the type, or a fused op is unfused), the target's
//! alignment and passes in the plan, the fit report, and the device choice.

mod common;

use m40_llm::backend::Backend;
use m40_llm::backend::cpu::CpuBackend;
use m40_llm::backend::device::{DeviceChoice, PassedOver, candidate_targets};
use m40_llm::backend::fit::{FitError, FitReport, KV_PAGE_CELLS, Part};
use m40_llm::backend::target::{Target, TargetKind};
use m40_llm::backend::{KvGeometry, Step, StepOutputs};
use m40_llm::gguf::{GgmlType, GgufFile};
use m40_llm::ir::Op;
use m40_llm::lower::{TinyModel, TinyTensor};
use m40_llm::{CompileError, CompileOptions, compile};
use std::sync::Arc;

/// A tiny llama whose `tensor` is stored as `ty` (random bytes: it is never executed).
fn llama_with_type(tensor: &str, ty: GgmlType) -> GgufFile {
    let model = TinyModel::llama32();
    let mut tensors = model.tensors().unwrap();
    let t: &mut TinyTensor = tensors.iter_mut().find(|t| t.name == tensor).unwrap();
    let rows: u64 = t.ne[1..].iter().product();
    let bytes = ty.row_bytes(t.ne[0]).unwrap() * rows;
    t.ty = ty;
    t.data = (0..bytes).map(|i| (i * 37 % 251) as u8).collect();
    let writer = tensors.into_iter().fold(model.metadata(), |w, t| {
        w.tensor(t.name, t.ty, &t.ne, t.data)
    });
    GgufFile::from_bytes("tiny/typed.gguf", writer.to_bytes()).unwrap()
}

/// Heads the CUDA attention kernels do not tile (16 wide) are a compile error for CUDA that
/// says what the kernels need, not a failure at the first step.
#[test]
fn cuda_refuses_attention_heads_that_are_not_a_multiple_of_32() {
    let file = TinyModel::llama().open().unwrap();
    let err = compile(
        &file,
        &CompileOptions::default(),
        &Target::parse("cuda:sm_52").unwrap(),
    )
    .err()
    .unwrap();
    let CompileError::Unsupported(u) = &err else {
        panic!("expected Unsupported, got {err}");
    };
    assert_eq!(u.op, "attention");
    assert!(
        u.reason.contains("multiple of 32") && u.reason.contains("16"),
        "{err}"
    );
    assert!(compile(&file, &CompileOptions::default(), &Target::cpu()).is_ok());
    let wide = TinyModel::llama32().open().unwrap();
    assert!(
        compile(
            &wide,
            &CompileOptions::default(),
            &Target::parse("cuda:sm_52").unwrap()
        )
        .is_ok()
    );
}

/// The missing capability check: today a plan with a weight type no kernel reads compiles, and
/// fails only when a backend loads it. Now it is a compile error naming step, op and type.
#[test]
fn a_weight_type_the_target_lacks_is_a_compile_error_naming_step_op_and_type() {
    let file = llama_with_type("blk.1.ffn_down.weight", GgmlType::IQ4_NL);
    for target in [Target::cpu(), Target::parse("cuda:sm_52").unwrap()] {
        let err = compile(&file, &CompileOptions::default(), &target)
            .err()
            .unwrap();
        let CompileError::Unsupported(u) = &err else {
            panic!("{target}: expected Unsupported, got {err}");
        };
        assert_eq!(u.step, "blk.1.ffn_down");
        assert_eq!(u.op, "matmul");
        assert_eq!(u.ty, Some(GgmlType::IQ4_NL));
        assert_eq!(u.target, target.name);
        let msg = err.to_string();
        for part in ["blk.1.ffn_down", "matmul", "IQ4_NL", &target.name, "Q4_K"] {
            assert!(msg.contains(part), "`{part}` missing from: {msg}");
        }
    }
    // A target that reads the type accepts the same file.
    let mut lenient = Target::cpu();
    lenient.matrix_types.push(GgmlType::IQ4_NL);
    assert!(compile(&file, &CompileOptions::default(), &lenient).is_ok());
}

#[test]
fn a_weight_type_one_target_lacks_is_accepted_by_another() {
    let file = TinyModel::qwen3()
        .with_weight_type(GgmlType::Q4_1)
        .open()
        .unwrap();
    let mut no_q4_1 = Target::parse("cuda:sm_90").unwrap();
    no_q4_1.matrix_types.retain(|&t| t != GgmlType::Q4_1);
    let err = compile(&file, &CompileOptions::default(), &no_q4_1)
        .err()
        .unwrap();
    let CompileError::Unsupported(u) = err else {
        panic!("expected Unsupported");
    };
    assert_eq!(u.ty, Some(GgmlType::Q4_1));
    // The first matrix in execution order is the embedding table.
    assert_eq!((u.step.as_str(), u.op.as_str()), ("inp_embd", "embedding"));
    assert!(compile(&file, &CompileOptions::default(), &Target::cpu()).is_ok());
}

fn no_gate_up(op: &Op) -> bool {
    !matches!(op, Op::GateUpSwiGlu)
}

fn no_swiglu_kernels(op: &Op) -> bool {
    !matches!(op, Op::GateUpSwiGlu | Op::SwiGlu)
}

#[test]
fn a_fused_op_the_target_lacks_is_unfused_and_still_agrees() {
    let file = Arc::new(TinyModel::llama().open().unwrap());
    let options = CompileOptions::default();
    let fused = compile(&file, &options, &Target::cpu()).unwrap();
    assert!(fused.unfused.is_empty());

    for executes in [no_gate_up as fn(&Op) -> bool, no_swiglu_kernels] {
        let target = Target {
            executes,
            ..Target::cpu()
        };
        let compiled = compile(&file, &options, &target).unwrap();
        let ops: Vec<&str> = compiled.plan.steps.iter().map(|s| s.op.name()).collect();
        assert!(!ops.contains(&"gate_up_swiglu") && !ops.contains(&"swiglu"));
        // The other fusions stay.
        assert!(ops.contains(&"multi_matmul") && ops.contains(&"add_rms_norm"));
        assert_eq!(compiled.unfused, ["blk.0.ffn_swiglu", "blk.1.ffn_swiglu"]);
        let last = compiled.plan.fusion.passes.last().unwrap();
        assert_eq!((last.pass.as_str(), last.rewrites), ("unfuse", 2));
        assert!(target.check_plan(&compiled.plan).is_ok());
        assert!(Target::cpu().check_plan(&compiled.plan).is_ok());
        // The unfused plan computes what the fused one does.
        let logits = |plan| {
            let kv = KvGeometry::new(16, 2, 1, 2).unwrap();
            let mut b = CpuBackend::new(plan, file.clone(), kv).unwrap();
            // The logits of the last token.
            let mut step = Step::prefill(&[1, 5, 9, 3], 16);
            step.outputs.retain(|o| o.row == 3);
            let mut out = StepOutputs::new();
            b.step(&step, &mut out).unwrap();
            out.all_logits().to_vec()
        };
        let (a, b) = (logits(fused.plan.clone()), logits(compiled.plan));
        let max = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(max < 1e-4, "fused and unfused logits differ by {max}");
    }

    // A fused op the target lacks is refused by the plan check of a target that lacks it.
    let target = Target {
        executes: no_gate_up,
        ..Target::cpu()
    };
    let err = target.check_plan(&fused.plan).unwrap_err();
    assert_eq!(err.op, "gate_up_swiglu");
    assert_eq!(err.ty, None);
}

fn no_attention(op: &Op) -> bool {
    !matches!(op, Op::Attention(_))
}

#[test]
fn a_primitive_op_the_target_lacks_is_a_compile_error() {
    let file = TinyModel::llama().open().unwrap();
    let target = Target {
        executes: no_attention,
        ..Target::cpu()
    };
    let err = compile(&file, &CompileOptions::default(), &target)
        .err()
        .unwrap();
    let CompileError::Unsupported(u) = &err else {
        panic!("expected Unsupported, got {err}");
    };
    assert_eq!(
        (u.step.as_str(), u.op.as_str(), u.ty),
        ("blk.0.attn", "attention", None)
    );
    assert!(err.to_string().contains("has no kernel"), "{err}");
}

#[test]
fn alignment_passes_and_kv_type_come_from_the_target() {
    let file = TinyModel::llama().open().unwrap();
    let mut target = Target::cpu();
    target.alignment = 4096;
    target.passes = vec!["swiglu".into(), "add-rmsnorm".into()];
    let compiled = compile(&file, &CompileOptions::default(), &target).unwrap();
    let plan = &compiled.plan;
    assert_eq!(plan.options.alignment, 4096);
    assert!(
        plan.steps
            .iter()
            .flat_map(|s| &s.outputs)
            .filter_map(|o| o.buffer)
            .all(|b| b.offset % 4096 == 0)
    );
    let passes: Vec<&str> = plan.fusion.passes.iter().map(|p| p.pass.as_str()).collect();
    assert_eq!(passes, ["swiglu", "add-rmsnorm"]);
    // --disable-pass and --no-fuse still apply on top of the target's passes.
    let options = CompileOptions {
        disabled_passes: vec!["swiglu".into()],
        ..CompileOptions::default()
    };
    let compiled = compile(&file, &options, &target).unwrap();
    let passes: Vec<&str> = compiled
        .plan
        .fusion
        .passes
        .iter()
        .map(|p| p.pass.as_str())
        .collect();
    assert_eq!(passes, ["add-rmsnorm"]);

    target.passes = vec!["fuse-all".into()];
    let err = compile(&file, &CompileOptions::default(), &target)
        .err()
        .unwrap();
    assert!(matches!(err, CompileError::Target { .. }), "{err}");
    assert!(err.to_string().contains("fuse-all"), "{err}");

    let mut f32_kv = Target::cpu();
    f32_kv.kv_type = GgmlType::F32;
    let err = compile(&file, &CompileOptions::default(), &f32_kv)
        .err()
        .unwrap();
    let CompileError::Unsupported(u) = err else {
        panic!("expected Unsupported");
    };
    assert_eq!(
        (u.op.as_str(), u.ty),
        ("rope_qkv_write", Some(GgmlType::F16))
    );
}

#[test]
fn the_fit_adds_paged_kv_arena_weights_and_margin() {
    let file = TinyModel::llama32().open().unwrap();
    let target = Target::parse("cuda:sm_52").unwrap();
    let plan = compile(&file, &CompileOptions::default(), &target)
        .unwrap()
        .plan;
    let m = plan.memory;

    // No budget: sizes, no verdict.
    let fit = FitReport::new(&plan, &target, &[], 100, 3).unwrap();
    assert_eq!(
        fit.kv_cells,
        112 * 3,
        "100 tokens round up to 7 pages of 16"
    );
    assert_eq!(fit.kv_cache_bytes, 112 * 3 * m.kv_bytes_per_token);
    assert_eq!(
        fit.total_bytes,
        m.weight_bytes + m.arena_bytes + fit.kv_cache_bytes + target.runtime_margin
    );
    assert_eq!(
        (fit.fits, fit.budget_bytes, fit.hint.as_deref()),
        (None, None, None)
    );
    assert!(fit.accepts_all_ops);

    // Exactly enough fits; a byte less does not, and the KV cache is what overflows.
    let exact = target.clone().with_budget(fit.total_bytes, "test");
    let fit_exact = FitReport::new(&plan, &exact, &[], 100, 3).unwrap();
    assert_eq!(
        (fit_exact.fits, fit_exact.headroom_bytes),
        (Some(true), Some(0))
    );
    assert_eq!(fit_exact.largest_ctx_size, Some(112));
    assert_eq!(fit_exact.largest_parallel, Some(3));
    let short = target.clone().with_budget(fit.total_bytes - 1, "test");
    let over = FitReport::new(&plan, &short, &[], 100, 3).unwrap();
    assert_eq!(over.fits, Some(false));
    assert_eq!(over.over_by_bytes, Some(1));
    assert_eq!(over.does_not_fit, Some(Part::KvCache));
    assert_eq!(over.largest_ctx_size, Some(112 - KV_PAGE_CELLS));
    assert_eq!(over.largest_parallel, Some(2));
    let hint = over.hint.unwrap();
    assert!(
        hint.contains("--ctx-size 96") && hint.contains("--parallel 2"),
        "{hint}"
    );

    // Smaller than the weights: the weights are named.
    let tiny = target.clone().with_budget(m.weight_bytes / 2, "test");
    let over = FitReport::new(&plan, &tiny, &[], 100, 1).unwrap();
    assert_eq!(over.does_not_fit, Some(Part::Weights));
    assert_eq!(over.largest_ctx_size, None);
    assert!(over.verdict().contains("the weights alone do not fit"));

    assert_eq!(
        FitReport::new(&plan, &target, &[], 0, 1),
        Err(FitError::Zero)
    );
    assert!(matches!(
        FitReport::new(&plan, &target, &[], u64::MAX, 2),
        Err(FitError::Overflow { .. })
    ));
}

#[test]
fn auto_tries_gpus_then_the_cpu_and_cuda_never_falls_back() {
    let mut passed = PassedOver::default();
    let cpu_only = candidate_targets(DeviceChoice::Cpu, None, &mut passed);
    assert_eq!(cpu_only.len(), 1);
    assert_eq!(cpu_only[0].kind, TargetKind::Cpu);
    assert!(passed.0.is_empty(), "--device cpu probes nothing");

    let mut passed = PassedOver::default();
    let auto = candidate_targets(DeviceChoice::Auto, None, &mut passed);
    assert_eq!(auto.last().unwrap().kind, TargetKind::Cpu);
    let gpus = auto.len() - 1;
    assert!(
        gpus > 0 || !passed.0.is_empty(),
        "with no GPU target, auto says why"
    );

    let mut passed = PassedOver::default();
    let cuda = candidate_targets(DeviceChoice::Cuda, None, &mut passed);
    assert!(
        cuda.iter()
            .all(|t| matches!(t.kind, TargetKind::Cuda { .. }) && t.gpu.is_some())
    );
    assert_eq!(cuda.len(), gpus);

    // `--gpu N` for a GPU that does not exist: no target, and the reason names it.
    let mut passed = PassedOver::default();
    assert!(candidate_targets(DeviceChoice::Cuda, Some(999), &mut passed).is_empty());
    let why = passed.summary();
    assert!(
        why.contains("cuda:999") || why.contains("no CUDA GPU"),
        "{why}"
    );

    // Loading on cuda fails with every GPU's reason when there is none, and runs on the GPU
    // when there is one; auto takes the GPU first, else the CPU after saying why.
    let Some(path) = common::default_model() else {
        return;
    };
    let options = m40_llm::runtime::model::LoadOptions {
        device: DeviceChoice::Cuda,
        ctx_size: Some(64),
        ..Default::default()
    };
    match m40_llm::runtime::model::load(&path, &options) {
        Ok(loaded) => {
            assert!(gpus > 0);
            assert_eq!(loaded.engine.backend().device().kind, "cuda");
        }
        Err(e) => {
            let err = e.to_string();
            assert_eq!(gpus, 0, "{err}");
            assert!(
                err.starts_with("no device can run the model with --device cuda: "),
                "{err}"
            );
        }
    }
    let options = m40_llm::runtime::model::LoadOptions {
        device: DeviceChoice::Auto,
        ..options
    };
    let loaded = m40_llm::runtime::model::load(&path, &options).unwrap();
    let want = if gpus > 0 { "cuda" } else { "cpu" };
    assert_eq!(loaded.engine.backend().device().kind, want);
}
