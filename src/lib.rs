//! m40-llm: an LLM inference runtime for Tesla M40 (sm_52) and newer NVIDIA GPUs, built as a
//! compute-graph compiler.
//!
//! Data flows one way through the modules:
//! `gguf` (read, validate, dequantize) → `lower` (GGUF metadata → typed op graph) → `passes`
//! (fusion) → `plan` (schedule + buffer allocation) → `backend` (CPU reference, CUDA) →
//! `runtime` (sessions, decode loop) → `cli` / server.

pub mod backend;
pub mod compile;
pub mod gguf;
pub mod inspect;
pub mod ir;
pub mod lower;
pub mod passes;
pub mod plan;
pub mod runtime;
pub mod sample;
pub mod seed;
#[cfg(feature = "server")]
pub mod server;
pub mod tokenizer;
pub mod units;

pub use compile::{CompileError, CompileOptions, Compiled, compile};
