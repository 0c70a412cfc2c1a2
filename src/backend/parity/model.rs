//! One plan on two backends, value by value (`m40-llm parity --model M --prompt P`): the plan is
//! compiled once with buffer reuse off (so every value survives the step), both backends run the
//! prompt as one prefill step, and every tensor value the plan computes is read back from both
//! and compared. The first value over the tolerance is where the backends part ways; everything
//! after it inherits the difference.

use super::{KvNeeds, StepSpec, run_step};
use crate::backend::{Backend, BackendError};
use crate::ir::ValueType;
use crate::plan::Plan;
use serde::Serialize;

/// One plan value compared on two backends.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeReport {
    /// The plan step that computes it, and its op.
    pub step: usize,
    pub op: String,
    /// The value's name (`blk.3.ffn_inp`).
    pub value: String,
    pub elements: usize,
    /// Largest |a - b|, and that relative to the largest |reference|.
    pub max_abs: f64,
    pub max_rel: f64,
    pub over: bool,
}

/// The tensor values of `plan` worth comparing: every step output with a buffer, in plan
/// order (step inputs and KV caches are not computed values).
pub fn values(plan: &Plan) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    for (i, step) in plan.steps.iter().enumerate() {
        if step.op.is_step_input() {
            continue;
        }
        for o in &step.outputs {
            if o.buffer.is_some() && matches!(o.ty, ValueType::Tensor(_)) {
                out.push((i, step.op.name().to_string(), o.name.clone()));
            }
        }
    }
    out
}

/// The KV cache `compare` needs for `tokens`.
pub fn kv_needs(tokens: &[u32]) -> KvNeeds {
    KvNeeds {
        n_seqs: 1,
        positions: tokens.len() as u32,
    }
}

/// Runs `tokens` as one prefill step on `reference` and `other` (fresh backends over the same
/// plan, compiled without buffer reuse) and compares every value; `over` marks each value whose
/// relative error exceeds `tolerance`.
pub fn compare(
    reference: &mut dyn Backend,
    other: &mut dyn Backend,
    tokens: &[u32],
    tolerance: f64,
) -> Result<Vec<NodeReport>, BackendError> {
    if tokens.is_empty() {
        return Err(BackendError::Mismatch("the prompt has no tokens".into()));
    }
    let list = values(reference.plan());
    let names: Vec<String> = list.iter().map(|(_, _, n)| n.clone()).collect();
    let n = tokens.len() as u32;
    let step = StepSpec {
        tokens: tokens.to_vec(),
        seq: vec![0; tokens.len()],
        positions: (0..n).collect(),
        outputs: vec![n - 1],
    };
    let want = run_step(reference, &step, 1, &names)?;
    let got = run_step(other, &step, 1, &names)?;
    Ok(list
        .into_iter()
        .zip(want.iter().zip(&got))
        .map(|((step, op, value), (w, g))| {
            let scale = w.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
            let max_abs = if w.shape() == g.shape() {
                w.iter()
                    .zip(g.iter())
                    .map(|(&a, &b)| {
                        let d = (f64::from(a) - f64::from(b)).abs();
                        if d.is_nan() { f64::INFINITY } else { d }
                    })
                    .fold(0f64, f64::max)
            } else {
                f64::INFINITY
            };
            let max_rel = if scale > 0.0 {
                max_abs / scale
            } else {
                max_abs
            };
            NodeReport {
                step,
                op,
                value,
                elements: w.len(),
                max_abs,
                max_rel,
                over: max_rel > tolerance,
            }
        })
        .collect())
}
