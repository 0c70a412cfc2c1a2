//! What flows along the graph's edges: tensors (a storage type and a shape whose dimensions may
//! be symbolic) and the KV-cache state of a layer.
//!
//! Shapes are written outermost first (row-major): an activation of `T` tokens with 576 features
//! is `[T, 576]`, its last dimension contiguous. A weight stored in GGUF with `ne = [k, n]` (ggml
//! order: `ne[0]` contiguous) has the IR shape `[n, k]`: `n` rows of `k` elements.

use crate::gguf::GgmlType;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The storage type of a tensor. Activations are `F32` (all arithmetic is FP32), token ids and
/// positions `I32`, and weights keep their GGUF type (`F16`, `Q4_1`, ...).
pub type DType = GgmlType;

/// The type of the KV cache's storage: FP16, whatever the model's weights are.
pub const KV_DTYPE: DType = GgmlType::F16;

/// One dimension of a shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    /// `T`: the number of tokens in this step: 1 when decoding, up to the plan's maximum when
    /// prefilling. One graph serves both.
    #[serde(rename = "T")]
    Tokens,
    /// `O`: the number of tokens of this step whose logits are returned (at most `T`).
    #[serde(rename = "O")]
    Outputs,
    /// A size known when the graph is built.
    #[serde(untagged)]
    Fixed(u64),
}

impl Dim {
    /// The size of this dimension in a step of `sizes`.
    pub fn size(self, sizes: StepSizes) -> u64 {
        match self {
            Dim::Tokens => sizes.tokens,
            Dim::Outputs => sizes.outputs,
            Dim::Fixed(n) => n,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Tokens => f.write_str("T"),
            Dim::Outputs => f.write_str("O"),
            Dim::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// Values for the symbolic dimensions: the step a buffer is sized for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSizes {
    /// `T`.
    pub tokens: u64,
    /// `O`.
    pub outputs: u64,
}

/// A tensor shape, outermost dimension first.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    /// A shape of fixed sizes.
    pub fn fixed(dims: &[u64]) -> Shape {
        Shape(dims.iter().map(|&d| Dim::Fixed(d)).collect())
    }

    /// `[rows, width]`: the shape of every activation.
    pub fn rows(rows: Dim, width: u64) -> Shape {
        Shape(vec![rows, Dim::Fixed(width)])
    }

    /// The IR shape of a GGUF tensor with ggml dimensions `ne` (`ne[0]` contiguous).
    pub fn from_ggml(ne: &[u64]) -> Shape {
        Shape(ne.iter().rev().map(|&d| Dim::Fixed(d)).collect())
    }

    pub fn dims(&self) -> &[Dim] {
        &self.0
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements in a step of `sizes`; `None` on overflow.
    pub fn elements(&self, sizes: StepSizes) -> Option<u64> {
        self.0
            .iter()
            .try_fold(1u64, |n, d| n.checked_mul(d.size(sizes)))
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// A tensor: storage type and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Shape) -> TensorType {
        TensorType { dtype, shape }
    }

    /// An `F32` activation of shape `[rows, width]`.
    pub fn activation(rows: Dim, width: u64) -> TensorType {
        TensorType::new(GgmlType::F32, Shape::rows(rows, width))
    }

    /// Bytes the tensor takes in a step of `sizes` (quantized types store whole blocks along the
    /// last dimension); `None` if the last dimension is not a whole number of blocks or the size
    /// overflows.
    pub fn bytes(&self, sizes: StepSizes) -> Option<u64> {
        let dims = self.shape.dims();
        let (last, outer) = match dims.split_last() {
            Some((last, outer)) => (last.size(sizes), outer),
            None => (1, &[][..]),
        };
        let rows = Shape(outer.to_vec()).elements(sizes)?;
        self.dtype.row_bytes(last)?.checked_mul(rows)
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}",
            self.dtype.name().to_ascii_lowercase(),
            self.shape
        )
    }
}

/// The KV cache of one layer, as a value: what a `kv_write` produces and `attention` reads. It is
/// state owned by the backend (FP16, one K and one V row of `n_kv_heads * head_dim` per cache
/// cell), never an activation: it takes no arena bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvCacheType {
    pub layer: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
}

impl KvCacheType {
    /// Elements of one K (or V) row: `n_kv_heads * head_dim`.
    pub fn width(&self) -> u64 {
        u64::from(self.n_kv_heads) * u64::from(self.head_dim)
    }

    /// Bytes one token takes in this layer's cache: its K row and its V row, in FP16.
    pub fn bytes_per_token(&self) -> u64 {
        2 * self.width() * KV_DTYPE.type_size()
    }
}

impl fmt::Display for KvCacheType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kv_cache(layer {}, {}x{} f16)",
            self.layer, self.n_kv_heads, self.head_dim
        )
    }
}

/// The type of a value: what one output port of a node produces.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    Tensor(TensorType),
    KvCache(KvCacheType),
}

impl ValueType {
    /// The tensor type, if this is a tensor.
    pub fn tensor(&self) -> Option<&TensorType> {
        match self {
            ValueType::Tensor(t) => Some(t),
            ValueType::KvCache(_) => None,
        }
    }
}

impl From<TensorType> for ValueType {
    fn from(t: TensorType) -> ValueType {
        ValueType::Tensor(t)
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueType::Tensor(t) => t.fmt(f),
            ValueType::KvCache(kv) => kv.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZES: StepSizes = StepSizes {
        tokens: 512,
        outputs: 4,
    };

    #[test]
    fn sizes_count_blocks_and_symbolic_dims() {
        assert_eq!(
            TensorType::activation(Dim::Tokens, 576).bytes(SIZES),
            Some(512 * 576 * 4)
        );
        assert_eq!(
            TensorType::activation(Dim::Outputs, 10).bytes(SIZES),
            Some(4 * 10 * 4)
        );
        let q = TensorType::new(GgmlType::Q4_1, Shape::fixed(&[576, 576]));
        assert_eq!(q.bytes(SIZES), Some(576 * 18 * 20));
        let partial = TensorType::new(GgmlType::Q4_1, Shape::fixed(&[2, 33]));
        assert_eq!(partial.bytes(SIZES), None);
    }

    #[test]
    fn shapes_print_and_serialize_compactly() {
        let t = TensorType::activation(Dim::Tokens, 576);
        assert_eq!(t.to_string(), "f32[T,576]");
        assert_eq!(serde_json::to_string(&t.shape).unwrap(), r#"["T",576]"#);
        let back: Shape = serde_json::from_str(r#"["O",3]"#).unwrap();
        assert_eq!(back, Shape::rows(Dim::Outputs, 3));
        assert_eq!(Shape::from_ggml(&[576, 49152]), Shape::fixed(&[49152, 576]));
    }

    #[test]
    fn kv_bytes_per_token_is_k_and_v_in_f16() {
        let kv = KvCacheType {
            layer: 0,
            n_kv_heads: 3,
            head_dim: 64,
        };
        assert_eq!(kv.bytes_per_token(), 2 * 192 * 2);
    }
}
