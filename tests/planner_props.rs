//! Properties of the planner and the passes, over random graphs and random tiny models:
//! - no two buffers that are live at the same time share a byte (checked by an oracle that
//!   recomputes liveness from the steps, not from the plan's own `last_use`);
//! - every input is produced by an earlier step, every buffer has its value's size and lies
//!   inside the arena, and the arena never exceeds one buffer per value;
//! - without reuse, no two buffers overlap at all;
//! - fusion preserves meaning: unfusing a fused graph gives back the lowered graph's structure,
//!   and every value that survives fusion keeps its type.

use m40_llm::gguf::GgmlType;
use m40_llm::ir::{Dim, Graph, Op, Shape, TensorType, Value, ValueType, digest, verify};
use m40_llm::lower::{TinyModel, lower};
use m40_llm::passes::{Pipeline, unfuse};
use m40_llm::plan::{Operand, Plan, PlanOptions, Reuse};
use proptest::prelude::*;

const WIDTHS: [u64; 4] = [8, 16, 24, 40];

/// One instruction of a random graph: an op kind and picks among earlier values.
#[derive(Clone, Debug)]
struct Instr {
    kind: u8,
    a: usize,
    b: usize,
    width: usize,
}

fn instr() -> impl Strategy<Value = Instr> {
    (0u8..6, any::<usize>(), any::<usize>(), 0..WIDTHS.len())
        .prop_map(|(kind, a, b, width)| Instr { kind, a, b, width })
}

/// Builds a random valid graph: an embedding, then silu / add / matmul / rms_norm /
/// select_rows / two-output add_rms_norm over earlier activations, with some values marked as
/// outputs. Every instruction yields a valid node (picks are taken modulo what fits).
fn random_graph(instrs: &[Instr], outputs: &[usize]) -> Graph {
    let mut g = Graph::new();
    let ids = g.add("token_ids", Op::TokenIds, &[]).unwrap();
    let rows = g.add("output_rows", Op::OutputRows, &[]).unwrap();
    let table = g
        .add_weight(
            "table",
            TensorType::new(GgmlType::F16, Shape::fixed(&[50, 16])),
        )
        .unwrap();
    let mut acts: Vec<Value> = vec![g.add("x0", Op::Embedding, &[table, ids]).unwrap()];
    let width_of =
        |g: &Graph, v: Value| match g.value_type(v).tensor().map(|t| t.shape.dims().to_vec()) {
            Some(d) => (d[0], d[1]),
            None => unreachable!(),
        };
    for (i, ins) in instrs.iter().enumerate() {
        let name = format!("v{i}");
        let a = acts[ins.a % acts.len()];
        let (rows_a, Dim::Fixed(wa)) = width_of(&g, a) else {
            unreachable!()
        };
        let same: Vec<Value> = acts
            .iter()
            .copied()
            .filter(|&v| width_of(&g, v) == (rows_a, Dim::Fixed(wa)))
            .collect();
        let b = same[ins.b % same.len()];
        match ins.kind {
            0 => acts.push(g.add(name, Op::Silu, &[a]).unwrap()),
            1 => acts.push(g.add(name, Op::Add, &[a, b]).unwrap()),
            2 => {
                let n = WIDTHS[ins.width];
                let ty = if wa % 32 == 0 {
                    GgmlType::Q8_0
                } else {
                    GgmlType::F16
                };
                let w = g
                    .add_weight(
                        &format!("w{i}"),
                        TensorType::new(ty, Shape::fixed(&[n, wa])),
                    )
                    .unwrap();
                acts.push(g.add(name, Op::MatMul, &[a, w]).unwrap());
            }
            3 => {
                let w = g
                    .add_weight(
                        &format!("n{i}"),
                        TensorType::new(GgmlType::F32, Shape::fixed(&[wa])),
                    )
                    .unwrap();
                acts.push(g.add(name, Op::RmsNorm { eps: 1e-5 }, &[a, w]).unwrap());
            }
            4 if rows_a == Dim::Tokens => {
                acts.push(g.add(name, Op::SelectRows, &[a, rows]).unwrap())
            }
            _ => {
                let w = g
                    .add_weight(
                        &format!("n{i}"),
                        TensorType::new(GgmlType::F32, Shape::fixed(&[wa])),
                    )
                    .unwrap();
                let id = g
                    .add_node(
                        name.clone(),
                        Op::AddRmsNorm { eps: 1e-6 },
                        &[a, b, w],
                        vec![format!("{name}.sum"), format!("{name}.norm")],
                    )
                    .unwrap();
                acts.push(Value::new(id, 0));
                acts.push(Value::new(id, 1));
            }
        }
    }
    for &o in outputs {
        g.set_output(acts[o % acts.len()]);
    }
    g.set_output(*acts.last().unwrap());
    verify(&g).unwrap();
    g
}

/// Checks a plan against liveness recomputed from its steps.
fn check_plan(plan: &Plan) {
    let n = plan.steps.len();
    let sizes = plan.options.sizes();
    // (first step, last step, offset, end, name) of every buffer, liveness from the readers.
    let mut last = vec![vec![0usize; 0]; n];
    for (s, step) in plan.steps.iter().enumerate() {
        last[s] = vec![s; step.outputs.len()];
    }
    for (s, step) in plan.steps.iter().enumerate() {
        for input in &step.inputs {
            if let Operand::Value(v) = *input {
                assert!(
                    (v.step as usize) < s,
                    "step {s} reads step {} before it runs",
                    v.step
                );
                let l = &mut last[v.step as usize][usize::from(v.port)];
                *l = (*l).max(s);
            }
        }
    }
    for v in &plan.outputs {
        last[v.step as usize][usize::from(v.port)] = n;
    }
    let mut buffers = Vec::new();
    let mut naive = 0;
    for (s, step) in plan.steps.iter().enumerate() {
        for (p, out) in step.outputs.iter().enumerate() {
            match (&out.ty, out.buffer) {
                (ValueType::Tensor(t), Some(b)) => {
                    assert_eq!(Some(b.bytes), t.bytes(sizes), "{}", out.name);
                    assert!(
                        b.end() <= plan.memory.arena_bytes,
                        "{} ends past the arena",
                        out.name
                    );
                    naive += b.bytes.next_multiple_of(plan.options.alignment);
                    buffers.push((s, last[s][p], b.offset, b.end(), out.name.as_str()));
                }
                (ValueType::KvCache(_), None) => {}
                _ => panic!("{}: a buffer exactly for tensors", out.name),
            }
        }
    }
    assert_eq!(plan.memory.naive_arena_bytes, naive);
    assert!(plan.memory.arena_bytes <= naive);
    for (i, a) in buffers.iter().enumerate() {
        for b in &buffers[i + 1..] {
            let live_together = a.0 <= b.1 && b.0 <= a.1 || plan.options.reuse == Reuse::None;
            let share_bytes = a.2 < b.3 && b.2 < a.3;
            assert!(
                !(live_together && share_bytes),
                "{} and {} overlap while both live",
                a.4,
                b.4
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn buffers_never_overlap_while_live(
        instrs in prop::collection::vec(instr(), 1..40),
        outputs in prop::collection::vec(any::<usize>(), 0..3),
        max_tokens in 1u64..64,
        outputs_frac in 0.0f64..1.0,
        reuse in prop::bool::ANY,
    ) {
        let graph = random_graph(&instrs, &outputs);
        let options = PlanOptions {
            max_tokens,
            max_outputs: 1 + ((max_tokens - 1) as f64 * outputs_frac) as u64,
            reuse: if reuse { Reuse::Liveness } else { Reuse::None },
            alignment: 64,
        };
        let plan = Plan::build(&graph, &options).unwrap();
        check_plan(&plan);
        if !reuse {
            prop_assert_eq!(plan.memory.arena_bytes, plan.memory.naive_arena_bytes);
        }
        let back = Plan::from_json(&plan.to_json()).unwrap();
        prop_assert_eq!(back, plan);
    }

    #[test]
    fn fusion_preserves_the_computation(
        family in 0usize..3,
        layers in 1u32..4,
        tied in prop::bool::ANY,
        rope_freqs in prop::bool::ANY,
        disabled in prop::collection::vec(prop::bool::ANY, 5),
        weight_type in prop::sample::select(vec![
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
        ]),
    ) {
        let base = [TinyModel::llama(), TinyModel::qwen2(), TinyModel::qwen3()][family].clone();
        let model = TinyModel {
            rope_freqs: rope_freqs && family == 0,
            ..base.with_layers(layers).with_tied_embeddings(tied).with_weight_type(weight_type)
        };
        let lowered = lower(&model.open().unwrap()).unwrap().graph;
        let names = Pipeline::fusion().names();
        let off: Vec<&str> =
            names.iter().zip(&disabled).filter(|(_, d)| **d).map(|(n, _)| *n).collect();
        let mut fused = lowered.clone();
        Pipeline::fusion().without(&off).unwrap().run(&mut fused).unwrap();

        // Same computation: unfusing gives back the lowered structure.
        let expanded = unfuse(&fused).unwrap();
        verify(&expanded).unwrap();
        prop_assert_eq!(digest(&expanded).unwrap(), digest(&lowered).unwrap());

        // Kept values keep their names and types; the logits stay the output.
        for id in fused.node_ids() {
            for out in &fused.node(id).outputs {
                let before = lowered.find_value(&out.name).map(|v| lowered.value_type(v).clone());
                prop_assert_eq!(before.as_ref(), Some(&out.ty), "value {}", out.name);
            }
        }
        let logits = fused.outputs().iter().map(|&v| fused.value_name(v)).collect::<Vec<_>>();
        prop_assert_eq!(logits, vec!["logits"]);
        let options = PlanOptions { max_tokens: 8, max_outputs: 3, ..PlanOptions::default() };
        check_plan(&Plan::build(&fused, &options).unwrap());
    }
}

/// The digest is not blind to real changes: the gate and up projections with their weights
/// swapped (same shapes, same node count) compute something else, and the digest says so.
#[test]
fn digest_sees_swapped_weights() {
    let model = TinyModel::llama().with_layers(1);
    let lowered = lower(&model.open().unwrap()).unwrap().graph;
    let mut swapped = lowered.clone();
    let gate = swapped.find_value("blk.0.ffn_gate").unwrap();
    let up = swapped.find_value("blk.0.ffn_up").unwrap();
    let [x, w_gate] = swapped.inputs(gate.node)[..] else {
        panic!()
    };
    let [_, w_up] = swapped.inputs(up.node)[..] else {
        panic!()
    };
    swapped
        .fuse(&[gate.node], "g", Op::MatMul, &[x, w_up], &[gate])
        .unwrap();
    swapped
        .fuse(&[up.node], "u", Op::MatMul, &[x, w_gate], &[up])
        .unwrap();
    verify(&swapped).unwrap();
    assert_eq!(swapped.len(), lowered.len());
    assert_ne!(digest(&swapped).unwrap(), digest(&lowered).unwrap());
}
