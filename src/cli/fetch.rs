//! `m40-llm fetch`: download the default model.

use super::io::outln;
use super::models;

#[derive(clap::Args)]
pub struct Args {
    /// Download again even if the model is present, and verify its checksum.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let path = models::default_model_path();
    if let Some(dir) = path.parent() {
        models::sweep_stale(dir);
    }
    if path.is_file() && !args.force {
        models::verify(&path)?;
        return outln!("{}", path.display());
    }
    models::fetch_default_model(&path)?;
    outln!("{}", path.display())
}
