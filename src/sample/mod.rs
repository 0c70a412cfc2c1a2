//! Sampling: choosing the next token from a logits vector.
//!
//! The chain is llama.cpp's default order (`common/sampling.cpp`):
//!
//! 1. **penalties** over the last `repeat_last_n` tokens of the history: repetition
//!    (`repeat_penalty`), frequency and presence;
//! 2. **top-k**, 3. **top-p**, 4. **min-p**, each computed on the penalized logits at
//!    temperature 1;
//! 5. **temperature**, 6. a **draw** from the softmax of what is left, with a ChaCha20 generator
//!    seeded from [`SamplerConfig::seed`].
//!
//! Temperature `<= 0` is greedy: the argmax of the penalized logits (lowest id on ties), with no
//! random draw. See [`SamplerConfig`] for each parameter and docs/sampling.md for the whole
//! contract.
//!
//! ```
//! use m40_llm::sample::{Sampler, SamplerConfig};
//!
//! let config = SamplerConfig { seed: Some(42), ..SamplerConfig::default() };
//! let mut sampler = Sampler::new(config)?;
//! let logits = [0.1, 2.0, 1.5, -3.0];
//! let token = sampler.sample(&logits, &[])?;
//! assert_ne!(token, 3); // top-p 0.95 cuts token 3 (probability 0.4%)
//! # Ok::<(), m40_llm::sample::SampleError>(())
//! ```
//!
//! Determinism: for a given seed, config, logits and history the token is the same on every
//! run, machine and thread count (no parallelism, no hash maps, fixed summation order, portable
//! `exp`/`ln`). Different backends give the same tokens exactly when they give the same logits.

mod config;
mod error;
mod sampler;

pub use config::SamplerConfig;
pub use error::SampleError;
pub use sampler::Sampler;
