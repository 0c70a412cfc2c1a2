//! Helpers shared by the integration tests: where test data lives, and skipping clearly when a
//! large fetched file (the default model, extra vocabularies) is absent.
//!
//! Data that is committed (tests/data/) is always present. Fetched data (the default model,
//! `.cache/`) may be absent on a developer's machine: tests that need it print why they skip.
//! With `M40LLM_REQUIRE_TESTDATA=1` (set by `scripts/test.sh` and CI) a missing file fails the
//! test instead, so CI cannot pass by skipping.
#![allow(dead_code)]

pub mod dot;

pub mod layout;

pub mod proc;

pub mod reference;

use std::path::{Path, PathBuf};

/// Committed reference data (tests/data/...). Paths are relative to the repository root, which
/// is the working directory of `cargo test` and of `.gpu/run` on the GPU machine.
pub fn data(rel: &str) -> PathBuf {
    Path::new("tests/data").join(rel)
}

/// The `m40-llm` binary under test: `$M40LLM_BIN`, else the one cargo built for this test run,
/// else (where the build's path does not exist: the staged binaries on the GPU machine, see
/// ../shared/gpu) the `m40-llm` beside the test executable.
pub fn bin() -> PathBuf {
    if let Some(b) = std::env::var_os("M40LLM_BIN") {
        return PathBuf::from(b);
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_m40-llm"));
    if built.exists() {
        return built;
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("m40-llm")))
        .filter(|b| b.exists())
        .unwrap_or(built)
}

/// The default model: `$M40LLM_TEST_MODEL`, else where `m40-llm fetch` puts it
/// (`$M40LLM_MODELS_DIR` or `models/`).
/// `None` (with a message on stderr) when it is absent and not required.
pub fn default_model() -> Option<PathBuf> {
    let path = std::env::var_os("M40LLM_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(default_model_path);
    present_or_skip(
        path,
        "the default model (run `m40-llm fetch` or scripts/test.sh)",
    )
}

/// The default model's file name (as the CLI's `models` module names it).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The environment variable naming the CLI's models folder.
pub const MODELS_DIR_ENV: &str = "M40LLM_MODELS_DIR";

/// Where `m40-llm fetch` puts the default model: `$M40LLM_MODELS_DIR` (unless empty) or
/// `models/`.
pub fn default_model_path() -> PathBuf {
    std::env::var_os(MODELS_DIR_ENV)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"))
        .join(DEFAULT_MODEL_FILE)
}

/// A fetched file under `.cache/` (see scripts/fetch-testdata.sh); `None` with a message when
/// absent and not required.
pub fn cached(rel: &str) -> Option<PathBuf> {
    present_or_skip(
        Path::new(".cache").join(rel),
        "fetched test data (run scripts/fetch-testdata.sh)",
    )
}

/// Whether `M40LLM_REQUIRE_TESTDATA=1` makes whatever a test would skip for (a file, NVRTC, a
/// C++ compiler) a failure.
pub fn required() -> bool {
    std::env::var("M40LLM_REQUIRE_TESTDATA").is_ok_and(|v| v == "1")
}

fn present_or_skip(path: PathBuf, what: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    assert!(
        !required(),
        "{} is missing: {what}; M40LLM_REQUIRE_TESTDATA=1 makes this a failure",
        path.display()
    );
    eprintln!("SKIPPED: {} is missing: {what}", path.display());
    None
}
