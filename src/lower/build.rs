//! The one decoder every template lowers to. Read it next to llama.cpp's `llm_build_llama`: the
//! same steps, in the same order, with the optional pieces (biases, q/k norms, rope frequency
//! factors, an untied output matrix) switched on by the template and the file.
//!
//! Value names follow the pattern `blk.<layer>.<what>` (`blk.3.q_rope`, `blk.3.ffn_inp`); the
//! suffix says which step produced the value, so a dump reads like the model's forward pass.

use super::hparams::Hyperparams;
use super::template::{Template, TensorRef, block_tensor};
use super::{LowerError, Lowered};
use crate::gguf::{GgmlType, GgufFile};
use crate::ir::{
    AttentionParams, Graph, IrError, KvParams, Op, RopeParams, Shape, TensorType, Value, verify,
};
use std::collections::HashSet;

/// Lowers `file` to the op graph of its architecture's family.
pub fn lower(file: &GgufFile) -> Result<Lowered, LowerError> {
    let path = file.path().to_path_buf();
    let architecture = file
        .architecture()
        .ok_or_else(|| LowerError::NoArchitecture { path: path.clone() })?;
    let template = Template::for_architecture(architecture)?.ok_or_else(|| {
        LowerError::UnsupportedArchitecture {
            path: path.clone(),
            architecture: architecture.to_string(),
            supported: Template::supported_architectures(),
        }
    })?;
    let hparams = Hyperparams::read(file, &template)?;
    let mut lowering = Lowering {
        file,
        hp: &hparams,
        template: &template,
        graph: Graph::new(),
        used: HashSet::new(),
    };
    lowering.model()?;
    lowering.check_every_tensor_is_used()?;
    let graph = lowering.graph;
    verify(&graph).map_err(|source| LowerError::Invalid { path, source })?;
    Ok(Lowered {
        family: template.family.clone(),
        name: file.optional_str("general.name")?.map(str::to_string),
        hparams,
        graph,
    })
}

/// What a weight role needs besides its shape.
#[derive(Clone, Copy)]
enum Kind {
    /// A matrix of any storage type (matmul and embedding weights).
    Matrix,
    /// An F32 vector (norm weights, biases, rope factors).
    Vector,
}

struct Lowering<'a> {
    file: &'a GgufFile,
    hp: &'a Hyperparams,
    template: &'a Template,
    graph: Graph,
    /// The tensors some role has used.
    used: HashSet<String>,
}

impl Lowering<'_> {
    fn model(&mut self) -> Result<(), LowerError> {
        let hp = self.hp;
        let tensors = &self.template.tensors;
        let (n_embd, n_vocab) = (u64::from(hp.n_embd), u64::from(hp.n_vocab));

        let token_ids = self.add("token_ids", Op::TokenIds, &[])?;
        let positions = self.add("positions", Op::Positions, &[])?;
        let output_rows = self.add("output_rows", Op::OutputRows, &[])?;
        let token_embd = self.weight(
            "token_embd",
            &tensors.token_embd,
            &[n_embd, n_vocab],
            Kind::Matrix,
        )?;
        let rope_freqs = self.optional_weight(
            "rope_freqs",
            tensors.rope_freqs.as_ref(),
            None,
            &[u64::from(hp.n_rot / 2)],
            Kind::Vector,
        )?;

        let mut x = self.add("inp_embd", Op::Embedding, &[token_embd, token_ids])?;
        for layer in 0..hp.n_layers {
            // The last block keeps only the rows whose logits are wanted, once attention (which
            // needs every token's keys and values) is done.
            let select = (layer + 1 == hp.n_layers).then_some(output_rows);
            x = self.block(layer, x, positions, rope_freqs, select)?;
        }

        let norm = self.weight("output_norm", &tensors.output_norm, &[n_embd], Kind::Vector)?;
        let x = self.add("result_norm", Op::RmsNorm { eps: hp.rms_eps }, &[x, norm])?;
        let output = self.optional_weight(
            "output",
            tensors.output.as_ref(),
            None,
            &[n_embd, n_vocab],
            Kind::Matrix,
        )?;
        let logits = self.add("logits", Op::MatMul, &[x, output.unwrap_or(token_embd)])?;
        self.graph.set_output(logits);
        Ok(())
    }

    /// One decoder block: attention then feed-forward, each with a pre-norm and a residual.
    fn block(
        &mut self,
        layer: u32,
        x: Value,
        positions: Value,
        rope_freqs: Option<Value>,
        select: Option<Value>,
    ) -> Result<Value, LowerError> {
        let hp = self.hp;
        let b = &self.template.block;
        let (n_embd, n_ff, q_dim, kv_dim) = (
            u64::from(hp.n_embd),
            u64::from(hp.n_ff),
            hp.q_dim(),
            hp.kv_dim(),
        );
        let head_dim = u64::from(hp.head_dim);
        let name = |what: &str| format!("blk.{layer}.{what}");

        // Attention.
        let w = self.weight(
            "attn_norm",
            &block_tensor(&b.attn_norm, layer),
            &[n_embd],
            Kind::Vector,
        )?;
        let h = self.add(name("attn_norm"), Op::RmsNorm { eps: hp.rms_eps }, &[x, w])?;
        let q = self.projection(
            layer,
            "q",
            h,
            ("attn_q", &b.attn_q),
            b.attn_q_bias.as_ref(),
            n_embd,
            q_dim,
        )?;
        let k = self.projection(
            layer,
            "k",
            h,
            ("attn_k", &b.attn_k),
            b.attn_k_bias.as_ref(),
            n_embd,
            kv_dim,
        )?;
        let v = self.projection(
            layer,
            "v",
            h,
            ("attn_v", &b.attn_v),
            b.attn_v_bias.as_ref(),
            n_embd,
            kv_dim,
        )?;
        let q = self.head_norm(layer, "q", q, b.attn_q_norm.as_ref(), head_dim)?;
        let k = self.head_norm(layer, "k", k, b.attn_k_norm.as_ref(), head_dim)?;

        let rope = Op::Rope(RopeParams {
            style: hp.rope_style,
            head_dim: hp.head_dim,
            n_rot: hp.n_rot,
            freq_base: hp.rope_freq_base,
            freq_scale: hp.rope_freq_scale,
            freq_factors: rope_freqs.is_some(),
        });
        let rope_inputs = |x: Value| {
            [Some(x), Some(positions), rope_freqs]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
        };
        let q = self.add(name("q_rope"), rope.clone(), &rope_inputs(q))?;
        let k = self.add(name("k_rope"), rope, &rope_inputs(k))?;
        let kv = KvParams {
            layer,
            n_kv_heads: hp.n_kv_heads,
            head_dim: hp.head_dim,
        };
        let cache = self.add(name("kv_write"), Op::KvWrite(kv), &[k, v])?;
        let attention = Op::Attention(AttentionParams {
            n_heads: hp.n_heads,
            n_kv_heads: hp.n_kv_heads,
            head_dim: hp.head_dim,
            scale: hp.attention_scale,
            sliding_window: None,
        });
        let attn = self.add(name("attn"), attention, &[q, cache])?;
        let mut attn_out = self.projection(
            layer,
            "attn_out",
            attn,
            ("attn_output", &b.attn_output),
            b.attn_output_bias.as_ref(),
            q_dim,
            n_embd,
        )?;
        let mut residual = x;
        if let Some(rows) = select {
            attn_out = self.add(name("attn_out_rows"), Op::SelectRows, &[attn_out, rows])?;
            residual = self.add(name("inp_rows"), Op::SelectRows, &[residual, rows])?;
        }
        let ffn_inp = self.add(name("ffn_inp"), Op::Add, &[residual, attn_out])?;

        // Feed-forward: SwiGLU.
        let w = self.weight(
            "ffn_norm",
            &block_tensor(&b.ffn_norm, layer),
            &[n_embd],
            Kind::Vector,
        )?;
        let h = self.add(
            name("ffn_norm"),
            Op::RmsNorm { eps: hp.rms_eps },
            &[ffn_inp, w],
        )?;
        let gate = self.projection(
            layer,
            "ffn_gate",
            h,
            ("ffn_gate", &b.ffn_gate),
            None,
            n_embd,
            n_ff,
        )?;
        let up = self.projection(
            layer,
            "ffn_up",
            h,
            ("ffn_up", &b.ffn_up),
            None,
            n_embd,
            n_ff,
        )?;
        let silu = self.add(name("ffn_silu"), Op::Silu, &[gate])?;
        let swiglu = self.add(name("ffn_swiglu"), Op::Mul, &[silu, up])?;
        let down = self.projection(
            layer,
            "ffn_down",
            swiglu,
            ("ffn_down", &b.ffn_down),
            None,
            n_ff,
            n_embd,
        )?;
        self.add(name("l_out"), Op::Add, &[ffn_inp, down])
    }

    /// `x W_roleᵀ (+ bias)`: the value `blk.<layer>.<what>` (`<what>_bias` after the bias).
    #[allow(clippy::too_many_arguments)]
    fn projection(
        &mut self,
        layer: u32,
        what: &str,
        x: Value,
        (role, tensor): (&str, &str),
        bias: Option<&TensorRef>,
        n_in: u64,
        n_out: u64,
    ) -> Result<Value, LowerError> {
        let w = self.weight(
            role,
            &block_tensor(tensor, layer),
            &[n_in, n_out],
            Kind::Matrix,
        )?;
        let y = self.add(format!("blk.{layer}.{what}"), Op::MatMul, &[x, w])?;
        match self.optional_weight(
            &format!("{role}_bias"),
            bias,
            Some(layer),
            &[n_out],
            Kind::Vector,
        )? {
            Some(b) => self.add(format!("blk.{layer}.{what}_bias"), Op::Add, &[y, b]),
            None => Ok(y),
        }
    }

    /// RMS norm over each head (`blk.<layer>.<what>_norm`), when the family has one.
    fn head_norm(
        &mut self,
        layer: u32,
        what: &str,
        x: Value,
        norm: Option<&TensorRef>,
        head_dim: u64,
    ) -> Result<Value, LowerError> {
        let role = format!("attn_{what}_norm");
        match self.optional_weight(&role, norm, Some(layer), &[head_dim], Kind::Vector)? {
            Some(w) => self.add(
                format!("blk.{layer}.{what}_norm"),
                Op::RmsNorm {
                    eps: self.hp.rms_eps,
                },
                &[x, w],
            ),
            None => Ok(x),
        }
    }

    fn add(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: &[Value],
    ) -> Result<Value, LowerError> {
        self.graph
            .add(name, op, inputs)
            .map_err(|e| self.graph_error(e))
    }

    /// The weight `tensor` for `role`, checked to have ggml shape `ne` (and F32 for vectors).
    fn weight(
        &mut self,
        role: &str,
        tensor: &str,
        ne: &[u64],
        kind: Kind,
    ) -> Result<Value, LowerError> {
        let path = self.file.path().to_path_buf();
        let info = self
            .file
            .tensor(tensor)
            .ok_or_else(|| LowerError::MissingTensor {
                path: path.clone(),
                tensor: tensor.to_string(),
                role: role.to_string(),
                family: self.template.family.clone(),
            })?;
        if info.ne != ne {
            return Err(LowerError::TensorShape {
                path,
                tensor: tensor.to_string(),
                role: role.to_string(),
                expected: ne.to_vec(),
                found: info.ne.clone(),
            });
        }
        if matches!(kind, Kind::Vector) && info.ty != GgmlType::F32 {
            return Err(LowerError::TensorType {
                path,
                tensor: tensor.to_string(),
                role: role.to_string(),
                found: info.ty,
            });
        }
        self.used.insert(tensor.to_string());
        let ty = TensorType::new(info.ty, Shape::from_ggml(&info.ne));
        self.graph
            .add_weight(tensor, ty)
            .map_err(|e| self.graph_error(e))
    }

    /// The weight of an optional role: `None` when the template does not list the role, or lists
    /// it as optional and the file lacks it.
    fn optional_weight(
        &mut self,
        role: &str,
        spec: Option<&TensorRef>,
        layer: Option<u32>,
        ne: &[u64],
        kind: Kind,
    ) -> Result<Option<Value>, LowerError> {
        let Some(spec) = spec else { return Ok(None) };
        let tensor = match layer {
            Some(layer) => block_tensor(spec.name(), layer),
            None => spec.name().to_string(),
        };
        if spec.is_optional() && self.file.tensor(&tensor).is_none() {
            return Ok(None);
        }
        self.weight(role, &tensor, ne, kind).map(Some)
    }

    fn check_every_tensor_is_used(&self) -> Result<(), LowerError> {
        let unused: Vec<String> = self
            .file
            .tensors()
            .iter()
            .filter(|t| !self.used.contains(&t.name))
            .map(|t| t.name.clone())
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        Err(LowerError::UnusedTensors {
            path: self.file.path().to_path_buf(),
            family: self.template.family.clone(),
            tensors: unused,
        })
    }

    fn graph_error(&self, source: IrError) -> LowerError {
        LowerError::Graph {
            path: self.file.path().to_path_buf(),
            source,
        }
    }
}
