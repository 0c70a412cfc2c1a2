// RMS norm over groups of G elements (G = N: the whole row; G = head_dim: per head), and the
// fused residual add + norm. y[g*G + i] = x[g*G + i] / sqrt(mean_j(x[g*G + j]^2) + eps) * w[i].
// Grid: (number of groups = R * N / G); block: a multiple of 32, at most 1024.
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
