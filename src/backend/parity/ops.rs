//! The per-op parity harness: every op of `ir::op`, fused or not, on every backend, against the
//! f64 reference.
//!
//! A [`Case`] is one op under test at one shape and weight type. Building it ([`Case::build`])
//! makes a one-op graph with the IR builder and plans it with `Plan::build`; no model file is
//! read. Activations cannot be step inputs, so each activation input of the op is an
//! `embedding` of a random F32 table gathered by the step's token ids: token `i` brings row `i`
//! of every input table. Weights are random values quantized to the case's type, written with
//! the GGUF writer into an in-memory file the backend opens like a model. Attention needs a KV
//! cache, so attention cases are `kv_write` (or `rope_kv_write`) followed by `attention`, as in
//! a model: earlier positions of each sequence are written by history steps (keys and values
//! come through their tokens), several sequences per step, cells interleaved across sequences.
//!
//! A case runs its history steps, then a *poison* step (the checked step's tokens and positions
//! with every token replaced by token 0, whose rows are NaN in every table, so that every
//! element the op writes is NaN, K/V cells included), then the checked step; an element a
//! backend fails to write in the checked step keeps its NaN and fails the case.
//!
//! Each value read back is compared with the reference ([`super::reference`]): the error of a
//! value is `max |got - want|` (absolute) and that divided by `max |want|` (relative, normwise:
//! sums cancel, so an element's own magnitude is no scale for its error); a non-finite element
//! counts as an infinite error. A case passes when every value's relative error is within the
//! loosest [`tolerance`] of the ops in the case's graph (attention after `rope_kv_write` carries
//! rope's error). Step inputs a case reads back (token ids, positions, output rows) must be
//! exact.

use super::reference::{self as r, Mat};
use super::{BackendEntry, KvNeeds, StepSpec, run_step};
use crate::backend::BackendError;
use crate::gguf::{GgmlType, GgufFile, GgufWriter};
use crate::ir::op::OpKind;
use crate::ir::{
    AttentionParams, Graph, IrError, KvParams, Op, RopeParams, RopeStyle, Shape, TensorType, Value,
};
use crate::plan::{Plan, PlanOptions, Reuse};
use half::f16;
use ndarray::Array1;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;

/// The token whose rows are NaN in every input table: the poison step uses only it.
const POISON: u32 = 0;

/// The relative error ([module docs](self)) an op may have against the f64 reference, on any
/// backend. The math is FP32 throughout (`ir::op`); what each bound allows for:
/// - step inputs (token ids, positions, output rows) read back: exact;
/// - gathers (`embedding`, `weight`, `select_rows`): dequantization is a multiply (and add) per
///   element, exact in FP32 up to a fused multiply-add: 1e-6;
/// - elementwise ops and norms: a few FP32 roundings per element (`exp` in silu): 1e-5;
/// - matmuls: FP32 sums over `k` products (k ≤ 512 here; weights compared dequantized): 1e-4;
/// - attention after `kv_write`: K and V are rounded to FP16 in the reference as in the cache,
///   leaving the FP32 dot products and softmax: 1e-4;
/// - rope, `rope_kv_write` and `rope_qkv_write`: the angle `p * base^(-2i/n)` of positions up to ~300 carries
///   FP32 error (~1e-5 rad, more with ggml's running product) and rotated keys may round to the
///   other neighbouring FP16 value: 1e-3.
///
/// A backend may round a matmul's operands further ([`BackendEntry::matmul_tolerance`]):
/// prefill through tensor cores (`M40LLM_GEMM=tf32|f16`) keeps 10 mantissa bits of each
/// operand, so its matmuls get [`ROUNDED_OPERANDS_TOLERANCE`].
pub fn tolerance(kind: OpKind) -> f64 {
    match kind {
        OpKind::TokenIds | OpKind::Positions | OpKind::OutputRows => 0.0,
        OpKind::Weight | OpKind::Embedding | OpKind::SelectRows => 1e-6,
        OpKind::Add
        | OpKind::Mul
        | OpKind::Silu
        | OpKind::SwiGlu
        | OpKind::RmsNorm
        | OpKind::AddRmsNorm => 1e-5,
        OpKind::MatMul | OpKind::MultiMatMul | OpKind::GateUpSwiGlu => 1e-4,
        OpKind::KvWrite | OpKind::Attention => 1e-4,
        OpKind::Rope | OpKind::RopeKvWrite | OpKind::RopeQkvWrite => 1e-3,
    }
}

/// The relative error of a matmul whose operands are rounded to 10 mantissa bits (TF32, FP16)
/// before FP32 accumulation: each product carries up to 2 × 2⁻¹¹ of its size, about 1e-3 in
/// the worst case (measured on an H200 with `M40LLM_GEMM=f16`: 2.3e-4 to 3.4e-4 at k = 256).
pub const ROUNDED_OPERANDS_TOLERANCE: f64 = 1e-3;

/// The matmul tolerance of a prefill GEMM precision: [`tolerance`]'s for FP32 products,
/// [`ROUNDED_OPERANDS_TOLERANCE`] for the tensor-core ones.
pub fn matmul_tolerance(gemm: Option<crate::backend::target::GemmPrecision>) -> f64 {
    match gemm {
        Some(p) if p.tensor_cores() => ROUNDED_OPERANDS_TOLERANCE,
        _ => tolerance(OpKind::MatMul),
    }
}

/// Every weight type a kernel reads.
pub const WEIGHT_TYPES: [GgmlType; 11] = crate::gguf::quants::DEQUANTIZE_TYPES;

/// One case: an op under test at one shape and type.
#[derive(Clone, Debug)]
pub struct Case {
    /// `op/detail`, unique: `matmul/q4_k/t7,k256,n40`.
    pub name: String,
    /// The op under test (its parameters as the case uses them where it has one op of a kind).
    pub op: Op,
    spec: Spec,
}

/// A run of tokens of one sequence: positions `start..start + len`. In attention cases the
/// positions before `start` are written by history steps.
#[derive(Clone, Copy, Debug)]
struct Run {
    start: u32,
    len: u32,
}

const fn span(start: u32, len: u32) -> Run {
    Run { start, len }
}

#[derive(Clone, Debug)]
enum Spec {
    /// `embedding(table: ty [vocab, width], token_ids)`, tokens drawn with repeats; `all_rows`
    /// gathers every row but the poison row once instead (the weight read back).
    Embedding {
        ty: GgmlType,
        vocab: u32,
        width: u64,
        tokens: u32,
        all_rows: bool,
    },
    MatMul {
        ty: GgmlType,
        k: u64,
        n: u64,
        tokens: u32,
    },
    MultiMatMul {
        weights: Vec<(GgmlType, u64)>,
        k: u64,
        tokens: u32,
    },
    GateUp {
        ty: GgmlType,
        k: u64,
        n: u64,
        tokens: u32,
    },
    /// `add` or `mul` of two activations, or of an activation and an F32 vector weight.
    Binary {
        mul: bool,
        width: u64,
        tokens: u32,
        bias: bool,
    },
    Silu {
        width: u64,
        tokens: u32,
    },
    SwiGlu {
        width: u64,
        tokens: u32,
    },
    /// `rms_norm` (or `add_rms_norm`) over groups of `group` elements of rows of `width`.
    RmsNorm {
        fused_add: bool,
        width: u64,
        group: u64,
        eps: f32,
        tokens: u32,
    },
    Rope {
        rope: RopeParams,
        heads: u32,
        runs: Vec<Run>,
    },
    SelectRows {
        width: u64,
        tokens: u32,
        outputs: Vec<u32>,
    },
    /// `kv_write` (or `rope_kv_write` with `rope`, or `rope_qkv_write` with `rope` and
    /// `rope_q`) then `attention`; history steps of at most `chunk` tokens write the positions
    /// before each run.
    Attention {
        att: AttentionParams,
        rope: Option<RopeParams>,
        /// The queries are rotated too, by the same fused op (`rope_qkv_write`).
        rope_q: bool,
        layer: u32,
        runs: Vec<Run>,
        chunk: u32,
    },
}

impl Case {
    fn new(op: Op, detail: String, spec: Spec) -> Case {
        Case {
            name: format!("{}/{detail}", op.name()),
            op,
            spec,
        }
    }

    /// The name of the op under test.
    pub fn op_name(&self) -> &'static str {
        self.op.name()
    }

    /// The kind of op under test.
    pub fn kind(&self) -> OpKind {
        self.op.kind()
    }

    /// Whether `filter` selects this case: the op's name, or a part of the case's name.
    pub fn matches(&self, filter: &str) -> bool {
        self.op_name() == filter || self.name.contains(filter)
    }
}

/// The whole table: the cases of every kind of op ([`OpKind::ALL`]).
pub fn cases() -> Vec<Case> {
    OpKind::ALL.iter().flat_map(|&k| cases_for(k)).collect()
}

fn ty_name(ty: GgmlType) -> String {
    ty.name().to_ascii_lowercase()
}

/// The cases of one kind of op. Exhaustive over [`OpKind`], with no catch-all: a new op does
/// not compile until it has cases here.
pub fn cases_for(kind: OpKind) -> Vec<Case> {
    let mut cases = Vec::new();
    match kind {
        OpKind::TokenIds => {
            // Many tokens with repeats; every case also reads its token ids back.
            for (tokens, vocab) in [(1, 3), (64, 9), (300, 50)] {
                cases.push(Case::new(
                    Op::TokenIds,
                    format!("t{tokens},vocab{vocab}"),
                    Spec::Embedding {
                        ty: GgmlType::F32,
                        vocab,
                        width: 32,
                        tokens,
                        all_rows: false,
                    },
                ));
            }
        }
        OpKind::Positions => {
            // Several sequences at scattered positions, read back and used by rope.
            for runs in [
                vec![span(5, 3), span(0, 1), span(290, 10)],
                vec![span(0, 64)],
            ] {
                cases.push(Case::new(
                    Op::Positions,
                    runs_detail(&runs),
                    Spec::Rope {
                        rope: rope_params(RopeStyle::Neox, 64, 64, false),
                        heads: 2,
                        runs,
                    },
                ));
            }
        }
        OpKind::OutputRows => {
            for (tokens, outputs) in [(7, vec![2, 5]), (300, vec![0, 150, 299])] {
                cases.push(Case::new(
                    Op::OutputRows,
                    format!("t{tokens},o{}", outputs.len()),
                    Spec::SelectRows {
                        width: 16,
                        tokens,
                        outputs,
                    },
                ));
            }
        }
        OpKind::Weight => {
            // A matrix of each type read back (every row but the poison row), and an F32 vector
            // used as a bias.
            for ty in WEIGHT_TYPES {
                cases.push(Case::new(
                    op_weight(),
                    format!("{}/all-rows", ty_name(ty)),
                    Spec::Embedding {
                        ty,
                        vocab: 6,
                        width: 256,
                        tokens: 5,
                        all_rows: true,
                    },
                ));
            }
            cases.push(Case::new(
                op_weight(),
                "f32/vector".into(),
                Spec::Binary {
                    mul: false,
                    width: 48,
                    tokens: 3,
                    bias: true,
                },
            ));
        }
        OpKind::Embedding => {
            for ty in WEIGHT_TYPES {
                for (tokens, vocab) in [(1, 4), (7, 24)] {
                    cases.push(embedding_case(ty, tokens, vocab, 256));
                }
            }
            for ty in [GgmlType::F16, GgmlType::Q4_K, GgmlType::Q8_0] {
                cases.push(embedding_case(ty, 300, 40, 256));
            }
        }
        OpKind::MatMul => {
            for ty in WEIGHT_TYPES {
                cases.push(matmul_case(ty, 1, 512, 64));
                cases.push(matmul_case(ty, 7, 256, 40));
            }
            for ty in [
                GgmlType::F32,
                GgmlType::F16,
                GgmlType::Q4_0,
                GgmlType::Q8_0,
                GgmlType::Q4_K,
                GgmlType::Q6_K,
            ] {
                cases.push(matmul_case(ty, 64, 256, 48));
            }
            for ty in [GgmlType::F32, GgmlType::Q4_1, GgmlType::Q5_K] {
                cases.push(matmul_case(ty, 300, 256, 33));
            }
        }
        OpKind::MultiMatMul => {
            use GgmlType as T;
            let sets: [(u32, Vec<(GgmlType, u64)>); 4] = [
                (1, vec![(T::Q4_K, 64), (T::Q6_K, 32), (T::F16, 32)]),
                (7, vec![(T::Q8_0, 48), (T::Q8_0, 48)]),
                (64, vec![(T::Q5_0, 32), (T::Q4_1, 16), (T::BF16, 16)]),
                (300, vec![(T::F32, 24), (T::Q5_1, 8), (T::Q5_K, 8)]),
            ];
            for (tokens, weights) in sets {
                let types: Vec<String> = weights
                    .iter()
                    .map(|&(t, n)| format!("{}x{n}", ty_name(t)))
                    .collect();
                cases.push(Case::new(
                    Op::MultiMatMul {
                        n: weights.len() as u8,
                    },
                    format!("{}/t{tokens},k256", types.join("+")),
                    Spec::MultiMatMul {
                        weights,
                        k: 256,
                        tokens,
                    },
                ));
            }
        }
        OpKind::GateUpSwiGlu => {
            let mut add = |ty: GgmlType, tokens: u32, n: u64| {
                cases.push(Case::new(
                    Op::GateUpSwiGlu,
                    format!("{}/t{tokens},k256,n{n}", ty_name(ty)),
                    Spec::GateUp {
                        ty,
                        k: 256,
                        n,
                        tokens,
                    },
                ));
            };
            for ty in WEIGHT_TYPES {
                add(ty, 7, 32);
            }
            for ty in [GgmlType::F16, GgmlType::Q4_K, GgmlType::Q6_K] {
                add(ty, 1, 48);
            }
            add(GgmlType::Q8_0, 64, 32);
            add(GgmlType::Q4_0, 300, 16);
        }
        OpKind::Add | OpKind::Mul => {
            let mul = kind == OpKind::Mul;
            for (tokens, width, bias) in [
                (1, 64, false),
                (7, 96, true),
                (64, 128, false),
                (300, 96, true),
            ] {
                cases.push(Case::new(
                    if mul { Op::Mul } else { Op::Add },
                    format!("t{tokens},w{width}{}", if bias { ",bias" } else { "" }),
                    Spec::Binary {
                        mul,
                        width,
                        tokens,
                        bias,
                    },
                ));
            }
        }
        OpKind::Silu | OpKind::SwiGlu => {
            let swiglu = kind == OpKind::SwiGlu;
            for (tokens, width) in [(1, 64), (7, 96), (300, 130)] {
                let detail = format!("t{tokens},w{width}");
                cases.push(if swiglu {
                    Case::new(Op::SwiGlu, detail, Spec::SwiGlu { width, tokens })
                } else {
                    Case::new(Op::Silu, detail, Spec::Silu { width, tokens })
                });
            }
        }
        OpKind::RmsNorm | OpKind::AddRmsNorm => {
            let fused_add = kind == OpKind::AddRmsNorm;
            for (tokens, width, group, eps) in [
                (1, 576, 576, 1e-5),
                (7, 512, 64, 1e-6),
                (64, 1024, 128, 1e-6),
                (300, 256, 256, 1e-5),
            ] {
                let op = if fused_add {
                    Op::AddRmsNorm { eps }
                } else {
                    Op::RmsNorm { eps }
                };
                cases.push(Case::new(
                    op,
                    format!("t{tokens},w{width},g{group}"),
                    Spec::RmsNorm {
                        fused_add,
                        width,
                        group,
                        eps,
                        tokens,
                    },
                ));
            }
        }
        OpKind::Rope => {
            use RopeStyle::{Neox, Normal};
            let mut scaled = rope_params(Normal, 128, 128, true);
            scaled.freq_scale = 0.25;
            scaled.freq_base = 500000.0;
            let table = [
                (rope_params(Normal, 64, 64, false), 4, vec![span(0, 7)]),
                (rope_params(Neox, 64, 64, false), 4, vec![span(293, 7)]),
                (
                    rope_params(Normal, 128, 128, false),
                    2,
                    vec![span(0, 1), span(150, 64)],
                ),
                (rope_params(Neox, 128, 128, false), 2, vec![span(0, 300)]),
                (rope_params(Neox, 128, 64, false), 2, vec![span(17, 7)]),
                (rope_params(Normal, 64, 32, false), 3, vec![span(250, 1)]),
                (scaled, 2, vec![span(0, 7), span(280, 20)]),
                (rope_params(Neox, 64, 64, true), 4, vec![span(100, 64)]),
            ];
            for (rope, heads, runs) in table {
                cases.push(Case::new(
                    Op::Rope(rope),
                    format!("{}/h{heads},{}", rope_detail(&rope), runs_detail(&runs)),
                    Spec::Rope { rope, heads, runs },
                ));
            }
        }
        OpKind::SelectRows => {
            for (tokens, width, outputs) in [
                (1, 64, vec![0]),
                (7, 64, vec![0, 3, 6]),
                (64, 32, (0..64).collect()),
                (300, 96, vec![299]),
            ] {
                cases.push(Case::new(
                    Op::SelectRows,
                    format!("t{tokens},w{width},o{}", outputs.len()),
                    Spec::SelectRows {
                        width,
                        tokens,
                        outputs,
                    },
                ));
            }
        }
        OpKind::Attention => {
            // (heads, kv heads, head dim, window, scale, runs, history chunk)
            let table = [
                (4, 4, 64, None, None, vec![span(0, 7)], 64),
                (8, 2, 64, None, None, vec![span(300, 1)], 128),
                (8, 1, 128, None, None, vec![span(0, 64)], 64),
                (
                    16,
                    4,
                    128,
                    None,
                    None,
                    vec![span(20, 1), span(0, 7), span(100, 1)],
                    64,
                ),
                (16, 2, 64, None, None, vec![span(0, 300)], 64),
                (2, 2, 128, None, None, vec![span(64, 64)], 64),
                (8, 8, 64, None, None, vec![span(7, 1)], 1),
                (4, 1, 64, Some(16), None, vec![span(40, 7), span(3, 1)], 32),
                (4, 2, 64, None, Some(0.5), vec![span(30, 7)], 32),
            ];
            for (heads, kv_heads, dim, window, scale, runs, chunk) in table {
                let mut att = attention_params(heads, kv_heads, dim, window);
                if let Some(s) = scale {
                    att.scale = s;
                }
                let mut detail = format!("h{heads}/{kv_heads},d{dim}");
                if let Some(w) = window {
                    detail += &format!(",window{w}");
                }
                if let Some(s) = scale {
                    detail += &format!(",scale{s}");
                }
                cases.push(Case::new(
                    Op::Attention(att),
                    format!("{detail},{}", runs_detail(&runs)),
                    Spec::Attention {
                        att,
                        rope: None,
                        rope_q: false,
                        layer: 0,
                        runs,
                        chunk,
                    },
                ));
            }
        }
        OpKind::KvWrite => {
            // Write patterns: many small history steps, several sequences of mixed lengths, a
            // layer number that is not the cache's index.
            let table: [(u32, u32, u32, Vec<Run>, u32); 4] = [
                (4, 2, 64, vec![span(100, 1)], 7),
                (8, 4, 128, vec![span(0, 5), span(9, 1), span(33, 2)], 16),
                (8, 8, 128, vec![span(10, 7)], 3),
                (4, 1, 64, vec![span(0, 300)], 300),
            ];
            for (heads, kv_heads, dim, runs, chunk) in table {
                let att = attention_params(heads, kv_heads, dim, None);
                let layer = 5;
                cases.push(Case::new(
                    Op::KvWrite(KvParams {
                        layer,
                        n_kv_heads: kv_heads,
                        head_dim: dim,
                    }),
                    format!(
                        "h{heads}/{kv_heads},d{dim},{},chunk{chunk}",
                        runs_detail(&runs)
                    ),
                    Spec::Attention {
                        att,
                        rope: None,
                        rope_q: false,
                        layer,
                        runs,
                        chunk,
                    },
                ));
            }
        }
        OpKind::RopeKvWrite | OpKind::RopeQkvWrite => {
            let rope_q = kind == OpKind::RopeQkvWrite;
            use RopeStyle::{Neox, Normal};
            let table = [
                (rope_params(Normal, 64, 64, false), 4, 4, vec![span(0, 7)]),
                (
                    rope_params(Neox, 128, 128, true),
                    8,
                    2,
                    vec![span(50, 1), span(0, 7)],
                ),
                (rope_params(Neox, 64, 32, false), 4, 1, vec![span(290, 10)]),
                (
                    rope_params(Normal, 128, 128, false),
                    8,
                    1,
                    vec![span(0, 64)],
                ),
            ];
            for (rope, heads, kv_heads, runs) in table {
                let att = attention_params(heads, kv_heads, rope.head_dim, None);
                let kv = KvParams {
                    layer: 2,
                    n_kv_heads: kv_heads,
                    head_dim: rope.head_dim,
                };
                let op = if rope_q {
                    Op::RopeQkvWrite { rope, kv }
                } else {
                    Op::RopeKvWrite { rope, kv }
                };
                cases.push(Case::new(
                    op,
                    format!(
                        "{}/h{heads}/{kv_heads},{}",
                        rope_detail(&rope),
                        runs_detail(&runs)
                    ),
                    Spec::Attention {
                        att,
                        rope: Some(rope),
                        rope_q,
                        layer: 2,
                        runs,
                        chunk: 32,
                    },
                ));
            }
        }
    }
    cases
}

fn op_weight() -> Op {
    Op::Weight { tensor: "w".into() }
}

fn embedding_case(ty: GgmlType, tokens: u32, vocab: u32, width: u64) -> Case {
    Case::new(
        Op::Embedding,
        format!("{}/t{tokens},vocab{vocab},w{width}", ty_name(ty)),
        Spec::Embedding {
            ty,
            vocab,
            width,
            tokens,
            all_rows: false,
        },
    )
}

fn matmul_case(ty: GgmlType, tokens: u32, k: u64, n: u64) -> Case {
    Case::new(
        Op::MatMul,
        format!("{}/t{tokens},k{k},n{n}", ty_name(ty)),
        Spec::MatMul { ty, k, n, tokens },
    )
}

fn rope_params(style: RopeStyle, head_dim: u32, n_rot: u32, freq_factors: bool) -> RopeParams {
    RopeParams {
        style,
        head_dim,
        n_rot,
        freq_base: 10000.0,
        freq_scale: 1.0,
        freq_factors,
    }
}

fn attention_params(heads: u32, kv_heads: u32, dim: u32, window: Option<u32>) -> AttentionParams {
    AttentionParams {
        n_heads: heads,
        n_kv_heads: kv_heads,
        head_dim: dim,
        scale: 1.0 / (dim as f32).sqrt(),
        sliding_window: window,
    }
}

fn rope_detail(r: &RopeParams) -> String {
    let style = match r.style {
        RopeStyle::Normal => "normal",
        RopeStyle::Neox => "neox",
    };
    let mut s = format!("{style},d{},rot{}", r.head_dim, r.n_rot);
    if r.freq_factors {
        s += ",ff";
    }
    if r.freq_scale != 1.0 {
        s += &format!(",scale{}", r.freq_scale);
    }
    s
}

/// `p0+7` for one run at positions 0..7; several runs joined by `|`.
fn runs_detail(runs: &[Run]) -> String {
    runs.iter()
        .map(|r| format!("p{}+{}", r.start, r.len))
        .collect::<Vec<_>>()
        .join("|")
}

/// A case made ready to run: its plan and weights, its steps, what to read and what to expect.
pub struct Built {
    pub plan: Plan,
    pub weights: Arc<GgufFile>,
    /// The cache the steps need.
    pub kv: KvNeeds,
    /// Steps that fill the KV cache before the checked step.
    pub history: Vec<StepSpec>,
    /// The checked step.
    pub check: StepSpec,
    /// The values read after the checked step, their expected values and tolerances.
    pub checks: Vec<Check>,
}

/// One value to compare after the checked step.
pub struct Check {
    pub value: String,
    pub want: Mat,
    pub tolerance: f64,
    /// The value went through a matmul (its tolerance widens to the backend's
    /// [`BackendEntry::matmul_tolerance`]).
    pub matmul: bool,
}

impl Built {
    /// The checked step with every token replaced by the poison token.
    pub fn poison(&self) -> StepSpec {
        StepSpec {
            tokens: vec![POISON; self.check.tokens.len()],
            ..self.check.clone()
        }
    }
}

/// Builds a one-op graph, its weights and reference values.
struct Builder {
    rng: ChaCha8Rng,
    graph: Graph,
    writer: GgufWriter,
    /// Rows of every input table: token ids are below it.
    vocab: u32,
    tokens: Option<Value>,
    positions: Option<Value>,
    output_rows: Option<Value>,
    checks: Vec<Check>,
}

/// Why a case could not be built (a bug in the table, not in a backend).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(String);

impl From<IrError> for BuildError {
    fn from(e: IrError) -> BuildError {
        BuildError(e.to_string())
    }
}

impl Builder {
    fn new(seed_name: &str, vocab: u32) -> Builder {
        // FNV-1a of the case name: each case has its own inputs, whatever the filter.
        let seed = crate::seed::fnv1a(seed_name);
        Builder {
            rng: ChaCha8Rng::seed_from_u64(seed),
            graph: Graph::new(),
            writer: GgufWriter::new().kv_str("general.name", seed_name),
            vocab,
            tokens: None,
            positions: None,
            output_rows: None,
            checks: Vec::new(),
        }
    }

    /// `n` values uniform in `[lo, hi)`.
    fn uniform(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                (lo + (hi - lo) * u) as f32
            })
            .collect()
    }

    fn token_ids(&mut self) -> Result<Value, BuildError> {
        if let Some(v) = self.tokens {
            return Ok(v);
        }
        let v = self.graph.add("token_ids", Op::TokenIds, &[])?;
        self.tokens = Some(v);
        Ok(v)
    }

    fn positions(&mut self) -> Result<Value, BuildError> {
        if let Some(v) = self.positions {
            return Ok(v);
        }
        let v = self.graph.add("positions", Op::Positions, &[])?;
        self.positions = Some(v);
        Ok(v)
    }

    fn output_rows(&mut self) -> Result<Value, BuildError> {
        if let Some(v) = self.output_rows {
            return Ok(v);
        }
        let v = self.graph.add("output_rows", Op::OutputRows, &[])?;
        self.output_rows = Some(v);
        Ok(v)
    }

    /// A weight `[n, k]` of type `ty` holding random values (row 0 NaN with `poison`), and the
    /// values it holds as the reference sees them (dequantized).
    fn weight(
        &mut self,
        name: &str,
        ty: GgmlType,
        n: u64,
        k: u64,
        poison: bool,
    ) -> Result<(Value, Mat), BuildError> {
        let values = self.uniform((n * k) as usize, -1.0, 1.0);
        let mut data = crate::gguf::quants::quantize_row(ty, &values)
            .map_err(|e| BuildError(format!("weight {name}: {e}")))?;
        if poison {
            poison_row(ty, k, &mut data)?;
        }
        let want = r::dequantize(ty, &data, n as usize, k as usize)
            .map_err(|e| BuildError(format!("weight {name}: {e}")))?;
        if poison && !want.row(0).iter().all(|v| v.is_nan()) {
            return Err(BuildError(format!("weight {name}: row 0 is not all NaN")));
        }
        let value = self
            .graph
            .add_weight(name, TensorType::new(ty, Shape::fixed(&[n, k])))?;
        self.writer = std::mem::take(&mut self.writer).tensor(name, ty, &[k, n], data);
        Ok((value, want))
    }

    /// An F32 vector weight of `n` random values in `[lo, hi)`.
    fn vector(
        &mut self,
        name: &str,
        n: u64,
        lo: f64,
        hi: f64,
    ) -> Result<(Value, Array1<f64>), BuildError> {
        let values = self.uniform(n as usize, lo, hi);
        let value = self
            .graph
            .add_weight(name, TensorType::new(GgmlType::F32, Shape::fixed(&[n])))?;
        self.writer = std::mem::take(&mut self.writer).tensor_f32(name, &[n], &values);
        Ok((value, values.iter().map(|&v| f64::from(v)).collect()))
    }

    /// An activation `[T, width]`: row `id` of a random F32 table (row 0 NaN) for each token,
    /// through an `embedding` named `name`. Returns the table.
    fn input(&mut self, name: &str, width: u64) -> Result<(Value, Mat), BuildError> {
        let vocab = u64::from(self.vocab);
        let (table, rows) =
            self.weight(&format!("{name}.table"), GgmlType::F32, vocab, width, true)?;
        let ids = self.token_ids()?;
        let value = self.graph.add(name, Op::Embedding, &[table, ids])?;
        Ok((value, rows))
    }

    /// Compares `value` (already in the graph) with `want` after the checked step: exactly
    /// for a step input, else within the loosest tolerance of the ops in the graph (the value
    /// went through them: attention after `rope_kv_write` carries rope's error).
    fn check(&mut self, value: &str, want: Mat) -> Result<(), BuildError> {
        let id = self
            .graph
            .find(value)
            .ok_or_else(|| BuildError(format!("no value `{value}` to check")))?;
        let input = self.graph.node(id).op.is_step_input();
        let kinds: Vec<OpKind> = self
            .graph
            .node_ids()
            .map(|n| self.graph.node(n).op.kind())
            .collect();
        let tolerance = if input {
            0.0
        } else {
            kinds.iter().map(|&k| tolerance(k)).fold(0.0, f64::max)
        };
        let matmul = !input
            && kinds.iter().any(|k| {
                matches!(
                    k,
                    OpKind::MatMul | OpKind::MultiMatMul | OpKind::GateUpSwiGlu
                )
            });
        self.checks.push(Check {
            value: value.to_string(),
            want,
            tolerance,
            matmul,
        });
        Ok(())
    }

    /// Finishes the graph with `outputs` as its results and plans it for `steps`.
    fn finish(
        mut self,
        outputs: &[Value],
        history: Vec<StepSpec>,
        check: StepSpec,
    ) -> Result<Built, BuildError> {
        for &v in outputs {
            self.graph.set_output(v);
        }
        crate::ir::verify(&self.graph).map_err(|e| BuildError(e.to_string()))?;
        let all: Vec<&StepSpec> = history.iter().chain([&check]).collect();
        let max_tokens = all.iter().map(|s| s.tokens.len()).max().unwrap_or(1).max(1) as u64;
        let max_outputs = all
            .iter()
            .map(|s| s.outputs.len())
            .max()
            .unwrap_or(1)
            .max(1) as u64;
        let options = PlanOptions {
            max_tokens,
            max_outputs,
            reuse: Reuse::Liveness,
            ..PlanOptions::default()
        };
        let plan = Plan::build(&self.graph, &options).map_err(|e| BuildError(e.to_string()))?;
        // The step inputs read back exactly.
        let ints = |v: &[u32]| Mat::from_shape_fn((v.len(), 1), |(i, _)| f64::from(v[i]));
        if self.tokens.is_some() {
            self.check("token_ids", ints(&check.tokens))?;
        }
        if self.positions.is_some() {
            self.check("positions", ints(&check.positions))?;
        }
        if self.output_rows.is_some() {
            self.check("output_rows", ints(&check.outputs))?;
        }
        let n_seqs = all
            .iter()
            .flat_map(|s| s.seq.iter())
            .max()
            .map_or(1, |&s| s + 1);
        let positions = 1 + all
            .iter()
            .flat_map(|s| s.positions.iter().copied())
            .max()
            .unwrap_or(0);
        let weights = GgufFile::from_bytes("parity-case.gguf", self.writer.to_bytes())
            .map_err(|e| BuildError(e.to_string()))?;
        Ok(Built {
            plan,
            weights: Arc::new(weights),
            kv: KvNeeds { n_seqs, positions },
            history,
            check,
            checks: self.checks,
        })
    }
}

/// Makes every value of row 0 (of `k` elements) of `data`, a `ty` tensor, NaN: NaN floats, or
/// for block types a NaN scale `d` in every block (which every element is multiplied by).
fn poison_row(ty: GgmlType, k: u64, data: &mut [u8]) -> Result<(), BuildError> {
    let nan = f16::NAN.to_le_bytes();
    let row =
        ty.row_bytes(k)
            .ok_or_else(|| BuildError(format!("{ty}: {k} is not whole blocks")))? as usize;
    let size = ty.type_size() as usize;
    let row0 = data
        .get_mut(..row)
        .ok_or_else(|| BuildError("tensor smaller than one row".into()))?;
    match ty {
        GgmlType::F32 => row0
            .chunks_exact_mut(4)
            .for_each(|c| c.copy_from_slice(&f32::NAN.to_le_bytes())),
        GgmlType::F16 => row0
            .chunks_exact_mut(2)
            .for_each(|c| c.copy_from_slice(&nan)),
        GgmlType::BF16 => row0
            .chunks_exact_mut(2)
            .for_each(|c| c.copy_from_slice(&0x7fc0u16.to_le_bytes())),
        _ => {
            // `d` leads every block but Q6_K's, where it ends it.
            let at = if ty == GgmlType::Q6_K { size - 2 } else { 0 };
            for b in row0.chunks_exact_mut(size) {
                b[at..at + 2].copy_from_slice(&nan);
            }
        }
    }
    Ok(())
}

/// Token ids for `runs` (each position of each sequence its own token, so its own K/V rows),
/// split into history steps of at most `chunk` tokens for the positions before each run and the
/// checked step with the runs themselves, each run's last token an output. Returns the steps and
/// `ids[s][p]`, the token of position `p` of sequence `s` after all steps.
fn kv_steps(runs: &[Run], chunk: u32) -> (Vec<StepSpec>, StepSpec, Vec<Vec<u32>>) {
    let mut next = POISON + 1;
    let mut ids: Vec<Vec<u32>> = Vec::new();
    let mut hist = Vec::new();
    for (s, r) in runs.iter().enumerate() {
        let mut seq_ids = Vec::new();
        for p in 0..r.start + r.len {
            seq_ids.push(next);
            if p < r.start {
                hist.push((next, s as u32, p));
            }
            next += 1;
        }
        ids.push(seq_ids);
    }
    let history = hist
        .chunks(chunk.max(1) as usize)
        .map(|c| StepSpec {
            tokens: c.iter().map(|t| t.0).collect(),
            seq: c.iter().map(|t| t.1).collect(),
            positions: c.iter().map(|t| t.2).collect(),
            outputs: vec![c.len() as u32 - 1],
        })
        .collect();
    let mut check = StepSpec::default();
    for (s, r) in runs.iter().enumerate() {
        for p in r.start..r.start + r.len {
            check.tokens.push(ids[s][p as usize]);
            check.seq.push(s as u32);
            check.positions.push(p);
        }
        check.outputs.push(check.tokens.len() as u32 - 1);
    }
    (history, check, ids)
}

/// A step of `tokens` distinct tokens `1..=tokens` of one sequence at positions `0..`.
fn simple_step(tokens: u32) -> StepSpec {
    StepSpec {
        tokens: (1..=tokens).collect(),
        seq: vec![0; tokens as usize],
        positions: (0..tokens).collect(),
        outputs: vec![tokens - 1],
    }
}

impl Case {
    /// Builds the case: plan, weights, steps and expected values.
    pub fn build(&self) -> Result<Built, BuildError> {
        match &self.spec {
            Spec::Embedding {
                ty,
                vocab,
                width,
                tokens,
                all_rows,
            } => {
                let mut b = Builder::new(&self.name, *vocab);
                let mut step = simple_step(*tokens);
                step.tokens = if *all_rows {
                    (1..*vocab).collect()
                } else {
                    // Ids drawn with repeats from 1..vocab.
                    (0..*tokens)
                        .map(|_| {
                            1 + (b.rng.next_u64() % u64::from(vocab.saturating_sub(1).max(1)))
                                as u32
                        })
                        .collect()
                };
                let n = step.tokens.len() as u32;
                step.seq = vec![0; n as usize];
                step.positions = (0..n).collect();
                step.outputs = vec![n - 1];
                let (table, rows) = b.weight("table", *ty, u64::from(*vocab), *width, true)?;
                let ids = b.token_ids()?;
                let y = b.graph.add("y", Op::Embedding, &[table, ids])?;
                b.check("y", r::gather(&rows, &step.tokens))?;
                b.finish(&[y], vec![], step)
            }
            Spec::MatMul { ty, k, n, tokens } => {
                let step = simple_step(*tokens);
                let mut b = Builder::new(&self.name, tokens + 1);
                let (x, xt) = b.input("x", *k)?;
                let (w, wm) = b.weight("w", *ty, *n, *k, false)?;
                let y = b.graph.add("y", Op::MatMul, &[x, w])?;
                b.check("y", r::matmul(&r::gather(&xt, &step.tokens), &wm))?;
                b.finish(&[y], vec![], step)
            }
            Spec::MultiMatMul { weights, k, tokens } => {
                let step = simple_step(*tokens);
                let mut b = Builder::new(&self.name, tokens + 1);
                let (x, xt) = b.input("x", *k)?;
                let xs = r::gather(&xt, &step.tokens);
                let mut inputs = vec![x];
                let mut names = Vec::new();
                let mut wants = Vec::new();
                for (i, &(ty, n)) in weights.iter().enumerate() {
                    let (w, wm) = b.weight(&format!("w{i}"), ty, n, *k, false)?;
                    inputs.push(w);
                    names.push(format!("y{i}"));
                    wants.push(r::matmul(&xs, &wm));
                }
                let op = Op::MultiMatMul {
                    n: weights.len() as u8,
                };
                let node = b.graph.add_node("multi", op, &inputs, names.clone())?;
                for (name, want) in names.iter().zip(wants) {
                    b.check(name, want)?;
                }
                let outs: Vec<Value> = (0..weights.len())
                    .map(|p| Value::new(node, p as u8))
                    .collect();
                b.finish(&outs, vec![], step)
            }
            Spec::GateUp { ty, k, n, tokens } => {
                let step = simple_step(*tokens);
                let mut b = Builder::new(&self.name, tokens + 1);
                let (x, xt) = b.input("x", *k)?;
                let (g, gm) = b.weight("gate", *ty, *n, *k, false)?;
                let (u, um) = b.weight("up", *ty, *n, *k, false)?;
                let y = b.graph.add("y", Op::GateUpSwiGlu, &[x, g, u])?;
                let xs = r::gather(&xt, &step.tokens);
                b.check("y", r::swiglu(&r::matmul(&xs, &gm), &r::matmul(&xs, &um)))?;
                b.finish(&[y], vec![], step)
            }
            Spec::Binary {
                mul,
                width,
                tokens,
                bias,
            } => {
                let step = simple_step(*tokens);
                let mut b = Builder::new(&self.name, tokens + 1);
                let (a, at) = b.input("a", *width)?;
                let a_rows = r::gather(&at, &step.tokens);
                let (bv, b_rows) = if *bias {
                    let (v, values) = b.vector("bias", *width, -1.0, 1.0)?;
                    (v, values.insert_axis(ndarray::Axis(0)))
                } else {
                    let (v, bt) = b.input("b", *width)?;
                    (v, r::gather(&bt, &step.tokens))
                };
                let (op, want) = if *mul {
                    (Op::Mul, r::mul(&a_rows, &b_rows))
                } else {
                    (Op::Add, r::add(&a_rows, &b_rows))
                };
                let y = b.graph.add("y", op, &[a, bv])?;
                b.check("y", want)?;
                b.finish(&[y], vec![], step)
            }
            Spec::Silu { width, tokens } => {
                let step = simple_step(*tokens);
                let mut b = Builder::new(&self.name, tokens + 1);
                let (x, xt) = b.input("x", *width)?;
                let y = b.graph.add("y", Op::Silu, &[x])?;
                let want = r::silu(&r::gather(&xt, &step.tokens));
                b.check("y", want)?;
                b.finish(&[y], vec![], step)
            }
            Spec::SwiGlu { width, tokens } => {
                let step = simple_step(*tokens);
                let mut b = Builder::new(&self.name, tokens + 1);
                let (g, gt) = b.input("gate", *width)?;
                let (u, ut) = b.input("up", *width)?;
                let y = b.graph.add("y", Op::SwiGlu, &[g, u])?;
                let want = r::swiglu(&r::gather(&gt, &step.tokens), &r::gather(&ut, &step.tokens));
                b.check("y", want)?;
                b.finish(&[y], vec![], step)
            }
            Spec::RmsNorm {
                fused_add,
                width,
                group,
                eps,
                tokens,
            } => {
                let step = simple_step(*tokens);
                let mut b = Builder::new(&self.name, tokens + 1);
                let (a, at) = b.input("a", *width)?;
                let (w, wv) = b.vector("norm", *group, 0.5, 1.5)?;
                let a_rows = r::gather(&at, &step.tokens);
                if *fused_add {
                    let (bb, bt) = b.input("b", *width)?;
                    let sum = r::add(&a_rows, &r::gather(&bt, &step.tokens));
                    let normed = r::rms_norm(&sum, wv.view(), f64::from(*eps));
                    let node = b.graph.add_node(
                        "add_norm",
                        Op::AddRmsNorm { eps: *eps },
                        &[a, bb, w],
                        vec!["sum".into(), "normed".into()],
                    )?;
                    b.check("sum", sum)?;
                    b.check("normed", normed)?;
                    b.finish(&[Value::new(node, 0), Value::new(node, 1)], vec![], step)
                } else {
                    let y = b.graph.add("y", Op::RmsNorm { eps: *eps }, &[a, w])?;
                    b.check("y", r::rms_norm(&a_rows, wv.view(), f64::from(*eps)))?;
                    b.finish(&[y], vec![], step)
                }
            }
            Spec::Rope { rope, heads, runs } => {
                let mut step = StepSpec::default();
                for (s, run) in runs.iter().enumerate() {
                    for p in run.start..run.start + run.len {
                        step.tokens.push(step.tokens.len() as u32 + 1);
                        step.seq.push(s as u32);
                        step.positions.push(p);
                    }
                    step.outputs.push(step.tokens.len() as u32 - 1);
                }
                let mut b = Builder::new(&self.name, step.tokens.len() as u32 + 1);
                let (x, xt) = b.input("x", u64::from(*heads * rope.head_dim))?;
                let pos = b.positions()?;
                let mut inputs = vec![x, pos];
                let mut ff = None;
                if rope.freq_factors {
                    let (v, values) =
                        b.vector("freq_factors", u64::from(rope.n_rot / 2), 1.0, 8.0)?;
                    inputs.push(v);
                    ff = Some(values);
                }
                let y = b.graph.add("y", Op::Rope(*rope), &inputs)?;
                let want = r::rope(
                    &r::gather(&xt, &step.tokens),
                    &step.positions,
                    rope,
                    ff.as_ref(),
                );
                b.check("y", want)?;
                b.finish(&[y], vec![], step)
            }
            Spec::SelectRows {
                width,
                tokens,
                outputs,
            } => {
                let mut step = simple_step(*tokens);
                step.outputs = outputs.clone();
                let mut b = Builder::new(&self.name, tokens + 1);
                let (x, xt) = b.input("x", *width)?;
                let rows = b.output_rows()?;
                let y = b.graph.add("y", Op::SelectRows, &[x, rows])?;
                let kept: Vec<u32> = outputs.iter().map(|&o| step.tokens[o as usize]).collect();
                b.check("y", r::gather(&xt, &kept))?;
                b.finish(&[y], vec![], step)
            }
            Spec::Attention {
                att,
                rope,
                rope_q,
                layer,
                runs,
                chunk,
            } => self.build_attention(att, rope.as_ref(), *rope_q, *layer, runs, *chunk),
        }
    }

    fn build_attention(
        &self,
        att: &AttentionParams,
        rope: Option<&RopeParams>,
        rope_q: bool,
        layer: u32,
        runs: &[Run],
        chunk: u32,
    ) -> Result<Built, BuildError> {
        let (history, check, ids) = kv_steps(runs, chunk);
        let vocab = ids.iter().flatten().max().map_or(1, |&m| m + 1);
        let mut b = Builder::new(&self.name, vocab);
        let (d, hkv) = (att.head_dim, att.n_kv_heads);
        let (q, qt) = b.input("q", u64::from(att.n_heads * d))?;
        let (k, kt) = b.input("k", u64::from(hkv * d))?;
        let (v, vt) = b.input("v", u64::from(hkv * d))?;
        let kv = KvParams {
            layer,
            n_kv_heads: hkv,
            head_dim: d,
        };
        let mut ff = None;
        // The attention's queries: `q`, or the fused op's rotated `q_rope` (read back too).
        let mut q_rope = None;
        let cache = match rope {
            None => b.graph.add("cache", Op::KvWrite(kv), &[k, v])?,
            Some(rope) => {
                let pos = b.positions()?;
                let mut inputs = vec![k, v, pos];
                if rope.freq_factors {
                    let (f, values) =
                        b.vector("freq_factors", u64::from(rope.n_rot / 2), 1.0, 8.0)?;
                    inputs.push(f);
                    ff = Some(values);
                }
                if rope_q {
                    inputs.insert(0, q);
                    let op = Op::RopeQkvWrite { rope: *rope, kv };
                    let node = b.graph.add_node(
                        "rope_qkv",
                        op,
                        &inputs,
                        vec!["q_rope".into(), "cache".into()],
                    )?;
                    q_rope = Some(Value::new(node, 0));
                    Value::new(node, 1)
                } else {
                    let op = Op::RopeKvWrite { rope: *rope, kv };
                    b.graph.add("cache", op, &inputs)?
                }
            }
        };
        let y = b
            .graph
            .add("y", Op::Attention(*att), &[q_rope.unwrap_or(q), cache])?;

        // The cache as the reference sees it: each position's K (rotated at its position) and V,
        // rounded to FP16.
        let mut cache_k: HashMap<(usize, u32), Mat> = HashMap::new();
        let mut cache_v: HashMap<(usize, u32), Mat> = HashMap::new();
        for (s, seq_ids) in ids.iter().enumerate() {
            let p_all: Vec<u32> = (0..seq_ids.len() as u32).collect();
            let mut ks = r::gather(&kt, seq_ids);
            if let Some(rope) = rope {
                ks = r::rope(&ks, &p_all, rope, ff.as_ref());
            }
            let ks = r::round_f16(&ks);
            let vs = r::round_f16(&r::gather(&vt, seq_ids));
            for &p in &p_all {
                let row = |m: &Mat| {
                    m.slice(ndarray::s![p as usize..p as usize + 1, ..])
                        .to_owned()
                };
                cache_k.insert((s, p), row(&ks));
                cache_v.insert((s, p), row(&vs));
            }
        }
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for (&s, &p) in check.seq.iter().zip(&check.positions) {
            let lo = att.sliding_window.map_or(0, |w| (p + 1).saturating_sub(w));
            let rows = |c: &HashMap<(usize, u32), Mat>| -> Result<Mat, BuildError> {
                let views: Vec<_> = (lo..=p)
                    .map(|pp| c.get(&(s as usize, pp)).map(|m| m.view()))
                    .collect::<Option<_>>()
                    .ok_or_else(|| BuildError(format!("no cache row for sequence {s}")))?;
                ndarray::concatenate(ndarray::Axis(0), &views)
                    .map_err(|e| BuildError(e.to_string()))
            };
            keys.push(rows(&cache_k)?);
            values.push(rows(&cache_v)?);
        }
        let mut queries = r::gather(&qt, &check.tokens);
        let mut outputs = vec![y];
        if let (Some(rope), Some(q_rope)) = (rope, q_rope) {
            queries = r::rope(&queries, &check.positions, rope, ff.as_ref());
            b.check("q_rope", queries.clone())?;
            outputs.push(q_rope);
        }
        let want = r::attention(&queries, &keys, &values, att);
        b.check("y", want)?;
        b.finish(&outputs, history, check)
    }
}

/// The error of one value.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ValueError {
    pub value: String,
    /// `max |got - want|`; infinite if an element is not finite.
    pub max_abs: f64,
    /// `max_abs / max |want|`.
    pub max_rel: f64,
    pub tolerance: f64,
    /// The worst element: `[row, column]`, what the backend gave and what was expected.
    pub worst: Option<Worst>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Worst {
    pub at: [usize; 2],
    pub got: f32,
    pub want: f64,
}

impl ValueError {
    /// Within tolerance (a NaN error is not).
    pub fn passed(&self) -> bool {
        matches!(
            self.max_rel.partial_cmp(&self.tolerance),
            Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
        )
    }
}

/// How a case went on one backend.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    /// A value is beyond its tolerance.
    Fail,
    /// The case could not run (the backend refused the plan or failed the step).
    Error(String),
}

/// One line of the table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CaseReport {
    pub case: String,
    pub op: &'static str,
    pub backend: &'static str,
    /// The errors and tolerance of the case's headline value: the first failing value, else the
    /// computed value with the largest relative error (every value is in `values`).
    pub max_abs: f64,
    pub max_rel: f64,
    pub tolerance: f64,
    pub outcome: Outcome,
    pub values: Vec<ValueError>,
}

impl CaseReport {
    pub fn passed(&self) -> bool {
        self.outcome == Outcome::Pass
    }
}

/// Compares a value read back with its reference.
pub fn compare(check: &Check, got: &crate::backend::HostTensor) -> Result<ValueError, String> {
    if got.dim() != check.want.dim() {
        return Err(format!(
            "`{}` has shape {:?}, expected {:?}",
            check.value,
            got.dim(),
            check.want.dim()
        ));
    }
    let scale = check.want.iter().fold(0f64, |m, w| m.max(w.abs()));
    let mut max_abs = 0f64;
    let mut worst = None;
    for ((at, &g), &w) in got.indexed_iter().zip(check.want.iter()) {
        let d = if g.is_finite() {
            (f64::from(g) - w).abs()
        } else {
            f64::INFINITY
        };
        if worst.is_none() || d > max_abs {
            max_abs = d;
            worst = Some(Worst {
                at: [at.0, at.1],
                got: g,
                want: w,
            });
        }
    }
    let max_rel = if max_abs == 0.0 {
        0.0
    } else {
        max_abs / scale.max(f64::MIN_POSITIVE)
    };
    Ok(ValueError {
        value: check.value.clone(),
        max_abs,
        max_rel,
        tolerance: check.tolerance,
        worst,
    })
}

/// Runs `case` on the backend `entry`: build, open, history steps, poison step, checked step,
/// compare.
pub fn run_case(entry: &BackendEntry, case: &Case) -> CaseReport {
    let mut report = CaseReport {
        case: case.name.clone(),
        op: case.op_name(),
        backend: entry.name,
        max_abs: 0.0,
        max_rel: 0.0,
        tolerance: tolerance(case.kind()),
        outcome: Outcome::Pass,
        values: Vec::new(),
    };
    match try_run(entry, case) {
        Ok(values) => {
            // The headline: the first failing value, else the computed value (not an exact
            // step input) with the largest relative error.
            let headline = values.iter().find(|v| !v.passed()).or_else(|| {
                values
                    .iter()
                    .filter(|v| v.tolerance > 0.0)
                    .max_by(|a, b| a.max_rel.total_cmp(&b.max_rel))
            });
            if let Some(v) = headline {
                report.max_abs = v.max_abs;
                report.max_rel = v.max_rel;
                report.tolerance = v.tolerance;
            }
            if values.iter().any(|v| !v.passed()) {
                report.outcome = Outcome::Fail;
            }
            report.values = values;
        }
        Err(e) => report.outcome = Outcome::Error(e),
    }
    report
}

fn try_run(entry: &BackendEntry, case: &Case) -> Result<Vec<ValueError>, String> {
    let built = case
        .build()
        .map_err(|e| format!("building the case: {e}"))?;
    let poison = built.poison();
    let reads: Vec<String> = built.checks.iter().map(|c| c.value.clone()).collect();
    let mut backend = (entry.open)(built.plan, built.weights, built.kv)
        .map_err(|e| format!("opening the backend: {e}"))?;
    for (i, step) in built.history.iter().enumerate() {
        run_step(backend.as_mut(), step, built.kv.n_seqs, &[])
            .map_err(|e| format!("history step {i}: {e}"))?;
    }
    // Its outputs are NaN by design: a backend that reports non-finite outputs has computed them.
    match run_step(backend.as_mut(), &poison, built.kv.n_seqs, &[]) {
        Ok(_) | Err(BackendError::NonFinite { .. }) => {}
        Err(e) => return Err(format!("poison step: {e}")),
    }
    let got = run_step(backend.as_mut(), &built.check, built.kv.n_seqs, &reads)
        .map_err(|e| format!("checked step: {e}"))?;
    let matmul_tolerance = (entry.matmul_tolerance)();
    built
        .checks
        .iter()
        .zip(&got)
        .map(|(c, g)| {
            let mut e = compare(c, g)?;
            if c.matmul {
                e.tolerance = e.tolerance.max(matmul_tolerance);
            }
            Ok(e)
        })
        .collect()
}

/// Runs every case on `entry`, in order.
pub fn run(entry: &BackendEntry, cases: &[Case]) -> Vec<CaseReport> {
    cases.iter().map(|c| run_case(entry, c)).collect()
}
