//! Reading a plan's layout, shared by the backends: where each value lives (an arena buffer, a
//! step input, a layer's KV cache), the arena region of a tensor value for a step's sizes, the
//! row width of an operand, and which values survive a whole step (for `read_value`).

use super::cpu::arena::Region;
use super::step::{Step, StepLimits};
use super::{BackendError, HostTensor};
use crate::gguf::{GgufFile, TensorInfo};
use crate::ir::TensorType;
use crate::ir::{Dim, Op, StepSizes, ValueType};
use crate::plan::{Operand, Plan, Reuse, ValueRef};
use std::collections::HashMap;

/// Where a value lives.
pub(crate) enum Source {
    /// A tensor in the activation arena.
    Arena,
    /// A step input: the step's token ids, positions or output rows.
    Tokens,
    Positions,
    Outputs,
    /// The KV cache of a layer.
    Kv(u32),
}

pub(crate) fn source(plan: &Plan, v: ValueRef) -> Source {
    let step = &plan.steps[v.step as usize];
    match (&step.op, plan.value(v).map(|o| &o.ty)) {
        (Op::TokenIds, _) => Source::Tokens,
        (Op::Positions, _) => Source::Positions,
        (Op::OutputRows, _) => Source::Outputs,
        (_, Some(ValueType::KvCache(kv))) => Source::Kv(kv.layer),
        (
            Op::Weight { .. }
            | Op::Embedding
            | Op::MatMul
            | Op::Add
            | Op::Mul
            | Op::Silu
            | Op::RmsNorm { .. }
            | Op::Rope(_)
            | Op::KvWrite(_)
            | Op::Attention(_)
            | Op::SelectRows
            | Op::SwiGlu
            | Op::MultiMatMul { .. }
            | Op::GateUpSwiGlu
            | Op::AddRmsNorm { .. }
            | Op::RopeKvWrite { .. }
            | Op::RopeQkvWrite { .. },
            _,
        ) => Source::Arena,
    }
}

/// The arena region of a tensor value in a step of `sizes` (a prefix of its buffer).
pub(crate) fn region(plan: &Plan, v: ValueRef, sizes: StepSizes) -> Result<Region, BackendError> {
    let out = plan
        .value(v)
        .ok_or_else(|| BackendError::Mismatch(format!("no value {v:?}")))?;
    let buffer = out
        .buffer
        .ok_or_else(|| BackendError::Mismatch(format!("value `{}` has no buffer", out.name)))?;
    let len = out
        .ty
        .tensor()
        .and_then(|t| t.shape.elements(sizes))
        .ok_or_else(|| BackendError::Mismatch(format!("value `{}` has no size", out.name)))?;
    if buffer.offset % 4 != 0 || len * 4 > buffer.bytes {
        return Err(BackendError::Mismatch(format!(
            "value `{}`: {len} elements do not fit its buffer of {} bytes",
            out.name, buffer.bytes
        )));
    }
    Ok(Region {
        start: (buffer.offset / 4) as usize,
        len: len as usize,
    })
}

/// The row width (last dimension) of a tensor operand.
pub(crate) fn width_of(plan: &Plan, operand: Operand) -> Option<usize> {
    let ty = match operand {
        Operand::Value(v) => plan.value(v)?.ty.tensor()?.clone(),
        Operand::Weight(i) => plan.weights.get(i as usize)?.ty.clone(),
    };
    match ty.shape.dims().last()? {
        Dim::Fixed(n) => Some(*n as usize),
        _ => None,
    }
}

/// Per step and port: whether a value's buffer is still intact once the whole step ran, i.e.
/// no later step writes over it. Every value is, in a plan without reuse.
pub(crate) fn intact_values(plan: &Plan) -> Vec<Vec<bool>> {
    let written: Vec<Vec<(u64, u64)>> = plan
        .steps
        .iter()
        .map(|s| {
            s.outputs
                .iter()
                .filter_map(|o| o.buffer.map(|b| (b.offset, b.end())))
                .collect()
        })
        .collect();
    plan.steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.outputs
                .iter()
                .map(|o| match (plan.options.reuse, o.buffer) {
                    (Reuse::None, _) | (_, None) => true,
                    (Reuse::Liveness, Some(b)) => written[i + 1..]
                        .iter()
                        .flatten()
                        .all(|&(lo, hi)| hi <= b.offset || b.end() <= lo),
                })
                .collect()
        })
        .collect()
}

/// The value of a step input (token ids, positions, output rows) as the last step `last` had
/// it, for `read_value`; an error for a KV cache (not a tensor); `None` for an arena tensor.
pub(crate) fn step_input_value(
    plan: &Plan,
    v: ValueRef,
    last: &Step,
    name: &str,
    backend: &str,
) -> Result<Option<HostTensor>, BackendError> {
    let ints = |v: &mut dyn ExactSizeIterator<Item = u32>| {
        let v: Vec<u32> = v.collect();
        HostTensor::from_shape_fn((v.len(), 1), |(i, _)| v[i] as f32)
    };
    Ok(Some(match source(plan, v) {
        Source::Tokens => ints(&mut last.tokens.iter().copied()),
        Source::Positions => ints(&mut last.positions.iter().copied()),
        Source::Outputs => ints(&mut last.outputs.iter().map(|o| o.row)),
        Source::Kv(layer) => {
            return Err(BackendError::Unsupported {
                backend: backend.into(),
                reason: format!("`{name}` is the KV cache of layer {layer}, not a tensor"),
            });
        }
        Source::Arena => return Ok(None),
    }))
}

/// Vocabulary size: the width of the plan's first output (the logits).
pub(crate) fn n_vocab(plan: &Plan) -> Option<usize> {
    let first = *plan.outputs.first()?;
    width_of(plan, Operand::Value(first))
}

/// The bounds `PageTables::stage` checks a step against: the plan's sizes and its vocabulary.
pub(crate) fn step_limits(plan: &Plan) -> StepLimits {
    StepLimits {
        max_tokens: plan.options.max_tokens,
        max_outputs: plan.options.max_outputs,
        n_vocab: n_vocab(plan).unwrap_or(0) as u32,
    }
}

/// Every step output by name, for `read_value`.
pub(crate) fn value_names(plan: &Plan) -> HashMap<String, ValueRef> {
    let mut names = HashMap::new();
    for (i, step) in plan.steps.iter().enumerate() {
        for (p, out) in step.outputs.iter().enumerate() {
            let v = ValueRef {
                step: i as u32,
                port: p as u8,
            };
            names.insert(out.name.clone(), v);
        }
    }
    names
}

/// The tensor `name` of `file` that the plan reads as `ty`, with its IR shape (`[n, k]` for
/// matrices, `[k]` for vectors), after checking that the file's type and shape are the plan's.
pub(crate) fn plan_tensor<'a>(
    file: &'a GgufFile,
    name: &str,
    ty: &TensorType,
) -> Result<(&'a TensorInfo, Vec<usize>), BackendError> {
    let info = file.tensor(name).ok_or_else(|| {
        BackendError::Mismatch(format!(
            "the model has no tensor `{name}`, which the plan reads"
        ))
    })?;
    let shape: Vec<usize> = ty
        .shape
        .dims()
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => Ok(*n as usize),
            _ => Err(BackendError::Mismatch(format!(
                "weight `{name}` has a symbolic shape"
            ))),
        })
        .collect::<Result<_, _>>()?;
    let file_shape: Vec<usize> = info.ne.iter().rev().map(|&n| n as usize).collect();
    if info.ty != ty.dtype || file_shape != shape {
        return Err(BackendError::Mismatch(format!(
            "tensor `{name}` is {} {:?} in the model but {} {:?} in the plan",
            info.ty, file_shape, ty.dtype, shape
        )));
    }
    Ok((info, shape))
}
