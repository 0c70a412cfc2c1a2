//! The vocabulary as a GGUF file describes it (`tokenizer.ggml.*`), with the settings llama.cpp
//! derives from it: token attributes, special ids, end-of-generation tokens, which tokens the
//! special-token pass looks for, and each token's decoded piece.

use super::TokenizerError;
use super::unicode::{byte_to_char, char_to_byte};
use crate::gguf::{Array, GgufFile};
use rustc_hash::FxHashMap as HashMap;

/// Token attributes (llama.cpp's `llama_token_attr` bits).
pub mod attr {
    pub const UNKNOWN: u16 = 1 << 0;
    pub const UNUSED: u16 = 1 << 1;
    pub const NORMAL: u16 = 1 << 2;
    pub const CONTROL: u16 = 1 << 3;
    pub const USER_DEFINED: u16 = 1 << 4;
    pub const BYTE: u16 = 1 << 5;
    pub const LSTRIP: u16 = 1 << 7;
    pub const RSTRIP: u16 = 1 << 8;
}

/// The tokenizer algorithm (`tokenizer.ggml.model`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// `llama`: SentencePiece-style merging by score, `▁` for spaces, byte fallback.
    Spm,
    /// `gpt2`: byte-level BPE with merges and a named pre-tokenizer.
    Bpe,
    /// `gemma4`: BPE with merges over raw UTF-8, `▁` for spaces, `<0xXX>` byte fallback.
    BpeRaw,
}

/// The pre-tokenizer kinds (llama.cpp's `llama_vocab_pre_type` that we implement).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreKind {
    Default,
    Gpt2,
    Llama3,
    Qwen2,
    Qwen35,
    Starcoder,
    Falcon,
    DeepseekLlm,
    DeepseekCoder,
    Bloom,
    Viking,
    Newlines,
}

/// What a `tokenizer.ggml.pre` name selects, and the settings it changes.
struct PreConfig {
    kind: PreKind,
    clean_spaces: bool,
    ignore_merges: bool,
    /// Forces `add_bos` on before the GGUF's own `add_bos_token` is read.
    add_bos: bool,
}

fn pre_config(name: &str) -> Option<PreConfig> {
    use PreKind as K;
    let c = |kind, clean_spaces, ignore_merges, add_bos| PreConfig {
        kind,
        clean_spaces,
        ignore_merges,
        add_bos,
    };
    Some(match name {
        "default" => c(K::Default, true, false, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => c(K::Llama3, true, true, true),
        "dbrx" | "smaug-bpe" => c(K::Llama3, true, false, false),
        "deepseek-llm" => c(K::DeepseekLlm, false, false, false),
        "deepseek-coder" => c(K::DeepseekCoder, false, false, false),
        "falcon" => c(K::Falcon, true, false, false),
        "mpt" | "starcoder" => c(
            if name == "mpt" { K::Gpt2 } else { K::Starcoder },
            true,
            false,
            false,
        ),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "olmo" | "jais" | "exaone4" | "jina-v1-en"
        | "jina-v2-code" | "roberta-bpe" => c(K::Gpt2, true, false, false),
        "trillion" | "granite-docling" => c(K::Gpt2, false, false, false),
        "refact" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            c(K::Starcoder, true, false, false)
        }
        "command-r" | "smollm" => c(K::Starcoder, false, false, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "hunyuan" | "solar-open" => {
            c(K::Qwen2, false, false, false)
        }
        "stablelm2" | "megrez" => c(K::Qwen2, true, false, false),
        "qwen35" => c(K::Qwen35, false, false, false),
        "chatglm-bpe" => c(K::Llama3, true, false, false),
        "glm4" | "glm5" => c(K::Llama3, true, true, false),
        "poro-chat" => c(K::Bloom, false, false, false),
        "bloom" | "gpt3-finnish" => c(K::Bloom, true, false, false),
        "viking" => c(K::Viking, false, false, false),
        "gemma4" | "granite-embed-multi-311m" => c(K::Newlines, true, false, true),
        _ => return None,
    })
}

/// Special token ids (`None` where the vocabulary has none).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// End of turn (`<|im_end|>`, `<|eot_id|>`, ...).
    pub eot: Option<u32>,
    /// End of message (`<|eom_id|>`).
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub sep: Option<u32>,
    pub pad: Option<u32>,
    pub mask: Option<u32>,
    pub fim_pre: Option<u32>,
    pub fim_suf: Option<u32>,
    pub fim_mid: Option<u32>,
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
    /// The newline token.
    pub nl: Option<u32>,
}

/// Everything the encoder and decoder need, loaded and derived.
#[derive(Debug)]
pub(crate) struct Vocab {
    pub model: ModelKind,
    pub pre: Option<PreKind>,
    pub pre_name: Option<String>,
    pub texts: Vec<String>,
    pub scores: Vec<f32>,
    pub attrs: Vec<u16>,
    /// Text → id; a text listed twice maps to its last id (as in llama.cpp).
    pub ids: HashMap<String, u32>,
    /// BPE merges: (left, right) symbol ids → (rank, merged symbol id). Symbol ids at or above
    /// the vocabulary size name merge parts that are not tokens (see `extra_texts`).
    pub merges: HashMap<(u32, u32), (u32, u32)>,
    /// Merge parts that are not tokens: text → id (at or above the vocabulary size).
    pub extra_ids: HashMap<String, u32>,
    pub special: SpecialTokens,
    pub eog: Vec<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    pub clean_spaces: bool,
    pub ignore_merges: bool,
    /// Spaces become `▁` before tokenizing (SentencePiece style).
    pub escape_whitespace: bool,
    /// SentencePiece: no token has a `▁` right after another character, so no merge can cross
    /// the start of a `▁` run and each such word can be merged on its own (same result, far
    /// less work on long texts).
    pub spm_words_independent: bool,
    /// Ids the special-token pass looks for, longest text first.
    pub special_order: Vec<u32>,
    /// Each token's piece as llama.cpp's `token_to_piece(special = true)` gives it.
    pub pieces: Vec<Vec<u8>>,
    pub chat_template: Option<String>,
}

const TOKENS: &str = "tokenizer.ggml.tokens";
const MERGES: &str = "tokenizer.ggml.merges";

fn invalid(key: &str, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

impl Vocab {
    pub(crate) fn load(file: &GgufFile) -> Result<Vocab, TokenizerError> {
        let model_name = file.optional_str("tokenizer.ggml.model")?.ok_or_else(|| {
            TokenizerError::NoTokenizer(
                "it has no tokenizer.ggml.model key (a model without a vocabulary)".into(),
            )
        })?;
        let pre_name = file.optional_str("tokenizer.ggml.pre")?.map(str::to_string);
        let model = match model_name {
            "llama" => ModelKind::Spm,
            "gpt2" => ModelKind::Bpe,
            "gemma4" => ModelKind::BpeRaw,
            "bert" => {
                return Err(TokenizerError::Unsupported(
                    "WordPiece (tokenizer.ggml.model = bert)".into(),
                ));
            }
            "t5" => {
                return Err(TokenizerError::Unsupported(
                    "Unigram (tokenizer.ggml.model = t5)".into(),
                ));
            }
            "no_vocab" | "none" => {
                return Err(TokenizerError::NoTokenizer(
                    "tokenizer.ggml.model says it has no vocabulary".into(),
                ));
            }
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "tokenizer.ggml.model = {other:?}"
                )));
            }
        };

        let texts = match file.optional_array(TOKENS)? {
            Some(Array::String(v)) => v.clone(),
            Some(other) => {
                return Err(invalid(
                    TOKENS,
                    format!("is an array of {}, expected strings", other.element_type()),
                ));
            }
            None => return Err(TokenizerError::NoTokenizer(format!("{TOKENS} is missing"))),
        };
        let n = texts.len();
        if n == 0 {
            return Err(invalid(TOKENS, "is empty"));
        }
        if n > i32::MAX as usize {
            return Err(invalid(
                TOKENS,
                format!("has {n} tokens, more than token ids can hold"),
            ));
        }
        let texts: Vec<String> = texts
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t
                }
            })
            .collect();

        let scores = match file.optional_array("tokenizer.ggml.scores")? {
            None => vec![0.0; n],
            Some(a) => {
                let v = a.to_f32_vec().ok_or_else(|| {
                    invalid("tokenizer.ggml.scores", "is not an array of numbers")
                })?;
                if v.len() < n {
                    return Err(invalid(
                        "tokenizer.ggml.scores",
                        format!("has {} entries for {n} tokens", v.len()),
                    ));
                }
                v
            }
        };
        let mut attrs = match file.optional_array("tokenizer.ggml.token_type")? {
            None => vec![attr::NORMAL; n],
            Some(a) => {
                let v = a.to_i64_vec().ok_or_else(|| {
                    invalid("tokenizer.ggml.token_type", "is not an array of integers")
                })?;
                if v.len() < n {
                    return Err(invalid(
                        "tokenizer.ggml.token_type",
                        format!("has {} entries for {n} tokens", v.len()),
                    ));
                }
                v.iter()
                    .take(n)
                    .map(|t| match t {
                        1 => attr::NORMAL,
                        2 => attr::UNKNOWN,
                        3 => attr::CONTROL,
                        4 => attr::USER_DEFINED,
                        5 => attr::UNUSED,
                        6 => attr::BYTE,
                        _ => 0,
                    })
                    .collect()
            }
        };

        let mut ids = HashMap::with_capacity_and_hasher(n, Default::default());
        for (i, t) in texts.iter().enumerate() {
            ids.insert(t.clone(), i as u32);
        }

        // Settings by tokenizer kind, then by pre-tokenizer, then the GGUF's own flags.
        let mut add_bos;
        let mut add_eos = false;
        let mut add_space_prefix;
        let clean_spaces;
        let mut ignore_merges = false;
        let escape_whitespace;
        let mut pre = None;
        let mut special = SpecialTokens::default();
        let dflt = |id: u32| (id < n as u32).then_some(id);
        match model {
            ModelKind::Spm => {
                add_bos = true;
                add_space_prefix = true;
                clean_spaces = false;
                escape_whitespace = true;
                special.bos = dflt(1);
                special.eos = dflt(2);
                special.unk = dflt(0);
            }
            ModelKind::Bpe | ModelKind::BpeRaw => {
                add_space_prefix = false;
                let name = if model == ModelKind::BpeRaw {
                    "gemma4"
                } else {
                    pre_name.as_deref().unwrap_or("default")
                };
                if model == ModelKind::Bpe && pre_name.is_none() {
                    tracing::warn!(
                        "the GGUF names no pre-tokenizer (tokenizer.ggml.pre): using 'default'"
                    );
                }
                let cfg = pre_config(name).ok_or_else(|| {
                    TokenizerError::Unsupported(format!(
                        "pre-tokenizer tokenizer.ggml.pre = {name:?}"
                    ))
                })?;
                if (model == ModelKind::BpeRaw) != (cfg.kind == PreKind::Newlines) {
                    return Err(TokenizerError::Unsupported(format!(
                        "pre-tokenizer {name:?} with tokenizer.ggml.model = {model_name:?}"
                    )));
                }
                clean_spaces = cfg.clean_spaces;
                ignore_merges = cfg.ignore_merges;
                add_bos = cfg.add_bos;
                escape_whitespace = cfg.kind == PreKind::Newlines;
                pre = Some(cfg.kind);
                if model == ModelKind::Bpe {
                    special.bos = dflt(11);
                    special.eos = dflt(11);
                }
                // ChatGLM has no BOS unless the GGUF names one.
                if matches!(name, "chatglm-bpe" | "glm4" | "glm5") {
                    special.bos = None;
                }
            }
        }
        if let Some(v) = file.optional_bool("tokenizer.ggml.add_space_prefix")? {
            add_space_prefix = v;
        }

        // Merges, as symbol-id pairs (BPE only).
        let mut merges = HashMap::default();
        let mut extra_ids: HashMap<String, u32> = HashMap::default();
        if model != ModelKind::Spm {
            let list = match file.optional_array(MERGES)? {
                Some(Array::String(v)) => v,
                Some(other) => {
                    return Err(invalid(
                        MERGES,
                        format!("is an array of {}, expected strings", other.element_type()),
                    ));
                }
                None => {
                    return Err(TokenizerError::NoTokenizer(format!(
                        "{MERGES} is missing (BPE needs merges)"
                    )));
                }
            };
            merges.reserve(list.len());
            let mut intern = |s: &str| -> u32 {
                if let Some(&id) = ids.get(s) {
                    return id;
                }
                if let Some(&id) = extra_ids.get(s) {
                    return id;
                }
                let id = (n + extra_ids.len()) as u32;
                extra_ids.insert(s.to_string(), id);
                id
            };
            for (rank, m) in list.iter().enumerate() {
                // Split at the first space after the first byte (a part may itself be a space).
                let space = m.bytes().skip(1).position(|b| b == b' ').map(|i| i + 1);
                let (a, b) = match space {
                    Some(i) => (&m[..i], &m[i + 1..]),
                    None => ("", ""),
                };
                let joined = format!("{a}{b}");
                let key = (intern(a), intern(b));
                let merged = intern(&joined);
                merges.entry(key).or_insert((rank as u32, merged));
            }
        }

        // Special ids from the GGUF (an out-of-range id keeps the default).
        type Field = fn(&mut SpecialTokens) -> &mut Option<u32>;
        let keys: [(&str, Field); 17] = [
            ("bos_token_id", |s| &mut s.bos),
            ("eos_token_id", |s| &mut s.eos),
            ("eot_token_id", |s| &mut s.eot),
            ("eom_token_id", |s| &mut s.eom),
            ("unknown_token_id", |s| &mut s.unk),
            ("seperator_token_id", |s| &mut s.sep),
            ("padding_token_id", |s| &mut s.pad),
            ("mask_token_id", |s| &mut s.mask),
            ("fim_pre_token_id", |s| &mut s.fim_pre),
            ("fim_suf_token_id", |s| &mut s.fim_suf),
            ("fim_mid_token_id", |s| &mut s.fim_mid),
            ("fim_pad_token_id", |s| &mut s.fim_pad),
            ("fim_rep_token_id", |s| &mut s.fim_rep),
            ("fim_sep_token_id", |s| &mut s.fim_sep),
            ("prefix_token_id", |s| &mut s.fim_pre),
            ("suffix_token_id", |s| &mut s.fim_suf),
            ("middle_token_id", |s| &mut s.fim_mid),
        ];
        for (key, field) in keys {
            let full = format!("tokenizer.ggml.{key}");
            if let Some(id) = file.optional_u64(&full)? {
                if id < n as u64 {
                    *field(&mut special) = Some(id as u32);
                } else {
                    tracing::warn!("{full} = {id} is outside the vocabulary ({n} tokens): ignored");
                }
            }
        }
        if let Some(v) = file.optional_bool("tokenizer.ggml.add_bos_token")? {
            add_bos = v;
        }
        if let Some(v) = file.optional_bool("tokenizer.ggml.add_eos_token")? {
            add_eos = v;
        }
        if model == ModelKind::BpeRaw {
            add_bos = true;
        }

        // Special tokens recognised by their text where the GGUF does not name them.
        let mut by_text: Vec<(&str, u32)> = ids.iter().map(|(t, &i)| (t.as_str(), i)).collect();
        by_text.sort_by_key(|&(_, i)| i);
        let detect = |field: &mut Option<u32>, names: &[&str], attrs: &mut Vec<u16>| {
            if field.is_some() {
                return;
            }
            if let Some(&(_, id)) = by_text.iter().find(|(t, _)| names.contains(t)) {
                *field = Some(id);
                attrs[id as usize] |= attr::CONTROL;
            }
        };
        detect(
            &mut special.eot,
            &[
                "<|eot_id|>",
                "<|im_end|>",
                "<|end|>",
                "<end_of_turn>",
                "<|endoftext|>",
                "<|end_of_text|>",
                "<EOT>",
                "_<EOT>",
                "[EOT]",
                "<｜end▁of▁sentence｜>",
                "<end_of_utterance>",
            ],
            &mut attrs,
        );
        detect(&mut special.eom, &["<|eom_id|>"], &mut attrs);
        detect(
            &mut special.fim_pre,
            &[
                "<|fim_prefix|>",
                "<fim-prefix>",
                "<fim_prefix>",
                "<｜fim▁begin｜>",
                "<PRE>",
                "▁<PRE>",
                "<|code_prefix|>",
                "<|prefix|>",
            ],
            &mut attrs,
        );
        detect(
            &mut special.fim_suf,
            &[
                "<|fim_suffix|>",
                "<fim-suffix>",
                "<fim_suffix>",
                "<｜fim▁hole｜>",
                "<SUF>",
                "▁<SUF>",
                "<|code_suffix|>",
                "<|suffix|>",
            ],
            &mut attrs,
        );
        detect(
            &mut special.fim_mid,
            &[
                "<|fim_middle|>",
                "<fim-middle>",
                "<fim_middle>",
                "<｜fim▁end｜>",
                "<MID>",
                "▁<MID>",
                "<|code_middle|>",
                "<|middle|>",
            ],
            &mut attrs,
        );
        detect(
            &mut special.fim_pad,
            &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
            &mut attrs,
        );
        detect(
            &mut special.fim_rep,
            &[
                "<|fim_repo|>",
                "<|repo_name|>",
                "<fim-repo>",
                "<REPO>",
                "<reponame>",
            ],
            &mut attrs,
        );
        detect(&mut special.fim_sep, &["<|file_sep|>"], &mut attrs);

        // Control tokens named "unused" are unused.
        for (i, t) in texts.iter().enumerate() {
            if attrs[i] & attr::CONTROL != 0 && t.contains("unused") {
                attrs[i] |= attr::UNUSED;
            }
        }

        // End-of-generation tokens: FIM pad/repo/sep, tokens with a known end text, eos/eot/eom.
        let mut eog: Vec<u32> = [special.fim_pad, special.fim_rep, special.fim_sep]
            .into_iter()
            .flatten()
            .collect();
        const EOG_TEXTS: [&str; 22] = [
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<|return|>",
            "<|call|>",
            "<|flush|>",
            "<|calls|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "</s>",
            "<|eom_id|>",
            "<EOT>",
            "_<EOT>",
            "[EOT]",
            "[EOS]",
            "<|end_of_text|>",
            "<end_of_utterance>",
            "<eos>",
            "<turn|>",
            "<|tool_response>",
            "<｜end▁of▁sentence｜>",
            "[e~[",
        ];
        for &(t, id) in &by_text {
            if EOG_TEXTS.contains(&t) {
                eog.push(id);
                attrs[id as usize] |= attr::CONTROL;
            }
        }
        // gpt-oss: these are rendered as text.
        for &(t, id) in &by_text {
            if matches!(
                t,
                "<|channel|>" | "<|message|>" | "<|start|>" | "<|constrain|>"
            ) {
                attrs[id as usize] = attr::USER_DEFINED;
            }
        }
        eog.extend(
            [special.eos, special.eot, special.eom]
                .into_iter()
                .flatten(),
        );
        eog.sort_unstable();
        eog.dedup();
        let text_of = |id: u32| texts[id as usize].as_str();
        let has = |eog: &[u32], s: &str| eog.iter().any(|&i| text_of(i) == s);
        let mut drop_eog = |eog: &mut Vec<u32>, s: &str, new_attr: u16| {
            if let Some(pos) = eog.iter().position(|&i| text_of(i) == s) {
                attrs[eog[pos] as usize] = new_attr;
                eog.remove(pos);
            }
        };
        // o200k_harmony / solar-open: <|end|> ends a message, not the generation.
        if (has(&eog, "<|return|>") && has(&eog, "<|call|>")
            || has(&eog, "<|calls|>") && has(&eog, "<|flush|>"))
            && has(&eog, "<|end|>")
        {
            drop_eog(&mut eog, "<|end|>", attr::USER_DEFINED);
        }
        // gemma4 / plamo2: </s> is an ordinary token there.
        if (has(&eog, "<|tool_response>") || has(&eog, "<|plamo:eos|>")) && has(&eog, "</s>") {
            drop_eog(&mut eog, "</s>", attr::NORMAL);
        }

        // Per-model attributes llama.cpp sets by name.
        let general_name = file
            .optional_str("general.name")?
            .unwrap_or("")
            .to_lowercase();
        let arch = file.architecture().unwrap_or("");
        let pre_str = pre_name.as_deref().unwrap_or("");
        let special_like = |a: u16| a & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0;
        if ["jina-v2-de", "jina-v2-es", "jina-v2-code"]
            .iter()
            .any(|s| pre_str.contains(s))
            || ["nomic-bert-moe", "jina-bert-v3"]
                .iter()
                .any(|s| arch.contains(s))
        {
            if let Some(&id) = ids.get("<mask>") {
                attrs[id as usize] |= attr::LSTRIP;
            }
        } else if general_name.contains("phi-3") || general_name.contains("phi3") {
            for a in attrs.iter_mut().filter(|a| special_like(**a)) {
                *a |= attr::RSTRIP;
            }
            if let Some(&id) = ids.get("</s>") {
                attrs[id as usize] |= attr::RSTRIP;
            }
            for t in ["<unk>", "<s>", "<|endoftext|>"] {
                if let Some(&id) = ids.get(t) {
                    attrs[id as usize] &= !attr::RSTRIP;
                }
            }
        } else if general_name.contains("modern-bert")
            && let Some(&id) = ids.get("[MASK]")
        {
            attrs[id as usize] |= attr::LSTRIP;
        }

        // The special-token pass: control, user-defined and unknown tokens, longest first.
        let mut special_order: Vec<u32> = (0..n as u32)
            .filter(|&i| special_like(attrs[i as usize]))
            .collect();
        special_order.sort_by(|&a, &b| text_of(b).len().cmp(&text_of(a).len()).then(a.cmp(&b)));

        let spm_words_independent = model == ModelKind::Spm
            && !texts.iter().any(|t| {
                let mut prev = '▁';
                t.chars().any(|c| {
                    let inner = c == '▁' && prev != '▁';
                    prev = c;
                    inner
                })
            });
        let mut vocab = Vocab {
            model,
            pre,
            pre_name,
            texts,
            scores,
            attrs,
            ids,
            merges,
            extra_ids,
            special,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces,
            ignore_merges,
            escape_whitespace,
            spm_words_independent,
            special_order,
            pieces: Vec::new(),
            chat_template: file
                .optional_str("tokenizer.chat_template")?
                .map(str::to_string),
        };
        vocab.pieces = (0..n as u32).map(|i| vocab.piece_of(i)).collect();
        if vocab.add_bos && vocab.special.bos.is_none() {
            return Err(invalid(
                "tokenizer.ggml.add_bos_token",
                "is true but the vocabulary has no BOS token",
            ));
        }
        if vocab.add_eos && vocab.special.eos.is_none() {
            return Err(invalid(
                "tokenizer.ggml.add_eos_token",
                "is true but the vocabulary has no EOS token",
            ));
        }
        Ok(vocab)
    }

    pub(crate) fn n_tokens(&self) -> usize {
        self.texts.len()
    }

    /// The byte a `<0xXX>` byte token stands for.
    pub(crate) fn byte_of(&self, id: u32) -> Option<u8> {
        let t = self.texts.get(id as usize)?;
        let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
        if hex.len() != 2 {
            return None;
        }
        u8::from_str_radix(hex, 16).ok()
    }

    /// The token for byte `b` in SentencePiece-style vocabularies: `<0xXX>`, else the byte as text.
    pub(crate) fn byte_token(&self, b: u8) -> Option<u32> {
        if let Some(&id) = self.ids.get(&format!("<0x{b:02X}>")) {
            return Some(id);
        }
        let s = [b];
        std::str::from_utf8(&s)
            .ok()
            .and_then(|s| self.ids.get(s).copied())
    }

    /// A token's piece with special tokens rendered (llama.cpp's `token_to_piece(special=true)`).
    fn piece_of(&self, id: u32) -> Vec<u8> {
        let a = self.attrs[id as usize];
        let text = &self.texts[id as usize];
        if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
            return text.as_bytes().to_vec();
        }
        if a & attr::NORMAL != 0 {
            return match self.model {
                ModelKind::Spm | ModelKind::BpeRaw => text.replace('▁', " ").into_bytes(),
                // Each character stands for one byte; one that does not is kept as it is.
                ModelKind::Bpe => {
                    let mut out = Vec::with_capacity(text.len());
                    for c in text.chars() {
                        match char_to_byte(c) {
                            Some(b) => out.push(b),
                            None => {
                                let mut buf = [0u8; 4];
                                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                            }
                        }
                    }
                    out
                }
            };
        }
        if a & attr::BYTE != 0 {
            return self.byte_of(id).map(|b| vec![b]).unwrap_or_default();
        }
        Vec::new()
    }

    /// The symbol id of a BPE initial symbol's text: a token, or a merge part that is no token.
    pub(crate) fn symbol_id(&self, s: &str) -> Option<u32> {
        self.ids.get(s).or_else(|| self.extra_ids.get(s)).copied()
    }

    /// The byte-level symbol ids of each byte (GPT-2's alphabet).
    pub(crate) fn byte_symbols(&self) -> [Option<u32>; 256] {
        let mut out = [None; 256];
        for (b, slot) in out.iter_mut().enumerate() {
            let mut buf = [0u8; 4];
            *slot = self.symbol_id(byte_to_char(b as u8).encode_utf8(&mut buf));
        }
        out
    }
}
