//! Lowering: a GGUF model's metadata and tensors → the typed op graph.
//!
//! [`lower`] picks the family template for `general.architecture` (`graphs/<family>.toml`),
//! reads the [`Hyperparams`], and builds one decoder from them ([`build`](mod@build)), checking
//! every tensor's shape and type against what its role needs. It fails fast, naming the key or
//! tensor at fault, on an unsupported architecture, a missing or misshapen tensor, or a tensor
//! that no role uses (a feature m40-llm does not know would otherwise be silently ignored).
//!
//! `synth` writes random-weight models of real shapes (`m40-llm synth`), streamed to disk.
//! `tiny` writes small models of every family for tests and benches (with the `test-support`
//! feature, which this package's tests and benches turn on).

mod build;
pub mod hparams;
pub mod synth;
pub mod template;
#[cfg(any(test, feature = "test-support"))]
pub mod tiny;

pub use build::lower;
pub use hparams::Hyperparams;
pub use template::{Template, TemplateError};
#[cfg(any(test, feature = "test-support"))]
pub use tiny::{TinyModel, TinyTensor};

use crate::gguf::{GgmlType, GgufError};
use crate::ir::{Graph, IrError, VerifyError};
use std::path::PathBuf;

/// A lowered model: its hyperparameters and its graph.
#[derive(Clone, Debug)]
pub struct Lowered {
    /// The template family that lowered it (`llama`, `qwen2`, `qwen3`).
    pub family: String,
    /// `general.name`, if the file has one.
    pub name: Option<String>,
    pub hparams: Hyperparams,
    pub graph: Graph,
}

/// Why a model cannot be lowered.
#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{}: no general.architecture key; is this a model file?", path.display())]
    NoArchitecture { path: PathBuf },
    #[error("{}: architecture `{architecture}` is not supported (supported: {})", path.display(), supported.join(", "))]
    UnsupportedArchitecture {
        path: PathBuf,
        architecture: String,
        supported: Vec<String>,
    },
    #[error("{}: {key} = {value}: {reason}", path.display())]
    Hyperparameter {
        path: PathBuf,
        key: String,
        value: String,
        reason: String,
    },
    #[error("{}: missing tensor `{tensor}` ({role} of the {family} family)", path.display())]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        role: String,
        family: String,
    },
    #[error(
        "{}: tensor `{tensor}` ({role}) has shape {found:?}, expected {expected:?} (ggml order, ne[0] first)",
        path.display()
    )]
    TensorShape {
        path: PathBuf,
        tensor: String,
        role: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("{}: tensor `{tensor}` ({role}) is {found}, expected F32", path.display())]
    TensorType {
        path: PathBuf,
        tensor: String,
        role: String,
        found: GgmlType,
    },
    #[error(
        "{}: {} tensor(s) are not used by the {family} family, e.g. `{}`: the model has parts m40-llm does not support",
        path.display(), tensors.len(), tensors.first().map_or("", String::as_str)
    )]
    UnusedTensors {
        path: PathBuf,
        family: String,
        tensors: Vec<String>,
    },
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("{}: building the graph: {source}", path.display())]
    Graph { path: PathBuf, source: IrError },
    #[error("{}: the lowered graph is invalid (a bug in the lowering): {source}", path.display())]
    Invalid { path: PathBuf, source: VerifyError },
}
