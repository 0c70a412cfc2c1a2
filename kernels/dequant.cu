// Dequantization of whole weight matrices (or tiles of their rows) into scratch for cuBLAS's
// multi-token matmuls: out[n, k] = w[n, k] for n in 0..n_rows, k in 0..K. Grid-stride over all
// elements. `dequantize_<ty>` writes FP32 (the SGEMM base path); `dequantize_to_f16_<ty>` writes
// the same value rounded to FP16 (round to nearest even, `f2h`: cvt.rn.f16.f32), the operand of
// the FP16 tensor-core GEMM on sm_70+ (src/backend/cuda/matmul.rs). Both are sm_52-legal: FP32
// arithmetic, FP16 only as storage.
#include "common.cuh"

// An element as the output type stores it: FP32 as is, FP16 rounded to nearest even.
__device__ __forceinline__ void store_elem(float* out, float v) { *out = v; }
__device__ __forceinline__ void store_elem(u16* out, float v) { *out = f2h(v); }

template <typename T, typename O>
__device__ void dequantize_impl(const u8* w, O* out, i64 n_rows, int K, i64 row_bytes) {
    i64 total = n_rows * (i64)K;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (i64)gridDim.x * blockDim.x) {
        i64 n = e / K;
        int k = (int)(e - n * K);
        store_elem(out + e, T::at(w + n * row_bytes, k));
    }
}

#define DEQUANTIZE(name, T)                                                                   \
    extern "C" __global__ void dequantize_##name(const u8* w, float* out, i64 n_rows, int K,  \
                                                 i64 row_bytes) {                             \
        dequantize_impl<T>(w, out, n_rows, K, row_bytes);                                     \
    }                                                                                         \
    extern "C" __global__ void dequantize_to_f16_##name(const u8* w, u16* out, i64 n_rows,   \
                                                        int K, i64 row_bytes) {               \
        dequantize_impl<T>(w, out, n_rows, K, row_bytes);                                     \
    }
FOR_EACH_WEIGHT_TYPE(DEQUANTIZE)
