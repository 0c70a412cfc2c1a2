//! The CUDA executor: runs a [`Plan`] on one GPU, the same plan the CPU reference runs.
//!
//! At load it compiles (or reads from the cache) every kernel family for the device, checks that
//! the weights, the KV cache, the arena and the scratch buffers fit the device's free memory,
//! then uploads the weights once in their GGUF block layout (vectors such as norm weights as
//! F32) and allocates the FP16 paged KV cache (per layer, K and V), the page tables
//! (`[max_slots, max_pages_per_slot]` page numbers, `-1` where unmapped), one activation arena
//! laid out exactly as the plan says, and the step's I/O buffer ([`super::stepio`]).
//!
//! A step copies its page tables' changed rows and, in one copy from pinned memory, its integer
//! inputs and the non-finite flag's initial value to the device, applies its copy-on-write page
//! copies, launches one kernel (or a few) per plan step on one stream, then the logits' NaN/inf
//! check and argmax / top-k on the device, and copies back only what the step asked for: the
//! flag with the argmax / top-k results in one copy and one synchronize, and logits rows.
//! [`CudaBackend::step`] is the interpreter: one `match` over the ops, as in the CPU backend.
//!
//! Decode steps (at most [`TILED_MAX_ROWS`] tokens) are captured once per shape as a CUDA graph
//! and replayed: a step's kernels read everything that changes from step to step (tokens,
//! positions, slots, page tables) from device buffers at fixed addresses, so the same launches
//! serve every step of a shape, and one graph launch replaces a few hundred kernel launches
//! (SmolLM2 has about 300 a token), the non-finite check and argmax / top-k included. The shape
//! is the token and output counts, the context length in units of flash-decoding's smallest
//! split ([`DecodeSplits::context_units`]: every split count is a function of it), so a
//! sequence needs a new graph every 128 positions up to 128 splits' worth, the attention kernel
//! the step's slots pick and the step's top-k width; a shape is captured when it comes a second
//! time. `M40LLM_CUDA_GRAPHS=0` launches every kernel every step instead.
//!
//! Errors name the kernel and the sizes. A failed launch or a failed step leaves the page
//! tables as they were (the host's view is rolled back and the device's rows restored); if the
//! device itself reports an error (an illegal address, a lost device), the backend says it is
//! unusable and refuses further steps.

use super::matmul::{DeviceWeight, Matmul, TILED_MAX_ROWS, cublas_enabled_by_env};
use super::mem::{self, Span};
use super::ops::{AttnShape, DecodeSplits, Ops, PagedKv, Rope};
use super::stepio::{IoLayout, StepIo, TopLayout, row_results};
use super::{KernelSet, kernels};
use crate::backend::device::GpuInfo;
use crate::backend::layout::{
    Source, intact_values, n_vocab, plan_tensor, region, source, step_limits, value_names, width_of,
};
use crate::backend::step::{KvGeometry, OutputKind, PageOp, PageTables, Step, StepLimits};
use crate::backend::target::{GemmPrecision, Target, gemm_request_from_env};
use crate::backend::{Backend, BackendError, DeviceInfo, HostTensor, StepOutputs, TokenLogit};
use crate::gguf::{GgufFile, quants};
use crate::ir::{Dim, Op, RopeStyle, StepSizes};
use crate::plan::{Operand, Plan, ValueRef};
use crate::units::human_bytes;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits,
};
use std::collections::HashMap;
use std::sync::Arc;

/// A weight of the plan on the device.
enum DevWeight {
    /// A matrix (or embedding table) in its GGUF type.
    Matrix(DeviceWeight),
    /// A vector (norm weight, bias, rope factors) as F32.
    Vector(CudaSlice<f32>),
}

/// Decode graphs kept at once (least recently used dropped first).
const GRAPH_CACHE: usize = 16;

/// Failed captures after which graphs are turned off (a capture fails when something else on
/// the device, e.g. another thread's context-wide call, invalidates it).
const GRAPH_FAILURES: u32 = 3;

/// What a step's launches depend on besides device buffers at fixed addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GraphKey {
    tokens: usize,
    outputs: usize,
    /// The longest context in units of the smallest decode split, capped
    /// ([`DecodeSplits::context_units`]: the decode attention's split counts follow from it).
    context_units: usize,
    /// Whether attention takes the prefill kernel (`Ops::prefill_attention_pays`).
    prefill_attention: bool,
    /// The top-k width of the step's results (`TopLayout::k`: 0 none, 1 argmax): the check
    /// and top-k kernels are part of the graph, and where their results go depends on it.
    top_k: usize,
}

impl GraphKey {
    /// The key of a decode step; `None` for steps that are not replayed (prefill: more than
    /// `TILED_MAX_ROWS` tokens, where cuBLAS runs).
    fn of(step: &Step, n_vocab: usize, decode: &DecodeSplits) -> Option<GraphKey> {
        let tokens = step.n_tokens();
        if tokens == 0 || tokens > TILED_MAX_ROWS {
            return None;
        }
        let longest = step.positions.iter().max().map_or(1, |&p| p as usize + 1);
        Some(GraphKey {
            tokens,
            outputs: step.outputs.len(),
            context_units: decode.context_units(longest),
            prefill_attention: Ops::prefill_attention_pays(&step.slots),
            top_k: TopLayout::of(&step.outputs, n_vocab).k,
        })
    }
}

/// A captured graph the backend owns alone.
struct OwnedGraph(CudaGraph);

// SAFETY: CUDA graphs may be used from any thread as long as calls on one graph are serialized
// (CUDA's "Graph object thread safety"); an `OwnedGraph` is reached only through the backend's
// `&mut self`, so moving it to another thread (Send, not Sync) keeps every call serialized.
unsafe impl Send for OwnedGraph {}

/// The captured decode steps.
struct Graphs {
    /// `M40LLM_CUDA_GRAPHS` is not `0`, and no capture has failed.
    enabled: bool,
    /// Most recently used last.
    cached: Vec<(GraphKey, OwnedGraph)>,
    /// Shapes seen once and not captured: a shape is captured the second time, so a one-off
    /// step (a prefill chunk of a few tokens) does not pay for a capture it never replays.
    seen: Vec<GraphKey>,
    captures: u64,
    replays: u64,
    failures: u32,
}

impl Graphs {
    fn new() -> Graphs {
        Graphs {
            enabled: std::env::var("M40LLM_CUDA_GRAPHS").map_or(true, |v| v.trim() != "0"),
            cached: Vec::new(),
            seen: Vec::new(),
            captures: 0,
            replays: 0,
            failures: 0,
        }
    }
}

/// One layer's KV cache: `n_cells` rows of `width` FP16 values for K and for V.
struct LayerKv {
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
    width: usize,
}

/// The CUDA backend; see the [module docs](self).
pub struct CudaBackend {
    plan: Plan,
    device: DeviceInfo,
    ks: KernelSet,
    stream: Arc<CudaStream>,
    mm: Matmul,
    weights: Vec<DevWeight>,
    arena: CudaSlice<f32>,
    kv: Vec<LayerKv>,
    kv_index: HashMap<u32, usize>,
    tables: PageTables,
    /// The step's integer inputs, the non-finite flag and the argmax / top-k results in one
    /// device buffer, and the page tables (`max_slots * max_pages_per_slot` entries), with
    /// their pinned host sides.
    io: StepIo,
    /// Dequantized weight tiles (cuBLAS path) and the tiled kernels' partial sums.
    tiles: CudaSlice<f32>,
    /// The up projection of a multi-row fused gate/up (cuBLAS path), grown on demand.
    up_rows: CudaSlice<f32>,
    /// Flash-decoding partials, grown on demand.
    attn_part: CudaSlice<f32>,
    /// How flash-decoding splits contexts on this device.
    decode: DecodeSplits,
    names: HashMap<String, ValueRef>,
    intact: Vec<Vec<bool>>,
    /// Host scratch.
    host_row: Vec<f32>,
    host_top: Vec<TokenLogit>,
    last: Step,
    has_last: bool,
    /// Set when the device reported an error that leaves its state unknown.
    broken: Option<String>,
    resident_bytes: u64,
    graphs: Graphs,
}

/// What a load uploads and allocates, in bytes, checked against the device's free memory first.
struct Footprint {
    weights: u64,
    kv: u64,
    arena: u64,
    scratch: u64,
}

impl Footprint {
    fn total(&self) -> u64 {
        self.weights + self.kv + self.arena + self.scratch
    }
}

fn driver(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> BackendError + '_ {
    move |e| BackendError::Kernel(format!("CUDA driver: {what}: {e}"))
}

fn alloc<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    n: usize,
    what: &str,
) -> Result<CudaSlice<T>, BackendError> {
    stream.alloc_zeros::<T>(n.max(1)).map_err(|e| {
        BackendError::Kernel(format!(
            "cannot allocate {what} ({}) on the GPU: {e}",
            human_bytes((n.max(1) * std::mem::size_of::<T>()) as u64, 1)
        ))
    })
}

/// Grows `buf` to at least `n` elements (contents are not kept).
fn ensure<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    buf: &mut CudaSlice<T>,
    n: usize,
    what: &str,
) -> Result<(), BackendError> {
    if buf.len() < n {
        *buf = alloc(stream, n, what)?;
    }
    Ok(())
}

impl CudaBackend {
    /// Loads `plan` over the weights of `file` onto `gpu`, with a KV cache of `geometry`'s pages
    /// and slots. Uses cuBLAS for matmuls of more than `TILED_MAX_ROWS` rows unless
    /// `M40LLM_ENABLE_CUBLAS=0`, in the prefill GEMM precision `M40LLM_GEMM` / `M40LLM_TF32=1`
    /// ask for (FP32 by default; one the GPU lacks is an error naming its arch).
    pub fn new(
        plan: Plan,
        file: Arc<GgufFile>,
        geometry: KvGeometry,
        gpu: &GpuInfo,
    ) -> Result<CudaBackend, BackendError> {
        let unsupported = |reason: String| BackendError::Unsupported {
            backend: gpu.to_string(),
            reason,
        };
        let target = Target::for_gpu(gpu).map_err(|e| unsupported(e.to_string()))?;
        let gemm = gemm_request_from_env()
            .and_then(|asked| target.gemm_precision(asked))
            .map_err(|e| unsupported(e.to_string()))?;
        CudaBackend::with_gemm(plan, file, geometry, gpu, cublas_enabled_by_env(), gemm)
    }

    /// [`CudaBackend::new`] with cuBLAS for prefill matmuls (more than `TILED_MAX_ROWS` rows) on
    /// or off (off: the tiled kernels for those too), in FP32 whatever the environment says.
    pub fn with_cublas(
        plan: Plan,
        file: Arc<GgufFile>,
        geometry: KvGeometry,
        gpu: &GpuInfo,
        use_cublas: bool,
    ) -> Result<CudaBackend, BackendError> {
        CudaBackend::with_gemm(plan, file, geometry, gpu, use_cublas, GemmPrecision::F32)
    }

    /// [`CudaBackend::with_cublas`] with prefill GEMMs in `gemm` (the loader passes its
    /// target's [`Target::gemm`]). A tensor-core precision without cuBLAS, or on a GPU older
    /// than the precision's arch, is an error naming the GPU and its arch.
    pub fn with_gemm(
        plan: Plan,
        file: Arc<GgufFile>,
        geometry: KvGeometry,
        gpu: &GpuInfo,
        use_cublas: bool,
        gemm: GemmPrecision,
    ) -> Result<CudaBackend, BackendError> {
        plan.validate()
            .map_err(|e| BackendError::Mismatch(e.to_string()))?;
        crate::backend::cpu::arena::check_disjoint(&plan).map_err(BackendError::Mismatch)?;
        let ctx = CudaContext::new(gpu.ordinal).map_err(driver(&format!("opening {gpu}")))?;
        // SAFETY: every launch, copy, allocation and free of this backend is ordered on the one
        // stream below, so cudarc's cross-stream events are not needed (and must not be recorded
        // into graph captures). A capture needs a stream other than the legacy default one.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(driver(&format!("creating a stream on {gpu}")))?;
        let ks = KernelSet::load(ctx.clone(), kernels::cache_dir().as_deref())?;
        let mut mm = Matmul::new(stream.clone(), use_cublas)?;
        mm.set_gemm(gemm).map_err(|e| BackendError::Unsupported {
            backend: gpu.to_string(),
            reason: e.to_string(),
        })?;

        // Sizes first: nothing is uploaded unless all of it fits.
        let mut infos = Vec::with_capacity(plan.weights.len());
        for w in &plan.weights {
            let (info, shape) = plan_tensor(&file, &w.tensor, &w.ty)?;
            infos.push((info, shape.len()));
        }
        let n_cells = geometry.n_cells();
        let max_tokens = plan.options.max_tokens as usize;
        let max_outputs = plan.options.max_outputs.max(1) as usize;
        let matrix_shapes: Vec<(crate::gguf::GgmlType, usize, usize)> = infos
            .iter()
            .filter(|(_, rank)| *rank == 2)
            .map(|(i, _)| (i.ty, i.n_rows() as usize, i.row_len() as usize))
            .collect();
        // The tiled kernels' partial sums (split K) for any matrix, alone or as a gate/up pair.
        let tiled_floats = infos
            .iter()
            .filter(|(_, rank)| *rank == 2)
            .map(|(i, _)| {
                let (n, k) = (i.n_rows() as usize, i.row_len() as usize);
                mm.tiled_scratch_floats(n, k, false)
                    .max(mm.tiled_scratch_floats(n, k, true))
            })
            .max()
            .unwrap_or(0);
        // Dequantized weight tiles for cuBLAS (FP32 or FP16), and with FP16 operands the
        // activations rounded to FP16, at most 64 MiB of tiles.
        let cublas_floats = mm.cublas_scratch_floats(&matrix_shapes, max_tokens);
        let tile_floats = cublas_floats.max(tiled_floats);
        // Scratch for the worst step, allocated now (not at the first step that needs it): one
        // token decoding at the longest context, and the largest multi-row FFN.
        let table_len = geometry.max_slots as usize * geometry.max_pages_per_slot as usize;
        let io_layout = IoLayout::for_limits(max_tokens, max_outputs, n_vocab(&plan).unwrap_or(0))?;
        let decode = DecodeSplits::for_kernels(&ks)?;
        let (part_floats, up_floats) = scratch_needs(
            &plan,
            &decode,
            &[geometry.max_positions().saturating_sub(1)],
            max_tokens,
        );
        let footprint = Footprint {
            weights: infos
                .iter()
                .map(|(i, rank)| {
                    if *rank == 2 {
                        i.n_bytes
                    } else {
                        i.n_elements() * 4
                    }
                })
                .sum(),
            kv: plan
                .kv_cache
                .iter()
                .map(|l| l.bytes_per_token * n_cells)
                .sum(),
            arena: plan.memory.arena_bytes,
            scratch: (tile_floats + part_floats + up_floats) as u64 * 4
                + StepIo::bytes(&io_layout, table_len),
        };
        let (free, total) =
            cudarc::driver::result::mem_get_info().map_err(driver("reading the free memory"))?;
        if footprint.total() > free as u64 {
            return Err(BackendError::Unsupported {
                backend: gpu.to_string(),
                reason: format!(
                    "the model needs {} on the GPU (weights {}, KV cache {} for {n_cells} cells, \
                     arena {}, scratch {}) but only {} of {} is free; lower --ctx-size or \
                     --parallel, or use a smaller model",
                    human_bytes(footprint.total(), 1),
                    human_bytes(footprint.weights, 1),
                    human_bytes(footprint.kv, 1),
                    human_bytes(footprint.arena, 1),
                    human_bytes(footprint.scratch, 1),
                    human_bytes(free as u64, 1),
                    human_bytes(total as u64, 1)
                ),
            });
        }

        let matrices: Vec<&str> = infos
            .iter()
            .filter(|(_, rank)| *rank == 2)
            .map(|(i, _)| i.name.as_str())
            .collect();
        let (uploaded, _) = super::matmul::upload_tensors(&stream, &file, &matrices)?;
        let mut uploaded = uploaded.into_iter();
        let mut weights = Vec::with_capacity(infos.len());
        for (info, rank) in &infos {
            weights.push(if *rank == 2 {
                DevWeight::Matrix(uploaded.next().ok_or_else(|| {
                    BackendError::Mismatch(format!("weight `{}` was not uploaded", info.name))
                })?)
            } else {
                let v =
                    quants::dequantize_f32(&file, info).map_err(|e| BackendError::Unsupported {
                        backend: gpu.to_string(),
                        reason: e.to_string(),
                    })?;
                DevWeight::Vector(
                    stream
                        .clone_htod(&v)
                        .map_err(driver(&format!("uploading `{}`", info.name)))?,
                )
            });
        }

        let mut kv = Vec::with_capacity(plan.kv_cache.len());
        let mut kv_index = HashMap::new();
        for layer in &plan.kv_cache {
            let width = (layer.n_kv_heads * layer.head_dim) as usize;
            let cells = n_cells as usize * width;
            let what = format!("the KV cache of layer {}", layer.layer);
            kv_index.insert(layer.layer, kv.len());
            kv.push(LayerKv {
                k: alloc(&stream, cells, &what)?,
                v: alloc(&stream, cells, &what)?,
                width,
            });
        }
        let io = StepIo::new(
            &stream,
            io_layout,
            geometry.max_slots as usize,
            geometry.max_pages_per_slot as usize,
        )?;
        let arena = alloc(
            &stream,
            plan.memory.arena_bytes.div_ceil(4) as usize,
            "the activation arena",
        )?;
        let tiles = alloc(&stream, tile_floats, "the weight tile scratch")?;
        let units =
            "unit kernels on the stored blocks for up to 8 rows, tiled kernels for up to 64";
        let path = match (mm.uses_cublas(), mm.gemm()) {
            (false, _) => {
                "unit kernels on the stored blocks for up to 8 rows, tiled kernels above \
                           (M40LLM_ENABLE_CUBLAS=0)"
                    .to_string()
            }
            (true, GemmPrecision::F32) => {
                format!("{units}, cuBLAS SGEMM on dequantized tiles for prefill (GEMM f32)")
            }
            (true, GemmPrecision::Tf32) => "unit kernels on the stored blocks for up to 7 rows, \
                 tensor-core tiled kernels (TF32 MMAs) for 8 to 64, cuBLAS SGEMM on dequantized \
                 tiles for prefill with TF32 tensor cores (GEMM tf32: operands rounded to TF32)"
                .to_string(),
            (true, GemmPrecision::F16) => format!(
                "{units}, cuBLAS GemmEx on FP16 tensor cores for prefill (GEMM f16: weights \
                 dequantized to FP16, F16 weights in place, activations rounded to FP16, FP32 \
                 accumulation)"
            ),
        };
        let graphs = Graphs::new();
        let replay = if graphs.enabled {
            "decode steps replayed as CUDA graphs"
        } else {
            "every kernel launched every step (M40LLM_CUDA_GRAPHS=0)"
        };
        let compute = match (mm.uses_cublas(), mm.gemm()) {
            (true, GemmPrecision::Tf32) => "FP32 compute but TF32 matmuls past one row",
            (true, GemmPrecision::F16) => "FP32 compute but FP16-operand prefill GEMMs",
            _ => "FP32 compute",
        };
        let device = DeviceInfo {
            kind: "cuda".into(),
            name: gpu.name.clone(),
            detail: format!(
                "cuda:{}, sm_{}, {}, kernels for sm_{} by NVRTC {}; {path}; {replay}; {compute}, \
                 FP16 KV cache; {} of weights resident in their own types",
                gpu.ordinal,
                super::super::device::arch_of(gpu),
                human_bytes(gpu.total_memory as u64, 1),
                ks.arch(),
                ks.nvrtc_version(),
                human_bytes(footprint.weights, 1)
            ),
        };
        tracing::info!("CUDA executor on {gpu}: {}", device.detail);
        let up_rows = alloc(&stream, up_floats, "the FFN's up projection")?;
        let attn_part = alloc(&stream, part_floats, "attention scratch")?;
        let names = value_names(&plan);
        let backend = CudaBackend {
            intact: intact_values(&plan),
            device,
            ks,
            mm,
            weights,
            arena,
            kv,
            kv_index,
            tables: PageTables::new(geometry),
            io,
            tiles,
            up_rows,
            attn_part,
            decode,
            names,
            host_row: Vec::new(),
            host_top: Vec::new(),
            last: Step::new(),
            has_last: false,
            broken: None,
            resident_bytes: footprint.weights,
            graphs,
            stream,
            plan,
        };
        let mut backend = backend;
        backend.check_weights()?;
        backend
            .stream
            .synchronize()
            .map_err(driver("finishing the upload"))?;
        backend.warm_up()?;
        Ok(backend)
    }

    /// Runs a prefill step and a decode step on slot 0 and undoes them, so that what the first
    /// real step would pay once (loading each kernel on first launch, cuBLAS's first call) is paid
    /// at load, and `run`'s and the server's first timings are the steady state's. The cells the
    /// steps wrote belong to no table afterwards. What the steps compute does not matter (token 0
    /// may well give NaN logits in a test model): only a device error fails the load.
    fn warm_up(&mut self) -> Result<(), BackendError> {
        let limits = self.step_limits();
        let mut out = StepOutputs::new();
        for n in [limits.max_tokens.clamp(1, 2), 1] {
            let mut warm = Step::new();
            warm.push_op(PageOp::Map {
                slot: 0,
                index: 0,
                page: 0,
            });
            let mut row = 0;
            for p in 0..n as u32 {
                row = warm.push_token(0, p, 0);
            }
            warm.push_output(row, OutputKind::Argmax);
            self.tables.stage(&warm, limits)?;
            let result = self
                .upload_tables(&[0])
                .and_then(|()| self.run(&warm, &mut out));
            self.tables.rollback();
            self.has_last = false;
            self.upload_tables(&[0])?;
            if let Err(e) = result {
                tracing::debug!("the warm-up step: {e}");
                self.stream.synchronize().map_err(|d| {
                    BackendError::Kernel(format!(
                        "the device failed during the warm-up step ({e}): {d}"
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// Bytes of weights resident on the device.
    pub fn resident_weight_bytes(&self) -> u64 {
        self.resident_bytes
    }

    /// Fails at load, not mid-step, when a matrix slot is bound to a vector or the other way
    /// round.
    fn check_weights(&self) -> Result<(), BackendError> {
        for step in &self.plan.steps {
            let matrix_slots = step.op.matrix_slots();
            for (slot, operand) in step.inputs.iter().enumerate() {
                if let Operand::Weight(i) = operand {
                    let is_matrix =
                        matches!(self.weights.get(*i as usize), Some(DevWeight::Matrix(_)));
                    let wants_matrix = matrix_slots.contains(&slot);
                    if is_matrix != wants_matrix {
                        return Err(BackendError::Mismatch(format!(
                            "step {}: input {slot} should be a {}",
                            step.name,
                            if wants_matrix { "matrix" } else { "vector" }
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Vocabulary size: the width of the plan's first output.
    fn n_vocab(&self) -> Option<usize> {
        n_vocab(&self.plan)
    }

    fn arena_span(&self) -> Span<f32> {
        Span::of(&self.arena)
    }

    /// The arena span of tensor value `v` for a step of `sizes`.
    fn value_span(&self, v: ValueRef, sizes: StepSizes) -> Result<Span<f32>, BackendError> {
        let r = region(&self.plan, v, sizes)?;
        Ok(self.arena_span().sub(r.start, r.len, "arena")?)
    }

    /// Copies the rows of `slots`' page tables (ascending, no duplicates) from the host's view
    /// to the device: one copy per run of neighbouring rows, from pinned memory.
    fn upload_tables(&mut self, slots: &[u32]) -> Result<(), BackendError> {
        Ok(self.io.upload_rows(&self.tables, slots)?)
    }

    /// Runs a staged step; on error the caller rolls the tables back.
    fn run(&mut self, step: &Step, out: &mut StepOutputs) -> Result<(), BackendError> {
        let g = self.tables.geometry();
        // Copy-on-write first: the ops were validated as a whole.
        for op in &step.ops {
            if let PageOp::Copy { src, dst } = *op {
                for layer in &self.kv {
                    let n = g.page_size as usize * layer.width;
                    let (s, d) = (src as usize * n, dst as usize * n);
                    for cache in [&layer.k, &layer.v] {
                        let all = Span::of(cache);
                        mem::copy(
                            &self.stream,
                            all.sub(s, n, "page copy")?,
                            all.sub(d, n, "page copy")?,
                            "copying a KV page",
                        )?;
                    }
                }
            }
        }
        let scratch_at = (
            self.attn_part.device_ptr(&self.stream).0,
            self.up_rows.device_ptr(&self.stream).0,
        );
        // Compared whatever prepare_scratch returns: a failure after one buffer moved must
        // still drop the graphs captured on it.
        let prepared = self.prepare_scratch(step);
        if scratch_at
            != (
                self.attn_part.device_ptr(&self.stream).0,
                self.up_rows.device_ptr(&self.stream).0,
            )
        {
            // The graphs launch kernels on the old scratch.
            self.graphs.cached.clear();
        }
        prepared?;
        // The step's integers and the flag's initial value (the logits' count: no NaN yet),
        // in one copy; the results region first grows if this step's top-k is wider.
        let n_vocab = self.n_vocab().unwrap_or(0);
        let top = TopLayout::of(&step.outputs, n_vocab);
        if self.io.ensure_results(top)? {
            // The graphs read the step's inputs from the old buffer.
            self.graphs.cached.clear();
        }
        let checked = step.outputs.len().saturating_mul(n_vocab);
        let flag = i32::try_from(checked).map_err(|_| {
            BackendError::Mismatch(format!(
                "{} output rows of {n_vocab} logits do not fit the non-finite check's 32-bit \
                 index",
                step.outputs.len()
            ))
        })?;
        self.io.upload_step(step, flag)?;
        let sizes = StepSizes {
            tokens: step.n_tokens() as u64,
            outputs: step.outputs.len() as u64,
        };
        // Until this step completes, its values are neither the old ones nor the new ones.
        self.has_last = false;
        self.launch_steps(step, sizes)?;
        self.write_outputs(step, sizes, out)?;
        // Marks whatever copies are still in flight for the next write of a staging buffer to
        // wait on (a step without output rows did not synchronize; its upload already fenced
        // the inputs, so this records only copies enqueued after that).
        self.io.fence()?;
        self.last.clone_from(step);
        self.has_last = true;
        Ok(())
    }

    /// Launches every plan step for `step`: a decode step's graph when there is one (capturing
    /// it the first time its shape is seen), else each kernel.
    fn launch_steps(&mut self, step: &Step, sizes: StepSizes) -> Result<(), BackendError> {
        let n_vocab = self.n_vocab().unwrap_or(0);
        let Some(key) = GraphKey::of(step, n_vocab, &self.decode).filter(|_| self.graphs.enabled)
        else {
            return self.launch_each(step, sizes);
        };
        if let Some(i) = self.graphs.cached.iter().position(|(k, _)| *k == key) {
            let entry = self.graphs.cached.remove(i);
            let launched = entry.1.0.launch();
            self.graphs.cached.push(entry);
            self.graphs.replays += 1;
            return launched.map_err(driver("replaying a decode step's graph"));
        }
        if let Some(i) = self.graphs.seen.iter().position(|k| *k == key) {
            self.graphs.seen.remove(i);
        } else {
            if self.graphs.seen.len() >= GRAPH_CACHE {
                self.graphs.seen.remove(0);
            }
            self.graphs.seen.push(key);
            return self.launch_each(step, sizes);
        }
        let relaxed = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        if let Err(e) = self.stream.begin_capture(relaxed) {
            self.graphs_off(format!("cannot start a capture: {e}"));
            return self.launch_each(step, sizes);
        }
        // Nothing runs while capturing, so a failed capture has done nothing: the step is then
        // launched kernel by kernel (which reports a real launch error as such).
        let ran = self.launch_each(step, sizes);
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        let graph = match (ran, graph) {
            (Ok(()), Ok(Some(g))) => g,
            (ran, graph) => {
                let why = match (ran, graph) {
                    (Err(e), _) => e.to_string(),
                    (_, Err(e)) => e.to_string(),
                    _ => "the capture was empty".to_string(),
                };
                let retry = self.launch_each(step, sizes);
                // A step that fails uncaptured too is the step's error, not the capture's.
                if retry.is_ok() {
                    self.graphs.failures += 1;
                    if self.graphs.failures >= GRAPH_FAILURES {
                        self.graphs_off(format!(
                            "{GRAPH_FAILURES} captures failed, the last: {why}"
                        ));
                    } else {
                        tracing::debug!(
                            "a decode-step capture failed, launched each kernel: {why}"
                        );
                    }
                }
                return retry;
            }
        };
        graph
            .launch()
            .map_err(driver("launching a decode step's graph"))?;
        self.graphs.captures += 1;
        if self.graphs.cached.len() >= GRAPH_CACHE {
            self.graphs.cached.remove(0);
        }
        self.graphs.cached.push((key, OwnedGraph(graph)));
        Ok(())
    }

    /// Turns the graphs off for good, saying why (once).
    fn graphs_off(&mut self, why: String) {
        tracing::warn!("CUDA graphs off, launching each kernel every step: {why}");
        self.graphs.enabled = false;
        self.graphs.cached.clear();
        self.graphs.seen.clear();
    }

    /// Launches every plan step's kernels, then the logits' non-finite check and the argmax /
    /// top-k of the step's output rows (into the step I/O buffer, for `write_outputs`).
    fn launch_each(&self, step: &Step, sizes: StepSizes) -> Result<(), BackendError> {
        for i in 0..self.plan.steps.len() {
            self.run_step(i, step, sizes)?;
        }
        self.launch_checks(step, sizes)
    }

    /// The plan's first output (the logits), its width and its span for a step of `sizes`.
    fn logits(&self, sizes: StepSizes) -> Result<(ValueRef, usize, Span<f32>), BackendError> {
        let &first = self
            .plan
            .outputs
            .first()
            .ok_or_else(|| BackendError::Mismatch("the plan has no output".into()))?;
        let n_vocab = self
            .n_vocab()
            .ok_or_else(|| BackendError::Mismatch("the plan's output is not a matrix".into()))?;
        Ok((first, n_vocab, self.value_span(first, sizes)?))
    }

    /// The non-finite check over the step's logits rows (lowering the flag the host set to
    /// their count) and argmax / top-k over all of them at once, for the widest request.
    fn launch_checks(&self, step: &Step, sizes: StepSizes) -> Result<(), BackendError> {
        let rows = step.outputs.len();
        if rows == 0 {
            return Ok(());
        }
        let (_, n_vocab, logits) = self.logits(sizes)?;
        let ops = Ops {
            ks: &self.ks,
            stream: &self.stream,
        };
        ops.first_non_finite(&logits, rows * n_vocab, &mut self.io.flag()?)?;
        let top = TopLayout::of(&step.outputs, n_vocab);
        if top.k > 0 {
            ops.top_k(
                &logits,
                rows,
                n_vocab,
                top.kernel_k(),
                &mut self.io.top_ids(top)?,
                &mut self.io.top_vals(top)?,
            )?;
        }
        Ok(())
    }

    /// Decode graphs captured and replayed so far (each capture also ran its step once).
    pub fn graph_counts(&self) -> (u64, u64) {
        (self.graphs.captures, self.graphs.replays)
    }

    /// Turns decode graphs on or off (on by default unless `M40LLM_CUDA_GRAPHS=0`); off drops
    /// the captured ones.
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs.enabled = on;
        if !on {
            self.graphs.cached.clear();
        }
    }

    /// Grows the scratch buffers this step needs, if the ones allocated at load are too small
    /// (only multi-token decode-kernel attention, `head_dim > 128`, can need more).
    fn prepare_scratch(&mut self, step: &Step) -> Result<(), BackendError> {
        let (part, up) = scratch_needs(&self.plan, &self.decode, &step.positions, step.n_tokens());
        ensure(&self.stream, &mut self.attn_part, part, "attention scratch")?;
        ensure(
            &self.stream,
            &mut self.up_rows,
            up,
            "the FFN's up projection",
        )?;
        Ok(())
    }

    /// The paged cache of KV layer `index`.
    fn paged(&self, index: usize) -> Result<PagedKv, BackendError> {
        let layer = self
            .kv
            .get(index)
            .ok_or_else(|| BackendError::Mismatch(format!("no KV layer {index}")))?;
        let g = self.tables.geometry();
        Ok(PagedKv {
            k: Span::of(&layer.k),
            v: Span::of(&layer.v),
            tables: self.io.tables(),
            table_stride: g.max_pages_per_slot as usize,
            page_size: g.page_size as usize,
        })
    }

    /// Runs step `index` of the plan for `step`.
    fn run_step(&self, index: usize, step: &Step, sizes: StepSizes) -> Result<(), BackendError> {
        let plan = &self.plan;
        let ps = &plan.steps[index];
        let fail = |what: String| BackendError::Mismatch(format!("step {}: {what}", ps.name));
        let t = step.n_tokens();
        let n_out = step.outputs.len();

        let mut ins = Vec::with_capacity(ps.inputs.len());
        for operand in &ps.inputs {
            ins.push(match *operand {
                Operand::Weight(i) => match self.weights.get(i as usize) {
                    Some(DevWeight::Matrix(m)) => In::Matrix(m),
                    Some(DevWeight::Vector(v)) => In::Vector(Span::of(v)),
                    None => return Err(fail(format!("no weight {i}"))),
                },
                Operand::Value(v) => match source(plan, v) {
                    Source::Arena => In::Act(self.value_span(v, sizes)?),
                    Source::Tokens => In::Int(self.io.tokens(t)?),
                    Source::Positions => In::Int(self.io.positions(t)?),
                    Source::Outputs => In::Int(self.io.output_rows(n_out)?),
                    Source::Kv(layer) => In::Kv(
                        *self
                            .kv_index
                            .get(&layer)
                            .ok_or_else(|| fail(format!("no KV cache for layer {layer}")))?,
                    ),
                },
            });
        }
        let mut outs = Vec::with_capacity(ps.outputs.len());
        for (p, o) in ps.outputs.iter().enumerate() {
            if o.buffer.is_some() {
                let v = ValueRef {
                    step: index as u32,
                    port: p as u8,
                };
                outs.push(self.value_span(v, sizes)?);
            }
        }
        // A step with no output rows (a prefill chunk that returns nothing) leaves the ops
        // after the row selection with empty outputs: nothing to launch.
        if !outs.is_empty() && outs.iter().all(Span::is_empty) {
            return Ok(());
        }
        let input = |slot: usize| {
            ins.get(slot)
                .ok_or_else(|| fail(format!("no input {slot}")))
        };
        let act = |slot| match input(slot)? {
            In::Act(a) => Ok(*a),
            _ => Err(fail(format!("input {slot} is not an activation"))),
        };
        let int = |slot| match input(slot)? {
            In::Int(a) => Ok(*a),
            _ => Err(fail(format!("input {slot} is not an integer input"))),
        };
        let mat = |slot| match input(slot)? {
            In::Matrix(m) => Ok(*m),
            _ => Err(fail(format!("input {slot} is not a matrix"))),
        };
        let vector = |slot| match input(slot)? {
            In::Vector(v) => Ok(*v),
            _ => Err(fail(format!("input {slot} is not a vector weight"))),
        };
        let act_or_vector = |slot| match input(slot)? {
            In::Act(a) | In::Vector(a) => Ok(*a),
            _ => Err(fail(format!("input {slot} is not an activation or vector"))),
        };
        let freq_factors = |slot: usize| {
            if slot < ins.len() {
                vector(slot).map(Some)
            } else {
                Ok(None)
            }
        };
        let kv_of = |slot| match input(slot)? {
            In::Kv(i) => Ok(*i),
            _ => Err(fail(format!("input {slot} is not a KV cache"))),
        };
        let out = |port: usize| {
            outs.get(port)
                .copied()
                .ok_or_else(|| fail(format!("no output {port} of {}", outs.len())))
        };
        let ops = Ops {
            ks: &self.ks,
            stream: &self.stream,
        };
        let rows_of = |x: Span<f32>, k: usize| x.len().checked_div(k).unwrap_or(0);
        let layer_of = |layer: u32| {
            self.kv_index
                .get(&layer)
                .copied()
                .ok_or_else(|| fail(format!("no KV cache for layer {layer}")))
        };
        let pos = self.io.positions(t)?;
        let slots = self.io.slots(t)?;
        let mut tiles = Span::of(&self.tiles);

        match &ps.op {
            // Step inputs: read straight from the step data by their consumers.
            Op::TokenIds | Op::Positions | Op::OutputRows => {}
            Op::Weight { .. } => return Err(fail("weights are not steps".into())),
            Op::Embedding => ops.embedding(mat(0)?, &int(1)?, t, &mut out(0)?)?,
            Op::MatMul => {
                let (x, w) = (act(0)?, mat(1)?);
                self.mm
                    .run(&self.ks, &x, rows_of(x, w.k), w, &mut out(0)?, &mut tiles)?;
            }
            Op::Add | Op::Mul => {
                let (a, b) = (act(0)?, act_or_vector(1)?);
                let mut y = out(0)?;
                let n = y.len();
                ops.binary(matches!(ps.op, Op::Mul), &a, &b, b.len().min(n), &mut y, n)?;
            }
            Op::Silu => {
                let mut y = out(0)?;
                let n = y.len();
                ops.silu(&act(0)?, &mut y, n)?;
            }
            Op::SwiGlu => {
                let mut y = out(0)?;
                let n = y.len();
                ops.swiglu(&act(0)?, &act(1)?, &mut y, n)?;
            }
            Op::RmsNorm { eps } => {
                let x = act(0)?;
                ops.rms_norm(&x, &vector(1)?, &mut out(0)?, x.len(), *eps)?;
            }
            Op::Rope(p) => {
                let rope = rope_of(p, freq_factors(2)?);
                ops.rope(&act(0)?, &mut out(0)?, &int(1)?, t, &rope)?;
            }
            Op::KvWrite(p) => {
                let i = layer_of(p.layer)?;
                let kv = self.paged(i)?;
                ops.kv_write(&act(0)?, &act(1)?, &kv, &pos, &slots, t, self.kv[i].width)?;
            }
            Op::Attention(p) => {
                let kv = self.paged(kv_of(1)?)?;
                let mut part = Span::of(&self.attn_part);
                ops.attention(
                    &act(0)?,
                    &kv,
                    &pos,
                    &slots,
                    &step.positions,
                    &step.slots,
                    attn_shape(p),
                    &self.decode,
                    &mut out(0)?,
                    &mut part,
                )?;
            }
            Op::SelectRows => {
                let width =
                    width_of(plan, ps.inputs[0]).ok_or_else(|| fail("select_rows input".into()))?;
                ops.select_rows(&act(0)?, &int(1)?, &mut out(0)?, t, n_out, width)?;
            }
            Op::MultiMatMul { n } => {
                // One launch for Q, K and V at one row (`Matmul::multi`), else one per weight.
                let x = act(0)?;
                let ws = (0..*n as usize)
                    .map(|i| mat(1 + i))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut ys = (0..*n as usize).map(out).collect::<Result<Vec<_>, _>>()?;
                let rows = ws.first().map_or(0, |w| rows_of(x, w.k));
                self.mm
                    .multi(&self.ks, &x, rows, &ws, &mut ys, &mut tiles)?;
            }
            Op::GateUpSwiGlu => {
                let (x, gate, up) = (act(0)?, mat(1)?, mat(2)?);
                let rows = rows_of(x, gate.k);
                let mut y = out(0)?;
                if rows > TILED_MAX_ROWS && self.mm.uses_cublas() || gate.ty != up.ty {
                    // Two matmuls (cuBLAS for prefill), then y = silu(gate) * up in place.
                    let mut u = Span::of(&self.up_rows).prefix(rows * up.n, "up rows")?;
                    self.mm.run(&self.ks, &x, rows, gate, &mut y, &mut tiles)?;
                    self.mm.run(&self.ks, &x, rows, up, &mut u, &mut tiles)?;
                    let gy = y;
                    ops.swiglu(&gy, &u, &mut y, rows * gate.n)?;
                } else {
                    self.mm
                        .gate_up_swiglu(&self.ks, &x, rows, gate, up, &mut y, &mut tiles)?;
                }
            }
            Op::AddRmsNorm { eps } => {
                let a = act(0)?;
                let (mut sum, mut normed) = (out(0)?, out(1)?);
                ops.add_rms_norm(
                    &a,
                    &act(1)?,
                    &vector(2)?,
                    &mut sum,
                    &mut normed,
                    a.len(),
                    *eps,
                )?;
            }
            Op::RopeKvWrite { rope, kv: p } => {
                let kv = self.paged(layer_of(p.layer)?)?;
                let rope = rope_of(rope, freq_factors(3)?);
                ops.rope_kv_write(&act(0)?, &act(1)?, &kv, &int(2)?, &slots, t, &rope)?;
            }
            Op::RopeQkvWrite { rope, kv: p } => {
                let kv = self.paged(layer_of(p.layer)?)?;
                let rope = rope_of(rope, freq_factors(4)?);
                let (q, k, v) = (act(0)?, act(1)?, act(2)?);
                ops.rope_qkv_write(&q, &mut out(0)?, &k, &v, &kv, &int(3)?, &slots, t, &rope)?;
            }
        }
        Ok(())
    }

    /// Fills `out` from the plan's outputs: the first (logits) per output request, the others
    /// whole. The non-finite check and argmax / top-k ran with the step's kernels
    /// (`launch_checks`); their flag and results come back in one copy and one synchronize,
    /// then logits rows are copied back for the rows that asked for them.
    fn write_outputs(
        &mut self,
        step: &Step,
        sizes: StepSizes,
        out: &mut StepOutputs,
    ) -> Result<(), BackendError> {
        let (first, n_vocab, logits) = self.logits(sizes)?;
        let rest = self.plan.outputs.get(1..).unwrap_or_default();
        let rows = step.outputs.len();
        out.clear(n_vocab);
        if rows > 0 {
            let n = rows * n_vocab;
            let top = TopLayout::of(&step.outputs, n_vocab);
            let down = self.io.download(top)?;
            let bad = down
                .first()
                .ok_or_else(|| BackendError::Mismatch("the step's results are empty".into()))?;
            let bad = (*bad).max(0) as usize;
            if bad < n {
                // The error path: one more copy for the value itself.
                let mut value = [0f32];
                mem::download(
                    &self.stream,
                    logits.sub(bad, 1, "logits")?,
                    &mut value,
                    "a logit",
                )?;
                let row = bad / n_vocab;
                return Err(BackendError::NonFinite {
                    value_name: self
                        .plan
                        .value(first)
                        .map_or("logits".to_string(), |o| o.name.clone()),
                    row,
                    position: step
                        .outputs
                        .get(row)
                        .and_then(|o| step.positions.get(o.row as usize))
                        .copied()
                        .unwrap_or(0),
                    col: bad % n_vocab,
                    value: value[0],
                });
            }
            let all_logits = step.outputs.iter().all(|o| o.kind == OutputKind::Logits);
            if all_logits {
                self.host_row.resize(n, 0.0);
                mem::download(&self.stream, logits, &mut self.host_row, "the logits")?;
            }
            for (r, request) in step.outputs.iter().enumerate() {
                match request.kind {
                    OutputKind::Logits if all_logits => {
                        out.push_logits(&self.host_row[r * n_vocab..(r + 1) * n_vocab]);
                    }
                    OutputKind::Logits => {
                        self.host_row.resize(n_vocab, 0.0);
                        mem::download(
                            &self.stream,
                            logits.sub(r * n_vocab, n_vocab, "logits")?,
                            &mut self.host_row,
                            "a logits row",
                        )?;
                        out.push_logits(&self.host_row);
                    }
                    OutputKind::Argmax => {
                        row_results(down, top, r, 1, &mut self.host_top)?;
                        let best = self.host_top.first().copied().ok_or_else(|| {
                            BackendError::Mismatch(format!("no argmax for output row {r}"))
                        })?;
                        out.push_argmax(best);
                    }
                    OutputKind::TopK(k) => {
                        let k = (k as usize).min(n_vocab);
                        row_results(down, top, r, k, &mut self.host_top)?;
                        out.push_top_k(&self.host_top);
                    }
                }
            }
        }
        for &v in rest {
            let span = self.value_span(v, sizes)?;
            let name = self
                .plan
                .value(v)
                .map_or("", |o| o.name.as_str())
                .to_string();
            let cols = width_of(&self.plan, Operand::Value(v)).unwrap_or(span.len());
            let buf = out.push_value(&name, cols);
            buf.resize(span.len(), 0.0);
            mem::download(&self.stream, span, buf, &name)?;
        }
        if !rest.is_empty() {
            // Each download above synchronized the stream; say so to the staging buffers.
            self.io.synchronize()?;
        }
        Ok(())
    }

    /// After a failed step: whether the device still works (a trivial synchronize), else the
    /// backend is marked unusable.
    fn check_device(&mut self, err: &BackendError) {
        if let Err(e) = self.io.synchronize() {
            self.broken = Some(format!("{err} (then the device reported: {e})"));
        }
    }
}

impl Drop for CudaBackend {
    /// Lets the stream's work finish before the fields go: a step without output rows leaves
    /// kernels running that read the arena, the weights and the KV cache, and the module.
    fn drop(&mut self) {
        if let Err(e) = self.stream.synchronize() {
            tracing::warn!("the CUDA stream failed while the backend was dropped: {e}");
        }
    }
}

/// Floats of attention partials (flash-decoding) and of the multi-row fused FFN's up
/// projection a step of `t` tokens at `positions` needs.
fn scratch_needs(
    plan: &Plan,
    decode: &DecodeSplits,
    positions: &[u32],
    t: usize,
) -> (usize, usize) {
    let mut part = 0;
    let mut up = 0;
    for s in &plan.steps {
        match &s.op {
            Op::Attention(p) => {
                part = part.max(decode.scratch_len(positions, attn_shape(p)));
            }
            Op::GateUpSwiGlu => {
                let n = s
                    .outputs
                    .first()
                    .and_then(|o| o.ty.tensor())
                    .and_then(|ty| match ty.shape.dims().last() {
                        Some(Dim::Fixed(n)) => Some(*n as usize),
                        _ => None,
                    })
                    .unwrap_or(0);
                up = up.max(t * n);
            }
            _ => {}
        }
    }
    (part, up)
}

/// A resolved input of a plan step.
enum In<'a> {
    Act(Span<f32>),
    Int(Span<i32>),
    Matrix(&'a DeviceWeight),
    Vector(Span<f32>),
    /// Index into the backend's KV layers.
    Kv(usize),
}

fn attn_shape(p: &crate::ir::AttentionParams) -> AttnShape {
    AttnShape {
        n_heads: p.n_heads as usize,
        n_kv_heads: p.n_kv_heads as usize,
        head_dim: p.head_dim as usize,
        scale: p.scale,
        window: p.sliding_window.unwrap_or(0) as usize,
    }
}

fn rope_of(p: &crate::ir::RopeParams, freq_factors: Option<Span<f32>>) -> Rope {
    Rope {
        head_dim: p.head_dim as usize,
        n_rot: p.n_rot as usize,
        neox: p.style == RopeStyle::Neox,
        freq_base: p.freq_base,
        freq_scale: p.freq_scale,
        freq_factors,
    }
}

impl Backend for CudaBackend {
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
        if let Some(why) = &self.broken {
            return Err(BackendError::Kernel(format!(
                "the CUDA backend is unusable after an earlier device error: {why}"
            )));
        }
        let limits = self.step_limits();
        self.tables.stage(step, limits)?;
        let mut touched: Vec<u32> = step
            .ops
            .iter()
            .filter_map(|op| match *op {
                PageOp::Map { slot, .. } | PageOp::SetLen { slot, .. } => Some(slot),
                PageOp::Copy { .. } => None,
            })
            .collect();
        touched.sort_unstable();
        touched.dedup();
        let result = self
            .upload_tables(&touched)
            .and_then(|()| self.run(step, out));
        match &result {
            Ok(()) => self.tables.commit(),
            Err(e) => {
                self.tables.rollback();
                self.has_last = false;
                if let Err(again) = self.upload_tables(&touched) {
                    self.broken = Some(format!(
                        "{e}; restoring the page tables failed too: {again}"
                    ));
                } else {
                    self.check_device(e);
                }
            }
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
        if let Some(t) =
            crate::backend::layout::step_input_value(&self.plan, v, &self.last, name, "cuda")?
        {
            return Ok(t);
        }
        if !self.intact[v.step as usize][v.port as usize] {
            return Err(BackendError::Overwritten {
                name: name.to_string(),
            });
        }
        let sizes = StepSizes {
            tokens: self.last.n_tokens() as u64,
            outputs: self.last.outputs.len() as u64,
        };
        let span = self.value_span(v, sizes)?;
        let cols = width_of(&self.plan, Operand::Value(v))
            .unwrap_or(span.len())
            .max(1);
        let mut data = vec![0f32; span.len()];
        mem::download(&self.stream, span, &mut data, name)?;
        HostTensor::from_shape_vec((span.len() / cols, cols), data)
            .map_err(|e| BackendError::Mismatch(format!("value `{name}`: {e}")))
    }
}
