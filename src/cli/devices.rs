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
    let auto = "cpu (m40-llm has no CUDA executor yet)";
    if args.json {
        let out = serde_json::json!({
            "gpus": probe.as_ref().ok(),
            "error": probe.as_ref().err(),
            "preferred_gpu": preferred,
            "auto": "cpu",
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
    outln!("--device auto runs on: {auto}")?;
    Ok(())
}
