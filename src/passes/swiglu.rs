//! `swiglu`: `mul(silu(gate), up)` → `swiglu(gate, up)`, when the silu feeds nothing else.

use super::{Pass, Rewrite, rewrite_each, sole_user};
use crate::ir::{Graph, IrError, Op, Value};

pub struct SwiGluFusion;

impl Pass for SwiGluFusion {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn run(&self, graph: &mut Graph) -> Result<usize, IrError> {
        rewrite_each(graph, |graph, id, node| {
            if node.op != Op::Mul {
                return None;
            }
            let [silu, up] = graph.inputs(id)[..] else {
                return None;
            };
            if graph.node(silu.node).op != Op::Silu || sole_user(graph, silu) != Some((id, 0)) {
                return None;
            }
            let [gate] = graph.inputs(silu.node)[..] else {
                return None;
            };
            let product = Value::new(id, 0);
            Some(Rewrite {
                replaced: vec![silu.node, id],
                name: graph.value_name(product).to_string(),
                op: Op::SwiGlu,
                inputs: vec![gate, up],
                ports: vec![product],
            })
        })
    }
}
