// Argmax and top-k over logits rows, so a step can return a token id (or k candidates) instead
// of a whole row. Order: larger value first, the lower index on ties; NaN is never picked.
// Grid: (rows); block: SAMPLE_THREADS (1024; any multiple of 32 up to it).
#include "common.cuh"

#define SAMPLE_THREADS 1024
// Elements a thread loads before it compares them: loads in flight (a thread that compared each
// load before issuing the next waited a memory latency per element: 208 µs for a 128256-logit
// row of an 8B on the H200).
#define SAMPLE_UNROLL 8

// True when (v, i) comes before (bv, bi) in the order above.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
    return v > bv || (v == bv && i < bi);
}

// The best (value, index) of the block among the elements that come after (pv, pi) in the order
// (pi < 0: no bound). Every thread gets it; index -1 when none is left.
__device__ void block_best(const float* x, int n, float pv, int pi, float* out_v, int* out_i) {
    __shared__ float sv[SAMPLE_THREADS / 32];
    __shared__ int si[SAMPLE_THREADS / 32];
    float bv = -INFINITY;
    int bi = -1;
    for (int base = threadIdx.x; base < n; base += SAMPLE_UNROLL * blockDim.x) {
        float xs[SAMPLE_UNROLL];
#pragma unroll
        for (int u = 0; u < SAMPLE_UNROLL; u++) {
            int i = base + u * (int)blockDim.x;
            xs[u] = i < n ? __ldg(x + i) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < SAMPLE_UNROLL; u++) {
            int i = base + u * (int)blockDim.x;
            float v = xs[u];
            if (i >= n || v != v) continue;
            if (pi >= 0 && !better(pv, pi, v, i)) continue;
            if (bi < 0 || better(v, i, bv, bi)) {
                bv = v;
                bi = i;
            }
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        int oi = __shfl_xor_sync(FULL_MASK, bi, o);
        if (oi >= 0 && (bi < 0 || better(ov, oi, bv, bi))) {
            bv = ov;
            bi = oi;
        }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++)
            if (si[w] >= 0 && (bi < 0 || better(sv[w], si[w], bv, bi))) {
                bv = sv[w];
                bi = si[w];
            }
        sv[0] = bv;
        si[0] = bi;
    }
    __syncthreads();
    *out_v = sv[0];
    *out_i = si[0];
}

// ids[r] = argmax of row r of x ([rows, n]); vals[r] its value. -1 if the row is all NaN.
extern "C" __global__ void argmax_f32(const float* x, int n, int* ids, float* vals) {
    float v;
    int i;
    block_best(x + (i64)blockIdx.x * n, n, 0.0f, -1, &v, &i);
    if (threadIdx.x == 0) {
        ids[blockIdx.x] = i;
        vals[blockIdx.x] = v;
    }
}

// The k best of row r, best first: ids[r * k + j], vals[r * k + j]. k passes over the row
// (k is small: sampling's top-k); -1 fills a row with fewer than k numbers.
extern "C" __global__ void top_k_f32(const float* x, int n, int k, int* ids, float* vals) {
    const float* row = x + (i64)blockIdx.x * n;
    float pv = 0.0f;
    int pi = -1;
    for (int j = 0; j < k; j++) {
        float v;
        int i;
        if (j > 0 && pi < 0) {
            v = -INFINITY;
            i = -1;
        } else {
            block_best(row, n, pv, pi, &v, &i);
        }
        if (threadIdx.x == 0) {
            ids[(i64)blockIdx.x * k + j] = i;
            vals[(i64)blockIdx.x * k + j] = v;
        }
        pv = v;
        pi = i;
    }
}

// flag[0] = min(flag[0], the lowest i < n with x[i] NaN or ±inf): the step's check that its
// logits are numbers, without copying them to the host. The host sets flag[0] = n first.
// Grid: any; block: any.
extern "C" __global__ void first_non_finite_f32(const float* x, int n, int* flag) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        if ((__float_as_int(x[i]) & 0x7f800000) == 0x7f800000) {
            atomicMin(flag, i);
            return;
        }
    }
}
