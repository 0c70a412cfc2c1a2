// Host definitions of the CUDA built-ins the kernels use, so that kernels/*.cu compile as C++
// with -DM40LLM_HOST: the decoders' logic (block layouts, magic-number conversions, unaligned
// word handling) is then checked on any machine by tests/kernel_host.rs, bit for bit against the
// reference decoders (T::at), and whole kernels run by host_launch (a std::thread per CUDA
// thread, barriers for __syncthreads and the warps' shuffles) against f64 references. NVRTC never sees this file (common.cuh includes
// it under #ifdef M40LLM_HOST only).
#pragma once
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__ static
#define __restrict__
#define __launch_bounds__(x)
#define __align__(n) __attribute__((aligned(n)))

// 16-byte aligned, as CUDA's: -fsanitize=alignment then flags a dereference the GPU would fault.
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

struct HostDim3 {
    unsigned x, y, z;
};
// Outside host_launch a lone thread: __syncthreads is a no-op and a shuffle returns its value.
__attribute__((unused)) static thread_local HostDim3 threadIdx = {0, 0, 0};
__attribute__((unused)) static thread_local HostDim3 blockIdx = {0, 0, 0};
__attribute__((unused)) static HostDim3 blockDim = {32, 1, 1}, gridDim = {1, 1, 1};

// A reusable barrier (C++14: no std::barrier).
struct HostBarrier {
    std::mutex m;
    std::condition_variable cv;
    int n, count = 0, gen = 0;
    explicit HostBarrier(int n_) : n(n_) {}
    void wait() {
        std::unique_lock<std::mutex> l(m);
        int g = gen;
        if (++count == n) {
            count = 0;
            gen++;
            cv.notify_all();
        } else {
            cv.wait(l, [&] { return g != gen; });
        }
    }
};

// The block host_launch is running: a barrier for the block, one per warp, and a word per
// thread for shuffles (write, warp barrier, read the partner's, warp barrier).
struct HostBlock {
    HostBarrier block;
    std::vector<std::unique_ptr<HostBarrier> > warps;
    std::vector<unsigned> slots;
    explicit HostBlock(unsigned threads) : block((int)threads), slots(threads) {
        for (unsigned w = 0; w < (threads + 31) / 32; w++)
            warps.emplace_back(new HostBarrier((int)std::min(32u, threads - 32 * w)));
    }
};
__attribute__((unused)) static HostBlock* host_block = nullptr;

// A shuffle: every thread of the warp offers its v and gets thread `partner`'s (an index in the
// block: its own warp's lanes are what the device allows).
template <typename T>
inline T host_shfl(T v, unsigned partner) {
    if (!host_block) return v;
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    unsigned t = threadIdx.x, w = t / 32;
    unsigned bits;
    std::memcpy(&bits, &v, 4);
    host_block->slots[t] = bits;
    host_block->warps[w]->wait();
    if (partner < host_block->slots.size()) bits = host_block->slots[partner];
    host_block->warps[w]->wait();
    T r;
    std::memcpy(&r, &bits, 4);
    return r;
}
template <typename T>
inline T host_shfl_xor(T v, int o) {
    return host_shfl(v, threadIdx.x ^ (unsigned)o);
}

// Runs `kernel()` (a lambda calling the kernel with its arguments) over `grid` blocks of
// `threads` threads: a std::thread per CUDA thread, which runs its thread of every block in
// turn, the blocks one at a time (a barrier between them). Shared memory is the kernels'
// `static` arrays (shared by the block's threads, left over from the previous block, as
// uninitialized as on a GPU). Every thread must reach every __syncthreads and shuffle, as the
// device requires.
template <typename F>
inline void host_launch(HostDim3 grid, unsigned threads, F kernel) {
    gridDim = grid;
    blockDim = {threads, 1, 1};
    HostBlock b(threads);
    host_block = &b;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; t++)
        ts.emplace_back([t, grid, &kernel, &b] {
            threadIdx = {t, 0, 0};
            for (unsigned z = 0; z < grid.z; z++)
                for (unsigned y = 0; y < grid.y; y++)
                    for (unsigned x = 0; x < grid.x; x++) {
                        blockIdx = {x, y, z};
                        kernel();
                        b.block.wait();  // the block is done before the next one starts
                    }
        });
    for (auto& t : ts) t.join();
    host_block = nullptr;
}

// A device load of `bytes` (2, 4, 8 or 16) must be naturally aligned: a misaligned one faults
// there, while memcpy on the host would not notice. The harness stops on the first one. (Plain
// dereferences are checked by -fsanitize=alignment, which tests/kernel_host.rs builds with.)
inline void host_require_aligned(const void* p, size_t bytes, const char* what) {
    if ((size_t)p % bytes != 0) {
        std::fprintf(stderr, "misaligned %zu-byte %s at %p\n", bytes, what, p);
        std::abort();
    }
}

template <typename T>
inline T __ldg(const T* p) {
    host_require_aligned(p, sizeof(T), "__ldg");
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
// CUDA's integer min/max are global functions.
using std::max;
using std::min;
inline int __ffs(unsigned v) { return v ? __builtin_ctz(v) + 1 : 0; }
// Round-to-nearest FP32 arithmetic (rope.cu's, kept apart from fused multiply-adds).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __shfl_xor_sync(unsigned, float v, int o) { return host_shfl_xor(v, o); }
inline int __shfl_xor_sync(unsigned, int v, int o) { return host_shfl_xor(v, o); }
inline float __shfl_sync(unsigned, float v, int src) {
    return host_shfl(v, (threadIdx.x & ~31u) | ((unsigned)src & 31));
}
inline void __syncthreads() {
    if (host_block) host_block->block.wait();
}

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
