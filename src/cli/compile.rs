//! `m40-llm compile [MODEL]`: lower, fuse, schedule and place a model; print or save the plan.

use super::io::note;
use anyhow::Context;
use m40_llm::gguf::GgufFile;
use m40_llm::plan::{Plan, PlanOptions, Reuse, dot, text};
use m40_llm::{CompileOptions, compile};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
#[command(group(clap::ArgGroup::new("destination").args(["dump_graph", "output"]).multiple(true)))]
pub struct Args {
    /// The GGUF model (default: the default model, fetched if missing).
    #[arg(value_parser = super::io::non_empty_path)]
    pub model: Option<PathBuf>,
    /// Print the whole plan: one line per step, then the summary (without it: the summary).
    #[arg(long)]
    pub dump_graph: bool,
    /// Format of the dump and of -o: text, dot (Graphviz) or json (the plan as data, loadable).
    /// With -o and no --format, the file's extension picks it (.json, .dot or .gv, else text).
    #[arg(long, value_enum, requires = "destination")]
    pub format: Option<Format>,
    /// The most tokens one step runs: the arena is sized for it.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub max_tokens: u64,
    /// The most tokens per step whose logits are returned [default: --max-tokens].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub max_outputs: Option<u64>,
    /// Write the plan to FILE.
    /// Written atomically (a temporary file, then a rename); never over the model.
    #[arg(short = 'o', long = "output", value_name = "FILE", value_parser = super::io::non_empty_path)]
    pub output: Option<PathBuf>,
    /// Run no fusion pass.
    #[arg(long)]
    pub no_fuse: bool,
    /// Skip a fusion pass (repeatable): swiglu, gate-up-merge, qkv-merge, add-rmsnorm,
    /// rope-kv-write.
    #[arg(long = "disable-pass", value_name = "NAME")]
    pub disable_pass: Vec<String>,
    /// Give every value its own buffer, so any value can be read back after a step.
    #[arg(long)]
    pub no_reuse: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Dot,
    Json,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let path = super::model_or_default(args.model.clone())?;
    let file = GgufFile::open(&path)?;
    let options = CompileOptions {
        plan: PlanOptions {
            max_tokens: args.max_tokens,
            max_outputs: args.max_outputs.unwrap_or(args.max_tokens),
            reuse: if args.no_reuse {
                Reuse::None
            } else {
                Reuse::Liveness
            },
            ..PlanOptions::default()
        },
        fuse: !args.no_fuse,
        disabled_passes: args.disable_pass.clone(),
    };
    let plan = compile(&file, &options)?.plan;
    // A plan for another machine is fine to write, but say it cannot run on this one.
    if let Err(e) = m40_llm::backend::cpu::check_memory(&plan, 0) {
        tracing::warn!("this plan cannot run on this machine: {e}");
    }

    if let Some(out) = &args.output {
        let format = args.format.unwrap_or_else(|| format_for(out));
        super::io::write_output(out, render(&plan, format).as_bytes(), &[&path])
            .with_context(|| format!("writing the plan to {}", out.display()))?;
        note!("wrote the plan ({}) to {}", format.name(), out.display());
    }
    if args.dump_graph {
        super::io::out(format_args!(
            "{}",
            render(&plan, args.format.unwrap_or(Format::Text))
        ))?;
    } else {
        super::io::out(format_args!(
            "{}\n{}",
            text::header(&plan),
            text::summary(&plan)
        ))?;
    }
    Ok(())
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Dot => "dot",
            Format::Json => "json",
        }
    }
}

fn render(plan: &Plan, format: Format) -> String {
    match format {
        Format::Text => text::render(plan),
        Format::Dot => dot::render(plan),
        Format::Json => plan.to_json() + "\n",
    }
}

/// The format a file name asks for.
fn format_for(path: &Path) -> Format {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => Format::Json,
        Some("dot" | "gv") => Format::Dot,
        _ => Format::Text,
    }
}
