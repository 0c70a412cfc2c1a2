//! `m40-llm synth`: a random-weight GGUF of a real model's shape, streamed to disk, with the
//! tokenizer of a vocabulary GGUF (see `m40_llm::lower::synth`).

use super::io::note;
use super::models;
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use m40_llm::gguf::GgufFile;
use m40_llm::lower::synth::{Synth, SynthShape, SynthType};
use m40_llm::units::human_bytes;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The real model whose hyperparameters the file has.
    #[arg(long, value_enum)]
    pub shape: SynthShape,
    /// How the weights are stored: f16, q8_0, q4_0 (every matrix), or q4_k_m (llama.cpp's
    /// Q4_K_M mix). Norms and biases are F32.
    #[arg(long = "type", value_enum)]
    pub ty: SynthType,
    /// The file to write (through a temporary file renamed at the end).
    #[arg(short, long, value_parser = super::io::non_empty_path)]
    pub output: PathBuf,
    /// The GGUF whose tokenizer is copied (default: the default model, fetched if missing).
    /// A vocabulary smaller than the shape's is padded with unused tokens.
    #[arg(long, value_parser = super::io::non_empty_path)]
    pub vocab: Option<PathBuf>,
    /// Seed of the random weights (the same seed writes the same bytes).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The number of layers instead of the shape's (for tests and quick runs).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub layers: Option<u32>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let vocab_path = super::model_or_default(args.vocab)?;
    let vocab = GgufFile::open(&vocab_path)
        .with_context(|| format!("cannot read the vocabulary {}", vocab_path.display()))?;
    let synth = Synth::new(args.shape, args.ty, args.seed, args.layers)?;
    let metadata = synth.metadata(&vocab)?;
    let total = synth.file_bytes(&metadata)?;
    let p = &synth.params;
    let tokens = vocab
        .optional_array("tokenizer.ggml.tokens")?
        .map_or(0, |a| a.len());
    if (tokens as u64) < u64::from(p.n_vocab) {
        note!(
            "m40-llm: the vocabulary {} has {tokens} tokens; padding to the shape's {} with unused tokens",
            vocab_path.display(),
            p.n_vocab
        );
    }
    note!(
        "m40-llm: writing {} ({} {}, {} layers, {})",
        args.output.display(),
        args.shape.name(),
        args.ty.name(),
        p.n_layers,
        human_bytes(total, 1)
    );
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} (eta {eta})",
        )
        .context("progress bar template")?,
    );
    let start = std::time::Instant::now();
    let _signals = models::SignalGuard::install();
    super::io::write_output_with(&args.output, &[vocab_path.as_path()], |w| {
        synth.write(
            &metadata,
            w,
            &mut |done| bar.set_position(done),
            &models::interrupted,
        )?;
        Ok(())
    })?;
    bar.finish_and_clear();
    note!(
        "m40-llm: wrote {} ({}) in {:.1} s",
        args.output.display(),
        human_bytes(total, 1),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
