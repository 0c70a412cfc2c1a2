// RMS norm over groups of G elements (G = N: the whole row; G = head_dim: per head), and the
// fused residual add + norm. y[g*G + i] = x[g*G + i] / sqrt(mean_j(x[g*G + j]^2) + eps) * w[i].
// Grid: (number of groups = R * N / G); block: a multiple of 32, at most 1024.
//
// rms_norm_f32 / add_rms_norm_f32 loop over a thread's elements i = t, t + bd, ...; the _e<E>
// kernels keep E of them in registers (G <= E bd). A decode step runs these as one block a row
// (an 8B's G = 4 096 over 1 024 threads), so a launch is a chain of round trips to memory more
// than work, and the loops wait on every trip (an output may alias an input, so the compiler may
// not hoist the next trip's loads above this trip's stores): the _e kernels load every element
// and weight before they use one. The host takes them where a thread has several elements
// (8B Q4_0 decode on the H200: 343 -> 352 tokens/s); with one a thread the loop kernels stay
// (a kernel that also held the register path ran SmolLM2 3% slower). Each value's arithmetic and
// each thread's sum of squares are the same in both, so are the bits.
#include "common.cuh"

extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float* y, int G, float eps) {
    __shared__ float scratch[32];
    const float* in = x + (i64)blockIdx.x * G;
    float* out = y + (i64)blockIdx.x * G;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < G; i += blockDim.x) ss += in[i] * in[i];
    ss = block_sum(ss, scratch);
    float scale = 1.0f / sqrtf(ss / (float)G + eps);
    for (int i = threadIdx.x; i < G; i += blockDim.x) out[i] = in[i] * scale * w[i];
}

// sum = a + b; normed = rms_norm(sum, w). Either output may alias an input of the same index.
extern "C" __global__ void add_rms_norm_f32(const float* a, const float* b, const float* w,
                                            float* sum, float* normed, int G, float eps) {
    __shared__ float scratch[32];
    i64 base = (i64)blockIdx.x * G;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < G; i += blockDim.x) {
        float s = a[base + i] + b[base + i];
        sum[base + i] = s;
        ss += s * s;
    }
    ss = block_sum(ss, scratch);
    float scale = 1.0f / sqrtf(ss / (float)G + eps);
    for (int i = threadIdx.x; i < G; i += blockDim.x) normed[base + i] = sum[base + i] * scale * w[i];
}

// rms_norm_f32 with a thread's E elements in registers (G <= E * blockDim.x).
template <int E>
__device__ __forceinline__ void rms_norm_regs(const float* x, const float* w, float* y, int G,
                                              float eps) {
    __shared__ float scratch[32];
    const float* in = x + (i64)blockIdx.x * G;
    float* out = y + (i64)blockIdx.x * G;
    int t = threadIdx.x, bd = blockDim.x;
    float v[E], wv[E];
#pragma unroll
    for (int k = 0; k < E; k++) {
        int i = t + k * bd;
        v[k] = i < G ? in[i] : 0.0f;
        wv[k] = i < G ? w[i] : 0.0f;
    }
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < E; k++)
        if (t + k * bd < G) ss += v[k] * v[k];
    ss = block_sum(ss, scratch);
    float scale = 1.0f / sqrtf(ss / (float)G + eps);
#pragma unroll
    for (int k = 0; k < E; k++) {
        int i = t + k * bd;
        if (i < G) out[i] = v[k] * scale * wv[k];
    }
}

// add_rms_norm_f32 with a thread's E elements in registers (G <= E * blockDim.x).
template <int E>
__device__ __forceinline__ void add_rms_norm_regs(const float* a, const float* b, const float* w,
                                                  float* sum, float* normed, int G, float eps) {
    __shared__ float scratch[32];
    i64 base = (i64)blockIdx.x * G;
    int t = threadIdx.x, bd = blockDim.x;
    float s[E], wv[E];
#pragma unroll
    for (int k = 0; k < E; k++) {
        int i = t + k * bd;
        s[k] = i < G ? a[base + i] + b[base + i] : 0.0f;
        wv[k] = i < G ? w[i] : 0.0f;
    }
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < E; k++) {
        int i = t + k * bd;
        if (i < G) {
            sum[base + i] = s[k];
            ss += s[k] * s[k];
        }
    }
    ss = block_sum(ss, scratch);
    float scale = 1.0f / sqrtf(ss / (float)G + eps);
#pragma unroll
    for (int k = 0; k < E; k++) {
        int i = t + k * bd;
        if (i < G) normed[base + i] = s[k] * scale * wv[k];
    }
}

#define NORM_REGS(E)                                                                             \
    extern "C" __global__ void rms_norm_f32_e##E(const float* x, const float* w, float* y, int G, \
                                                 float eps) {                                    \
        rms_norm_regs<E>(x, w, y, G, eps);                                                       \
    }                                                                                            \
    extern "C" __global__ void add_rms_norm_f32_e##E(const float* a, const float* b,            \
                                                     const float* w, float* sum, float* normed, \
                                                     int G, float eps) {                         \
        add_rms_norm_regs<E>(a, b, w, sum, normed, G, eps);                                      \
    }
NORM_REGS(2)
NORM_REGS(4)
NORM_REGS(8)
