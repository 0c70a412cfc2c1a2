//! `add-rmsnorm`: `rms_norm(a + b, w)` → `add_rms_norm(a, b, w)`, a node with two outputs: the
//! sum (the residual stream, still read by the next residual add) and the normed value. Both keep
//! their names. Only same-shaped adds fuse (not a bias add).

use super::{Pass, Rewrite, joined_name, rewrite_each};
use crate::ir::{Graph, IrError, Op, Value};

pub struct AddRmsNormFusion;

impl Pass for AddRmsNormFusion {
    fn name(&self) -> &'static str {
        "add-rmsnorm"
    }

    fn run(&self, graph: &mut Graph) -> Result<usize, IrError> {
        rewrite_each(graph, |graph, id, node| {
            let Op::RmsNorm { eps } = node.op else {
                return None;
            };
            let [sum, w] = graph.inputs(id)[..] else {
                return None;
            };
            if graph.node(sum.node).op != Op::Add {
                return None;
            }
            let [a, b] = graph.inputs(sum.node)[..] else {
                return None;
            };
            if graph.value_type(a) != graph.value_type(b) {
                return None;
            }
            let normed = Value::new(id, 0);
            Some(Rewrite {
                replaced: vec![sum.node, id],
                name: joined_name(&[graph.value_name(sum), graph.value_name(normed)]),
                op: Op::AddRmsNorm { eps },
                inputs: vec![a, b, w],
                ports: vec![sum, normed],
            })
        })
    }
}
