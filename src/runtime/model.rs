//! Loading a model for inference: open and validate the GGUF file, build its tokenizer, then for
//! each device `--device` allows (in [`candidate_targets`] order) compile the model for the
//! device's target, check that the plan fits its memory, and open its backend: the first device
//! that accepts, holds and runs the plan is used; every one passed over is logged with the reason.
//! A prefill GEMM precision asked for (`M40LLM_GEMM`, `M40LLM_TF32=1`) that a GPU cannot run is
//! an error, not a reason to pass over to another device.

use super::engine::Engine;
use crate::backend::BackendError;
use crate::backend::device::{DeviceChoice, PassedOver, candidate_targets, open_on};
use crate::backend::fit::{FitError, FitReport};
use crate::backend::step::{DEFAULT_PAGE_SIZE, KvGeometry};
use crate::backend::target::{GemmError, GemmPrecision, TargetKind, gemm_request_from_env};
use crate::compile::{CompileError, CompileOptions, compile};
use crate::gguf::{GgufError, GgufFile};
use crate::plan::Plan;
use crate::plan::{PlanOptions, Reuse};
use crate::tokenizer::{Tokenizer, TokenizerError};
use std::path::Path;
use std::sync::Arc;

/// The context size used when none is asked for: the model's own if smaller.
pub const DEFAULT_CTX_SIZE: usize = 4096;

/// How to load a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    pub device: DeviceChoice,
    /// The GPU to use (`--gpu N`), instead of the preferred one.
    pub gpu: Option<usize>,
    /// The memory budget of a GPU (`--max-vram`), instead of its total memory: the fit report
    /// checks the plan against it before anything is uploaded.
    pub max_vram: Option<u64>,
    /// Tokens one sequence can hold (default: the model's context, at most
    /// [`DEFAULT_CTX_SIZE`]).
    pub ctx_size: Option<usize>,
    /// Sequences that can be held at once at full context (the KV cache holds `ctx_size`
    /// tokens' pages for each). The backend gets `max(4 * n_seqs, 8)` slots, so forks and
    /// sequences sharing a prefix can outnumber them.
    pub n_seqs: usize,
    /// Cells per KV-cache page (a power of two).
    pub page_size: u32,
    /// The most tokens one step runs (prefill chunk size).
    pub max_tokens: u64,
    /// The most logits rows one step returns.
    pub max_outputs: u64,
    /// Run the fusion passes.
    pub fuse: bool,
    /// Buffer reuse in the activation arena (off keeps every value readable).
    pub reuse: Reuse,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions {
            device: DeviceChoice::Auto,
            gpu: None,
            max_vram: None,
            ctx_size: None,
            n_seqs: 1,
            page_size: DEFAULT_PAGE_SIZE,
            max_tokens: 512,
            max_outputs: 8,
            fuse: true,
            reuse: Reuse::Liveness,
        }
    }
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{}: {source}", path.display())]
    Tokenizer {
        path: std::path::PathBuf,
        source: Box<TokenizerError>,
    },
    #[error(transparent)]
    Compile(#[from] Box<CompileError>),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("invalid option: {0}")]
    Options(String),
    #[error(transparent)]
    Fit(#[from] FitError),
    #[error("no device can run the model with --device {choice}: {passed}")]
    NoDevice { choice: String, passed: String },
    #[error(transparent)]
    Gemm(#[from] GemmError),
}

/// A model ready to run: its file, tokenizer and engine.
pub struct LoadedModel {
    pub file: Arc<GgufFile>,
    pub tokenizer: Tokenizer,
    pub engine: Engine,
}

/// Loads the model at `path`; see the [module docs](self).
pub fn load(path: &Path, options: &LoadOptions) -> Result<LoadedModel, LoadError> {
    if options.n_seqs == 0 {
        return Err(LoadError::Options("at least one sequence is needed".into()));
    }
    let file = Arc::new(GgufFile::open(path)?);
    let tokenizer = Tokenizer::from_gguf(&file).map_err(|source| LoadError::Tokenizer {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    let compile_options = CompileOptions {
        plan: PlanOptions {
            max_tokens: options.max_tokens,
            max_outputs: options.max_outputs.min(options.max_tokens),
            reuse: options.reuse,
            ..PlanOptions::default()
        },
        fuse: options.fuse,
        disabled_passes: Vec::new(),
    };
    let gemm = gemm_request_from_env()?;
    let mut passed = PassedOver::default();
    let mut context: Option<(usize, KvGeometry)> = None;
    for mut target in candidate_targets(options.device, options.gpu, &mut passed) {
        if let (Some(bytes), TargetKind::Cuda { .. }) = (options.max_vram, target.kind) {
            target = target.with_budget(bytes, "--max-vram");
        }
        match target.kind {
            TargetKind::Cuda { .. } => target.gemm = target.gemm_precision(gemm)?,
            TargetKind::Cpu => {
                if let Some(p) = gemm.filter(|&p| p != GemmPrecision::F32) {
                    tracing::warn!(
                        "the {p} prefill GEMM is a CUDA path; the CPU backend computes in FP32"
                    );
                }
            }
        }
        let compiled = match compile(&file, &compile_options, &target) {
            Ok(c) => c,
            Err(CompileError::Unsupported(u)) => {
                passed.pass(&target.name, u.to_string());
                continue;
            }
            Err(e) => return Err(Box::new(e).into()),
        };
        let (n_ctx, kv) = match context {
            Some(c) => c,
            None => *context.insert(context_size(&compiled.plan, options)?),
        };
        let fit = FitReport::new(
            &compiled.plan,
            &target,
            &compiled.unfused,
            n_ctx as u64,
            options.n_seqs as u64,
        )?;
        if fit.fits == Some(false) {
            passed.pass(&target.name, fit.verdict());
            continue;
        }
        let backend = match open_on(&target, compiled.plan, file.clone(), kv) {
            Ok(b) => b,
            Err(e) => {
                passed.pass(&target.name, e.to_string());
                continue;
            }
        };
        tracing::info!(
            "loaded {} on {}; context {n_ctx} tokens; {}",
            path.display(),
            backend.device(),
            fit.verdict()
        );
        return Ok(LoadedModel {
            file,
            tokenizer,
            engine: Engine::new(backend, n_ctx),
        });
    }
    Err(LoadError::NoDevice {
        choice: format!("{:?}", options.device).to_lowercase(),
        passed: passed.summary(),
    })
}

/// Tokens per sequence and the KV cache's pages and slots: `--ctx-size`, else the model's
/// context (at most [`DEFAULT_CTX_SIZE`]), for `n_seqs` sequences.
fn context_size(plan: &Plan, options: &LoadOptions) -> Result<(usize, KvGeometry), LoadError> {
    let model_ctx = plan
        .model
        .as_ref()
        .map_or(DEFAULT_CTX_SIZE, |m| m.hparams.context_length as usize);
    let n_ctx = match options.ctx_size {
        Some(0) => return Err(LoadError::Options("--ctx-size must be at least 1".into())),
        Some(n) => {
            if n > model_ctx {
                tracing::warn!(
                    "context size {n} is larger than the {model_ctx} tokens the model was trained for"
                );
            }
            n
        }
        None => model_ctx.min(DEFAULT_CTX_SIZE),
    };
    let too_many = || LoadError::Options(format!("{n_ctx} x {} cells is too many", options.n_seqs));
    let n_seqs = u32::try_from(options.n_seqs).map_err(|_| too_many())?;
    let ctx = u32::try_from(n_ctx).map_err(|_| too_many())?;
    let slots = n_seqs.saturating_mul(4).max(8);
    let kv = KvGeometry::for_context(ctx, n_seqs, slots, options.page_size)
        .map_err(|e| LoadError::Options(e.to_string()))?;
    Ok((n_ctx, kv))
}
