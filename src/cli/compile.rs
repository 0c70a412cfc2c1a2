//! `m40-llm compile [MODEL]`: lower, fuse, schedule and place a model for a target; print or
//! save the plan, and say whether it fits the target's memory (`--target`, `--max-vram`).

use super::io::note;
use anyhow::Context;
use m40_llm::backend::device::{GpuInfo, preferred_gpu, probe_gpus};
use m40_llm::backend::fit::{FitReport, parse_size};
use m40_llm::backend::target::{Target, TargetKind};
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
    /// rope-kv-write, rope-qkv-write.
    #[arg(long = "disable-pass", value_name = "NAME")]
    pub disable_pass: Vec<String>,
    /// Give every value its own buffer, so any value can be read back after a step.
    #[arg(long)]
    pub no_reuse: bool,
    /// What to compile for: cpu, cuda (the GPU found, else sm_52) or cuda:sm_XY (e.g. cuda:sm_52
    /// for a Tesla M40, cuda:sm_90); works with no GPU present. With it, the fit report is
    /// printed after the summary.
    #[arg(long, value_name = "TARGET")]
    pub target: Option<String>,
    /// The memory budget of the target, e.g. 24G, 24GiB, 512M (binary units) or bytes; without
    /// it, the probed device's memory (or the machine's for cpu).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_vram: Option<u64>,
    /// Tokens of context per sequence for the fit [default: the model's, at most 4096].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub ctx_size: Option<u64>,
    /// Sequences held at once, for the fit.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub parallel: u64,
    /// Print the fit report as JSON (alone; implies the fit report).
    #[arg(long, conflicts_with_all = ["dump_graph"])]
    pub json: bool,
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
    let fit_wanted = args.target.is_some() || args.max_vram.is_some() || args.json;
    let (target, no_budget) = target_for(args.target.as_deref().unwrap_or("cpu"), args.max_vram)?;
    let compiled = compile(&file, &options, &target)?;
    let plan = compiled.plan;
    // A plan for another machine is fine to write, but say it cannot run on this one.
    if target.kind == TargetKind::Cpu
        && let Err(e) = m40_llm::backend::cpu::check_memory(&plan, 0)
    {
        tracing::warn!("this plan cannot run on this machine: {e}");
    }
    let fit = if fit_wanted {
        let ctx = args.ctx_size.unwrap_or_else(|| {
            plan.model.as_ref().map_or(DEFAULT_CTX_SIZE, |m| {
                u64::from(m.hparams.context_length).min(DEFAULT_CTX_SIZE)
            })
        });
        let mut fit = FitReport::new(&plan, &target, &compiled.unfused, ctx, args.parallel)?;
        if let (None, Some(why)) = (fit.budget_bytes, no_budget) {
            fit.budget_source = format!("{why}; give --max-vram SIZE for a verdict");
        }
        Some(fit)
    } else {
        None
    };

    if let Some(out) = &args.output {
        let format = args.format.unwrap_or_else(|| format_for(out));
        super::io::write_output(out, render(&plan, format).as_bytes(), &[&path])
            .with_context(|| format!("writing the plan to {}", out.display()))?;
        note!("wrote the plan ({}) to {}", format.name(), out.display());
    }
    if let (true, Some(fit)) = (args.json, &fit) {
        println!("{}", fit.to_json());
        return Ok(());
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
    if let Some(fit) = &fit {
        print!("\n{fit}");
    }
    Ok(())
}

/// The context size the fit uses when `--ctx-size` is not given (as `run` does).
const DEFAULT_CTX_SIZE: u64 = m40_llm::runtime::model::DEFAULT_CTX_SIZE as u64;

/// The target `name` asks for, with its budget: `--max-vram`, else a probed device's memory.
/// `cuda` takes the GPU `--device auto` would prefer; `cuda:sm_XY` the memory of a GPU of that
/// compute capability if there is one. No GPU and no `--max-vram`: no budget, and why (the
/// report says so rather than inventing a number).
fn target_for(name: &str, max_vram: Option<u64>) -> anyhow::Result<(Target, Option<String>)> {
    let target = Target::parse(name)?;
    if let Some(bytes) = max_vram {
        return Ok((target.with_budget(bytes, "--max-vram"), None));
    }
    let TargetKind::Cuda { sm } = target.kind else {
        return Ok((target, None));
    };
    let gpus = match probe_gpus() {
        Ok(gpus) => gpus,
        Err(why) => return Ok((target, Some(format!("no GPU probed: {why}")))),
    };
    let gpu: Option<&GpuInfo> = if name == "cuda" {
        preferred_gpu(&gpus)
    } else {
        let same_sm = |g: &&GpuInfo| {
            let (major, minor) = g.compute_capability;
            i64::from(major) * 10 + i64::from(minor) == i64::from(sm)
        };
        let matching: Vec<GpuInfo> = gpus.iter().filter(same_sm).cloned().collect();
        preferred_gpu(&matching).and_then(|p| gpus.iter().find(|g| g.ordinal == p.ordinal))
    };
    match gpu {
        Some(gpu) => Ok((Target::for_gpu(gpu)?, None)),
        None => {
            let why = format!("no supported GPU of sm_{sm} among the {} found", gpus.len());
            Ok((target, Some(why)))
        }
    }
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
