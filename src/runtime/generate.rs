//! Text generation: prefill a prompt, then sample one token per decode step until a stop rule
//! fires, streaming the text as it is produced.
//!
//! Stop rules, checked after every sampled token, in this order: an end-of-generation token
//! (EOS/EOT/... as the tokenizer marks them; the token itself is not part of the output), a stop
//! string (the text before it is the output; the stop string is not), the consumer of the text
//! asking to stop (its callback returns `ControlFlow::Break`), the new-token limit, and the
//! context limit (the sequence cannot take another token).
//!
//! Stop strings match the text of every token, special (control) tokens included, whether or not
//! the output shows them (`render_special`): `--stop '<|im_start|>'` fires on that token. Hidden
//! special text is matched, then cut out of what is released.
//!
//! What each step returns depends on the sampler ([`output_kind`]): greedy decoding without
//! penalties asks the backend for its argmax, sampling from the top `k` (without penalties) for
//! its top-k, anything else for the full row of logits, so that a GPU need not copy
//! vocabulary-sized rows. The tokens are the same either way (tests/generate_rows.rs).

use super::engine::{Engine, EngineError, Sequence};
use super::stop::{Released, StopError, StopMatcher};
use crate::backend::{OutputKind, RowOutput, StepOutputs};
use crate::sample::{SampleError, Sampler, SamplerConfig};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use serde::Serialize;
use std::collections::VecDeque;
use std::ops::{ControlFlow, Range};
use std::time::{Duration, Instant};

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// The most tokens to generate.
    pub max_new_tokens: usize,
    pub sampler: SamplerConfig,
    /// Stop at any of these strings (the output ends before it).
    pub stop_strings: Vec<String>,
    /// Stop at an end-of-generation token (on unless a test wants fixed-length output).
    pub stop_at_eog: bool,
    /// Render special (control) tokens in the text, e.g. `<|im_end|>`.
    pub render_special: bool,
}

impl Default for GenerateOptions {
    fn default() -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: 256,
            sampler: SamplerConfig::default(),
            stop_strings: Vec::new(),
            stop_at_eog: true,
            render_special: false,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    EndOfGeneration { token: u32 },
    /// A stop string appeared in the text.
    StopString { stop: String },
    /// `max_new_tokens` tokens were generated.
    MaxTokens,
    /// The sequence reached the context size.
    ContextFull,
    /// The consumer of the text stopped reading (its callback returned `Break`).
    Cancelled,
}

/// Wall-clock time spent in each phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Timings {
    pub prompt_tokens: usize,
    /// Prefill steps (the prompt's forward passes), in seconds.
    pub prefill_s: f64,
    /// Decode steps after the first sampled token.
    pub decode_steps: usize,
    pub decode_s: f64,
    /// Time spent sampling (all tokens), in seconds.
    pub sample_s: f64,
}

impl Timings {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_s)
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_steps, self.decode_s)
    }
}

fn rate(n: usize, s: f64) -> f64 {
    if s > 0.0 { n as f64 / s } else { 0.0 }
}

/// The result of [`generate`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Generation {
    /// The prompt's token ids.
    pub prompt_tokens: Vec<u32>,
    /// The generated ids (without a final end-of-generation token).
    pub tokens: Vec<u32>,
    /// The generated text as streamed (without a stop string).
    pub text: String,
    pub finish: FinishReason,
    /// The sampler's seed (chosen at random when none was given), to repeat a run.
    pub seed: u64,
    pub timings: Timings,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty: at least one token is needed to predict the next")]
    EmptyPrompt,
    #[error(
        "the prompt has {prompt} tokens but the context holds {n_ctx}: shorten it or raise --ctx-size"
    )]
    PromptTooLong { prompt: usize, n_ctx: usize },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Sample(#[from] SampleError),
    #[error(transparent)]
    Stop(#[from] StopError),
    #[error("decoding the generated tokens: {0}")]
    Decode(String),
    #[error("the step returned no output row to sample from")]
    NoOutput,
    #[error(
        "the top {k} logits are all +inf: the model's output is not finite, and which tokens tie cannot be told from the top {k}"
    )]
    InfiniteTopK { k: usize },
}

/// Which rows [`generate_with`] asks the backend for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowPolicy {
    /// The least the sampler needs ([`output_kind`]).
    Auto,
    /// Always the full row of logits (for tests and debugging).
    FullLogits,
}

/// The most `k` for which sampling asks the backend for its top-k rather than the full row.
pub const MAX_BACKEND_TOP_K: u32 = 1024;

/// The least a step must return for `config` to choose the same token as from the full row:
/// the argmax for greedy decoding, the top `k` when the sampler keeps only the top `k`
/// (`1..=MAX_BACKEND_TOP_K`, below the vocabulary), else the full logits. Penalties change
/// logits of tokens anywhere in the row, so they need the full row.
pub fn output_kind(config: &SamplerConfig, n_vocab: usize) -> OutputKind {
    if config.penalties_enabled() {
        OutputKind::Logits
    } else if config.is_greedy() {
        OutputKind::Argmax
    } else if (1..=MAX_BACKEND_TOP_K).contains(&config.top_k) && (config.top_k as usize) < n_vocab {
        OutputKind::TopK(config.top_k)
    } else {
        OutputKind::Logits
    }
}

/// Chooses the next token from one output row, whatever it holds: a full row goes to the
/// sampler; an argmax is the greedy choice; a top-k is spread into `scratch` (a row of
/// `n_vocab` logits, -inf outside the top k, restored afterwards) for the sampler, whose top-k
/// stage then keeps exactly those tokens. Either way the token is the one the sampler picks
/// from the full row, given a sampler config that [`output_kind`] chose the row for.
pub fn sample_output(
    sampler: &mut Sampler,
    row: RowOutput<'_>,
    history: &[u32],
    n_vocab: usize,
    scratch: &mut Vec<f32>,
) -> Result<u32, GenerateError> {
    match row {
        RowOutput::Logits(logits) => Ok(sampler.sample(logits, history)?),
        RowOutput::Argmax(best) => {
            if best.logit.is_nan() || best.logit == f32::NEG_INFINITY {
                Err(SampleError::NoCandidates { vocab: n_vocab }.into())
            } else {
                Ok(best.id)
            }
        }
        RowOutput::TopK(top) => {
            let k = top.len();
            if k > 0 && top.iter().all(|t| t.logit == f32::INFINITY) && k < n_vocab {
                return Err(GenerateError::InfiniteTopK { k });
            }
            if scratch.len() != n_vocab {
                scratch.clear();
                scratch.resize(n_vocab, f32::NEG_INFINITY);
            }
            for t in top {
                if let Some(l) = scratch.get_mut(t.id as usize) {
                    *l = t.logit;
                }
            }
            let token = sampler.sample(scratch, history);
            for t in top {
                if let Some(l) = scratch.get_mut(t.id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            Ok(token?)
        }
    }
}

/// Generates from `prompt` (token ids) in a fresh sequence, calling `on_text` with each piece of
/// text as soon as it is final (never a partial UTF-8 character, never the start of a stop
/// string that may still complete). `on_text` returns `ControlFlow::Break` to stop early.
pub fn generate(
    engine: &mut Engine,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation, GenerateError> {
    generate_with(engine, tokenizer, prompt, options, RowPolicy::Auto, on_text)
}

/// [`generate`], choosing what each step returns.
pub fn generate_with(
    engine: &mut Engine,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
    rows: RowPolicy,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if prompt.len() > engine.n_ctx() {
        return Err(GenerateError::PromptTooLong {
            prompt: prompt.len(),
            n_ctx: engine.n_ctx(),
        });
    }
    let kind = match rows {
        RowPolicy::Auto => output_kind(&options.sampler, engine.n_vocab()),
        RowPolicy::FullLogits => OutputKind::Logits,
    };
    let mut cont = Continuation::new(tokenizer, options, kind)?;
    let mut seq = engine.new_sequence();
    let result = run(engine, &mut seq, prompt, &mut cont, on_text);
    engine.release(seq);
    result
}

/// The per-sequence half of generation, shared by [`generate`] and the server's scheduler:
/// the sampler, the stop strings, the streaming decoder and the generated tokens. The caller
/// runs the steps; [`accept`](Self::accept) takes each step's output row for this sequence,
/// samples the next token and applies the stop rules of the [module docs](self).
pub struct Continuation<'t> {
    tokenizer: &'t Tokenizer,
    decoder: StreamDecoder<'t>,
    stops: StopMatcher,
    /// Which bytes given to `stops` came from hidden special tokens (cut from what is released).
    hidden: HiddenText,
    sampler: Sampler,
    stop_strings: Vec<String>,
    max_new_tokens: usize,
    stop_at_eog: bool,
    render_special: bool,
    kind: OutputKind,
    tokens: Vec<u32>,
    text: String,
    scratch: Vec<f32>,
}

impl<'t> Continuation<'t> {
    /// Checks `options` (sampler ranges, stop strings) and starts an empty continuation whose
    /// steps return `kind` rows.
    pub fn new(
        tokenizer: &'t Tokenizer,
        options: &GenerateOptions,
        kind: OutputKind,
    ) -> Result<Continuation<'t>, GenerateError> {
        Ok(Continuation {
            tokenizer,
            decoder: tokenizer.stream_decoder(options.render_special),
            stops: StopMatcher::new(options.stop_strings.iter().cloned())?,
            hidden: HiddenText::default(),
            sampler: Sampler::new(options.sampler.clone())?,
            stop_strings: options.stop_strings.clone(),
            max_new_tokens: options.max_new_tokens,
            stop_at_eog: options.stop_at_eog,
            render_special: options.render_special,
            kind,
            tokens: Vec::new(),
            text: String::new(),
            scratch: Vec::new(),
        })
    }

    /// What each step must return for this sequence.
    pub fn kind(&self) -> OutputKind {
        self.kind
    }

    /// The tokens generated so far (without a final end-of-generation token).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The last generated token: the one the next decode step feeds.
    pub fn last_token(&self) -> Option<u32> {
        self.tokens.last().copied()
    }

    /// What the next decode step feeds: the last generated token (empty before the first).
    pub fn next_input(&self) -> &[u32] {
        let n = self.tokens.len();
        self.tokens.get(n.saturating_sub(1)..).unwrap_or_default()
    }

    /// The text released so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The sampler's seed.
    pub fn seed(&self) -> u64 {
        self.sampler.seed()
    }

    /// Samples the next token from `row` (`history`: the sequence's tokens), passes the text it
    /// releases to `on_text`, and says whether generation ends here. `room` says whether the
    /// sequence can take another token. `Continue` means: feed [`last_token`](Self::last_token)
    /// in the next step.
    pub fn accept(
        &mut self,
        row: RowOutput<'_>,
        history: &[u32],
        n_vocab: usize,
        room: bool,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Option<FinishReason>, GenerateError> {
        if self.tokens.len() >= self.max_new_tokens {
            return Ok(Some(self.finish(FinishReason::MaxTokens, on_text)));
        }
        let token = sample_output(&mut self.sampler, row, history, n_vocab, &mut self.scratch)?;
        if self.stop_at_eog && self.tokenizer.is_eog(token) {
            return Ok(Some(
                self.finish(FinishReason::EndOfGeneration { token }, on_text),
            ));
        }
        self.tokens.push(token);
        let piece = self
            .decoder
            .push(token)
            .map_err(|e| GenerateError::Decode(e.to_string()))?;
        let mut released = self.hidden.push(&mut self.stops, &piece, false);
        if !self.render_special && self.tokenizer.is_control(token) {
            // Not shown, but stop strings still see its text.
            let special =
                String::from_utf8_lossy(self.tokenizer.token_piece(token).unwrap_or_default());
            let more = self.hidden.push(&mut self.stops, &special, true);
            released.text.push_str(&more.text);
            released.stop = released.stop.or(more.stop);
        }
        let flow = emit(&released.text, &mut self.text, on_text);
        if let Some(i) = released.stop {
            let stop = self.stop_strings.get(i).cloned().unwrap_or_default();
            return Ok(Some(FinishReason::StopString { stop }));
        }
        if flow.is_break() {
            return Ok(Some(FinishReason::Cancelled));
        }
        if self.tokens.len() >= self.max_new_tokens {
            return Ok(Some(self.finish(FinishReason::MaxTokens, on_text)));
        }
        if !room {
            return Ok(Some(self.finish(FinishReason::ContextFull, on_text)));
        }
        Ok(None)
    }

    /// Releases whatever the decoder and the stop matcher still hold (it is final now).
    fn finish(
        &mut self,
        reason: FinishReason,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> FinishReason {
        let decoder = std::mem::replace(
            &mut self.decoder,
            self.tokenizer.stream_decoder(self.render_special),
        );
        let released = self.hidden.push(&mut self.stops, &decoder.finish(), false);
        let _ = emit(&released.text, &mut self.text, on_text);
        let rest = self.stops.finish();
        let rest = self.hidden.visible(rest).text;
        let _ = emit(&rest, &mut self.text, on_text);
        reason
    }
}

fn emit(
    piece: &str,
    text: &mut String,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> ControlFlow<()> {
    if piece.is_empty() {
        return ControlFlow::Continue(());
    }
    text.push_str(piece);
    on_text(piece)
}

fn run(
    engine: &mut Engine,
    seq: &mut Sequence,
    prompt: &[u32],
    cont: &mut Continuation<'_>,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation, GenerateError> {
    let mut timings = Timings {
        prompt_tokens: prompt.len(),
        ..Timings::default()
    };
    let n_vocab = engine.n_vocab();
    let kind = cont.kind();
    let mut out = StepOutputs::new();
    let t = Instant::now();
    engine.prefill_into(seq, prompt, kind, &mut out)?;
    timings.prefill_s = t.elapsed().as_secs_f64();

    let mut sample_time = Duration::ZERO;
    let finish = loop {
        let t = Instant::now();
        let row = out.row(0).ok_or(GenerateError::NoOutput)?;
        let room = seq.len() < engine.n_ctx();
        let done = cont.accept(row, seq.tokens(), n_vocab, room, on_text)?;
        sample_time += t.elapsed();
        if let Some(finish) = done {
            break finish;
        }
        let token = cont.last_token().ok_or(GenerateError::NoOutput)?;
        let t = Instant::now();
        engine.decode_into(seq, token, kind, &mut out)?;
        timings.decode_s += t.elapsed().as_secs_f64();
        timings.decode_steps += 1;
    };
    timings.sample_s = sample_time.as_secs_f64();
    Ok(Generation {
        prompt_tokens: prompt.to_vec(),
        tokens: cont.tokens().to_vec(),
        text: cont.text().to_string(),
        finish,
        seed: cont.seed(),
        timings,
    })
}

/// Tracks which bytes of the text given to the stop matcher came from hidden special tokens, so
/// that they can be cut out of what the matcher releases (which is always the next part of the
/// text pushed, in order).
#[derive(Default)]
struct HiddenText {
    /// Bytes pushed so far, and bytes released so far.
    pushed: usize,
    released: usize,
    /// Byte ranges of hidden text not yet released, ascending.
    hidden: VecDeque<Range<usize>>,
}

impl HiddenText {
    fn push(&mut self, stops: &mut StopMatcher, text: &str, hidden: bool) -> Released {
        if hidden && !text.is_empty() {
            self.hidden.push_back(self.pushed..self.pushed + text.len());
        }
        self.pushed += text.len();
        let released = stops.push(text);
        self.visible(released)
    }

    /// `released` without its hidden bytes.
    fn visible(&mut self, released: Released) -> Released {
        let start = self.released;
        let end = start + released.text.len();
        self.released = end;
        if self.hidden.is_empty() {
            return released;
        }
        let slice = |a: usize, b: usize| released.text.get(a - start..b - start).unwrap_or("");
        let mut text = String::new();
        let mut at = start;
        for h in &self.hidden {
            if h.start >= end {
                break;
            }
            if h.end <= at {
                continue;
            }
            text.push_str(slice(at, h.start.max(at)));
            at = h.end.min(end);
        }
        text.push_str(slice(at, end));
        while self.hidden.front().is_some_and(|h| h.end <= end) {
            self.hidden.pop_front();
        }
        Released {
            text,
            stop: released.stop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_text_is_matched_but_not_released() {
        let mut stops = StopMatcher::new(["<|x|>", "ab"]).unwrap();
        let mut h = HiddenText::default();
        let mut out = String::new();
        out += &h.push(&mut stops, "hello ", false).text;
        out += &h.push(&mut stops, "<|y|>", true).text;
        out += &h.push(&mut stops, "world", false).text;
        let r = h.push(&mut stops, "<|x|>", true);
        out += &r.text;
        assert_eq!(r.stop, Some(0));
        assert_eq!(out, "hello world");
    }

    #[test]
    fn hidden_text_is_cut_from_held_text() {
        // "a" is held (it may start "ab"), then hidden text, then the end.
        let mut stops = StopMatcher::new(["ab"]).unwrap();
        let mut h = HiddenText::default();
        let mut out = h.push(&mut stops, "xa", false).text;
        out += &h.push(&mut stops, "<s>", true).text;
        out += &h.push(&mut stops, "c", false).text;
        out += &h.visible(stops.finish()).text;
        assert_eq!(out, "xac");
    }
}
