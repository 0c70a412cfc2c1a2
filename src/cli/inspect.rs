//! `m40-llm inspect MODEL`: what a GGUF file holds.

use m40_llm::gguf::GgufFile;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The GGUF file (default: the default model, fetched if missing).
    pub model: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let path = super::model_or_default(args.model)?;
    let file = GgufFile::open(&path)?;
    println!("{file:?}");
    Ok(())
}
