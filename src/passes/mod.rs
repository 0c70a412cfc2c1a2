//! Passes: named, separately testable rewrites of the graph, and the pipeline that runs them.
//!
//! Every pass in the default pipeline is a fusion: it replaces a few nodes by one fused op that
//! means exactly what they meant (each fused op documents its expansion, and [`unfuse`] performs
//! it). A fusion keeps the names and types of the values it keeps and drops intermediates, so a
//! fused graph computes the same named values with fewer launches and fewer buffers. After every
//! pass the pipeline runs the verifier: a pass that breaks an invariant is caught at once, by name.
//!
//! | pass | rewrites (per block) |
//! | --- | --- |
//! | `swiglu` | `mul(silu(g), u)` → `swiglu(g, u)` |
//! | `gate-up-merge` | `swiglu(x·Wg, x·Wu)` → `gate_up_swiglu(x, Wg, Wu)` |
//! | `qkv-merge` | matmuls reading the same input (q, k, v) → one `multi_matmul` |
//! | `add-rmsnorm` | `rms_norm(a + b)` → `add_rms_norm(a, b)`, yielding the sum and the norm |
//! | `rope-kv-write` | `kv_write(rope(k), v)` → `rope_kv_write(k, v)` |
//! | `rope-qkv-write` | `rope(q)` and `rope_kv_write(k, v)` read by one attention → `rope_qkv_write(q, k, v)`, yielding the rotated q and the cache |

mod add_rmsnorm;
mod gate_up;
mod qkv_merge;
mod rope_kv_write;
mod rope_qkv_write;
mod swiglu;
pub mod unfuse;

pub use add_rmsnorm::AddRmsNormFusion;
pub use gate_up::GateUpMerge;
pub use qkv_merge::QkvMerge;
pub use rope_kv_write::RopeKvWriteFusion;
pub use rope_qkv_write::RopeQkvWriteFusion;
pub use swiglu::SwiGluFusion;
pub use unfuse::{unfuse, unfuse_if};

use crate::ir::{Graph, IrError, Node, NodeId, Op, Value, VerifyError, verify};
use serde::{Deserialize, Serialize};

/// A graph rewrite.
pub trait Pass {
    /// The pass's name, as `--disable-pass` takes it and reports print it.
    fn name(&self) -> &'static str;
    /// Rewrites `graph` in place and returns the number of rewrites made (0: unchanged).
    fn run(&self, graph: &mut Graph) -> Result<usize, IrError>;
}

/// What one pass did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassRecord {
    pub pass: String,
    pub rewrites: usize,
    /// Compute nodes (everything but weights) after the pass.
    pub nodes_after: usize,
}

/// Why the pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("unknown pass `{name}` (the passes are: {})", known.join(", "))]
    UnknownPass {
        name: String,
        known: Vec<&'static str>,
    },
    #[error("pass {pass} failed: {source}")]
    Rewrite { pass: &'static str, source: IrError },
    #[error("pass {pass} broke the graph: {source}")]
    Broken {
        pass: &'static str,
        source: VerifyError,
    },
}

/// An ordered list of passes.
pub struct Pipeline {
    passes: Vec<Box<dyn Pass>>,
}

impl Pipeline {
    /// Every fusion, in the order they must run: `swiglu` before `gate-up-merge` (which matches
    /// `swiglu`), `gate-up-merge` before `qkv-merge` (which would otherwise merge the gate and up
    /// matmuls as siblings), `rope-kv-write` before `rope-qkv-write` (which folds the query's
    /// rope into the `rope_kv_write` it made; alone it matches the unfused `kv_write(rope(k))`).
    pub fn fusion() -> Pipeline {
        Pipeline {
            passes: vec![
                Box::new(SwiGluFusion),
                Box::new(GateUpMerge),
                Box::new(QkvMerge),
                Box::new(AddRmsNormFusion),
                Box::new(RopeKvWriteFusion),
                Box::new(RopeQkvWriteFusion),
            ],
        }
    }

    /// No passes (`--no-fuse`).
    pub fn empty() -> Pipeline {
        Pipeline { passes: Vec::new() }
    }

    /// The names of the passes, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// This pipeline without the passes called `names`; an unknown name is an error.
    pub fn without<S: AsRef<str>>(mut self, names: &[S]) -> Result<Pipeline, PassError> {
        let known = Pipeline::fusion().names();
        if let Some(bad) = names.iter().find(|n| !known.contains(&n.as_ref())) {
            return Err(PassError::UnknownPass {
                name: bad.as_ref().to_string(),
                known,
            });
        }
        self.passes
            .retain(|p| !names.iter().any(|n| n.as_ref() == p.name()));
        Ok(self)
    }

    /// Runs the passes in order, verifying the graph after each.
    pub fn run(&self, graph: &mut Graph) -> Result<Vec<PassRecord>, PassError> {
        let mut records = Vec::with_capacity(self.passes.len());
        for pass in &self.passes {
            let name = pass.name();
            let rewrites = pass
                .run(graph)
                .map_err(|source| PassError::Rewrite { pass: name, source })?;
            verify(graph).map_err(|source| PassError::Broken { pass: name, source })?;
            tracing::debug!(pass = name, rewrites, "pass done");
            records.push(PassRecord {
                pass: name.to_string(),
                rewrites,
                nodes_after: graph.n_compute_nodes(),
            });
        }
        Ok(records)
    }
}

/// One fusion a pass found: the arguments of [`Graph::fuse`].
struct Rewrite {
    /// The nodes the fused node replaces.
    replaced: Vec<NodeId>,
    name: String,
    op: Op,
    inputs: Vec<Value>,
    /// The values of `replaced` the fused node's ports take over, in port order.
    ports: Vec<Value>,
}

/// The skeleton of every fusion: visits the nodes in program order, asks `find` what to fuse at
/// each node still in the graph, and applies those rewrites in turn. Returns how many it applied.
fn rewrite_each<R>(
    graph: &mut Graph,
    mut find: impl FnMut(&Graph, NodeId, &Node) -> R,
) -> Result<usize, IrError>
where
    R: IntoIterator<Item = Rewrite>,
{
    let mut rewrites = 0;
    for id in graph.topo_order()? {
        let Some(node) = graph.get(id) else { continue };
        let found: Vec<Rewrite> = find(graph, id, node).into_iter().collect();
        for r in found {
            graph.fuse(&r.replaced, r.name, r.op, &r.inputs, &r.ports)?;
            rewrites += 1;
        }
    }
    Ok(rewrites)
}

/// The only reader of `value`, if it has exactly one and is not a graph output: the condition
/// for folding the value into its reader.
fn sole_user(graph: &Graph, value: Value) -> Option<(NodeId, u8)> {
    match graph.users(value).as_slice() {
        [only] if !graph.outputs().contains(&value) => Some(*only),
        _ => None,
    }
}

/// The name of a node fusing several values: their names joined by `+`, later names without the
/// first one's prefix (`blk.0.q+k+v`, `blk.0.l_out+blk.1.attn_norm`).
fn joined_name(names: &[&str]) -> String {
    let Some((first, rest)) = names.split_first() else {
        return String::new();
    };
    let prefix = first.rfind('.').map_or("", |i| &first[..=i]);
    let mut name = first.to_string();
    for n in rest {
        name.push('+');
        name.push_str(n.strip_prefix(prefix).unwrap_or(n));
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joined_names_drop_the_shared_prefix() {
        assert_eq!(
            joined_name(&["blk.0.q", "blk.0.k", "blk.0.v"]),
            "blk.0.q+k+v"
        );
        assert_eq!(
            joined_name(&["blk.0.l_out", "blk.1.attn_norm"]),
            "blk.0.l_out+blk.1.attn_norm"
        );
        assert_eq!(joined_name(&["a", "b"]), "a+b");
    }

    #[test]
    fn unknown_passes_are_named_in_the_error() {
        let err = Pipeline::fusion()
            .without(&["qkv-merge", "fuse-everything"])
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "unknown pass `fuse-everything` (the passes are: swiglu, gate-up-merge, qkv-merge, add-rmsnorm, rope-kv-write, rope-qkv-write)"
        );
        let p = Pipeline::fusion().without(&["qkv-merge"]).unwrap();
        assert_eq!(
            p.names(),
            [
                "swiglu",
                "gate-up-merge",
                "add-rmsnorm",
                "rope-kv-write",
                "rope-qkv-write"
            ]
        );
    }
}
