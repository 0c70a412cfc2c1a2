//! `qkv-merge`: the matmuls that read the same activation become one `multi_matmul`, which reads
//! the activation once and writes each product to its own buffer. In a llama block these are the
//! q, k and v projections (the gate and up projections are taken by `gate-up-merge` first).

use super::{Pass, Rewrite, joined_name, rewrite_each};
use crate::ir::{Graph, IrError, Op, Value};

pub struct QkvMerge;

impl Pass for QkvMerge {
    fn name(&self) -> &'static str {
        "qkv-merge"
    }

    fn run(&self, graph: &mut Graph) -> Result<usize, IrError> {
        // One rewrite per output port with sibling matmuls; different ports' siblings are
        // different nodes, so the rewrites of one node do not overlap.
        rewrite_each(graph, |graph, id, node| {
            (0..node.outputs.len())
                .filter_map(|port| siblings_of(graph, Value::new(id, port as u8)))
                .collect::<Vec<_>>()
        })
    }
}

/// The `multi_matmul` replacing the matmuls that read `x` as their activation, if there are
/// at least two.
fn siblings_of(graph: &Graph, x: Value) -> Option<Rewrite> {
    // Matmuls reading `x` as their activation, in program order.
    let siblings: Vec<Value> = graph
        .users(x)
        .into_iter()
        .filter(|&(user, slot)| slot == 0 && graph.node(user).op == Op::MatMul)
        .map(|(user, _)| Value::new(user, 0))
        .collect();
    let n = u8::try_from(siblings.len()).ok()?;
    if n < 2 {
        return None;
    }
    let weights: Vec<Value> = siblings
        .iter()
        .filter_map(|m| graph.inputs(m.node).get(1).copied())
        .collect();
    if weights.len() != siblings.len() {
        return None;
    }
    let names: Vec<&str> = siblings.iter().map(|&m| graph.value_name(m)).collect();
    Some(Rewrite {
        replaced: siblings.iter().map(|m| m.node).collect(),
        name: joined_name(&names),
        op: Op::MultiMatMul { n },
        inputs: std::iter::once(x).chain(weights).collect(),
        ports: siblings,
    })
}
