//! `m40-llm fetch`: download the default model.

use m40_llm::models;

#[derive(clap::Args)]
pub struct Args {
    /// Download again even if the model is present, and verify its checksum.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let path = models::default_model_path();
    if path.is_file() && !args.force {
        let digest = models::sha256_file(&path)?;
        anyhow::ensure!(
            digest == models::DEFAULT_MODEL_SHA256,
            "{} exists but its sha256 is {digest}, expected {}; rerun with --force",
            path.display(),
            models::DEFAULT_MODEL_SHA256
        );
        println!("{}", path.display());
        return Ok(());
    }
    models::fetch_default_model(&path)?;
    println!("{}", path.display());
    Ok(())
}
