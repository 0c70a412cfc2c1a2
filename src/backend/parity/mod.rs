//! Parity: does a backend compute what the ops mean?
//!
//! [`ops`] is the per-op harness (ggml's `test-backend-ops`, candle's `test_device!`): a table
//! of cases, each a one-op plan (the op under test fed by random inputs) with weights written
//! in memory through the GGUF writer, run on a backend through the public [`Backend`] API and
//! compared with the op's math computed independently in f64 on the host ([`reference`]). Every
//! backend in [`BACKENDS`] gets every case; `m40-llm parity --ops` prints the table.
//!
//! Adding a backend: one [`BackendEntry`] in [`BACKENDS`] (a name, an availability probe and a
//! constructor taking a plan, its weights and the KV cache a case needs). Nothing else changes.
//!
//! [`model`] is the model-level comparison (`m40-llm parity --model M --prompt P`): one plan on
//! two backends, value by value.

pub mod model;
pub mod ops;
pub mod reference;

use super::cpu::CpuBackend;
use super::step::{DEFAULT_PAGE_SIZE, KvGeometry, OutputKind, PageOp, Step, StepOutputs};
use super::{Backend, BackendError, HostTensor};
use crate::gguf::GgufFile;
use crate::plan::Plan;
use std::sync::Arc;

/// The KV cache a case needs: `n_seqs` sequences of at most `positions` positions each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvNeeds {
    pub n_seqs: u32,
    pub positions: u32,
}

/// Opens a backend over a plan, its weights and a KV cache of at least `KvNeeds`.
pub type OpenBackend = fn(Plan, Arc<GgufFile>, KvNeeds) -> Result<Box<dyn Backend>, BackendError>;

/// One backend the harness can run: registering it here is all a new backend needs.
#[derive(Clone, Copy)]
pub struct BackendEntry {
    /// What `--backend` calls it (`cpu`, `cuda`).
    pub name: &'static str,
    /// `None` when it can run on this machine, else why not (no GPU, no driver).
    pub unavailable: fn() -> Option<String>,
    pub open: OpenBackend,
    /// The relative error its matmuls may have ([`ops::tolerance`]'s, or wider where the
    /// backend rounds their operands: [`ops::matmul_tolerance`]), asked when a case runs.
    pub matmul_tolerance: fn() -> f64,
}

impl std::fmt::Debug for BackendEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendEntry")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Every backend, in the order the table shows them.
#[cfg(feature = "cuda")]
pub const BACKENDS: &[BackendEntry] = &[CPU, CUDA];
#[cfg(not(feature = "cuda"))]
pub const BACKENDS: &[BackendEntry] = &[CPU];

const CPU: BackendEntry = BackendEntry {
    name: "cpu",
    unavailable: || None,
    open: open_cpu,
    matmul_tolerance: || ops::matmul_tolerance(None),
};

#[cfg(feature = "cuda")]
const CUDA: BackendEntry = BackendEntry {
    name: "cuda",
    unavailable: cuda_unavailable,
    open: open_cuda,
    matmul_tolerance: cuda_matmul_tolerance,
};

/// The CUDA backend's matmul tolerance: that of the prefill GEMM precision `M40LLM_GEMM` asks
/// for (a request the GPU cannot run fails the case when the backend opens).
#[cfg(feature = "cuda")]
fn cuda_matmul_tolerance() -> f64 {
    ops::matmul_tolerance(super::target::gemm_request_from_env().ok().flatten())
}

/// Why the CUDA backend cannot run here: no driver or GPU, no supported GPU, or no NVRTC that
/// compiles for it.
#[cfg(feature = "cuda")]
pub fn cuda_unavailable() -> Option<String> {
    cuda_gpu().err()
}

/// The GPU the harness runs the CUDA backend on: the preferred one.
#[cfg(feature = "cuda")]
fn cuda_gpu() -> Result<super::device::GpuInfo, String> {
    let gpus = super::device::probe_gpus()?;
    let gpu = super::device::choose_gpu(&gpus, None)?.clone();
    super::cuda::nvrtc::find_for_arch(super::device::arch_of(&gpu))
        .map_err(|e| format!("{gpu}: {e}"))?;
    Ok(gpu)
}

/// The CUDA backend on the preferred GPU, with the same cache as [`open_cpu`].
#[cfg(feature = "cuda")]
pub fn open_cuda(
    plan: Plan,
    file: Arc<GgufFile>,
    kv: KvNeeds,
) -> Result<Box<dyn Backend>, BackendError> {
    let gpu = cuda_gpu().map_err(|reason| BackendError::Unsupported {
        backend: "cuda".into(),
        reason,
    })?;
    Ok(Box::new(super::cuda::CudaBackend::new(
        plan,
        file,
        geometry(kv)?,
        &gpu,
    )?))
}

/// The CPU backend, with a paged cache of `kv.n_seqs` slots of `kv.positions` positions.
pub fn open_cpu(
    plan: Plan,
    file: Arc<GgufFile>,
    kv: KvNeeds,
) -> Result<Box<dyn Backend>, BackendError> {
    Ok(Box::new(CpuBackend::new(plan, file, geometry(kv)?)?))
}

/// The registered backend called `name`.
pub fn backend(name: &str) -> Option<&'static BackendEntry> {
    BACKENDS.iter().find(|b| b.name == name)
}

/// One step of a case, in the harness's own terms: tokens, each with a sequence and a position,
/// and the tokens whose rows the step outputs. [`run_step`] turns it into the backend's step API.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepSpec {
    pub tokens: Vec<u32>,
    /// Each token's sequence, `0..n_seqs`.
    pub seq: Vec<u32>,
    /// Each token's position in its sequence.
    pub positions: Vec<u32>,
    /// Ascending indices into `tokens`.
    pub outputs: Vec<u32>,
}

// The adapter to the step API: `run_step`, `geometry` and the constructors in `BACKENDS`
// (which size a cache from `KvNeeds`) are all the harness knows of how a step is described.

/// The paged cache for `kv`: one slot per sequence, [`DEFAULT_PAGE_SIZE`] cells a page.
/// [`run_step`] maps page `i` of slot `s` to page `i * n_seqs + s`, so the pages are interleaved
/// across sequences (a backend that ignored the page tables would read another sequence's keys).
pub fn geometry(kv: KvNeeds) -> Result<KvGeometry, BackendError> {
    let n = kv.n_seqs.max(1);
    KvGeometry::for_context(kv.positions.max(1), n, n, DEFAULT_PAGE_SIZE)
        .map_err(|e| BackendError::Mismatch(e.to_string()))
}

/// Runs `step` on `backend` and reads back the values called `read`.
///
/// This is the only function that knows the step API (`Backend::step` over a paged
/// [`Step`]): when the step descriptor changes, only this changes. A sequence's tokens in one
/// step are consecutive positions. In cases with a KV cache, earlier steps have written the
/// positions before them, except that a step may repeat the positions the previous one wrote
/// (the checked step after the poison step): the slot is truncated back (`SetLen`) and the
/// step overwrites them; cases without a KV cache may start a sequence at any position (the
/// slot's length is set to it).
pub fn run_step(
    backend: &mut dyn Backend,
    step: &StepSpec,
    n_seqs: u32,
    read: &[String],
) -> Result<Vec<HostTensor>, BackendError> {
    let n_seqs = n_seqs.max(1);
    let ps = backend.kv_geometry().page_size.max(1);
    let tables = backend.page_tables();
    let mut s = Step::new();
    for slot in 0..n_seqs {
        let mut pos = step
            .seq
            .iter()
            .zip(&step.positions)
            .filter(|&(&q, _)| q == slot)
            .map(|(_, &p)| p);
        let Some(first) = pos.next() else { continue };
        let last = pos.fold(first, u32::max);
        let need = (last + 1).div_ceil(ps);
        let mut mapped = tables.pages(slot).map_or(0, |p| p.len() as u32);
        let map = |s: &mut Step, from: u32, to: u32| {
            for index in from..to {
                s.push_op(PageOp::Map {
                    slot,
                    index,
                    page: index * n_seqs + slot,
                });
            }
        };
        if tables.len(slot) != Some(first) {
            let keep = first.div_ceil(ps);
            map(&mut s, mapped, keep);
            s.push_op(PageOp::SetLen { slot, len: first });
            mapped = keep;
        }
        map(&mut s, mapped, need);
    }
    for ((&t, &slot), &p) in step.tokens.iter().zip(&step.seq).zip(&step.positions) {
        s.push_token(slot, p, t);
    }
    for &row in &step.outputs {
        s.push_output(row, OutputKind::Logits);
    }
    let mut out = StepOutputs::new();
    backend.step(&s, &mut out)?;
    read.iter().map(|name| backend.read_value(name)).collect()
}
