//! Command-line interface: argument parsing, logging set-up and error reporting. Each subcommand
//! lives in its own file and only translates between arguments and library calls.

mod compile;
mod fetch;
mod inspect;

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
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Fetch(args) => fetch::run(args),
        Command::Compile(args) => compile::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, joined.
            eprintln!("error: {e:#}");
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
        None => m40_llm::models::ensure_default_model(),
    }
}
