//! The CPU backend's compute kernels: pure functions over slices, FP32 arithmetic.
//!
//! Each kernel implements the math of one op (see `ir::op` for the spec) and documents the ggml
//! function it must agree with, since the CPU backend's logits are compared with llama.cpp's.
//! Kernels know nothing of the graph: they take slices and sizes, check that the sizes agree
//! (a mismatch is a [`KernelError`], never a panic), and allocate nothing inside their loops.
//!
//! - [`matmul`](mod@matmul): `y = x Wᵀ` over a GGUF weight in its own storage type, fused per format;
//!   [`matmul_gate_up_swiglu`] for the SwiGLU feed-forward's first half.
//! - [`gather`]: [`embedding`] (rows of a quantized table to F32) and [`select_rows`].
//! - [`norm`]: [`rms_norm`] (per row or per group) and [`add_rms_norm`].
//! - [`elementwise`]: [`add`], [`mul`] (with row broadcast), [`silu`], [`swiglu`].
//! - [`rope`](mod@rope): rotary position embedding, normal and neox pairing, as ggml computes the angles.
//! - [`softmax`](mod@softmax): max-subtracted softmax over rows.
//! - [`attention`](mod@attention): causal grouped-query attention over an FP16 KV cache, and [`kv_write`].
//!
//! Hot loops are written once, generically over an 8-lane vector type, and compiled twice: with
//! plain arrays for any CPU, and with AVX2/FMA/F16C registers, picked at run time (see [`Simd`]
//! and `simd.rs`; LLVM's auto-vectorizer split the quantized decodes into 2-lane pieces, hence
//! the explicit vector type).
//!
//! Every kernel computes each output row from its own inputs only, in an order that does not
//! depend on how many rows a call has or how the work is split across threads: a row's result is
//! bit-identical whether it is computed in a prefill of 512 tokens or alone in a decode step.

pub mod attention;
pub mod elementwise;
mod formats;
pub mod gather;
pub mod matmul;
pub mod norm;
pub mod rope;
mod simd;
pub mod softmax;

pub use attention::{AttentionShape, KvSpan, attention, attention_paged, kv_write};
pub use elementwise::{add, mul, silu, swiglu};
pub use gather::{embedding, select_rows};
pub use matmul::{WeightMatrix, matmul, matmul_gate_up_swiglu};
pub use norm::{add_rms_norm, rms_norm};
pub use rope::{RopeSpec, RopeStyle, rope, rope_kv_write};
pub use simd::Simd;
pub use softmax::softmax;

use crate::gguf::GgmlType;

/// Why a kernel cannot run: the inputs it was given do not fit together, or name something it
/// does not have. Every message says which input is wrong and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error(
        "{op} does not support weights of type {ty} (supported: {})",
        matmul::supported_names()
    )]
    UnsupportedType { op: &'static str, ty: GgmlType },
    #[error("a {ty} row of {k} elements is not a whole number of {block}-element blocks")]
    PartialBlock {
        ty: GgmlType,
        k: usize,
        block: usize,
    },
    #[error("a {ty} weight of {n} rows of {k} elements takes {expected} bytes, got {got}")]
    WeightBytes {
        ty: GgmlType,
        n: usize,
        k: usize,
        expected: usize,
        got: usize,
    },
    #[error("{what}: expected {expected}, got {got}")]
    Shape {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what} {index} is {value}, outside 0..{limit}")]
    OutOfRange {
        what: &'static str,
        index: usize,
        value: i64,
        limit: usize,
    },
    #[error("token {token} attends to no cache cell")]
    NoCells { token: usize },
    #[error("{0}")]
    Invalid(String),
}

/// Checks a length; `what` names the input in the error.
pub(crate) fn check_len(
    what: &'static str,
    got: usize,
    expected: usize,
) -> Result<(), KernelError> {
    if got == expected {
        Ok(())
    } else {
        Err(KernelError::Shape {
            what,
            expected,
            got,
        })
    }
}
