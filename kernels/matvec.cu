// Matrix-vector products with weights in their GGUF storage type: y[r, n] = sum_k x[r, k] w[n, k]
// (y = x Wᵀ). A warp per output element n: its lanes read the weight row's elements in order
// (coalesced), accumulate in FP32 and reduce with shuffles. Meant for one-token rows (decode);
// with R > 1 it is the plain-kernel path used when cuBLAS is off.
// Grid: (ceil(N / warps per block), R); block: 32 * warps per block.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ float row_dot(const u8* row, const float* x, int K) {
    float acc = 0.0f;
    for (int k = threadIdx.x & 31; k < K; k += 32) acc += T::at(row, k) * x[k];
    return warp_sum(acc);
}

template <typename T>
__device__ void matvec_impl(const u8* w, const float* x, float* y, int N, int K, i64 row_bytes) {
    int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int r = blockIdx.y;
    if (n >= N) return;
    float s = row_dot<T>(w + (i64)n * row_bytes, x + (i64)r * K, K);
    if ((threadIdx.x & 31) == 0) y[(i64)r * N + n] = s;
}

// y[r, n] = silu(x[r] · w_gate[n]) * (x[r] · w_up[n]), both weights of one type.
template <typename T>
__device__ void gate_up_swiglu_impl(const u8* wg, const u8* wu, const float* x, float* y, int N,
                                    int K, i64 row_bytes) {
    int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int r = blockIdx.y;
    if (n >= N) return;
    const float* xr = x + (i64)r * K;
    float g = row_dot<T>(wg + (i64)n * row_bytes, xr, K);
    float u = row_dot<T>(wu + (i64)n * row_bytes, xr, K);
    if ((threadIdx.x & 31) == 0) y[(i64)r * N + n] = silu1(g) * u;
}

#define MATVEC(name, T)                                                                       \
    extern "C" __global__ void matvec_##name(const u8* w, const float* x, float* y, int N,    \
                                             int K, i64 row_bytes) {                          \
        matvec_impl<T>(w, x, y, N, K, row_bytes);                                             \
    }                                                                                         \
    extern "C" __global__ void gate_up_swiglu_##name(const u8* wg, const u8* wu,              \
                                                     const float* x, float* y, int N, int K,  \
                                                     i64 row_bytes) {                         \
        gate_up_swiglu_impl<T>(wg, wu, x, y, N, K, row_bytes);                                \
    }
FOR_EACH_WEIGHT_TYPE(MATVEC)
