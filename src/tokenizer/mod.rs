//! Tokenizers built from a GGUF file's own metadata (`tokenizer.ggml.*`), exact against
//! llama.cpp: byte-level BPE with the pre-tokenizer `tokenizer.ggml.pre` names, SentencePiece
//! style (`tokenizer.ggml.model = llama`) with byte fallback, and Gemma 4's BPE over raw UTF-8.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use m40_llm::gguf::GgufFile;
//! use m40_llm::tokenizer::Tokenizer;
//! let file = GgufFile::open("models/SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let tok = Tokenizer::from_gguf(&file)?;
//! let ids = tok.encode("Hello world", false, false);
//! assert_eq!(tok.decode(&ids, false)?, "Hello world");
//! # Ok(()) }
//! ```
//!
//! - [`Tokenizer::encode`]`(text, add_special, parse_special)` is llama.cpp's `llama_tokenize`:
//!   `add_special` adds BOS/EOS where the vocabulary asks for them; `parse_special` turns the
//!   text of control tokens (`<|im_start|>`) into those tokens (user-defined tokens always are).
//! - [`Tokenizer::decode`] is `llama_detokenize` (with `remove_special = false`); `special`
//!   renders control tokens as their text.
//! - [`StreamDecoder`] turns ids into text one at a time, holding back the bytes of a character
//!   split across tokens.
//! - [`chat`] renders `tokenizer.chat_template`.
//!
//! How exactness was established, and why this is not the `tokenizers` crate: docs/tokenizer.md.

pub mod chat;
mod merge;
mod pretok;
mod stream;
mod unicode;
mod unicode_data;
mod vocab;

pub use stream::StreamDecoder;
pub use vocab::{ModelKind, SpecialTokens};

use crate::gguf::{GgufError, GgufFile};
use memchr::memmem;
use pretok::PreTokenizer;
use vocab::{Vocab, attr};

/// Why a tokenizer could not be built, or ids not decoded.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("the GGUF file has no tokenizer: {0}")]
    NoTokenizer(String),
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    #[error("invalid tokenizer metadata: {key} {reason}")]
    Invalid { key: String, reason: String },
    #[error("token id {id} is outside the vocabulary ({n_vocab} tokens)")]
    UnknownToken { id: u32, n_vocab: usize },
}

/// A tokenizer: vocabulary, merge rules, pre-tokenizer and special tokens of one model.
pub struct Tokenizer {
    vocab: Vocab,
    pre: Option<PreTokenizer>,
    byte_syms: [Option<u32>; 256],
    /// One searcher per entry of `vocab.special_order`.
    finders: Vec<memmem::Finder<'static>>,
    /// All special texts at once: which of them occur in a text at all (vocabularies with
    /// thousands of special tokens would otherwise scan the text thousands of times).
    any_special: Option<aho_corasick::AhoCorasick>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.vocab.model)
            .field("pre", &self.vocab.pre_name)
            .field("n_vocab", &self.n_vocab())
            .field("n_merges", &self.vocab.merges.len())
            .field("special", &self.vocab.special)
            .field("add_bos", &self.vocab.add_bos)
            .field("add_eos", &self.vocab.add_eos)
            .finish_non_exhaustive()
    }
}

/// A piece of the input after the special-token pass.
#[derive(Debug, Clone, Copy)]
enum Fragment {
    Text(usize, usize),
    Token(u32),
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes. Works on vocabulary-only files.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let vocab = Vocab::load(file)?;
        let pre = match vocab.pre {
            Some(kind) => Some(
                PreTokenizer::new(kind).map_err(|e| TokenizerError::Invalid {
                    key: "tokenizer.ggml.pre".into(),
                    reason: e,
                })?,
            ),
            None => None,
        };
        let byte_syms = vocab.byte_symbols();
        let finders = vocab
            .special_order
            .iter()
            .map(|&id| memmem::Finder::new(vocab.texts[id as usize].as_bytes()).into_owned())
            .collect();
        let any_special = aho_corasick::AhoCorasick::new(
            vocab
                .special_order
                .iter()
                .map(|&id| vocab.texts[id as usize].as_bytes()),
        )
        .ok();
        let mut tok = Tokenizer {
            vocab,
            pre,
            byte_syms,
            finders,
            any_special,
        };
        // The newline token: SentencePiece's <0x0A>, else what "\n" tokenizes to.
        tok.vocab.special.nl = match tok.vocab.model {
            ModelKind::Spm => tok.vocab.byte_token(b'\n'),
            _ => tok.encode("\n", false, false).first().copied(),
        }
        .or(tok.vocab.special.pad);
        Ok(tok)
    }

    /// The number of tokens in the vocabulary.
    pub fn n_vocab(&self) -> usize {
        self.vocab.n_tokens()
    }

    /// The tokenizer algorithm.
    pub fn model(&self) -> ModelKind {
        self.vocab.model
    }

    /// The pre-tokenizer name from the GGUF (`tokenizer.ggml.pre`), if any.
    pub fn pre_tokenizer(&self) -> Option<&str> {
        self.vocab.pre_name.as_deref()
    }

    /// Special token ids (BOS, EOS, EOT, ..., newline).
    pub fn special(&self) -> &SpecialTokens {
        &self.vocab.special
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS / ends with EOS.
    pub fn add_bos(&self) -> bool {
        self.vocab.add_bos
    }
    pub fn add_eos(&self) -> bool {
        self.vocab.add_eos
    }

    /// The tokens that end generation (EOS, EOT, `<|im_end|>`, FIM pad..., as llama.cpp derives
    /// them), sorted.
    pub fn eog_tokens(&self) -> &[u32] {
        &self.vocab.eog
    }

    /// Whether `id` ends generation.
    pub fn is_eog(&self, id: u32) -> bool {
        self.vocab.eog.binary_search(&id).is_ok()
    }

    /// Whether `id` is a control token (not rendered unless asked for).
    pub fn is_control(&self, id: u32) -> bool {
        self.attr(id) & attr::CONTROL != 0
    }

    /// Whether `id` is a special token: control, user-defined or unknown.
    pub fn is_special(&self, id: u32) -> bool {
        self.attr(id) & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0
    }

    fn attr(&self, id: u32) -> u16 {
        self.vocab.attrs.get(id as usize).copied().unwrap_or(0)
    }

    /// A token's text as the vocabulary stores it (`Ġworld`, `▁world`, `<|im_end|>`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.texts.get(id as usize).map(String::as_str)
    }

    /// The token whose vocabulary text is exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.ids.get(text).copied()
    }

    /// The bytes a token decodes to, with special tokens rendered (may be part of a UTF-8
    /// character).
    pub fn token_piece(&self, id: u32) -> Option<&[u8]> {
        self.vocab.pieces.get(id as usize).map(Vec::as_slice)
    }

    /// The chat template stored in the GGUF (`tokenizer.chat_template`), if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.vocab.chat_template.as_deref()
    }

    /// Tokenizes `text`. `add_special` adds BOS (and EOS) where the vocabulary asks for them;
    /// `parse_special` turns the text of control tokens into those tokens.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let v = &self.vocab;
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        let frags = self.partition(text, parse_special);
        let mut sc = merge::Scratch::default();
        if add_special
            && v.add_bos
            && let Some(bos) = v.special.bos
        {
            out.push(bos);
        }
        let mut prev_special = true;
        for f in frags {
            match f {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(s, e) => {
                    let t = &text[s..e];
                    match v.model {
                        ModelKind::Spm => {
                            let mut buf = String::with_capacity(t.len() + 3);
                            if v.add_space_prefix && prev_special {
                                buf.push('▁');
                            }
                            for c in t.chars() {
                                buf.push(if c == ' ' { '▁' } else { c });
                            }
                            if v.spm_words_independent {
                                // Cut before each `▁` that follows another character.
                                let mut start = 0;
                                let mut prev_space = true;
                                for (i, c) in buf.char_indices() {
                                    let space = c == '▁';
                                    if space && !prev_space {
                                        v.spm_text(&buf[start..i], &mut sc, &mut out);
                                        start = i;
                                    }
                                    prev_space = space;
                                }
                                v.spm_text(&buf[start..], &mut sc, &mut out);
                            } else {
                                v.spm_text(&buf, &mut sc, &mut out);
                            }
                        }
                        ModelKind::Bpe | ModelKind::BpeRaw => {
                            let escaped;
                            let t = if v.escape_whitespace {
                                escaped = t.replace(' ', "▁");
                                escaped.as_str()
                            } else {
                                t
                            };
                            if let Some(pre) = &self.pre {
                                for (ws, we) in pre.split(t) {
                                    if v.model == ModelKind::Bpe {
                                        v.bpe_word(
                                            &t.as_bytes()[ws..we],
                                            &self.byte_syms,
                                            &mut sc,
                                            &mut out,
                                        );
                                    } else {
                                        v.bpe_raw_word(&t[ws..we], &mut sc, &mut out);
                                    }
                                }
                            }
                        }
                    }
                    prev_special = false;
                }
            }
        }
        if add_special
            && v.add_eos
            && let Some(eos) = v.special.eos
        {
            out.push(eos);
        }
        out
    }

    /// The special-token pass: each special token's text, longest first, is cut out of the
    /// remaining text (control and unknown tokens only with `parse_special`). Tokens marked
    /// lstrip/rstrip swallow the ASCII white space beside them.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let v = &self.vocab;
        let mut frags = Vec::new();
        if text.is_empty() {
            return frags;
        }
        frags.push(Fragment::Text(0, text.len()));
        let bytes = text.as_bytes();
        // Which special texts occur anywhere (fragments are parts of the text, so a text that
        // does not occur in it occurs in none).
        let present: Option<Vec<bool>> = self.any_special.as_ref().map(|ac| {
            let mut seen = vec![false; v.special_order.len()];
            for m in ac.find_overlapping_iter(bytes) {
                seen[m.pattern().as_usize()] = true;
            }
            seen
        });
        let mut next = Vec::new();
        for (k, &id) in v.special_order.iter().enumerate() {
            let a = v.attrs[id as usize];
            if !parse_special && a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            if present.as_ref().is_some_and(|p| !p[k]) {
                continue;
            }
            let finder = &self.finders[k];
            let len = finder.needle().len();
            if len == 0 {
                continue;
            }
            next.clear();
            for f in frags.iter().copied() {
                let Fragment::Text(s, e) = f else {
                    next.push(f);
                    continue;
                };
                let mut pos = s;
                while let Some(m) = finder.find(&bytes[pos..e]).map(|i| pos + i) {
                    let mut left_end = m;
                    if a & attr::LSTRIP != 0 {
                        while left_end > pos && bytes[left_end - 1].is_ascii_whitespace_c() {
                            left_end -= 1;
                        }
                    }
                    if left_end > pos {
                        next.push(Fragment::Text(pos, left_end));
                    }
                    next.push(Fragment::Token(id));
                    pos = m + len;
                    if a & attr::RSTRIP != 0 {
                        while pos < e && bytes[pos].is_ascii_whitespace_c() {
                            pos += 1;
                        }
                    }
                }
                if pos < e {
                    next.push(Fragment::Text(pos, e));
                }
            }
            std::mem::swap(&mut frags, &mut next);
        }
        frags
    }

    /// Decodes ids to bytes: llama.cpp's `llama_detokenize(remove_special = false,
    /// unparse_special = special)`, including its clean-up of spaces where the vocabulary asks
    /// for it.
    pub fn decode_bytes(&self, ids: &[u32], special: bool) -> Result<Vec<u8>, TokenizerError> {
        let mut out = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let piece = self.piece(id, special)?;
            // SentencePiece: the space added in front of the text is removed again.
            let piece = if i == 0 && self.vocab.add_space_prefix {
                piece.strip_prefix(b" ").unwrap_or(piece)
            } else {
                piece
            };
            out.extend_from_slice(piece);
        }
        if self.vocab.clean_spaces {
            clean_up_spaces(&mut out);
        }
        Ok(out)
    }

    /// Decodes ids to text (invalid UTF-8, such as a character cut in half, becomes U+FFFD).
    /// `special` renders control tokens (`<|im_end|>`) as their text.
    pub fn decode(&self, ids: &[u32], special: bool) -> Result<String, TokenizerError> {
        let bytes = self.decode_bytes(ids, special)?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// A decoder that turns ids into text one at a time.
    pub fn stream_decoder(&self, special: bool) -> StreamDecoder<'_> {
        StreamDecoder::new(self, special)
    }

    /// A token's piece; control and unknown tokens are empty unless `special`.
    fn piece(&self, id: u32, special: bool) -> Result<&[u8], TokenizerError> {
        let piece = self.token_piece(id).ok_or(TokenizerError::UnknownToken {
            id,
            n_vocab: self.n_vocab(),
        })?;
        if !special && self.attr(id) & (attr::CONTROL | attr::UNKNOWN) != 0 {
            return Ok(&[]);
        }
        Ok(piece)
    }

    /// Whether decoding cleans up spaces before punctuation (llama.cpp's
    /// `clean_up_tokenization_spaces`; GPT-2, Llama 3, StarCoder... do).
    pub fn cleans_spaces(&self) -> bool {
        self.vocab.clean_spaces
    }
    pub(crate) fn strips_first_space(&self) -> bool {
        self.vocab.add_space_prefix
    }
    pub(crate) fn piece_for_stream(&self, id: u32, special: bool) -> Result<&[u8], TokenizerError> {
        self.piece(id, special)
    }
}

/// C's `isspace` in the "C" locale (what llama.cpp strips beside lstrip/rstrip tokens).
trait CSpace {
    fn is_ascii_whitespace_c(&self) -> bool;
}
impl CSpace for u8 {
    fn is_ascii_whitespace_c(&self) -> bool {
        matches!(*self, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
    }
}

/// llama.cpp's `clean_up_tokenization_spaces`: drops the space before `?`, `!`, `.`, `,`, the
/// spaces around a lone `'`, and the space before `'s`, `'m`, `'re`, `'ve`.
pub(crate) fn clean_up_spaces(t: &mut Vec<u8>) {
    // Each pass compacts in place, reading neighbours of the pass's input.
    let n = t.len();
    if n == 0 {
        return;
    }
    let mut w = 1;
    for i in 1..n {
        let x = t[i];
        if t[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            w -= 1;
        }
        t[w] = x;
        w += 1;
    }
    t.truncate(w);

    let n = t.len();
    let mut w = 1;
    let mut i = 1;
    while i < n {
        let x = t[i];
        if x == b'\'' && i + 1 < n && t[i - 1] == b' ' && t[i + 1] == b' ' {
            w -= 1;
            i += 1;
            t[i] = 0; // the next space is skipped, and no longer counts as a space
        }
        t[w] = x;
        w += 1;
        i += 1;
    }
    t.truncate(w);

    let n = t.len();
    let mut w = 1;
    for i in 1..n {
        let x = t[i];
        if t[i - 1] == b' ' && x == b'\'' && i + 1 < n {
            let x1 = t[i + 1];
            let drop = match x1 {
                b's' | b'm' => true,
                _ => i + 2 < n && matches!((x1, t[i + 2]), (b'r', b'e') | (b'v', b'e')),
            };
            if drop {
                w -= 1;
            }
        }
        t[w] = x;
        w += 1;
    }
    t.truncate(w);
}

#[cfg(test)]
mod tests {
    use super::{Tokenizer, clean_up_spaces};
    use crate::gguf::GgufFile;

    #[test]
    fn shareable_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Tokenizer>();
        send_sync::<super::chat::ChatTemplate>();
    }

    /// Merging SentencePiece words one by one gives what merging the whole text gives.
    #[test]
    fn independent_spm_words_merge_the_same() {
        let path = "tests/data/tokenizer/ggml-vocab-llama-spm.gguf";
        let mut tok = Tokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap();
        assert!(tok.vocab.spm_words_independent);
        let pool: Vec<char> = "ab cde  fgh\n\tth the there 12 3.5 ,;'\"é日本🙂▁x"
            .chars()
            .collect();
        let mut seed = 0x2545_f491_u64;
        let texts: Vec<String> = (0..300)
            .map(|_| {
                let len = (seed % 40) as usize;
                (0..len)
                    .map(|_| {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        pool[(seed >> 33) as usize % pool.len()]
                    })
                    .collect()
            })
            .collect();
        let split: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t, false, false)).collect();
        tok.vocab.spm_words_independent = false;
        for (t, ids) in texts.iter().zip(&split) {
            assert_eq!(&tok.encode(t, false, false), ids, "{t:?}");
        }
    }

    fn clean(s: &str) -> String {
        let mut v = s.as_bytes().to_vec();
        clean_up_spaces(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn space_clean_up() {
        assert_eq!(clean("Hello , world !"), "Hello, world!");
        assert_eq!(clean("it 's a ' b"), "it's a'b");
        assert_eq!(clean("we 're they 've I 'll"), "we're they've I 'll");
        assert_eq!(clean(""), "");
        assert_eq!(clean(" ."), ".");
    }
}
