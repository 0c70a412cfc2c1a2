//! Throughput measurement, as llama-bench measures it: prompt processing (`pp`: a prompt of `p`
//! tokens prefilled) and text generation (`tg`: `n` decode steps of one token per sequence, `S`
//! sequences decoding together), each at a KV depth `D` (tokens already in the cache), repeated
//! `r` times after one warm-up run; tokens/s as mean and standard deviation over the repetitions.
//!
//! Tokens are seeded random ids (the speed of a step does not depend on which tokens it holds).
//! The depth is prefilled before the clock starts. Decode steps ask for the device's argmax, as
//! greedy generation does, so no vocabulary-sized row is copied back. Every step goes through
//! the [`Engine`], so the cost of building and validating steps is included, as in real use.

use super::engine::{Engine, EngineError, Part, Sequence, WantLogits};
use crate::backend::step::{OutputKind, StepOutputs};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::time::Instant;

/// One measurement to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Test {
    /// Prefill `tokens` tokens into one sequence.
    Prompt { tokens: usize },
    /// `tokens` decode steps of one token for each of `parallel` sequences.
    Generate { tokens: usize, parallel: usize },
}

impl Test {
    /// llama-bench's name: `pp512`, `tg128`, `tg128x8` (8 sequences), with `@d4096` at a depth.
    pub fn name(&self, depth: usize) -> String {
        let base = match *self {
            Test::Prompt { tokens } => format!("pp{tokens}"),
            Test::Generate {
                tokens,
                parallel: 1,
            } => format!("tg{tokens}"),
            Test::Generate { tokens, parallel } => format!("tg{tokens}x{parallel}"),
        };
        if depth > 0 {
            format!("{base} @ d{depth}")
        } else {
            base
        }
    }

    /// Tokens processed per run (all sequences).
    pub fn tokens(&self) -> usize {
        match *self {
            Test::Prompt { tokens } => tokens,
            Test::Generate { tokens, parallel } => tokens * parallel,
        }
    }
}

/// The result of one test.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TestResult {
    pub name: String,
    pub test: Test,
    pub depth: usize,
    /// Tokens/s of each repetition (the warm-up excluded).
    pub samples_ts: Vec<f64>,
    pub avg_ts: f64,
    /// Sample standard deviation (0 for one repetition).
    pub stddev_ts: f64,
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Invalid(String),
}

/// Mean and sample standard deviation.
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Runs `test` at `depth` once as a warm-up and `repetitions` times measured.
pub fn run(
    engine: &mut Engine,
    test: Test,
    depth: usize,
    repetitions: usize,
    seed: u64,
) -> Result<TestResult, BenchError> {
    if repetitions == 0 {
        return Err(BenchError::Invalid(
            "at least one repetition is needed".into(),
        ));
    }
    let (tokens, parallel) = match test {
        Test::Prompt { tokens } => (tokens, 1),
        Test::Generate { tokens, parallel } => (tokens, parallel),
    };
    if tokens == 0 || parallel == 0 {
        return Err(BenchError::Invalid(format!(
            "{}: nothing to measure",
            test.name(depth)
        )));
    }
    let needed = depth + tokens;
    if needed > engine.n_ctx() {
        return Err(BenchError::Invalid(format!(
            "{} needs {needed} tokens of context per sequence, more than the {} loaded (raise \
             --ctx-size)",
            test.name(depth),
            engine.n_ctx()
        )));
    }
    let n_vocab = engine.n_vocab().max(1) as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..n_vocab)).collect() };
    let mut samples = Vec::with_capacity(repetitions);
    let mut out = StepOutputs::new();
    for rep in 0..=repetitions {
        let mut seqs: Vec<Sequence> = (0..parallel).map(|_| engine.new_sequence()).collect();
        let result = (|| -> Result<f64, BenchError> {
            for s in &mut seqs {
                engine.reserve(s, needed)?;
                if depth > 0 {
                    let context = ids(depth);
                    engine.prefill_into(s, &context, OutputKind::Argmax, &mut out)?;
                }
            }
            let seconds = match test {
                Test::Prompt { .. } => {
                    let prompt = ids(tokens);
                    let start = Instant::now();
                    engine.prefill_into(&mut seqs[0], &prompt, OutputKind::Argmax, &mut out)?;
                    start.elapsed().as_secs_f64()
                }
                Test::Generate { .. } => {
                    let steps: Vec<Vec<u32>> = (0..tokens).map(|_| ids(parallel)).collect();
                    let start = Instant::now();
                    for step in &steps {
                        let mut parts: Vec<Part<'_>> = seqs
                            .iter_mut()
                            .zip(step)
                            .map(|(s, t)| {
                                Part::new(s, std::slice::from_ref(t), WantLogits::Last)
                                    .with_kind(OutputKind::Argmax)
                            })
                            .collect();
                        engine.step(&mut parts, &mut out)?;
                    }
                    start.elapsed().as_secs_f64()
                }
            };
            Ok(seconds)
        })();
        for s in seqs {
            engine.release(s);
        }
        let seconds = result?;
        if rep > 0 {
            samples.push(test.tokens() as f64 / seconds.max(1e-12));
        }
    }
    let (avg_ts, stddev_ts) = mean_sd(&samples);
    Ok(TestResult {
        name: test.name(depth),
        test,
        depth,
        samples_ts: samples,
        avg_ts,
        stddev_ts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_bench() {
        assert_eq!(Test::Prompt { tokens: 512 }.name(0), "pp512");
        let tg = Test::Generate {
            tokens: 128,
            parallel: 1,
        };
        assert_eq!(tg.name(4096), "tg128 @ d4096");
        let batched = Test::Generate {
            tokens: 128,
            parallel: 8,
        };
        assert_eq!(batched.name(0), "tg128x8");
        assert_eq!(batched.tokens(), 1024);
    }

    #[test]
    fn mean_and_sample_standard_deviation() {
        let (m, sd) = mean_sd(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(m, 5.0);
        assert!((sd - 2.138_089_935).abs() < 1e-9, "{sd}");
        assert_eq!(mean_sd(&[3.0]), (3.0, 0.0));
        assert!(mean_sd(&[]).0.is_nan());
    }
}
