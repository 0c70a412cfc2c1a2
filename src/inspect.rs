//! What a GGUF file holds, summarised for people (`m40-llm inspect`) and tools (`--json`).
//!
//! [`ModelSummary::from_gguf`] reads the metadata every transformer architecture in llama.cpp's
//! naming scheme shares (`{arch}.block_count`, `{arch}.embedding_length`, ...) and checks it: a
//! model file (one with tensors) that lacks or mistypes a key every architecture needs is an
//! error naming the key. Vocabulary-only files (no tensors) need none of them. Architecture-
//! specific checks (which tensors a llama needs, their shapes) belong to lowering, not here;
//! where a lowering family exists, the hyperparameters shown are the ones its reader
//! ([`Hyperparams`]) gives, defaults included.

use crate::gguf::{Array, GgmlType, GgufError, GgufFile, Value, file_type_name};
use crate::lower::{Hyperparams, Template};
use crate::units::human_bytes;
use serde::Serialize;
use std::fmt;

/// Architectures whose blocks are recurrent (no attention), so `{arch}.attention.head_count` is
/// not required of them.
const RECURRENT_ARCHITECTURES: &[&str] =
    &["mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"];

/// Everything `m40-llm inspect` shows.
#[derive(Clone, Debug, Serialize)]
pub struct ModelSummary {
    pub path: String,
    pub gguf_version: u32,
    pub file_bytes: u64,
    /// Alignment of the data section and where it starts.
    pub alignment: u64,
    pub data_offset: u64,
    /// `general.architecture` (required of model files).
    pub architecture: Option<String>,
    /// `general.name`.
    pub name: Option<String>,
    /// The number of weights: the sum of all tensors' element counts.
    pub parameter_count: u64,
    /// The bytes all tensors take in the file.
    pub tensor_bytes: u64,
    /// `general.file_type`, the dominant weight type as the converter named it.
    pub file_type: Option<FileType>,
    /// How many tensors (and bytes) of each ggml type the file holds, most tensors first.
    pub tensor_types: Vec<TensorTypeCount>,
    pub hyperparameters: Hyperparameters,
    /// Present when the file has `tokenizer.ggml.*` keys.
    pub tokenizer: Option<TokenizerSummary>,
    /// Every metadata key, with its type and a short preview of its value.
    pub metadata: Vec<MetadataEntry>,
    pub tensors: Vec<TensorRow>,
}

/// `general.file_type`: llama.cpp's `llama_ftype` number and its name (`None` if unknown).
#[derive(Clone, Debug, Serialize)]
pub struct FileType {
    pub id: u64,
    pub name: Option<&'static str>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TensorTypeCount {
    #[serde(rename = "type")]
    pub ty: GgmlType,
    pub tensors: usize,
    pub elements: u64,
    pub bytes: u64,
}

/// A hyperparameter that is one number for the whole model or one per block (llama.cpp accepts
/// either for head counts and feed-forward lengths).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum PerLayer {
    Same(u64),
    Each(Vec<u64>),
}

/// The main hyperparameters, as the file states them. `None` means the key is absent (allowed for
/// optional keys, and for every key in vocabulary-only files).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Hyperparameters {
    /// `{arch}.context_length`: the context the model was trained for.
    pub context_length: Option<u64>,
    /// `{arch}.block_count`.
    pub block_count: Option<u64>,
    /// `{arch}.embedding_length`.
    pub embedding_length: Option<u64>,
    /// `{arch}.feed_forward_length`.
    pub feed_forward_length: Option<PerLayer>,
    /// `{arch}.attention.head_count`.
    pub head_count: Option<PerLayer>,
    /// `{arch}.attention.head_count_kv`; when absent, equal to `head_count` (listed in
    /// `derived`).
    pub head_count_kv: Option<PerLayer>,
    /// `{arch}.attention.key_length`; when absent, `embedding_length / head_count` (listed in
    /// `derived`).
    pub head_dim: Option<u64>,
    /// `{arch}.rope.freq_base`. Floats are f32 as in llama.cpp's hyperparameters (files store them
    /// as f32).
    pub rope_freq_base: Option<f32>,
    /// `{arch}.rope.dimension_count`.
    pub rope_dimension_count: Option<u64>,
    /// `{arch}.attention.layer_norm_rms_epsilon`.
    pub rms_norm_eps: Option<f32>,
    /// `{arch}.attention.layer_norm_epsilon` (architectures with LayerNorm).
    pub layer_norm_eps: Option<f32>,
    /// `{arch}.vocab_size`; when absent, the length of `tokenizer.ggml.tokens`, else the rows of
    /// `token_embd.weight` (listed in `derived`).
    pub vocab_size: Option<u64>,
    /// `{arch}.expert_count` and `{arch}.expert_used_count` (mixture-of-experts models).
    pub expert_count: Option<u64>,
    pub expert_used_count: Option<u64>,
    /// The fields above whose value was derived, not read from its key.
    pub derived: Vec<&'static str>,
    /// The lowering family (`llama`, `qwen2`, `qwen3`) whose reader, `lower::Hyperparams`, gave
    /// the values it knows (with its defaults, listed in `derived`): what `compile` and `run`
    /// will use. `None`: no family lowers this architecture, or its reader refused the file, and
    /// the values are as the file states them.
    pub family: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TokenizerSummary {
    /// `tokenizer.ggml.model` (`gpt2` for byte-level BPE, `llama` for SentencePiece, ...).
    pub model: Option<String>,
    /// `tokenizer.ggml.pre`: the pre-tokenizer.
    pub pre: Option<String>,
    /// The length of `tokenizer.ggml.tokens`.
    pub tokens: Option<u64>,
    /// The length of `tokenizer.ggml.merges`.
    pub merges: Option<u64>,
    pub bos_token_id: Option<u64>,
    pub eos_token_id: Option<u64>,
    /// Whether `tokenizer.chat_template` is present.
    pub chat_template: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct MetadataEntry {
    pub key: String,
    /// The value type, with element type and length for arrays (`array<string>[49152]`).
    #[serde(rename = "type")]
    pub ty: String,
    /// The value, shortened: long strings are cut and arrays show their first elements.
    pub preview: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct TensorRow {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: GgmlType,
    /// Dimensions in ggml order (`ne[0]`, the row length, first).
    pub shape: Vec<u64>,
    pub elements: u64,
    pub bytes: u64,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl ModelSummary {
    /// Summarises an open file, checking the keys every model needs (see the module docs).
    pub fn from_gguf(file: &GgufFile) -> Result<ModelSummary, GgufError> {
        let is_model = !file.tensors().is_empty();
        let architecture = if is_model {
            Some(file.require_str("general.architecture")?.to_string())
        } else {
            file.optional_str("general.architecture")?
                .map(str::to_string)
        };
        let hyperparameters = match &architecture {
            Some(arch) => {
                let mut h = Hyperparameters::read(file, arch, is_model)?;
                if is_model {
                    h.use_family_reader(file, arch);
                }
                h
            }
            None => Hyperparameters::default(),
        };

        let mut tensor_types: Vec<TensorTypeCount> = Vec::new();
        for t in file.tensors() {
            match tensor_types.iter_mut().find(|c| c.ty == t.ty) {
                Some(c) => {
                    c.tensors += 1;
                    c.elements += t.n_elements();
                    c.bytes += t.n_bytes;
                }
                None => tensor_types.push(TensorTypeCount {
                    ty: t.ty,
                    tensors: 1,
                    elements: t.n_elements(),
                    bytes: t.n_bytes,
                }),
            }
        }
        tensor_types.sort_by(|a, b| b.tensors.cmp(&a.tensors).then(a.ty.cmp(&b.ty)));

        let file_type = file.optional_u64("general.file_type")?.map(|id| FileType {
            id,
            name: u32::try_from(id).ok().and_then(file_type_name),
        });

        Ok(ModelSummary {
            path: file.path().display().to_string(),
            gguf_version: file.version(),
            file_bytes: file.file_len(),
            alignment: file.alignment(),
            data_offset: file.data_offset(),
            architecture,
            name: file.optional_str("general.name")?.map(str::to_string),
            parameter_count: file.tensors().iter().map(|t| t.n_elements()).sum(),
            tensor_bytes: file.tensors().iter().map(|t| t.n_bytes).sum(),
            file_type,
            tensor_types,
            hyperparameters,
            tokenizer: TokenizerSummary::read(file)?,
            metadata: file
                .metadata()
                .iter()
                .map(|(key, value)| MetadataEntry {
                    key: key.clone(),
                    ty: value.type_description(),
                    preview: preview(value),
                })
                .collect(),
            tensors: file
                .tensors()
                .iter()
                .map(|t| TensorRow {
                    name: t.name.clone(),
                    ty: t.ty,
                    shape: t.ne.clone(),
                    elements: t.n_elements(),
                    bytes: t.n_bytes,
                    offset: t.offset,
                })
                .collect(),
        })
    }
}

impl Hyperparameters {
    /// Reads the `{arch}.*` keys. With `required`, the keys every model needs must be present,
    /// integers and non-zero.
    fn read(file: &GgufFile, arch: &str, required: bool) -> Result<Hyperparameters, GgufError> {
        let key = |name: &str| format!("{arch}.{name}");
        let count = |name: &str, needed: bool| -> Result<Option<u64>, GgufError> {
            let k = key(name);
            let v = if needed {
                Some(file.require_u64(&k)?)
            } else {
                file.optional_u64(&k)?
            };
            match v {
                Some(0) if needed => Err(file.invalid_value(&k, 0, "it must be at least 1")),
                v => Ok(v),
            }
        };

        let mut h = Hyperparameters {
            context_length: count("context_length", required)?,
            block_count: count("block_count", required)?,
            embedding_length: count("embedding_length", required)?,
            ..Hyperparameters::default()
        };
        let blocks = h.block_count;
        let needs_heads = required && !RECURRENT_ARCHITECTURES.contains(&arch);
        h.feed_forward_length = per_layer(file, &key("feed_forward_length"), blocks)?;
        h.head_count = per_layer(file, &key("attention.head_count"), blocks)?;
        if needs_heads {
            let k = key("attention.head_count");
            match &h.head_count {
                None => {
                    return Err(file.error(crate::gguf::GgufErrorKind::MissingKey { key: k }));
                }
                Some(PerLayer::Same(0)) => {
                    return Err(file.invalid_value(&k, 0, "it must be at least 1"));
                }
                Some(PerLayer::Each(v)) if v.iter().all(|&n| n == 0) => {
                    return Err(file.invalid_value(
                        &k,
                        format!("[{} zeros]", v.len()),
                        "at least one block needs attention heads",
                    ));
                }
                _ => {}
            }
        }
        h.head_count_kv = per_layer(file, &key("attention.head_count_kv"), blocks)?;
        if h.head_count_kv.is_none() && h.head_count.is_some() {
            h.head_count_kv = h.head_count.clone();
            h.derived.push("head_count_kv");
        }
        h.head_dim = count("attention.key_length", false)?;
        if let (None, Some(embd), Some(PerLayer::Same(heads))) =
            (h.head_dim, h.embedding_length, &h.head_count)
            && *heads > 0
            && embd % heads == 0
        {
            h.head_dim = Some(embd / heads);
            h.derived.push("head_dim");
        }
        h.rope_freq_base = file.optional_f64(&key("rope.freq_base"))?.map(|x| x as f32);
        h.rope_dimension_count = count("rope.dimension_count", false)?;
        h.rms_norm_eps = file
            .optional_f64(&key("attention.layer_norm_rms_epsilon"))?
            .map(|x| x as f32);
        h.layer_norm_eps = file
            .optional_f64(&key("attention.layer_norm_epsilon"))?
            .map(|x| x as f32);
        h.expert_count = count("expert_count", false)?;
        h.expert_used_count = count("expert_used_count", false)?;
        h.vocab_size = count("vocab_size", false)?;
        if h.vocab_size.is_none() {
            let from_tokens = file
                .optional_array("tokenizer.ggml.tokens")?
                .map(|a| a.len() as u64);
            let from_embedding = file
                .tensor("token_embd.weight")
                .and_then(|t| t.ne.get(1).copied());
            h.vocab_size = from_tokens.or(from_embedding);
            if h.vocab_size.is_some() {
                h.derived.push("vocab_size");
            }
        }
        Ok(h)
    }
}

impl Hyperparameters {
    /// Where a family lowers `arch`, replaces the values its reader knows by the ones it reads,
    /// defaults included, so that inspect shows the numbers the compiler uses. A file the reader
    /// refuses keeps the values as stated (inspect shows what a file holds; `compile` says why it
    /// cannot lower it).
    fn use_family_reader(&mut self, file: &GgufFile, arch: &str) {
        let Ok(Some(template)) = Template::for_architecture(arch) else {
            return;
        };
        let hp = match Hyperparams::read(file, &template) {
            Ok(hp) => hp,
            Err(e) => {
                tracing::warn!("{e}; showing the hyperparameters as the file states them");
                return;
            }
        };
        let same = |n: u32| Some(PerLayer::Same(u64::from(n)));
        self.context_length = Some(u64::from(hp.context_length));
        self.block_count = Some(u64::from(hp.n_layers));
        self.embedding_length = Some(u64::from(hp.n_embd));
        self.feed_forward_length = same(hp.n_ff);
        self.head_count = same(hp.n_heads);
        self.head_count_kv = same(hp.n_kv_heads);
        self.head_dim = Some(u64::from(hp.head_dim));
        self.rope_freq_base = Some(hp.rope_freq_base);
        self.rope_dimension_count = Some(u64::from(hp.n_rot));
        self.rms_norm_eps = Some(hp.rms_eps);
        self.vocab_size = Some(u64::from(hp.n_vocab));
        // Which of them the reader defaulted: those whose key the file lacks.
        let defaults = [
            ("head_count_kv", "attention.head_count_kv"),
            ("head_dim", "attention.key_length"),
            ("rope_freq_base", "rope.freq_base"),
            ("rope_dimension_count", "rope.dimension_count"),
            ("vocab_size", "vocab_size"),
        ];
        self.derived = defaults
            .into_iter()
            .filter(|(_, key)| file.get(&format!("{arch}.{key}")).is_none())
            .map(|(field, _)| field)
            .collect();
        self.family = Some(template.family);
    }
}

/// A key that holds one non-negative integer or an array of them, one per block.
fn per_layer(
    file: &GgufFile,
    key: &str,
    blocks: Option<u64>,
) -> Result<Option<PerLayer>, GgufError> {
    const EXPECTED: &str = "non-negative integer or array of them (one per block)";
    let Some(value) = file.get(key) else {
        return Ok(None);
    };
    if let Value::Array(a) = value {
        let values: Option<Vec<u64>> = a
            .to_i64_vec()
            .and_then(|v| v.into_iter().map(|x| u64::try_from(x).ok()).collect());
        let Some(values) = values else {
            return Err(file.mistyped(key, EXPECTED, value));
        };
        match blocks {
            Some(n) if values.len() as u64 != n => {
                return Err(file.invalid_value(
                    key,
                    value.type_description(),
                    format!("a per-block array needs one value for each of the {n} blocks"),
                ));
            }
            _ => {}
        }
        return Ok(Some(PerLayer::Each(values)));
    }
    value
        .as_u64()
        .map(|n| Some(PerLayer::Same(n)))
        .ok_or_else(|| file.mistyped(key, EXPECTED, value))
}

impl TokenizerSummary {
    fn read(file: &GgufFile) -> Result<Option<TokenizerSummary>, GgufError> {
        let has_tokenizer = file
            .metadata()
            .iter()
            .any(|(k, _)| k.starts_with("tokenizer."));
        if !has_tokenizer {
            return Ok(None);
        }
        let string_array_len = |key: &str| -> Result<Option<u64>, GgufError> {
            match file.optional_array(key)? {
                None => Ok(None),
                Some(Array::String(v)) => Ok(Some(v.len() as u64)),
                Some(_) => Err(file.mistyped(
                    key,
                    "array of strings",
                    file.get(key).unwrap_or(&Value::Bool(false)),
                )),
            }
        };
        Ok(Some(TokenizerSummary {
            model: file
                .optional_str("tokenizer.ggml.model")?
                .map(str::to_string),
            pre: file.optional_str("tokenizer.ggml.pre")?.map(str::to_string),
            tokens: string_array_len("tokenizer.ggml.tokens")?,
            merges: string_array_len("tokenizer.ggml.merges")?,
            bos_token_id: file.optional_u64("tokenizer.ggml.bos_token_id")?,
            eos_token_id: file.optional_u64("tokenizer.ggml.eos_token_id")?,
            chat_template: file.optional_str("tokenizer.chat_template")?.is_some(),
        }))
    }
}

/// The longest string preview, in characters.
const PREVIEW_CHARS: usize = 60;
/// How many elements an array preview shows.
const PREVIEW_ELEMENTS: usize = 4;

fn preview(value: &Value) -> String {
    match value {
        Value::String(s) => shorten(s),
        Value::Array(a) => {
            let shown = PREVIEW_ELEMENTS.min(a.len());
            let mut items: Vec<String> = match a {
                Array::String(v) => v[..shown].iter().map(|s| shorten(s)).collect(),
                Array::U8(v) => first(v, shown),
                Array::I8(v) => first(v, shown),
                Array::U16(v) => first(v, shown),
                Array::I16(v) => first(v, shown),
                Array::U32(v) => first(v, shown),
                Array::I32(v) => first(v, shown),
                Array::F32(v) => first(v, shown),
                Array::Bool(v) => first(v, shown),
                Array::U64(v) => first(v, shown),
                Array::I64(v) => first(v, shown),
                Array::F64(v) => first(v, shown),
            };
            if a.len() > shown {
                items.push("...".into());
            }
            format!("[{}]", items.join(", "))
        }
        scalar => scalar.to_string(),
    }
}

fn first<T: fmt::Display>(v: &[T], n: usize) -> Vec<String> {
    v[..n].iter().map(T::to_string).collect()
}

/// A string as a quoted, escaped literal of at most [`PREVIEW_CHARS`] characters.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(PREVIEW_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}...", &s[..cut]),
    }
}

/// `134515008` as `134.52M`.
fn human_count(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.2}K", n / 1e3)
    } else {
        format!("{n}")
    }
}

fn opt<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_string(), T::to_string)
}

impl fmt::Display for PerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PerLayer::Same(n) => write!(f, "{n}"),
            PerLayer::Each(v) => {
                let min = v.iter().min().copied().unwrap_or(0);
                let max = v.iter().max().copied().unwrap_or(0);
                if min == max {
                    write!(f, "{min} (per block)")
                } else {
                    write!(f, "{min}..{max} (per block)")
                }
            }
        }
    }
}

/// The text `m40-llm inspect` prints.
impl fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.hyperparameters;
        let derived = |field: &str| {
            if h.derived.contains(&field) {
                " (derived)"
            } else {
                ""
            }
        };
        writeln!(f, "file            {}", self.path)?;
        write!(
            f,
            "format          GGUF v{}, {} ({} bytes), {} metadata keys, {} tensors",
            self.gguf_version,
            human_bytes(self.file_bytes, 2),
            self.file_bytes,
            self.metadata.len(),
            self.tensors.len(),
        )?;
        if !self.tensors.is_empty() {
            write!(
                f,
                ", data at offset {} (alignment {})",
                self.data_offset, self.alignment
            )?;
        }
        writeln!(f)?;
        writeln!(f, "architecture    {}", opt(&self.architecture))?;
        writeln!(f, "name            {}", opt(&self.name))?;
        writeln!(
            f,
            "parameters      {} ({}), {} of tensor data",
            human_count(self.parameter_count),
            self.parameter_count,
            human_bytes(self.tensor_bytes, 2)
        )?;
        let file_type = match &self.file_type {
            None => "-".to_string(),
            Some(FileType { id, name: Some(n) }) => format!("{n} (general.file_type = {id})"),
            Some(FileType { id, name: None }) => format!("unknown (general.file_type = {id})"),
        };
        writeln!(f, "file type       {file_type}")?;
        let histogram: Vec<String> = self
            .tensor_types
            .iter()
            .map(|c| format!("{} {} ({})", c.tensors, c.ty, human_bytes(c.bytes, 2)))
            .collect();
        let histogram = if histogram.is_empty() {
            "-".to_string()
        } else {
            histogram.join(", ")
        };
        writeln!(f, "tensor types    {histogram}")?;
        writeln!(f, "context length  {}", opt(&h.context_length))?;

        writeln!(f, "\nhyperparameters")?;
        let rows: [(&str, String); 13] = [
            ("block count", opt(&h.block_count)),
            ("embedding length", opt(&h.embedding_length)),
            ("feed-forward length", opt(&h.feed_forward_length)),
            ("attention heads", opt(&h.head_count)),
            (
                "kv heads",
                format!("{}{}", opt(&h.head_count_kv), derived("head_count_kv")),
            ),
            (
                "head dim",
                format!("{}{}", opt(&h.head_dim), derived("head_dim")),
            ),
            (
                "rope freq base",
                format!("{}{}", opt(&h.rope_freq_base), derived("rope_freq_base")),
            ),
            (
                "rope dims",
                format!(
                    "{}{}",
                    opt(&h.rope_dimension_count),
                    derived("rope_dimension_count")
                ),
            ),
            ("rms norm eps", opt(&h.rms_norm_eps)),
            ("layer norm eps", opt(&h.layer_norm_eps)),
            ("experts", opt(&h.expert_count)),
            ("experts used", opt(&h.expert_used_count)),
            (
                "vocab size",
                format!("{}{}", opt(&h.vocab_size), derived("vocab_size")),
            ),
        ];
        for (label, value) in rows {
            writeln!(f, "  {label:<20} {value}")?;
        }

        writeln!(f, "\ntokenizer")?;
        match &self.tokenizer {
            None => writeln!(f, "  (none)")?,
            Some(t) => {
                writeln!(f, "  {:<20} {}", "model", opt(&t.model))?;
                writeln!(f, "  {:<20} {}", "pre-tokenizer", opt(&t.pre))?;
                writeln!(f, "  {:<20} {}", "tokens", opt(&t.tokens))?;
                writeln!(f, "  {:<20} {}", "merges", opt(&t.merges))?;
                writeln!(f, "  {:<20} {}", "bos token id", opt(&t.bos_token_id))?;
                writeln!(f, "  {:<20} {}", "eos token id", opt(&t.eos_token_id))?;
                let template = if t.chat_template { "yes" } else { "no" };
                writeln!(f, "  {:<20} {template}", "chat template")?;
            }
        }

        writeln!(f, "\nmetadata ({} keys)", self.metadata.len())?;
        let key_w = self.metadata.iter().map(|m| m.key.len()).max().unwrap_or(0);
        let ty_w = self.metadata.iter().map(|m| m.ty.len()).max().unwrap_or(0);
        for m in &self.metadata {
            writeln!(f, "  {:<key_w$}  {:<ty_w$}  {}", m.key, m.ty, m.preview)?;
        }

        writeln!(f, "\ntensors ({})", self.tensors.len())?;
        if self.tensors.is_empty() {
            return Ok(());
        }
        let shapes: Vec<String> = self
            .tensors
            .iter()
            .map(|t| {
                let dims: Vec<String> = t.shape.iter().map(u64::to_string).collect();
                dims.join(" x ")
            })
            .collect();
        let name_w = self.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
        let name_w = name_w.max("name".len());
        let shape_w = shapes.iter().map(String::len).max().unwrap_or(0);
        let shape_w = shape_w.max("shape (ggml order)".len());
        let type_w = 7;
        writeln!(
            f,
            "  {:<name_w$}  {:<type_w$}  {:<shape_w$}  {:>12}",
            "name", "type", "shape (ggml order)", "bytes"
        )?;
        for (t, shape) in self.tensors.iter().zip(&shapes) {
            writeln!(
                f,
                "  {:<name_w$}  {:<type_w$}  {:<shape_w$}  {:>12}",
                t.name,
                t.ty.name(),
                shape,
                t.bytes
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufErrorKind, GgufWriter};

    fn tiny_llama() -> GgufWriter {
        GgufWriter::new()
            .kv_str("general.architecture", "llama")
            .kv_str("general.name", "tiny")
            .kv_u32("general.file_type", 0)
            .kv_u32("llama.context_length", 64)
            .kv_u32("llama.block_count", 2)
            .kv_u32("llama.embedding_length", 8)
            .kv_u32("llama.feed_forward_length", 16)
            .kv_u32("llama.attention.head_count", 2)
            .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
            .kv_str("tokenizer.ggml.model", "gpt2")
            .kv_strings("tokenizer.ggml.tokens", ["a", "b", "c"])
            .tensor_f32("token_embd.weight", &[8, 3], &[0.5; 24])
            .tensor_f32("output_norm.weight", &[8], &[1.0; 8])
    }

    fn summary(w: GgufWriter) -> Result<ModelSummary, GgufError> {
        let file = GgufFile::from_bytes("tiny.gguf", w.to_bytes()).unwrap();
        ModelSummary::from_gguf(&file)
    }

    #[test]
    fn summarises_a_tiny_llama() {
        let s = summary(tiny_llama()).unwrap();
        let h = &s.hyperparameters;
        assert_eq!(s.architecture.as_deref(), Some("llama"));
        assert_eq!(s.parameter_count, 32);
        assert_eq!(h.block_count, Some(2));
        assert_eq!(h.head_count_kv, Some(PerLayer::Same(2)));
        assert_eq!(h.head_dim, Some(4));
        assert_eq!(h.vocab_size, Some(3));
        // A llama: the lowering's reader gives the values, with its defaults for absent keys.
        assert_eq!(h.family.as_deref(), Some("llama"));
        assert_eq!(h.rope_freq_base, Some(10_000.0));
        assert_eq!(h.rope_dimension_count, Some(4));
        assert_eq!(
            h.derived,
            [
                "head_count_kv",
                "head_dim",
                "rope_freq_base",
                "rope_dimension_count",
                "vocab_size"
            ]
        );
        assert!(
            s.to_string()
                .contains("rope freq base       10000 (derived)")
        );
        assert_eq!(s.file_type.as_ref().and_then(|t| t.name), Some("ALL_F32"));
        assert_eq!(s.tensor_types.len(), 1);
        assert_eq!(s.tensor_types[0].tensors, 2);
        assert_eq!(s.tensor_types[0].bytes, 4 * 32);
        assert_eq!(s.tokenizer.as_ref().unwrap().tokens, Some(3));
    }

    #[test]
    fn without_a_family_values_are_as_the_file_states_them() {
        // gpt2 has no lowering family; a llama whose rope scaling the lowering refuses is shown
        // as it is rather than not at all.
        let gpt2 = GgufWriter::new()
            .kv_str("general.architecture", "gpt2")
            .kv_u32("gpt2.context_length", 64)
            .kv_u32("gpt2.block_count", 2)
            .kv_u32("gpt2.embedding_length", 8)
            .kv_u32("gpt2.attention.head_count", 2)
            .tensor_f32("token_embd.weight", &[8, 3], &[0.5; 24]);
        let yarn = tiny_llama().kv_str("llama.rope.scaling.type", "yarn");
        for w in [gpt2, yarn] {
            let s = summary(w).unwrap();
            let h = &s.hyperparameters;
            assert_eq!(h.family, None, "{:?}", s.architecture);
            assert_eq!(h.rope_freq_base, None);
            assert_eq!(h.rope_dimension_count, None);
            assert_eq!(h.block_count, Some(2));
            assert!(!h.derived.contains(&"rope_freq_base"));
        }
    }

    #[test]
    fn a_model_without_a_required_key_names_it() {
        for key in [
            "general.architecture",
            "llama.context_length",
            "llama.block_count",
            "llama.embedding_length",
            "llama.attention.head_count",
        ] {
            let w = tiny_llama();
            let bytes = replace_key(&w.to_bytes(), key);
            let file = GgufFile::from_bytes("tiny.gguf", bytes).unwrap();
            let err = ModelSummary::from_gguf(&file).unwrap_err();
            assert!(
                matches!(&err.kind, GgufErrorKind::MissingKey { key: k } if k == key),
                "{key}: {err}"
            );
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    /// Overwrites the first byte of `key`'s name in the file so the key is no longer found.
    fn replace_key(bytes: &[u8], key: &str) -> Vec<u8> {
        let mut out = bytes.to_vec();
        let at = bytes
            .windows(key.len() + 8)
            .position(|w| w[..8] == (key.len() as u64).to_le_bytes() && &w[8..] == key.as_bytes())
            .unwrap();
        out[at + 8] = b'X';
        out
    }

    #[test]
    fn mistyped_and_zero_keys_are_errors() {
        let err = summary(tiny_llama().kv_f32("llama.block_count", 2.0)).unwrap_err();
        assert!(
            matches!(err.kind, GgufErrorKind::MistypedKey { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("llama.block_count"), "{err}");

        let err = summary(tiny_llama().kv_u32("llama.embedding_length", 0)).unwrap_err();
        assert!(
            matches!(err.kind, GgufErrorKind::InvalidValue { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("llama.embedding_length"), "{err}");

        let err = summary(tiny_llama().kv_str("general.file_type", "q4")).unwrap_err();
        assert!(err.to_string().contains("general.file_type"), "{err}");
    }

    #[test]
    fn per_block_arrays_need_one_value_per_block() {
        let ok = tiny_llama().kv(
            "llama.attention.head_count_kv",
            Value::Array(Array::U32(vec![2, 1])),
        );
        let s = summary(ok).unwrap();
        assert_eq!(
            s.hyperparameters.head_count_kv,
            Some(PerLayer::Each(vec![2, 1]))
        );
        let bad = tiny_llama().kv(
            "llama.feed_forward_length",
            Value::Array(Array::U32(vec![16, 16, 16])),
        );
        let err = summary(bad).unwrap_err();
        assert!(
            matches!(err.kind, GgufErrorKind::InvalidValue { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("each of the 2 blocks"), "{err}");
    }

    #[test]
    fn vocabulary_only_files_need_no_model_keys() {
        let w = GgufWriter::new()
            .kv_str("tokenizer.ggml.model", "llama")
            .kv_strings("tokenizer.ggml.tokens", ["<unk>", "a"]);
        let s = summary(w).unwrap();
        assert_eq!(s.architecture, None);
        assert!(s.tensors.is_empty());
        assert_eq!(s.tokenizer.unwrap().tokens, Some(2));
    }

    #[test]
    fn recurrent_architectures_need_no_heads() {
        let w = GgufWriter::new()
            .kv_str("general.architecture", "mamba")
            .kv_u32("mamba.context_length", 64)
            .kv_u32("mamba.block_count", 1)
            .kv_u32("mamba.embedding_length", 8)
            .tensor_f32("token_embd.weight", &[8, 3], &[0.5; 24]);
        let s = summary(w).unwrap();
        assert_eq!(s.hyperparameters.head_count, None);
    }

    #[test]
    fn previews_are_short() {
        let long = "x".repeat(500);
        assert_eq!(shorten(&long).len(), PREVIEW_CHARS + 2 + 3);
        assert_eq!(shorten("é\n"), "\"é\\n\"");
        let a = Value::Array(Array::U32((0..10).collect()));
        assert_eq!(preview(&a), "[0, 1, 2, 3, ...]");
        assert_eq!(human_count(134_515_008), "134.52M");
    }
}
