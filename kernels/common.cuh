// Shared helpers for m40-llm's kernels. Legal for sm_52 (Maxwell): FP32 arithmetic only; FP16 and
// BF16 are storage formats, widened with cvt (what the CUDA headers' half-to-float conversion
// compiles to) or a shift. No half arithmetic, no dp4a, no tensor cores. NVRTC compiles these
// without the CUDA headers.
#pragma once
#ifdef M40LLM_HOST
#include "host.h"
#endif

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef signed char i8;
typedef long long i64;

#define FULL_MASK 0xffffffffu
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float h2f(u16 h) {
#ifdef M40LLM_HOST
    return host_h2f(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ u16 f2h(float f) {
#ifdef M40LLM_HOST
    return host_f2h(f);
#else
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

__device__ __forceinline__ float bf2f(u16 b) { return __int_as_float(((u32)b) << 16); }

// Little-endian loads from byte pointers of any alignment.
__device__ __forceinline__ u16 ld16(const u8* p) { return (u16)p[0] | ((u16)p[1] << 8); }
__device__ __forceinline__ u32 ld32(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}
__device__ __forceinline__ float ldh(const u8* p) { return h2f(ld16(p)); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float silu1(float x) { return x / (1.0f + expf(-x)); }

// ---- Element `i` of a weight row in each GGUF storage type (see src/gguf/quants/). ----
// Each type is a struct with `at(row, i)`, used by gather, dequantize and matvec kernels.

struct TF32 {
    static __device__ __forceinline__ float at(const u8* r, int i) { return ((const float*)r)[i]; }
};
struct TF16 {
    static __device__ __forceinline__ float at(const u8* r, int i) { return h2f(((const u16*)r)[i]); }
};
struct TBF16 {
    static __device__ __forceinline__ float at(const u8* r, int i) { return bf2f(((const u16*)r)[i]); }
};
// Q4_0: 18 bytes per 32: f16 d, 16 bytes of nibbles (low nibbles are elements 0..16).
struct TQ4_0 {
    static __device__ __forceinline__ float at(const u8* r, int i) {
        const u8* b = r + (i >> 5) * 18;
        int j = i & 31;
        u8 q = b[2 + (j & 15)];
        int v = (j < 16 ? (q & 15) : (q >> 4)) - 8;
        return (float)v * ldh(b);
    }
};
// Q4_1: 20 bytes per 32: f16 d, f16 m, nibbles.
struct TQ4_1 {
    static __device__ __forceinline__ float at(const u8* r, int i) {
        const u8* b = r + (i >> 5) * 20;
        int j = i & 31;
        u8 q = b[4 + (j & 15)];
        int v = j < 16 ? (q & 15) : (q >> 4);
        return (float)v * ldh(b) + ldh(b + 2);
    }
};
// Q5_0: 22 bytes per 32: f16 d, u32 high bits (bit i for element i), nibbles.
struct TQ5_0 {
    static __device__ __forceinline__ float at(const u8* r, int i) {
        const u8* b = r + (i >> 5) * 22;
        int j = i & 31;
        u32 qh = ld32(b + 2);
        u8 q = b[6 + (j & 15)];
        int v = ((j < 16 ? (q & 15) : (q >> 4)) | (((qh >> j) & 1) << 4)) - 16;
        return (float)v * ldh(b);
    }
};
// Q5_1: 24 bytes per 32: f16 d, f16 m, u32 high bits, nibbles.
struct TQ5_1 {
    static __device__ __forceinline__ float at(const u8* r, int i) {
        const u8* b = r + (i >> 5) * 24;
        int j = i & 31;
        u32 qh = ld32(b + 4);
        u8 q = b[8 + (j & 15)];
        int v = (j < 16 ? (q & 15) : (q >> 4)) | (((qh >> j) & 1) << 4);
        return (float)v * ldh(b) + ldh(b + 2);
    }
};
// Q8_0: 34 bytes per 32: f16 d, 32 int8.
struct TQ8_0 {
    static __device__ __forceinline__ float at(const u8* r, int i) {
        const u8* b = r + (i >> 5) * 34;
        return (float)(i8)b[2 + (i & 31)] * ldh(b);
    }
};

// The 6-bit scale and min of sub-block j (0..8) of a Q4_K/Q5_K block (ggml get_scale_min_k4).
__device__ __forceinline__ void scale_min_k4(int j, const u8* s, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Q4_K: 144 bytes per 256: f16 d, f16 dmin, 12 bytes of scales, 128 bytes of nibbles: 64
// elements per 32 bytes (low nibbles the first 32, high nibbles the next 32).
struct TQ4_K {
    static __device__ __forceinline__ float at(const u8* r, int i) {
        const u8* b = r + (i >> 8) * 144;
        int j = i & 255, g = j >> 6, w = j & 63;
        int sub = 2 * g + (w >> 5), sc, m;
        scale_min_k4(sub, b + 4, &sc, &m);
        u8 q = b[16 + 32 * g + (w & 31)];
        int v = w < 32 ? (q & 15) : (q >> 4);
        return ldh(b) * (float)sc * (float)v - ldh(b + 2) * (float)m;
    }
};
// Q5_K: 176 bytes per 256: f16 d, f16 dmin, 12 bytes of scales, 32 bytes of high bits, 128 of
// nibbles.
struct TQ5_K {
    static __device__ __forceinline__ float at(const u8* r, int i) {
        const u8* b = r + (i >> 8) * 176;
        int j = i & 255, g = j >> 6, w = j & 63, l = w & 31;
        int hi = w >> 5, sub = 2 * g + hi, sc, m;
        scale_min_k4(sub, b + 4, &sc, &m);
        u8 q = b[48 + 32 * g + l];
        u8 h = b[16 + l];
        int v = (hi ? (q >> 4) : (q & 15)) + ((h >> sub) & 1 ? 16 : 0);
        return ldh(b) * (float)sc * (float)v - ldh(b + 2) * (float)m;
    }
};
// Q6_K: 210 bytes per 256: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, f16 d.
struct TQ6_K {
    static __device__ __forceinline__ float at(const u8* r, int i) {
        const u8* b = r + (i >> 8) * 210;
        int j = i & 255, g = j >> 7, rr = j & 127, k = rr >> 5, e = rr & 31, h = e >> 4;
        const u8* ql = b + 64 * g;
        const u8* qh = b + 128 + 32 * g;
        const i8* sc = (const i8*)(b + 192 + 8 * g);
        u8 lo = (k & 1) ? ql[32 + e] : ql[e];
        int nib = (k & 2) ? (lo >> 4) : (lo & 15);
        int q = (nib | (((qh[e] >> (2 * k)) & 3) << 4)) - 32;
        return ldh(b + 208) * (float)sc[h + 2 * k] * (float)q;
    }
};

// Instantiates MACRO(name, type) for every weight type the kernels read.
#define FOR_EACH_WEIGHT_TYPE(MACRO) \
    MACRO(f32, TF32)                \
    MACRO(f16, TF16)                \
    MACRO(bf16, TBF16)              \
    MACRO(q4_0, TQ4_0)              \
    MACRO(q4_1, TQ4_1)              \
    MACRO(q5_0, TQ5_0)              \
    MACRO(q5_1, TQ5_1)              \
    MACRO(q8_0, TQ8_0)              \
    MACRO(q4_k, TQ4_K)              \
    MACRO(q5_k, TQ5_K)              \
    MACRO(q6_k, TQ6_K)
