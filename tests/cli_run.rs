//! `m40-llm run`, `logits` and `perplexity` end to end on the default model, and their errors.

mod common;

use serde_json::Value;
use std::process::{Command, Output};

fn m40(args: &[&str]) -> Output {
    Command::new(common::bin()).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean failure: non-zero exit, one `error:` line naming `needle`, no panic.
fn fails_with(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected a failure, got success: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in {err:?}"));
    assert!(
        line.contains(needle),
        "{line:?} does not mention {needle:?}"
    );
}

/// `m40-llm run --model MODEL --device cpu --json ARGS...`, which must succeed: its JSON, and
/// its stderr (the summary).
fn run_json(model: &str, args: &[&str]) -> (Value, String) {
    let mut all = vec!["run", "--model", model, "--device", "cpu", "--json"];
    all.extend_from_slice(args);
    let o = m40(&all);
    assert!(o.status.success(), "{}", stderr(&o));
    (serde_json::from_slice(&o.stdout).unwrap(), stderr(&o))
}

#[test]
fn greedy_run_prints_json_with_llama_cpps_tokens() {
    let Some(model) = common::default_model() else {
        return;
    };
    let model = model.to_str().unwrap();
    let (v, err) = run_json(
        model,
        &[
            "--prompt",
            "The capital of France is",
            "--temperature",
            "0",
            "-n",
            "5",
        ],
    );
    let ids = |k: &str| {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids("prompt_tokens"), [504, 3575, 282, 4649, 314]);
    // llama.cpp's first five greedy tokens (each decided by a margin above 0.5).
    assert_eq!(ids("tokens"), [7042, 30, 198, 198, 504]);
    assert_eq!(v["text"], " Paris.\n\nThe");
    assert_eq!(v["device"]["kind"], "cpu");
    assert_eq!(v["finish"]["reason"], "max_tokens");
    for k in ["prefill_tokens_per_s", "decode_tokens_per_s"] {
        assert!(v["timings"][k].as_f64().unwrap() > 0.0, "{k}");
    }
    // The summary on stderr names the device and the speeds.
    assert!(
        err.contains("device cpu") && err.contains("tokens/s"),
        "{err}"
    );
}

#[test]
fn run_streams_text_and_stops_at_the_end_of_turn() {
    let Some(model) = common::default_model() else {
        return;
    };
    let model = model.to_str().unwrap();
    // The ChatML prompt of tests/data/smollm2 (p5): llama.cpp answers "The answer is: 4" and ends
    // the turn; its margin after "is" is 0.25, so only "The answer is" is held to it.
    let o = m40(&[
        "run",
        "--model",
        model,
        "--prompt",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.starts_with("The answer is") && text.contains('4'),
        "{text:?}"
    );
    assert!(text.len() < 40 && !text.contains("<|im_end|>"), "{text:?}");
    assert!(stderr(&o).contains("end of generation"), "{}", stderr(&o));
}

#[test]
fn chat_applies_the_models_template_and_a_stop_string_cuts_the_text() {
    let Some(model) = common::default_model() else {
        return;
    };
    let model = model.to_str().unwrap();
    let o = m40(&[
        "run",
        "--model",
        model,
        "--chat",
        "--system",
        "Answer briefly.",
        "--prompt",
        "What is 2+2?",
        "--temperature",
        "0",
        "--device",
        "cpu",
        "--json",
        "--stop",
        "is",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    // <|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n...
    let prompt: Vec<u64> = v["prompt_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(prompt[..2], [1, 9690]);
    assert_eq!(
        prompt.last(),
        Some(&198),
        "ends with the assistant header's newline"
    );
    assert_eq!(v["finish"]["reason"], "stop_string");
    assert!(!v["text"].as_str().unwrap().contains("is"), "{}", v["text"]);
}

#[test]
fn negative_temperature_is_greedy_and_a_closed_pipe_stops_generation() {
    let Some(model) = common::default_model() else {
        return;
    };
    let model = model.to_str().unwrap();
    let (v, _) = run_json(
        model,
        &[
            "--prompt",
            "The capital of France is",
            "--temperature",
            "-1",
            "-n",
            "3",
        ],
    );
    assert_eq!(v["tokens"], serde_json::json!([7042, 30, 198]));

    // stdout closed before anything is written: generation stops at once, quietly, as other
    // command-line tools do when their reader goes away (SIGPIPE), never with a panic.
    let mut child = Command::new(common::bin())
        .args([
            "run",
            "--model",
            model,
            "--prompt",
            "Once upon a time",
            "-n",
            "400",
            "--device",
            "cpu",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("generated"), "it ran to the end: {err}");
}

#[test]
fn seeded_sampling_repeats_exactly() {
    let Some(model) = common::default_model() else {
        return;
    };
    let model = model.to_str().unwrap();
    let run = || {
        let (v, _) = run_json(
            model,
            &[
                "--prompt",
                "Once upon a time",
                "-n",
                "12",
                "--temperature",
                "0.9",
                "--top-k",
                "50",
                "--top-p",
                "0.9",
                "--seed",
                "1234",
            ],
        );
        assert_eq!(v["seed"], 1234);
        v["tokens"].clone()
    };
    assert_eq!(run(), run());
}

#[test]
fn logits_prints_one_json_line_per_position() {
    let Some(model) = common::default_model() else {
        return;
    };
    let model = model.to_str().unwrap();
    let o = m40(&[
        "logits",
        "--model",
        model,
        "--ids",
        "504 3575 282 4649 314",
        "--top-k",
        "3",
        "--all-positions",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    for (p, l) in lines.iter().enumerate() {
        assert_eq!(l["position"], p);
        let top = l["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let vals: Vec<f64> = top.iter().map(|t| t[1].as_f64().unwrap()).collect();
        assert!(vals.windows(2).all(|w| w[0] >= w[1]), "{vals:?}");
    }
    // The last position predicts " Paris" (llama.cpp: 17.34).
    assert_eq!(lines[4]["top"][0][0], 7042);
    let last = m40(&[
        "logits",
        "--model",
        model,
        "--prompt",
        "The capital of France is",
    ]);
    let v: Value = serde_json::from_slice(&last.stdout).unwrap();
    assert_eq!(
        (v["position"].as_u64(), v["top"].as_array().map(Vec::len)),
        (Some(4), Some(20))
    );
}

#[test]
fn perplexity_matches_llama_cpp() {
    let Some(model) = common::default_model() else {
        return;
    };
    let model = model.to_str().unwrap();
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(common::data("smollm2-extra/perplexity.json")).unwrap(),
    )
    .unwrap();
    let text = common::data("smollm2-extra/ppl.txt");
    for r in reference["results"].as_array().unwrap() {
        let ctx = r["ctx"].as_u64().unwrap().to_string();
        let o = m40(&[
            "perplexity",
            "--model",
            model,
            "--file",
            text.to_str().unwrap(),
            "--ctx-size",
            &ctx,
            "--device",
            "cpu",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        let line = out
            .lines()
            .find(|l| l.starts_with("Final estimate: PPL = "))
            .unwrap();
        let ppl: f64 = line["Final estimate: PPL = ".len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let want = r["ppl"].as_f64().unwrap();
        // Our FP32 activations against llama.cpp's 8-bit-quantized ones: within 1.5%.
        assert!(
            (ppl / want - 1.0).abs() < 0.015,
            "ctx {ctx}: PPL {ppl}, llama.cpp {want}"
        );
        // The running estimate after each window, as llama-perplexity prints it: [1]30.25,[2]...
        let running: Vec<f64> = out
            .lines()
            .next()
            .unwrap()
            .split(',')
            .filter(|c| !c.is_empty())
            .map(|c| c.split(']').nth(1).unwrap().parse().unwrap())
            .collect();
        let want_running: Vec<f64> = r["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_f64().unwrap())
            .collect();
        assert_eq!(running.len(), want_running.len(), "ctx {ctx}: windows");
        for (i, (got, want)) in running.iter().zip(&want_running).enumerate() {
            assert!(
                (got / want - 1.0).abs() < 0.015,
                "ctx {ctx}, window {i}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn bad_arguments_and_inputs_fail_with_one_clear_line() {
    let Some(model) = common::default_model() else {
        return;
    };
    let model = model.to_str().unwrap();
    fails_with(
        &m40(&["run", "--model", model, "--prompt", "hi", "--top-p", "1.5"]),
        "top_p",
    );
    fails_with(
        &m40(&["run", "--model", model, "--prompt", "", "--device", "cpu"]),
        "empty",
    );
    fails_with(
        &m40(&[
            "run",
            "--model",
            model,
            "--prompt",
            "one two three four five six",
            "--ctx-size",
            "3",
            "--device",
            "cpu",
        ]),
        "context",
    );
    // Without a usable GPU, --device cuda says what is missing and how to get it.
    if m40_llm::backend::device::probe_gpus().map_or(true, |g| g.is_empty()) {
        fails_with(
            &m40(&[
                "run", "--model", model, "--prompt", "hi", "--device", "cuda",
            ]),
            "install the NVIDIA driver",
        );
    }
    fails_with(
        &m40(&["run", "--model", "/no/such/model.gguf", "--prompt", "hi"]),
        "/no/such/model.gguf",
    );
    fails_with(
        &m40(&["logits", "--model", model, "--ids", "1 x 3"]),
        "\"x\"",
    );
    fails_with(
        &m40(&["logits", "--model", model, "--ids", "1 999999"]),
        "999999",
    );
    let short = std::env::temp_dir().join(format!("m40-short-{}.txt", std::process::id()));
    std::fs::write(&short, "Too short to score.").unwrap();
    fails_with(
        &m40(&[
            "perplexity",
            "--model",
            model,
            "--file",
            short.to_str().unwrap(),
            "--ctx-size",
            "128",
        ]),
        "needs at least 256",
    );
    let o = m40(&[
        "perplexity",
        "--model",
        model,
        "--file",
        short.to_str().unwrap(),
        "--chunks",
        "0",
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("--chunks"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_file(short).ok();
    fails_with(
        &m40(&["run", "--model", model, "--prompt", "hi", "--stop", ""]),
        "empty",
    );
    let o = m40(&["run", "--model", model]);
    assert!(
        !o.status.success() && stderr(&o).contains("--prompt"),
        "{}",
        stderr(&o)
    );
}
