//! The plan as a Graphviz graph (`dot -Tsvg plan.dot > plan.svg`): one box per step with its op,
//! output types and arena placement, the weights it reads listed inside it; one cluster per
//! block; KV-cache edges dashed; step inputs as ellipses, graph outputs double-bordered.

use super::text::operand_name;
use super::{Operand, Plan};
use crate::ir::ValueType;
use crate::units::human_bytes;
use std::fmt::Write;

/// The DOT source of `plan`.
pub fn render(plan: &Plan) -> String {
    let mut out = String::from(
        "digraph plan {\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\", fontsize=10];\n  edge [fontname=\"monospace\", fontsize=9];\n",
    );
    // Steps, grouped in one cluster per block.
    let mut current: Option<String> = None;
    for (i, step) in plan.steps.iter().enumerate() {
        let block = block_of(&step.name);
        if block != current {
            if current.is_some() {
                out.push_str("  }\n");
            }
            if let Some(b) = &block {
                let _ = writeln!(
                    out,
                    "  subgraph \"cluster_{b}\" {{\n    label=\"{b}\"; style=rounded; color=gray60;"
                );
            }
            current = block;
        }
        let indent = if current.is_some() { "    " } else { "  " };
        let mut label = vec![step.name.clone()];
        if step.op.to_string() != step.name {
            label.push(step.op.to_string());
        }
        for o in &step.outputs {
            let place = o.buffer.map_or(String::new(), |b| {
                format!(" @{} {}", b.offset, human_bytes(b.bytes, 1))
            });
            if step.outputs.len() > 1 {
                label.push(format!("{}: {}{place}", o.name, o.ty));
            } else {
                label.push(format!("{}{place}", o.ty));
            }
        }
        for &input in &step.inputs {
            if let Operand::Weight(w) = input {
                let ty = plan
                    .weights
                    .get(w as usize)
                    .map_or(String::new(), |w| w.ty.to_string());
                label.push(format!("w: {} {ty}", operand_name(plan, input)));
            }
        }
        let shape = if step.op.is_step_input() {
            ", shape=ellipse"
        } else {
            ""
        };
        let result = (0..step.outputs.len()).any(|p| {
            plan.outputs
                .iter()
                .any(|o| o.step as usize == i && usize::from(o.port) == p)
        });
        let peripheries = if result { ", peripheries=2" } else { "" };
        let _ = writeln!(
            out,
            "{indent}s{i} [label=\"{}\"{shape}{peripheries}];",
            escape(&label.join("\n"))
        );
    }
    if current.is_some() {
        out.push_str("  }\n");
    }
    // Edges, labelled with the input slot (and the source port when the source has several).
    for (i, step) in plan.steps.iter().enumerate() {
        let slots = step.op.input_names();
        for (slot, &input) in step.inputs.iter().enumerate() {
            let Operand::Value(v) = input else { continue };
            let Some(source) = plan.steps.get(v.step as usize) else {
                continue;
            };
            let slot_name = slots.get(slot).map_or("?", String::as_str);
            let label = if source.outputs.len() > 1 {
                format!("{} → {slot_name}", short(operand_name(plan, input)))
            } else {
                slot_name.to_string()
            };
            let kv = matches!(plan.value(v).map(|o| &o.ty), Some(ValueType::KvCache(_)));
            let style = if kv {
                ", style=dashed, color=gray40"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  s{} -> s{i} [label=\"{}\"{style}];",
                v.step,
                escape(&label)
            );
        }
    }
    out.push_str("}\n");
    out
}

/// `blk.3` for `blk.3.attn_norm` (and for `blk.3.l_out+blk.4.attn_norm`).
fn block_of(name: &str) -> Option<String> {
    let rest = name.strip_prefix("blk.")?;
    let layer: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!layer.is_empty()).then(|| format!("blk.{layer}"))
}

/// The last dotted part of a value name: `k` for `blk.0.k`.
fn short(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// A string safe inside a DOT double-quoted label (`\n` stays a line break).
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_blocks() {
        assert_eq!(block_of("blk.12.attn").as_deref(), Some("blk.12"));
        assert_eq!(
            block_of("blk.0.l_out+blk.1.attn_norm").as_deref(),
            Some("blk.0")
        );
        assert_eq!(block_of("logits"), None);
        assert_eq!(block_of("blk.x"), None);
        assert_eq!(escape("a\"b\nc\\"), "a\\\"b\\nc\\\\");
    }
}
