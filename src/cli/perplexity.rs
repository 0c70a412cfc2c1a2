//! `m40-llm perplexity`: perplexity of a model over a text, computed as llama.cpp's
//! `llama-perplexity` computes it, so the numbers compare directly.
//!
//! The text is tokenized whole (BOS first if the model adds one) and cut into windows of
//! `--ctx-size` tokens (512 by default, as llama-perplexity); each window is evaluated from an empty cache (its first token replaced by BOS when
//! the model uses one), and only the second half of each window is scored: position `j` in
//! `ctx/2 .. ctx-1` contributes `-log p(token[j+1] | token[..=j])`. PPL = exp(mean), with the
//! standard error of the mean propagated as llama.cpp does.

use super::io::note;
use super::model_or_default;
use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use m40_llm::runtime::model::load;
use std::io::Write;
use std::path::PathBuf;

/// Tokens per window without --ctx-size (llama-perplexity's default).
const DEFAULT_WINDOW: u64 = 512;

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// The text file to score (UTF-8, at most --max-input-bytes; `-` reads standard input).
    #[arg(short, long, value_parser = super::io::non_empty_path)]
    pub file: PathBuf,
    /// Score at most this many windows (default: all the text holds).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub chunks: Option<u64>,
}

/// The running sums of llama.cpp's perplexity.
#[derive(Default)]
struct Nll {
    sum: f64,
    sum_sq: f64,
    count: usize,
}

impl Nll {
    fn add(&mut self, logits: &[f32], token: u32) {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum_exp: f64 = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
        let log_prob = f64::from(logits[token as usize] - max) - sum_exp.ln();
        self.sum -= log_prob;
        self.sum_sq += log_prob * log_prob;
        self.count += 1;
    }

    fn ppl(&self) -> f64 {
        (self.sum / self.count as f64).exp()
    }

    /// The uncertainty of the estimate, as llama.cpp reports it (`PPL +/- this`).
    fn ppl_error(&self) -> f64 {
        let n = self.count as f64;
        let mean = self.sum / n;
        let var = self.sum_sq / n - mean * mean;
        if var > 0.0 && n > 1.0 {
            (var / (n - 1.0)).sqrt() * self.ppl()
        } else {
            0.0
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let text = super::io::read_text(&args.file, "--file")?;
    let name = if args.file.as_os_str() == "-" {
        "standard input".to_string()
    } else {
        args.file.display().to_string()
    };
    let path = model_or_default(args.model.model.clone())?;
    // Windows of --ctx-size tokens (the shared flag), 512 unless given.
    let ctx = args.model.ctx_size.unwrap_or(DEFAULT_WINDOW) as usize;
    if ctx < 4 {
        bail!("--ctx-size {ctx} is too small for perplexity: windows need at least 4 tokens");
    }
    let mut options = args.model.load_options(1);
    options.ctx_size = Some(ctx);
    options.max_tokens = options.max_tokens.min(ctx as u64);
    options.max_outputs = options.max_tokens;
    let mut model = load(&path, &options)?;
    let tokenizer = &model.tokenizer;
    let tokens = tokenizer.encode(&text, tokenizer.add_bos(), false);
    if tokens.len() < 2 * ctx {
        bail!(
            "{} has {} tokens; perplexity with --ctx-size {ctx} needs at least {} (two windows)",
            name,
            tokens.len(),
            2 * ctx
        );
    }
    let bos = tokenizer
        .add_bos()
        .then(|| tokenizer.special().bos)
        .flatten();
    let n_chunks = (tokens.len() / ctx).min(args.chunks.map_or(usize::MAX, |c| c as usize));
    note!(
        "m40-llm: perplexity of {} over {n_chunks} windows of {ctx} tokens ({} tokens) on {}",
        name,
        tokens.len(),
        model.engine.device()
    );
    let bar = ProgressBar::new(n_chunks as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} windows, {elapsed} (eta {eta}) {msg}")
            .context("progress bar template")?,
    );
    let first = ctx / 2;
    let mut nll = Nll::default();
    let mut out = std::io::stdout().lock();
    let engine = &mut model.engine;
    for i in 0..n_chunks {
        let mut window = tokens[i * ctx..(i + 1) * ctx].to_vec();
        if let Some(b) = bos {
            window[0] = b;
        }
        // Only the scored second half of the window needs logits.
        let mut seq = engine.new_sequence();
        let logits = engine.evaluate(&mut seq, &window, first);
        engine.release(seq);
        let logits = logits?;
        for j in first..ctx - 1 {
            nll.add(logits.row(j - first), tokens[i * ctx + j + 1]);
        }
        write!(out, "[{}]{:.4},", i + 1, nll.ppl())
            .and_then(|()| out.flush())
            .context("cannot write to stdout")?;
        bar.set_message(format!("PPL {:.4}", nll.ppl()));
        bar.inc(1);
    }
    bar.finish_and_clear();
    writeln!(
        out,
        "\nFinal estimate: PPL = {:.4} +/- {:.5}",
        nll.ppl(),
        nll.ppl_error()
    )
    .and_then(|()| out.flush())
    .context("cannot write to stdout")?;
    Ok(())
}
