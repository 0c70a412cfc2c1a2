// Dequantization of whole weight matrices into FP32 scratch (for cuBLAS SGEMM on multi-token
// matmuls): out[n, k] = w[n, k] for n in 0..n_rows, k in 0..K. Grid-stride over all elements.
#include "common.cuh"

template <typename T>
__device__ void dequantize_impl(const u8* w, float* out, i64 n_rows, int K, i64 row_bytes) {
    i64 total = n_rows * (i64)K;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (i64)gridDim.x * blockDim.x) {
        i64 n = e / K;
        int k = (int)(e - n * K);
        out[e] = T::at(w + n * row_bytes, k);
    }
}

#define DEQUANTIZE(name, T)                                                                   \
    extern "C" __global__ void dequantize_##name(const u8* w, float* out, i64 n_rows, int K,  \
                                                 i64 row_bytes) {                             \
        dequantize_impl<T>(w, out, n_rows, K, row_bytes);                                     \
    }
FOR_EACH_WEIGHT_TYPE(DEQUANTIZE)
