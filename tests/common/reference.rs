//! An independent forward pass of the llama family (llama, qwen2, qwen3), written to be read in
//! one sitting like llama2.c: every weight dequantized into an `ndarray` array, then the
//! transformer as a few lines of array arithmetic per step. It shares no code with the compiler
//! or the backends (only the GGUF reader and dequantizer), so agreement with it checks lowering,
//! fusion and the CPU kernels together.
//!
//! K and V are rounded to f16, as the KV cache stores them; everything else is f32.

use half::f16;
use m40_llm::gguf::{GgufFile, quants};
use ndarray::{Array1, Array2, ArrayView1, s};

pub struct Reference {
    n_layers: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    eps: f32,
    freq_base: f64,
    /// NeoX rope (qwen2, qwen3) pairs `(i, i + d/2)`; llama's pairs `(2i, 2i + 1)`.
    neox: bool,
    file: GgufFile,
}

impl Reference {
    pub fn new(file: GgufFile) -> Reference {
        let arch = file.architecture().unwrap().to_string();
        let int = |k: &str| {
            file.get(&format!("{arch}.{k}"))
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
        };
        let float = |k: &str| file.get(&format!("{arch}.{k}")).and_then(|v| v.as_f64());
        let n_embd = int("embedding_length").unwrap();
        let n_heads = int("attention.head_count").unwrap();
        Reference {
            n_layers: int("block_count").unwrap(),
            n_heads,
            n_kv_heads: int("attention.head_count_kv").unwrap(),
            head_dim: int("attention.key_length").unwrap_or(n_embd / n_heads),
            eps: float("attention.layer_norm_rms_epsilon").unwrap() as f32,
            freq_base: float("rope.freq_base").unwrap_or(10000.0),
            neox: arch != "llama",
            file,
        }
    }

    /// A weight as an array: `[n, k]` for matrices (GGUF `ne = [k, n]`), `[k]` as `[1, k]`.
    fn weight(&self, name: &str) -> Option<Array2<f32>> {
        let t = self.file.tensor(name)?;
        let values = quants::dequantize_f32(&self.file, t).unwrap();
        let k = t.ne[0] as usize;
        Some(Array2::from_shape_vec((values.len() / k, k), values).unwrap())
    }

    fn matrix(&self, name: &str) -> Array2<f32> {
        self.weight(name)
            .unwrap_or_else(|| panic!("missing {name}"))
    }

    fn vector(&self, name: &str) -> Option<Array1<f32>> {
        self.weight(name).map(|w| w.row(0).to_owned())
    }

    /// RMS norm of each group of `w.len()` elements, times `w`.
    fn rms_norm(&self, x: &Array1<f32>, w: &Array1<f32>) -> Array1<f32> {
        let mut y = x.clone();
        for mut group in y.exact_chunks_mut(w.len()) {
            let mean_sq = group.mapv(|v| v * v).mean().unwrap();
            group *= 1.0 / (mean_sq + self.eps).sqrt();
            group *= w;
        }
        y
    }

    /// Rotates each head of `x` by the angles of position `pos`.
    fn rope(&self, x: &mut Array1<f32>, pos: usize) {
        let d = self.head_dim;
        for mut head in x.exact_chunks_mut(d) {
            for i in 0..d / 2 {
                let theta = pos as f64 * self.freq_base.powf(-2.0 * i as f64 / d as f64);
                let (sin, cos) = (theta.sin() as f32, theta.cos() as f32);
                let (a, b) = if self.neox {
                    (i, i + d / 2)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (xa, xb) = (head[a], head[b]);
                head[a] = xa * cos - xb * sin;
                head[b] = xa * sin + xb * cos;
            }
        }
    }

    /// The logits after every token of `tokens` (one sequence from position 0).
    pub fn logits(&self, tokens: &[u32]) -> Vec<Vec<f32>> {
        let hd = self.head_dim;
        let group = self.n_heads / self.n_kv_heads;
        let embd = self.matrix("token_embd.weight");
        let mut xs: Vec<Array1<f32>> = tokens
            .iter()
            .map(|&t| embd.row(t as usize).to_owned())
            .collect();
        let to_f16 = |v: Array1<f32>| v.mapv(|x| f16::from_f32(x).to_f32());
        let plus = |v: Array1<f32>, b: &Option<Array1<f32>>| match b {
            Some(b) => v + b,
            None => v,
        };

        for l in 0..self.n_layers {
            let name = |s: &str| format!("blk.{l}.{s}");
            let (wq, wk, wv, wo) = (
                self.matrix(&name("attn_q.weight")),
                self.matrix(&name("attn_k.weight")),
                self.matrix(&name("attn_v.weight")),
                self.matrix(&name("attn_output.weight")),
            );
            let (bq, bk, bv) = (
                self.vector(&name("attn_q.bias")),
                self.vector(&name("attn_k.bias")),
                self.vector(&name("attn_v.bias")),
            );
            let (q_norm, k_norm) = (
                self.vector(&name("attn_q_norm.weight")),
                self.vector(&name("attn_k_norm.weight")),
            );
            let attn_norm = self.vector(&name("attn_norm.weight")).unwrap();

            // Attention, one token at a time over the keys and values so far (causal).
            let (mut keys, mut values) = (Vec::new(), Vec::new());
            let mut attn_out = Vec::new();
            for (pos, x) in xs.iter().enumerate() {
                let h = self.rms_norm(x, &attn_norm);
                let mut q = plus(wq.dot(&h), &bq);
                let mut k = plus(wk.dot(&h), &bk);
                let v = plus(wv.dot(&h), &bv);
                if let (Some(qn), Some(kn)) = (&q_norm, &k_norm) {
                    q = self.rms_norm(&q, qn);
                    k = self.rms_norm(&k, kn);
                }
                self.rope(&mut q, pos);
                self.rope(&mut k, pos);
                keys.push(to_f16(k));
                values.push(to_f16(v));
                let mut out = Array1::<f32>::zeros(self.n_heads * hd);
                for head in 0..self.n_heads {
                    let g = head / group;
                    let qh = q.slice(s![head * hd..(head + 1) * hd]);
                    let kv = |a: &Array1<f32>| a.slice(s![g * hd..(g + 1) * hd]).to_owned();
                    let scores: Array1<f32> = keys
                        .iter()
                        .map(|k| qh.dot(&kv(k)) / (hd as f32).sqrt())
                        .collect();
                    let weights = softmax(scores.view());
                    let mut o = out.slice_mut(s![head * hd..(head + 1) * hd]);
                    for (w, v) in weights.iter().zip(&values) {
                        o.scaled_add(*w, &kv(v));
                    }
                }
                attn_out.push(wo.dot(&out));
            }

            // Residual, then the SwiGLU feed-forward and its residual.
            let ffn_norm = self.vector(&name("ffn_norm.weight")).unwrap();
            let (wg, wu, wd) = (
                self.matrix(&name("ffn_gate.weight")),
                self.matrix(&name("ffn_up.weight")),
                self.matrix(&name("ffn_down.weight")),
            );
            for (x, a) in xs.iter_mut().zip(attn_out) {
                *x += &a;
                let h = self.rms_norm(x, &ffn_norm);
                let gate = wg.dot(&h).mapv(|g| g / (1.0 + (-g).exp()));
                *x += &wd.dot(&(gate * wu.dot(&h)));
            }
        }

        let out_norm = self.vector("output_norm.weight").unwrap();
        let output = self.weight("output.weight").unwrap_or(embd);
        xs.iter()
            .map(|x| output.dot(&self.rms_norm(x, &out_norm)).to_vec())
            .collect()
    }
}

fn softmax(x: ArrayView1<f32>) -> Array1<f32> {
    let max = x.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let e = x.mapv(|v| (v - max).exp());
    let sum = e.sum();
    e / sum
}
