//! A structural digest of a graph: what it computes, ignoring names and node ids. Two graphs with
//! equal digests have the same ops wired the same way (up to 64-bit hash collisions). Tests use it
//! to check that a rewrite preserved a computation: `digest(unfuse(fuse(g))) == digest(g)`.

use super::graph::{Graph, IrError, NodeId};
use super::op::Op;
use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

/// The multiset of node hashes (each covering the node's op and, recursively, its inputs) and the
/// hashes of the graph outputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    pub nodes: Vec<u64>,
    pub outputs: Vec<(u64, u8)>,
}

/// The digest of `graph`. A weight hashes as its tensor name and type; every other node as its
/// op (with parameters) and its inputs' hashes and ports in slot order.
pub fn digest(graph: &Graph) -> Result<Digest, IrError> {
    let mut hashes: HashMap<NodeId, u64> = HashMap::new();
    for id in graph.topo_order()? {
        let node = graph.node(id);
        let mut h = DefaultHasher::new();
        match &node.op {
            Op::Weight { tensor } => {
                tensor.hash(&mut h);
                node.outputs[0].ty.hash(&mut h);
            }
            // The parameters are part of what a node computes: hash the op's serialized form.
            op => serde_json::to_string(op).unwrap_or_default().hash(&mut h),
        }
        for v in graph.inputs(id) {
            (hashes[&v.node], v.port).hash(&mut h);
        }
        hashes.insert(id, h.finish());
    }
    let mut nodes: Vec<u64> = hashes.values().copied().collect();
    nodes.sort_unstable();
    let outputs = graph
        .outputs()
        .iter()
        .map(|v| (hashes[&v.node], v.port))
        .collect();
    Ok(Digest { nodes, outputs })
}
