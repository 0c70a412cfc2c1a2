// Host definitions of the CUDA built-ins the kernels use, so that kernels/*.cu compile as C++
// with -DM40LLM_HOST: the decoders' logic (block layouts, magic-number conversions, unaligned
// word handling) is then checked on any machine by tests/kernel_host.rs, bit for bit against the
// reference decoders (T::at). Only code that a single host thread can run is checked; the
// kernels' bodies compile but are never called. NVRTC never sees this file (common.cuh includes
// it under #ifdef M40LLM_HOST only).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__ static
#define __restrict__
#define __launch_bounds__(x)

struct uint4 {
    unsigned x, y, z, w;
};
struct float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

struct HostDim3 {
    unsigned x, y, z;
};
__attribute__((unused)) static HostDim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0},
                                         blockDim = {32, 1, 1}, gridDim = {1, 1, 1};

// Loads of any alignment (the device's are aligned; a misaligned one faults there).
template <typename T>
inline T __ldg(const T* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}
inline float __int_as_float(unsigned v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline float __int_as_float(int v) { return __int_as_float((unsigned)v); }
inline int __float_as_int(float f) {
    int v;
    std::memcpy(&v, &f, 4);
    return v;
}
// PRMT: byte i of the result is byte (s >> 4i) & 7 of the 8 bytes y:x.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    unsigned long long t = ((unsigned long long)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; i++) {
        unsigned sel = (s >> (4 * i)) & 7;
        r |= (unsigned)((t >> (8 * sel)) & 0xff) << (8 * i);
    }
    return r;
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned sh) {
    unsigned long long t = ((unsigned long long)hi << 32) | lo;
    return (unsigned)(t >> (sh & 31));
}
inline int __ffs(unsigned v) { return v ? __builtin_ctz(v) + 1 : 0; }
// One thread: a warp of one lane, a block of one thread.
inline float __shfl_xor_sync(unsigned, float v, int) { return v; }
inline void __syncthreads() {}

// IEEE binary16 <-> binary32, as cvt.f32.f16 and cvt.rn.f16.f32 do (round to nearest even).
inline float host_h2f(unsigned short h) {
    unsigned s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
    float v;
    if (e == 0)
        v = std::ldexp((float)m, -24);
    else if (e == 31)
        v = m ? NAN : INFINITY;
    else
        v = std::ldexp((float)(m | 1024), (int)e - 25);
    return s ? -v : v;
}
inline unsigned short host_f2h(float f) {
    unsigned x;
    std::memcpy(&x, &f, 4);
    unsigned s = (x >> 16) & 0x8000u, e = (x >> 23) & 0xff, m = x & 0x7fffffu;
    if (e == 0xff) return (unsigned short)(s | 0x7c00u | (m ? 0x200u : 0));
    int ex = (int)e - 127 + 15;
    if (ex >= 31) return (unsigned short)(s | 0x7c00u);
    if (ex <= 0) {
        if (ex < -10) return (unsigned short)s;
        m |= 0x800000u;
        int shift = 14 - ex;
        unsigned h = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (unsigned short)(s | h);
    }
    unsigned h = ((unsigned)ex << 10) | (m >> 13), rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    return (unsigned short)(s | h);
}
