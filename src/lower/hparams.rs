//! Hyperparameters: the numbers a lowering needs, read from `<arch>.*` metadata keys with
//! llama.cpp's defaults, and checked to be consistent before any graph is built.

use super::LowerError;
use super::template::Template;
use crate::gguf::GgufFile;
use crate::ir::RopeStyle;
use serde::{Deserialize, Serialize};

/// A model's hyperparameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hyperparams {
    /// `general.architecture`; also the prefix of the keys below.
    pub architecture: String,
    /// `block_count`.
    pub n_layers: u32,
    /// `embedding_length`.
    pub n_embd: u32,
    /// `attention.head_count`.
    pub n_heads: u32,
    /// `attention.head_count_kv` (default: `n_heads`).
    pub n_kv_heads: u32,
    /// `attention.key_length` (default: `n_embd / n_heads`); `attention.value_length` must agree.
    pub head_dim: u32,
    /// `feed_forward_length`.
    pub n_ff: u32,
    /// `vocab_size`, else the length of `tokenizer.ggml.tokens`, else `token_embd`'s rows.
    pub n_vocab: u32,
    /// `context_length`: the longest context the model was trained for.
    pub context_length: u32,
    /// `attention.layer_norm_rms_epsilon`.
    pub rms_eps: f32,
    /// From the family template.
    pub rope_style: RopeStyle,
    /// `rope.dimension_count` (default: `head_dim`).
    pub n_rot: u32,
    /// `rope.freq_base` (default 10000).
    pub rope_freq_base: f32,
    /// `1 / rope.scaling.factor` (or the older `rope.scale_linear`) for linear scaling; 1 for
    /// `rope.scaling.type = "none"` or no factor.
    pub rope_freq_scale: f32,
    /// `attention.scale` (default `1 / sqrt(head_dim)`).
    pub attention_scale: f32,
}

impl Hyperparams {
    /// Width of q: `n_heads * head_dim`.
    pub fn q_dim(&self) -> u64 {
        u64::from(self.n_heads) * u64::from(self.head_dim)
    }

    /// Width of k and v: `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> u64 {
        u64::from(self.n_kv_heads) * u64::from(self.head_dim)
    }

    /// Reads and checks the hyperparameters of `file`, whose architecture `template` lowers.
    pub fn read(file: &GgufFile, template: &Template) -> Result<Hyperparams, LowerError> {
        let arch = file.architecture().unwrap_or_default().to_string();
        let keys = Keys { file, arch: &arch };

        let n_layers = keys.count("block_count")?;
        let n_embd = keys.count("embedding_length")?;
        let n_heads = keys.count("attention.head_count")?;
        let n_kv_heads = keys
            .optional_count("attention.head_count_kv")?
            .unwrap_or(n_heads);
        if n_heads % n_kv_heads != 0 {
            return Err(keys.bad(
                "attention.head_count_kv",
                n_kv_heads,
                format!("must divide attention.head_count = {n_heads}"),
            ));
        }
        let head_dim = match keys.optional_count("attention.key_length")? {
            Some(d) => d,
            None if n_embd % n_heads == 0 => n_embd / n_heads,
            None => {
                return Err(keys.bad(
                    "attention.head_count",
                    n_heads,
                    format!("does not divide embedding_length = {n_embd} and attention.key_length is absent"),
                ));
            }
        };
        if let Some(v) = keys.optional_count("attention.value_length")?
            && v != head_dim
        {
            return Err(keys.bad(
                "attention.value_length",
                v,
                format!(
                    "differs from the key length {head_dim}; m40-llm needs equal K and V heads"
                ),
            ));
        }
        let n_ff = keys.count("feed_forward_length")?;
        let context_length = keys.count("context_length")?;
        let rms_eps = keys.positive_f32("attention.layer_norm_rms_epsilon")?;

        let n_rot = keys
            .optional_count("rope.dimension_count")?
            .unwrap_or(head_dim);
        if n_rot % 2 != 0 || n_rot > head_dim {
            return Err(keys.bad(
                "rope.dimension_count",
                n_rot,
                format!("must be even and at most the head size {head_dim}"),
            ));
        }
        let rope_freq_base = keys
            .optional_positive_f32("rope.freq_base")?
            .unwrap_or(10_000.0);
        let rope_freq_scale = rope_freq_scale(&keys)?;
        let attention_scale = keys
            .optional_positive_f32("attention.scale")?
            .unwrap_or(1.0 / (head_dim as f32).sqrt());
        let n_vocab = n_vocab(&keys)?;

        Ok(Hyperparams {
            architecture: arch.clone(),
            n_layers,
            n_embd,
            n_heads,
            n_kv_heads,
            head_dim,
            n_ff,
            n_vocab,
            context_length,
            rms_eps,
            rope_style: template.rope.style,
            n_rot,
            rope_freq_base,
            rope_freq_scale,
            attention_scale,
        })
    }
}

/// llama.cpp's rule: linear scaling (the default type) by `1 / factor`; type `none` never
/// scales; other types (yarn, longrope) change the rope math itself and are not supported.
fn rope_freq_scale(keys: &Keys<'_>) -> Result<f32, LowerError> {
    let ty = keys.file.optional_str(&keys.key("rope.scaling.type"))?;
    let factor = match keys.optional_positive_f32("rope.scaling.factor")? {
        Some(f) => Some(f),
        None => keys.optional_positive_f32("rope.scale_linear")?,
    };
    match ty.unwrap_or("linear") {
        "none" => Ok(1.0),
        "linear" => Ok(factor.map_or(1.0, |f| 1.0 / f)),
        other => Err(keys.bad(
            "rope.scaling.type",
            other,
            "is not supported (m40-llm supports none and linear)".into(),
        )),
    }
}

fn n_vocab(keys: &Keys<'_>) -> Result<u32, LowerError> {
    if let Some(n) = keys.optional_count("vocab_size")? {
        return Ok(n);
    }
    let n = match keys.file.optional_array("tokenizer.ggml.tokens")? {
        Some(tokens) => tokens.len() as u64,
        None => keys
            .file
            .tensor("token_embd.weight")
            .map_or(0, |t| t.n_rows()),
    };
    u32::try_from(n).ok().filter(|&n| n > 0).ok_or_else(|| keys.bad(
        "vocab_size",
        n,
        "is missing or out of range, and neither tokenizer.ggml.tokens nor token_embd.weight gives it".into(),
    ))
}

/// Typed access to `<arch>.<name>` keys with hyperparameter-specific errors.
struct Keys<'a> {
    file: &'a GgufFile,
    arch: &'a str,
}

impl Keys<'_> {
    fn key(&self, name: &str) -> String {
        format!("{}.{name}", self.arch)
    }

    fn bad(&self, name: &str, value: impl ToString, reason: String) -> LowerError {
        LowerError::Hyperparameter {
            path: self.file.path().to_path_buf(),
            key: self.key(name),
            value: value.to_string(),
            reason,
        }
    }

    /// A required count: an integer in `1..=u32::MAX`.
    fn count(&self, name: &str) -> Result<u32, LowerError> {
        let v = self.file.require_u64(&self.key(name))?;
        self.check_count(name, v)
    }

    fn optional_count(&self, name: &str) -> Result<Option<u32>, LowerError> {
        match self.file.optional_u64(&self.key(name))? {
            Some(v) => self.check_count(name, v).map(Some),
            None => Ok(None),
        }
    }

    fn check_count(&self, name: &str, v: u64) -> Result<u32, LowerError> {
        u32::try_from(v)
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| self.bad(name, v, format!("must be between 1 and {}", u32::MAX)))
    }

    fn positive_f32(&self, name: &str) -> Result<f32, LowerError> {
        let v = self.file.require_f64(&self.key(name))?;
        self.check_positive(name, v)
    }

    fn optional_positive_f32(&self, name: &str) -> Result<Option<f32>, LowerError> {
        match self.file.optional_f64(&self.key(name))? {
            Some(v) => self.check_positive(name, v).map(Some),
            None => Ok(None),
        }
    }

    fn check_positive(&self, name: &str, v: f64) -> Result<f32, LowerError> {
        let f = v as f32;
        if f.is_finite() && f > 0.0 {
            Ok(f)
        } else {
            Err(self.bad(name, v, "must be a positive number".into()))
        }
    }
}
