//! `gate-up-merge`: `swiglu(x·Wg, x·Wu)` → `gate_up_swiglu(x, Wg, Wu)`, when both matmuls read
//! the same `x` and feed only the swiglu. The gate and up activations are never stored.

use super::{Pass, sole_user};
use crate::ir::{Graph, IrError, Op, Value};

pub struct GateUpMerge;

impl Pass for GateUpMerge {
    fn name(&self) -> &'static str {
        "gate-up-merge"
    }

    fn run(&self, graph: &mut Graph) -> Result<usize, IrError> {
        let mut rewrites = 0;
        for id in graph.topo_order()? {
            if !matches!(graph.get(id).map(|n| &n.op), Some(Op::SwiGlu)) {
                continue;
            }
            let [gate, up] = graph.inputs(id)[..] else {
                continue;
            };
            let is_matmul = |v: Value| graph.node(v.node).op == Op::MatMul;
            if gate.node == up.node || !is_matmul(gate) || !is_matmul(up) {
                continue;
            }
            if sole_user(graph, gate) != Some((id, 0)) || sole_user(graph, up) != Some((id, 1)) {
                continue;
            }
            let [x, w_gate] = graph.inputs(gate.node)[..] else {
                continue;
            };
            let [x_up, w_up] = graph.inputs(up.node)[..] else {
                continue;
            };
            if x != x_up {
                continue;
            }
            let out = Value::new(id, 0);
            let name = graph.value_name(out).to_string();
            graph.fuse(
                &[gate.node, up.node, id],
                name,
                Op::GateUpSwiGlu,
                &[x, w_gate, w_up],
                &[out],
            )?;
            rewrites += 1;
        }
        Ok(rewrites)
    }
}
