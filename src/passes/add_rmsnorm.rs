//! `add-rmsnorm`: `rms_norm(a + b, w)` → `add_rms_norm(a, b, w)`, a node with two outputs: the
//! sum (the residual stream, still read by the next residual add) and the normed value. Both keep
//! their names. Only same-shaped adds fuse (not a bias add).

use super::{Pass, joined_name};
use crate::ir::{Graph, IrError, Op, Value};

pub struct AddRmsNormFusion;

impl Pass for AddRmsNormFusion {
    fn name(&self) -> &'static str {
        "add-rmsnorm"
    }

    fn run(&self, graph: &mut Graph) -> Result<usize, IrError> {
        let mut rewrites = 0;
        for id in graph.topo_order()? {
            let Some(Op::RmsNorm { eps }) = graph.get(id).map(|n| n.op.clone()) else {
                continue;
            };
            let [sum, w] = graph.inputs(id)[..] else {
                continue;
            };
            if graph.node(sum.node).op != Op::Add {
                continue;
            }
            let [a, b] = graph.inputs(sum.node)[..] else {
                continue;
            };
            if graph.value_type(a) != graph.value_type(b) {
                continue;
            }
            let normed = Value::new(id, 0);
            let name = joined_name(&[graph.value_name(sum), graph.value_name(normed)]);
            graph.fuse(
                &[sum.node, id],
                name,
                Op::AddRmsNorm { eps },
                &[a, b, w],
                &[sum, normed],
            )?;
            rewrites += 1;
        }
        Ok(rewrites)
    }
}
