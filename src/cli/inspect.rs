//! `m40-llm inspect [MODEL] [--json]`: what a GGUF file holds.

use anyhow::Context;
use m40_llm::gguf::GgufFile;
use m40_llm::inspect::ModelSummary;
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
    let summary = ModelSummary::from_gguf(&file)?;
    if args.json {
        let json = serde_json::to_string_pretty(&summary).context("cannot encode the summary")?;
        println!("{json}");
    } else {
        print!("{summary}");
    }
    Ok(())
}
