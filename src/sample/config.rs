//! Sampling parameters: their meanings, defaults (llama.cpp's) and valid ranges.

use super::SampleError;
use serde::{Deserialize, Serialize};

/// How the next token is chosen from a vector of logits.
///
/// The defaults are llama.cpp's (`common_params_sampling`). Every field has a value that turns
/// its stage off, so a config can enable exactly the stages it wants. Deserializing fills missing
/// fields with their defaults and rejects unknown ones; ranges are checked by [`validate`]
/// (which [`Sampler::new`](super::Sampler::new) calls), not by deserialization.
///
/// [`validate`]: SamplerConfig::validate
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerConfig {
    /// Softmax temperature, applied after the filters. `<= 0` is greedy: the token with the
    /// highest (penalized) logit, the lowest id on ties, and no random number is drawn.
    /// Must be finite. Default 0.8.
    pub temperature: f32,
    /// Keep only the `top_k` tokens with the highest logits. 0 turns it off. Default 40.
    pub top_k: u32,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probabilities
    /// (softmax at temperature 1 of what top-k kept) add up to at least `top_p`. At least one
    /// token is kept, so 0 keeps only the most likely one. In `[0, 1]`; 1 turns it off.
    /// Default 0.95.
    pub top_p: f32,
    /// Keep only tokens whose probability is at least `min_p` times the most likely token's,
    /// i.e. whose logit is at least `max_logit + ln(min_p)`. In `[0, 1]`; 0 turns it off.
    /// Default 0.05.
    pub min_p: f32,
    /// How many of the most recent history tokens the penalties look at: 0 turns the penalties
    /// off, -1 means the whole history given to `sample`. Default 64.
    pub repeat_last_n: i32,
    /// Repetition penalty for tokens in the window: a positive logit is divided by it, a
    /// negative one multiplied (so > 1 always makes repeats less likely). Must be finite and
    /// > 0; 1 turns it off. Default 1.0.
    pub repeat_penalty: f32,
    /// Subtracted from a token's logit once per occurrence in the window (OpenAI's
    /// `frequency_penalty`). Must be finite; negative values encourage repeats. 0 turns it off.
    /// Default 0.
    pub frequency_penalty: f32,
    /// Subtracted once from the logit of every token that occurs in the window (OpenAI's
    /// `presence_penalty`). Must be finite. 0 turns it off. Default 0.
    pub presence_penalty: f32,
    /// Seed of the ChaCha20 generator. `None` takes a seed from the operating system;
    /// [`Sampler::seed`](super::Sampler::seed) reports it so the run can be repeated.
    pub seed: Option<u64>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_last_n: 64,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding: temperature 0, every other stage off.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_last_n: 0,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
        }
    }

    /// Whether this config picks the argmax (temperature `<= 0`).
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Whether any penalty is active (llama.cpp's rule: a window and a non-neutral penalty).
    pub fn penalties_enabled(&self) -> bool {
        self.repeat_last_n != 0
            && (self.repeat_penalty != 1.0
                || self.frequency_penalty != 0.0
                || self.presence_penalty != 0.0)
    }

    /// Checks every field's range; the error names the first bad field.
    pub fn validate(&self) -> Result<(), SampleError> {
        fn bad(name: &'static str, value: impl ToString, expected: &'static str) -> SampleError {
            SampleError::InvalidParameter {
                name,
                value: value.to_string(),
                expected,
            }
        }
        if !self.temperature.is_finite() {
            return Err(bad(
                "temperature",
                self.temperature,
                "must be a finite number (<= 0 for greedy)",
            ));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(bad(
                "top_p",
                self.top_p,
                "must be between 0 and 1 (1 turns it off)",
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(bad(
                "min_p",
                self.min_p,
                "must be between 0 and 1 (0 turns it off)",
            ));
        }
        if self.repeat_last_n < -1 {
            return Err(bad(
                "repeat_last_n",
                self.repeat_last_n,
                "must be >= 0, or -1 for the whole history",
            ));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(bad(
                "repeat_penalty",
                self.repeat_penalty,
                "must be a finite number > 0 (1 turns it off)",
            ));
        }
        if !self.frequency_penalty.is_finite() {
            return Err(bad(
                "frequency_penalty",
                self.frequency_penalty,
                "must be a finite number (0 turns it off)",
            ));
        }
        if !self.presence_penalty.is_finite() {
            return Err(bad(
                "presence_penalty",
                self.presence_penalty,
                "must be a finite number (0 turns it off)",
            ));
        }
        Ok(())
    }
}
