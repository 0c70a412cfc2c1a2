//! Targets: what a backend or a device can execute, known before anything is loaded.
//!
//! A [`Target`] is the compiler's view of a device (ggml's `supports_op` idea): which ops it runs
//! ([`Target::executes`]), which weight types each op slot reads, the alignment of its buffers,
//! the fusion passes it wants, the type it stores the KV cache in, its memory budget and the
//! memory its runtime takes besides the plan. [`crate::compile`] takes one: the plan's alignment
//! and passes come from it, a fused op the target lacks is unfused, and any other step it cannot
//! run is a compile error naming the step, the op and the type ([`Unsupported`]).
//!
//! | target | ops | weight types | alignment | budget |
//! | --- | --- | --- | --- | --- |
//! | `cpu` | every op of the IR | what the CPU kernels read | 256 | physical memory |
//! | `cuda`, `cuda:sm_XY` (XY ≥ 52) | every op of the IR | F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K | 256 | the device's memory, or `--max-vram` |
//!
//! The CUDA target is a description usable with no GPU present: it says what the CUDA executor
//! (issue 10) will run. Its budget is unknown until a device is probed or `--max-vram` is given.
//!
//! It also says which operand precisions prefill's GEMMs may take on the device
//! ([`Target::gemm_precisions`], [`GemmPrecision`]): FP32 SGEMM (the base path, every GPU from
//! sm_52), FP16 operands on tensor cores from sm_70, TF32 from sm_80 (issue 12's best path). The
//! loader picks one ([`Target::gemm_precision`], from `M40LLM_GEMM` / `M40LLM_TF32=1`:
//! [`gemm_request_from_env`]) and stores it in [`Target::gemm`], which the CUDA executor runs.

use super::device::GpuInfo;
use crate::gguf::{GgmlType, quants};
use crate::ir::{DType, KV_DTYPE, Op, ValueType};
use crate::passes::Pipeline;
use crate::plan::{Operand, Plan, Step};
use serde::Serialize;
use std::fmt;

/// The oldest compute capability m40-llm's CUDA kernels are written for: Maxwell's sm_52
/// (the Tesla M40).
pub const MIN_SM: u32 = 52;

/// Memory a CUDA process needs besides the plan's weights, KV cache and arena, on a GPU of
/// compute capability `sm`: 512 MiB before Hopper, 768 MiB from sm_90 on.
///
/// What it covers: the CUDA context (driver state, the per-SM local-memory reservation for
/// kernel stacks, loaded kernel images), the cuBLAS handle and its workspace, the executor's
/// small per-step buffers (token ids, positions, page tables, sampled logits) and slack for the
/// allocator's rounding. Measured on an NVIDIA H200 (132 SMs, driver 580.159, CUDA 13.0): a bare
/// context takes 518 MiB (`nvidia-smi`'s per-process figure), `cublasCreate` adds 68 MiB and the
/// first SGEMM nothing more: 586 MiB, hence 768 MiB for sm_90 and newer. The per-SM part scales
/// with the SM count (the M40 has 24), so a Maxwell card's context is smaller; 512 MiB keeps the
/// same headroom there without a measurement on an M40 yet. A plan reported to fit must not fail
/// to load by a few megabytes, so the margin errs on the large side.
pub fn cuda_runtime_margin(sm: u32) -> u64 {
    if sm >= 90 { 768 << 20 } else { 512 << 20 }
}

/// Memory the CPU backend needs besides the plan: 64 MiB for the process itself (tokenizer,
/// sampler, thread stacks). Weights are memory-mapped and counted at their stored size.
pub const CPU_RUNTIME_MARGIN: u64 = 64 << 20;

/// The weight types the CUDA executor reads (dequantized on the fly in its kernels): exactly
/// what `gguf::quants` dequantizes, so the GPU reads every type the reference does.
pub const CUDA_WEIGHT_TYPES: [GgmlType; 11] = quants::DEQUANTIZE_TYPES;

/// Which kind of device a target describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TargetKind {
    Cpu,
    /// An NVIDIA GPU of compute capability `sm / 10`.`sm % 10` (52 for the Tesla M40).
    Cuda {
        sm: u32,
    },
}

/// A memory budget and where it comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Budget {
    pub bytes: u64,
    /// `--max-vram`, `cuda:0 Tesla M40 24GB`, `physical memory`.
    pub source: String,
}

/// How a weight is read by the op slot it feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightUse {
    /// A matrix the op multiplies or gathers rows from, read in its stored type by the kernels.
    Matrix,
    /// A small vector (norm weight, bias, rope factors), converted to F32 once at load.
    Vector,
}

/// A device as the compiler sees it; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Target {
    /// `cpu`, `cuda`, `cuda:sm_52`.
    pub name: String,
    pub kind: TargetKind,
    /// Whether the target has a kernel for an op (its parameters included).
    pub executes: fn(&Op) -> bool,
    /// Types a [`WeightUse::Matrix`] slot reads.
    pub matrix_types: Vec<GgmlType>,
    /// Types a [`WeightUse::Vector`] slot reads.
    pub vector_types: Vec<GgmlType>,
    /// Alignment of every arena buffer, a power of two.
    pub alignment: u64,
    /// The fusion passes it wants, by name, a subset of [`Pipeline::fusion`] (run in its order).
    pub passes: Vec<String>,
    /// The type the KV cache is stored in.
    pub kv_type: DType,
    /// The memory the plan may use, if known.
    pub budget: Option<Budget>,
    /// Memory the runtime needs besides the plan (see [`cuda_runtime_margin`]).
    pub runtime_margin: u64,
    /// The GPU this target runs on, for a target made from a probed device
    /// ([`Target::for_gpu`]); `None` for the CPU and for compile-only targets (`cuda:sm_52`).
    pub gpu: Option<GpuInfo>,
    /// The operand precisions prefill's GEMMs may take here, the base one ([`GemmPrecision::F32`])
    /// first: tensor-core paths only where the arch has them ([`GemmPrecision::min_sm`]).
    pub gemm_precisions: Vec<GemmPrecision>,
    /// The precision the executor's prefill GEMMs use: [`DEFAULT_GEMM`] until the loader sets
    /// what was asked for ([`Target::gemm_precision`]).
    pub gemm: GemmPrecision,
}

/// The operand precision of the CUDA executor's prefill GEMMs (matmuls of more than 64 rows, on
/// cuBLAS): what `M40LLM_GEMM` selects. Every one accumulates in FP32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GemmPrecision {
    /// FP32 SGEMM on weights dequantized to FP32 (the base path: what an M40 runs).
    F32,
    /// FP32 SGEMM with cuBLAS's TF32 tensor-core math: both operands rounded to 10-bit mantissas
    /// inside cuBLAS (sm_80 and newer).
    Tf32,
    /// `cublasGemmEx` on FP16 operands (weights dequantized to FP16, F16 weights read in place,
    /// activations rounded to FP16), FP32 output and accumulation (sm_70 and newer).
    F16,
}

/// The prefill GEMM precision when none is asked for, on every device: FP32. FP16 and TF32
/// round the activations (and the weights) to 11-bit significands, outside the FP32-compute
/// policy the CPU parity rests on, and FP16 overflows past 65 504; docs/cuda.md says when this
/// would change (the llama.cpp agreement and `parity` on the H200 with `M40LLM_GEMM=f16`).
pub const DEFAULT_GEMM: GemmPrecision = GemmPrecision::F32;

impl GemmPrecision {
    /// Every precision, the base one first.
    pub const ALL: [GemmPrecision; 3] =
        [GemmPrecision::F32, GemmPrecision::Tf32, GemmPrecision::F16];

    /// `f32`, `tf32`, `f16`: the `M40LLM_GEMM` values.
    pub fn name(self) -> &'static str {
        match self {
            GemmPrecision::F32 => "f32",
            GemmPrecision::Tf32 => "tf32",
            GemmPrecision::F16 => "f16",
        }
    }

    /// Parses an `M40LLM_GEMM` value (case and surrounding blanks ignored).
    pub fn parse(s: &str) -> Option<GemmPrecision> {
        let s = s.trim();
        GemmPrecision::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
    }

    /// The oldest compute capability that runs it: sm_52 for FP32, sm_70 (Volta's tensor cores)
    /// for FP16 operands, sm_80 (Ampere) for TF32.
    pub fn min_sm(self) -> u32 {
        match self {
            GemmPrecision::F32 => MIN_SM,
            GemmPrecision::F16 => 70,
            GemmPrecision::Tf32 => 80,
        }
    }

    /// Whether it runs on tensor cores.
    pub fn tensor_cores(self) -> bool {
        self != GemmPrecision::F32
    }
}

impl fmt::Display for GemmPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a prefill GEMM precision cannot be had.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GemmError {
    #[error("M40LLM_GEMM=`{0}` is not a prefill GEMM precision (f32, tf32, f16)")]
    Unknown(String),
    #[error("M40LLM_GEMM={gemm} and M40LLM_TF32=1 ask for different prefill GEMMs")]
    Conflict { gemm: GemmPrecision },
    #[error(
        "M40LLM_GEMM={0} runs on cuBLAS, which M40LLM_ENABLE_CUBLAS=0 turns off (prefill then runs on the tiled FP32 kernels)"
    )]
    NeedsCublas(GemmPrecision),
    #[error(
        "{target}: the {precision} prefill GEMM needs tensor cores of sm_{} or newer, and this GPU is sm_{sm} (the base path, M40LLM_GEMM=f32, runs everywhere)",
        precision.min_sm()
    )]
    NoTensorCores {
        target: String,
        sm: u32,
        precision: GemmPrecision,
    },
}

/// The prefill GEMM precision asked for by the values of `M40LLM_GEMM` (`gemm`), `M40LLM_TF32`
/// (`tf32`: `1` means `tf32`, kept from before `M40LLM_GEMM`) and `M40LLM_ENABLE_CUBLAS`
/// (`cublas`: `0` turns cuBLAS off); `None` when nothing is asked. Contradictions are errors:
/// no request is dropped silently.
pub fn gemm_request(
    gemm: Option<&str>,
    tf32: Option<&str>,
    cublas: Option<&str>,
) -> Result<Option<GemmPrecision>, GemmError> {
    let from_gemm = match gemm.map(str::trim).filter(|v| !v.is_empty()) {
        Some(v) => Some(GemmPrecision::parse(v).ok_or_else(|| GemmError::Unknown(v.to_string()))?),
        None => None,
    };
    let from_tf32 = tf32.is_some_and(|v| v.trim() == "1");
    let asked = match (from_gemm, from_tf32) {
        (Some(p), true) if p != GemmPrecision::Tf32 => return Err(GemmError::Conflict { gemm: p }),
        (Some(p), _) => Some(p),
        (None, true) => Some(GemmPrecision::Tf32),
        (None, false) => None,
    };
    let cublas_off = cublas.is_some_and(|v| v.trim() == "0");
    match asked {
        Some(p) if p.tensor_cores() && cublas_off => Err(GemmError::NeedsCublas(p)),
        _ => Ok(asked),
    }
}

/// [`gemm_request`] on this process's environment.
pub fn gemm_request_from_env() -> Result<Option<GemmPrecision>, GemmError> {
    let var = |name: &str| std::env::var(name).ok();
    gemm_request(
        var("M40LLM_GEMM").as_deref(),
        var("M40LLM_TF32").as_deref(),
        var("M40LLM_ENABLE_CUBLAS").as_deref(),
    )
}

/// The prefill GEMM precisions a GPU of compute capability `sm` runs, the base one first.
pub fn gemm_precisions(sm: u32) -> Vec<GemmPrecision> {
    GemmPrecision::ALL
        .into_iter()
        .filter(|p| sm >= p.min_sm())
        .collect()
}

/// A step a target cannot run: which step, which op, which type, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{target} cannot run step `{step}` ({op}){}: {reason}", ty.map(|t| format!(" on {t}")).unwrap_or_default())]
pub struct Unsupported {
    pub target: String,
    pub step: String,
    pub op: String,
    /// The type at fault; `None` when the op itself has no kernel.
    #[serde(rename = "type")]
    pub ty: Option<DType>,
    pub reason: String,
}

/// Why a target cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "unknown target `{0}` (targets: cpu, cuda, cuda:sm_XY with XY the compute capability, e.g. cuda:sm_52 for a Tesla M40)"
    )]
    Unknown(String),
    #[error(
        "target `{name}`: sm_{sm} is older than sm_{MIN_SM} (Maxwell, the Tesla M40), the oldest GPU m40-llm's kernels are written for"
    )]
    TooOld { name: String, sm: u32 },
}

/// Every op of the IR: the CPU interpreter and the CUDA executor both have a kernel for each.
/// Exhaustive on purpose: a new op must be added here (and to the backends) before it compiles.
pub fn every_op(op: &Op) -> bool {
    match op {
        Op::TokenIds
        | Op::Positions
        | Op::OutputRows
        | Op::Weight { .. }
        | Op::Embedding
        | Op::MatMul
        | Op::Add
        | Op::Mul
        | Op::Silu
        | Op::SwiGlu
        | Op::RmsNorm { .. }
        | Op::Rope(_)
        | Op::KvWrite(_)
        | Op::Attention(_)
        | Op::SelectRows
        | Op::MultiMatMul { .. }
        | Op::GateUpSwiGlu
        | Op::AddRmsNorm { .. }
        | Op::RopeKvWrite { .. }
        | Op::RopeQkvWrite { .. } => true,
    }
}

/// Every op, except attention over heads the CUDA kernels do not tile: they split a head over
/// a warp's 32 lanes, so `head_dim` must be a multiple of 32, at most 256 (every llama, qwen
/// and mistral model is; 16-wide test heads are not).
pub fn cuda_executes(op: &Op) -> bool {
    match op {
        Op::Attention(p) => p.head_dim % 32 == 0 && p.head_dim <= 256,
        _ => every_op(op),
    }
}

/// How input `slot` of `op` reads a weight bound to it: a matrix in the slots
/// [`Op::matrix_slots`] names (what the CPU backend's `check_matrices` checks at load), else a
/// vector.
pub fn weight_use(op: &Op, slot: usize) -> WeightUse {
    if op.matrix_slots().contains(&slot) {
        WeightUse::Matrix
    } else {
        WeightUse::Vector
    }
}

fn all_passes() -> Vec<String> {
    Pipeline::fusion()
        .names()
        .into_iter()
        .map(String::from)
        .collect()
}

impl Target {
    /// The CPU reference backend: every op, the weight types its kernels read
    /// ([`kernels::matmul::SUPPORTED`](super::cpu::kernels::matmul::SUPPORTED) for matrices,
    /// [`quants::DEQUANTIZE_TYPES`] for vectors, which it dequantizes at load), every fusion, a
    /// budget of the machine's physical memory. Its alignment is 256 bytes like CUDA's (64 would
    /// do for its vectors), so a plan's layout does not depend on where it runs.
    pub fn cpu() -> Target {
        Target {
            name: "cpu".into(),
            kind: TargetKind::Cpu,
            executes: every_op,
            matrix_types: super::cpu::kernels::matmul::SUPPORTED.to_vec(),
            vector_types: quants::DEQUANTIZE_TYPES.to_vec(),
            alignment: 256,
            passes: all_passes(),
            kv_type: KV_DTYPE,
            budget: super::cpu::memory_total().map(|bytes| Budget {
                bytes,
                source: "physical memory".into(),
            }),
            runtime_margin: CPU_RUNTIME_MARGIN,
            gpu: None,
            gemm_precisions: vec![GemmPrecision::F32],
            gemm: DEFAULT_GEMM,
        }
    }

    /// An NVIDIA GPU of compute capability `sm` (52 = sm_52), as the CUDA executor will run it;
    /// no budget until one is set ([`Target::with_budget`]) or the target comes from a device
    /// ([`Target::for_gpu`]).
    pub fn cuda(sm: u32) -> Result<Target, TargetError> {
        let name = format!("cuda:sm_{sm}");
        if sm < MIN_SM {
            return Err(TargetError::TooOld { name, sm });
        }
        Ok(Target {
            name,
            kind: TargetKind::Cuda { sm },
            executes: cuda_executes,
            matrix_types: CUDA_WEIGHT_TYPES.to_vec(),
            vector_types: CUDA_WEIGHT_TYPES.to_vec(),
            alignment: 256,
            passes: all_passes(),
            kv_type: KV_DTYPE,
            budget: None,
            runtime_margin: cuda_runtime_margin(sm),
            gpu: None,
            gemm_precisions: gemm_precisions(sm),
            gemm: DEFAULT_GEMM,
        })
    }

    /// The target of a probed GPU: its compute capability, its memory as the budget.
    pub fn for_gpu(gpu: &GpuInfo) -> Result<Target, TargetError> {
        let (major, minor) = gpu.compute_capability;
        let sm = u32::try_from(major * 10 + minor).unwrap_or(0);
        let mut target = Target::cuda(sm)?;
        target.name = format!("cuda:{} (sm_{sm})", gpu.ordinal);
        target.gpu = Some(gpu.clone());
        Ok(target.with_budget(gpu.total_memory as u64, format!("{gpu}")))
    }

    /// Parses `cpu`, `cuda` (sm_52, the oldest supported) or `cuda:sm_XY`.
    pub fn parse(name: &str) -> Result<Target, TargetError> {
        let unknown = || TargetError::Unknown(name.to_string());
        match name {
            "cpu" => Ok(Target::cpu()),
            "cuda" => {
                let mut t = Target::cuda(MIN_SM)?;
                t.name = "cuda".into();
                Ok(t)
            }
            _ => {
                let digits = name.strip_prefix("cuda:sm_").ok_or_else(unknown)?;
                if digits.is_empty()
                    || digits.len() > 4
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(unknown());
                }
                let sm = digits.parse().map_err(|_| unknown())?;
                Target::cuda(sm)
            }
        }
    }

    /// This target with a budget of `bytes` from `source`.
    pub fn with_budget(mut self, bytes: u64, source: impl Into<String>) -> Target {
        self.budget = Some(Budget {
            bytes,
            source: source.into(),
        });
        self
    }

    /// The prefill GEMM precision for a request (`None`: [`DEFAULT_GEMM`]): the one asked for
    /// if this target runs it, else an error naming the target and its arch (never a silent
    /// fallback to another precision). The CPU target computes in FP32 whatever is asked.
    pub fn gemm_precision(
        &self,
        requested: Option<GemmPrecision>,
    ) -> Result<GemmPrecision, GemmError> {
        let TargetKind::Cuda { sm } = self.kind else {
            return Ok(GemmPrecision::F32);
        };
        match requested {
            // The default where this arch runs it, else the base path.
            None if self.gemm_precisions.contains(&DEFAULT_GEMM) => Ok(DEFAULT_GEMM),
            None => Ok(GemmPrecision::F32),
            Some(p) if self.gemm_precisions.contains(&p) => Ok(p),
            Some(precision) => Err(GemmError::NoTensorCores {
                target: self.name.clone(),
                sm,
                precision,
            }),
        }
    }

    /// One line for `doctor`: the prefill GEMM precision a request gives here and what else the
    /// target runs, e.g. `prefill GEMM f32 (the default; tensor cores here: M40LLM_GEMM=tf32,
    /// f16)`; a request the target cannot run is the error [`Target::gemm_precision`] gives.
    pub fn gemm_summary(&self, requested: Option<GemmPrecision>) -> Result<String, GemmError> {
        let chosen = self.gemm_precision(requested)?;
        let others: Vec<&str> = self
            .gemm_precisions
            .iter()
            .filter(|p| p.tensor_cores())
            .map(|p| p.name())
            .collect();
        let how = match requested {
            Some(_) => "asked for",
            None => "the default",
        };
        let also = match (self.kind, others.is_empty()) {
            (TargetKind::Cuda { sm }, true) => format!("no tensor cores on sm_{sm}"),
            (TargetKind::Cuda { .. }, false) => {
                format!("tensor cores here: M40LLM_GEMM={}", others.join(", "))
            }
            (TargetKind::Cpu, _) => "the CPU computes in FP32".into(),
        };
        Ok(format!("prefill GEMM {chosen} ({how}; {also})"))
    }

    /// The types a weight in `slot` of `op` may have.
    pub fn weight_types(&self, op: &Op, slot: usize) -> &[GgmlType] {
        match weight_use(op, slot) {
            WeightUse::Matrix => &self.matrix_types,
            WeightUse::Vector => &self.vector_types,
        }
    }

    /// Whether the target runs node or step `step` with op `op` on `inputs` (the types of its
    /// input slots; `weights[i]` is true when slot `i` is bound to a weight) and `outputs`.
    pub fn supports_op(
        &self,
        step: &str,
        op: &Op,
        inputs: &[(&ValueType, bool)],
        outputs: &[&ValueType],
    ) -> Result<(), Unsupported> {
        let unsupported = |ty: Option<DType>, reason: String| Unsupported {
            target: self.name.clone(),
            step: step.to_string(),
            op: op.name().to_string(),
            ty,
            reason,
        };
        if !(self.executes)(op) {
            let reason = match (op, self.kind) {
                (Op::Attention(p), TargetKind::Cuda { .. }) => format!(
                    "the CUDA attention kernels need head_dim a multiple of 32, at most 256, \
                     not {}",
                    p.head_dim
                ),
                _ => format!("{} has no kernel for it", self.name),
            };
            return Err(unsupported(None, reason));
        }
        for (slot, (ty, is_weight)) in inputs.iter().enumerate() {
            let ValueType::Tensor(t) = ty else { continue };
            if !is_weight {
                continue;
            }
            let allowed = self.weight_types(op, slot);
            if !allowed.contains(&t.dtype) {
                let what = match weight_use(op, slot) {
                    WeightUse::Matrix => "matrix",
                    WeightUse::Vector => "vector",
                };
                let slot_name = op
                    .input_names()
                    .get(slot)
                    .cloned()
                    .unwrap_or_else(|| slot.to_string());
                return Err(unsupported(
                    Some(t.dtype),
                    format!(
                        "its {what} weight `{slot_name}` is {}; {} reads {what} weights of types {}",
                        t.dtype,
                        self.name,
                        type_list(allowed)
                    ),
                ));
            }
        }
        let writes_kv = outputs.iter().any(|o| matches!(o, ValueType::KvCache(_)));
        if writes_kv && self.kv_type != KV_DTYPE {
            return Err(unsupported(
                Some(KV_DTYPE),
                format!(
                    "plans keep the KV cache in {KV_DTYPE}, {} stores it in {}",
                    self.name, self.kv_type
                ),
            ));
        }
        Ok(())
    }

    /// [`Target::supports_op`] for a step of `plan`.
    pub fn supports_step(&self, plan: &Plan, step: &Step) -> Result<(), Unsupported> {
        let inputs: Vec<(ValueType, bool)> = step
            .inputs
            .iter()
            .map(|&operand| match operand {
                Operand::Weight(w) => plan
                    .weights
                    .get(w as usize)
                    .map(|w| (ValueType::Tensor(w.ty.clone()), true)),
                Operand::Value(v) => plan.value(v).map(|o| (o.ty.clone(), false)),
            })
            .collect::<Option<_>>()
            .ok_or_else(|| Unsupported {
                target: self.name.clone(),
                step: step.name.clone(),
                op: step.op.name().to_string(),
                ty: None,
                reason: "an input is missing from the plan".into(),
            })?;
        let refs: Vec<(&ValueType, bool)> = inputs.iter().map(|(t, w)| (t, *w)).collect();
        let outputs: Vec<&ValueType> = step.outputs.iter().map(|o| &o.ty).collect();
        self.supports_op(&step.name, &step.op, &refs, &outputs)
    }

    /// Checks that the target runs every step of `plan` and that the plan's buffers have the
    /// target's alignment (or a multiple of it).
    pub fn check_plan(&self, plan: &Plan) -> Result<(), Unsupported> {
        for step in &plan.steps {
            self.supports_step(plan, step)?;
        }
        if !plan.options.alignment.is_multiple_of(self.alignment) {
            return Err(Unsupported {
                target: self.name.clone(),
                step: "(plan)".into(),
                op: "arena".into(),
                ty: None,
                reason: format!(
                    "buffers are aligned to {} bytes, {} needs {}",
                    plan.options.alignment, self.name, self.alignment
                ),
            });
        }
        Ok(())
    }
}

fn type_list(types: &[GgmlType]) -> String {
    types
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_old_gpus_are_refused_with_a_reason() {
        assert_eq!(Target::parse("cpu").unwrap().kind, TargetKind::Cpu);
        let cuda = Target::parse("cuda").unwrap();
        assert_eq!(cuda.kind, TargetKind::Cuda { sm: 52 });
        assert_eq!(cuda.name, "cuda");
        assert!(cuda.budget.is_none(), "no budget is invented");
        for (name, sm) in [("cuda:sm_52", 52), ("cuda:sm_90", 90), ("cuda:sm_61", 61)] {
            let t = Target::parse(name).unwrap();
            assert_eq!((t.name.as_str(), t.kind), (name, TargetKind::Cuda { sm }));
            assert_eq!(t.alignment, 256);
            assert_eq!(t.matrix_types, CUDA_WEIGHT_TYPES);
        }
        assert_eq!(
            Target::parse("cuda:sm_52").unwrap().runtime_margin,
            512 << 20
        );
        assert_eq!(
            Target::parse("cuda:sm_90").unwrap().runtime_margin,
            768 << 20
        );
        let err = Target::parse("cuda:sm_37").unwrap_err().to_string();
        assert!(err.contains("sm_37 is older than sm_52"), "{err}");
        for bad in [
            "gpu",
            "cuda:",
            "cuda:sm_",
            "cuda:sm_5x",
            "cuda:52",
            "cuda:sm_99999",
            "CPU",
        ] {
            let err = Target::parse(bad).unwrap_err();
            assert!(matches!(err, TargetError::Unknown(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn the_cpu_target_reads_what_its_kernels_read() {
        let t = Target::cpu();
        assert_eq!(
            t.matrix_types,
            super::super::cpu::kernels::matmul::SUPPORTED
        );
        assert_eq!(t.passes, Pipeline::fusion().names());
        assert_eq!(weight_use(&Op::Embedding, 0), WeightUse::Matrix);
        assert_eq!(weight_use(&Op::MatMul, 1), WeightUse::Matrix);
        assert_eq!(weight_use(&Op::RmsNorm { eps: 1e-5 }, 1), WeightUse::Vector);
        assert_eq!(weight_use(&Op::GateUpSwiGlu, 2), WeightUse::Matrix);
    }

    #[test]
    fn a_gpu_target_takes_its_budget_from_the_device() {
        let gpu = GpuInfo {
            ordinal: 1,
            name: "Tesla M40 24GB".into(),
            compute_capability: (5, 2),
            total_memory: 24 << 30,
        };
        let t = Target::for_gpu(&gpu).unwrap();
        assert_eq!(t.kind, TargetKind::Cuda { sm: 52 });
        assert_eq!(t.budget.as_ref().unwrap().bytes, 24 << 30);
        assert!(t.budget.unwrap().source.contains("Tesla M40"));
        let k80 = GpuInfo {
            compute_capability: (3, 7),
            ..gpu
        };
        assert!(matches!(
            Target::for_gpu(&k80),
            Err(TargetError::TooOld { sm: 37, .. })
        ));
    }

    #[test]
    fn gemm_requests_parse_and_contradictions_are_errors() {
        use GemmPrecision::*;
        let req = |g, t, c| gemm_request(g, t, c);
        assert_eq!(req(None, None, None), Ok(None));
        for (v, p) in [
            ("f32", F32),
            ("tf32", Tf32),
            ("f16", F16),
            (" F16 ", F16),
            ("TF32", Tf32),
        ] {
            assert_eq!(req(Some(v), None, None), Ok(Some(p)), "{v}");
            assert_eq!(GemmPrecision::parse(v), Some(p));
            assert_eq!(GemmPrecision::parse(p.name()), Some(p));
        }
        // An empty value asks for nothing; anything else unknown is an error naming it.
        assert_eq!(req(Some(""), None, None), Ok(None));
        for bad in ["fp16", "bf16", "16", "f16x", "half"] {
            let e = req(Some(bad), None, None).unwrap_err();
            assert_eq!(e, GemmError::Unknown(bad.into()));
            assert!(e.to_string().contains(&format!("`{bad}`")), "{e}");
            assert!(e.to_string().contains("f32, tf32, f16"), "{e}");
        }
        // M40LLM_TF32=1 still asks for TF32; other values of it ask for nothing.
        assert_eq!(req(None, Some("1"), None), Ok(Some(Tf32)));
        assert_eq!(req(None, Some("0"), None), Ok(None));
        assert_eq!(req(None, Some("yes"), None), Ok(None));
        assert_eq!(req(Some("tf32"), Some("1"), None), Ok(Some(Tf32)));
        for p in ["f32", "f16"] {
            let e = req(Some(p), Some("1"), None).unwrap_err();
            assert!(matches!(e, GemmError::Conflict { .. }), "{e}");
            assert!(e.to_string().contains(&format!("M40LLM_GEMM={p}")), "{e}");
        }
        // Tensor-core GEMMs are cuBLAS calls: with cuBLAS off they are refused.
        for (g, t) in [(Some("f16"), None), (Some("tf32"), None), (None, Some("1"))] {
            let e = req(g, t, Some("0")).unwrap_err();
            assert!(matches!(e, GemmError::NeedsCublas(_)), "{e}");
            assert!(e.to_string().contains("M40LLM_ENABLE_CUBLAS=0"), "{e}");
        }
        assert_eq!(req(Some("f32"), None, Some("0")), Ok(Some(F32)));
        assert_eq!(req(Some("f16"), None, Some("1")), Ok(Some(F16)));
    }

    #[test]
    fn gemm_precisions_follow_the_arch_and_a_missing_one_is_refused_naming_it() {
        use GemmPrecision::*;
        assert_eq!(gemm_precisions(52), vec![F32]);
        assert_eq!(gemm_precisions(61), vec![F32]);
        assert_eq!(gemm_precisions(70), vec![F32, F16]);
        assert_eq!(gemm_precisions(75), vec![F32, F16]);
        assert_eq!(gemm_precisions(80), vec![F32, Tf32, F16]);
        assert_eq!(gemm_precisions(90), vec![F32, Tf32, F16]);
        let m40 = Target::for_gpu(&GpuInfo {
            ordinal: 0,
            name: "Tesla M40 24GB".into(),
            compute_capability: (5, 2),
            total_memory: 24 << 30,
        })
        .unwrap();
        assert_eq!(m40.gemm, DEFAULT_GEMM);
        assert_eq!(m40.gemm_precision(None), Ok(F32));
        assert_eq!(m40.gemm_precision(Some(F32)), Ok(F32));
        for p in [F16, Tf32] {
            let e = m40.gemm_precision(Some(p)).unwrap_err();
            assert_eq!(
                e,
                GemmError::NoTensorCores {
                    target: "cuda:0 (sm_52)".into(),
                    sm: 52,
                    precision: p
                }
            );
            let text = e.to_string();
            assert!(
                text.starts_with("cuda:0 (sm_52): ")
                    && text.contains("this GPU is sm_52")
                    && text.contains(&format!("sm_{} or newer", p.min_sm())),
                "{text}"
            );
        }
        let volta = Target::parse("cuda:sm_70").unwrap();
        assert_eq!(volta.gemm_precision(Some(F16)), Ok(F16));
        let e = volta.gemm_precision(Some(Tf32)).unwrap_err().to_string();
        assert!(e.contains("sm_70") && e.contains("sm_80"), "{e}");
        let h200 = Target::parse("cuda:sm_90").unwrap();
        for p in GemmPrecision::ALL {
            assert_eq!(h200.gemm_precision(Some(p)), Ok(p));
        }
        assert_eq!(h200.gemm_precision(None), Ok(DEFAULT_GEMM));
        // What doctor prints.
        assert_eq!(
            m40.gemm_summary(None).unwrap(),
            "prefill GEMM f32 (the default; no tensor cores on sm_52)"
        );
        assert!(
            m40.gemm_summary(Some(F16))
                .unwrap_err()
                .to_string()
                .contains("sm_52")
        );
        assert_eq!(
            h200.gemm_summary(Some(F16)).unwrap(),
            "prefill GEMM f16 (asked for; tensor cores here: M40LLM_GEMM=tf32, f16)"
        );
        assert_eq!(
            volta.gemm_summary(None).unwrap(),
            "prefill GEMM f32 (the default; tensor cores here: M40LLM_GEMM=f16)"
        );
        // The CPU computes in FP32 whatever is asked.
        assert_eq!(Target::cpu().gemm_precision(Some(F16)), Ok(F32));
        assert_eq!(Target::cpu().gemm_precisions, vec![F32]);
    }
}
