//! Family templates (`graphs/<family>.toml`): what differs between architectures of the llama
//! family, as data. A template names the GGUF tensor of each role the lowering knows and picks
//! the rope style; the lowering builds one decoder from it. Adding a llama-like family means
//! adding a template here and a test.
//!
//! The templates are compiled into the binary, so a build always lowers the families it was
//! tested with.

use crate::ir::RopeStyle;
use serde::Deserialize;

/// The templates, by family name (the file name under `graphs/`).
const TEMPLATES: [(&str, &str); 3] = [
    ("llama", include_str!("../../graphs/llama.toml")),
    ("qwen2", include_str!("../../graphs/qwen2.toml")),
    ("qwen3", include_str!("../../graphs/qwen3.toml")),
];

/// One family's template.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// The family name (`graphs/<family>.toml`); set from the file name, not read from it.
    #[serde(skip)]
    pub family: String,
    /// The `general.architecture` values this template lowers; the value is also the prefix of
    /// the model's metadata keys (`llama.block_count`).
    pub architectures: Vec<String>,
    /// The models this family covers, for people.
    pub description: String,
    pub rope: RopeTemplate,
    /// Tensors outside the blocks.
    pub tensors: ModelTensors,
    /// Tensors of block `{layer}`.
    pub block: BlockTensors,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeTemplate {
    pub style: RopeStyle,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelTensors {
    pub token_embd: String,
    pub output_norm: String,
    /// The logits' matrix; when absent from the file, `token_embd` (tied embeddings).
    pub output: Option<TensorRef>,
    /// Rope frequency factors (llama 3), `[n_rot/2]`.
    pub rope_freqs: Option<TensorRef>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockTensors {
    pub attn_norm: String,
    pub attn_q: String,
    pub attn_k: String,
    pub attn_v: String,
    pub attn_q_bias: Option<TensorRef>,
    pub attn_k_bias: Option<TensorRef>,
    pub attn_v_bias: Option<TensorRef>,
    /// RMS norm over each head of q (weight `[head_dim]`), before rope.
    pub attn_q_norm: Option<TensorRef>,
    /// RMS norm over each head of k (weight `[head_dim]`), before rope.
    pub attn_k_norm: Option<TensorRef>,
    pub attn_output: String,
    pub attn_output_bias: Option<TensorRef>,
    pub ffn_norm: String,
    pub ffn_gate: String,
    pub ffn_up: String,
    pub ffn_down: String,
}

/// A tensor of an optional role: `"name"` (required when the role is listed) or
/// `{ name = "...", optional = true }` (used when the file has it).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TensorRef {
    Required(String),
    Spec {
        name: String,
        #[serde(default)]
        optional: bool,
    },
}

impl TensorRef {
    pub fn name(&self) -> &str {
        match self {
            TensorRef::Required(name) | TensorRef::Spec { name, .. } => name,
        }
    }

    pub fn is_optional(&self) -> bool {
        matches!(self, TensorRef::Spec { optional: true, .. })
    }
}

/// A template that does not parse or is inconsistent: a bug in `graphs/`, caught by tests.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("graphs/{family}.toml: {message}")]
pub struct TemplateError {
    pub family: String,
    pub message: String,
}

impl Template {
    /// Parses and checks template text for `family`.
    pub fn parse(family: &str, text: &str) -> Result<Template, TemplateError> {
        let fail = |message: String| TemplateError {
            family: family.to_string(),
            message,
        };
        let mut t: Template = toml::from_str(text).map_err(|e| fail(e.to_string()))?;
        t.family = family.to_string();
        if t.architectures.is_empty() {
            return Err(fail("`architectures` is empty".into()));
        }
        for (role, name) in t.tensors.names() {
            if name.contains("{layer}") {
                return Err(fail(format!(
                    "tensors.{role} = {name:?} is outside the blocks but mentions {{layer}}"
                )));
            }
        }
        for (role, name) in t.block.names() {
            if !name.contains("{layer}") {
                return Err(fail(format!(
                    "block.{role} = {name:?} must contain {{layer}}"
                )));
            }
        }
        Ok(t)
    }

    /// Every built-in template.
    pub fn all() -> Result<Vec<Template>, TemplateError> {
        TEMPLATES
            .iter()
            .map(|(family, text)| Template::parse(family, text))
            .collect()
    }

    /// The template that lowers `architecture`, if any.
    pub fn for_architecture(architecture: &str) -> Result<Option<Template>, TemplateError> {
        Ok(Template::all()?
            .into_iter()
            .find(|t| t.architectures.iter().any(|a| a == architecture)))
    }

    /// All architectures the built-in templates lower, for error messages.
    pub fn supported_architectures() -> Vec<String> {
        Template::all()
            .map(|ts| ts.into_iter().flat_map(|t| t.architectures).collect())
            .unwrap_or_default()
    }
}

impl ModelTensors {
    fn names(&self) -> Vec<(&'static str, &str)> {
        let mut names = vec![
            ("token_embd", self.token_embd.as_str()),
            ("output_norm", self.output_norm.as_str()),
        ];
        names.extend(self.output.as_ref().map(|t| ("output", t.name())));
        names.extend(self.rope_freqs.as_ref().map(|t| ("rope_freqs", t.name())));
        names
    }
}

impl BlockTensors {
    fn names(&self) -> Vec<(&'static str, &str)> {
        let mut names = vec![
            ("attn_norm", self.attn_norm.as_str()),
            ("attn_q", self.attn_q.as_str()),
            ("attn_k", self.attn_k.as_str()),
            ("attn_v", self.attn_v.as_str()),
            ("attn_output", self.attn_output.as_str()),
            ("ffn_norm", self.ffn_norm.as_str()),
            ("ffn_gate", self.ffn_gate.as_str()),
            ("ffn_up", self.ffn_up.as_str()),
            ("ffn_down", self.ffn_down.as_str()),
        ];
        let optional = [
            ("attn_q_bias", &self.attn_q_bias),
            ("attn_k_bias", &self.attn_k_bias),
            ("attn_v_bias", &self.attn_v_bias),
            ("attn_q_norm", &self.attn_q_norm),
            ("attn_k_norm", &self.attn_k_norm),
            ("attn_output_bias", &self.attn_output_bias),
        ];
        names.extend(
            optional
                .iter()
                .filter_map(|(role, t)| t.as_ref().map(|t| (*role, t.name()))),
        );
        names
    }
}

/// The name of a block tensor for `layer`.
pub fn block_tensor(name: &str, layer: u32) -> String {
    name.replace("{layer}", &layer.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_template_parses() {
        let all = Template::all().unwrap();
        let families: Vec<&str> = all.iter().map(|t| t.family.as_str()).collect();
        assert_eq!(families, ["llama", "qwen2", "qwen3"]);
        assert_eq!(
            Template::supported_architectures(),
            ["llama", "qwen2", "qwen3"]
        );
    }

    #[test]
    fn families_differ_only_in_data() {
        let llama = Template::for_architecture("llama").unwrap().unwrap();
        let qwen3 = Template::for_architecture("qwen3").unwrap().unwrap();
        assert_eq!(llama.rope.style, RopeStyle::Normal);
        assert_eq!(qwen3.rope.style, RopeStyle::Neox);
        assert!(llama.block.attn_q_norm.is_none());
        let q_norm = qwen3.block.attn_q_norm.unwrap();
        assert!(!q_norm.is_optional());
        assert_eq!(block_tensor(q_norm.name(), 7), "blk.7.attn_q_norm.weight");
        assert!(llama.tensors.output.unwrap().is_optional());
        assert_eq!(Template::for_architecture("gpt2").unwrap(), None);
    }

    #[test]
    fn bad_templates_are_rejected() {
        let base = include_str!("../../graphs/llama.toml");
        let typo = base.replace("attn_norm =", "attn_nrom =");
        assert!(
            Template::parse("x", &typo)
                .unwrap_err()
                .message
                .contains("attn_nrom")
        );
        let no_layer = base.replace("\"blk.{layer}.ffn_up.weight\"", "\"ffn_up.weight\"");
        let err = Template::parse("x", &no_layer).unwrap_err();
        assert!(err.message.contains("block.ffn_up"), "{err}");
    }
}
