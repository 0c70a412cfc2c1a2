//! The verifier: the invariants every graph must keep, checked after lowering and after every
//! pass (cheap, and it catches a broken rewrite at the pass that broke it).
//!
//! 1. The graph is acyclic.
//! 2. Every node's input slots are filled exactly once, `0..arity`, from existing output ports.
//! 3. Re-running shape inference on each node's inputs gives exactly the types it records.
//! 4. Node names and value names are unique (the graph's name index agrees with its nodes).
//! 5. There is at most one node per step input (`token_ids`, `positions`, `output_rows`), and
//!    every weight is a tensor.
//! 6. Each layer's KV cache is written by exactly one node, and only attention reads it.
//! 7. The graph has at least one output, and its outputs are tensors.

use super::graph::{Graph, NodeId, Value};
use super::infer::infer;
use super::op::Op;
use super::types::ValueType;
use std::collections::{HashMap, HashSet};

/// What is wrong with a graph, and where.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("graph invariant broken at `{node}`: {problem}")]
pub struct VerifyError {
    pub node: String,
    pub problem: String,
}

/// Checks the invariants listed in the module docs.
pub fn verify(graph: &Graph) -> Result<(), VerifyError> {
    let order = graph.topo_order().map_err(|e| VerifyError {
        node: e.to_string(),
        problem: "cycle".into(),
    })?;
    let mut names = HashSet::new();
    let mut step_inputs = HashSet::new();
    let mut kv_writers: HashMap<u32, String> = HashMap::new();
    for &id in &order {
        let node = graph.node(id);
        let fail = |problem: String| VerifyError {
            node: node.name.clone(),
            problem,
        };
        check_slots(graph, id).map_err(fail)?;
        // A node's own names (its name may equal its single value's name), unique graph-wide.
        let mut own: Vec<&str> = std::iter::once(node.name.as_str())
            .chain(node.outputs.iter().map(|o| o.name.as_str()))
            .collect();
        own.sort_unstable();
        own.dedup();
        for name in own {
            if graph.find(name) != Some(id) || !names.insert(name) {
                return Err(fail(format!("the name `{name}` is not unique")));
            }
        }
        let inputs = graph.inputs(id);
        match &node.op {
            Op::Weight { tensor } => {
                let is_tensor =
                    matches!(node.outputs.as_slice(), [o] if matches!(o.ty, ValueType::Tensor(_)));
                if !is_tensor {
                    return Err(fail(format!("weight {tensor} must have one tensor output")));
                }
            }
            op => {
                let types: Vec<&ValueType> = inputs.iter().map(|&v| graph.value_type(v)).collect();
                let inferred = infer(op, &types).map_err(&fail)?;
                let recorded: Vec<&ValueType> = node.outputs.iter().map(|o| &o.ty).collect();
                if inferred.iter().collect::<Vec<_>>() != recorded {
                    return Err(fail(format!(
                        "records output types {recorded:?} but its inputs give {inferred:?}"
                    )));
                }
            }
        }
        if node.op.is_step_input() && !step_inputs.insert(node.op.name()) {
            return Err(fail(format!("a second `{}` input", node.op.name())));
        }
        for (port, out) in node.outputs.iter().enumerate() {
            if let ValueType::KvCache(kv) = out.ty {
                if let Some(first) = kv_writers.insert(kv.layer, node.name.clone()) {
                    return Err(fail(format!(
                        "layer {} KV cache is also written by `{first}`",
                        kv.layer
                    )));
                }
                for (user, _) in graph.users(Value::new(id, port as u8)) {
                    if !matches!(graph.node(user).op, Op::Attention(_)) {
                        return Err(fail(format!(
                            "its KV cache is read by `{}`, which is not attention",
                            graph.node(user).name
                        )));
                    }
                }
            }
        }
    }
    if graph.outputs().is_empty() {
        return Err(VerifyError {
            node: "<graph>".into(),
            problem: "no outputs".into(),
        });
    }
    for &v in graph.outputs() {
        if graph
            .get(v.node)
            .is_none_or(|n| usize::from(v.port) >= n.outputs.len())
        {
            return Err(VerifyError {
                node: "<graph>".into(),
                problem: format!("output {}:{} does not exist", v.node.index(), v.port),
            });
        }
        if graph.value_type(v).tensor().is_none() {
            return Err(VerifyError {
                node: graph.value_name(v).to_string(),
                problem: "a graph output must be a tensor".into(),
            });
        }
    }
    Ok(())
}

/// Slots `0..arity` each filled once, from ports that exist.
fn check_slots(graph: &Graph, id: NodeId) -> Result<(), String> {
    let node = graph.node(id);
    let arity = node.op.arity();
    let mut filled = vec![false; arity];
    for (source, slot) in graph.in_edges(id) {
        let slot = usize::from(slot);
        let Some(seen) = filled.get_mut(slot) else {
            return Err(format!(
                "an edge into slot {slot}, but {} has {arity} inputs",
                node.op.name()
            ));
        };
        if std::mem::replace(seen, true) {
            return Err(format!("input slot {slot} is fed twice"));
        }
        if graph
            .get(source.node)
            .is_none_or(|n| usize::from(source.port) >= n.outputs.len())
        {
            return Err(format!(
                "input slot {slot} reads a port that does not exist"
            ));
        }
    }
    if let Some(slot) = filled.iter().position(|f| !f) {
        return Err(format!(
            "input slot {slot} (`{}`) is empty",
            node.op.input_names()[slot]
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgmlType;
    use crate::ir::op::{AttentionParams, KvParams};
    use crate::ir::types::{Shape, TensorType};

    fn attention_graph() -> Graph {
        let mut g = Graph::new();
        let ids = g.add("token_ids", Op::TokenIds, &[]).unwrap();
        let table = g
            .add_weight("t", TensorType::new(GgmlType::F32, Shape::fixed(&[10, 8])))
            .unwrap();
        let x = g.add("x", Op::Embedding, &[table, ids]).unwrap();
        let kv = KvParams {
            layer: 0,
            n_kv_heads: 1,
            head_dim: 8,
        };
        let cache = g.add("kv", Op::KvWrite(kv), &[x, x]).unwrap();
        let a = AttentionParams {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 8,
            scale: 0.35,
            sliding_window: None,
        };
        let y = g.add("y", Op::Attention(a), &[x, cache]).unwrap();
        g.set_output(y);
        g
    }

    #[test]
    fn a_well_formed_graph_verifies() {
        verify(&attention_graph()).unwrap();
    }

    #[test]
    fn a_second_kv_writer_for_a_layer_is_rejected() {
        let mut g = attention_graph();
        let x = g.find_value("x").unwrap();
        let kv = KvParams {
            layer: 0,
            n_kv_heads: 1,
            head_dim: 8,
        };
        g.add("kv2", Op::KvWrite(kv), &[x, x]).unwrap();
        let err = verify(&g).unwrap_err();
        assert!(err.problem.contains("also written"), "{err}");
    }

    #[test]
    fn a_graph_without_outputs_is_rejected() {
        let mut g = Graph::new();
        g.add("token_ids", Op::TokenIds, &[]).unwrap();
        assert_eq!(verify(&g).unwrap_err().problem, "no outputs");
    }

    #[test]
    fn duplicate_step_inputs_are_rejected() {
        let mut g = attention_graph();
        g.add("token_ids_2", Op::TokenIds, &[]).unwrap();
        let err = verify(&g).unwrap_err();
        assert_eq!(err.node, "token_ids_2");
    }
}
