//! `m40-llm parity --ops [--backend B] [--filter OP] [--json]`: every per-op case of
//! `m40_llm::backend::parity::ops` on every available backend (or one), one line per case.
//!
//! `m40-llm parity [--model M] --prompt P [--backend B]`: the model's plan (buffer reuse off) on
//! the CPU backend and on B (default `cuda`), every value compared, one line per value, the
//! first over `--tolerance` flagged.

use super::io::{note, outln};
use anyhow::{Context, bail};
use m40_llm::backend::parity::{self, BACKENDS, BackendEntry, model, ops};
use m40_llm::backend::target::Target;
use m40_llm::gguf::GgufFile;
use m40_llm::plan::{PlanOptions, Reuse};
use m40_llm::tokenizer::Tokenizer;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// Run the per-op table: every op and fused op, against the f64 reference.
    #[arg(long)]
    pub ops: bool,
    /// Only this backend (default: every backend available on this machine).
    #[arg(long, value_name = "NAME")]
    pub backend: Option<String>,
    /// Only the cases of this op (`matmul`), or whose name contains this text (`q4_k`).
    #[arg(long, value_name = "OP")]
    pub filter: Option<String>,
    /// One JSON object per case (JSON lines) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Compare the whole model on this prompt (CPU backend against --backend, default cuda).
    #[arg(long, conflicts_with_all = ["ops", "filter"])]
    pub prompt: Option<String>,
    /// The GGUF model for --prompt (default: the default model, fetched if missing).
    #[arg(short, long, requires = "prompt", value_parser = super::io::non_empty_path)]
    pub model: Option<std::path::PathBuf>,
    /// Largest relative error (of the value's largest magnitude) a value may have with --prompt.
    /// The default allows for the FP16 KV cache: two FP32 paths that agree to 1e-7 round some
    /// K and V values to different FP16 neighbours, which moves later values by ~1e-3.
    #[arg(long, default_value_t = 5e-3, requires = "prompt")]
    pub tolerance: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(prompt) = &args.prompt {
        return run_model(&args, prompt);
    }
    if !args.ops {
        bail!(
            "nothing to compare: pass --ops to run the per-op cases, or --prompt P to compare a \
             model on two backends"
        );
    }
    let mut cases = ops::cases();
    if let Some(f) = &args.filter {
        cases.retain(|c| c.matches(f));
        if cases.is_empty() {
            bail!("no case matches `{f}` (an op name such as `matmul`, or part of a case name)");
        }
    }
    let backends: Vec<&BackendEntry> = match &args.backend {
        Some(name) => {
            let entry = parity::backend(name).with_context(|| {
                let known: Vec<&str> = BACKENDS.iter().map(|b| b.name).collect();
                format!("no backend `{name}` (known: {})", known.join(", "))
            })?;
            if let Some(why) = (entry.unavailable)() {
                bail!("backend `{name}` cannot run here: {why}");
            }
            vec![entry]
        }
        None => BACKENDS
            .iter()
            .filter(|b| match (b.unavailable)() {
                None => true,
                Some(why) => {
                    note!("note: skipping backend `{}`: {why}", b.name);
                    false
                }
            })
            .collect(),
    };
    let (mut total, mut failed) = (0, 0);
    for entry in backends {
        for case in &cases {
            let report = ops::run_case(entry, case);
            total += 1;
            if !report.passed() {
                failed += 1;
            }
            if args.json {
                outln!("{}", serde_json::to_string(&report)?)?;
            } else {
                outln!("{}", line(&report))?;
            }
        }
    }
    if !args.json {
        outln!("{total} cases, {} passed, {failed} failed", total - failed)?;
    }
    if failed > 0 {
        bail!("{failed} of {total} parity cases failed");
    }
    Ok(())
}

/// The model-level comparison: one plan, the CPU backend and another, every value.
fn run_model(args: &Args, prompt: &str) -> anyhow::Result<()> {
    if !args.tolerance.is_finite() || args.tolerance < 0.0 {
        bail!("--tolerance must be a non-negative number");
    }
    let name = args.backend.as_deref().unwrap_or("cuda");
    let other = parity::backend(name).with_context(|| {
        let known: Vec<&str> = BACKENDS.iter().map(|b| b.name).collect();
        format!("no backend `{name}` (known: {})", known.join(", "))
    })?;
    if let Some(why) = (other.unavailable)() {
        bail!("backend `{name}` cannot run here: {why}");
    }
    let reference = parity::backend("cpu").context("the CPU backend is not registered")?;
    let path = super::model_or_default(args.model.clone())?;
    let file = Arc::new(GgufFile::open(&path)?);
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let tokens = tokenizer.encode(prompt, false, true);
    if tokens.is_empty() {
        bail!("the prompt has no tokens");
    }
    let target = if name == "cpu" {
        Target::cpu()
    } else {
        Target::parse("cuda")?
    };
    let options = m40_llm::CompileOptions {
        plan: PlanOptions {
            max_tokens: tokens.len() as u64,
            max_outputs: 1,
            reuse: Reuse::None,
            ..PlanOptions::default()
        },
        fuse: true,
        disabled_passes: Vec::new(),
    };
    let plan = m40_llm::compile(&file, &options, &target)?.plan;
    let kv = model::kv_needs(&tokens);
    let mut a = (reference.open)(plan.clone(), file.clone(), kv)?;
    let mut b = (other.open)(plan, file, kv)?;
    note!(
        "comparing {} values of {} ({} prompt tokens): cpu against {} ({})",
        model::values(a.plan()).len(),
        path.display(),
        tokens.len(),
        name,
        b.device()
    );
    let reports = model::compare(a.as_mut(), b.as_mut(), &tokens, args.tolerance)?;
    let first_over = reports.iter().position(|r| r.over);
    for (i, r) in reports.iter().enumerate() {
        if args.json {
            outln!("{}", serde_json::to_string(r)?)?;
        } else {
            let flag = match (r.over, first_over == Some(i)) {
                (true, true) => "OVER  <- first value over tolerance",
                (true, false) => "OVER",
                _ => "ok",
            };
            outln!(
                "{:>4} {:<16} {:<32} abs {:>9.2e}  rel {:>9.2e}  {flag}",
                r.step,
                r.op,
                r.value,
                r.max_abs,
                r.max_rel
            )?;
        }
    }
    let over = reports.iter().filter(|r| r.over).count();
    if !args.json {
        outln!(
            "{} values, {} within {:.0e}, {over} over",
            reports.len(),
            reports.len() - over,
            args.tolerance
        )?;
    }
    if let Some(i) = first_over {
        let r = &reports[i];
        bail!(
            "{over} values over tolerance; the first is `{}` (step {}, {}), rel {:.2e}",
            r.value,
            r.step,
            r.op,
            r.max_rel
        );
    }
    Ok(())
}

/// `cpu  matmul/q4_k/t7,k256,n40  abs 1.2e-7  rel 3.1e-8  (tol 1e-4)  ok`, and for a failure
/// the value and its worst element.
fn line(r: &ops::CaseReport) -> String {
    let status = match &r.outcome {
        ops::Outcome::Pass => "ok".to_string(),
        ops::Outcome::Error(e) => format!("ERROR: {e}"),
        ops::Outcome::Fail => {
            let worst = r
                .values
                .iter()
                .filter(|v| !v.passed())
                .map(|v| match &v.worst {
                    Some(w) => format!(
                        "{} at [{}, {}]: got {} want {}",
                        v.value, w.at[0], w.at[1], w.got, w.want
                    ),
                    None => v.value.clone(),
                })
                .collect::<Vec<_>>()
                .join("; ");
            format!("FAIL ({worst})")
        }
    };
    format!(
        "{:<5} {:<56} abs {:>9.2e}  rel {:>9.2e}  (tol {:.0e})  {status}",
        r.backend, r.case, r.max_abs, r.max_rel, r.tolerance
    )
}
