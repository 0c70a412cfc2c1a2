//! `swiglu`: `mul(silu(gate), up)` → `swiglu(gate, up)`, when the silu feeds nothing else.

use super::{Pass, sole_user};
use crate::ir::{Graph, IrError, Op, Value};

pub struct SwiGluFusion;

impl Pass for SwiGluFusion {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn run(&self, graph: &mut Graph) -> Result<usize, IrError> {
        let mut rewrites = 0;
        for id in graph.topo_order()? {
            if !matches!(graph.get(id).map(|n| &n.op), Some(Op::Mul)) {
                continue;
            }
            let [silu, up] = graph.inputs(id)[..] else {
                continue;
            };
            if graph.node(silu.node).op != Op::Silu || sole_user(graph, silu) != Some((id, 0)) {
                continue;
            }
            let [gate] = graph.inputs(silu.node)[..] else {
                continue;
            };
            let product = Value::new(id, 0);
            let name = graph.value_name(product).to_string();
            graph.fuse(&[silu.node, id], name, Op::SwiGlu, &[gate, up], &[product])?;
            rewrites += 1;
        }
        Ok(rewrites)
    }
}
