//! Backends: what executes a [`Plan`].
//!
//! Every backend implements [`Backend`]: it owns the weights (read from the GGUF file), the paged
//! KV cache with its page tables ([`step`]) and the activation arena the plan describes, runs one
//! [`Step`] at a time, writes what the step's output rows asked for (full logits, argmax or
//! top-k) into the caller's [`StepOutputs`], and can read back any value of the last step for
//! parity work. The runtime holds a `Box<dyn Backend>` and never knows which one it has.
//!
//! Backends: [`cpu`] (the ndarray/rayon FP32 reference) and `cuda` (the CUDA executor, the
//! `cuda` feature).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod fit;
mod layout;
pub mod parity;
pub mod step;
pub mod target;

use crate::plan::Plan;
use std::fmt;
pub use step::{
    KvGeometry, OutputKind, OutputRequest, PageOp, PageTables, RowOutput, Step, StepError,
    StepLimits, StepOutputs, TokenLogit,
};

/// Which device a backend runs on, for logs, summaries and `--json` output.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// `cpu` or `cuda`.
    pub kind: String,
    /// The device's name (`Tesla M40`, the CPU model) as far as it is known.
    pub name: String,
    /// How it runs: threads, compute capability, kernel path.
    pub detail: String,
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}; {})", self.kind, self.name, self.detail)
    }
}

/// Rows of logits, `n_vocab` values each (what `Engine::evaluate` collects over several steps).
#[derive(Clone, Debug, PartialEq)]
pub struct Logits {
    pub n_vocab: usize,
    /// `outputs.len() * n_vocab` values, row-major.
    pub data: Vec<f32>,
}

impl Logits {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.data.len().checked_div(self.n_vocab).unwrap_or(0)
    }

    /// Row `i` (the logits of the `i`-th output token of the step).
    ///
    /// # Panics
    /// If `i >= self.rows()`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.n_vocab..(i + 1) * self.n_vocab]
    }
}

/// A value read back from a backend: `rows x cols` f32 values, row-major (integer inputs such
/// as token ids are converted exactly; ids are below 2^24). An `ndarray` array, so parity work can
/// slice, compare and reduce it directly.
pub type HostTensor = ndarray::Array2<f32>;

/// Why a backend could not load a plan or run a step.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("invalid step: {0}")]
    Step(#[from] StepError),
    #[error("the plan cannot run on {backend}: {reason}")]
    Unsupported { backend: String, reason: String },
    #[error("plan and model disagree: {0}")]
    Mismatch(String),
    #[error("no value named `{0}` in the plan")]
    NoSuchValue(String),
    #[error(
        "value `{name}` was overwritten later in the step (its buffer is reused); compile with buffer reuse off to read every value"
    )]
    Overwritten { name: String },
    #[error("value `{0}` has not been computed yet: run a step first")]
    NotComputed(String),
    #[error("{0}")]
    Kernel(String),
    #[error(
        "non-finite logits: `{value_name}` is {value} at output row {row} (position {position}), vocabulary id {col}; the model's weights or the step overflowed (`m40-llm inspect --check` scans the weights)"
    )]
    NonFinite {
        /// The plan value holding the logits.
        value_name: String,
        /// The output row (index into `Step::outputs`) and its token's position.
        row: usize,
        position: u32,
        /// The vocabulary id (column) and the value found there.
        col: usize,
        value: f32,
    },
}

/// Fails on the first NaN or ±inf in `logits` (rows of `n_vocab`): logits that are not numbers
/// make perplexity NaN and sampling garbage, so a backend reports them as an error instead.
/// `position(row)` is the position of output row `row`; `value_name` the plan value they are.
pub fn check_finite(
    logits: &[f32],
    n_vocab: usize,
    position: impl Fn(usize) -> u32,
    value_name: &str,
) -> Result<(), BackendError> {
    // One pass over the rows: small next to the output projection that computed them.
    let Some(i) = logits.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let n_vocab = n_vocab.max(1);
    let row = i / n_vocab;
    Err(BackendError::NonFinite {
        value_name: value_name.to_string(),
        row,
        position: position(row),
        col: i % n_vocab,
        value: logits.get(i).copied().unwrap_or(f32::NAN),
    })
}

/// An executor of plans. See the [module docs](self).
pub trait Backend: Send {
    /// The device this backend runs on.
    fn device(&self) -> &DeviceInfo;

    /// The plan it runs.
    fn plan(&self) -> &Plan;

    /// Its KV cache's pages and slots.
    fn kv_geometry(&self) -> KvGeometry;

    /// Its page tables as the last successful step left them (the host's view of them, for a
    /// device that keeps them in its own memory).
    fn page_tables(&self) -> &PageTables;

    /// The bounds [`PageTables::stage`] checks a step against (the plan's sizes, the vocabulary).
    fn step_limits(&self) -> StepLimits;

    /// Checks `step` as [`step`](Self::step) would, without computing or changing anything.
    fn validate(&mut self, step: &Step) -> Result<(), BackendError>;

    /// Runs one step: applies its page ops, checks it against the plan and the tables (see
    /// [`step`](mod@step)), writes every token's K and V into its cell, and fills `out` with the
    /// output rows as asked (full logits, argmax or top-k) and the plan's other outputs. On any
    /// error the page tables are as before the call (cells the step wrote may have changed:
    /// they belong to positions no table holds yet).
    fn step(&mut self, step: &Step, out: &mut StepOutputs) -> Result<(), BackendError>;

    /// The value `name` (a step output's name, e.g. `blk.3.ffn_inp`) as the last step computed
    /// it. Values whose buffer a later step of the plan reuses are not readable; plans compiled
    /// without reuse keep every value.
    fn read_value(&self, name: &str) -> Result<HostTensor, BackendError>;
}
