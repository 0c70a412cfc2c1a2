//! Command-line interface: argument parsing, logging set-up and error reporting. Each subcommand
//! lives in its own file and only translates between arguments and library calls.

mod bench;
mod chat;
mod compile;
mod devices;
mod doctor;
mod fetch;
mod inspect;
pub mod io;
mod logits;
pub mod models;
mod parity;
mod perplexity;
mod run;
#[cfg(feature = "server")]
mod serve;
mod synth;
mod tokenize;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "m40-llm",
    version,
    about = "LLM inference for Tesla M40 and newer NVIDIA GPUs, built as a compute-graph compiler"
)]
struct Cli {
    /// More logging (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// The largest text input (prompt or text file, stdin) in bytes; K, M, G suffixes
    /// (powers of 1024) allowed.
    #[arg(long, global = true, value_name = "SIZE", env = io::MAX_INPUT_ENV,
          default_value_t = io::DEFAULT_MAX_INPUT, value_parser = io::parse_size)]
    max_input_bytes: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a GGUF model's metadata, hyperparameters and tensors.
    Inspect(inspect::Args),
    /// Download the default model (SmolLM2-135M-Instruct Q4_1) if it is missing.
    Fetch(fetch::Args),
    /// Compile a model into a plan (lower, fuse, schedule, place buffers); print or save it.
    Compile(compile::Args),
    /// Tokenize a text with a model's tokenizer (ids as llama.cpp gives them).
    Tokenize(tokenize::Args),
    /// List the NVIDIA GPUs found and say which device `--device auto` uses.
    Devices(devices::Args),
    /// Check the CUDA toolchain (driver, NVRTC, cuBLAS, GPUs) and compile every kernel.
    Doctor(doctor::Args),
    /// Generate text from a prompt, streaming it to stdout.
    Run(run::Args),
    /// Chat with the model in the terminal (multi-turn, streaming; history kept in the KV cache).
    Chat(chat::Args),
    /// Print the largest logits after a prompt as JSON lines (to compare with other runtimes).
    Logits(logits::Args),
    /// Perplexity over a text file, computed as llama.cpp's llama-perplexity does.
    Perplexity(perplexity::Args),
    /// Prompt-processing and generation tokens/s, as llama-bench measures them.
    Bench(bench::Args),
    /// Serve the model over an OpenAI-compatible HTTP API (continuous batching).
    #[cfg(feature = "server")]
    Serve(serve::Args),
    /// Check backends against the reference math, op by op (`--ops`).
    Parity(parity::Args),
    /// Write a random-weight GGUF of a real model's shape (for measuring speed at real sizes).
    Synth(synth::Args),
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return parse_error(&e),
    };
    init_logging(cli.verbose);
    io::set_max_input(cli.max_input_bytes);
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Fetch(args) => fetch::run(args),
        Command::Compile(args) => compile::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Devices(args) => devices::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Run(args) => run::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Bench(args) => bench::run(args),
        #[cfg(feature = "server")]
        Command::Serve(args) => serve::run(args),
        Command::Parity(args) => parity::run(args),
        Command::Synth(args) => synth::run(args),
    };
    // Whatever is still buffered must reach stdout too, or the command failed.
    let result = result.and_then(|()| {
        use std::io::Write;
        anyhow::Context::context(std::io::stdout().flush(), "cannot write to stdout")
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, joined.
            io::note!("error: {e:#}");
            if e.downcast_ref::<models::FetchError>()
                .is_some_and(|f| matches!(f, models::FetchError::Interrupted))
                || e.downcast_ref::<m40_llm::lower::synth::SynthError>()
                    .is_some_and(|s| matches!(s, m40_llm::lower::synth::SynthError::Interrupted))
            {
                // As a shell reports a command ended by SIGINT.
                return ExitCode::from(130);
            }
            ExitCode::FAILURE
        }
    }
}

/// Prints clap's help, version or usage error; a help text that cannot be written is an error.
fn parse_error(e: &clap::Error) -> ExitCode {
    use std::io::Write;
    let printed = e.print().and_then(|()| std::io::stdout().flush());
    match printed {
        Ok(()) => ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2)),
        Err(why) => {
            io::note!("error: cannot write to stdout: {why}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
}

/// The model a command should use: the given path, or the default model (fetched if missing).
fn model_or_default(model: Option<std::path::PathBuf>) -> anyhow::Result<std::path::PathBuf> {
    match model {
        Some(p) => Ok(p),
        None => Ok(models::ensure_default_model()?),
    }
}

/// The flags every command that runs a model shares.
#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// The GGUF model (default: the default model, fetched if missing).
    #[arg(short, long, value_parser = io::non_empty_path)]
    model: Option<std::path::PathBuf>,
    /// Where to run: auto (a GPU when one can run the model, else the CPU; the choice is
    /// logged), cpu or cuda.
    #[arg(long, value_enum, default_value_t = m40_llm::backend::device::DeviceChoice::Auto)]
    device: m40_llm::backend::device::DeviceChoice,
    /// The GPU to run on (its CUDA ordinal, as `m40-llm devices` lists them) instead of the
    /// preferred one (a Tesla M40 first, then the GPU with the most memory).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=1023))]
    gpu: Option<u32>,
    /// The GPU memory the model may use (e.g. 24G, 12000M), checked before anything is
    /// uploaded (default: the device's memory).
    #[arg(long, value_name = "SIZE", value_parser = m40_llm::backend::fit::parse_size)]
    max_vram: Option<u64>,
    /// Tokens of context (default: the model's, at most 4096).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    ctx_size: Option<u64>,
    /// CPU threads for the CPU backend (default: one per core). More than the machine's cores
    /// is clamped to them (with a warning) unless --force-threads.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    threads: Option<u64>,
    /// Use --threads as given, even above the number of cores.
    #[arg(long, requires = "threads")]
    force_threads: bool,
    /// Run the plan without fusion passes (fused and unfused plans must agree).
    #[arg(long)]
    no_fuse: bool,
}

impl ModelArgs {
    /// Load options for these flags, returning at most `max_outputs` logits rows per step. Sets
    /// the CPU thread count as a side effect (once per process).
    fn load_options(&self, max_outputs: u64) -> m40_llm::runtime::model::LoadOptions {
        if let Some(n) = self.threads {
            let n = threads(n, self.force_threads);
            // Fails only if the pool was already built, which the CLI does not do elsewhere.
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global();
        }
        m40_llm::runtime::model::LoadOptions {
            device: self.device,
            gpu: self.gpu.map(|n| n as usize),
            max_vram: self.max_vram,
            ctx_size: self.ctx_size.map(|n| n as usize),
            max_outputs,
            fuse: !self.no_fuse,
            ..Default::default()
        }
    }
}

/// The thread count to use for `--threads n`: at most the available parallelism unless forced
/// (oversubscribed threads spin against each other: 1000 threads on 2 cores run ~100x slower).
fn threads(n: u64, force: bool) -> usize {
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    if n > cores && !force {
        tracing::warn!(
            "--threads {n} is more than the {cores} cores available: using {cores} (--force-threads keeps {n})"
        );
        return cores;
    }
    n
}
