//! The plan: a graph scheduled and placed in memory, as plain data a backend executes.
//!
//! [`Plan::build`] takes a verified graph and
//! 1. schedules it: a topological order of every node but the weights (one [`Step`] each);
//! 2. computes liveness: each value lives from its step to the last step that reads it (graph
//!    outputs to the end);
//! 3. places every tensor value in one activation arena, sized for `max_tokens` tokens and
//!    `max_outputs` outputs per step, reusing the space of dead values ([`arena`], best fit), or
//!    giving each value its own range ([`Reuse::None`], so every value stays readable after a
//!    step: parity and debugging).
//!
//! Weights stay in their GGUF tensors (the plan lists them); the KV cache is per-layer state the
//! backend allocates from [`KvLayer`] (FP16, `bytes_per_token` per cached token). Neither is in
//! the arena. The plan is serde data: dump it, snapshot it, load it back with
//! [`Plan::from_json`], which checks it as untrusted input.

pub mod arena;
mod build;
pub mod dot;
pub mod text;

use crate::ir::infer::infer;
use crate::ir::{IrError, KvCacheType, Op, StepSizes, TensorType, ValueType};
use crate::lower::Hyperparams;
use crate::passes::PassRecord;
use serde::{Deserialize, Serialize};

/// The plan format written in [`Plan::format`]; bumped on incompatible changes.
pub const PLAN_FORMAT: u32 = 1;

/// How a plan is sized and placed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanOptions {
    /// The most tokens one step runs (`T`): prefill chunks are at most this long.
    pub max_tokens: u64,
    /// The most tokens of one step whose logits are returned (`O`, at most `max_tokens`).
    pub max_outputs: u64,
    pub reuse: Reuse,
    /// Alignment of every buffer in the arena, a power of two.
    pub alignment: u64,
}

impl Default for PlanOptions {
    /// 512 tokens per step (llama.cpp's default micro-batch), logits for all of them, liveness
    /// reuse, 256-byte alignment (what CUDA allocations give).
    fn default() -> PlanOptions {
        PlanOptions {
            max_tokens: 512,
            max_outputs: 512,
            reuse: Reuse::Liveness,
            alignment: 256,
        }
    }
}

/// Whether buffers of dead values are reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reuse {
    /// A value's range is free for later values once its last reader ran.
    Liveness,
    /// Every value has its own range: after a step, any value can be read back.
    None,
}

/// The model a plan was compiled from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The template family (`llama`, `qwen2`, `qwen3`).
    pub family: String,
    /// `general.name`.
    pub name: Option<String>,
    pub hparams: Hyperparams,
}

/// How the graph got to its final form.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FusionReport {
    /// Compute nodes (all but weights) of the lowered graph.
    pub nodes_lowered: usize,
    /// The passes that ran, in order.
    pub passes: Vec<PassRecord>,
}

/// A compiled model: the steps to run, where their values live, and what memory they need.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format: u32,
    /// Absent for plans of graphs that do not come from a model (tests).
    pub model: Option<ModelInfo>,
    pub options: PlanOptions,
    pub fusion: FusionReport,
    /// In execution order.
    pub steps: Vec<Step>,
    /// The GGUF tensors the steps read, indexed by [`Operand::Weight`].
    pub weights: Vec<WeightInfo>,
    /// One entry per layer with a KV cache.
    pub kv_cache: Vec<KvLayer>,
    /// The graph's results (the logits), which the backend returns.
    pub outputs: Vec<ValueRef>,
    pub memory: MemoryReport,
}

/// One scheduled node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The node's name (unique).
    pub name: String,
    pub op: Op,
    /// The device that runs it (always 0 for now; layer splits over several GPUs set it).
    pub device: u32,
    /// One per input slot of `op`.
    pub inputs: Vec<Operand>,
    /// One per output port of `op`.
    pub outputs: Vec<StepOutput>,
}

/// Where an input comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operand {
    /// An output of an earlier step.
    Value(ValueRef),
    /// A GGUF tensor: an index into [`Plan::weights`].
    Weight(u32),
}

/// Output `port` of step `step`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ValueRef {
    pub step: u32,
    pub port: u8,
}

/// One output of a step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepOutput {
    /// The value's name (unique, kept by fusion).
    pub name: String,
    pub ty: ValueType,
    /// Its range in the arena; `None` for the KV cache, which is state outside the arena.
    pub buffer: Option<Buffer>,
    /// The last step that reads it: its range is free after that step. `steps.len()` for graph
    /// outputs (kept), its own step if nothing reads it.
    pub last_use: u32,
}

/// A range of the activation arena, sized for the plan's maximum step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buffer {
    pub offset: u64,
    /// Bytes at `max_tokens` / `max_outputs` (a smaller step uses a prefix).
    pub bytes: u64,
}

impl Buffer {
    /// The first byte past the buffer (saturating: a loaded plan is checked before use).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.bytes)
    }
}

/// A weight: its GGUF tensor, type and size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightInfo {
    pub tensor: String,
    pub ty: TensorType,
    pub bytes: u64,
}

/// A layer's KV cache: K and V rows of `n_kv_heads * head_dim` FP16 values per cached token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayer {
    pub layer: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub device: u32,
    pub bytes_per_token: u64,
}

/// The memory a plan needs, known before anything runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// The activation arena (the peak of live values, at the maximum step).
    pub arena_bytes: u64,
    /// What one buffer per value would take: the arena without reuse.
    pub naive_arena_bytes: u64,
    /// Tensor values placed in the arena.
    pub buffers: usize,
    /// All weight tensors, as stored.
    pub weight_bytes: u64,
    /// KV cache per cached token, all layers, K and V.
    pub kv_bytes_per_token: u64,
}

/// Why a plan cannot be built or loaded.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("invalid plan options: {0}")]
    Options(String),
    #[error(
        "`{value}` has no size at {tokens} tokens per step: its rows are not whole blocks of its type, or it needs more bytes than fit in 64 bits"
    )]
    Size { value: String, tokens: u64 },
    #[error(transparent)]
    Graph(#[from] IrError),
    #[error("invalid plan: {0}")]
    Invalid(String),
    #[error("reading the plan: {0}")]
    Json(#[from] serde_json::Error),
}

impl PlanOptions {
    /// Checks the options make sense.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.max_tokens == 0 {
            return Err(PlanError::Options("max_tokens must be at least 1".into()));
        }
        if self.max_outputs == 0 || self.max_outputs > self.max_tokens {
            return Err(PlanError::Options(format!(
                "max_outputs must be between 1 and max_tokens ({}), is {}",
                self.max_tokens, self.max_outputs
            )));
        }
        if !self.alignment.is_power_of_two() {
            return Err(PlanError::Options(format!(
                "alignment must be a power of two, is {}",
                self.alignment
            )));
        }
        Ok(())
    }

    /// The sizes buffers are allocated for.
    pub fn sizes(&self) -> StepSizes {
        StepSizes {
            tokens: self.max_tokens,
            outputs: self.max_outputs,
        }
    }
}

impl Plan {
    /// The step output behind `v`, if it exists.
    pub fn value(&self, v: ValueRef) -> Option<&StepOutput> {
        self.steps
            .get(v.step as usize)?
            .outputs
            .get(usize::from(v.port))
    }

    pub fn to_json(&self) -> String {
        // A plan holds only strings, numbers and enums: serializing it cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Loads a plan from JSON and checks it ([`Plan::validate`]).
    pub fn from_json(json: &str) -> Result<Plan, PlanError> {
        let plan: Plan = serde_json::from_str(json)?;
        plan.validate()?;
        Ok(plan)
    }

    /// Checks what a backend relies on: every operand refers to an earlier step's output or a
    /// listed weight, each step's output types are what its op gives for its input types, every
    /// tensor value has a buffer of its size inside the arena and every KV-cache value none (and
    /// `kv_cache` lists exactly those), `last_use` covers every reader, and no two values whose
    /// lifetimes overlap share bytes.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.format != PLAN_FORMAT {
            return invalid(format!(
                "format {} (this build reads {PLAN_FORMAT})",
                self.format
            ));
        }
        self.options.validate()?;
        let mut live: Vec<(u32, u32, Buffer, &str)> = Vec::new();
        for (s, step) in self.steps.iter().enumerate() {
            let s = s as u32;
            self.check_step(s, step)?;
            for out in &step.outputs {
                if let Some(b) = self.check_output(s, out)? {
                    live.push((s, out.last_use, b, &out.name));
                }
            }
        }
        self.check_results_and_kv()?;
        // Sweep by offset: values sharing bytes must have disjoint lifetimes.
        live.sort_by_key(|&(_, _, b, _)| b.offset);
        for (i, &(s1, e1, b1, n1)) in live.iter().enumerate() {
            let sharing = live[i + 1..]
                .iter()
                .take_while(|(_, _, b2, _)| b2.offset < b1.end());
            for &(s2, e2, b2, n2) in sharing {
                if s1 <= e2 && s2 <= e1 {
                    return invalid(format!(
                        "`{n1}` {b1:?} and `{n2}` {b2:?} are live at the same time and overlap"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Operands available when step `s` runs, and output types its op gives for them.
    fn check_step(&self, s: u32, step: &Step) -> Result<(), PlanError> {
        let mut types = Vec::with_capacity(step.inputs.len());
        for input in &step.inputs {
            let ty = match *input {
                Operand::Weight(w) => self
                    .weights
                    .get(w as usize)
                    .map(|w| ValueType::Tensor(w.ty.clone())),
                Operand::Value(v) if v.step < s => match self.value(v) {
                    Some(out) if out.last_use < s => {
                        return invalid(format!(
                            "step {s} reads `{}` after its last use",
                            out.name
                        ));
                    }
                    other => other.map(|out| out.ty.clone()),
                },
                Operand::Value(_) => None,
            };
            match ty {
                Some(ty) => types.push(ty),
                None => {
                    return invalid(format!(
                        "step {s} `{}` reads {input:?}, which is not available",
                        step.name
                    ));
                }
            }
        }
        let refs: Vec<&ValueType> = types.iter().collect();
        let inferred = infer(&step.op, &refs)
            .map_err(|e| PlanError::Invalid(format!("step {s} `{}`: {e}", step.name)))?;
        if inferred.iter().ne(step.outputs.iter().map(|o| &o.ty)) {
            return invalid(format!(
                "step {s} `{}` records output types its op does not give",
                step.name
            ));
        }
        Ok(())
    }

    /// A tensor output's buffer (checked: its size, aligned, inside the arena), or `None` for a
    /// KV cache.
    fn check_output(&self, s: u32, out: &StepOutput) -> Result<Option<Buffer>, PlanError> {
        let n_steps = self.steps.len() as u32;
        if out.last_use < s || out.last_use > n_steps {
            return invalid(format!(
                "`{}` has last_use {} outside {s}..={n_steps}",
                out.name, out.last_use
            ));
        }
        match (&out.ty, out.buffer) {
            (ValueType::KvCache(_), None) => Ok(None),
            (ValueType::Tensor(t), Some(b)) => {
                let need = t.bytes(self.options.sizes());
                let inside = b
                    .offset
                    .checked_add(b.bytes)
                    .is_some_and(|end| end <= self.memory.arena_bytes);
                if need != Some(b.bytes) || !inside || b.offset % self.options.alignment != 0 {
                    return invalid(format!(
                        "`{}` has buffer {b:?}, but needs {need:?} aligned bytes in the arena",
                        out.name
                    ));
                }
                Ok(Some(b))
            }
            _ => invalid(format!(
                "`{}` must have a buffer exactly when it is a tensor",
                out.name
            )),
        }
    }

    /// The graph outputs are tensors kept to the end; `kv_cache` lists the caches the steps
    /// write, in order.
    fn check_results_and_kv(&self) -> Result<(), PlanError> {
        let n_steps = self.steps.len() as u32;
        let kept = |v: &ValueRef| {
            self.value(*v)
                .is_some_and(|o| o.last_use == n_steps && o.buffer.is_some())
        };
        if let Some(v) = self.outputs.iter().find(|v| !kept(v)) {
            return invalid(format!(
                "graph output {v:?} is missing, not a tensor or not kept to the end"
            ));
        }
        let written = self
            .steps
            .iter()
            .flat_map(|s| &s.outputs)
            .filter_map(|o| match o.ty {
                ValueType::KvCache(kv) => Some(kv),
                ValueType::Tensor(_) => None,
            });
        let listed = self.kv_cache.iter().map(|l| KvCacheType {
            layer: l.layer,
            n_kv_heads: l.n_kv_heads,
            head_dim: l.head_dim,
        });
        let sizes_right = self.kv_cache.iter().all(|l| {
            let kv = KvCacheType {
                layer: l.layer,
                n_kv_heads: l.n_kv_heads,
                head_dim: l.head_dim,
            };
            l.bytes_per_token == kv.bytes_per_token()
        });
        if !written.eq(listed) || !sizes_right {
            return invalid("kv_cache does not list the KV caches the steps write".into());
        }
        Ok(())
    }
}

fn invalid<T>(message: String) -> Result<T, PlanError> {
    Err(PlanError::Invalid(message))
}
