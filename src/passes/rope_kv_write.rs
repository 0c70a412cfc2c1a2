//! `rope-kv-write`: `kv_write(rope(k), v)` → `rope_kv_write(k, v, pos)`, when the rotated keys
//! feed nothing else: they go straight into the FP16 cache without an F32 buffer.

use super::{Pass, sole_user};
use crate::ir::{Graph, IrError, Op, Value};

pub struct RopeKvWriteFusion;

impl Pass for RopeKvWriteFusion {
    fn name(&self) -> &'static str {
        "rope-kv-write"
    }

    fn run(&self, graph: &mut Graph) -> Result<usize, IrError> {
        let mut rewrites = 0;
        for id in graph.topo_order()? {
            let Some(Op::KvWrite(kv)) = graph.get(id).map(|n| n.op.clone()) else {
                continue;
            };
            let [k, v] = graph.inputs(id)[..] else {
                continue;
            };
            let Op::Rope(rope) = graph.node(k.node).op else {
                continue;
            };
            if sole_user(graph, k) != Some((id, 0)) {
                continue;
            }
            // rope's inputs are (x, pos[, freq_factors]); the fused op takes (k, v, pos[, ...]).
            let Some((&k_in, rest)) = graph
                .inputs(k.node)
                .split_first()
                .map(|(k, rest)| (k, rest.to_vec()))
            else {
                continue;
            };
            let inputs: Vec<Value> = [k_in, v].into_iter().chain(rest).collect();
            let cache = Value::new(id, 0);
            let name = graph.value_name(cache).to_string();
            graph.fuse(
                &[k.node, id],
                name,
                Op::RopeKvWrite { rope, kv },
                &inputs,
                &[cache],
            )?;
            rewrites += 1;
        }
        Ok(rewrites)
    }
}
