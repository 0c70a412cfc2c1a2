//! `m40-llm devices`: the NVIDIA GPUs this machine has, and what `--device auto` runs on.

use super::io::outln;
use m40_llm::backend::device::{preferred_gpu, probe_gpus};

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let probe = probe_gpus();
    let preferred = probe.as_ref().ok().and_then(|g| preferred_gpu(g)).cloned();
    // `auto` tries the preferred GPU first; whether the model fits it is known only at load.
    let (auto, auto_text) = match &preferred {
        Some(g) => (
            format!("cuda:{}", g.ordinal),
            format!(
                "cuda:{} {} (when the model fits it; else the next GPU, then the CPU)",
                g.ordinal, g.name
            ),
        ),
        None => (
            "cpu".to_string(),
            "cpu (no GPU m40-llm can use)".to_string(),
        ),
    };
    if args.json {
        let out = serde_json::json!({
            "gpus": probe.as_ref().ok(),
            "error": probe.as_ref().err(),
            "preferred_gpu": preferred,
            "auto": auto,
        });
        outln!("{out}")?;
        return Ok(());
    }
    match &probe {
        Ok(gpus) if gpus.is_empty() => outln!("no NVIDIA GPU found")?,
        Ok(gpus) => {
            for g in gpus {
                let support = if g.is_supported() {
                    "supported"
                } else {
                    "too old (m40-llm needs sm_52 or newer)"
                };
                outln!("{g}: {support}")?;
            }
        }
        Err(why) => outln!("no GPU: {why}")?,
    }
    if let Some(g) = preferred {
        outln!("preferred GPU: cuda:{} {}", g.ordinal, g.name)?;
    }
    outln!("--device auto runs on: {auto_text}")?;
    Ok(())
}
