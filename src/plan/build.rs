//! Building a plan: schedule, liveness, placement.

use super::arena::Arena;
use super::{
    Buffer, FusionReport, KvLayer, MemoryReport, Operand, PLAN_FORMAT, Plan, PlanError,
    PlanOptions, Reuse, Step, StepOutput, ValueRef, WeightInfo,
};
use crate::ir::{Graph, NodeId, Op, Value, ValueType};
use std::collections::HashMap;

impl Plan {
    /// Schedules and places `graph` (which must verify). The plan has no model information and
    /// no fusion report; [`crate::compile`] fills them in.
    pub fn build(graph: &Graph, options: &PlanOptions) -> Result<Plan, PlanError> {
        options.validate()?;
        let order = graph.topo_order()?;

        // Schedule: every node but the weights, in topological order; weights get indices.
        let mut step_of: HashMap<NodeId, u32> = HashMap::new();
        let mut weight_of: HashMap<NodeId, u32> = HashMap::new();
        let mut weights = Vec::new();
        let mut scheduled = Vec::new();
        for &id in &order {
            let node = graph.node(id);
            if let Op::Weight { tensor } = &node.op {
                let ty = node.outputs[0].ty.tensor().cloned().ok_or_else(|| {
                    PlanError::Invalid(format!("weight {tensor} is not a tensor"))
                })?;
                let bytes = ty
                    .bytes(options.sizes())
                    .ok_or_else(|| no_size(tensor, options))?;
                weight_of.insert(id, weights.len() as u32);
                weights.push(WeightInfo {
                    tensor: tensor.clone(),
                    ty,
                    bytes,
                });
            } else {
                step_of.insert(id, scheduled.len() as u32);
                scheduled.push(id);
            }
        }
        let operand = |v: Value| match (step_of.get(&v.node), weight_of.get(&v.node)) {
            (Some(&step), _) => Operand::Value(ValueRef { step, port: v.port }),
            (None, Some(&w)) => Operand::Weight(w),
            (None, None) => unreachable!("every node is a step or a weight"),
        };

        // Liveness: a value lives until its last reader; graph outputs to the end.
        let n_steps = scheduled.len() as u32;
        let mut last_use: HashMap<ValueRef, u32> = HashMap::new();
        let mut steps: Vec<Step> = Vec::with_capacity(scheduled.len());
        for (s, &id) in scheduled.iter().enumerate() {
            let node = graph.node(id);
            let inputs: Vec<Operand> = graph.inputs(id).into_iter().map(operand).collect();
            for input in &inputs {
                if let Operand::Value(v) = input {
                    last_use.insert(*v, s as u32);
                }
            }
            let outputs = node
                .outputs
                .iter()
                .map(|o| StepOutput {
                    name: o.name.clone(),
                    ty: o.ty.clone(),
                    buffer: None,
                    last_use: s as u32,
                })
                .collect();
            steps.push(Step {
                name: node.name.clone(),
                op: node.op.clone(),
                device: 0,
                inputs,
                outputs,
            });
        }
        let outputs: Vec<ValueRef> = graph
            .outputs()
            .iter()
            .map(|&v| match operand(v) {
                Operand::Value(r) => Ok(r),
                Operand::Weight(_) => Err(PlanError::Invalid(format!(
                    "graph output `{}` is a weight",
                    graph.value_name(v)
                ))),
            })
            .collect::<Result<_, _>>()?;
        for &v in &outputs {
            last_use.insert(v, n_steps);
        }
        for (v, &last) in &last_use {
            steps[v.step as usize].outputs[usize::from(v.port)].last_use = last;
        }

        let memory = place(&mut steps, options, &weights)?;
        let kv_cache = steps
            .iter()
            .flat_map(|s| &s.outputs)
            .filter_map(|o| match o.ty {
                ValueType::KvCache(kv) => Some(KvLayer {
                    layer: kv.layer,
                    n_kv_heads: kv.n_kv_heads,
                    head_dim: kv.head_dim,
                    device: 0,
                    bytes_per_token: kv.bytes_per_token(),
                }),
                ValueType::Tensor(_) => None,
            })
            .collect();
        let plan = Plan {
            format: PLAN_FORMAT,
            model: None,
            options: options.clone(),
            fusion: FusionReport {
                nodes_lowered: graph.n_compute_nodes(),
                passes: Vec::new(),
            },
            steps,
            weights,
            kv_cache,
            outputs,
            memory,
        };
        plan.validate()?;
        Ok(plan)
    }
}

/// Gives every tensor value a range of the arena, in step order: a step's outputs are placed
/// before the values it was the last reader of are freed, so outputs never overlap inputs.
fn place(
    steps: &mut [Step],
    options: &PlanOptions,
    weights: &[WeightInfo],
) -> Result<MemoryReport, PlanError> {
    let sizes = options.sizes();
    let mut arena = Arena::new(options.alignment);
    let mut dying: Vec<Vec<(u64, u64)>> = vec![Vec::new(); steps.len() + 1];
    let (mut naive, mut buffers) = (0u64, 0usize);
    for s in 0..steps.len() {
        for out in &mut steps[s].outputs {
            let ValueType::Tensor(t) = &out.ty else {
                continue;
            };
            let bytes = t.bytes(sizes).ok_or_else(|| no_size(&out.name, options))?;
            let offset = arena
                .alloc(bytes)
                .ok_or_else(|| no_size(&out.name, options))?;
            naive = arena
                .aligned(bytes)
                .and_then(|b| naive.checked_add(b))
                .ok_or_else(|| no_size(&out.name, options))?;
            buffers += 1;
            out.buffer = Some(Buffer { offset, bytes });
            if options.reuse == Reuse::Liveness {
                dying[out.last_use as usize].push((offset, bytes));
            }
        }
        for (offset, bytes) in std::mem::take(&mut dying[s]) {
            arena.free(offset, bytes);
        }
    }
    Ok(MemoryReport {
        arena_bytes: arena.peak(),
        naive_arena_bytes: naive,
        buffers,
        weight_bytes: weights.iter().map(|w| w.bytes).sum(),
        kv_bytes_per_token: steps
            .iter()
            .flat_map(|s| &s.outputs)
            .filter_map(|o| match o.ty {
                ValueType::KvCache(kv) => Some(kv.bytes_per_token()),
                ValueType::Tensor(_) => None,
            })
            .sum(),
    })
}

fn no_size(value: &str, options: &PlanOptions) -> PlanError {
    PlanError::Size {
        value: value.to_string(),
        tokens: options.max_tokens,
    }
}
