//! `m40-llm inspect [MODEL] [--json] [--check]`: what a GGUF file holds, and (with `--check`)
//! whether every weight is a finite number.

use super::io::outln;
use anyhow::{Context, bail};
use m40_llm::gguf::quants::{can_dequantize, dequantize_rows_f32};
use m40_llm::gguf::{GgufFile, TensorInfo};
use m40_llm::inspect::ModelSummary;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The GGUF file (default: the default model, fetched if missing).
    #[arg(value_parser = super::io::non_empty_path)]
    pub model: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also dequantize every tensor and report non-finite values (NaN, ±inf); the command then
    /// fails (exit 1) if any tensor holds one.
    #[arg(long)]
    pub check: bool,
}

/// A tensor holding non-finite values: how many, and the first.
#[derive(serde::Serialize)]
struct NonFinite {
    tensor: String,
    count: u64,
    first_index: u64,
    first_value: String,
}

/// What `--check` found.
#[derive(serde::Serialize, Default)]
struct Check {
    tensors_checked: usize,
    values_checked: u64,
    /// Tensors of a type that cannot be dequantized (not checked).
    skipped: Vec<String>,
    non_finite: Vec<NonFinite>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let path = super::model_or_default(args.model)?;
    let file = GgufFile::open(&path)?;
    let summary = ModelSummary::from_gguf(&file)?;
    let check = if args.check {
        Some(check(&file)?)
    } else {
        None
    };
    if args.json {
        let mut json = serde_json::to_value(&summary).context("cannot encode the summary")?;
        if let (Some(c), Some(obj)) = (&check, json.as_object_mut()) {
            obj.insert("check".into(), serde_json::to_value(c)?);
        }
        let json = serde_json::to_string_pretty(&json).context("cannot encode the summary")?;
        outln!("{json}")?;
    } else {
        super::io::out(format_args!("{summary}"))?;
        if let Some(c) = &check {
            outln!(
                "check: {} tensors, {} values dequantized; {} skipped (type not dequantizable)",
                c.tensors_checked,
                c.values_checked,
                c.skipped.len()
            )?;
            for n in &c.non_finite {
                outln!(
                    "  non-finite: {} holds {} (first at index {}: {})",
                    n.tensor,
                    n.count,
                    n.first_index,
                    n.first_value
                )?;
            }
            if c.non_finite.is_empty() {
                outln!("  every value is finite")?;
            }
        }
    }
    if let Some(c) = check
        && let Some(first) = c.non_finite.first()
    {
        bail!(
            "{} of {} tensors hold non-finite values (first: {}[{}] = {})",
            c.non_finite.len(),
            c.tensors_checked,
            first.tensor,
            first.first_index,
            first.first_value
        );
    }
    Ok(())
}

/// Dequantizes every tensor, a block of rows at a time (bounded memory), looking for NaN and ±inf.
fn check(file: &GgufFile) -> anyhow::Result<Check> {
    let mut out = Check::default();
    for t in file.tensors() {
        if !can_dequantize(t.ty) {
            out.skipped.push(t.name.clone());
            continue;
        }
        out.tensors_checked += 1;
        out.values_checked += t.n_elements();
        if let Some(n) = check_tensor(file, t)? {
            out.non_finite.push(n);
        }
    }
    Ok(out)
}

fn check_tensor(file: &GgufFile, t: &TensorInfo) -> anyhow::Result<Option<NonFinite>> {
    // About 4 MiB of f32 at a time.
    let rows_per_block = (1u64 << 20) / t.row_len().max(1);
    let rows_per_block = rows_per_block.max(1);
    let mut found: Option<NonFinite> = None;
    let mut row = 0;
    while row < t.n_rows() {
        let end = (row + rows_per_block).min(t.n_rows());
        let values = dequantize_rows_f32(file, t, row..end)?;
        for (i, v) in values.iter().enumerate() {
            if v.is_finite() {
                continue;
            }
            match &mut found {
                Some(n) => n.count += 1,
                None => {
                    found = Some(NonFinite {
                        tensor: t.name.clone(),
                        count: 1,
                        first_index: row * t.row_len() + i as u64,
                        first_value: v.to_string(),
                    });
                }
            }
        }
        row = end;
    }
    Ok(found)
}
