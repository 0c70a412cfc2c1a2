//! `m40-llm bench` through the binary, on the default model on the CPU (small sizes: speed is
//! never asserted, only that every number is measured and reported).

mod common;

use common::proc::{Input, run};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

fn bench(args: &[&str]) -> common::proc::Outcome {
    let mut cmd = Command::new(common::bin());
    cmd.arg("bench").args(args);
    run(&mut cmd, Input::Null, Duration::from_secs(300))
}

#[test]
fn bench_reports_prompt_and_generation_tokens_per_second_with_their_spread() {
    let Some(model) = common::default_model() else {
        return;
    };
    let model = model.to_str().unwrap();
    let o = bench(&[
        "-m", model, "--device", "cpu", "-p", "16", "-n", "4", "-r", "2", "--json",
    ]);
    o.succeeds();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["device"]["kind"], "cpu");
    assert!(!v["commit"].as_str().unwrap().is_empty());
    assert_eq!(v["model_bytes"], std::fs::metadata(model).unwrap().len());
    let tests = v["tests"].as_array().unwrap();
    let names: Vec<&str> = tests.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["pp16", "tg4"]);
    for t in tests {
        let samples = t["samples_ts"].as_array().unwrap();
        assert_eq!(samples.len(), 2, "{t}");
        let s: Vec<f64> = samples.iter().map(|x| x.as_f64().unwrap()).collect();
        assert!(s.iter().all(|x| x.is_finite() && *x > 0.0), "{t}");
        let mean = (s[0] + s[1]) / 2.0;
        assert!(
            (t["avg_ts"].as_f64().unwrap() - mean).abs() <= 1e-9 * mean,
            "{t}"
        );
        let sd = (s[0] - s[1]).abs() / 2f64.sqrt();
        assert!(
            (t["stddev_ts"].as_f64().unwrap() - sd).abs() <= 1e-9 * mean.max(1.0),
            "{t}"
        );
    }

    // Batched generation at a depth, one repetition: the table form.
    let o = bench(&[
        "-m",
        model,
        "--device",
        "cpu",
        "-p",
        "0",
        "-n",
        "3",
        "-r",
        "1",
        "--parallel",
        "3",
        "--depth",
        "20",
    ]);
    o.succeeds();
    let table = o.stdout();
    let row = table
        .lines()
        .find(|l| l.contains("tg3x3 @ d20"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("± 0.00"), "{row}");
    assert!(table.contains("device: cpu"), "{table}");
}

#[test]
fn bench_refuses_what_it_cannot_measure() {
    let Some(model) = common::default_model() else {
        return;
    };
    let model = model.to_str().unwrap();
    bench(&["-m", model, "--device", "cpu", "-p", "0", "-n", "0"]).fails_with("nothing to measure");
    let o = bench(&["-m", model, "--device", "cpu", "-r", "0"]);
    assert_eq!(o.code, Some(2), "a usage error: {}", o.stderr);
    assert!(o.stderr.contains("--repetitions"), "{}", o.stderr);
    // A prefill GEMM precision that does not exist, or two that contradict each other, fail
    // the load on any device (the GPU cases are in tests/gpu_kernels.rs).
    let with_env = |vars: &[(&str, &str)]| {
        let mut cmd = Command::new(common::bin());
        cmd.args([
            "bench", "-m", model, "--device", "cpu", "-p", "8", "-n", "0", "-r", "1",
        ]);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        run(&mut cmd, Input::Null, Duration::from_secs(300))
    };
    with_env(&[("M40LLM_GEMM", "fp16")]).fails_with("M40LLM_GEMM=`fp16`");
    with_env(&[("M40LLM_GEMM", "f16"), ("M40LLM_TF32", "1")])
        .fails_with("M40LLM_GEMM=f16 and M40LLM_TF32=1");
    with_env(&[("M40LLM_GEMM", "f16"), ("M40LLM_ENABLE_CUBLAS", "0")])
        .fails_with("M40LLM_ENABLE_CUBLAS=0");
    // A valid request on the CPU: FP32, said in a warning.
    let o = with_env(&[("M40LLM_GEMM", "f16")]);
    o.succeeds();
    assert!(
        o.stderr.contains("the CPU backend computes in FP32"),
        "{}",
        o.stderr
    );
}
