//! The operations of the graph: a closed, typed enum. Each variant documents the exact math it
//! means; backends implement that math (the CPU reference backend to agree with llama.cpp).
//!
//! Conventions used below: activations are `F32` rows, `x[r, i]` is element `i` of row `r`; a
//! weight `W` of IR shape `[n, k]` has `n` rows of `k` elements (GGUF `ne = [k, n]`) and may be
//! stored in any GGUF type (dequantized on the fly; arithmetic is FP32). "The step" is one call of
//! the plan: `T` tokens, each with a sequence slot and a position, described by a
//! [`Step`](crate::backend::step::Step).
//!
//! Every fact about an op lives here, each as one exhaustive `match` (no `_ =>` arm), so a new
//! variant does not compile until each table has it: its kind ([`Op::kind`], [`OpKind::ALL`]),
//! name and class ([`OpKind::info`]), a well-typed example ([`OpKind::example`]), its slots,
//! ports and weight-matrix slots ([`Op::input_names`], [`Op::n_outputs`], [`Op::matrix_slots`])
//! and, for a fused op, its expansion into primitive ops ([`Op::expansion`]). The shape rule is
//! [`infer`](super::infer::infer). Harnesses that must cover every op (the per-op parity cases,
//! a backend's list of supported ops) walk [`OpKind::ALL`] or [`Op::examples`].

use super::types::{Dim, KvCacheType, Shape, TensorType, ValueType};
use crate::gguf::GgmlType;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Range;

/// One operation. Inputs are numbered *slots* (see [`Op::input_names`]); outputs are numbered
/// *ports* (see [`Op::n_outputs`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    // ---- Step inputs: filled from the `Step` before anything runs. ----
    /// `i32[T]`: the token ids of the step (`Step::tokens`).
    TokenIds,
    /// `i32[T]`: each token's position in its own sequence (`Step::positions`).
    Positions,
    /// `i32[O]`: the indices (into `0..T`, ascending) of the tokens whose logits the step returns
    /// (`Step::outputs`).
    OutputRows,

    // ---- Weights: read-only GGUF tensors; never copied into the activation arena. ----
    /// The GGUF tensor `tensor`, with its GGUF type and shape.
    Weight { tensor: String },

    // ---- Primitive compute ops. ----
    /// `(table [V, E], ids i32[R]) -> [R, E]`: `y[r] = table[ids[r]]`, the row dequantized to F32.
    Embedding,
    /// `(x [R, K], w [N, K]) -> [R, N]`: `y[r, n] = sum_k x[r, k] * w[n, k]` (`y = x Wᵀ`).
    #[serde(rename = "matmul", alias = "mat_mul")]
    MatMul,
    /// `(a [R, N], b [R, N] or [N]) -> [R, N]`: `y = a + b`; a vector `b` (a bias) is added to
    /// every row.
    Add,
    /// `(a [R, N], b [R, N] or [N]) -> [R, N]`: `y = a * b` elementwise, a vector `b` broadcast
    /// over rows.
    Mul,
    /// `(x [R, N]) -> [R, N]`: `y = x * sigmoid(x) = x / (1 + exp(-x))`.
    Silu,
    /// `(x [R, N], w [G]) -> [R, N]` with `G` dividing `N`: each run of `G` consecutive elements
    /// of a row is normalized on its own and scaled by `w`:
    /// `y[r, g*G + i] = x[r, g*G + i] / sqrt(mean_j(x[r, g*G + j]²) + eps) * w[i]`.
    /// `G = N` is the usual whole-row norm; `G = head_dim` normalizes each attention head
    /// (qwen3's q/k norms).
    RmsNorm { eps: f32 },
    /// Rotary position embedding, see [`RopeParams`].
    Rope(RopeParams),
    /// `(k [T, Hkv*D], v [T, Hkv*D]) -> kv_cache(layer)`: for each token `t`, writes `k[t]` and
    /// `v[t]`, rounded to FP16, into this layer's K and V caches at the token's cell
    /// (`PageTables::cell(slot[t], pos[t])`). Its output stands for the layer's cache after the write: the
    /// attention that reads it runs after the write.
    KvWrite(KvParams),
    /// Causal grouped-query attention over the KV cache, see [`AttentionParams`].
    Attention(AttentionParams),
    /// `(x [T, N], rows i32[O]) -> [O, N]`: `y[o] = x[rows[o]]`: keeps the rows whose logits are
    /// wanted, so the last layer's feed-forward and the logits run on `O` rows, not `T`.
    SelectRows,

    // ---- Fused ops: produced by passes; each means exactly its unfused expansion. ----
    /// `(gate [R, N], up [R, N]) -> [R, N]`: `y = silu(gate) * up`. The fused form of
    /// `mul(silu(gate), up)`.
    #[serde(rename = "swiglu", alias = "swi_glu")]
    SwiGlu,
    /// `(x [R, K], w_0 [N_0, K], ..., w_{n-1}) -> (y_0 [R, N_0], ..., y_{n-1})`:
    /// `y_i = x W_iᵀ`: several matmuls that read the same `x` (q, k and v). The weights keep
    /// their own tensors and types: nothing is concatenated or copied.
    #[serde(rename = "multi_matmul", alias = "multi_mat_mul")]
    MultiMatMul { n: u8 },
    /// `(x [R, K], w_gate [N, K], w_up [N, K]) -> [R, N]`: `y = silu(x W_gateᵀ) * (x W_upᵀ)`: the
    /// SwiGLU feed-forward's first half without materializing the gate and up activations.
    #[serde(rename = "gate_up_swiglu", alias = "gate_up_swi_glu")]
    GateUpSwiGlu,
    /// `(a [R, N], b [R, N], w [G]) -> (sum [R, N], normed [R, N])`: `sum = a + b`,
    /// `normed = rms_norm(sum, w)`: the residual add and the next norm in one pass.
    AddRmsNorm { eps: f32 },
    /// `(k, v, pos[, freq_factors]) -> kv_cache(layer)`: `kv_write(rope(k, pos), v)`: the rotated
    /// keys go straight into the cache.
    RopeKvWrite { rope: RopeParams, kv: KvParams },
    /// `(q [T, H*D], k, v, pos[, freq_factors]) -> (q_rope [T, H*D], kv_cache(layer))`:
    /// `(rope(q, pos), kv_write(rope(k, pos), v))`: the query's rope and the rotated K/V write
    /// in one op (one kernel). q and k share the rope's parameters (which hold no head count:
    /// q has `H` heads, k and v `kv.n_kv_heads`, all of `head_dim`).
    RopeQkvWrite { rope: RopeParams, kv: KvParams },
}

/// How rope pairs up the dimensions it rotates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])` (llama.cpp's `LLAMA_ROPE_TYPE_NORM`). GGUF llama q/k
    /// weights are permuted by the converter so that this matches Hugging Face's rotate-half.
    Normal,
    /// Pairs half a rotation apart, `(x[i], x[i + n_rot/2])` (`LLAMA_ROPE_TYPE_NEOX`: qwen2,
    /// qwen3).
    Neox,
}

/// Rotary position embedding: `(x [T, H*D], pos i32[T][, freq_factors [n_rot/2]]) -> [T, H*D]`.
///
/// Each head (`D = head_dim` elements) of token `t` is rotated by angles that depend on the
/// token's position `p = pos[t]`. For `i` in `0..n_rot/2`:
/// `theta_i = freq_scale * p * freq_base^(-2i/n_rot) / ff[i]` (`ff[i] = freq_factors[i]` when the
/// model has them, llama 3's `rope_freqs.weight`, else 1), and the pair `(a, b)` chosen by
/// [`RopeStyle`] becomes `(a cos θ - b sin θ, a sin θ + b cos θ)`. Elements `n_rot..D` of each
/// head pass through unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeParams {
    pub style: RopeStyle,
    pub head_dim: u32,
    /// Rotated dimensions per head (`rope.dimension_count`), even, at most `head_dim`.
    pub n_rot: u32,
    pub freq_base: f32,
    /// `1 / rope.scaling.factor` for linear scaling, else 1.
    pub freq_scale: f32,
    /// Whether the op takes a third input, `freq_factors` (F32 `[n_rot/2]`).
    pub freq_factors: bool,
}

/// Where a layer's K and V go: `n_kv_heads * head_dim` values per token each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvParams {
    pub layer: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
}

/// Attention: `(q [T, H*D], kv_cache(layer)) -> [T, H*D]`, `H = n_heads`, `D = head_dim`.
///
/// For token `t` and query head `h`, with `g = h / (n_heads / n_kv_heads)` its KV head
/// (grouped-query attention), and `C(t)` the cache cells `t` may attend
/// (through its slot's page table: the cells of its own sequence at positions
/// `lo..=pos[t]`, `lo = 0`, or `pos[t] + 1 - window` with a sliding window; this is the causal
/// mask, and it includes the token itself):
/// `s_c = scale * dot(q[t, h], K[c, g])` for `c` in `C(t)`, `w = softmax(s)` (max-subtracted),
/// `y[t, h] = sum_c w_c * V[c, g]`. K and V are read from the FP16 cache and widened to F32.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionParams {
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    /// `1 / sqrt(head_dim)` unless the model sets `attention.scale`.
    pub scale: f32,
    /// Attend only to the last `window` positions (the token's own included).
    pub sliding_window: Option<u32>,
}

/// Declares [`OpKind`] and [`OpKind::ALL`] from one list, so that no kind can be missing from
/// the list of every kind.
macro_rules! op_kinds {
    ($($kind:ident),* $(,)?) => {
        /// Which op an [`Op`] is, without its parameters: one kind per variant of `Op`
        /// ([`Op::kind`]).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum OpKind {
            $($kind),*
        }

        impl OpKind {
            /// Every kind, in the order `Op` declares its variants. A table of ops (the per-op
            /// parity cases, a backend's list of what it runs) walks this list, and
            /// [`OpKind::example`] gives a well-typed instance of each.
            pub const ALL: &'static [OpKind] = &[$(OpKind::$kind),*];
        }
    };
}

op_kinds!(
    TokenIds,
    Positions,
    OutputRows,
    Weight,
    Embedding,
    MatMul,
    Add,
    Mul,
    Silu,
    RmsNorm,
    Rope,
    KvWrite,
    Attention,
    SelectRows,
    SwiGlu,
    MultiMatMul,
    GateUpSwiGlu,
    AddRmsNorm,
    RopeKvWrite,
    RopeQkvWrite,
);

/// The role an op plays in a graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpClass {
    /// Filled from the `Step` before anything runs; no inputs.
    StepInput,
    /// A GGUF tensor; its type comes from the file, not from shape inference.
    Weight,
    /// Arithmetic a backend implements directly; lowering emits these.
    Primitive,
    /// Made only by passes; means exactly its [`Op::expansion`] into primitive ops.
    Fused,
}

/// The fixed facts about a kind of op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpInfo {
    /// The name in dumps, errors and the serialized plan's `op` tag (`rms_norm`).
    pub name: &'static str,
    pub class: OpClass,
}

impl OpKind {
    /// The kind's name and class: the one table every other view ([`Op::name`],
    /// [`Op::is_fused`], [`Op::is_step_input`]) reads.
    pub const fn info(self) -> OpInfo {
        use OpClass::*;
        let (name, class) = match self {
            OpKind::TokenIds => ("token_ids", StepInput),
            OpKind::Positions => ("positions", StepInput),
            OpKind::OutputRows => ("output_rows", StepInput),
            OpKind::Weight => ("weight", Weight),
            OpKind::Embedding => ("embedding", Primitive),
            OpKind::MatMul => ("matmul", Primitive),
            OpKind::Add => ("add", Primitive),
            OpKind::Mul => ("mul", Primitive),
            OpKind::Silu => ("silu", Primitive),
            OpKind::RmsNorm => ("rms_norm", Primitive),
            OpKind::Rope => ("rope", Primitive),
            OpKind::KvWrite => ("kv_write", Primitive),
            OpKind::Attention => ("attention", Primitive),
            OpKind::SelectRows => ("select_rows", Primitive),
            OpKind::SwiGlu => ("swiglu", Fused),
            OpKind::MultiMatMul => ("multi_matmul", Fused),
            OpKind::GateUpSwiGlu => ("gate_up_swiglu", Fused),
            OpKind::AddRmsNorm => ("add_rms_norm", Fused),
            OpKind::RopeKvWrite => ("rope_kv_write", Fused),
            OpKind::RopeQkvWrite => ("rope_qkv_write", Fused),
        };
        OpInfo { name, class }
    }

    pub const fn name(self) -> &'static str {
        self.info().name
    }

    /// The kind whose name is `name` (`rms_norm`), if any.
    pub fn from_name(name: &str) -> Option<OpKind> {
        OpKind::ALL.iter().copied().find(|k| k.name() == name)
    }

    /// A well-typed instance of this kind: the op with representative parameters and one input
    /// type per slot (activations of `T` tokens, F32 weights; model-sized shapes are the parity
    /// harness's business). Shape inference accepts every example but the weight's, whose type
    /// comes from its tensor.
    pub fn example(self) -> OpExample {
        const EMBD: u64 = 64;
        const FF: u64 = 96;
        const VOCAB: u64 = 100;
        const HEADS: u32 = 4;
        const KV_HEADS: u32 = 2;
        const HEAD_DIM: u32 = 16;
        const KV_WIDTH: u64 = (KV_HEADS * HEAD_DIM) as u64;
        let act = |width: u64| ValueType::Tensor(TensorType::activation(Dim::Tokens, width));
        let mat = |n: u64, k: u64| {
            ValueType::Tensor(TensorType::new(GgmlType::F32, Shape::fixed(&[n, k])))
        };
        let vector = |n: u64| ValueType::Tensor(TensorType::new(GgmlType::F32, Shape::fixed(&[n])));
        let indices =
            |rows: Dim| ValueType::Tensor(TensorType::new(GgmlType::I32, Shape(vec![rows])));
        let kv = KvParams {
            layer: 0,
            n_kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
        };
        let rope = |style, freq_factors| RopeParams {
            style,
            head_dim: HEAD_DIM,
            n_rot: HEAD_DIM,
            freq_base: 10_000.0,
            freq_scale: 1.0,
            freq_factors,
        };
        let eps = 1e-5;
        let (op, inputs) = match self {
            OpKind::TokenIds => (Op::TokenIds, vec![]),
            OpKind::Positions => (Op::Positions, vec![]),
            OpKind::OutputRows => (Op::OutputRows, vec![]),
            OpKind::Weight => (
                Op::Weight {
                    tensor: "blk.0.attn_q.weight".into(),
                },
                vec![],
            ),
            OpKind::Embedding => (Op::Embedding, vec![mat(VOCAB, EMBD), indices(Dim::Tokens)]),
            OpKind::MatMul => (Op::MatMul, vec![act(EMBD), mat(FF, EMBD)]),
            OpKind::Add => (Op::Add, vec![act(EMBD), act(EMBD)]),
            OpKind::Mul => (Op::Mul, vec![act(EMBD), vector(EMBD)]),
            OpKind::Silu => (Op::Silu, vec![act(FF)]),
            OpKind::RmsNorm => (Op::RmsNorm { eps }, vec![act(EMBD), vector(EMBD)]),
            OpKind::Rope => (
                Op::Rope(rope(RopeStyle::Normal, false)),
                vec![act(EMBD), indices(Dim::Tokens)],
            ),
            OpKind::KvWrite => (Op::KvWrite(kv), vec![act(KV_WIDTH), act(KV_WIDTH)]),
            OpKind::Attention => (
                Op::Attention(AttentionParams {
                    n_heads: HEADS,
                    n_kv_heads: KV_HEADS,
                    head_dim: HEAD_DIM,
                    scale: 0.25,
                    sliding_window: None,
                }),
                vec![
                    act(EMBD),
                    ValueType::KvCache(KvCacheType {
                        layer: kv.layer,
                        n_kv_heads: KV_HEADS,
                        head_dim: HEAD_DIM,
                    }),
                ],
            ),
            OpKind::SelectRows => (Op::SelectRows, vec![act(EMBD), indices(Dim::Outputs)]),
            OpKind::SwiGlu => (Op::SwiGlu, vec![act(FF), act(FF)]),
            OpKind::MultiMatMul => (
                Op::MultiMatMul { n: 3 },
                vec![
                    act(EMBD),
                    mat(EMBD, EMBD),
                    mat(KV_WIDTH, EMBD),
                    mat(KV_WIDTH, EMBD),
                ],
            ),
            OpKind::GateUpSwiGlu => (
                Op::GateUpSwiGlu,
                vec![act(EMBD), mat(FF, EMBD), mat(FF, EMBD)],
            ),
            OpKind::AddRmsNorm => (
                Op::AddRmsNorm { eps },
                vec![act(EMBD), act(EMBD), vector(EMBD)],
            ),
            OpKind::RopeKvWrite => (
                Op::RopeKvWrite {
                    rope: rope(RopeStyle::Neox, true),
                    kv,
                },
                vec![
                    act(KV_WIDTH),
                    act(KV_WIDTH),
                    indices(Dim::Tokens),
                    vector(u64::from(HEAD_DIM / 2)),
                ],
            ),
            OpKind::RopeQkvWrite => (
                Op::RopeQkvWrite {
                    rope: rope(RopeStyle::Normal, true),
                    kv,
                },
                vec![
                    act(u64::from(HEADS * HEAD_DIM)),
                    act(KV_WIDTH),
                    act(KV_WIDTH),
                    indices(Dim::Tokens),
                    vector(u64::from(HEAD_DIM / 2)),
                ],
            ),
        };
        OpExample { op, inputs }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An op with the types of its inputs, one per slot: see [`OpKind::example`].
#[derive(Clone, Debug, PartialEq)]
pub struct OpExample {
    pub op: Op,
    pub inputs: Vec<ValueType>,
}

/// One primitive op of a fused op's expansion ([`Op::expansion`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Expanded {
    pub op: Op,
    /// Where each of its inputs comes from, in slot order.
    pub inputs: Vec<ExpandedInput>,
    /// What it computes.
    pub result: ExpandedResult,
}

/// An input of an [`Expanded`] op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpandedInput {
    /// Input slot `i` of the fused op.
    Slot(usize),
    /// The (single) output of the expansion's op `i`, an earlier one.
    Node(usize),
}

/// What an [`Expanded`] op computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpandedResult {
    /// Output port `p` of the fused op: the value keeps its name.
    Port(usize),
    /// An intermediate the fusion dropped; unfusing names it `<port 0's name>.<part>`.
    Part(&'static str),
}

impl Op {
    /// The kind of op, without parameters.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::TokenIds => OpKind::TokenIds,
            Op::Positions => OpKind::Positions,
            Op::OutputRows => OpKind::OutputRows,
            Op::Weight { .. } => OpKind::Weight,
            Op::Embedding => OpKind::Embedding,
            Op::MatMul => OpKind::MatMul,
            Op::Add => OpKind::Add,
            Op::Mul => OpKind::Mul,
            Op::Silu => OpKind::Silu,
            Op::RmsNorm { .. } => OpKind::RmsNorm,
            Op::Rope(_) => OpKind::Rope,
            Op::KvWrite(_) => OpKind::KvWrite,
            Op::Attention(_) => OpKind::Attention,
            Op::SelectRows => OpKind::SelectRows,
            Op::SwiGlu => OpKind::SwiGlu,
            Op::MultiMatMul { .. } => OpKind::MultiMatMul,
            Op::GateUpSwiGlu => OpKind::GateUpSwiGlu,
            Op::AddRmsNorm { .. } => OpKind::AddRmsNorm,
            Op::RopeKvWrite { .. } => OpKind::RopeKvWrite,
            Op::RopeQkvWrite { .. } => OpKind::RopeQkvWrite,
        }
    }

    /// One well-typed example of every kind of op, in [`OpKind::ALL`] order.
    pub fn examples() -> Vec<OpExample> {
        OpKind::ALL.iter().map(|k| k.example()).collect()
    }

    /// The op's name in dumps and errors (`rms_norm`, `multi_matmul`, ...).
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// The op's role: step input, weight, primitive or fused.
    pub fn class(&self) -> OpClass {
        self.kind().info().class
    }

    /// The names of the input slots, in slot order.
    pub fn input_names(&self) -> Vec<String> {
        let fixed: &[&str] = match self {
            Op::TokenIds | Op::Positions | Op::OutputRows | Op::Weight { .. } => &[],
            Op::Embedding => &["table", "ids"],
            Op::MatMul => &["x", "w"],
            Op::Add | Op::Mul => &["a", "b"],
            Op::Silu => &["x"],
            Op::SwiGlu => &["gate", "up"],
            Op::RmsNorm { .. } => &["x", "w"],
            Op::Rope(r) if r.freq_factors => &["x", "pos", "freq_factors"],
            Op::Rope(_) => &["x", "pos"],
            Op::KvWrite(_) => &["k", "v"],
            Op::Attention(_) => &["q", "kv"],
            Op::SelectRows => &["x", "rows"],
            Op::MultiMatMul { n } => {
                let mut names = vec!["x".to_string()];
                names.extend((0..*n).map(|i| format!("w{i}")));
                return names;
            }
            Op::GateUpSwiGlu => &["x", "w_gate", "w_up"],
            Op::AddRmsNorm { .. } => &["a", "b", "w"],
            Op::RopeKvWrite { rope, .. } if rope.freq_factors => &["k", "v", "pos", "freq_factors"],
            Op::RopeKvWrite { .. } => &["k", "v", "pos"],
            Op::RopeQkvWrite { rope, .. } if rope.freq_factors => {
                &["q", "k", "v", "pos", "freq_factors"]
            }
            Op::RopeQkvWrite { .. } => &["q", "k", "v", "pos"],
        };
        fixed.iter().map(|s| s.to_string()).collect()
    }

    /// Number of input slots.
    pub fn arity(&self) -> usize {
        self.input_names().len()
    }

    /// Number of output ports.
    pub fn n_outputs(&self) -> usize {
        match self {
            Op::MultiMatMul { n } => usize::from(*n),
            Op::AddRmsNorm { .. } | Op::RopeQkvWrite { .. } => 2,
            Op::TokenIds
            | Op::Positions
            | Op::OutputRows
            | Op::Weight { .. }
            | Op::Embedding
            | Op::MatMul
            | Op::Add
            | Op::Mul
            | Op::Silu
            | Op::RmsNorm { .. }
            | Op::Rope(_)
            | Op::KvWrite(_)
            | Op::Attention(_)
            | Op::SelectRows
            | Op::SwiGlu
            | Op::GateUpSwiGlu
            | Op::RopeKvWrite { .. } => 1,
        }
    }

    /// The input slots that take a weight matrix `[n, k]` of any storage type (dequantized on
    /// the fly): what a backend's matrix kernels must be able to read. Vector weights (norms,
    /// biases, rope frequency factors) are F32 and not listed.
    pub fn matrix_slots(&self) -> Range<usize> {
        match self {
            Op::Embedding => 0..1,
            Op::MatMul => 1..2,
            Op::MultiMatMul { n } => 1..1 + usize::from(*n),
            Op::GateUpSwiGlu => 1..3,
            Op::TokenIds
            | Op::Positions
            | Op::OutputRows
            | Op::Weight { .. }
            | Op::Add
            | Op::Mul
            | Op::Silu
            | Op::RmsNorm { .. }
            | Op::Rope(_)
            | Op::KvWrite(_)
            | Op::Attention(_)
            | Op::SelectRows
            | Op::SwiGlu
            | Op::AddRmsNorm { .. }
            | Op::RopeKvWrite { .. }
            | Op::RopeQkvWrite { .. } => 0..0,
        }
    }

    /// True for the ops whose values come from the `Step`.
    pub fn is_step_input(&self) -> bool {
        self.class() == OpClass::StepInput
    }

    /// True for ops that only passes create (those with an [`expansion`](Op::expansion)).
    pub fn is_fused(&self) -> bool {
        self.class() == OpClass::Fused
    }

    /// What a fused op means, as primitive ops in program order (`None` for any other op). The
    /// fused op's output port `p` is the value of the expanded op whose result is
    /// [`ExpandedResult::Port`]`(p)`. [`unfuse`](fn@crate::passes::unfuse) rewrites a graph with it.
    pub fn expansion(&self) -> Option<Vec<Expanded>> {
        use ExpandedInput::{Node, Slot};
        use ExpandedResult::{Part, Port};
        let e = |op: Op, inputs: &[ExpandedInput], result| Expanded {
            op,
            inputs: inputs.to_vec(),
            result,
        };
        Some(match self {
            Op::TokenIds
            | Op::Positions
            | Op::OutputRows
            | Op::Weight { .. }
            | Op::Embedding
            | Op::MatMul
            | Op::Add
            | Op::Mul
            | Op::Silu
            | Op::RmsNorm { .. }
            | Op::Rope(_)
            | Op::KvWrite(_)
            | Op::Attention(_)
            | Op::SelectRows => return None,
            // swiglu(gate, up) = mul(silu(gate), up)
            Op::SwiGlu => vec![
                e(Op::Silu, &[Slot(0)], Part("silu")),
                e(Op::Mul, &[Node(0), Slot(1)], Port(0)),
            ],
            // multi_matmul(x, w_0..w_n) = (matmul(x, w_0), ..., matmul(x, w_n))
            Op::MultiMatMul { n } => (0..usize::from(*n))
                .map(|i| e(Op::MatMul, &[Slot(0), Slot(1 + i)], Port(i)))
                .collect(),
            // gate_up_swiglu(x, wg, wu) = mul(silu(matmul(x, wg)), matmul(x, wu))
            Op::GateUpSwiGlu => vec![
                e(Op::MatMul, &[Slot(0), Slot(1)], Part("gate")),
                e(Op::MatMul, &[Slot(0), Slot(2)], Part("up")),
                e(Op::Silu, &[Node(0)], Part("silu")),
                e(Op::Mul, &[Node(2), Node(1)], Port(0)),
            ],
            // add_rms_norm(a, b, w) = (add(a, b), rms_norm(add(a, b), w))
            Op::AddRmsNorm { eps } => vec![
                e(Op::Add, &[Slot(0), Slot(1)], Port(0)),
                e(Op::RmsNorm { eps: *eps }, &[Node(0), Slot(2)], Port(1)),
            ],
            // rope_kv_write(k, v, pos[, ff]) = kv_write(rope(k, pos[, ff]), v)
            Op::RopeKvWrite { rope, kv } => {
                let rope_inputs: &[ExpandedInput] = if rope.freq_factors {
                    &[Slot(0), Slot(2), Slot(3)]
                } else {
                    &[Slot(0), Slot(2)]
                };
                vec![
                    e(Op::Rope(*rope), rope_inputs, Part("k_rope")),
                    e(Op::KvWrite(*kv), &[Node(0), Slot(1)], Port(0)),
                ]
            }
            // rope_qkv_write(q, k, v, pos[, ff]) =
            //     (rope(q, pos[, ff]), kv_write(rope(k, pos[, ff]), v))
            Op::RopeQkvWrite { rope, kv } => {
                let (q_inputs, k_inputs): (&[ExpandedInput], &[ExpandedInput]) =
                    if rope.freq_factors {
                        (&[Slot(0), Slot(3), Slot(4)], &[Slot(1), Slot(3), Slot(4)])
                    } else {
                        (&[Slot(0), Slot(3)], &[Slot(1), Slot(3)])
                    };
                vec![
                    e(Op::Rope(*rope), q_inputs, Port(0)),
                    e(Op::Rope(*rope), k_inputs, Part("k_rope")),
                    e(Op::KvWrite(*kv), &[Node(1), Slot(2)], Port(1)),
                ]
            }
        })
    }
}

impl fmt::Display for RopeParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let style = match self.style {
            RopeStyle::Normal => "normal",
            RopeStyle::Neox => "neox",
        };
        write!(
            f,
            "{style}, rot={}/{}, base={}",
            self.n_rot, self.head_dim, self.freq_base
        )?;
        if self.freq_scale != 1.0 {
            write!(f, ", scale={}", self.freq_scale)?;
        }
        if self.freq_factors {
            f.write_str(", freq_factors")?;
        }
        Ok(())
    }
}

/// `name[params]`, e.g. `rms_norm[eps=0.00001]`, `attention[heads=9/3, dim=64, scale=0.125]`.
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        match self {
            Op::RmsNorm { eps } | Op::AddRmsNorm { eps } => write!(f, "[eps={eps}]"),
            Op::Rope(r) => write!(f, "[{r}]"),
            Op::KvWrite(kv) => write!(f, "[layer={}]", kv.layer),
            Op::RopeKvWrite { rope, kv } | Op::RopeQkvWrite { rope, kv } => {
                write!(f, "[{rope}, layer={}]", kv.layer)
            }
            Op::Attention(a) => {
                write!(
                    f,
                    "[heads={}/{}, dim={}, scale={}",
                    a.n_heads, a.n_kv_heads, a.head_dim, a.scale
                )?;
                if let Some(w) = a.sliding_window {
                    write!(f, ", window={w}")?;
                }
                f.write_str("]")
            }
            Op::MultiMatMul { n } => write!(f, "[n={n}]"),
            Op::TokenIds
            | Op::Positions
            | Op::OutputRows
            | Op::Weight { .. }
            | Op::Embedding
            | Op::MatMul
            | Op::Add
            | Op::Mul
            | Op::Silu
            | Op::SelectRows
            | Op::SwiGlu
            | Op::GateUpSwiGlu => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::infer::infer;

    /// The output types of `ex`'s op computed through its expansion, one op at a time.
    fn expanded_types(ex: &OpExample, expansion: &[Expanded]) -> Vec<ValueType> {
        let mut made: Vec<ValueType> = Vec::new();
        let mut ports = vec![None; ex.op.n_outputs()];
        for part in expansion {
            assert!(
                !part.op.is_fused() && part.op.class() == OpClass::Primitive,
                "{}'s expansion holds {}",
                ex.op,
                part.op
            );
            let types: Vec<&ValueType> = part
                .inputs
                .iter()
                .map(|i| match *i {
                    ExpandedInput::Slot(s) => &ex.inputs[s],
                    ExpandedInput::Node(n) => &made[n],
                })
                .collect();
            let out = infer(&part.op, &types)
                .unwrap_or_else(|e| panic!("{}'s expansion: {}: {e}", ex.op, part.op));
            assert_eq!(out.len(), 1, "expanded ops have one output");
            if let ExpandedResult::Port(p) = part.result {
                assert!(ports[p].is_none(), "{}: port {p} computed twice", ex.op);
                ports[p] = Some(out[0].clone());
            }
            made.push(out[0].clone());
        }
        ports
            .into_iter()
            .enumerate()
            .map(|(p, t)| {
                t.unwrap_or_else(|| panic!("{}: no expanded op computes port {p}", ex.op))
            })
            .collect()
    }

    #[test]
    fn every_kind_has_consistent_metadata() {
        let examples = Op::examples();
        assert_eq!(examples.len(), OpKind::ALL.len());
        let mut names = std::collections::HashSet::new();
        for (ex, &kind) in examples.iter().zip(OpKind::ALL) {
            let op = &ex.op;
            assert_eq!(op.kind(), kind, "example of {kind}");
            assert!(
                names.insert(op.name()),
                "two kinds are called {}",
                op.name()
            );
            assert_eq!(OpKind::from_name(op.name()), Some(kind));
            // The name is the serialized plan's tag, and what dumps print first.
            let json = serde_json::to_value(op).unwrap();
            assert_eq!(json["op"], op.name(), "{kind}'s serde tag");
            assert_eq!(serde_json::from_value::<Op>(json).unwrap(), *op);
            assert!(op.to_string().starts_with(op.name()));
            // Slots, ports and the shape rule agree.
            assert_eq!(
                op.arity(),
                ex.inputs.len(),
                "{kind}: one input type per slot"
            );
            assert_eq!(op.input_names().len(), op.arity());
            let types: Vec<&ValueType> = ex.inputs.iter().collect();
            let inferred = infer(op, &types);
            match op.class() {
                OpClass::Weight => assert!(inferred.is_err(), "a weight's type is its tensor's"),
                OpClass::StepInput => {
                    assert!(op.is_step_input() && op.arity() == 0);
                    assert_eq!(inferred.unwrap().len(), 1);
                }
                OpClass::Primitive | OpClass::Fused => {
                    let out = inferred.unwrap_or_else(|e| panic!("{kind}: {e}"));
                    assert_eq!(out.len(), op.n_outputs(), "{kind}: outputs");
                }
            }
            assert_eq!(op.is_step_input(), op.class() == OpClass::StepInput);
            // Matrix slots hold matrices, and any storage type of theirs is accepted.
            let slots = op.matrix_slots();
            assert!(slots.end <= op.arity(), "{kind}: matrix slots {slots:?}");
            for s in slots {
                let ValueType::Tensor(t) = &ex.inputs[s] else {
                    panic!("{kind}: matrix slot {s} is not a tensor");
                };
                assert_eq!(t.shape.rank(), 2, "{kind}: matrix slot {s}");
                let mut quantized = ex.inputs.clone();
                quantized[s] = ValueType::Tensor(TensorType::new(GgmlType::Q8_0, t.shape.clone()));
                let types: Vec<&ValueType> = quantized.iter().collect();
                infer(op, &types).unwrap_or_else(|e| panic!("{kind} with a q8_0 slot {s}: {e}"));
            }
        }
    }

    #[test]
    fn fused_ops_expand_to_primitives_with_the_same_shapes() {
        for ex in Op::examples() {
            let op = &ex.op;
            let Some(expansion) = op.expansion() else {
                assert!(!op.is_fused(), "{op} is fused but has no expansion");
                continue;
            };
            assert!(op.is_fused(), "{op} has an expansion but is not fused");
            let types: Vec<&ValueType> = ex.inputs.iter().collect();
            let fused = infer(op, &types).unwrap();
            assert_eq!(expanded_types(&ex, &expansion), fused, "{op}");
            // Every input slot is read by some expanded op.
            for s in 0..op.arity() {
                assert!(
                    expansion
                        .iter()
                        .any(|p| p.inputs.contains(&ExpandedInput::Slot(s))),
                    "{op}: slot {s} is unused by its expansion"
                );
            }
        }
    }

    #[test]
    fn plans_written_with_the_old_tags_still_load() {
        // Before the tags were the ops' names, four serialized as `mat_mul`, `swi_glu`, ...
        for (old, op) in [
            ("mat_mul", Op::MatMul),
            ("swi_glu", Op::SwiGlu),
            ("gate_up_swi_glu", Op::GateUpSwiGlu),
        ] {
            let json = format!(r#"{{"op":"{old}"}}"#);
            assert_eq!(serde_json::from_str::<Op>(&json).unwrap(), op);
        }
        let multi: Op = serde_json::from_str(r#"{"op":"multi_mat_mul","n":3}"#).unwrap();
        assert_eq!(multi, Op::MultiMatMul { n: 3 });
    }

    #[test]
    fn swiglu_is_fused() {
        // Only the `swiglu` pass makes it and `unfuse` expands it; it was once counted as a
        // primitive, which hid it from anything asking for fused ops.
        assert!(Op::SwiGlu.is_fused());
        assert_eq!(
            Op::SwiGlu.expansion().unwrap().last().map(|e| &e.op),
            Some(&Op::Mul)
        );
    }

    #[test]
    fn ops_serialize_with_an_op_tag() {
        let op = Op::RmsNorm { eps: 1e-5 };
        let json = serde_json::to_string(&op).unwrap();
        assert_eq!(json, r#"{"op":"rms_norm","eps":0.00001}"#);
        assert_eq!(serde_json::from_str::<Op>(&json).unwrap(), op);
        let rope = Op::Rope(RopeParams {
            style: RopeStyle::Neox,
            head_dim: 64,
            n_rot: 64,
            freq_base: 1e6,
            freq_scale: 1.0,
            freq_factors: false,
        });
        let json = serde_json::to_string(&rope).unwrap();
        assert_eq!(serde_json::from_str::<Op>(&json).unwrap(), rope);
    }

    #[test]
    fn arity_follows_optional_inputs() {
        let mut rope = RopeParams {
            style: RopeStyle::Normal,
            head_dim: 64,
            n_rot: 64,
            freq_base: 1e4,
            freq_scale: 1.0,
            freq_factors: false,
        };
        assert_eq!(Op::Rope(rope).arity(), 2);
        rope.freq_factors = true;
        assert_eq!(Op::Rope(rope).arity(), 3);
        assert_eq!(
            Op::MultiMatMul { n: 3 }.input_names(),
            ["x", "w0", "w1", "w2"]
        );
        assert_eq!(Op::MultiMatMul { n: 3 }.n_outputs(), 3);
    }
}
