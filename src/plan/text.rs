//! The plan as text: a header, one line per step (`name = op(inputs) -> type @offset size`), and a
//! summary of the memory the plan needs. This is what `m40-llm compile --dump-graph` prints and
//! what the snapshot tests review.

use super::{Operand, Plan, Reuse, Step};
use crate::units::human_bytes;
use std::fmt::Write;

/// The whole plan: header, steps, summary.
pub fn render(plan: &Plan) -> String {
    let mut out = header(plan);
    out.push_str("\nsteps (name = op(inputs) -> output @arena offset, size):\n");
    let width = plan.steps.len().saturating_sub(1).to_string().len();
    for (i, step) in plan.steps.iter().enumerate() {
        let _ = writeln!(out, "  {i:>width$} {}", step_line(plan, step));
    }
    out.push('\n');
    out.push_str(&summary(plan));
    out
}

/// One step: `name = op[params](inputs) -> type @offset size`; a multi-output step lists its
/// values before `=` and one placement per output.
pub fn step_line(plan: &Plan, step: &Step) -> String {
    let inputs: Vec<&str> = step.inputs.iter().map(|&i| operand_name(plan, i)).collect();
    let names: Vec<&str> = step.outputs.iter().map(|o| o.name.as_str()).collect();
    let outputs: Vec<String> = step
        .outputs
        .iter()
        .map(|o| match o.buffer {
            Some(b) => format!("{} @{} {}", o.ty, b.offset, human_bytes(b.bytes, 1)),
            None => o.ty.to_string(),
        })
        .collect();
    let lhs = if names == [step.name.as_str()] {
        step.name.clone()
    } else {
        format!("{}: {}", step.name, names.join(", "))
    };
    format!(
        "{lhs} = {}({}) -> {}",
        step.op,
        inputs.join(", "),
        outputs.join(", ")
    )
}

/// The name of what an operand reads: a value's name or a weight's tensor.
pub fn operand_name(plan: &Plan, operand: Operand) -> &str {
    match operand {
        Operand::Value(v) => plan.value(v).map_or("?", |o| o.name.as_str()),
        Operand::Weight(w) => plan
            .weights
            .get(w as usize)
            .map_or("?", |w| w.tensor.as_str()),
    }
}

/// What the plan is for: the model and the sizes.
pub fn header(plan: &Plan) -> String {
    let mut out = String::new();
    if let Some(m) = &plan.model {
        let h = &m.hparams;
        let _ = writeln!(
            out,
            "plan for {} ({}, graphs/{}.toml): {} layers, {} wide, {} heads ({} kv) of {}, ffn {}, vocab {}",
            m.name.as_deref().unwrap_or("an unnamed model"),
            h.architecture,
            m.family,
            h.n_layers,
            h.n_embd,
            h.n_heads,
            h.n_kv_heads,
            h.head_dim,
            h.n_ff,
            h.n_vocab
        );
    }
    let o = &plan.options;
    let reuse = match o.reuse {
        Reuse::Liveness => "liveness",
        Reuse::None => "none (every value kept)",
    };
    let _ = writeln!(
        out,
        "sized for {} and {} per step; buffer reuse: {reuse}; alignment {} bytes",
        count(o.max_tokens, "token"),
        count(o.max_outputs, "output"),
        o.alignment
    );
    out
}

/// The numbers that matter: node counts, passes, arena, KV cache, weights.
pub fn summary(plan: &Plan) -> String {
    let mut out = String::from("summary:\n");
    let m = &plan.memory;
    let f = &plan.fusion;
    let _ = writeln!(
        out,
        "  nodes:    {} lowered, {} after fusion (plus {} weights)",
        f.nodes_lowered,
        plan.steps.len(),
        plan.weights.len()
    );
    let passes: Vec<String> = f
        .passes
        .iter()
        .map(|p| format!("{} ({} rewrites)", p.pass, p.rewrites))
        .collect();
    let passes = if passes.is_empty() {
        "none".to_string()
    } else {
        passes.join(", ")
    };
    let _ = writeln!(out, "  passes:   {passes}");
    let _ = writeln!(
        out,
        "  buffers:  {} tensor values in one activation arena",
        m.buffers
    );
    let saving = if m.naive_arena_bytes > 0 {
        100.0 * (1.0 - m.arena_bytes as f64 / m.naive_arena_bytes as f64)
    } else {
        0.0
    };
    let _ = writeln!(
        out,
        "  arena:    {} peak at {} per step; one buffer per value: {} (reuse saves {saving:.1}%)",
        human_bytes(m.arena_bytes, 1),
        count(plan.options.max_tokens, "token"),
        human_bytes(m.naive_arena_bytes, 1)
    );
    let _ = write!(
        out,
        "  kv cache: {} bytes per token ({} layers, K and V in f16)",
        m.kv_bytes_per_token,
        plan.kv_cache.len()
    );
    if let Some(model) = &plan.model {
        let ctx = u64::from(model.hparams.context_length);
        let _ = write!(
            out,
            "; {} for the {ctx}-token context",
            human_bytes(m.kv_bytes_per_token.saturating_mul(ctx), 1)
        );
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "  weights:  {} in {} tensors",
        human_bytes(m.weight_bytes, 1),
        plan.weights.len()
    );
    out
}

/// `1 token`, `512 tokens`.
fn count(n: u64, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}
