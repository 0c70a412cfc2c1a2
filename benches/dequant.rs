//! Dequantization and quantization throughput on one core.
//!
//! Each benchmark converts a 1536 x 576 weight matrix (the shape of SmolLM2-135M's ffn_down, 885K
//! elements), one row of 1536 elements per call, as a backend does when it dequantizes on the
//! fly. Throughput is reported in elements per second; multiply by the type's bytes per element
//! (docs/perf.md) for input bandwidth.
//!
//! Run: `cargo bench --bench dequant` (add `-- Q4_1` to filter).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use half::f16;
use m40_llm::gguf::GgmlType;
use m40_llm::gguf::quants::{dequantize_row_f16, dequantize_row_f32, quantize_row};
use std::hint::black_box;
use std::time::Duration;

const ROW: usize = 1536;
const ROWS: usize = 576;

/// Deterministic pseudo-random weights: roughly normal, a few outliers.
fn weights(n: usize) -> Vec<f32> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            let mut sum = 0.0;
            for _ in 0..4 {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                sum += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            sum * 0.05
        })
        .collect()
}

/// A matrix of `ty`, quantized from [`weights`].
fn matrix(ty: GgmlType) -> Vec<u8> {
    quantize_row(ty, &weights(ROW * ROWS)).unwrap()
}

fn dequantize(c: &mut Criterion) {
    let types = m40_llm::gguf::quants::DEQUANTIZE_TYPES;
    let mut g = c.benchmark_group("dequantize_f32");
    g.throughput(Throughput::Elements((ROW * ROWS) as u64));
    for ty in types {
        let src = matrix(ty);
        let row_bytes = ty.row_bytes(ROW as u64).unwrap() as usize;
        let mut out = vec![0f32; ROW];
        g.bench_function(ty.name(), |b| {
            b.iter(|| {
                for row in src.chunks_exact(row_bytes) {
                    dequantize_row_f32(ty, black_box(row), &mut out).unwrap();
                    black_box(&mut out);
                }
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("dequantize_f16");
    g.throughput(Throughput::Elements((ROW * ROWS) as u64));
    for ty in [
        GgmlType::F32,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
    ] {
        let src = matrix(ty);
        let row_bytes = ty.row_bytes(ROW as u64).unwrap() as usize;
        let mut out = vec![f16::ZERO; ROW];
        g.bench_function(ty.name(), |b| {
            b.iter(|| {
                for row in src.chunks_exact(row_bytes) {
                    dequantize_row_f16(ty, black_box(row), &mut out).unwrap();
                    black_box(&mut out);
                }
            })
        });
    }
    g.finish();
}

fn quantize(c: &mut Criterion) {
    let x = weights(ROW * ROWS);
    let mut g = c.benchmark_group("quantize");
    g.throughput(Throughput::Elements((ROW * ROWS) as u64));
    for ty in [
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let mut out = vec![0u8; ty.row_bytes(ROW as u64).unwrap() as usize];
        g.bench_function(ty.name(), |b| {
            b.iter(|| {
                for row in x.chunks_exact(ROW) {
                    m40_llm::gguf::quants::quantize_row_into(ty, black_box(row), &mut out).unwrap();
                    black_box(&mut out);
                }
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = dequantize, quantize
}
criterion_main!(benches);
