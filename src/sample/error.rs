//! Errors of the sampler. Parameters come from CLI flags and HTTP requests, so each error names
//! the parameter, the value it got and what it accepts.

/// A sampler could not be built, or a token could not be drawn.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SampleError {
    /// A [`SamplerConfig`](super::SamplerConfig) field is out of its range.
    #[error("invalid sampling parameter {name} = {value}: {expected}")]
    InvalidParameter {
        /// The field name, as written in the config (and in JSON requests).
        name: &'static str,
        /// The rejected value, printed.
        value: String,
        /// What the parameter accepts.
        expected: &'static str,
    },

    /// `sample` was given no logits.
    #[error("cannot sample from an empty logits vector")]
    EmptyLogits,

    /// More logits than token ids fit in a `u32`.
    #[error("{len} logits: a vocabulary cannot have more than 2^32 tokens")]
    VocabTooLarge { len: usize },

    /// Every logit is NaN or -inf (after penalties), so no token has a non-zero probability.
    /// This points at a broken forward pass, so it is an error rather than an arbitrary token.
    #[error("all {vocab} logits are NaN or -inf: there is no token to sample")]
    NoCandidates { vocab: usize },

    /// A token in the penalty window has no logit: the history and the logits come from
    /// different vocabularies.
    #[error(
        "token {token} in the penalty history is outside the vocabulary ({vocab} logits); \
         the history and the logits must use the same vocabulary"
    )]
    TokenOutOfRange { token: u32, vocab: usize },

    /// No seed was given and the operating system could not provide one.
    #[error("cannot seed the sampler from the operating system's random source: {0}")]
    Entropy(String),
}
