//! The CPU reference backend: runs every op of a plan, fused or not, in FP32 with rayon.
//!
//! Weights stay in the mmapped GGUF file in their own storage types; the [`kernels`] read the
//! quantized blocks directly. Small F32 vectors (norm weights, biases, rope factors) are copied
//! once at load. The KV cache is FP16 and paged: one K and one V array per layer of
//! `n_pages * page_size` cells of `n_kv_heads * head_dim`, found through the [`PageTables`] the
//! backend keeps in host memory ([`super::step`]). The activation arena is one `f32` allocation
//! laid out exactly as the plan says ([`arena`]). The integer inputs of a step (token ids,
//! positions, output rows) are converted once per step from the [`Step`].
//!
//! [`CpuBackend::run_step`] is the whole interpreter: one `match` over the ops, each arm a
//! kernel call.

pub mod arena;
pub mod kernels;

use self::arena::{Arena, check_disjoint};
use self::kernels::{AttentionShape, KernelError, KvSpan, RopeSpec, RopeStyle, WeightMatrix};
use super::layout::{
    Source, intact_values, n_vocab, plan_tensor, region, source, step_limits, value_names, width_of,
};
use super::step::{KvGeometry, PageOp, PageTables, Step, StepLimits, StepOutputs};
use super::{Backend, BackendError, DeviceInfo, HostTensor};
use crate::gguf::{GgufFile, TensorInfo, quants};
use crate::ir::{Op, RopeParams, StepSizes, TensorType};
use crate::plan::{Operand, Plan, ValueRef};
use half::f16;
use half::vec::HalfBitsVecExt;
use std::collections::HashMap;
use std::sync::Arc;

impl From<KernelError> for BackendError {
    fn from(e: KernelError) -> BackendError {
        BackendError::Kernel(e.to_string())
    }
}

/// One weight of the plan: its tensor in the file, and an F32 copy for small vectors.
struct Weight {
    info: TensorInfo,
    /// IR shape: `[n, k]` for matrices, `[k]` for vectors.
    shape: Vec<usize>,
    /// The values as F32, for rank-1 weights (norms, biases, rope factors).
    vector: Option<Vec<f32>>,
}

/// A layer's KV cache: `n_pages * page_size` cells of `width` FP16 values for K and for V.
struct LayerKv {
    k: Vec<f16>,
    v: Vec<f16>,
    width: usize,
}

/// The per-step data every op may read, derived once from the step (buffers kept between
/// steps).
struct StepData {
    sizes: StepSizes,
    tokens: Vec<i32>,
    positions: Vec<i32>,
    outputs: Vec<i32>,
    /// The cell each token writes its K and V to.
    write_cells: Vec<u32>,
    /// Each token's slot and position.
    slots: Vec<u32>,
    pos: Vec<u32>,
}

impl StepData {
    fn empty() -> StepData {
        StepData {
            sizes: StepSizes {
                tokens: 0,
                outputs: 0,
            },
            tokens: Vec::new(),
            positions: Vec::new(),
            outputs: Vec::new(),
            write_cells: Vec::new(),
            slots: Vec::new(),
            pos: Vec::new(),
        }
    }
}

/// The CPU backend; see the [module docs](self).
pub struct CpuBackend {
    plan: Plan,
    file: Arc<GgufFile>,
    device: DeviceInfo,
    weights: Vec<Weight>,
    arena: Arena,
    kv: Vec<LayerKv>,
    /// `kv` index of each layer number.
    kv_index: HashMap<u32, usize>,
    tables: PageTables,
    names: HashMap<String, ValueRef>,
    /// Per step and port: whether the value's buffer survives the rest of the step.
    intact: Vec<Vec<bool>>,
    /// Scratch for the running step.
    data: StepData,
    /// The last step that ran, for [`Backend::read_value`] (valid when `has_last`).
    last: Step,
    has_last: bool,
}

impl CpuBackend {
    /// Loads `plan` over the weights of `file`, with a KV cache of the given pages and slots.
    pub fn new(
        plan: Plan,
        file: Arc<GgufFile>,
        geometry: KvGeometry,
    ) -> Result<CpuBackend, BackendError> {
        let n_cells = geometry.n_cells();
        plan.validate()
            .map_err(|e| BackendError::Mismatch(e.to_string()))?;
        check_disjoint(&plan).map_err(BackendError::Mismatch)?;
        let weights = plan
            .weights
            .iter()
            .map(|w| load_weight(&file, &w.tensor, &w.ty))
            .collect::<Result<Vec<_>, _>>()?;
        check_memory(&plan, n_cells)?;
        let mut kv = Vec::with_capacity(plan.kv_cache.len());
        let mut kv_index = HashMap::new();
        for layer in &plan.kv_cache {
            let width = (layer.n_kv_heads * layer.head_dim) as usize;
            kv_index.insert(layer.layer, kv.len());
            // Zeroed allocations: the operating system maps pages only when cells are written, so
            // a large context costs memory as it fills, not up front.
            let zeroed = || vec![0u16; n_cells as usize * width].reinterpret_into();
            kv.push(LayerKv {
                k: zeroed(),
                v: zeroed(),
                width,
            });
        }
        let names = value_names(&plan);
        let backend = CpuBackend {
            arena: Arena::new(plan.memory.arena_bytes),
            device: DeviceInfo {
                kind: "cpu".into(),
                name: cpu_name(),
                detail: format!(
                    "{} threads, FP32 compute, {:?} kernels",
                    rayon::current_num_threads(),
                    kernels::Simd::detect()
                ),
            },
            intact: intact_values(&plan),
            plan,
            file,
            weights,
            kv,
            kv_index,
            tables: PageTables::new(geometry),
            names,
            data: StepData::empty(),
            last: Step::new(),
            has_last: false,
        };
        backend.check_matrices()?;
        Ok(backend)
    }

    /// Fails at load, not mid-step, when a matrix weight has a type the kernels cannot multiply.
    fn check_matrices(&self) -> Result<(), BackendError> {
        for step in &self.plan.steps {
            let matrices = step.inputs.get(step.op.matrix_slots()).unwrap_or_default();
            for operand in matrices {
                if let Operand::Weight(i) = operand {
                    let w = &self.weights[*i as usize];
                    matrix(&self.file, w).map_err(|e| BackendError::Unsupported {
                        backend: "cpu".into(),
                        reason: format!("tensor `{}`: {e}", w.info.name),
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Vocabulary size: the width of the plan's first output.
    fn n_vocab(&self) -> Option<usize> {
        n_vocab(&self.plan)
    }

    /// Runs a staged step: copies pages, computes every plan step, writes the outputs.
    fn run(&mut self, step: &Step, out: &mut StepOutputs) -> Result<(), BackendError> {
        // Copy-on-write first: the ops were validated as a whole.
        let cells = self.tables.geometry().page_size as usize;
        for op in &step.ops {
            if let PageOp::Copy { src, dst } = *op {
                for layer in &mut self.kv {
                    let n = cells * layer.width;
                    let (src, dst) = (src as usize * n, dst as usize * n);
                    layer.k.copy_within(src..src + n, dst);
                    layer.v.copy_within(src..src + n, dst);
                }
            }
        }
        let mut data = std::mem::replace(&mut self.data, StepData::empty());
        data.sizes = StepSizes {
            tokens: step.n_tokens() as u64,
            outputs: step.outputs.len() as u64,
        };
        let to_i32 = |dst: &mut Vec<i32>, src: &mut dyn Iterator<Item = u32>| {
            dst.clear();
            dst.extend(src.map(|x| x as i32));
        };
        to_i32(&mut data.tokens, &mut step.tokens.iter().copied());
        to_i32(&mut data.positions, &mut step.positions.iter().copied());
        to_i32(&mut data.outputs, &mut step.outputs.iter().map(|o| o.row));
        data.slots.clone_from(&step.slots);
        data.pos.clone_from(&step.positions);
        data.write_cells.clear();
        for (&slot, &pos) in step.slots.iter().zip(&step.positions) {
            // Staged: every token's position is on a mapped page.
            let cell = self.tables.cell(slot, pos).ok_or_else(|| {
                BackendError::Mismatch(format!("position {pos} of slot {slot} has no cell"))
            })?;
            data.write_cells.push(cell);
        }
        // Until this step completes, its values are neither the old ones nor the new ones.
        self.has_last = false;
        let result = (0..self.plan.steps.len()).try_for_each(|i| self.run_step(i, &data));
        let sizes = data.sizes;
        self.data = data;
        result?;
        self.write_outputs(step, sizes, out)?;
        self.last.clone_from(step);
        self.has_last = true;
        Ok(())
    }

    /// Fills `out` from the plan's outputs: the first (logits) per output request, the others
    /// whole.
    fn write_outputs(
        &self,
        step: &Step,
        sizes: StepSizes,
        out: &mut StepOutputs,
    ) -> Result<(), BackendError> {
        let (&first, rest) = self
            .plan
            .outputs
            .split_first()
            .ok_or_else(|| BackendError::Mismatch("the plan has no output".into()))?;
        let n_vocab = self
            .n_vocab()
            .ok_or_else(|| BackendError::Mismatch("the plan's output is not a matrix".into()))?;
        let logits = self.arena.slice(region(&self.plan, first, sizes)?);
        let position = |row: usize| {
            step.outputs
                .get(row)
                .and_then(|o| step.positions.get(o.row as usize))
                .copied()
                .unwrap_or(0)
        };
        let name = self.plan.value(first).map_or("logits", |o| o.name.as_str());
        super::check_finite(logits, n_vocab, position, name)?;
        out.clear(n_vocab);
        for (request, row) in step.outputs.iter().zip(logits.chunks_exact(n_vocab)) {
            out.push_from_row(request.kind, row);
        }
        for &v in rest {
            let r = region(&self.plan, v, sizes)?;
            let name = self.plan.value(v).map_or("", |o| o.name.as_str());
            let cols = width_of(&self.plan, Operand::Value(v)).unwrap_or(r.len);
            out.push_value(name, cols)
                .extend_from_slice(self.arena.slice(r));
        }
        Ok(())
    }

    /// Runs step `index` of the plan.
    fn run_step(&mut self, index: usize, data: &StepData) -> Result<(), BackendError> {
        let CpuBackend {
            plan,
            file,
            weights,
            arena,
            kv,
            kv_index,
            tables,
            ..
        } = self;
        let step = &plan.steps[index];
        let fail = |what: String| BackendError::Mismatch(format!("step {}: {what}", step.name));

        // Every input, resolved; tensor values come from the arena, taken together with the
        // outputs in one split so that inputs and outputs can be borrowed at once.
        let mut in_regions = Vec::new();
        for operand in &step.inputs {
            if let Operand::Value(v) = *operand
                && let Source::Arena = source(plan, v)
            {
                in_regions.push(region(plan, v, data.sizes)?);
            }
        }
        let mut out_regions = Vec::new();
        for (p, out) in step.outputs.iter().enumerate() {
            if out.buffer.is_some() {
                let v = ValueRef {
                    step: index as u32,
                    port: p as u8,
                };
                out_regions.push(region(plan, v, data.sizes)?);
            }
        }
        let (acts, mut outs) = arena.split(&in_regions, &out_regions);
        let mut acts = acts.into_iter();
        let mut ins = Vec::with_capacity(step.inputs.len());
        for operand in &step.inputs {
            ins.push(match *operand {
                Operand::Weight(i) => {
                    let w = &weights[i as usize];
                    match &w.vector {
                        Some(v) => Input::Vector(v),
                        None => Input::Matrix(matrix(file, w)?),
                    }
                }
                Operand::Value(v) => match source(plan, v) {
                    Source::Arena => Input::Act(acts.next().ok_or_else(|| fail("inputs".into()))?),
                    Source::Tokens => Input::Int(&data.tokens),
                    Source::Positions => Input::Int(&data.positions),
                    Source::Outputs => Input::Int(&data.outputs),
                    Source::Kv(layer) => Input::Kv(
                        *kv_index
                            .get(&layer)
                            .ok_or_else(|| fail(format!("no KV cache for layer {layer}")))?,
                    ),
                },
            });
        }
        let input = |slot: usize| {
            ins.get(slot)
                .ok_or_else(|| fail(format!("no input {slot}")))
        };
        let act = |slot| {
            input(slot)?
                .act()
                .ok_or_else(|| fail(format!("input {slot} is not an activation")))
        };
        let int = |slot| {
            input(slot)?
                .int()
                .ok_or_else(|| fail(format!("input {slot} is not an integer input")))
        };
        let mat = |slot| {
            input(slot)?
                .matrix()
                .ok_or_else(|| fail(format!("input {slot} is not a matrix")))
        };
        let vector = |slot| {
            input(slot)?
                .vector()
                .ok_or_else(|| fail(format!("input {slot} is not a vector weight")))
        };
        // The second operand of add/mul: an activation, or a weight vector broadcast over rows.
        let act_or_vector = |slot| {
            let i = input(slot)?;
            i.act()
                .or(i.vector())
                .ok_or_else(|| fail(format!("input {slot} is not an activation or vector")))
        };
        let freq_factors = |slot: usize| -> Result<Option<&[f32]>, BackendError> {
            if slot < ins.len() {
                vector(slot).map(Some)
            } else {
                Ok(None)
            }
        };
        let kv_slot = |slot| match input(slot)? {
            Input::Kv(i) => Ok(*i),
            _ => Err(fail(format!("input {slot} is not a KV cache"))),
        };
        let n_outs = outs.len();
        // Each output is handed out once (taken from the list), so every kernel gets its own
        // exclusive slice.
        let mut out = |port: usize| -> Result<&mut [f32], BackendError> {
            outs.get_mut(port)
                .map(std::mem::take)
                .ok_or_else(|| fail(format!("no output {port} of {n_outs}")))
        };

        match &step.op {
            // Step inputs: read straight from the step data by their consumers.
            Op::TokenIds | Op::Positions | Op::OutputRows => {}
            Op::Weight { .. } => return Err(fail("weights are not steps".into())),
            Op::Embedding => kernels::embedding(&mat(0)?, int(1)?, out(0)?)?,
            Op::MatMul => kernels::matmul(act(0)?, &mat(1)?, out(0)?)?,
            Op::Add => kernels::add(act(0)?, act_or_vector(1)?, out(0)?)?,
            Op::Mul => kernels::mul(act(0)?, act_or_vector(1)?, out(0)?)?,
            Op::Silu => kernels::silu(act(0)?, out(0)?)?,
            Op::SwiGlu => kernels::swiglu(act(0)?, act(1)?, out(0)?)?,
            Op::RmsNorm { eps } => kernels::rms_norm(act(0)?, vector(1)?, *eps, out(0)?)?,
            Op::Rope(p) => {
                kernels::rope(act(0)?, int(1)?, freq_factors(2)?, &rope_spec(p), out(0)?)?
            }
            Op::KvWrite(p) => {
                let layer = &mut kv
                    [kv_index_of(kv_index, p.layer).ok_or_else(|| fail("kv layer".into()))?];
                let width = layer.width;
                kernels::kv_write(
                    act(0)?,
                    act(1)?,
                    &data.write_cells,
                    width,
                    &mut layer.k,
                    &mut layer.v,
                )?;
            }
            Op::Attention(p) => {
                let layer = &kv[kv_slot(1)?];
                // Token t at position p attends positions lo..=p of its slot (validated: every
                // page up to p is mapped).
                let page_size = tables.geometry().page_size as usize;
                let spans = data
                    .slots
                    .iter()
                    .zip(&data.pos)
                    .map(|(&slot, &pos)| {
                        let hi = pos as usize + 1;
                        let lo = p
                            .sliding_window
                            .map_or(0, |w| hi.saturating_sub(w as usize));
                        let pages = tables.pages(slot).unwrap_or(&[]);
                        KvSpan {
                            pages,
                            page_size,
                            lo,
                            hi,
                        }
                    })
                    .collect::<Vec<_>>();
                let shape = AttentionShape {
                    n_heads: p.n_heads as usize,
                    n_kv_heads: p.n_kv_heads as usize,
                    head_dim: p.head_dim as usize,
                    scale: p.scale,
                };
                kernels::attention_paged(act(0)?, &layer.k, &layer.v, &spans, &shape, out(0)?)?;
            }
            Op::SelectRows => {
                let width = width_of(plan, step.inputs[0])
                    .ok_or_else(|| fail("select_rows input".into()))?;
                kernels::select_rows(act(0)?, width, int(1)?, out(0)?)?;
            }
            Op::MultiMatMul { n } => {
                for i in 0..*n as usize {
                    kernels::matmul(act(0)?, &mat(1 + i)?, out(i)?)?;
                }
            }
            Op::GateUpSwiGlu => {
                kernels::matmul_gate_up_swiglu(act(0)?, &mat(1)?, &mat(2)?, out(0)?)?
            }
            Op::AddRmsNorm { eps } => {
                let (sum, normed) = (out(0)?, out(1)?);
                kernels::add_rms_norm(act(0)?, act(1)?, vector(2)?, *eps, sum, normed)?;
            }
            Op::RopeKvWrite { rope, kv: p } => {
                let layer = &mut kv
                    [kv_index_of(kv_index, p.layer).ok_or_else(|| fail("kv layer".into()))?];
                kernels::rope_kv_write(
                    act(0)?,
                    act(1)?,
                    int(2)?,
                    freq_factors(3)?,
                    &rope_spec(rope),
                    &data.write_cells,
                    &mut layer.k,
                    &mut layer.v,
                )?;
            }
            // Exactly the two steps it fuses: rope(q), then rope_kv_write(k, v).
            Op::RopeQkvWrite { rope, kv: p } => {
                let (spec, ff) = (rope_spec(rope), freq_factors(4)?);
                kernels::rope(act(0)?, int(3)?, ff, &spec, out(0)?)?;
                let layer = &mut kv
                    [kv_index_of(kv_index, p.layer).ok_or_else(|| fail("kv layer".into()))?];
                kernels::rope_kv_write(
                    act(1)?,
                    act(2)?,
                    int(3)?,
                    ff,
                    &spec,
                    &data.write_cells,
                    &mut layer.k,
                    &mut layer.v,
                )?;
            }
        }
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn device(&self) -> &DeviceInfo {
        &self.device
    }

    fn plan(&self) -> &Plan {
        &self.plan
    }

    fn kv_geometry(&self) -> KvGeometry {
        self.tables.geometry()
    }

    fn page_tables(&self) -> &PageTables {
        &self.tables
    }

    fn step_limits(&self) -> StepLimits {
        step_limits(&self.plan)
    }

    fn validate(&mut self, step: &Step) -> Result<(), BackendError> {
        let limits = self.step_limits();
        Ok(self.tables.validate(step, limits)?)
    }

    fn step(&mut self, step: &Step, out: &mut StepOutputs) -> Result<(), BackendError> {
        let limits = self.step_limits();
        self.tables.stage(step, limits)?;
        let result = self.run(step, out);
        match result {
            Ok(()) => self.tables.commit(),
            Err(_) => self.tables.rollback(),
        }
        result
    }

    fn read_value(&self, name: &str) -> Result<HostTensor, BackendError> {
        let &v = self
            .names
            .get(name)
            .ok_or_else(|| BackendError::NoSuchValue(name.to_string()))?;
        if !self.has_last {
            return Err(BackendError::NotComputed(name.to_string()));
        }
        let last = &self.last;
        if let Some(t) = super::layout::step_input_value(&self.plan, v, last, name, "cpu")? {
            return Ok(t);
        }
        if !self.intact[v.step as usize][v.port as usize] {
            return Err(BackendError::Overwritten {
                name: name.to_string(),
            });
        }
        let sizes = StepSizes {
            tokens: last.n_tokens() as u64,
            outputs: last.outputs.len() as u64,
        };
        let r = region(&self.plan, v, sizes)?;
        let cols = width_of(&self.plan, Operand::Value(v))
            .unwrap_or(r.len)
            .max(1);
        HostTensor::from_shape_vec((r.len / cols, cols), self.arena.slice(r).to_vec())
            .map_err(|e| BackendError::Mismatch(format!("value `{name}`: {e}")))
    }
}

/// A resolved input of a step.
enum Input<'a> {
    Act(&'a [f32]),
    Int(&'a [i32]),
    Matrix(WeightMatrix<'a>),
    Vector(&'a [f32]),
    /// Index into the backend's KV layers.
    Kv(usize),
}

impl<'a> Input<'a> {
    fn act(&self) -> Option<&'a [f32]> {
        match *self {
            Input::Act(a) => Some(a),
            _ => None,
        }
    }
    fn int(&self) -> Option<&'a [i32]> {
        match *self {
            Input::Int(a) => Some(a),
            _ => None,
        }
    }
    fn matrix(&self) -> Option<WeightMatrix<'a>> {
        match self {
            Input::Matrix(m) => Some(*m),
            _ => None,
        }
    }
    fn vector(&self) -> Option<&'a [f32]> {
        match *self {
            Input::Vector(v) => Some(v),
            _ => None,
        }
    }
}

fn kv_index_of(index: &HashMap<u32, usize>, layer: u32) -> Option<usize> {
    index.get(&layer).copied()
}

fn rope_spec(p: &RopeParams) -> RopeSpec {
    RopeSpec {
        style: match p.style {
            crate::ir::RopeStyle::Normal => RopeStyle::Normal,
            crate::ir::RopeStyle::Neox => RopeStyle::Neox,
        },
        head_dim: p.head_dim as usize,
        n_rot: p.n_rot as usize,
        freq_base: p.freq_base,
        freq_scale: p.freq_scale,
    }
}

fn matrix<'a>(file: &'a GgufFile, w: &Weight) -> Result<WeightMatrix<'a>, KernelError> {
    let (n, k) = match w.shape[..] {
        [n, k] => (n, k),
        [k] => (1, k),
        _ => {
            return Err(KernelError::Invalid(format!(
                "weight {} has rank {}, not a matrix",
                w.info.name,
                w.shape.len()
            )));
        }
    };
    WeightMatrix::new(file.tensor_data(&w.info), w.info.ty, n, k)
}

/// Finds a plan weight in the file and checks that its type and shape are what the plan says.
fn load_weight(file: &GgufFile, name: &str, ty: &TensorType) -> Result<Weight, BackendError> {
    let (info, shape) = plan_tensor(file, name, ty)?;
    let vector = if shape.len() == 1 {
        Some(
            quants::dequantize_f32(file, info).map_err(|e| BackendError::Unsupported {
                backend: "cpu".into(),
                reason: e.to_string(),
            })?,
        )
    } else {
        None
    };
    Ok(Weight {
        info: info.clone(),
        shape,
        vector,
    })
}

/// Refuses a KV cache and arena larger than the machine's memory, before allocating them (an
/// allocation that large would abort the process or wake the OOM killer, not fail cleanly).
/// `m40-llm compile` uses it (with no cells) to warn of a plan that cannot run here.
pub fn check_memory(plan: &Plan, n_cells: u64) -> Result<(), BackendError> {
    let kv: u64 = plan.kv_cache.iter().map(|l| l.bytes_per_token).sum();
    let needed = kv
        .checked_mul(n_cells)
        .and_then(|b| b.checked_add(plan.memory.arena_bytes));
    let total = memory_total();
    match (needed, total) {
        (Some(n), Some(t)) if n <= t => Ok(()),
        (Some(n), None) if usize::try_from(n).is_ok() => Ok(()),
        (needed, total) => Err(BackendError::Unsupported {
            backend: "cpu".into(),
            reason: format!(
                "{} need {}, more than this machine's {}: {}",
                if n_cells == 0 {
                    format!(
                        "the plan's {} MiB arena would",
                        plan.memory.arena_bytes >> 20
                    )
                } else {
                    format!(
                        "a KV cache of {n_cells} cells ({kv} bytes each) and a {} MiB arena",
                        plan.memory.arena_bytes >> 20
                    )
                },
                needed.map_or("more than 2^64 bytes".into(), |n| format!(
                    "{:.1} GiB",
                    n as f64 / GIB
                )),
                total.map_or("address space".into(), |t| format!(
                    "{:.1} GiB of memory",
                    t as f64 / GIB
                )),
                if n_cells == 0 {
                    "lower --max-tokens"
                } else {
                    "lower the context size"
                },
            ),
        }),
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// Physical memory in bytes (Linux `/proc/meminfo`), if known: the CPU target's budget.
pub fn memory_total() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// The CPU's model name (Linux), or a generic name.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
