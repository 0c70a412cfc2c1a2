//! `m40-llm bench`: prompt processing and generation tokens/s, as llama-bench reports them (see
//! `m40_llm::runtime::bench` for what is measured and how).

use super::io::{note, outln};
use super::model_or_default;
use anyhow::bail;
use m40_llm::runtime::bench::{self, Test, TestResult};
use m40_llm::runtime::model::load;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// Prompt tokens for the prompt-processing test (0: skip it).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    pub n_prompt: usize,
    /// Generated tokens for the generation test (0: skip it).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: usize,
    /// Measured repetitions of each test, after one warm-up run.
    #[arg(short = 'r', long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub repetitions: u64,
    /// Tokens already in the KV cache when each test starts (prefilled, not timed).
    #[arg(short = 'd', long, default_value_t = 0)]
    pub depth: usize,
    /// Sequences decoding together in the generation test (one batched step per token).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub parallel: u64,
    /// Seed of the random token ids.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// One JSON object (model, device, commit, every test with its samples) instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// The commit the binary was built from (`git describe`, `-dirty` for local changes).
pub const COMMIT: &str = env!("M40LLM_COMMIT");

pub fn run(args: Args) -> anyhow::Result<()> {
    let parallel = args.parallel as usize;
    let mut tests = Vec::new();
    if args.n_prompt > 0 {
        tests.push(Test::Prompt {
            tokens: args.n_prompt,
        });
    }
    if args.n_gen > 0 {
        tests.push(Test::Generate {
            tokens: args.n_gen,
            parallel,
        });
    }
    if tests.is_empty() {
        bail!("nothing to measure: -p and -n are both 0");
    }
    let path = model_or_default(args.model.model.clone())?;
    let mut options = args.model.load_options(parallel as u64);
    let per_seq = args.depth + args.n_prompt.max(args.n_gen);
    options.ctx_size = Some(options.ctx_size.unwrap_or(0).max(per_seq));
    options.n_seqs = parallel;
    options.max_outputs = options.max_outputs.max(parallel as u64);
    options.max_tokens = options.max_tokens.max(parallel as u64);
    let mut model = load(&path, &options)?;
    let file_bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
    let device = model.engine.device().clone();
    note!(
        "m40-llm bench: {} on {device}; commit {COMMIT}",
        path.display()
    );
    let mut results: Vec<TestResult> = Vec::new();
    for test in tests {
        let r = bench::run(
            &mut model.engine,
            test,
            args.depth,
            args.repetitions as usize,
            args.seed,
        )?;
        if !args.json {
            if results.is_empty() {
                outln!("| model | size | device | test | t/s |")?;
                outln!("| --- | ---: | --- | --- | ---: |")?;
            }
            outln!(
                "| {} | {} | {} {} | {} | {:.2} ± {:.2} |",
                path.file_name().map_or_else(
                    || path.display().to_string(),
                    |n| n.to_string_lossy().into_owned()
                ),
                m40_llm::units::human_bytes(file_bytes, 2),
                device.kind,
                device.name,
                r.name,
                r.avg_ts,
                r.stddev_ts
            )?;
        }
        results.push(r);
    }
    if args.json {
        let out = serde_json::json!({
            "model": path.display().to_string(),
            "model_bytes": file_bytes,
            "device": device,
            "commit": COMMIT,
            "repetitions": args.repetitions,
            "tests": results,
        });
        outln!("{out}")?;
    } else {
        outln!("device: {device}; commit {COMMIT}")?;
    }
    Ok(())
}
