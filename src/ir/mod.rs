//! The typed op graph: what a model computes in one step, independent of any backend.
//!
//! - [`types`]: tensor types with a symbolic tokens-per-step dimension, and the KV-cache state;
//! - [`op`]: the closed set of operations, each documenting its exact math;
//! - [`graph`]: nodes with typed, named output ports in a petgraph `StableGraph`;
//! - [`infer`](mod@infer): shape inference, run whenever a node is added;
//! - [`verify`](mod@verify): the invariants checked after lowering and after every pass;
//! - [`digest`](mod@digest): a name-blind fingerprint of what a graph computes, for tests.
//!
//! The per-step descriptor the step inputs and the attention ops read (tokens, slots, positions,
//! page tables) belongs to the backend interface: `backend::step`.

pub mod digest;
pub mod graph;
pub mod infer;
pub mod op;
pub mod types;
pub mod verify;

pub use digest::{Digest, digest};
pub use graph::{Edge, Graph, IrError, Node, NodeId, Output, Value};
pub use op::{AttentionParams, KvParams, Op, RopeParams, RopeStyle};
pub use types::{DType, Dim, KV_DTYPE, KvCacheType, Shape, StepSizes, TensorType, ValueType};
pub use verify::{VerifyError, verify};
