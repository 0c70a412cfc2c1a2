//! `rope-qkv-write`: `attention(rope(q), rope_kv_write(k, v))` → one `rope_qkv_write(q, k, v,
//! pos)` feeding the attention both its rotated queries (port 0) and the written cache (port 1):
//! the query's rope and the K/V write become one kernel launch per layer.
//!
//! It matches a `rope_kv_write` (or, when `rope-kv-write` did not run, a `kv_write` of a rope
//! read by nothing else) whose cache is read only by an attention whose `q` is a rope with the
//! same parameters, positions and frequency factors, read by nothing but that attention. Anything
//! else leaves the graph as it is.

use super::{Pass, Rewrite, joined_name, rewrite_each, sole_user};
use crate::ir::{Graph, IrError, KvParams, NodeId, Op, RopeParams, Value};

pub struct RopeQkvWriteFusion;

impl Pass for RopeQkvWriteFusion {
    fn name(&self) -> &'static str {
        "rope-qkv-write"
    }

    fn run(&self, graph: &mut Graph) -> Result<usize, IrError> {
        rewrite_each(graph, |graph, id, node| {
            let write = KeyWrite::of(graph, id, &node.op)?;
            let cache = Value::new(id, 0);
            // The cache's one reader: an attention reading it as its `kv`.
            let (attn, 1) = sole_user(graph, cache)? else {
                return None;
            };
            let Op::Attention(_) = graph.node(attn).op else {
                return None;
            };
            let q_rope = *graph.inputs(attn).first()?;
            let Op::Rope(q_params) = graph.node(q_rope.node).op else {
                return None;
            };
            if q_params != write.rope || sole_user(graph, q_rope) != Some((attn, 0)) {
                return None;
            }
            // Same positions (and frequency factors): rope's inputs after `x`.
            let q_inputs = graph.inputs(q_rope.node);
            let (&q, q_rest) = q_inputs.split_first()?;
            if q_rest != write.rest.as_slice() {
                return None;
            }
            let mut replaced = vec![q_rope.node];
            replaced.extend(&write.replaced);
            Some(Rewrite {
                replaced,
                name: joined_name(&[graph.value_name(q_rope), graph.value_name(cache)]),
                op: Op::RopeQkvWrite {
                    rope: write.rope,
                    kv: write.kv,
                },
                inputs: [q, write.k, write.v]
                    .into_iter()
                    .chain(write.rest.iter().copied())
                    .collect(),
                ports: vec![q_rope, cache],
            })
        })
    }
}

/// A rotated-key cache write, fused or not: `rope_kv_write(k, v, rest..)` or
/// `kv_write(rope(k, rest..), v)` with the rope read by the write alone.
struct KeyWrite {
    rope: RopeParams,
    kv: KvParams,
    k: Value,
    v: Value,
    /// The rope's inputs after `x`: `pos[, freq_factors]`.
    rest: Vec<Value>,
    /// The nodes the write is made of.
    replaced: Vec<NodeId>,
}

impl KeyWrite {
    fn of(graph: &Graph, id: NodeId, op: &Op) -> Option<KeyWrite> {
        match *op {
            Op::RopeKvWrite { rope, kv } => {
                let inputs = graph.inputs(id);
                let [k, v, ref rest @ ..] = inputs[..] else {
                    return None;
                };
                Some(KeyWrite {
                    rope,
                    kv,
                    k,
                    v,
                    rest: rest.to_vec(),
                    replaced: vec![id],
                })
            }
            Op::KvWrite(kv) => {
                let [k_rope, v] = graph.inputs(id)[..] else {
                    return None;
                };
                let Op::Rope(rope) = graph.node(k_rope.node).op else {
                    return None;
                };
                if sole_user(graph, k_rope) != Some((id, 0)) {
                    return None;
                }
                let rope_inputs = graph.inputs(k_rope.node);
                let (&k, rest) = rope_inputs.split_first()?;
                Some(KeyWrite {
                    rope,
                    kv,
                    k,
                    v,
                    rest: rest.to_vec(),
                    replaced: vec![k_rope.node, id],
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgmlType;
    use crate::ir::{AttentionParams, RopeStyle, Shape, TensorType, verify};
    use crate::passes::{RopeKvWriteFusion, unfuse};

    const HEADS: u32 = 6;
    const KV_HEADS: u32 = 2;
    const D: u32 = 16;

    fn params(freq_base: f32, freq_factors: bool) -> RopeParams {
        RopeParams {
            style: RopeStyle::Neox,
            head_dim: D,
            n_rot: D,
            freq_base,
            freq_scale: 1.0,
            freq_factors,
        }
    }

    /// What may differ between the query's rope and the keys' in [`block`].
    #[derive(Clone, Copy, Default)]
    struct Variant {
        /// Both ropes read frequency factors (the same weight unless `other_factors`).
        factors: bool,
        /// The query's rope has another base.
        other_base: bool,
        /// The query's rope reads other frequency factors than the keys'.
        other_factors: bool,
        /// The rotated queries are a graph output too.
        q_rope_output: bool,
        /// The rotated keys are a graph output too.
        k_rope_output: bool,
    }

    /// One attention block's q/k/v tail: `attention(rope(q), kv_write(rope(k), v))`.
    fn block(var: Variant) -> Graph {
        let mut g = Graph::new();
        let ids = g.add("token_ids", Op::TokenIds, &[]).unwrap();
        let pos = g.add("positions", Op::Positions, &[]).unwrap();
        let act = |g: &mut Graph, name: &str, width: u64| {
            let t = g
                .add_weight(
                    &format!("{name}.table"),
                    TensorType::new(GgmlType::F32, Shape::fixed(&[10, width])),
                )
                .unwrap();
            g.add(name, Op::Embedding, &[t, ids]).unwrap()
        };
        let q = act(&mut g, "blk.0.q", u64::from(HEADS * D));
        let k = act(&mut g, "blk.0.k", u64::from(KV_HEADS * D));
        let v = act(&mut g, "blk.0.v", u64::from(KV_HEADS * D));
        let factors = var.factors || var.other_factors;
        let ff = |g: &mut Graph, name: &str| {
            g.add_weight(
                name,
                TensorType::new(GgmlType::F32, Shape::fixed(&[u64::from(D / 2)])),
            )
            .unwrap()
        };
        let (ff_k, ff_q) = if factors {
            let k = ff(&mut g, "rope_freqs.weight");
            let q = if var.other_factors {
                ff(&mut g, "other_freqs.weight")
            } else {
                k
            };
            (vec![k], vec![q])
        } else {
            (vec![], vec![])
        };
        let base_q = if var.other_base { 500.0 } else { 10_000.0 };
        let q_inputs: Vec<Value> = [q, pos].into_iter().chain(ff_q).collect();
        let q_rope = g
            .add("blk.0.q_rope", Op::Rope(params(base_q, factors)), &q_inputs)
            .unwrap();
        let k_inputs: Vec<Value> = [k, pos].into_iter().chain(ff_k).collect();
        let k_rope = g
            .add(
                "blk.0.k_rope",
                Op::Rope(params(10_000.0, factors)),
                &k_inputs,
            )
            .unwrap();
        let kv = KvParams {
            layer: 0,
            n_kv_heads: KV_HEADS,
            head_dim: D,
        };
        let cache = g
            .add("blk.0.kv_write", Op::KvWrite(kv), &[k_rope, v])
            .unwrap();
        let att = AttentionParams {
            n_heads: HEADS,
            n_kv_heads: KV_HEADS,
            head_dim: D,
            scale: 0.25,
            sliding_window: None,
        };
        let y = g
            .add("blk.0.attn", Op::Attention(att), &[q_rope, cache])
            .unwrap();
        g.set_output(y);
        if var.q_rope_output {
            g.set_output(q_rope);
        }
        if var.k_rope_output {
            g.set_output(k_rope);
        }
        verify(&g).unwrap();
        g
    }

    /// The fused node's check: one `rope_qkv_write` whose two ports feed the attention.
    fn assert_fused(g: &Graph, factors: bool) {
        let id = g.find("blk.0.q_rope+kv_write").expect("the fused node");
        assert!(
            matches!(g.node(id).op, Op::RopeQkvWrite { rope, .. } if rope.freq_factors == factors),
            "{g}"
        );
        let inputs: Vec<&str> = g.inputs(id).iter().map(|&v| g.value_name(v)).collect();
        let mut want = vec!["blk.0.q", "blk.0.k", "blk.0.v", "positions"];
        if factors {
            want.push("rope_freqs.weight");
        }
        assert_eq!(inputs, want);
        let attn = g.find("blk.0.attn").unwrap();
        assert_eq!(g.inputs(attn), [Value::new(id, 0), Value::new(id, 1)]);
        assert_eq!(g.find_value("blk.0.q_rope"), Some(Value::new(id, 0)));
        assert_eq!(g.find_value("blk.0.kv_write"), Some(Value::new(id, 1)));
        // The rotated keys are gone; no rope or write is left.
        assert!(g.find("blk.0.k_rope").is_none());
        assert!(
            g.node_ids().all(|n| !matches!(
                g.node(n).op,
                Op::Rope(_) | Op::KvWrite(_) | Op::RopeKvWrite { .. }
            )),
            "{g}"
        );
        verify(g).unwrap();
    }

    #[test]
    fn folds_the_query_rope_into_rope_kv_write() {
        let mut g = block(Variant::default());
        assert_eq!(RopeKvWriteFusion.run(&mut g).unwrap(), 1);
        let n = g.n_compute_nodes();
        assert_eq!(RopeQkvWriteFusion.run(&mut g).unwrap(), 1);
        assert_eq!(g.n_compute_nodes(), n - 1);
        assert_fused(&g, false);
    }

    #[test]
    fn alone_it_fuses_the_unfused_rope_and_kv_write() {
        let mut g = block(Variant::default());
        let n = g.n_compute_nodes();
        assert_eq!(RopeQkvWriteFusion.run(&mut g).unwrap(), 1);
        assert_eq!(g.n_compute_nodes(), n - 2);
        assert_fused(&g, false);
    }

    #[test]
    fn unfusing_gives_back_both_ropes_and_the_write() {
        let mut g = block(Variant::default());
        RopeQkvWriteFusion.run(&mut g).unwrap();
        let plain = unfuse(&g).unwrap();
        verify(&plain).unwrap();
        let ops: Vec<String> = plain
            .node_ids()
            .map(|id| plain.node(id).op.name().to_string())
            .collect();
        assert_eq!(ops.iter().filter(|o| *o == "rope").count(), 2, "{plain}");
        assert_eq!(ops.iter().filter(|o| *o == "kv_write").count(), 1);
        let q_rope = plain.find("blk.0.q_rope").unwrap();
        assert!(matches!(plain.node(q_rope).op, Op::Rope(_)));
        let inputs: Vec<&str> = plain
            .inputs(q_rope)
            .iter()
            .map(|&v| plain.value_name(v))
            .collect();
        assert_eq!(inputs, ["blk.0.q", "positions"]);
    }

    #[test]
    fn leaves_the_graph_alone_when_anything_differs() {
        for (what, var) in [
            (
                "another base",
                Variant {
                    other_base: true,
                    ..Variant::default()
                },
            ),
            (
                "other frequency factors",
                Variant {
                    other_factors: true,
                    ..Variant::default()
                },
            ),
            (
                "rotated queries read elsewhere",
                Variant {
                    q_rope_output: true,
                    ..Variant::default()
                },
            ),
        ] {
            for first in [false, true] {
                let mut g = block(var);
                if first {
                    RopeKvWriteFusion.run(&mut g).unwrap();
                }
                let before = g.to_string();
                assert_eq!(RopeQkvWriteFusion.run(&mut g).unwrap(), 0, "{what}");
                assert_eq!(g.to_string(), before, "{what}");
            }
        }
        // Rotated keys read elsewhere: neither rope-kv-write nor this pass folds them.
        let mut g = block(Variant {
            k_rope_output: true,
            ..Variant::default()
        });
        let before = g.to_string();
        assert_eq!(RopeKvWriteFusion.run(&mut g).unwrap(), 0);
        assert_eq!(RopeQkvWriteFusion.run(&mut g).unwrap(), 0);
        assert_eq!(g.to_string(), before);
    }

    #[test]
    fn the_same_frequency_factors_fuse_and_are_read_once() {
        for first in [false, true] {
            let mut g = block(Variant {
                factors: true,
                ..Variant::default()
            });
            if first {
                assert_eq!(RopeKvWriteFusion.run(&mut g).unwrap(), 1);
            }
            assert_eq!(RopeQkvWriteFusion.run(&mut g).unwrap(), 1);
            assert_fused(&g, true);
        }
    }
}
