//! Matmul throughput at the default model's shapes (SmolLM2-135M: Q4_1 layers, a Q8_0 tied
//! embedding used as the logits projection), for one token (decode) and 64 (prefill), on one
//! thread and on rayon's pool.
//!
//! Also decode-step attention over 256 to 4096 cached tokens.
//!
//! `cargo bench --bench cpu_kernels`. Criterion's throughput is in FLOP (2 per multiply-add):
//! its "elem/s" reads as FLOP/s. Effective weight bandwidth = weight bytes / time (docs/perf.md).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use m40_llm::backend::cpu::kernels::{
    AttentionShape, Simd, WeightMatrix, attention, matmul::matmul_with,
};
use m40_llm::gguf::GgmlType;
use std::hint::black_box;

/// Deterministic bytes, with every block's f16 scales set to small finite values.
fn weight_bytes(ty: GgmlType, n: usize, k: usize) -> Vec<u8> {
    let len = ty.row_bytes(k as u64).unwrap() as usize * n;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut bytes: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect();
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    let (block, scales): (usize, &[usize]) = match ty {
        GgmlType::Q4_1 => (20, &[0, 2]),
        GgmlType::Q8_0 => (34, &[0]),
        GgmlType::Q4_K => (144, &[0, 2]),
        GgmlType::Q6_K => (210, &[208]),
        GgmlType::F16 => (2, &[0]),
        _ => unimplemented!("bench weights of type {ty}"),
    };
    for blk in bytes.chunks_exact_mut(block) {
        for &s in scales {
            blk[s..s + 2].copy_from_slice(&scale);
        }
    }
    bytes
}

fn bench(c: &mut Criterion) {
    let simd = Simd::detect();
    let shapes: [(&str, GgmlType, usize, usize); 6] = [
        ("q4_1 576->576 (attn_q/o)", GgmlType::Q4_1, 576, 576),
        ("q4_1 576->1536 (ffn_gate/up)", GgmlType::Q4_1, 1536, 576),
        ("q4_1 1536->576 (ffn_down)", GgmlType::Q4_1, 576, 1536),
        ("q8_0 576->49152 (logits)", GgmlType::Q8_0, 49152, 576),
        ("f16 576->1536", GgmlType::F16, 1536, 576),
        ("q4_k 768->1536", GgmlType::Q4_K, 1536, 768),
    ];
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let all = rayon::ThreadPoolBuilder::new().build().unwrap();
    let pools = [("1 thread", &one), ("rayon", &all)];
    for (name, ty, n, k) in shapes {
        let bytes = weight_bytes(ty, n, k);
        let w = WeightMatrix::new(&bytes, ty, n, k).unwrap();
        let mut group = c.benchmark_group(name);
        for t in [1usize, 64] {
            let x: Vec<f32> = (0..t * k)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let mut y = vec![0.0f32; t * n];
            group.throughput(Throughput::Elements((2 * t * n * k) as u64));
            for (threads, pool) in pools {
                let id = BenchmarkId::new(format!("T={t}"), threads);
                group.bench_function(id, |b| {
                    pool.install(|| {
                        b.iter(|| matmul_with(simd, black_box(&x), &w, &mut y).unwrap())
                    })
                });
            }
        }
        group.finish();
    }
}

/// Decode-step attention at the default model's head layout (9 query heads, 3 KV heads of 64)
/// over a context of `ctx` cells: one token, all heads.
fn bench_attention(c: &mut Criterion) {
    let shape = AttentionShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        scale: 0.125,
    };
    let mut group = c.benchmark_group("attention 9/3x64 decode");
    for ctx in [256usize, 1024, 4096] {
        let kv: Vec<half::f16> = (0..ctx * 192)
            .map(|i| half::f16::from_f32(((i * 7919) % 1000) as f32 / 1000.0 - 0.5))
            .collect();
        let q: Vec<f32> = (0..9 * 64).map(|i| (i % 17) as f32 / 17.0).collect();
        let cells: Vec<u32> = (0..ctx as u32).collect();
        let mut y = vec![0.0f32; 9 * 64];
        // K and V reads, the bytes that bound it.
        group.throughput(Throughput::Bytes((2 * ctx * 192 * 2) as u64));
        group.bench_function(BenchmarkId::from_parameter(ctx), |b| {
            b.iter(|| attention(black_box(&q), &kv, &kv, &[&cells], &shape, &mut y).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench, bench_attention);
criterion_main!(benches);
