//! Snapshots of the compiler's output: the lowered graph and the plan, for tiny models of every
//! family and for the default model. A change to lowering, fusion or placement shows up here as a
//! diff to review (`cargo insta review`). Snapshots live in the top-level `snapshots/` folder.

mod common;

use m40_llm::backend::target::Target;
use m40_llm::gguf::{GgmlType, GgufFile};
use m40_llm::lower::{TinyModel, lower};
use m40_llm::passes::Pipeline;
use m40_llm::plan::{PlanOptions, text};
use m40_llm::{CompileOptions, compile};

/// Runs `f` with insta writing to `snapshots/` without module prefixes.
fn snapshots(f: impl FnOnce()) {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path("../snapshots");
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(f);
}

/// Tiny plans are sized for 16 tokens and 4 outputs per step: small numbers that still show
/// where T and O differ.
fn tiny_options() -> CompileOptions {
    CompileOptions {
        plan: PlanOptions {
            max_tokens: 16,
            max_outputs: 4,
            ..PlanOptions::default()
        },
        ..CompileOptions::default()
    }
}

fn tiny_models() -> Vec<TinyModel> {
    vec![
        TinyModel::llama(),
        TinyModel::llama()
            .with_tied_embeddings(true)
            .with_weight_type(GgmlType::F16),
        TinyModel {
            rope_freqs: true,
            ..TinyModel::llama()
        },
        TinyModel::qwen2(),
        TinyModel::qwen2()
            .with_tied_embeddings(false)
            .with_weight_type(GgmlType::F16),
        TinyModel::qwen3(),
        TinyModel::qwen3().with_weight_type(GgmlType::F16),
        TinyModel::llama().with_weight_type(GgmlType::Q8_0),
        TinyModel::qwen2().with_weight_type(GgmlType::Q4_0),
        TinyModel::qwen3().with_weight_type(GgmlType::Q4_1),
        // k-quants need rows of 256.
        TinyModel {
            n_embd: 256,
            n_ff: 256,
            head_dim: 64,
            ..TinyModel::llama().with_weight_type(GgmlType::Q6_K)
        },
    ]
}

fn snapshot_name(model: &TinyModel) -> String {
    let mut name = model.label();
    if model.rope_freqs {
        name.push_str("-rope-freqs");
    }
    name
}

#[test]
fn tiny_models_lower_and_plan() {
    snapshots(|| {
        for model in tiny_models() {
            let file = model.open().unwrap();
            let compiled = compile(&file, &tiny_options(), &Target::cpu()).unwrap();
            let name = snapshot_name(&model);
            insta::assert_snapshot!(format!("lowered-{name}"), compiled.lowered.to_string());
            insta::assert_snapshot!(format!("plan-{name}"), text::render(&compiled.plan));
        }
    });
}

/// Each pass alone on a one-block llama: the diff against `lowered-llama-f32-untied` is what the
/// pass does.
#[test]
fn each_pass_alone() {
    let file = TinyModel::llama().with_layers(1).open().unwrap();
    let lowered = lower(&file).unwrap().graph;
    snapshots(|| {
        for pass in Pipeline::fusion().names() {
            let others: Vec<&str> = Pipeline::fusion()
                .names()
                .into_iter()
                .filter(|p| *p != pass)
                .collect();
            let mut graph = lowered.clone();
            let records = Pipeline::fusion()
                .without(&others)
                .unwrap()
                .run(&mut graph)
                .unwrap();
            assert_eq!(records.len(), 1);
            let report = format!("{} rewrites\n{graph}", records[0].rewrites);
            insta::assert_snapshot!(format!("pass-{pass}"), report);
        }
    });
}

#[test]
fn default_model_lowers_and_plans() {
    let Some(path) = common::default_model() else {
        return;
    };
    let file = GgufFile::open(&path).unwrap();
    let compiled = compile(&file, &CompileOptions::default(), &Target::cpu()).unwrap();
    snapshots(|| {
        insta::assert_snapshot!("lowered-smollm2", compiled.lowered.to_string());
        insta::assert_snapshot!("plan-smollm2", text::render(&compiled.plan));
    });
}
