//! Synthetic models: random-weight GGUF files with the shapes of real models (`m40-llm synth`),
//! so speed can be measured at sizes no test model has.
//!
//! A [`Synth`] names a real model's hyperparameters ([`SynthShape`]), a storage mix
//! ([`SynthType`]) and a seed. Its tensors are declared up front (names, shapes, types), so the
//! header is written first; then each tensor is generated and quantized a bounded chunk of rows
//! at a time (in parallel with rayon) and streamed out through [`GgufStreamWriter`]. Memory use
//! does not depend on the model's size.
//!
//! Weights: every row comes from its own ChaCha8 stream, seeded by the seed, the tensor's name
//! and the row's index, so the bytes do not depend on the thread count. Matrices hold values of
//! a triangular distribution (the sum of two uniforms: normal-ish, bounded) with standard
//! deviation 0.02, norm weights 1 plus the same (within ±0.05), biases likewise: activations stay
//! finite through every layer.
//!
//! Types: `f16`, `q8_0` and `q4_0` store every matrix in that type; `q4_k_m` follows
//! llama.cpp's Q4_K_M mix (see [`SynthType::tensor_type`]). Norms and biases are always F32.

use crate::gguf::quants::{self, QuantError};
use crate::gguf::{Array, GgmlType, GgufFile, GgufWriter, StreamError, TensorDecl, Value};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use rayon::prelude::*;
use std::io::Write;

/// The real models whose shapes `synth` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthShape {
    /// Meta Llama 3 8B.
    #[value(name = "llama3-8b")]
    Llama3_8b,
    /// Meta Llama 2 7B.
    #[value(name = "llama2-7b")]
    Llama2_7b,
    /// Qwen2.5 7B (q/k/v biases).
    #[value(name = "qwen2.5-7b")]
    Qwen25_7b,
    /// Qwen3 8B (per-head q/k norms).
    #[value(name = "qwen3-8b")]
    Qwen3_8b,
    /// SmolLM2 135M (tied embeddings).
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
}

/// A model's hyperparameters, as its published config gives them.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapeParams {
    /// `general.architecture`: `llama`, `qwen2` or `qwen3`.
    pub architecture: &'static str,
    pub n_layers: u32,
    pub n_embd: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub n_ff: u32,
    pub n_vocab: u32,
    pub context_length: u32,
    pub rope_freq_base: f32,
    pub rms_eps: f32,
    pub tied_embeddings: bool,
    pub qkv_bias: bool,
    pub qk_norm: bool,
}

impl SynthShape {
    /// The name on the command line (`llama3-8b`).
    pub fn name(self) -> &'static str {
        match self {
            SynthShape::Llama3_8b => "llama3-8b",
            SynthShape::Llama2_7b => "llama2-7b",
            SynthShape::Qwen25_7b => "qwen2.5-7b",
            SynthShape::Qwen3_8b => "qwen3-8b",
            SynthShape::Smollm2_135m => "smollm2-135m",
        }
    }

    /// The published hyperparameters (the models' Hugging Face `config.json`).
    pub fn params(self) -> ShapeParams {
        let llama = ShapeParams {
            architecture: "llama",
            n_layers: 32,
            n_embd: 4096,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            n_ff: 14336,
            n_vocab: 128_256,
            context_length: 8192,
            rope_freq_base: 500_000.0,
            rms_eps: 1e-5,
            tied_embeddings: false,
            qkv_bias: false,
            qk_norm: false,
        };
        match self {
            SynthShape::Llama3_8b => llama,
            SynthShape::Llama2_7b => ShapeParams {
                n_kv_heads: 32,
                n_ff: 11008,
                n_vocab: 32000,
                context_length: 4096,
                rope_freq_base: 10_000.0,
                ..llama
            },
            SynthShape::Qwen25_7b => ShapeParams {
                architecture: "qwen2",
                n_layers: 28,
                n_embd: 3584,
                n_heads: 28,
                n_kv_heads: 4,
                n_ff: 18944,
                n_vocab: 152_064,
                context_length: 32768,
                rope_freq_base: 1_000_000.0,
                rms_eps: 1e-6,
                qkv_bias: true,
                ..llama
            },
            SynthShape::Qwen3_8b => ShapeParams {
                architecture: "qwen3",
                n_layers: 36,
                n_ff: 12288,
                n_vocab: 151_936,
                context_length: 40960,
                rope_freq_base: 1_000_000.0,
                rms_eps: 1e-6,
                qk_norm: true,
                ..llama
            },
            SynthShape::Smollm2_135m => ShapeParams {
                n_layers: 30,
                n_embd: 576,
                n_heads: 9,
                n_kv_heads: 3,
                head_dim: 64,
                n_ff: 1536,
                n_vocab: 49152,
                context_length: 8192,
                rope_freq_base: 100_000.0,
                tied_embeddings: true,
                ..llama
            },
        }
    }
}

/// How the weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthType {
    #[value(name = "f16")]
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    /// llama.cpp's Q4_K_M mix.
    #[value(name = "q4_k_m")]
    Q4KM,
}

/// The role of a matrix, for the Q4_K_M mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    TokenEmbd,
    Output,
    AttnV,
    FfnDown,
    Other,
}

impl SynthType {
    pub fn name(self) -> &'static str {
        match self {
            SynthType::F16 => "f16",
            SynthType::Q8_0 => "q8_0",
            SynthType::Q4_0 => "q4_0",
            SynthType::Q4KM => "q4_k_m",
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            SynthType::F16 => 1,
            SynthType::Q8_0 => 7,
            SynthType::Q4_0 => 2,
            SynthType::Q4KM => 15,
        }
    }

    /// The type of a matrix whose rows have `row_len` elements, in `layer` of `n_layers`.
    ///
    /// Q4_K_M as llama.cpp's `llama_tensor_get_type` picks it: the output matrix (and the
    /// embedding when it is tied to the output) Q6_K, or Q8_0 when its rows are not whole
    /// 256-blocks; `attn_v` and `ffn_down` Q6_K in the layers `use_more_bits` selects (the first
    /// and last eighth, and every third in between); everything else Q4_K. A k-quant whose rows
    /// are not whole 256-blocks falls back as llama.cpp's `tensor_type_fallback` does: Q4_K to
    /// Q5_0, Q6_K to Q8_0.
    fn matrix_type(
        self,
        role: Role,
        tied: bool,
        layer: u32,
        n_layers: u32,
        row_len: u64,
    ) -> GgmlType {
        let base = match self {
            SynthType::F16 => return GgmlType::F16,
            SynthType::Q8_0 => return GgmlType::Q8_0,
            SynthType::Q4_0 => return GgmlType::Q4_0,
            SynthType::Q4KM => GgmlType::Q4_K,
        };
        let whole = row_len.is_multiple_of(256);
        let ty = match role {
            Role::Output => {
                return if whole {
                    GgmlType::Q6_K
                } else {
                    GgmlType::Q8_0
                };
            }
            Role::TokenEmbd if tied => {
                return if whole {
                    GgmlType::Q6_K
                } else {
                    GgmlType::Q8_0
                };
            }
            Role::AttnV | Role::FfnDown if use_more_bits(layer, n_layers) => GgmlType::Q6_K,
            _ => base,
        };
        match ty {
            GgmlType::Q4_K if !whole => GgmlType::Q5_0,
            GgmlType::Q6_K if !whole => GgmlType::Q8_0,
            ty => ty,
        }
    }
}

/// llama.cpp's choice of the layers that get more bits in Q4_K_M.
fn use_more_bits(layer: u32, n_layers: u32) -> bool {
    let (i, n) = (i64::from(layer), i64::from(n_layers));
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Centred values of this standard deviation.
    Random { std: f32 },
    /// `1 + ` centred values of this standard deviation (norm weights).
    One { std: f32 },
}

/// One tensor of a synthetic model: what the header says, and how its values are drawn.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthTensor {
    pub decl: TensorDecl,
    pub init: Init,
}

/// Why a synthetic model cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("--layers must be at least 1")]
    NoLayers,
    #[error(
        "the vocabulary {path} has {tokens} tokens, more than the {vocab} of the {shape} shape: choose a smaller vocabulary"
    )]
    VocabTooLarge {
        path: String,
        tokens: usize,
        vocab: u32,
        shape: &'static str,
    },
    #[error("the vocabulary {path} has no tokenizer.ggml.tokens")]
    NoTokens { path: String },
    #[error("the vocabulary {path}: {key} has {found} entries for {tokens} tokens")]
    VocabArray {
        path: String,
        key: String,
        found: usize,
        tokens: usize,
    },
    #[error("interrupted: the partial file was removed")]
    Interrupted,
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// A synthetic model: a real shape, a storage mix and a seed.
#[derive(Clone, Debug, PartialEq)]
pub struct Synth {
    pub shape: SynthShape,
    pub params: ShapeParams,
    pub ty: SynthType,
    pub seed: u64,
}

/// Elements generated per chunk (rows are whole): bounds memory to a few MiB per chunk.
const CHUNK_ELEMENTS: u64 = 1 << 21;

/// Standard deviation of matrix weights and biases.
const WEIGHT_STD: f32 = 0.02;

impl Synth {
    /// The model of `shape` in `ty` with `seed`; `layers` overrides the layer count.
    pub fn new(
        shape: SynthShape,
        ty: SynthType,
        seed: u64,
        layers: Option<u32>,
    ) -> Result<Synth, SynthError> {
        let mut params = shape.params();
        if let Some(n) = layers {
            if n == 0 {
                return Err(SynthError::NoLayers);
            }
            params.n_layers = n;
        }
        Ok(Synth {
            shape,
            params,
            ty,
            seed,
        })
    }

    /// The tensors in file order, with the types of the mix.
    pub fn tensors(&self) -> Vec<SynthTensor> {
        let p = &self.params;
        let (embd, ff, vocab) = (u64::from(p.n_embd), u64::from(p.n_ff), u64::from(p.n_vocab));
        let head = u64::from(p.head_dim);
        let q_dim = u64::from(p.n_heads) * head;
        let kv_dim = u64::from(p.n_kv_heads) * head;
        let n_layers = p.n_layers;
        let matrix = |name: String, role: Role, layer: u32, k: u64, n: u64| SynthTensor {
            decl: TensorDecl {
                name,
                ty: self
                    .ty
                    .matrix_type(role, p.tied_embeddings, layer, n_layers, k),
                ne: vec![k, n],
            },
            init: Init::Random { std: WEIGHT_STD },
        };
        let vector = |name: String, n: u64, init: Init| SynthTensor {
            decl: TensorDecl {
                name,
                ty: GgmlType::F32,
                ne: vec![n],
            },
            init,
        };
        let norm = Init::One { std: WEIGHT_STD };
        let bias = Init::Random { std: WEIGHT_STD };
        let mut t = vec![matrix(
            "token_embd.weight".into(),
            Role::TokenEmbd,
            0,
            embd,
            vocab,
        )];
        for l in 0..n_layers {
            let name = |s: &str| format!("blk.{l}.{s}");
            t.push(vector(name("attn_norm.weight"), embd, norm));
            t.push(matrix(name("attn_q.weight"), Role::Other, l, embd, q_dim));
            t.push(matrix(name("attn_k.weight"), Role::Other, l, embd, kv_dim));
            t.push(matrix(name("attn_v.weight"), Role::AttnV, l, embd, kv_dim));
            if p.qkv_bias {
                t.push(vector(name("attn_q.bias"), q_dim, bias));
                t.push(vector(name("attn_k.bias"), kv_dim, bias));
                t.push(vector(name("attn_v.bias"), kv_dim, bias));
            }
            if p.qk_norm {
                t.push(vector(name("attn_q_norm.weight"), head, norm));
                t.push(vector(name("attn_k_norm.weight"), head, norm));
            }
            t.push(matrix(
                name("attn_output.weight"),
                Role::Other,
                l,
                q_dim,
                embd,
            ));
            t.push(vector(name("ffn_norm.weight"), embd, norm));
            t.push(matrix(name("ffn_gate.weight"), Role::Other, l, embd, ff));
            t.push(matrix(name("ffn_up.weight"), Role::Other, l, embd, ff));
            t.push(matrix(name("ffn_down.weight"), Role::FfnDown, l, ff, embd));
        }
        t.push(vector("output_norm.weight".into(), embd, norm));
        if !p.tied_embeddings {
            t.push(matrix("output.weight".into(), Role::Output, 0, embd, vocab));
        }
        t
    }

    /// The file's metadata: the shape's hyperparameters, and the tokenizer (every
    /// `tokenizer.*` key) of `vocab`. A vocabulary smaller than the shape's is padded with
    /// unused tokens `<unused_N>` (type UNUSED, score 0) up to the shape's size, and
    /// `m40llm.synth.padded_tokens` says how many; the original count is in
    /// `m40llm.synth.vocab_tokens`.
    pub fn metadata(&self, vocab: &GgufFile) -> Result<GgufWriter, SynthError> {
        let p = &self.params;
        let a = p.architecture;
        let path = vocab.path().display().to_string();
        let tokens = match vocab.optional_array("tokenizer.ggml.tokens")? {
            Some(Array::String(t)) => t,
            _ => return Err(SynthError::NoTokens { path }),
        };
        let n_tokens = tokens.len();
        let n_vocab = p.n_vocab as usize;
        if n_tokens > n_vocab {
            return Err(SynthError::VocabTooLarge {
                path,
                tokens: n_tokens,
                vocab: p.n_vocab,
                shape: self.shape.name(),
            });
        }
        let pad = n_vocab - n_tokens;
        let mut w = GgufWriter::new()
            .kv_str("general.architecture", a)
            .kv_str(
                "general.name",
                format!("synthetic {} {}", self.shape.name(), self.ty.name()),
            )
            .kv_u32("general.file_type", self.ty.file_type())
            .kv_u32(format!("{a}.block_count"), p.n_layers)
            .kv_u32(format!("{a}.context_length"), p.context_length)
            .kv_u32(format!("{a}.embedding_length"), p.n_embd)
            .kv_u32(format!("{a}.feed_forward_length"), p.n_ff)
            .kv_u32(format!("{a}.attention.head_count"), p.n_heads)
            .kv_u32(format!("{a}.attention.head_count_kv"), p.n_kv_heads)
            .kv_u32(format!("{a}.rope.dimension_count"), p.head_dim)
            .kv_f32(format!("{a}.rope.freq_base"), p.rope_freq_base)
            .kv_f32(format!("{a}.attention.layer_norm_rms_epsilon"), p.rms_eps)
            .kv_u32(format!("{a}.vocab_size"), p.n_vocab);
        if p.head_dim * p.n_heads != p.n_embd {
            w = w
                .kv_u32(format!("{a}.attention.key_length"), p.head_dim)
                .kv_u32(format!("{a}.attention.value_length"), p.head_dim);
        }
        w = w
            .kv_str("m40llm.synth.shape", self.shape.name())
            .kv_str("m40llm.synth.type", self.ty.name())
            .kv("m40llm.synth.seed", Value::U64(self.seed))
            .kv_str("m40llm.synth.vocab", vocab_name(vocab))
            .kv("m40llm.synth.vocab_tokens", Value::U64(n_tokens as u64))
            .kv("m40llm.synth.padded_tokens", Value::U64(pad as u64));
        for (key, value) in vocab.metadata() {
            if !key.starts_with("tokenizer.") {
                continue;
            }
            let value = match (key.as_str(), value) {
                ("tokenizer.ggml.tokens", _) => {
                    let mut t = tokens.clone();
                    t.extend((n_tokens..n_vocab).map(|i| format!("<unused_{i}>")));
                    Value::Array(Array::String(t))
                }
                ("tokenizer.ggml.token_type", Value::Array(arr)) => {
                    let mut v = per_token(&path, key, arr.to_i64_vec(), n_tokens)?;
                    v.resize(n_vocab, 5);
                    Value::Array(Array::I32(v.into_iter().map(|x| x as i32).collect()))
                }
                ("tokenizer.ggml.scores", Value::Array(arr)) => {
                    let mut v = per_token(&path, key, arr.to_f32_vec(), n_tokens)?;
                    v.resize(n_vocab, 0.0);
                    Value::Array(Array::F32(v))
                }
                _ => value.clone(),
            };
            w = w.kv(key.clone(), value);
        }
        if pad > 0 && vocab.get("tokenizer.ggml.token_type").is_none() {
            let mut v = vec![1i32; n_tokens];
            v.resize(n_vocab, 5);
            w = w.kv("tokenizer.ggml.token_type", Value::Array(Array::I32(v)));
        }
        Ok(w)
    }

    /// Writes the model with the header `metadata` to `out`: the header first, then each
    /// tensor generated a chunk of rows at a time. `progress` gets the bytes written so far
    /// after each chunk; `cancelled` is asked between chunks and stops the writing.
    pub fn write<W: Write>(
        &self,
        metadata: &GgufWriter,
        out: W,
        progress: &mut dyn FnMut(u64),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<W, SynthError> {
        let tensors = self.tensors();
        let mut stream = metadata.stream(out, tensors.iter().map(|t| t.decl.clone()).collect())?;
        let mut done = stream.data_start();
        progress(done);
        let mut buf = Vec::new();
        for t in &tensors {
            let row_len = t.decl.ne.first().copied().unwrap_or(1);
            let n_rows: u64 = t.decl.ne.iter().skip(1).product();
            let row_bytes =
                t.decl
                    .ty
                    .row_bytes(row_len)
                    .ok_or_else(|| StreamError::PartialBlock {
                        tensor: t.decl.name.clone(),
                        ty: t.decl.ty,
                        ne: t.decl.ne.clone(),
                    })? as usize;
            let rows_per_chunk = (CHUNK_ELEMENTS / row_len.max(1)).max(1);
            let name_hash = crate::seed::fnv1a(&t.decl.name);
            let mut row = 0u64;
            while row < n_rows {
                if cancelled() {
                    return Err(SynthError::Interrupted);
                }
                let rows = rows_per_chunk.min(n_rows - row);
                buf.resize(rows as usize * row_bytes, 0);
                buf.par_chunks_mut(row_bytes)
                    .enumerate()
                    .try_for_each_init(
                        || vec![0f32; row_len as usize],
                        |values, (i, dst)| {
                            let seed = self.seed
                                ^ name_hash
                                ^ (row + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                            fill(values, seed, t.init);
                            quants::quantize_row_into(t.decl.ty, values, dst)
                        },
                    )?;
                stream.write_data(&buf)?;
                done += buf.len() as u64;
                progress(done);
                row += rows;
            }
        }
        let file_bytes = stream.file_bytes();
        let out = stream.finish()?;
        progress(file_bytes);
        Ok(out)
    }

    /// The size of the file [`write`](Self::write) produces with `metadata`.
    pub fn file_bytes(&self, metadata: &GgufWriter) -> Result<u64, SynthError> {
        let decls = self.tensors().into_iter().map(|t| t.decl).collect();
        Ok(metadata.stream(std::io::sink(), decls)?.file_bytes())
    }
}

/// The file name of a vocabulary, for the metadata.
fn vocab_name(vocab: &GgufFile) -> String {
    vocab
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The first `n` entries of a per-token array, which must have at least `n`.
fn per_token<T>(path: &str, key: &str, v: Option<Vec<T>>, n: usize) -> Result<Vec<T>, SynthError> {
    let mut v = v.unwrap_or_default();
    if v.len() < n {
        return Err(SynthError::VocabArray {
            path: path.into(),
            key: key.into(),
            found: v.len(),
            tokens: n,
        });
    }
    v.truncate(n);
    Ok(v)
}

/// Fills `values` from a ChaCha8 stream seeded with `seed`: the sum of two uniforms in
/// `[-0.5, 0.5)` (triangular, standard deviation `1/sqrt(6)`), scaled to `init`.
fn fill(values: &mut [f32], seed: u64, init: Init) {
    const SQRT6: f32 = 2.449_489_8;
    let (offset, std) = match init {
        Init::Random { std } => (0.0, std),
        Init::One { std } => (1.0, std),
    };
    let scale = std * SQRT6 / 65536.0;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for v in values.iter_mut() {
        let r = rng.next_u32();
        let sum = (r & 0xffff) as f32 + (r >> 16) as f32 - 65535.0;
        *v = offset + sum * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_follows_llama_cpps_layer_choice() {
        // llama.cpp's use_more_bits on 32 layers: 0..4, 28..32, and 4 + 3k + 2.
        let more: Vec<u32> = (0..32).filter(|&l| use_more_bits(l, 32)).collect();
        assert_eq!(
            more,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        let s = Synth::new(SynthShape::Llama3_8b, SynthType::Q4KM, 0, None).unwrap();
        let ty = |name: &str| {
            s.tensors()
                .into_iter()
                .find(|t| t.decl.name == name)
                .unwrap()
                .decl
                .ty
        };
        assert_eq!(ty("output.weight"), GgmlType::Q6_K);
        assert_eq!(ty("token_embd.weight"), GgmlType::Q4_K);
        assert_eq!(ty("blk.0.attn_v.weight"), GgmlType::Q6_K);
        assert_eq!(ty("blk.4.attn_v.weight"), GgmlType::Q4_K);
        assert_eq!(ty("blk.6.ffn_down.weight"), GgmlType::Q6_K);
        assert_eq!(ty("blk.7.ffn_down.weight"), GgmlType::Q4_K);
        assert_eq!(ty("blk.6.attn_q.weight"), GgmlType::Q4_K);
        assert_eq!(ty("blk.6.attn_norm.weight"), GgmlType::F32);
    }

    #[test]
    fn values_have_the_asked_scale() {
        let mut v = vec![0f32; 100_000];
        fill(&mut v, 7, Init::Random { std: 0.02 });
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 1e-3, "{mean}");
        assert!((var.sqrt() - 0.02).abs() < 5e-4, "{}", var.sqrt());
        fill(&mut v, 7, Init::One { std: 0.02 });
        assert!(v.iter().all(|x| (x - 1.0).abs() < 0.05));
    }
}
