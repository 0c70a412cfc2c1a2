//! Unfusing: every fused op replaced by the primitive ops it is defined as ([`Op::expansion`]).
//! This is the executable form of the fused ops' documentation: fusing then unfusing a graph
//! gives back the same computation (checked structurally by the tests), and a backend may run a
//! fused op it has no kernel for through its expansion.

use crate::ir::op::{ExpandedInput, ExpandedResult};
use crate::ir::{Graph, IrError, Op, Value};
use std::collections::HashMap;

/// A new graph computing the same values as `graph` with primitive ops only. Kept values keep
/// their names; the intermediates a fusion had dropped are called `<value>.<part>`.
pub fn unfuse(graph: &Graph) -> Result<Graph, IrError> {
    unfuse_if(graph, |_, _| true)
}

/// [`unfuse`] for the fused nodes `expand` is true for (given the node's name and op); every
/// other node is kept as it is. How the compiler rewrites a fused op a target has no kernel for.
pub fn unfuse_if(graph: &Graph, expand: impl Fn(&str, &Op) -> bool) -> Result<Graph, IrError> {
    let mut out = Graph::new();
    let mut map: HashMap<Value, Value> = HashMap::new();
    for id in graph.topo_order()? {
        let node = graph.node(id);
        let inputs: Vec<Value> = graph.inputs(id).iter().map(|v| map[v]).collect();
        let bad = |message: String| IrError::Rewrite {
            node: node.name.clone(),
            message,
        };
        let port_name = |p: usize| {
            node.outputs
                .get(p)
                .map(|o| o.name.clone())
                .ok_or_else(|| bad(format!("{} has no output {p}", node.op.name())))
        };
        // A node kept as it is has no expansion here.
        let expansion = if expand(&node.name, &node.op) {
            node.op.expansion()
        } else {
            None
        };
        let results: Vec<Value> = match (&node.op, expansion) {
            (Op::Weight { tensor }, _) => {
                let ty = node.outputs[0]
                    .ty
                    .tensor()
                    .cloned()
                    .ok_or_else(|| bad("a weight must be a tensor".into()))?;
                vec![out.add_weight(tensor, ty)?]
            }
            (op, Some(expansion)) => {
                let mut made: Vec<Value> = Vec::with_capacity(expansion.len());
                let mut ports: Vec<Option<Value>> = vec![None; node.outputs.len()];
                for part in expansion {
                    let part_inputs = part
                        .inputs
                        .iter()
                        .map(|i| match *i {
                            ExpandedInput::Slot(s) => inputs.get(s).copied(),
                            ExpandedInput::Node(n) => made.get(n).copied(),
                        })
                        .collect::<Option<Vec<Value>>>()
                        .ok_or_else(|| bad(format!("{} has {} inputs", op.name(), inputs.len())))?;
                    let name = match part.result {
                        ExpandedResult::Port(p) => port_name(p)?,
                        ExpandedResult::Part(what) => format!("{}.{what}", port_name(0)?),
                    };
                    let v = out.add(name, part.op, &part_inputs)?;
                    if let ExpandedResult::Port(p) = part.result
                        && let Some(slot) = ports.get_mut(p)
                    {
                        *slot = Some(v);
                    }
                    made.push(v);
                }
                ports
                    .into_iter()
                    .collect::<Option<Vec<Value>>>()
                    .ok_or_else(|| bad(format!("{}'s expansion misses an output", op.name())))?
            }
            (op, None) => {
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
