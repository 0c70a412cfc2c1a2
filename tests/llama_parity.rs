//! The CPU backend on the real default model against llama.cpp (issue 5's acceptance), for the
//! prompts of tests/data/smollm2 and tests/data/smollm2-extra (made the same way).
//!
//! llama.cpp moves its own logits by up to ~0.7 between its settings, so agreement is judged
//! where the decision is robust: the argmax where llama.cpp's top1-top2 margin is at least 1.0,
//! the top-20 logits within 1.0, and free-running greedy text up to the first margin below 0.5.

mod common;

use m40_llm::runtime::engine::Engine;
use m40_llm::runtime::generate::{GenerateOptions, generate};
use m40_llm::runtime::model::{LoadOptions, LoadedModel, load};
use m40_llm::sample::SamplerConfig;
use serde_json::Value;
use std::path::Path;

/// One llama.cpp reference: a prompt, its greedy continuation with margins, and the top-20
/// logits at its last position.
struct Case {
    id: String,
    prompt: String,
    prompt_ids: Vec<u32>,
    new_ids: Vec<u32>,
    margins: Vec<f64>,
    top20: Vec<(u32, f64)>,
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn top(v: &Value) -> Vec<(u32, f64)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap()))
        .collect()
}

fn cases() -> Vec<Case> {
    let greedy = json(&common::data("smollm2/greedy.json"));
    let logits = json(&common::data("smollm2/logits.json"));
    let extra = json(&common::data("smollm2-extra/reference.json"));
    let top20 = |id: &str| {
        logits["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .map(|p| top(&p["top20"]))
            .unwrap()
    };
    // A greedy.json-style entry; the top-20 comes from the entry itself or from logits.json.
    let case = |p: &Value, top20: Vec<(u32, f64)>| Case {
        id: p["id"].as_str().unwrap().to_string(),
        prompt: p["prompt"].as_str().unwrap().to_string(),
        prompt_ids: ids(&p["prompt_ids"]),
        new_ids: ids(&p["new_ids"]),
        margins: p["top1_top2_margin"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .collect(),
        top20,
    };
    let mut cases: Vec<Case> = greedy["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| case(p, top20(p["id"].as_str().unwrap())))
        .collect();
    cases.extend(
        extra["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| case(p, top(&p["top20"]))),
    );
    assert!(cases.len() >= 11);
    cases
}

/// The CPU backend, or the GPU with `M40LLM_TEST_DEVICE=cuda` (the same agreement on the CUDA
/// executor; see docs/cuda.md).
fn device() -> m40_llm::backend::device::DeviceChoice {
    match std::env::var("M40LLM_TEST_DEVICE").as_deref() {
        Ok("cuda") => m40_llm::backend::device::DeviceChoice::Cuda,
        Ok("cpu") | Err(_) => m40_llm::backend::device::DeviceChoice::Cpu,
        Ok(other) => panic!("M40LLM_TEST_DEVICE={other}: expected cpu or cuda"),
    }
}

fn model(max_outputs: u64) -> Option<LoadedModel> {
    let path = common::default_model()?;
    let options = LoadOptions {
        device: device(),
        ctx_size: Some(512),
        max_outputs,
        ..LoadOptions::default()
    };
    Some(load(&path, &options).unwrap())
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn prompts_tokenize_as_llama_cpp_tokenizes_them() {
    let Some(m) = model(1) else { return };
    for c in cases() {
        assert_eq!(
            m.tokenizer.encode(&c.prompt, false, true),
            c.prompt_ids,
            "{}",
            c.id
        );
    }
}

#[test]
fn teacher_forced_argmax_matches_where_llama_cpp_is_decisive() {
    let Some(mut m) = model(512) else { return };
    let mut checked = 0;
    for c in cases() {
        let mut all = c.prompt_ids.clone();
        all.extend(&c.new_ids);
        let mut seq = m.engine.new_sequence();
        let logits = m.engine.logits_all(&mut seq, &all).unwrap();
        m.engine.release(seq);
        let n = c.prompt_ids.len();

        // The top-20 at the last prompt position: same argmax, each logit within 1.0.
        let last = logits.row(n - 1);
        assert_eq!(
            argmax(last),
            c.top20[0].0,
            "{}: argmax at the last prompt position",
            c.id
        );
        for &(id, want) in &c.top20 {
            let got = f64::from(last[id as usize]);
            assert!(
                (got - want).abs() <= 1.0,
                "{}: token {id}: logit {got}, llama.cpp {want}",
                c.id
            );
        }

        // Every decisive step of the continuation.
        for (i, (&tok, &margin)) in c.new_ids.iter().zip(&c.margins).enumerate() {
            if margin >= 1.0 {
                assert_eq!(
                    argmax(logits.row(n - 1 + i)),
                    tok,
                    "{}: step {i} (margin {margin:.2})",
                    c.id
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 200, "only {checked} decisive steps checked");
}

#[test]
fn full_logits_stay_within_llama_cpps_own_spread() {
    let Some(mut m) = model(1) else { return };
    for c in cases().into_iter().filter(|c| c.id == "p1" || c.id == "p5") {
        let (id, prompt_ids) = (c.id, c.prompt_ids);
        let bytes = std::fs::read(common::data(&format!("smollm2/logits_{id}.f32"))).unwrap();
        let want: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let mut seq = m.engine.new_sequence();
        let got = m.engine.prefill(&mut seq, &prompt_ids).unwrap();
        m.engine.release(seq);
        assert_eq!(got.len(), want.len());
        // llama.cpp differs from itself by up to ~0.7 after removing the mean shift (flash
        // attention on/off, f32 KV): hold us to the same.
        let shift = got
            .iter()
            .zip(&want)
            .map(|(a, b)| f64::from(a - b))
            .sum::<f64>()
            / want.len() as f64;
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (f64::from(a - b) - shift).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < 1.0,
            "{id}: max |difference| after the mean shift is {worst}"
        );
    }
}

#[test]
fn free_running_greedy_text_matches_up_to_the_first_close_call() {
    let Some(mut m) = model(1) else { return };
    let options = GenerateOptions {
        max_new_tokens: 48,
        sampler: SamplerConfig::greedy(),
        stop_at_eog: false,
        ..GenerateOptions::default()
    };
    let mut compared = 0;
    for c in cases() {
        let g = generate(
            &mut m.engine,
            &m.tokenizer,
            &c.prompt_ids,
            &options,
            &mut |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap();
        let robust = c
            .margins
            .iter()
            .position(|&m| m < 0.5)
            .unwrap_or(c.margins.len());
        assert_eq!(
            g.tokens[..robust],
            c.new_ids[..robust],
            "{}: first {robust} tokens",
            c.id
        );
        compared += robust;
    }
    assert!(
        compared >= 40,
        "only {compared} free-running tokens were decisive enough to compare"
    );
}

/// Runs `tokens` one decode step at a time and returns the logits after each.
fn token_by_token(engine: &mut Engine, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut seq = engine.new_sequence();
    let rows = tokens
        .iter()
        .map(|&t| engine.decode(&mut seq, t).unwrap())
        .collect();
    engine.release(seq);
    rows
}

#[test]
fn prefill_and_decode_agree_on_the_default_model() {
    let Some(mut m) = model(512) else { return };
    let c = cases().into_iter().find(|c| c.id == "c1").unwrap();
    let mut seq = m.engine.new_sequence();
    let prefill = m.engine.logits_all(&mut seq, &c.prompt_ids).unwrap();
    m.engine.release(seq);
    let decode = token_by_token(&mut m.engine, &c.prompt_ids);
    let tolerance = same_path_tolerance();
    let mut max_rel = 0f32;
    for (t, row) in decode.iter().enumerate() {
        let scale = row.iter().fold(0f32, |a, x| a.max(x.abs()));
        let worst = row
            .iter()
            .zip(prefill.row(t))
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        max_rel = max_rel.max(worst / scale);
        assert!(
            worst <= tolerance * scale,
            "position {t}: {worst} vs scale {scale}"
        );
    }
    eprintln!("prefill vs decode: max difference {max_rel:.2e} of the scale");
}

#[test]
fn a_prompt_longer_than_a_step_is_prefilled_in_chunks_with_the_same_result() {
    let Some(path) = common::default_model() else {
        return;
    };
    let c = cases().into_iter().find(|c| c.id == "long").unwrap();
    assert!(c.prompt_ids.len() > 64);
    let last = |max_tokens| {
        let options = LoadOptions {
            device: device(),
            ctx_size: Some(256),
            max_tokens,
            ..LoadOptions::default()
        };
        let mut m = load(&path, &options).unwrap();
        let mut seq = m.engine.new_sequence();
        m.engine.prefill(&mut seq, &c.prompt_ids).unwrap()
    };
    let whole = last(512);
    let chunked = last(16);
    let scale = whole.iter().fold(0f32, |a, x| a.max(x.abs()));
    let worst = whole
        .iter()
        .zip(&chunked)
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    eprintln!(
        "chunked prefill: max difference {:.2e} of the scale",
        worst / scale
    );
    assert!(
        worst <= same_path_tolerance() * scale,
        "{worst} vs scale {scale}"
    );
}

/// How closely two ways of running the same tokens (prefill against decode, one step against
/// chunks) must agree, relative to the logits' scale: 1e-4 on the CPU, whose prefill and decode
/// run the same kernels. On the GPU, prefill's attention is the tiled kernel and decode's the
/// flash-decoding one, and with cuBLAS prefill's matmuls are SGEMM (with a blocking that depends
/// on the row count) where decode's are the matvec kernel: values equal to ~1e-6 that now and
/// then round to different FP16 neighbours in the KV cache, which moves the logits by up to
/// ~4.8e-4 of their scale (measured on the H200, docs/cuda.md); 1e-3 there.
fn same_path_tolerance() -> f32 {
    match device() {
        m40_llm::backend::device::DeviceChoice::Cuda => 1e-3,
        _ => 1e-4,
    }
}
