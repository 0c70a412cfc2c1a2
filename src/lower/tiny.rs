//! Tiny models: GGUF files of any supported family with small dimensions and deterministic
//! weights, for tests, benches and later issues (backend parity, runtime tests). The same
//! [`TinyModel`] always writes the same bytes.
//!
//! Weights are drawn from a ChaCha8 stream seeded by the model's seed and the tensor's name, so
//! changing one tensor's shape does not change the others. Matrices are uniform in
//! `±1/sqrt(fan_in)` (activations keep a sane scale through the layers), norm weights near 1,
//! biases small. Matmul and embedding weights use `weight_type`; vectors stay F32 as llama.cpp
//! keeps them. Weights of any type the reference quantizers write (F32, F16, BF16, Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) are encoded with them; k-quants need rows of 256.

use crate::gguf::quants::{self, QuantError};
use crate::gguf::{GgmlType, GgufFile, GgufWriter};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use std::path::Path;

/// A small model of one family; the fields are the hyperparameters written into the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyModel {
    /// `general.architecture`: `llama`, `qwen2` or `qwen3`.
    pub architecture: String,
    pub n_layers: u32,
    pub n_embd: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    /// Written as `attention.key_length` when it differs from `n_embd / n_heads`.
    pub head_dim: u32,
    pub n_ff: u32,
    pub n_vocab: u32,
    pub context_length: u32,
    /// No `output.weight`: the logits use `token_embd`.
    pub tied_embeddings: bool,
    /// q, k and v projection biases (qwen2).
    pub qkv_bias: bool,
    /// Per-head q and k RMS norms (qwen3).
    pub qk_norm: bool,
    /// A `rope_freqs.weight` tensor (llama 3).
    pub rope_freqs: bool,
    pub rope_freq_base: f32,
    pub rms_eps: f32,
    /// Storage type of matmul and embedding weights.
    pub weight_type: GgmlType,
    pub seed: u64,
}

/// Why a tiny model cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum TinyModelError {
    #[error("the tiny-model writer cannot encode {0} weights")]
    UnsupportedType(GgmlType),
    #[error("rows of {row_len} elements are not a whole number of {ty} blocks")]
    PartialBlock { ty: GgmlType, row_len: u64 },
    #[error("writing the tiny model: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error(transparent)]
    Quant(#[from] QuantError),
}

impl TinyModel {
    /// Two llama blocks: 64 features, 4 heads sharing 2 KV heads of 16, an untied output.
    pub fn llama() -> TinyModel {
        TinyModel {
            architecture: "llama".into(),
            n_layers: 2,
            n_embd: 64,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            n_ff: 96,
            n_vocab: 100,
            context_length: 256,
            tied_embeddings: false,
            qkv_bias: false,
            qk_norm: false,
            rope_freqs: false,
            rope_freq_base: 10_000.0,
            rms_eps: 1e-5,
            weight_type: GgmlType::F32,
            seed: 40,
        }
    }

    /// [`TinyModel::llama`] with heads of 32 (the CUDA attention kernels' granularity): 128
    /// features, 4 heads sharing 2 KV heads of 32.
    pub fn llama32() -> TinyModel {
        TinyModel {
            n_embd: 128,
            head_dim: 32,
            n_ff: 192,
            ..TinyModel::llama()
        }
    }

    /// Two qwen2 blocks: q/k/v biases, NeoX rope, tied embeddings.
    pub fn qwen2() -> TinyModel {
        TinyModel {
            architecture: "qwen2".into(),
            tied_embeddings: true,
            qkv_bias: true,
            rope_freq_base: 1_000_000.0,
            rms_eps: 1e-6,
            ..TinyModel::llama()
        }
    }

    /// Two qwen3 blocks: per-head q/k norms, heads of 32 (wider than `n_embd / n_heads`), tied.
    pub fn qwen3() -> TinyModel {
        TinyModel {
            architecture: "qwen3".into(),
            head_dim: 32,
            tied_embeddings: true,
            qk_norm: true,
            rope_freq_base: 1_000_000.0,
            rms_eps: 1e-6,
            ..TinyModel::llama()
        }
    }

    pub fn with_weight_type(mut self, ty: GgmlType) -> TinyModel {
        self.weight_type = ty;
        self
    }

    pub fn with_tied_embeddings(mut self, tied: bool) -> TinyModel {
        self.tied_embeddings = tied;
        self
    }

    pub fn with_layers(mut self, n_layers: u32) -> TinyModel {
        self.n_layers = n_layers;
        self
    }

    /// A short name for files and snapshots: `llama-f16-tied`.
    pub fn label(&self) -> String {
        let tied = if self.tied_embeddings {
            "tied"
        } else {
            "untied"
        };
        format!(
            "{}-{}-{tied}",
            self.architecture,
            self.weight_type.name().to_ascii_lowercase()
        )
    }

    /// The model as a GGUF writer (add keys to it to build broken variants).
    pub fn to_writer(&self) -> Result<GgufWriter, TinyModelError> {
        Ok(self.tensors()?.into_iter().fold(self.metadata(), |w, t| {
            w.tensor(t.name, t.ty, &t.ne, t.data)
        }))
    }

    /// A writer holding the model's metadata and no tensors.
    pub fn metadata(&self) -> GgufWriter {
        let a = self.architecture.as_str();
        let mut w = GgufWriter::new()
            .kv_str("general.architecture", a)
            .kv_str("general.name", format!("tiny-{}", self.label()))
            .kv_u32(format!("{a}.block_count"), self.n_layers)
            .kv_u32(format!("{a}.context_length"), self.context_length)
            .kv_u32(format!("{a}.embedding_length"), self.n_embd)
            .kv_u32(format!("{a}.feed_forward_length"), self.n_ff)
            .kv_u32(format!("{a}.attention.head_count"), self.n_heads)
            .kv_u32(format!("{a}.attention.head_count_kv"), self.n_kv_heads)
            .kv_u32(format!("{a}.rope.dimension_count"), self.head_dim)
            .kv_f32(format!("{a}.rope.freq_base"), self.rope_freq_base)
            .kv_f32(
                format!("{a}.attention.layer_norm_rms_epsilon"),
                self.rms_eps,
            )
            .kv_u32(format!("{a}.vocab_size"), self.n_vocab);
        if self.head_dim * self.n_heads != self.n_embd {
            w = w
                .kv_u32(format!("{a}.attention.key_length"), self.head_dim)
                .kv_u32(format!("{a}.attention.value_length"), self.head_dim);
        }
        w
    }

    /// The model's tensors, in file order (edit them to build broken variants).
    pub fn tensors(&self) -> Result<Vec<TinyTensor>, TinyModelError> {
        let (embd, ff, vocab) = (
            u64::from(self.n_embd),
            u64::from(self.n_ff),
            u64::from(self.n_vocab),
        );
        let head = u64::from(self.head_dim);
        let q_dim = u64::from(self.n_heads) * head;
        let kv_dim = u64::from(self.n_kv_heads) * head;
        let mut t = vec![self.matrix("token_embd.weight", embd, vocab, 1.0)?];
        if self.rope_freqs {
            let factors: Vec<f32> = (0..head / 2).map(|i| 1.0 + (i % 4) as f32).collect();
            t.push(TinyTensor::f32("rope_freqs.weight", &[head / 2], &factors));
        }
        for l in 0..self.n_layers {
            let name = |s: &str| format!("blk.{l}.{s}");
            t.push(self.norm(&name("attn_norm.weight"), embd));
            t.push(self.matrix(&name("attn_q.weight"), embd, q_dim, 0.0)?);
            t.push(self.matrix(&name("attn_k.weight"), embd, kv_dim, 0.0)?);
            t.push(self.matrix(&name("attn_v.weight"), embd, kv_dim, 0.0)?);
            if self.qkv_bias {
                t.push(self.bias(&name("attn_q.bias"), q_dim));
                t.push(self.bias(&name("attn_k.bias"), kv_dim));
                t.push(self.bias(&name("attn_v.bias"), kv_dim));
            }
            if self.qk_norm {
                t.push(self.norm(&name("attn_q_norm.weight"), head));
                t.push(self.norm(&name("attn_k_norm.weight"), head));
            }
            t.push(self.matrix(&name("attn_output.weight"), q_dim, embd, 0.0)?);
            t.push(self.norm(&name("ffn_norm.weight"), embd));
            t.push(self.matrix(&name("ffn_gate.weight"), embd, ff, 0.0)?);
            t.push(self.matrix(&name("ffn_up.weight"), embd, ff, 0.0)?);
            t.push(self.matrix(&name("ffn_down.weight"), ff, embd, 0.0)?);
        }
        t.push(self.norm("output_norm.weight", embd));
        if !self.tied_embeddings {
            t.push(self.matrix("output.weight", embd, vocab, 0.0)?);
        }
        Ok(t)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, TinyModelError> {
        Ok(self.to_writer()?.to_bytes())
    }

    /// Writes the model to `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), TinyModelError> {
        Ok(self.to_writer()?.write_to(path)?)
    }

    /// The model opened from memory, named `tiny/<label>.gguf` in errors.
    pub fn open(&self) -> Result<GgufFile, TinyModelError> {
        let name = format!("tiny/{}.gguf", self.label());
        Ok(GgufFile::from_bytes(name, self.to_bytes()?)?)
    }

    /// A `[n, k]` matrix (ggml `ne = [k, n]`) in `weight_type`, uniform in `±scale`, where
    /// `scale = 1/sqrt(k)` unless given.
    fn matrix(&self, name: &str, k: u64, n: u64, scale: f32) -> Result<TinyTensor, TinyModelError> {
        let scale = if scale > 0.0 {
            scale
        } else {
            1.0 / (k as f32).sqrt()
        };
        let values: Vec<f32> = self.uniform(name, k * n).map(|u| u * scale).collect();
        Ok(TinyTensor {
            name: name.to_string(),
            ty: self.weight_type,
            ne: vec![k, n],
            data: encode(self.weight_type, &values, k)?,
        })
    }

    /// A norm weight near 1.
    fn norm(&self, name: &str, n: u64) -> TinyTensor {
        let values: Vec<f32> = self.uniform(name, n).map(|u| 1.0 + 0.1 * u).collect();
        TinyTensor::f32(name, &[n], &values)
    }

    /// A small bias.
    fn bias(&self, name: &str, n: u64) -> TinyTensor {
        let values: Vec<f32> = self.uniform(name, n).map(|u| 0.1 * u).collect();
        TinyTensor::f32(name, &[n], &values)
    }

    /// `n` values uniform in `[-1, 1)`, from a stream seeded by the model seed and `name`.
    fn uniform(&self, name: &str, n: u64) -> impl Iterator<Item = f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ crate::seed::fnv1a(name));
        (0..n).map(move |_| (rng.next_u32() >> 8) as f32 / (1u32 << 23) as f32 - 1.0)
    }
}

/// One tensor of a tiny model, encoded.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyTensor {
    pub name: String,
    pub ty: GgmlType,
    /// ggml order: `ne[0]` is the row length.
    pub ne: Vec<u64>,
    pub data: Vec<u8>,
}

impl TinyTensor {
    /// An F32 tensor.
    pub fn f32(name: &str, ne: &[u64], values: &[f32]) -> TinyTensor {
        TinyTensor {
            name: name.to_string(),
            ty: GgmlType::F32,
            ne: ne.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// The same values stored as `ty` (F32, F16 or a quantized type).
    pub fn converted(&self, ty: GgmlType) -> Result<TinyTensor, TinyModelError> {
        if self.ty != GgmlType::F32 {
            return Err(TinyModelError::UnsupportedType(self.ty));
        }
        let values: Vec<f32> = self
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let row_len = self.ne.first().copied().unwrap_or(1);
        Ok(TinyTensor {
            ty,
            data: encode(ty, &values, row_len)?,
            ..self.clone()
        })
    }
}

/// Encodes rows of `row_len` values in `ty`'s layout, with the reference quantizers.
fn encode(ty: GgmlType, values: &[f32], row_len: u64) -> Result<Vec<u8>, TinyModelError> {
    if !quants::can_quantize(ty) {
        return Err(TinyModelError::UnsupportedType(ty));
    }
    let row_bytes = ty
        .row_bytes(row_len)
        .ok_or(TinyModelError::PartialBlock { ty, row_len })?;
    let mut out = Vec::with_capacity(row_bytes as usize * values.len() / row_len as usize);
    for row in values.chunks(row_len as usize) {
        out.extend(quants::quantize_row(ty, row)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn the_same_model_writes_the_same_bytes() {
        let a = TinyModel::llama().to_bytes().unwrap();
        let b = TinyModel::llama().to_bytes().unwrap();
        assert_eq!(a, b);
        let other_seed = TinyModel {
            seed: 1,
            ..TinyModel::llama()
        };
        assert_ne!(a, other_seed.to_bytes().unwrap());
    }

    #[test]
    fn each_family_opens_with_its_tensors() {
        let f = TinyModel::qwen3().open().unwrap();
        assert_eq!(f.architecture(), Some("qwen3"));
        assert_eq!(f.require_u64("qwen3.attention.key_length").unwrap(), 32);
        assert_eq!(f.tensor("blk.1.attn_q.weight").unwrap().ne, vec![64, 128]);
        assert!(f.tensor("blk.0.attn_k_norm.weight").is_some());
        assert!(f.tensor("output.weight").is_none());
        let f = TinyModel::qwen2().open().unwrap();
        assert_eq!(f.tensor("blk.0.attn_v.bias").unwrap().ne, vec![32]);
    }

    #[test]
    fn weights_are_small_and_f16_rounds_f32() {
        let f32_model = TinyModel::llama().open().unwrap();
        let f16_model = TinyModel::llama()
            .with_weight_type(GgmlType::F16)
            .open()
            .unwrap();
        let a = f32_model.tensor("blk.0.ffn_up.weight").unwrap();
        let b = f16_model.tensor("blk.0.ffn_up.weight").unwrap();
        assert_eq!(b.ty, GgmlType::F16);
        let x = f32::from_le_bytes(f32_model.tensor_data(a)[..4].try_into().unwrap());
        let y = f16::from_le_bytes(f16_model.tensor_data(b)[..2].try_into().unwrap());
        assert!(x.abs() <= 1.0 / 8.0, "{x}");
        assert_eq!(f16::from_f32(x), y);
    }

    #[test]
    fn quantized_weights_dequantize_close_to_the_f32_ones() {
        let exact = TinyModel::llama().open().unwrap();
        let x =
            quants::dequantize_f32(&exact, exact.tensor("blk.1.attn_q.weight").unwrap()).unwrap();
        for (ty, tolerance) in [
            (GgmlType::Q8_0, 0.002),
            (GgmlType::Q4_1, 0.02),
            (GgmlType::Q4_0, 0.02),
        ] {
            let model = TinyModel::llama().with_weight_type(ty).open().unwrap();
            let t = model.tensor("blk.1.attn_q.weight").unwrap();
            assert_eq!(t.ty, ty);
            let y = quants::dequantize_f32(&model, t).unwrap();
            let worst = x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(worst < tolerance, "{ty}: max error {worst}");
        }
    }

    #[test]
    fn k_quants_need_rows_of_256() {
        let err = TinyModel::llama()
            .with_weight_type(GgmlType::Q4_K)
            .to_bytes()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "rows of 64 elements are not a whole number of Q4_K blocks"
        );
        let wide = TinyModel {
            n_embd: 256,
            n_ff: 256,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            ..TinyModel::llama().with_weight_type(GgmlType::Q6_K)
        };
        let f = wide.open().unwrap();
        assert_eq!(
            f.tensor("blk.0.ffn_down.weight").unwrap().ty,
            GgmlType::Q6_K
        );
        let err = TinyModel::llama()
            .with_weight_type(GgmlType::IQ2_XS)
            .to_bytes()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the tiny-model writer cannot encode IQ2_XS weights"
        );
    }
}
