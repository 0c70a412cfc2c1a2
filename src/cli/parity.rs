//! `m40-llm parity --ops [--backend B] [--filter OP] [--json]`: every per-op case of
//! `m40_llm::backend::parity::ops` on every available backend (or one), one line per case.

use super::io::{note, outln};
use anyhow::{Context, bail};
use m40_llm::backend::parity::{self, BACKENDS, BackendEntry, ops};

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
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.ops {
        bail!("nothing to compare: pass --ops to run the per-op cases");
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
    let mut cases = ops::cases();
    if let Some(f) = &args.filter {
        cases.retain(|c| c.matches(f));
        if cases.is_empty() {
            bail!("no case matches `{f}` (an op name such as `matmul`, or part of a case name)");
        }
    }
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
