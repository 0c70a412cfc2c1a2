//! Unfusing: every fused op replaced by the primitive ops it is defined as. This is the
//! executable form of the fused ops' documentation: fusing then unfusing a graph gives back the
//! same computation (checked structurally by the tests), and a backend may run a fused op it has
//! no kernel for through its expansion.

use crate::ir::{Graph, IrError, Op, Value};
use std::collections::HashMap;

/// A new graph computing the same values as `graph` with primitive ops only. Kept values keep
/// their names; the intermediates a fusion had dropped are called `<value>.<part>`.
pub fn unfuse(graph: &Graph) -> Result<Graph, IrError> {
    let mut out = Graph::new();
    let mut map: HashMap<Value, Value> = HashMap::new();
    for id in graph.topo_order()? {
        let node = graph.node(id);
        let inputs: Vec<Value> = graph.inputs(id).iter().map(|v| map[v]).collect();
        let port = |p: usize| node.outputs[p].name.clone();
        let part = |p: usize, what: &str| format!("{}.{what}", node.outputs[p].name);
        let results: Vec<Value> = match (&node.op, inputs.as_slice()) {
            (Op::Weight { tensor }, []) => {
                let ty = node.outputs[0]
                    .ty
                    .tensor()
                    .cloned()
                    .ok_or_else(|| IrError::Rewrite {
                        node: node.name.clone(),
                        message: "a weight must be a tensor".into(),
                    })?;
                vec![out.add_weight(tensor, ty)?]
            }
            (Op::MultiMatMul { .. }, [x, weights @ ..]) => weights
                .iter()
                .enumerate()
                .map(|(i, &w)| out.add(port(i), Op::MatMul, &[*x, w]))
                .collect::<Result<_, _>>()?,
            (Op::SwiGlu, &[gate, up]) => {
                let silu = out.add(part(0, "silu"), Op::Silu, &[gate])?;
                vec![out.add(port(0), Op::Mul, &[silu, up])?]
            }
            (Op::GateUpSwiGlu, &[x, w_gate, w_up]) => {
                let gate = out.add(part(0, "gate"), Op::MatMul, &[x, w_gate])?;
                let up = out.add(part(0, "up"), Op::MatMul, &[x, w_up])?;
                let silu = out.add(part(0, "silu"), Op::Silu, &[gate])?;
                vec![out.add(port(0), Op::Mul, &[silu, up])?]
            }
            (Op::AddRmsNorm { eps }, &[a, b, w]) => {
                let sum = out.add(port(0), Op::Add, &[a, b])?;
                let normed = out.add(port(1), Op::RmsNorm { eps: *eps }, &[sum, w])?;
                vec![sum, normed]
            }
            (Op::RopeKvWrite { rope, kv }, [k, v, rope_rest @ ..]) => {
                let rope_inputs: Vec<Value> = std::iter::once(*k)
                    .chain(rope_rest.iter().copied())
                    .collect();
                let k_rope = out.add(part(0, "k_rope"), Op::Rope(*rope), &rope_inputs)?;
                vec![out.add(port(0), Op::KvWrite(*kv), &[k_rope, *v])?]
            }
            (op, _) if op.is_fused() => {
                return Err(IrError::Rewrite {
                    node: node.name.clone(),
                    message: format!("{} has {} inputs", op.name(), inputs.len()),
                });
            }
            (op, _) => {
                let names = node.outputs.iter().map(|o| o.name.clone()).collect();
                let new = out.add_node(node.name.clone(), op.clone(), &inputs, names)?;
                (0..node.outputs.len())
                    .map(|p| Value::new(new, p as u8))
                    .collect()
            }
        };
        for (p, v) in results.into_iter().enumerate() {
            map.insert(Value::new(id, p as u8), v);
        }
    }
    for v in graph.outputs() {
        out.set_output(map[v]);
    }
    Ok(out)
}
