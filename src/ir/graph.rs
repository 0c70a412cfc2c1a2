//! The op graph: nodes (an op, a name, typed output ports) joined by edges that say which output
//! port feeds which input slot. It lives in a petgraph `StableGraph`, so node ids stay valid while
//! passes rewrite the graph.
//!
//! Nodes can have several outputs (a fused residual-add + norm yields the new residual *and* the
//! normed value) so that fusing never needs a copy or a view: each port is its own buffer. Every
//! value (an output port) has a name unique in the graph, and fusion keeps the names of the values
//! it keeps: `blk.3.ffn_inp` is the same value whether an `add` or an `add_rms_norm` computes it,
//! which is what lets a backend compare a fused run with an unfused one value by value.

use super::infer::infer;
use super::op::Op;
use super::types::{TensorType, ValueType};
use petgraph::Direction;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fmt;

/// A node's id: stable while other nodes are added and removed.
pub type NodeId = NodeIndex<u32>;

/// A value: output `port` of `node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value {
    pub node: NodeId,
    pub port: u8,
}

impl Value {
    pub fn new(node: NodeId, port: u8) -> Value {
        Value { node, port }
    }
}

/// One output port of a node: the value's name and type.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub name: String,
    pub ty: ValueType,
}

/// A node: what it computes, its name, and the types of its outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub outputs: Vec<Output>,
}

/// An edge from output `port` of its source to input `slot` of its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    pub port: u8,
    pub slot: u8,
}

/// Errors building or rewriting a graph.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IrError {
    #[error("node `{node}` ({op}): {message}")]
    Shape {
        node: String,
        op: &'static str,
        message: String,
    },
    #[error("the name `{0}` is already used in the graph")]
    DuplicateName(String),
    #[error("invalid rewrite creating `{node}`: {message}")]
    Rewrite { node: String, message: String },
    #[error("the graph has a cycle through `{0}`")]
    Cycle(String),
}

/// The typed op graph of a model.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    g: StableDiGraph<Node, Edge>,
    /// Every node name and value name, and the node that owns it.
    names: HashMap<String, NodeId>,
    outputs: Vec<Value>,
    /// Program order: when each node was written (a fused node takes the earliest of the nodes
    /// it replaced). The schedule follows it wherever dependencies allow.
    order: HashMap<NodeId, u64>,
    next_order: u64,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Adds a single-output node whose value is also called `name`. Runs shape inference.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: &[Value],
    ) -> Result<Value, IrError> {
        let name = name.into();
        let id = self.add_node(name.clone(), op, inputs, vec![name])?;
        Ok(Value::new(id, 0))
    }

    /// Adds a node with one named value per output port. Runs shape inference; on error the graph
    /// is unchanged.
    pub fn add_node(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: &[Value],
        output_names: Vec<String>,
    ) -> Result<NodeId, IrError> {
        let name = name.into();
        let types = self.infer_node(&name, &op, inputs)?;
        if output_names.len() != types.len() {
            return Err(IrError::Rewrite {
                node: name,
                message: format!(
                    "{} output names for {} outputs",
                    output_names.len(),
                    types.len()
                ),
            });
        }
        self.check_names(&name, &output_names, &[])?;
        let outputs = output_names
            .into_iter()
            .zip(types)
            .map(|(name, ty)| Output { name, ty })
            .collect();
        Ok(self.insert(Node { name, op, outputs }, inputs))
    }

    /// The weight node for GGUF tensor `tensor` (its value is called like the tensor), added the
    /// first time it is asked for: a weight used twice (tied embeddings) is one node.
    pub fn add_weight(&mut self, tensor: &str, ty: TensorType) -> Result<Value, IrError> {
        if let Some(&id) = self.names.get(tensor) {
            let node = &self.g[id];
            if matches!(&node.op, Op::Weight { tensor: t } if t == tensor)
                && node.outputs[0].ty == ty.clone().into()
            {
                return Ok(Value::new(id, 0));
            }
            return Err(IrError::DuplicateName(tensor.to_string()));
        }
        let node = Node {
            name: tensor.to_string(),
            op: Op::Weight {
                tensor: tensor.to_string(),
            },
            outputs: vec![Output {
                name: tensor.to_string(),
                ty: ty.into(),
            }],
        };
        Ok(Value::new(self.insert(node, &[]), 0))
    }

    /// Marks `value` as a result of the graph (the logits): backends return it, and its buffer is
    /// never reused.
    pub fn set_output(&mut self, value: Value) {
        if !self.outputs.contains(&value) {
            self.outputs.push(value);
        }
    }

    /// The graph's results, in the order they were marked.
    pub fn outputs(&self) -> &[Value] {
        &self.outputs
    }

    /// The node `id`. Ids come from this graph; a removed node's id panics.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id]
    }

    /// The node `id`, if it exists.
    pub fn get(&self, id: NodeId) -> Option<&Node> {
        self.g.node_weight(id)
    }

    /// The node that owns `name` (a node name or a value name).
    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.names.get(name).copied()
    }

    /// The value called `name`.
    pub fn find_value(&self, name: &str) -> Option<Value> {
        let id = self.find(name)?;
        let port = self.g[id].outputs.iter().position(|o| o.name == name)?;
        Some(Value::new(id, port as u8))
    }

    /// The output port behind `value`.
    pub fn output(&self, value: Value) -> &Output {
        &self.g[value.node].outputs[usize::from(value.port)]
    }

    pub fn value_type(&self, value: Value) -> &ValueType {
        &self.output(value).ty
    }

    pub fn value_name(&self, value: Value) -> &str {
        &self.output(value).name
    }

    /// The values feeding `id`, in slot order.
    pub fn inputs(&self, id: NodeId) -> Vec<Value> {
        let mut edges: Vec<(u8, Value)> = self
            .g
            .edges_directed(id, Direction::Incoming)
            .map(|e| (e.weight().slot, Value::new(e.source(), e.weight().port)))
            .collect();
        edges.sort_unstable();
        edges.into_iter().map(|(_, v)| v).collect()
    }

    /// The input slots that read `value`, as (node, slot), in node order.
    pub fn users(&self, value: Value) -> Vec<(NodeId, u8)> {
        let mut users: Vec<(NodeId, u8)> = self
            .g
            .edges_directed(value.node, Direction::Outgoing)
            .filter(|e| e.weight().port == value.port)
            .map(|e| (e.target(), e.weight().slot))
            .collect();
        users.sort_unstable();
        users
    }

    /// Raw incoming edges of `id` as (source value, slot), unsorted: for the verifier.
    pub(crate) fn in_edges(&self, id: NodeId) -> Vec<(Value, u8)> {
        self.g
            .edges_directed(id, Direction::Incoming)
            .map(|e| (Value::new(e.source(), e.weight().port), e.weight().slot))
            .collect()
    }

    /// All node ids, in id order.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.g.node_indices()
    }

    /// Number of nodes, weights included.
    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    /// Number of nodes that compute something or take step inputs: everything but weights.
    pub fn n_compute_nodes(&self) -> usize {
        self.g
            .node_weights()
            .filter(|n| !matches!(n.op, Op::Weight { .. }))
            .count()
    }

    /// A topological order, deterministic: among the nodes ready to run, the one written first
    /// goes first, so the order follows the order the lowering wrote the model in, fused or not.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, IrError> {
        let key = |id: NodeId| (self.order.get(&id).copied().unwrap_or(u64::MAX), id);
        let mut pending: HashMap<NodeId, usize> = self
            .g
            .node_indices()
            .map(|id| (id, self.g.edges_directed(id, Direction::Incoming).count()))
            .collect();
        let mut ready: BinaryHeap<Reverse<(u64, NodeId)>> = pending
            .iter()
            .filter(|&(_, &n)| n == 0)
            .map(|(&id, _)| Reverse(key(id)))
            .collect();
        let mut order = Vec::with_capacity(self.g.node_count());
        while let Some(Reverse((_, id))) = ready.pop() {
            order.push(id);
            for e in self.g.edges_directed(id, Direction::Outgoing) {
                let n = pending.entry(e.target()).or_default();
                *n -= 1;
                if *n == 0 {
                    ready.push(Reverse(key(e.target())));
                }
            }
        }
        if order.len() < self.g.node_count() {
            let stuck = pending
                .iter()
                .filter(|&(_, &n)| n > 0)
                .map(|(&id, _)| id)
                .min()
                .map(|id| self.g[id].name.clone())
                .unwrap_or_default();
            return Err(IrError::Cycle(stuck));
        }
        Ok(order)
    }

    /// Replaces the nodes `replaced` by one new node computing `op` over `inputs`. The new node's
    /// output port `i` takes over `ports[i]`, a value of a replaced node: its name, its users and
    /// its place among the graph outputs. Its type must be the one the new op infers: a rewrite
    /// cannot change what any surviving value is. Values of replaced nodes that are still used
    /// outside `replaced` must all be in `ports`. On error the graph is unchanged.
    pub fn fuse(
        &mut self,
        replaced: &[NodeId],
        name: impl Into<String>,
        op: Op,
        inputs: &[Value],
        ports: &[Value],
    ) -> Result<NodeId, IrError> {
        let name = name.into();
        let fail = |message: String| IrError::Rewrite {
            node: name.clone(),
            message,
        };
        let old: HashSet<NodeId> = replaced.iter().copied().collect();
        if let Some(id) = replaced
            .iter()
            .find(|&&id| self.g.node_weight(id).is_none())
        {
            return Err(fail(format!("node {} does not exist", id.index())));
        }
        if let Some(v) = inputs.iter().find(|v| old.contains(&v.node)) {
            return Err(fail(format!(
                "input `{}` is computed by a replaced node",
                self.value_name(*v)
            )));
        }
        if let Some(v) = ports.iter().find(|v| !old.contains(&v.node)) {
            return Err(fail(format!(
                "port value `{}` is not from a replaced node",
                self.value_name(*v)
            )));
        }
        // Every value of the replaced nodes still needed outside them must be taken over.
        for &id in replaced {
            for port in 0..self.g[id].outputs.len() {
                let v = Value::new(id, port as u8);
                let used_outside = self.users(v).iter().any(|(user, _)| !old.contains(user))
                    || self.outputs.contains(&v);
                if used_outside && !ports.contains(&v) {
                    return Err(fail(format!(
                        "value `{}` is still used but not taken over",
                        self.value_name(v)
                    )));
                }
            }
        }
        let types = self.infer_node(&name, &op, inputs)?;
        if types.len() != ports.len() {
            return Err(fail(format!(
                "{} has {} outputs but {} ports were given",
                op.name(),
                types.len(),
                ports.len()
            )));
        }
        for (ty, &v) in types.iter().zip(ports) {
            if ty != self.value_type(v) {
                return Err(fail(format!(
                    "port for `{}` would change its type from {} to {ty}",
                    self.value_name(v),
                    self.value_type(v)
                )));
            }
        }
        let output_names: Vec<String> = ports
            .iter()
            .map(|&v| self.value_name(v).to_string())
            .collect();
        self.check_names(&name, &output_names, replaced)?;

        // Validated: now mutate.
        let redirects: Vec<Vec<(NodeId, u8)>> = ports
            .iter()
            .map(|&v| {
                self.users(v)
                    .into_iter()
                    .filter(|(u, _)| !old.contains(u))
                    .collect()
            })
            .collect();
        let outputs = output_names
            .into_iter()
            .zip(types)
            .map(|(name, ty)| Output { name, ty })
            .collect();
        let first = replaced
            .iter()
            .filter_map(|id| self.order.get(id))
            .min()
            .copied();
        let new = self.insert(Node { name, op, outputs }, inputs);
        if let Some(first) = first {
            self.order.insert(new, first);
        }
        for (port, users) in redirects.into_iter().enumerate() {
            for (user, slot) in users {
                self.g.add_edge(
                    new,
                    user,
                    Edge {
                        port: port as u8,
                        slot,
                    },
                );
            }
        }
        for out in &mut self.outputs {
            if let Some(port) = ports.iter().position(|p| p == out) {
                *out = Value::new(new, port as u8);
            }
        }
        for &id in replaced {
            self.remove_node(id);
        }
        Ok(new)
    }

    fn infer_node(&self, name: &str, op: &Op, inputs: &[Value]) -> Result<Vec<ValueType>, IrError> {
        if let Some(v) = inputs.iter().find(|v| {
            self.g
                .node_weight(v.node)
                .is_none_or(|n| usize::from(v.port) >= n.outputs.len())
        }) {
            return Err(IrError::Rewrite {
                node: name.to_string(),
                message: format!("input {}:{} does not exist", v.node.index(), v.port),
            });
        }
        let types: Vec<&ValueType> = inputs.iter().map(|&v| self.value_type(v)).collect();
        infer(op, &types).map_err(|message| IrError::Shape {
            node: name.to_string(),
            op: op.name(),
            message,
        })
    }

    /// Checks that a new node's name and value names are free (or owned by `replaced`).
    fn check_names(
        &self,
        name: &str,
        output_names: &[String],
        replaced: &[NodeId],
    ) -> Result<(), IrError> {
        let mut new_names: Vec<&str> = vec![name];
        new_names.extend(
            output_names
                .iter()
                .map(String::as_str)
                .filter(|n| *n != name),
        );
        let mut seen = HashSet::new();
        for n in new_names {
            let taken = self
                .names
                .get(n)
                .is_some_and(|owner| !replaced.contains(owner));
            if taken || !seen.insert(n) {
                return Err(IrError::DuplicateName(n.to_string()));
            }
        }
        Ok(())
    }

    fn insert(&mut self, node: Node, inputs: &[Value]) -> NodeId {
        let mut names = vec![node.name.clone()];
        names.extend(node.outputs.iter().map(|o| o.name.clone()));
        let id = self.g.add_node(node);
        self.order.insert(id, self.next_order);
        self.next_order += 1;
        for name in names {
            self.names.insert(name, id);
        }
        for (slot, v) in inputs.iter().enumerate() {
            self.g.add_edge(
                v.node,
                id,
                Edge {
                    port: v.port,
                    slot: slot as u8,
                },
            );
        }
        id
    }

    /// Removes a node and its edges, and frees the names it still owns (a fused node may
    /// already have taken some over).
    fn remove_node(&mut self, id: NodeId) {
        if let Some(node) = self.g.remove_node(id) {
            self.order.remove(&id);
            let names = std::iter::once(node.name).chain(node.outputs.into_iter().map(|o| o.name));
            for name in names {
                if self.names.get(&name) == Some(&id) {
                    self.names.remove(&name);
                }
            }
        }
        self.outputs.retain(|v| v.node != id);
    }
}

/// The graph as text, one node per line in topological order: weights first, then
/// `name = op[params](inputs) -> type`, then the outputs. Snapshot tests diff this.
impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let order = self.topo_order().map_err(|_| fmt::Error)?;
        writeln!(f, "weights:")?;
        for &id in &order {
            let node = &self.g[id];
            if matches!(node.op, Op::Weight { .. }) {
                writeln!(f, "  {}: {}", node.name, node.outputs[0].ty)?;
            }
        }
        writeln!(f, "nodes:")?;
        for &id in &order {
            let node = &self.g[id];
            if matches!(node.op, Op::Weight { .. }) {
                continue;
            }
            let names: Vec<&str> = node.outputs.iter().map(|o| o.name.as_str()).collect();
            let types: Vec<String> = node.outputs.iter().map(|o| o.ty.to_string()).collect();
            let args: Vec<&str> = self
                .inputs(id)
                .into_iter()
                .map(|v| self.value_name(v))
                .collect();
            f.write_str("  ")?;
            if names != [node.name.as_str()] {
                write!(f, "{}: ", node.name)?;
            }
            writeln!(
                f,
                "{} = {}({}) -> {}",
                names.join(", "),
                node.op,
                args.join(", "),
                types.join(", ")
            )?;
        }
        let outs: Vec<&str> = self.outputs.iter().map(|&v| self.value_name(v)).collect();
        writeln!(f, "outputs: {}", outs.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgmlType;
    use crate::ir::types::{Dim, Shape};

    fn small_graph() -> (Graph, Value, Value, Value) {
        let mut g = Graph::new();
        let ids = g.add("token_ids", Op::TokenIds, &[]).unwrap();
        let table = g
            .add_weight(
                "token_embd.weight",
                TensorType::new(GgmlType::F16, Shape::fixed(&[10, 4])),
            )
            .unwrap();
        let x = g.add("x", Op::Embedding, &[table, ids]).unwrap();
        let y = g.add("y", Op::Silu, &[x]).unwrap();
        let z = g.add("z", Op::Add, &[x, y]).unwrap();
        g.set_output(z);
        (g, x, y, z)
    }

    #[test]
    fn add_infers_types_and_rejects_duplicates() {
        let (mut g, x, _, z) = small_graph();
        assert_eq!(
            g.value_type(z),
            &TensorType::activation(Dim::Tokens, 4).into()
        );
        assert_eq!(
            g.add("z", Op::Silu, &[x]),
            Err(IrError::DuplicateName("z".into()))
        );
        let err = g.add("bad", Op::MatMul, &[x, x]).unwrap_err();
        assert!(
            matches!(err, IrError::Shape { ref node, .. } if node == "bad"),
            "{err}"
        );
        assert_eq!(g.len(), 5);
    }

    #[test]
    fn weights_are_shared_by_name() {
        let (mut g, ..) = small_graph();
        let ty = TensorType::new(GgmlType::F16, Shape::fixed(&[10, 4]));
        let a = g.add_weight("token_embd.weight", ty).unwrap();
        assert_eq!(g.find("token_embd.weight"), Some(a.node));
        let other = TensorType::new(GgmlType::F32, Shape::fixed(&[10, 4]));
        assert!(g.add_weight("token_embd.weight", other).is_err());
    }

    #[test]
    fn fuse_takes_over_names_users_and_outputs() {
        let (mut g, x, y, z) = small_graph();
        // Pretend silu+add is one op: replace both by an add of x and x (same type as z).
        let fused = g
            .fuse(&[y.node, z.node], "y+z", Op::Add, &[x, x], &[z])
            .unwrap();
        assert_eq!(g.outputs(), &[Value::new(fused, 0)]);
        assert_eq!(g.find_value("z"), Some(Value::new(fused, 0)));
        assert_eq!(g.find("y"), None);
        assert_eq!(g.users(x), vec![(fused, 0), (fused, 1)]);
    }

    #[test]
    fn fuse_refuses_to_drop_a_used_value_and_leaves_the_graph_alone() {
        let (mut g, x, y, z) = small_graph();
        let before = g.to_string();
        // y is used by z; replacing y alone without taking it over is an error.
        let err = g.fuse(&[y.node], "y2", Op::Silu, &[x], &[]).unwrap_err();
        assert!(matches!(err, IrError::Rewrite { .. }), "{err}");
        // A port whose type would change is an error too.
        let err = g
            .fuse(&[z.node], "z2", Op::Embedding, &[x, x], &[z])
            .unwrap_err();
        assert!(matches!(err, IrError::Shape { .. }), "{err}");
        assert_eq!(g.to_string(), before);
    }

    #[test]
    fn display_lists_weights_nodes_and_outputs() {
        let (g, ..) = small_graph();
        let text = g.to_string();
        assert_eq!(
            text,
            "weights:\n  token_embd.weight: f16[10,4]\nnodes:\n  token_ids = token_ids() -> i32[T]\n  \
             x = embedding(token_embd.weight, token_ids) -> f32[T,4]\n  y = silu(x) -> f32[T,4]\n  \
             z = add(x, y) -> f32[T,4]\noutputs: z\n"
        );
    }
}
