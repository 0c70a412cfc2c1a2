//! Step outputs smaller than a row of logits: the CPU backend's argmax and top-k agree with the
//! host sampler, and generation that asks for them produces the tokens the full-row path does.

mod common;

use m40_llm::backend::cpu::CpuBackend;
use m40_llm::backend::step::by_logit_desc;
use m40_llm::backend::target::Target;
use m40_llm::backend::{KvGeometry, OutputKind, RowOutput, StepOutputs, TokenLogit};
use m40_llm::gguf::GgmlType;
use m40_llm::lower::TinyModel;
use m40_llm::plan::PlanOptions;
use m40_llm::runtime::engine::{Engine, Part, WantLogits};
use m40_llm::runtime::generate::{
    GenerateOptions, RowPolicy, generate_with, output_kind, sample_output,
};
use m40_llm::runtime::model::{LoadOptions, load};
use m40_llm::sample::{Sampler, SamplerConfig};
use m40_llm::{CompileOptions, compile};
use std::ops::ControlFlow;
use std::sync::Arc;

fn engine() -> Engine {
    let model = TinyModel::llama().with_weight_type(GgmlType::Q8_0);
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
    let kv = KvGeometry::new(16, 8, 2, 8).unwrap();
    Engine::new(Box::new(CpuBackend::new(plan, file, kv).unwrap()), 128)
}

/// Every position's output for 40 tokens, as `kind` asks.
fn rows(kind: OutputKind) -> StepOutputs {
    let mut e = engine();
    let mut s = e.new_sequence();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 31 + 5) % 100).collect();
    let mut out = StepOutputs::new();
    let mut parts = [Part::new(&mut s, &tokens, WantLogits::All).with_kind(kind)];
    e.step(&mut parts, &mut out).unwrap();
    out
}

#[test]
fn the_backends_argmax_and_top_k_agree_with_the_host_sampler() {
    let full = rows(OutputKind::Logits);
    let best = rows(OutputKind::Argmax);
    let top = rows(OutputKind::TopK(40));
    assert_eq!(full.len(), 40);
    let mut greedy = Sampler::new(SamplerConfig::greedy()).unwrap();
    let mut scratch = Vec::new();
    for i in 0..full.len() {
        let row = full.logits(i).unwrap();
        let Some(RowOutput::Argmax(b)) = best.row(i) else {
            panic!("row {i} is not an argmax")
        };
        assert_eq!(b.id, greedy.sample(row, &[]).unwrap(), "row {i}");
        assert_eq!(b.logit, row[b.id as usize]);
        // The top 40: the row's largest, sorted, ties by the lower id.
        let Some(RowOutput::TopK(t)) = top.row(i) else {
            panic!("row {i} is not a top-k")
        };
        let mut want: Vec<TokenLogit> = row
            .iter()
            .enumerate()
            .map(|(id, &logit)| TokenLogit {
                id: id as u32,
                logit,
            })
            .collect();
        want.sort_by(by_logit_desc);
        assert_eq!(t, &want[..40], "row {i}");
        // Sampling from the top 40 draws what sampling from the row draws, seed by seed.
        for seed in 0..8 {
            let config = SamplerConfig {
                seed: Some(seed),
                ..SamplerConfig::default()
            };
            assert_eq!(output_kind(&config, 100), OutputKind::TopK(40));
            let mut a = Sampler::new(config.clone()).unwrap();
            let mut b = Sampler::new(config).unwrap();
            for _ in 0..4 {
                let from_row =
                    sample_output(&mut a, RowOutput::Logits(row), &[], 100, &mut scratch);
                let from_top = sample_output(&mut b, RowOutput::TopK(t), &[], 100, &mut scratch);
                assert_eq!(from_row.unwrap(), from_top.unwrap(), "row {i} seed {seed}");
            }
        }
    }
    assert!(best.all_logits().is_empty() && top.all_logits().is_empty());
}

#[test]
fn the_sampler_config_decides_what_a_step_returns() {
    let greedy = SamplerConfig::greedy();
    assert_eq!(output_kind(&greedy, 1000), OutputKind::Argmax);
    let penalized = SamplerConfig {
        repeat_penalty: 1.1,
        repeat_last_n: 64,
        ..SamplerConfig::greedy()
    };
    assert_eq!(output_kind(&penalized, 1000), OutputKind::Logits);
    let all = SamplerConfig {
        top_k: 0,
        ..SamplerConfig::default()
    };
    assert_eq!(output_kind(&all, 1000), OutputKind::Logits);
    assert_eq!(
        output_kind(&SamplerConfig::default(), 1000),
        OutputKind::TopK(40)
    );
    assert_eq!(
        output_kind(&SamplerConfig::default(), 40),
        OutputKind::Logits
    );
}

#[test]
fn generation_from_argmax_and_top_k_rows_matches_the_full_row_path() {
    let Some(path) = common::default_model() else {
        return;
    };
    let options = LoadOptions {
        device: m40_llm::backend::device::DeviceChoice::Cpu,
        ctx_size: Some(256),
        ..LoadOptions::default()
    };
    let mut m = load(&path, &options).unwrap();
    let prompt = m
        .tokenizer
        .encode("The three most useful kitchen tools are", true, false);
    let configs = [
        SamplerConfig::greedy(),
        SamplerConfig {
            seed: Some(11),
            ..SamplerConfig::default()
        },
        SamplerConfig {
            seed: Some(3),
            temperature: 1.5,
            top_k: 5,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplerConfig::default()
        },
    ];
    for config in configs {
        // Each config asks for less than the full row.
        assert_ne!(output_kind(&config, m.engine.n_vocab()), OutputKind::Logits);
        let options = GenerateOptions {
            max_new_tokens: 24,
            sampler: config.clone(),
            stop_at_eog: false,
            ..GenerateOptions::default()
        };
        let mut go = |rows| {
            let mut quiet = |_: &str| ControlFlow::Continue(());
            generate_with(
                &mut m.engine,
                &m.tokenizer,
                &prompt,
                &options,
                rows,
                &mut quiet,
            )
            .unwrap()
        };
        let auto = go(RowPolicy::Auto);
        let full = go(RowPolicy::FullLogits);
        assert_eq!(auto.tokens.len(), 24);
        assert_eq!(auto.tokens, full.tokens, "{config:?}");
        assert_eq!(auto.text, full.text);
    }
}
