//! `rope-kv-write`: `kv_write(rope(k), v)` → `rope_kv_write(k, v, pos)`, when the rotated keys
//! feed nothing else: they go straight into the FP16 cache without an F32 buffer.

use super::{Pass, Rewrite, rewrite_each, sole_user};
use crate::ir::{Graph, IrError, Op, Value};

pub struct RopeKvWriteFusion;

impl Pass for RopeKvWriteFusion {
    fn name(&self) -> &'static str {
        "rope-kv-write"
    }

    fn run(&self, graph: &mut Graph) -> Result<usize, IrError> {
        rewrite_each(graph, |graph, id, node| {
            let Op::KvWrite(kv) = node.op else {
                return None;
            };
            let [k, v] = graph.inputs(id)[..] else {
                return None;
            };
            let Op::Rope(rope) = graph.node(k.node).op else {
                return None;
            };
            if sole_user(graph, k) != Some((id, 0)) {
                return None;
            }
            // rope's inputs are (x, pos[, freq_factors]); the fused op takes (k, v, pos[, ...]).
            let rope_inputs = graph.inputs(k.node);
            let (&k_in, rest) = rope_inputs.split_first()?;
            let cache = Value::new(id, 0);
            Some(Rewrite {
                replaced: vec![k.node, id],
                name: graph.value_name(cache).to_string(),
                op: Op::RopeKvWrite { rope, kv },
                inputs: [k_in, v].into_iter().chain(rest.iter().copied()).collect(),
                ports: vec![cache],
            })
        })
    }
}
