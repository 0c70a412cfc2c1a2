//! `m40-llm devices`: the NVIDIA GPUs this machine has, and what `--device auto` runs on.

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
        println!("{out}");
        return Ok(());
    }
    match &probe {
        Ok(gpus) if gpus.is_empty() => println!("no NVIDIA GPU found"),
        Ok(gpus) => {
            for g in gpus {
                let support = if g.is_supported() {
                    "supported"
                } else {
                    "too old (m40-llm needs sm_52 or newer)"
                };
                println!("{g}: {support}");
            }
        }
        Err(why) => println!("no GPU: {why}"),
    }
    if let Some(g) = preferred {
        println!("preferred GPU: cuda:{} {}", g.ordinal, g.name);
    }
    println!("--device auto runs on: {auto}");
    Ok(())
}
