//! An independent forward pass of the llama family (llama, qwen2, qwen3), written as plainly as
//! llama2.c: dequantize every weight to f32, then loops. It shares no code with the compiler or
//! the backends (only the GGUF reader and dequantizer), so agreement with it checks lowering,
//! fusion and the CPU kernels together.
//!
//! K and V are rounded to f16 as the KV cache stores them; everything else is f32 (sums in f64).

use half::f16;
use m40_llm::gguf::{GgufFile, quants};

pub struct Reference {
    n_layers: usize,
    n_embd: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    eps: f32,
    freq_base: f32,
    neox: bool,
    file: GgufFile,
}

fn key_u(f: &GgufFile, k: &str) -> usize {
    f.get(k)
        .and_then(|v| v.as_u64())
        .unwrap_or_else(|| panic!("{k}")) as usize
}

impl Reference {
    pub fn new(file: GgufFile) -> Reference {
        let arch = file.architecture().unwrap().to_string();
        let k = |s: &str| format!("{arch}.{s}");
        let n_embd = key_u(&file, &k("embedding_length"));
        let n_heads = key_u(&file, &k("attention.head_count"));
        let head_dim = file
            .get(&k("attention.key_length"))
            .and_then(|v| v.as_u64())
            .map_or(n_embd / n_heads, |v| v as usize);
        Reference {
            n_layers: key_u(&file, &k("block_count")),
            n_embd,
            n_heads,
            n_kv_heads: key_u(&file, &k("attention.head_count_kv")),
            head_dim,
            eps: file
                .get(&k("attention.layer_norm_rms_epsilon"))
                .and_then(|v| v.as_f64())
                .unwrap() as f32,
            freq_base: file
                .get(&k("rope.freq_base"))
                .and_then(|v| v.as_f64())
                .unwrap_or(10000.0) as f32,
            neox: arch != "llama",
            file,
        }
    }

    fn w(&self, name: &str) -> Option<Vec<f32>> {
        let t = self.file.tensor(name)?;
        Some(quants::dequantize_f32(&self.file, t).unwrap())
    }

    fn req(&self, name: &str) -> Vec<f32> {
        self.w(name).unwrap_or_else(|| panic!("missing {name}"))
    }

    /// `y = x Wᵀ` for a `[n, k]` weight stored row-major.
    fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
        let k = x.len();
        w.chunks_exact(k)
            .map(|row| {
                row.iter()
                    .zip(x)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum::<f64>() as f32
            })
            .collect()
    }

    fn rms_norm(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let g = w.len();
        let mut y = Vec::with_capacity(x.len());
        for chunk in x.chunks_exact(g) {
            let ms = chunk
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                / g as f64;
            let scale = 1.0 / (ms as f32 + self.eps).sqrt();
            y.extend(chunk.iter().zip(w).map(|(&v, &w)| v * scale * w));
        }
        y
    }

    fn rope(&self, x: &mut [f32], pos: usize) {
        let d = self.head_dim;
        for head in x.chunks_exact_mut(d) {
            for i in 0..d / 2 {
                let theta = pos as f64 * f64::from(self.freq_base).powf(-2.0 * i as f64 / d as f64);
                let (s, c) = (theta.sin() as f32, theta.cos() as f32);
                let (a, b) = if self.neox {
                    (i, i + d / 2)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (xa, xb) = (head[a], head[b]);
                head[a] = xa * c - xb * s;
                head[b] = xa * s + xb * c;
            }
        }
    }

    /// The logits after every token of `tokens` (one sequence from position 0).
    pub fn logits(&self, tokens: &[u32]) -> Vec<Vec<f32>> {
        let (e, hd) = (self.n_embd, self.head_dim);
        let embd = self.req("token_embd.weight");
        let mut xs: Vec<Vec<f32>> = tokens
            .iter()
            .map(|&t| embd[t as usize * e..(t as usize + 1) * e].to_vec())
            .collect();
        for l in 0..self.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            let (wq, wk, wv, wo) = (
                self.req(&n("attn_q.weight")),
                self.req(&n("attn_k.weight")),
                self.req(&n("attn_v.weight")),
                self.req(&n("attn_output.weight")),
            );
            let (bq, bk, bv) = (
                self.w(&n("attn_q.bias")),
                self.w(&n("attn_k.bias")),
                self.w(&n("attn_v.bias")),
            );
            let (qn, kn) = (
                self.w(&n("attn_q_norm.weight")),
                self.w(&n("attn_k_norm.weight")),
            );
            let attn_norm = self.req(&n("attn_norm.weight"));
            let mut keys: Vec<Vec<f32>> = Vec::new();
            let mut values: Vec<Vec<f32>> = Vec::new();
            let mut attn_out = Vec::new();
            for (pos, x) in xs.iter().enumerate() {
                let h = self.rms_norm(x, &attn_norm);
                let add = |mut v: Vec<f32>, b: &Option<Vec<f32>>| {
                    if let Some(b) = b {
                        v.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                    }
                    v
                };
                let mut q = add(Self::matvec(&wq, &h), &bq);
                let mut k = add(Self::matvec(&wk, &h), &bk);
                let v = add(Self::matvec(&wv, &h), &bv);
                if let (Some(qn), Some(kn)) = (&qn, &kn) {
                    q = self.rms_norm(&q, qn);
                    k = self.rms_norm(&k, kn);
                }
                self.rope(&mut q, pos);
                self.rope(&mut k, pos);
                let f16r = |v: Vec<f32>| v.into_iter().map(|x| f16::from_f32(x).to_f32()).collect();
                keys.push(f16r(k));
                values.push(f16r(v));
                let group = self.n_heads / self.n_kv_heads;
                let mut out = vec![0f32; self.n_heads * hd];
                for h in 0..self.n_heads {
                    let g = h / group;
                    let qh = &q[h * hd..(h + 1) * hd];
                    let scores: Vec<f64> = keys
                        .iter()
                        .map(|k| {
                            qh.iter()
                                .zip(&k[g * hd..(g + 1) * hd])
                                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let ws: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = ws.iter().sum();
                    for (w, v) in ws.iter().zip(&values) {
                        for (o, &vv) in out[h * hd..(h + 1) * hd]
                            .iter_mut()
                            .zip(&v[g * hd..(g + 1) * hd])
                        {
                            *o += (w / sum) as f32 * vv;
                        }
                    }
                }
                attn_out.push(Self::matvec(&wo, &out));
            }
            let ffn_norm = self.req(&n("ffn_norm.weight"));
            let (wg, wu, wd) = (
                self.req(&n("ffn_gate.weight")),
                self.req(&n("ffn_up.weight")),
                self.req(&n("ffn_down.weight")),
            );
            for (x, a) in xs.iter_mut().zip(attn_out) {
                x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
                let h = self.rms_norm(x, &ffn_norm);
                let g = Self::matvec(&wg, &h);
                let u = Self::matvec(&wu, &h);
                let act: Vec<f32> = g
                    .iter()
                    .zip(&u)
                    .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let d = Self::matvec(&wd, &act);
                x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
            }
        }
        let out_norm = self.req("output_norm.weight");
        let out = self.w("output.weight").unwrap_or(embd);
        xs.iter()
            .map(|x| Self::matvec(&out, &self.rms_norm(x, &out_norm)))
            .collect()
    }
}
