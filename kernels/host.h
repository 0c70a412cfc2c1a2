// Host definitions of the CUDA built-ins the kernels use, so that kernels/*.cu compile as C++
// with -DM40LLM_HOST: the decoders' logic (block layouts, magic-number conversions, unaligned
// word handling) is then checked on any machine by tests/kernel_host.rs, bit for bit against the
// reference decoders (T::at), and whole kernels run by host_launch (a fiber per CUDA thread,
// barriers for __syncthreads and the warps' shuffles) against f64 references. NVRTC never sees
// this file (common.cuh includes it under #ifdef M40LLM_HOST only).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include <ucontext.h>

#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__ static
#define __restrict__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

// 16-byte aligned, as CUDA's: -fsanitize=alignment then flags a dereference the GPU would fault.
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
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
// Inside, the running fiber's (host_yield keeps each fiber's own across switches).
__attribute__((unused)) static HostDim3 threadIdx = {0, 0, 0};
__attribute__((unused)) static HostDim3 blockIdx = {0, 0, 0};
__attribute__((unused)) static HostDim3 blockDim = {32, 1, 1}, gridDim = {1, 1, 1};

// host_launch's CUDA threads are fibers (ucontext: a stack each) on the calling thread, run in
// turn, each until it waits at a barrier: deterministic, and a barrier costs a context switch
// where OS threads cost a futex wake-up of every waiter (most of the harness's time on two
// cores). `cur` is the running fiber, `main` the scheduler's context.
struct HostFibers {
    ucontext_t main;
    std::vector<ucontext_t> ctx;
    std::vector<void*> stacks;
    std::vector<char> done;
    unsigned cur = 0;
};
__attribute__((unused)) static HostFibers* host_fibers = nullptr;

// Back to the scheduler, which resumes the other fibers in turn; then this one's thread and block
// indices again.
inline void host_yield() {
    HostDim3 t = threadIdx, b = blockIdx;
    swapcontext(&host_fibers->ctx[host_fibers->cur], &host_fibers->main);
    threadIdx = t;
    blockIdx = b;
}

// A reusable barrier of n fibers: the last to arrive releases the others and runs on.
struct HostBarrier {
    int n, count = 0, gen = 0;
    explicit HostBarrier(int n_) : n(n_) {}
    void wait() {
        int g = gen;
        if (++count == n) {
            count = 0;
            gen++;
            return;
        }
        while (gen == g) host_yield();
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
// The barriers' releases so far (the scheduler's progress check).
inline long long host_barrier_gens(HostBlock& b) {
    long long g = b.block.gen;
    for (auto& w : b.warps) g += w->gen;
    return g;
}

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

// What a fiber of host_launch runs: its thread of every block in turn, the blocks one at a
// time (a barrier between them).
template <typename F>
struct HostLaunch {
    F* kernel;
    HostDim3 grid;
    HostBlock* block;
};
__attribute__((unused)) static void* host_launch_now = nullptr;
template <typename F>
void host_fiber_main() {
    const HostLaunch<F>& l = *(const HostLaunch<F>*)host_launch_now;
    unsigned t = host_fibers->cur;
    for (unsigned z = 0; z < l.grid.z; z++)
        for (unsigned y = 0; y < l.grid.y; y++)
            for (unsigned x = 0; x < l.grid.x; x++) {
                threadIdx = {t, 0, 0};
                blockIdx = {x, y, z};
                (*l.kernel)();
                l.block->block.wait();  // the block is done before the next one starts
            }
    host_fibers->done[t] = 1;
}  // to uc_link: the scheduler

// Runs `kernel()` (a lambda calling the kernel with its arguments) over `grid` blocks of
// `threads` threads: a fiber per CUDA thread, which runs its thread of every block in turn.
// Shared memory is the kernels' `static` arrays (shared by the block's threads, left over from
// the previous block, as uninitialized as on a GPU). Every thread must reach every
// __syncthreads and shuffle, as the device requires (a fiber waiting at a barrier the others
// never reach stops the harness: reported, not a hang).
template <typename F>
inline void host_launch(HostDim3 grid, unsigned threads, F kernel) {
    const size_t stack = 1 << 20;
    gridDim = grid;
    blockDim = {threads, 1, 1};
    HostBlock b(threads);
    HostLaunch<F> l = {&kernel, grid, &b};
    HostFibers f;
    f.ctx.resize(threads);
    f.stacks.assign(threads, nullptr);
    f.done.assign(threads, 0);
    host_block = &b;
    host_fibers = &f;
    host_launch_now = &l;
    for (unsigned t = 0; t < threads; t++) {
        f.stacks[t] = std::malloc(stack);
        if (!f.stacks[t] || getcontext(&f.ctx[t]) != 0) {
            std::fprintf(stderr, "host_launch: no fiber for thread %u\n", t);
            std::abort();
        }
        f.ctx[t].uc_stack.ss_sp = f.stacks[t];
        f.ctx[t].uc_stack.ss_size = stack;
        f.ctx[t].uc_link = &f.main;
        makecontext(&f.ctx[t], host_fiber_main<F>, 0);
    }
    // Round robin: each pass resumes every live fiber once, so it runs to its next barrier. A
    // pass in which no fiber finishes or releases a barrier (every one still waiting) is a
    // deadlock: a barrier some thread never reaches.
    for (unsigned left = threads; left > 0;) {
        unsigned before = left;
        long long gens = host_barrier_gens(b);
        for (unsigned t = 0; t < threads; t++) {
            if (f.done[t]) continue;
            f.cur = t;
            swapcontext(&f.main, &f.ctx[t]);
            if (f.done[t]) left--;
        }
        if (left == before && host_barrier_gens(b) == gens) {
            std::fprintf(stderr, "host_launch: %u threads wait at barriers no other reaches\n",
                         left);
            std::abort();
        }
    }
    for (void* s : f.stacks) std::free(s);
    host_block = nullptr;
    host_fibers = nullptr;
    host_launch_now = nullptr;
    threadIdx = {0, 0, 0};
    blockIdx = {0, 0, 0};
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
inline unsigned __shfl_sync(unsigned, unsigned v, int src) {
    return host_shfl(v, (threadIdx.x & ~31u) | ((unsigned)src & 31));
}
// The fibers run one at a time: an atomic is a plain read-modify-write, a fence a no-op.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    unsigned old = *p;
    *p = old + v;
    return old;
}
inline void __threadfence() {}
template <typename T>
inline T __ldcg(const T* p) {
    return __ldg(p);
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
