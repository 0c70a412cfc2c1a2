//! `gate-up-merge`: `swiglu(x·Wg, x·Wu)` → `gate_up_swiglu(x, Wg, Wu)`, when both matmuls read
//! the same `x` and feed only the swiglu. The gate and up activations are never stored.

use super::{Pass, Rewrite, rewrite_each, sole_user};
use crate::ir::{Graph, IrError, Op, Value};

pub struct GateUpMerge;

impl Pass for GateUpMerge {
    fn name(&self) -> &'static str {
        "gate-up-merge"
    }

    fn run(&self, graph: &mut Graph) -> Result<usize, IrError> {
        rewrite_each(graph, |graph, id, node| {
            if node.op != Op::SwiGlu {
                return None;
            }
            let [gate, up] = graph.inputs(id)[..] else {
                return None;
            };
            let is_matmul = |v: Value| graph.node(v.node).op == Op::MatMul;
            if gate.node == up.node || !is_matmul(gate) || !is_matmul(up) {
                return None;
            }
            if sole_user(graph, gate) != Some((id, 0)) || sole_user(graph, up) != Some((id, 1)) {
                return None;
            }
            let [x, w_gate] = graph.inputs(gate.node)[..] else {
                return None;
            };
            let [x_up, w_up] = graph.inputs(up.node)[..] else {
                return None;
            };
            if x != x_up {
                return None;
            }
            let out = Value::new(id, 0);
            Some(Rewrite {
                replaced: vec![gate.node, up.node, id],
                name: graph.value_name(out).to_string(),
                op: Op::GateUpSwiGlu,
                inputs: vec![x, w_gate, w_up],
                ports: vec![out],
            })
        })
    }
}
