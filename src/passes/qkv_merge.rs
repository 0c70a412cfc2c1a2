//! `qkv-merge`: the matmuls that read the same activation become one `multi_matmul`, which reads
//! the activation once and writes each product to its own buffer. In a llama block these are the
//! q, k and v projections (the gate and up projections are taken by `gate-up-merge` first).

use super::{Pass, joined_name};
use crate::ir::{Graph, IrError, Op, Value};

pub struct QkvMerge;

impl Pass for QkvMerge {
    fn name(&self) -> &'static str {
        "qkv-merge"
    }

    fn run(&self, graph: &mut Graph) -> Result<usize, IrError> {
        let mut rewrites = 0;
        for id in graph.topo_order()? {
            let Some(node) = graph.get(id) else { continue };
            for port in 0..node.outputs.len() {
                let x = Value::new(id, port as u8);
                // Matmuls reading `x` as their activation, in program order.
                let siblings: Vec<Value> = graph
                    .users(x)
                    .into_iter()
                    .filter(|&(user, slot)| slot == 0 && graph.node(user).op == Op::MatMul)
                    .map(|(user, _)| Value::new(user, 0))
                    .collect();
                let Ok(n) = u8::try_from(siblings.len()) else {
                    continue;
                };
                if n < 2 {
                    continue;
                }
                let weights: Vec<Value> = siblings
                    .iter()
                    .filter_map(|m| graph.inputs(m.node).get(1).copied())
                    .collect();
                if weights.len() != siblings.len() {
                    continue;
                }
                let names: Vec<&str> = siblings.iter().map(|&m| graph.value_name(m)).collect();
                let name = joined_name(&names);
                let replaced: Vec<_> = siblings.iter().map(|m| m.node).collect();
                let inputs: Vec<Value> = std::iter::once(x).chain(weights).collect();
                graph.fuse(&replaced, name, Op::MultiMatMul { n }, &inputs, &siblings)?;
                rewrites += 1;
            }
        }
        Ok(rewrites)
    }
}
