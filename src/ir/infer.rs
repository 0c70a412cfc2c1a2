//! Shape inference: the output types of an op, given the types of its inputs. It runs whenever a
//! node is added to a graph and again in the verifier, so a graph can never hold a node whose
//! inputs do not fit its op.

use super::op::{AttentionParams, KvParams, Op, RopeParams};
use super::types::{Dim, KvCacheType, Shape, TensorType, ValueType};
use crate::gguf::GgmlType;

/// The output types of `op` applied to inputs of `types` (one per slot), or why they do not fit.
/// Weights are not inferred: their type comes from their GGUF tensor.
pub fn infer(op: &Op, types: &[&ValueType]) -> Result<Vec<ValueType>, String> {
    let names = op.input_names();
    if types.len() != names.len() {
        return Err(format!(
            "{} takes {} inputs ({}), got {}",
            op.name(),
            names.len(),
            names.join(", "),
            types.len()
        ));
    }
    let ins = Inputs { names, types };
    let tensor = |t: TensorType| vec![ValueType::Tensor(t)];
    Ok(match op {
        Op::TokenIds | Op::Positions => tensor(index_type(Dim::Tokens)),
        Op::OutputRows => tensor(index_type(Dim::Outputs)),
        Op::Weight { tensor } => {
            return Err(format!(
                "weight {tensor}: a weight's type comes from its GGUF tensor"
            ));
        }
        Op::Embedding => {
            let (_vocab, width) = ins.matrix(0)?;
            let rows = ins.indices(1)?;
            tensor(TensorType::activation(rows, width))
        }
        Op::MatMul => tensor(matmul(&ins, 0, 1)?),
        Op::Add | Op::Mul => {
            let (rows, width) = ins.activation(0)?;
            let b = ins.tensor(1)?;
            let same = b == ins.tensor(0)?;
            let bias = b.dtype == GgmlType::F32 && b.shape == Shape::fixed(&[width]);
            if !same && !bias {
                return Err(format!(
                    "input `b`: expected f32{} or a vector f32[{width}], found {b}",
                    Shape::rows(rows, width)
                ));
            }
            tensor(TensorType::activation(rows, width))
        }
        Op::Silu => {
            let (rows, width) = ins.activation(0)?;
            tensor(TensorType::activation(rows, width))
        }
        Op::SwiGlu => tensor(ins.same_activations(0, 1)?),
        Op::RmsNorm { eps } => {
            check_eps(*eps)?;
            tensor(rms_norm(&ins, 0, 1)?)
        }
        Op::Rope(rope) => tensor(rope_type(&ins, rope, 0, 1, 2)?),
        Op::KvWrite(kv) => vec![kv_write(&ins, kv, ins.activation(0)?, 0, 1)?],
        Op::Attention(a) => tensor(attention(&ins, a)?),
        Op::SelectRows => {
            let (_rows, width) = ins.activation(0)?;
            let selected = ins.indices(1)?;
            tensor(TensorType::activation(selected, width))
        }
        Op::MultiMatMul { n } => {
            if *n < 2 {
                return Err(format!("multi_matmul needs at least 2 weights, has {n}"));
            }
            (1..=usize::from(*n))
                .map(|w| matmul(&ins, 0, w).map(ValueType::Tensor))
                .collect::<Result<_, _>>()?
        }
        Op::GateUpSwiGlu => {
            let gate = matmul(&ins, 0, 1)?;
            let up = matmul(&ins, 0, 2)?;
            if gate != up {
                return Err(format!("gate gives {gate} but up gives {up}"));
            }
            tensor(gate)
        }
        Op::AddRmsNorm { eps } => {
            check_eps(*eps)?;
            let sum = ins.same_activations(0, 1)?;
            let normed = rms_norm(&ins, 0, 2)?;
            vec![ValueType::Tensor(sum), ValueType::Tensor(normed)]
        }
        Op::RopeKvWrite { rope, kv } => {
            rope_type(&ins, rope, 0, 2, 3)?;
            vec![kv_write(&ins, kv, ins.activation(0)?, 0, 1)?]
        }
        Op::RopeQkvWrite { rope, kv } => {
            let q_rope = rope_type(&ins, rope, 0, 3, 4)?;
            rope_type(&ins, rope, 1, 3, 4)?;
            vec![
                ValueType::Tensor(q_rope),
                kv_write(&ins, kv, ins.activation(1)?, 1, 2)?,
            ]
        }
    })
}

fn index_type(rows: Dim) -> TensorType {
    TensorType::new(GgmlType::I32, Shape(vec![rows]))
}

fn check_eps(eps: f32) -> Result<(), String> {
    if eps.is_finite() && eps > 0.0 {
        Ok(())
    } else {
        Err(format!("eps must be a positive number, is {eps}"))
    }
}

/// `x [R, K]` (slot `x`) times `w [N, K]` (slot `w`) gives `[R, N]`.
fn matmul(ins: &Inputs<'_>, x: usize, w: usize) -> Result<TensorType, String> {
    let (rows, k) = ins.activation(x)?;
    let (n, wk) = ins.matrix(w)?;
    if wk != k {
        return Err(format!(
            "input `{}` has rows of {wk} elements but `{}` has {k}",
            ins.names[w], ins.names[x]
        ));
    }
    Ok(TensorType::activation(rows, n))
}

fn rms_norm(ins: &Inputs<'_>, x: usize, w: usize) -> Result<TensorType, String> {
    let (rows, width) = ins.activation(x)?;
    let group = ins.vector(w)?;
    if width % group != 0 {
        return Err(format!(
            "input `{}` has {group} elements, which does not divide the row width {width}",
            ins.names[w]
        ));
    }
    Ok(TensorType::activation(rows, width))
}

fn rope_type(
    ins: &Inputs<'_>,
    rope: &RopeParams,
    x: usize,
    pos: usize,
    freq_factors: usize,
) -> Result<TensorType, String> {
    let (rows, width) = ins.activation(x)?;
    let head_dim = u64::from(rope.head_dim);
    if head_dim == 0 || width % head_dim != 0 {
        return Err(format!(
            "input `{}` width {width} is not a whole number of heads of {head_dim}",
            ins.names[x]
        ));
    }
    if rope.n_rot == 0 || !rope.n_rot.is_multiple_of(2) || rope.n_rot > rope.head_dim {
        return Err(format!(
            "n_rot must be even and in 2..={}, is {}",
            rope.head_dim, rope.n_rot
        ));
    }
    if !(rope.freq_base.is_finite() && rope.freq_base > 0.0) {
        return Err(format!("freq_base must be positive, is {}", rope.freq_base));
    }
    if !(rope.freq_scale.is_finite() && rope.freq_scale > 0.0) {
        return Err(format!(
            "freq_scale must be positive, is {}",
            rope.freq_scale
        ));
    }
    let pos_rows = ins.indices(pos)?;
    if pos_rows != rows {
        return Err(format!(
            "input `{}` has {pos_rows} positions for {rows} rows",
            ins.names[pos]
        ));
    }
    if rope.freq_factors {
        let n = ins.vector(freq_factors)?;
        if n != u64::from(rope.n_rot / 2) {
            return Err(format!(
                "input `freq_factors` has {n} elements, expected n_rot/2 = {}",
                rope.n_rot / 2
            ));
        }
    }
    Ok(TensorType::activation(rows, width))
}

fn kv_write(
    ins: &Inputs<'_>,
    kv: &KvParams,
    (rows, width): (Dim, u64),
    k: usize,
    v: usize,
) -> Result<ValueType, String> {
    let cache = KvCacheType {
        layer: kv.layer,
        n_kv_heads: kv.n_kv_heads,
        head_dim: kv.head_dim,
    };
    let expected = TensorType::activation(Dim::Tokens, cache.width());
    if rows != Dim::Tokens || width != cache.width() {
        return Err(format!(
            "input `{}`: expected {expected} ({} kv heads of {}), found {}",
            ins.names[k],
            kv.n_kv_heads,
            kv.head_dim,
            TensorType::activation(rows, width)
        ));
    }
    let vt = ins.tensor(v)?;
    if *vt != expected {
        return Err(format!(
            "input `{}`: expected {expected}, found {vt}",
            ins.names[v]
        ));
    }
    Ok(ValueType::KvCache(cache))
}

fn attention(ins: &Inputs<'_>, a: &AttentionParams) -> Result<TensorType, String> {
    if a.n_kv_heads == 0 || !a.n_heads.is_multiple_of(a.n_kv_heads) {
        return Err(format!(
            "n_heads {} is not a multiple of n_kv_heads {}",
            a.n_heads, a.n_kv_heads
        ));
    }
    if !(a.scale.is_finite() && a.scale > 0.0) {
        return Err(format!("scale must be positive, is {}", a.scale));
    }
    if a.sliding_window == Some(0) {
        return Err("a sliding window must hold at least one position".into());
    }
    let expected =
        TensorType::activation(Dim::Tokens, u64::from(a.n_heads) * u64::from(a.head_dim));
    let q = ins.tensor(0)?;
    if *q != expected {
        return Err(format!(
            "input `q`: expected {expected} ({} heads of {}), found {q}",
            a.n_heads, a.head_dim
        ));
    }
    match ins.types[1] {
        ValueType::KvCache(kv) if kv.n_kv_heads == a.n_kv_heads && kv.head_dim == a.head_dim => {
            Ok(expected)
        }
        other => Err(format!(
            "input `kv`: expected the KV cache of {} heads of {}, found {other}",
            a.n_kv_heads, a.head_dim
        )),
    }
}

/// An op's input types with their slot names, for precise messages.
struct Inputs<'a> {
    names: Vec<String>,
    types: &'a [&'a ValueType],
}

impl Inputs<'_> {
    fn tensor(&self, slot: usize) -> Result<&TensorType, String> {
        self.types[slot].tensor().ok_or_else(|| {
            format!(
                "input `{}`: expected a tensor, found {}",
                self.names[slot], self.types[slot]
            )
        })
    }

    /// An F32 activation `[rows, width]`.
    fn activation(&self, slot: usize) -> Result<(Dim, u64), String> {
        let t = self.tensor(slot)?;
        match (t.dtype, t.shape.dims()) {
            (GgmlType::F32, &[rows, Dim::Fixed(width)]) if width > 0 => Ok((rows, width)),
            _ => Err(format!(
                "input `{}`: expected an f32 activation [rows, width], found {t}",
                self.names[slot]
            )),
        }
    }

    /// An I32 vector of row indices (token ids, positions, rows): its length.
    fn indices(&self, slot: usize) -> Result<Dim, String> {
        let t = self.tensor(slot)?;
        match (t.dtype, t.shape.dims()) {
            (GgmlType::I32, &[rows]) => Ok(rows),
            _ => Err(format!(
                "input `{}`: expected an i32 vector, found {t}",
                self.names[slot]
            )),
        }
    }

    /// A weight matrix `[n, k]` of any storage type, its rows whole blocks of the type.
    fn matrix(&self, slot: usize) -> Result<(u64, u64), String> {
        let t = self.tensor(slot)?;
        match t.shape.dims() {
            &[Dim::Fixed(n), Dim::Fixed(k)] if t.dtype.row_bytes(k).is_some() => Ok((n, k)),
            _ => Err(format!(
                "input `{}`: expected a weight matrix [n, k] with rows of whole blocks, found {t}",
                self.names[slot]
            )),
        }
    }

    /// An F32 weight vector `[n]`.
    fn vector(&self, slot: usize) -> Result<u64, String> {
        let t = self.tensor(slot)?;
        match (t.dtype, t.shape.dims()) {
            (GgmlType::F32, &[Dim::Fixed(n)]) if n > 0 => Ok(n),
            _ => Err(format!(
                "input `{}`: expected an f32 vector, found {t}",
                self.names[slot]
            )),
        }
    }

    /// Two activations of the same shape.
    fn same_activations(&self, a: usize, b: usize) -> Result<TensorType, String> {
        let (rows, width) = self.activation(a)?;
        let at = TensorType::activation(rows, width);
        let bt = self.tensor(b)?;
        if *bt != at {
            return Err(format!(
                "input `{}`: expected {at} like `{}`, found {bt}",
                self.names[b], self.names[a]
            ));
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn act(rows: Dim, w: u64) -> ValueType {
        TensorType::activation(rows, w).into()
    }

    fn weight(ty: GgmlType, dims: &[u64]) -> ValueType {
        TensorType::new(ty, Shape::fixed(dims)).into()
    }

    #[test]
    fn matmul_maps_k_inputs_to_n_outputs() {
        let x = act(Dim::Tokens, 576);
        let w = weight(GgmlType::Q4_1, &[192, 576]);
        assert_eq!(
            infer(&Op::MatMul, &[&x, &w]).unwrap(),
            vec![act(Dim::Tokens, 192)]
        );
        let wrong = weight(GgmlType::Q4_1, &[576, 192]);
        let err = infer(&Op::MatMul, &[&x, &wrong]).unwrap_err();
        assert_eq!(err, "input `w` has rows of 192 elements but `x` has 576");
    }

    #[test]
    fn add_accepts_a_same_shaped_tensor_or_a_bias() {
        let x = act(Dim::Tokens, 8);
        let bias = weight(GgmlType::F32, &[8]);
        assert!(infer(&Op::Add, &[&x, &x]).is_ok());
        assert!(infer(&Op::Add, &[&x, &bias]).is_ok());
        let other = act(Dim::Outputs, 8);
        let err = infer(&Op::Add, &[&x, &other]).unwrap_err();
        assert!(
            err.contains("expected f32[T,8] or a vector f32[8]"),
            "{err}"
        );
    }

    #[test]
    fn rms_norm_groups_must_divide_the_row() {
        let x = act(Dim::Tokens, 12);
        let w4 = weight(GgmlType::F32, &[4]);
        let w5 = weight(GgmlType::F32, &[5]);
        assert!(infer(&Op::RmsNorm { eps: 1e-6 }, &[&x, &w4]).is_ok());
        assert!(infer(&Op::RmsNorm { eps: 1e-6 }, &[&x, &w5]).is_err());
        assert!(infer(&Op::RmsNorm { eps: 0.0 }, &[&x, &w4]).is_err());
    }

    #[test]
    fn attention_checks_heads_against_the_cache() {
        let kv = KvParams {
            layer: 0,
            n_kv_heads: 2,
            head_dim: 4,
        };
        let k = act(Dim::Tokens, 8);
        let cache = infer(&Op::KvWrite(kv), &[&k, &k]).unwrap().remove(0);
        let q = act(Dim::Tokens, 16);
        let params = AttentionParams {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 4,
            scale: 0.5,
            sliding_window: None,
        };
        assert_eq!(
            infer(&Op::Attention(params), &[&q, &cache]).unwrap(),
            vec![act(Dim::Tokens, 16)]
        );
        let bad = AttentionParams {
            n_kv_heads: 1,
            ..params
        };
        let err = infer(&Op::Attention(bad), &[&q, &cache]).unwrap_err();
        assert!(err.contains("input `kv`"), "{err}");
    }

    #[test]
    fn kv_write_needs_one_row_per_token() {
        let kv = KvParams {
            layer: 3,
            n_kv_heads: 2,
            head_dim: 4,
        };
        let outputs = act(Dim::Outputs, 8);
        let err = infer(&Op::KvWrite(kv), &[&outputs, &outputs]).unwrap_err();
        assert!(err.contains("expected f32[T,8]"), "{err}");
    }
}
