// Elementwise ops on FP32 rows, and the FP32-to-FP16 conversion at the end. `b_len` < n
// broadcasts b over rows (a bias or scale vector): y[i] = a[i] op b[i % b_len]. Grid-stride
// loops; any grid.
#include "common.cuh"

extern "C" __global__ void add_f32(const float* a, const float* b, float* y, i64 n, i64 b_len) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        y[i] = a[i] + b[b_len == n ? i : i % b_len];
}

extern "C" __global__ void mul_f32(const float* a, const float* b, float* y, i64 n, i64 b_len) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        y[i] = a[i] * b[b_len == n ? i : i % b_len];
}

// y = x / (1 + exp(-x))
extern "C" __global__ void silu_f32(const float* x, float* y, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        y[i] = silu1(x[i]);
}

// y = silu(gate) * up
extern "C" __global__ void swiglu_f32(const float* gate, const float* up, float* y, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        y[i] = silu1(gate[i]) * up[i];
}

// y = x rounded to FP16 (round to nearest even, `f2h`; past 65504 it is inf): the activations
// of the FP16 tensor-core GEMM (src/backend/cuda/matmul.rs). FP16 as storage only.
extern "C" __global__ void f32_to_f16(const float* x, u16* y, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        y[i] = f2h(x[i]);
}
