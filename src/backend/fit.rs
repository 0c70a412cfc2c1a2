//! The fit report: does a compiled plan fit in a target's memory, at a context size and a number
//! of sequences, and if not, what does not fit and by how much.
//!
//! What a run needs, all known before anything is loaded:
//! - the weights, as stored in the GGUF file (`plan.memory.weight_bytes`);
//! - the KV cache: `ctx_size` cells per sequence rounded up to whole pages of
//!   [`KV_PAGE_CELLS`] cells (the engine's paged cache hands out cells by the page), times
//!   `parallel` sequences, times `plan.memory.kv_bytes_per_token`;
//! - the activation arena (`plan.memory.arena_bytes`, sized for the plan's `max_tokens`);
//! - the target's runtime margin ([`Target::runtime_margin`]: the CUDA context and cuBLAS
//!   workspace on a GPU).
//!
//! Their total is compared with the target's budget. With no budget (a `cuda` target with no GPU
//! probed and no `--max-vram`), the report gives the sizes and no verdict.

use super::target::Target;
use crate::plan::Plan;
use crate::units::human_bytes;

/// Sizes in the report: one decimal, as the plan summary prints them.
fn human(bytes: u64) -> String {
    human_bytes(bytes, 1)
}
use serde::Serialize;
use std::fmt;

/// Cells per page of the paged KV cache: a sequence's cells are allocated in pages of this many.
pub const KV_PAGE_CELLS: u64 = 16;

/// A part of what a run needs, in the order the report adds them up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    Weights,
    RuntimeMargin,
    Arena,
    KvCache,
}

impl Part {
    /// What does not fit, when this is the first part over the budget.
    fn describe(self) -> &'static str {
        match self {
            Part::Weights => "the weights alone do not fit",
            Part::RuntimeMargin => "the runtime margin does not fit beside the weights",
            Part::Arena => "the activation arena does not fit beside the weights and the margin",
            Part::KvCache => "the KV cache does not fit beside the rest",
        }
    }
}

/// Whether a plan fits a target; see the [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FitReport {
    /// The target's name (`cuda:sm_52`).
    pub target: String,
    /// Every step of the plan is one the target runs (after any unfusing the target asked for).
    pub accepts_all_ops: bool,
    /// Fused steps the compiler unfused because the target has no kernel for them.
    pub unfused_for_target: Vec<String>,
    /// Tokens of context per sequence, as asked.
    pub ctx_size: u64,
    /// Sequences held at once.
    pub parallel: u64,
    /// KV cells allocated: `ctx_size` rounded up to whole pages, times `parallel`.
    pub kv_cells: u64,
    pub kv_bytes_per_token: u64,
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    pub arena_bytes: u64,
    pub runtime_margin_bytes: u64,
    pub total_bytes: u64,
    /// The memory available, if known.
    pub budget_bytes: Option<u64>,
    /// Where the budget comes from (`--max-vram`, a probed device), or why it is unknown.
    pub budget_source: String,
    /// `None` when the budget is unknown.
    pub fits: Option<bool>,
    /// Bytes left in the budget when it fits.
    pub headroom_bytes: Option<u64>,
    /// When it does not fit: the first part (adding up weights, margin, arena, KV cache) that
    /// overflows the budget.
    pub does_not_fit: Option<Part>,
    /// When it does not fit: `total - budget`.
    pub over_by_bytes: Option<u64>,
    /// The largest `--ctx-size` (whole pages) that fits at this `--parallel`; `None` when the
    /// budget is unknown or nothing but the KV cache already overflows it.
    pub largest_ctx_size: Option<u64>,
    /// The most sequences that fit at this `--ctx-size`.
    pub largest_parallel: Option<u64>,
    /// What to change when it does not fit.
    pub hint: Option<String>,
}

/// Why a fit cannot be computed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FitError {
    #[error("--ctx-size and --parallel must be at least 1")]
    Zero,
    #[error("{ctx_size} tokens x {parallel} sequences need more than 2^64 bytes")]
    Overflow { ctx_size: u64, parallel: u64 },
}

/// Cells for one sequence of `ctx_size` tokens: whole pages.
pub fn cells_per_sequence(ctx_size: u64) -> Option<u64> {
    ctx_size
        .checked_next_multiple_of(KV_PAGE_CELLS)
        .filter(|&c| c > 0)
}

impl FitReport {
    /// The fit of `plan` on `target` for `parallel` sequences of `ctx_size` tokens.
    /// `unfused` lists the steps the compiler unfused for the target.
    pub fn new(
        plan: &Plan,
        target: &Target,
        unfused: &[String],
        ctx_size: u64,
        parallel: u64,
    ) -> Result<FitReport, FitError> {
        if ctx_size == 0 || parallel == 0 {
            return Err(FitError::Zero);
        }
        let overflow = FitError::Overflow { ctx_size, parallel };
        let per_token = plan.memory.kv_bytes_per_token;
        let kv_cells = cells_per_sequence(ctx_size)
            .and_then(|c| c.checked_mul(parallel))
            .ok_or(overflow)?;
        let overflow = || FitError::Overflow { ctx_size, parallel };
        let kv_cache_bytes = kv_cells.checked_mul(per_token).ok_or_else(overflow)?;
        let parts = [
            (Part::Weights, plan.memory.weight_bytes),
            (Part::RuntimeMargin, target.runtime_margin),
            (Part::Arena, plan.memory.arena_bytes),
            (Part::KvCache, kv_cache_bytes),
        ];
        let total = parts
            .iter()
            .try_fold(0u64, |sum, &(_, b)| sum.checked_add(b))
            .ok_or_else(overflow)?;
        let fixed = total - kv_cache_bytes;
        let mut report = FitReport {
            target: target.name.clone(),
            accepts_all_ops: target.check_plan(plan).is_ok(),
            unfused_for_target: unfused.to_vec(),
            ctx_size,
            parallel,
            kv_cells,
            kv_bytes_per_token: per_token,
            weights_bytes: plan.memory.weight_bytes,
            kv_cache_bytes,
            arena_bytes: plan.memory.arena_bytes,
            runtime_margin_bytes: target.runtime_margin,
            total_bytes: total,
            budget_bytes: None,
            budget_source: format!(
                "no {} device was probed; give --max-vram SIZE for a verdict",
                target.name
            ),
            fits: None,
            headroom_bytes: None,
            does_not_fit: None,
            over_by_bytes: None,
            largest_ctx_size: None,
            largest_parallel: None,
            hint: None,
        };
        let Some(budget) = &target.budget else {
            return Ok(report);
        };
        let b = budget.bytes;
        report.budget_bytes = Some(b);
        report.budget_source = budget.source.clone();
        report.fits = Some(total <= b);
        // What the KV cache may take once the rest is in.
        let kv_room = b.checked_sub(fixed);
        let page_bytes = KV_PAGE_CELLS.saturating_mul(per_token);
        if let Some(room) = kv_room
            && page_bytes > 0
        {
            let pages_per_seq = room / parallel.saturating_mul(page_bytes).max(1);
            report.largest_ctx_size = Some(pages_per_seq * KV_PAGE_CELLS).filter(|&c| c > 0);
            let seq_bytes = kv_cache_bytes / parallel;
            report.largest_parallel = room.checked_div(seq_bytes).filter(|&p| p > 0);
        }
        if total <= b {
            report.headroom_bytes = Some(b - total);
            return Ok(report);
        }
        report.over_by_bytes = Some(total - b);
        let mut sum = 0u64;
        let first = parts.iter().find(|&&(_, bytes)| {
            sum = sum.saturating_add(bytes);
            sum > b
        });
        report.does_not_fit = first.map(|&(p, _)| p);
        report.hint = Some(match (report.does_not_fit, report.largest_ctx_size) {
            (Some(Part::KvCache), Some(ctx)) => {
                let mut hint = format!("use --ctx-size {ctx} or less at --parallel {parallel}");
                if let Some(p) = report.largest_parallel {
                    hint.push_str(&format!(
                        ", or --parallel {p} or less at --ctx-size {ctx_size}"
                    ));
                }
                hint
            }
            (Some(Part::KvCache), None) => {
                "not one page of KV cache per sequence fits: lower --parallel or --max-tokens"
                    .into()
            }
            (Some(Part::Arena), _) => format!(
                "the activation arena ({}) does not fit beside the weights: lower --max-tokens (the arena grows with the tokens per step)",
                human(plan.memory.arena_bytes)
            ),
            (Some(Part::RuntimeMargin), _) => format!(
                "the weights fit, but not with the {} the runtime needs: a smaller quantization of the model, or a device with more memory",
                human(target.runtime_margin)
            ),
            _ => format!(
                "the weights alone ({}) are larger than the budget: a smaller quantization of the model, or a device with more memory",
                human(plan.memory.weight_bytes)
            ),
        });
        Ok(report)
    }

    pub fn to_json(&self) -> String {
        // Only strings, numbers, booleans and enums: serializing cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// One line: fits or not, and by how much.
    pub fn verdict(&self) -> String {
        match (self.fits, self.budget_bytes) {
            (Some(true), Some(b)) => format!(
                "fits: {} of {} ({} free)",
                human(self.total_bytes),
                human(b),
                human(self.headroom_bytes.unwrap_or(0))
            ),
            (Some(false), Some(b)) => format!(
                "does not fit: {} needed, {} available, {} over; {}",
                human(self.total_bytes),
                human(b),
                human(self.over_by_bytes.unwrap_or(0)),
                self.does_not_fit.map_or("", |p| p.describe()),
            ),
            _ => format!(
                "no verdict: {} needed; the budget is unknown ({})",
                human(self.total_bytes),
                self.budget_source
            ),
        }
    }
}

/// The report as text, one figure per line.
impl fmt::Display for FitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ops = if self.accepts_all_ops {
            "every op and weight type accepted".to_string()
        } else {
            "some steps are not accepted".to_string()
        };
        writeln!(f, "fit on {}: {ops}", self.target)?;
        if !self.unfused_for_target.is_empty() {
            writeln!(
                f,
                "  unfused for the target: {}",
                self.unfused_for_target.join(", ")
            )?;
        }
        writeln!(f, "  weights          {:>12}", human(self.weights_bytes))?;
        writeln!(
            f,
            "  KV cache         {:>12}  ({} sequence(s) x {} tokens -> {} cells in pages of {}, {} B per cell)",
            human(self.kv_cache_bytes),
            self.parallel,
            self.ctx_size,
            self.kv_cells,
            KV_PAGE_CELLS,
            self.kv_bytes_per_token
        )?;
        writeln!(f, "  arena            {:>12}", human(self.arena_bytes))?;
        writeln!(
            f,
            "  runtime margin   {:>12}",
            human(self.runtime_margin_bytes)
        )?;
        writeln!(f, "  total            {:>12}", human(self.total_bytes))?;
        match self.budget_bytes {
            Some(b) => writeln!(
                f,
                "  budget           {:>12}  ({})",
                human(b),
                self.budget_source
            )?,
            None => writeln!(
                f,
                "  budget           {:>12}  ({})",
                "unknown", self.budget_source
            )?,
        }
        writeln!(f, "{}", self.verdict())?;
        if let Some(hint) = &self.hint {
            writeln!(f, "hint: {hint}")?;
        } else if self.fits == Some(true)
            && let Some(ctx) = self.largest_ctx_size
        {
            writeln!(
                f,
                "largest context at --parallel {}: {ctx} tokens",
                self.parallel
            )?;
        }
        Ok(())
    }
}

/// Why a size does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid size `{0}`: give bytes or a number with a binary unit, e.g. 24G, 24GiB, 512M, 512MiB, 1.5G (K, M, G and T are powers of 1024)"
)]
pub struct SizeError(pub String);

/// Parses a memory size: plain bytes (`1000`), or a number (with at most 9 decimals) and a
/// binary unit `K`, `M`, `G`, `T`, each alone or followed by `iB` (`24G` = `24GiB` = 24 × 2^30).
/// Decimal units (`GB`) are refused rather than guessed.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let err = || SizeError(text.to_string());
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let shift = match unit.trim_start() {
        "" | "B" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        _ => return Err(err()),
    };
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty()
        || frac.len() > 9
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || (shift == 0 && !frac.is_empty())
    {
        return Err(err());
    }
    let int: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| err())?
    };
    let unit = 1u64 << shift;
    let mut bytes = int.checked_mul(unit).ok_or_else(err)?;
    if !frac.is_empty() {
        let digits: u64 = frac.parse().map_err(|_| err())?;
        let scale = 10u64.pow(frac.len() as u32);
        let part = u128::from(digits) * u128::from(unit) / u128::from(scale);
        bytes = bytes
            .checked_add(u64::try_from(part).map_err(|_| err())?)
            .ok_or_else(err)?;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        let cases = [
            ("24G", 24u64 << 30),
            ("24GiB", 24 << 30),
            ("50M", 50 << 20),
            ("512MiB", 512 << 20),
            ("1000", 1000),
            ("1000B", 1000),
            ("4K", 4096),
            ("1T", 1 << 40),
            ("1.5G", 3 << 29),
            ("0.5M", 512 << 10),
            (" 24 G ", 24 << 30),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in [
            "",
            "G",
            "24GB",
            "24 gigs",
            "-1",
            "1.5",
            "1e9",
            "24X",
            "1..5G",
            "99999999999T",
            "18446744073709551616",
            "1.0000000001G",
        ] {
            let err = parse_size(bad).unwrap_err();
            assert_eq!(err, SizeError(bad.to_string()));
            assert!(err.to_string().contains("24GiB"), "{err}");
        }
    }

    #[test]
    fn cells_are_whole_pages() {
        assert_eq!(cells_per_sequence(1), Some(16));
        assert_eq!(cells_per_sequence(16), Some(16));
        assert_eq!(cells_per_sequence(17), Some(32));
        assert_eq!(cells_per_sequence(8192), Some(8192));
        assert_eq!(cells_per_sequence(u64::MAX), None);
    }
}
