//! The operations of the graph: a closed, typed enum. Each variant documents the exact math it
//! means; backends implement that math (the CPU reference backend to agree with llama.cpp).
//!
//! Conventions used below: activations are `F32` rows, `x[r, i]` is element `i` of row `r`; a
//! weight `W` of IR shape `[n, k]` has `n` rows of `k` elements (GGUF `ne = [k, n]`) and may be
//! stored in any GGUF type (dequantized on the fly; arithmetic is FP32). "The step" is one call of
//! the plan: `T` tokens, each with a sequence slot and a position, described by a
//! [`Step`](crate::backend::step::Step).

use serde::{Deserialize, Serialize};
use std::fmt;

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
    MatMul,
    /// `(a [R, N], b [R, N] or [N]) -> [R, N]`: `y = a + b`; a vector `b` (a bias) is added to
    /// every row.
    Add,
    /// `(a [R, N], b [R, N] or [N]) -> [R, N]`: `y = a * b` elementwise, a vector `b` broadcast
    /// over rows.
    Mul,
    /// `(x [R, N]) -> [R, N]`: `y = x * sigmoid(x) = x / (1 + exp(-x))`.
    Silu,
    /// `(gate [R, N], up [R, N]) -> [R, N]`: `y = silu(gate) * up`. The fused form of
    /// `mul(silu(gate), up)`.
    SwiGlu,
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
    /// `(x [R, K], w_0 [N_0, K], ..., w_{n-1}) -> (y_0 [R, N_0], ..., y_{n-1})`:
    /// `y_i = x W_iᵀ`: several matmuls that read the same `x` (q, k and v). The weights keep
    /// their own tensors and types: nothing is concatenated or copied.
    MultiMatMul { n: u8 },
    /// `(x [R, K], w_gate [N, K], w_up [N, K]) -> [R, N]`: `y = silu(x W_gateᵀ) * (x W_upᵀ)`: the
    /// SwiGLU feed-forward's first half without materializing the gate and up activations.
    GateUpSwiGlu,
    /// `(a [R, N], b [R, N], w [G]) -> (sum [R, N], normed [R, N])`: `sum = a + b`,
    /// `normed = rms_norm(sum, w)`: the residual add and the next norm in one pass.
    AddRmsNorm { eps: f32 },
    /// `(k, v, pos[, freq_factors]) -> kv_cache(layer)`: `kv_write(rope(k, pos), v)`: the rotated
    /// keys go straight into the cache.
    RopeKvWrite { rope: RopeParams, kv: KvParams },
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

impl Op {
    /// The op's name in dumps and errors (`rms_norm`, `multi_matmul`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Op::TokenIds => "token_ids",
            Op::Positions => "positions",
            Op::OutputRows => "output_rows",
            Op::Weight { .. } => "weight",
            Op::Embedding => "embedding",
            Op::MatMul => "matmul",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Silu => "silu",
            Op::SwiGlu => "swiglu",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Rope(_) => "rope",
            Op::KvWrite(_) => "kv_write",
            Op::Attention(_) => "attention",
            Op::SelectRows => "select_rows",
            Op::MultiMatMul { .. } => "multi_matmul",
            Op::GateUpSwiGlu => "gate_up_swiglu",
            Op::AddRmsNorm { .. } => "add_rms_norm",
            Op::RopeKvWrite { .. } => "rope_kv_write",
        }
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
            Op::AddRmsNorm { .. } => 2,
            _ => 1,
        }
    }

    /// True for the ops whose values come from the `Step`.
    pub fn is_step_input(&self) -> bool {
        matches!(self, Op::TokenIds | Op::Positions | Op::OutputRows)
    }

    /// True for ops that only passes create.
    pub fn is_fused(&self) -> bool {
        matches!(
            self,
            Op::MultiMatMul { .. }
                | Op::GateUpSwiGlu
                | Op::AddRmsNorm { .. }
                | Op::RopeKvWrite { .. }
        )
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
            Op::RopeKvWrite { rope, kv } => write!(f, "[{rope}, layer={}]", kv.layer),
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
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
