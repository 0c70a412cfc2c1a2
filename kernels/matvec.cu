// Matrix-vector products with weights in their GGUF storage type: y[r, n] = sum_k x[r, k] w[n, k]
// (y = x Wᵀ) for a few rows r (decode: one row per running sequence).
//
// mmv_<ty>_r<R> (and gate_up_swiglu_<ty>_r<R>): one block per C output columns, its threads
// split the weight rows into units of 8 or 32 weights. A thread decodes a unit once (the loads and the
// bit-twiddling happen once per weight) and applies it to all R activation rows, so a step over
// R sequences reads each weight once. The decoding is instruction-lean, for Maxwell (sm_52: no
// dp4a, no half arithmetic, I2F at a quarter of the FMA rate): nibbles and bytes become floats
// by placing them in the mantissa of 2^23 with one byte permute and one subtraction (exact),
// unaligned block fields are read as aligned words and funnel-shifted, and every weight load
// goes through the read-only cache. Each row's arithmetic is the same whatever R is (the same
// FMA chain per unit, the same reduction), so a sequence gets bit-identical results alone and
// in a batch (the columns a block computes change nothing in a column's arithmetic). Grid:
// (ceil(N / C)), C = 4 output columns a block for the narrow units (2 for gate/up; `_r1_c1`:
// 1), 1 for the K-quants; block: 32 to 128 threads (the host picks by K).
//
// matvec_<ty>: the plain reference kernel, a warp per output element reading the row with
// T::at. The host uses it only for shapes the unit kernels do not take (K not a multiple of 32,
// or an activation pointer not 16-byte aligned). Grid: (ceil(N / 4), R); block: 128.
#include "common.cuh"

#define MMV_THREADS 128

__device__ __forceinline__ u32 ldg32(const u8* p) { return __ldg((const unsigned int*)p); }
__device__ __forceinline__ u16 ldg16(const u8* p) { return __ldg((const unsigned short*)p); }
__device__ __forceinline__ uint4 ldg128(const u8* p) { return __ldg((const uint4*)p); }
// The word OFF bytes past p through the read-only cache, the offset in the instruction (an
// __ldg of p + OFF spends an add on the address).
template <int OFF>
__device__ __forceinline__ u32 ldg32_at(const u8* p) {
    u32 v;
#ifdef M40LLM_HOST
    host_require_aligned(p + OFF, sizeof v, "ld.global.nc.u32");
    std::memcpy(&v, p + OFF, sizeof v);
#else
    asm("ld.global.nc.u32 %0, [%1+%2];" : "=r"(v) : "l"(p), "n"(OFF));
#endif
    return v;
}
// Activations through the read-only cache, as an asm the compiler may not merge: with two
// matrices it would otherwise keep the first matrix's x loads live for the second (8 rows x 32
// floats, far past the register file) and spill.
__device__ __forceinline__ float4 ldx4(const float* p) {
    float4 v;
#ifdef M40LLM_HOST
    host_require_aligned(p, sizeof v, "ld.global.nc.v4.f32");
    std::memcpy(&v, p, sizeof v);
#else
    asm volatile("ld.global.nc.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p));
#endif
    return v;
}
// ldx4 of p + OFF floats, the offset in the instruction.
template <int OFF>
__device__ __forceinline__ float4 ldx4_at(const float* p) {
    float4 v;
#ifdef M40LLM_HOST
    host_require_aligned(p + OFF, sizeof v, "ld.global.nc.v4.f32");
    std::memcpy(&v, p + OFF, sizeof v);
#else
    asm volatile("ld.global.nc.v4.f32 {%0, %1, %2, %3}, [%4+%5];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p), "n"(4 * OFF));
#endif
    return v;
}

// The `WORDS` little-endian words starting at byte `p` (any alignment), read as aligned words
// (the last one is the word holding the last byte, so nothing past the field is read).
template <int WORDS>
__device__ __forceinline__ void ld_words(const u8* p, u32* out) {
    size_t a = (size_t)p;
    const u8* base = (const u8*)(a & ~(size_t)3);
    u32 sh = (u32)(a & 3) * 8;
    u32 w[WORDS + 1];
#pragma unroll
    for (int i = 0; i < WORDS; i++) w[i] = ldg32(base + 4 * i);
    w[WORDS] = ldg32((const u8*)((a + 4 * WORDS - 1) & ~(size_t)3));
#pragma unroll
    for (int i = 0; i < WORDS; i++) out[i] = __funnelshift_r(w[i], w[i + 1], sh);
}

// 2^23 + byte i of v: the byte in the low mantissa bits of 2^23 (one PRMT). Subtracting 2^23
// (plus any offset, folded into one constant) gives the byte's value exactly.
#define MAGIC 8388608.0f
__device__ __forceinline__ float mbyte(u32 v, int i) {
    return __int_as_float(__byte_perm(v, 0x4B000000u, 0x7650u | (u32)i));
}

// Four bytes of `v` minus `off` into out[0..4].
__device__ __forceinline__ void bytes4(u32 v, float off, float* out) {
#pragma unroll
    for (int i = 0; i < 4; i++) out[i] = mbyte(v, i) - (MAGIC + off);
}

// ---- Unit decoders: unit u of a row gives v[W] and a scale (the weights are v[i] * scale);
// element i of the unit sits at x index xoff(u, i / 4) + i % 4. The lanes of a warp take
// consecutive units, so the width decides how the warp's x loads coalesce: the 32-element-block
// types use units of 8 (four lanes to a block, reading 64 contiguous bytes of x together), the
// K-quants units of 32 laid out so that a warp reads x in 4-8 lines per load. ----

// Walking decoders (WALK): a thread's units are u0, u0 + bd, u0 + 2 bd, ... (bd = blockDim.x,
// a multiple of 8, so its 18- or 34-byte blocks keep one parity and their fields one alignment
// in a row). Per weight row the thread keeps pointers to the aligned word holding its unit's
// first byte and to the block's scale, and the funnel shift, set once (`walk`) and advanced by
// a constant `step(bd)` bytes a unit: the address and alignment math of `unit` is done once per
// thread instead of once per unit and row. They read up to 8 bytes past a unit's last byte
// (the next word, whatever the shift): the weights are uploaded with UNIT_OVERREAD bytes of
// padding. Every other decoder derives PerUnit (no walk).
template <typename D>
struct PerUnit {
    static const bool WALK = false;
    struct Walk {};
    static __device__ __forceinline__ Walk walk(const u8*, int) { return Walk(); }
    static __device__ __forceinline__ int step(int) { return 0; }
    static const int XJ = 0;
    static __device__ __forceinline__ int xstep(int) { return 0; }
    static __device__ __forceinline__ float unit_walk(Walk&, int, float*) { return 0.0f; }
};

// A thread's place in one weight row: `w` the aligned word holding the unit's first byte, `d`
// its block's scale, `sh` the funnel shift (0, 8, 16 or 24).
struct RowWalk {
    const u8* w;
    const u8* d;
    u32 sh;
};

__device__ __forceinline__ RowWalk row_walk(const u8* block, int field) {
    size_t a = (size_t)(block + field);
    RowWalk k;
    k.w = (const u8*)(a & ~(size_t)3);
    k.d = block;
    k.sh = (u32)(a & 3) * 8;
    return k;
}

// Q4_0 (18-byte blocks: f16 d, 16 bytes of nibbles; element j < 16 the low nibble of byte j,
// element 16 + j its high nibble): unit 4b + i is bytes 4i..4i + 4 of block b, elements
// 4i..4i + 4 and 16 + 4i..16 + 4i + 4.
struct UQ4_0 {
    static const int W = 8;
    static const bool WALK = true;
    typedef RowWalk Walk;
    static __device__ __forceinline__ void nibbles(u32 q, float* v) {
        bytes4(q & 0x0F0F0F0Fu, 8.0f, v);
        bytes4((q >> 4) & 0x0F0F0F0Fu, 8.0f, v + 4);
    }
    static __device__ __forceinline__ float unit(const u8* row, int u, float* v) {
        const u8* b = row + (i64)(u >> 2) * 18;
        u32 q;
        ld_words<1>(b + 2 + 4 * (u & 3), &q);
        nibbles(q, v);
        return h2f(ldg16(b));
    }
    static __device__ __forceinline__ Walk walk(const u8* row, int u0) {
        return row_walk(row + (i64)(u0 >> 2) * 18, 2 + 4 * (u0 & 3));
    }
    static __device__ __forceinline__ int step(int bd) { return (bd >> 2) * 18; }
    // x of the walk: elements XJ floats apart, 8 bd floats on a unit step.
    static const int XJ = 16;
    static __device__ __forceinline__ int xstep(int bd) { return 8 * bd; }
    // The unit at k, then k moves `st` bytes on.
    static __device__ __forceinline__ float unit_walk(Walk& k, int st, float* v) {
        nibbles(__funnelshift_r(ldg32(k.w), ldg32_at<4>(k.w), k.sh), v);
        float s = h2f(ldg16(k.d));
        k.w += st;
        k.d += st;
        return s;
    }
    static __device__ __forceinline__ int xoff(int u, int j) {
        return 32 * (u >> 2) + 4 * (u & 3) + 16 * j;
    }
};

// Q4_1 (20-byte blocks: f16 d, f16 m, nibbles as Q4_0): w = d q + m, folded into v.
struct UQ4_1 {
    static const int W = 8;
    static const bool WALK = true;
    typedef RowWalk Walk;
    static __device__ __forceinline__ void decode(u32 dm, u32 q, float* v) {
        float d = h2f((u16)(dm & 0xffff)), m = h2f((u16)(dm >> 16));
        float lo[4], hi[4];
        bytes4(q & 0x0F0F0F0Fu, 0.0f, lo);
        bytes4((q >> 4) & 0x0F0F0F0Fu, 0.0f, hi);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[i] = fmaf(lo[i], d, m);
            v[4 + i] = fmaf(hi[i], d, m);
        }
    }
    static __device__ __forceinline__ float unit(const u8* row, int u, float* v) {
        const u8* b = row + (i64)(u >> 2) * 20;
        decode(ldg32(b), ldg32(b + 4 + 4 * (u & 3)), v);
        return 1.0f;
    }
    // 20-byte blocks keep rows 4-byte aligned: no shift; d is the block's (d, m) word.
    static __device__ __forceinline__ Walk walk(const u8* row, int u0) {
        Walk k;
        k.d = row + (i64)(u0 >> 2) * 20;
        k.w = k.d + 4 + 4 * (u0 & 3);
        k.sh = 0;
        return k;
    }
    static __device__ __forceinline__ int step(int bd) { return (bd >> 2) * 20; }
    static const int XJ = 16;
    static __device__ __forceinline__ int xstep(int bd) { return 8 * bd; }
    static __device__ __forceinline__ float unit_walk(Walk& k, int st, float* v) {
        decode(ldg32(k.d), ldg32(k.w), v);
        k.w += st;
        k.d += st;
        return 1.0f;
    }
    static __device__ __forceinline__ int xoff(int u, int j) { return UQ4_0::xoff(u, j); }
};

// Q8_0 (34-byte blocks: f16 d, 32 int8): unit 4b + i is elements 8i..8i + 8 of block b, the
// bytes flipped to unsigned (x ^ 0x80 = x + 128).
struct UQ8_0 {
    static const int W = 8;
    static const bool WALK = true;
    typedef RowWalk Walk;
    static __device__ __forceinline__ float unit(const u8* row, int u, float* v) {
        const u8* b = row + (i64)(u >> 2) * 34;
        u32 q[2];
        ld_words<2>(b + 2 + 8 * (u & 3), q);
        bytes4(q[0] ^ 0x80808080u, 128.0f, v);
        bytes4(q[1] ^ 0x80808080u, 128.0f, v + 4);
        return h2f(ldg16(b));
    }
    static __device__ __forceinline__ Walk walk(const u8* row, int u0) {
        return row_walk(row + (i64)(u0 >> 2) * 34, 2 + 8 * (u0 & 3));
    }
    static __device__ __forceinline__ int step(int bd) { return (bd >> 2) * 34; }
    static const int XJ = 4;
    static __device__ __forceinline__ int xstep(int bd) { return 8 * bd; }
    static __device__ __forceinline__ float unit_walk(Walk& k, int st, float* v) {
        u32 w0 = ldg32(k.w), w1 = ldg32_at<4>(k.w), w2 = ldg32_at<8>(k.w);
        bytes4(__funnelshift_r(w0, w1, k.sh) ^ 0x80808080u, 128.0f, v);
        bytes4(__funnelshift_r(w1, w2, k.sh) ^ 0x80808080u, 128.0f, v + 4);
        float s = h2f(ldg16(k.d));
        k.w += st;
        k.d += st;
        return s;
    }
    static __device__ __forceinline__ int xoff(int u, int j) { return 8 * u + 4 * j; }
};

// Q4_K (144-byte super-blocks of 256: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, then
// four groups of 32 bytes whose low nibbles are sub-block 2g and high nibbles sub-block 2g + 1).
// A unit is half a group: 16 bytes, 16 weights of each of its two sub-blocks. w = d sc q - dmin m.
struct UQ4_K : PerUnit<UQ4_K> {
    static const int W = 32;
    static __device__ __forceinline__ void scale_min(uint4 h, int j, float* dsc, float* dm) {
        int k = j & 3;
        u32 a = (h.y >> (8 * k)) & 0xff, b = (h.z >> (8 * k)) & 0xff, c = (h.w >> (8 * k)) & 0xff;
        u32 sc = j < 4 ? (a & 63) : ((c & 15) | ((a >> 6) << 4));
        u32 m = j < 4 ? (b & 63) : ((c >> 4) | ((b >> 6) << 4));
        float d = h2f((u16)(h.x & 0xffff)), dmin = h2f((u16)(h.x >> 16));
        *dsc = d * (__int_as_float(0x4B000000u | sc) - MAGIC);
        *dm = dmin * (__int_as_float(0x4B000000u | m) - MAGIC);
    }
    static __device__ __forceinline__ float unit(const u8* row, int u, float* v) {
        const u8* s = row + (i64)(u >> 3) * 144;
        int g = (u & 7) >> 1, half = u & 1;
        uint4 h = ldg128(s);
        uint4 q4 = ldg128(s + 16 + 32 * g + 16 * half);
        float dsc0, dm0, dsc1, dm1;
        scale_min(h, 2 * g, &dsc0, &dm0);
        scale_min(h, 2 * g + 1, &dsc1, &dm1);
        u32 q[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
        for (int w = 0; w < 4; w++) {
            float lo[4], hi[4];
            bytes4(q[w] & 0x0F0F0F0Fu, 0.0f, lo);
            bytes4((q[w] >> 4) & 0x0F0F0F0Fu, 0.0f, hi);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                v[4 * w + i] = fmaf(lo[i], dsc0, -dm0);
                v[16 + 4 * w + i] = fmaf(hi[i], dsc1, -dm1);
            }
        }
        return 1.0f;
    }
    static __device__ __forceinline__ int xoff(int u, int j) {
        int g = (u & 7) >> 1, half = u & 1;
        return 256 * (u >> 3) + 64 * g + 16 * half + (j < 4 ? 4 * j : 32 + 4 * (j - 4));
    }
};

// Q5_K (176-byte super-blocks of 256: f16 d, f16 dmin, 12 bytes of scales and mins as Q4_K, 32
// bytes of high bits qh, then nibbles as Q4_K): element l of sub-block s has bit s of qh[l] as
// its fifth bit. A unit is half a group, as Q4_K: its high bits are qh[16 half .. 16 half + 16].
struct UQ5_K : PerUnit<UQ5_K> {
    static const int W = 32;
    static __device__ __forceinline__ float unit(const u8* row, int u, float* v) {
        const u8* s = row + (i64)(u >> 3) * 176;
        int g = (u & 7) >> 1, half = u & 1;
        uint4 h = ldg128(s);
        uint4 hb = ldg128(s + 16 + 16 * half);
        uint4 q4 = ldg128(s + 48 + 32 * g + 16 * half);
        float dsc0, dm0, dsc1, dm1;
        UQ4_K::scale_min(h, 2 * g, &dsc0, &dm0);
        UQ4_K::scale_min(h, 2 * g + 1, &dsc1, &dm1);
        u32 q[4] = {q4.x, q4.y, q4.z, q4.w};
        u32 qh[4] = {hb.x, hb.y, hb.z, hb.w};
#pragma unroll
        for (int w = 0; w < 4; w++) {
            float lo[4], hi[4];
            u32 b0 = ((qh[w] >> (2 * g)) & 0x01010101u) << 4;
            u32 b1 = ((qh[w] >> (2 * g + 1)) & 0x01010101u) << 4;
            bytes4((q[w] & 0x0F0F0F0Fu) | b0, 0.0f, lo);
            bytes4(((q[w] >> 4) & 0x0F0F0F0Fu) | b1, 0.0f, hi);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                v[4 * w + i] = fmaf(lo[i], dsc0, -dm0);
                v[16 + 4 * w + i] = fmaf(hi[i], dsc1, -dm1);
            }
        }
        return 1.0f;
    }
    static __device__ __forceinline__ int xoff(int u, int j) { return UQ4_K::xoff(u, j); }
};

// Q6_K (210-byte super-blocks of 256: 128 bytes of low nibbles ql, 64 of 2-bit highs qh, 16 int8
// scales, f16 d). Element 128 g + 32 k + e (g < 2, k < 4, e < 32) is the low (k < 2) or high
// nibble of ql[64 g + 32 (k & 1) + e] with bits 2k..2k+1 of qh[32 g + e] above it, minus 32,
// times d * scale[8 g + 2 k + e / 16]. A unit is e0..e0 + 8 (e0 = 0, 8, 16, 24) for all four k.
struct UQ6_K : PerUnit<UQ6_K> {
    static const int W = 32;
    static __device__ __forceinline__ float unit(const u8* row, int u, float* v) {
        const u8* s = row + (i64)(u >> 3) * 210;
        int g = (u & 7) >> 2, e0 = 8 * (u & 3);
        u32 a[2], b[2], qh[2], sc[2];
        ld_words<2>(s + 64 * g + e0, a);
        ld_words<2>(s + 64 * g + 32 + e0, b);
        ld_words<2>(s + 128 + 32 * g + e0, qh);
        ld_words<2>(s + 192 + 8 * g, sc);
        float d = h2f(ldg16(s + 208));
        int sh = 8 * (e0 >> 4);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            // scale[8 g + 2 k + e0 / 16]: byte 2 (k & 1) + e0 / 16 of word k / 2, sign-extended.
            int scale = ((int)(sc[k >> 1] << (24 - 16 * (k & 1) - sh))) >> 24;
            float ds = d * (float)scale;
#pragma unroll
            for (int w = 0; w < 2; w++) {
                u32 lo = (k & 1) ? b[w] : a[w];
                u32 nib = (k & 2) ? ((lo >> 4) & 0x0F0F0F0Fu) : (lo & 0x0F0F0F0Fu);
                u32 hi = k == 0 ? (qh[w] << 4) : k == 1 ? (qh[w] << 2) : k == 2 ? qh[w] : (qh[w] >> 2);
                float f[4];
                bytes4(nib | (hi & 0x30303030u), 32.0f, f);
#pragma unroll
                for (int i = 0; i < 4; i++) v[8 * k + 4 * w + i] = f[i] * ds;
            }
        }
        return 1.0f;
    }
    static __device__ __forceinline__ int xoff(int u, int j) {
        int g = (u & 7) >> 2, e0 = 8 * (u & 3);
        return 256 * (u >> 3) + 128 * g + 32 * (j >> 1) + e0 + 4 * (j & 1);
    }
};

// F16: 8 halves, one 16-byte load (rows are 16-byte aligned when K is a multiple of 32).
struct UF16 : PerUnit<UF16> {
    static const int W = 8;
    static __device__ __forceinline__ float unit(const u8* row, int u, float* v) {
        uint4 h = ldg128(row + (i64)u * 16);
        u32 q[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[2 * i] = h2f((u16)(q[i] & 0xffff));
            v[2 * i + 1] = h2f((u16)(q[i] >> 16));
        }
        return 1.0f;
    }
    static __device__ __forceinline__ int xoff(int u, int j) { return 8 * u + 4 * j; }
};

// Every other type: 8 consecutive elements through T::at (correct, not tuned).
template <typename T>
struct UGen : PerUnit<UGen<T> > {
    static const int W = 8;
    static __device__ __forceinline__ float unit(const u8* row, int u, float* v) {
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = T::at(row, 8 * u + i);
        return 1.0f;
    }
    static __device__ __forceinline__ int xoff(int u, int j) { return 8 * u + 4 * j; }
};

// The unit kernels' body: M weight matrices (1: y = x Wᵀ; 2: y = silu(x Gᵀ) * (x Uᵀ)), R rows,
// C output columns per block. Narrow units: 4 columns (gate/up: 2 of each matrix), so each x
// load feeds 4 weight rows (an activation float per weight per row was the L1 traffic that
// bounded these kernels at 8 rows); at one row also a 1-column variant (`_c1`), which keeps 4x
// the blocks in flight: the host takes it for float weights and narrow matrices (measured on
// the H200: 4 columns cost SmolLM2 16% and 8B F16 10% at R = 1, and gained 8B Q4_0 and Q8_0
// 7%). Wide units: one column, their 32 decoded values already fill the registers.
template <typename U, int M>
struct Cols {
    static const int N = U::W <= 8 ? 4 / M : 1;
};

// The unit loop of mmv_impl: this thread's units of the rows, accumulated into acc. SH: the
// decoder walks each row (U::WALK) instead of decoding unit u from scratch.
template <typename U, int R, int M, int C, bool SH>
__device__ __forceinline__ void mmv_loop(const u8* const* rows, const float* __restrict__ x,
                                         int K, float (&acc)[M * C][R]) {
    const int W = U::W;
    int units = K / W;
    if (SH) {
        // Walking decoders (units of 8): the rows' and x's addresses advance by constants.
        typename U::Walk wk[M * C];
        int st = U::step(blockDim.x), xs = U::xstep(blockDim.x);
#pragma unroll
        for (int q = 0; q < M * C; q++) wk[q] = U::walk(rows[q], threadIdx.x);
        const float* xw = x + U::xoff(threadIdx.x, 0);
        for (int u = threadIdx.x; u < units; u += blockDim.x, xw += xs) {
            float v[M * C][8], s[M * C];
#pragma unroll
            for (int q = 0; q < M * C; q++) s[q] = U::unit_walk(wk[q], st, v[q]);
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float* xr = xw + (i64)r * K;
                float4 xv[2] = {ldx4_at<0>(xr), ldx4_at<U::XJ>(xr)};
                float d[M * C];
#pragma unroll
                for (int q = 0; q < M * C; q++) {
                    d[q] = 0.0f;
#pragma unroll
                    for (int j = 0; j < 2; j++) {
                        d[q] = fmaf(v[q][4 * j], xv[j].x, d[q]);
                        d[q] = fmaf(v[q][4 * j + 1], xv[j].y, d[q]);
                        d[q] = fmaf(v[q][4 * j + 2], xv[j].z, d[q]);
                        d[q] = fmaf(v[q][4 * j + 3], xv[j].w, d[q]);
                    }
                }
#pragma unroll
                for (int q = 0; q < M * C; q++) acc[q][r] = fmaf(d[q], s[q], acc[q][r]);
            }
        }
        return;
    }
    for (int u = threadIdx.x; u < units; u += blockDim.x) {
        if (W <= 8) {
            // Narrow units: every weight row's unit live at once, each x load used for all.
            float v[M * C][W], s[M * C];
#pragma unroll
            for (int q = 0; q < M * C; q++) s[q] = U::unit(rows[q], u, v[q]);
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float* xr = x + (i64)r * K;
                float d[M * C];
#pragma unroll
                for (int q = 0; q < M * C; q++) d[q] = 0.0f;
#pragma unroll
                for (int j = 0; j < W / 4; j++) {
                    float4 xv = ldx4(xr + U::xoff(u, j));
#pragma unroll
                    for (int q = 0; q < M * C; q++) {
                        d[q] = fmaf(v[q][4 * j], xv.x, d[q]);
                        d[q] = fmaf(v[q][4 * j + 1], xv.y, d[q]);
                        d[q] = fmaf(v[q][4 * j + 2], xv.z, d[q]);
                        d[q] = fmaf(v[q][4 * j + 3], xv.w, d[q]);
                    }
                }
#pragma unroll
                for (int q = 0; q < M * C; q++) acc[q][r] = fmaf(d[q], s[q], acc[q][r]);
            }
        } else {
            // Wide units: one weight row at a time (the next re-reads x from L1), so a thread
            // holds one decoded unit: 32 registers, and no spills at R = 8.
#pragma unroll
            for (int q = 0; q < M * C; q++) {
                float v[W];
                float s = U::unit(rows[q], u, v);
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const float* xr = x + (i64)r * K;
                    float d = 0.0f;
#pragma unroll
                    for (int j = 0; j < W / 4; j++) {
                        float4 xv = ldx4(xr + U::xoff(u, j));
                        d = fmaf(v[4 * j], xv.x, d);
                        d = fmaf(v[4 * j + 1], xv.y, d);
                        d = fmaf(v[4 * j + 2], xv.z, d);
                        d = fmaf(v[4 * j + 3], xv.w, d);
                    }
                    acc[q][r] = fmaf(d, s, acc[q][r]);
                }
            }
        }
    }
}

template <typename U, int R, int M, int C>
__device__ __forceinline__ void mmv_impl(const u8* __restrict__ w0, const u8* __restrict__ w1,
                                         const float* __restrict__ x, float* __restrict__ y,
                                         int N, int K, i64 row_bytes) {
    __shared__ float red[MMV_THREADS / 32][M * C * R];
    int n0 = blockIdx.x * C;
    if (n0 >= N) return;  // the whole block: a grid larger than N / C
    // Weight row q = m * C + c is column n0 + c of matrix m (past N: column n0 again, unwritten).
    const u8* rows[M * C];
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int c = 0; c < C; c++) {
            int n = n0 + c < N ? n0 + c : n0;
            rows[m * C + c] = (m == 0 ? w0 : w1) + (i64)n * row_bytes;
        }
    float acc[M * C][R];
#pragma unroll
    for (int q = 0; q < M * C; q++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[q][r] = 0.0f;
    if (U::WALK && (blockDim.x & 7) == 0)
        mmv_loop<U, R, M, C, true>(rows, x, K, acc);
    else
        mmv_loop<U, R, M, C, false>(rows, x, K, acc);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int q = 0; q < M * C; q++)
#pragma unroll
        for (int r = 0; r < R; r++) {
            float t = warp_sum(acc[q][r]);
            if (lane == 0) red[warp][q * R + r] = t;
        }
    __syncthreads();
    if (threadIdx.x < C * R) {
        int c = threadIdx.x / R, r = threadIdx.x % R;
        float a = 0.0f, b = 0.0f;
        for (int i = 0; i < nw; i++) {
            a += red[i][c * R + r];
            if (M > 1) b += red[i][(C + c) * R + r];
        }
        if (n0 + c < N) y[(i64)r * N + n0 + c] = M > 1 ? silu1(a) * b : a;
    }
}

// No __launch_bounds__: with it ptxas trades registers for occupancy and the R = 8 kernels spill.
#define MMV_R(name, U, R)                                                                        \
    extern "C" __global__ void mmv_##name##_r##R(const u8* w, const float* x, float* y, int N,  \
                                                 int K, i64 row_bytes) {                        \
        mmv_impl<U, R, 1, Cols<U, 1>::N>(w, w, x, y, N, K, row_bytes);                           \
    }                                                                                            \
    extern "C" __global__ void gate_up_swiglu_##name##_r##R(                                     \
        const u8* wg, const u8* wu, const float* x, float* y, int N, int K, i64 row_bytes) {     \
        mmv_impl<U, R, 2, Cols<U, 2>::N>(wg, wu, x, y, N, K, row_bytes);                         \
    }
// One row, one output column per block (see Cols).
#define MMV_C1(name, U)                                                                          \
    extern "C" __global__ void mmv_##name##_r1_c1(const u8* w, const float* x, float* y, int N, \
                                                  int K, i64 row_bytes) {                       \
        mmv_impl<U, 1, 1, 1>(w, w, x, y, N, K, row_bytes);                                       \
    }                                                                                            \
    extern "C" __global__ void gate_up_swiglu_##name##_r1_c1(                                    \
        const u8* wg, const u8* wu, const float* x, float* y, int N, int K, i64 row_bytes) {     \
        mmv_impl<U, 1, 2, 1>(wg, wu, x, y, N, K, row_bytes);                                     \
    }
#define MMV(name, U) \
    MMV_R(name, U, 1) MMV_R(name, U, 2) MMV_R(name, U, 4) MMV_R(name, U, 8) MMV_C1(name, U)

MMV(f32, UGen<TF32>)
MMV(f16, UF16)
MMV(bf16, UGen<TBF16>)
MMV(q4_0, UQ4_0)
MMV(q4_1, UQ4_1)
MMV(q5_0, UGen<TQ5_0>)
MMV(q5_1, UGen<TQ5_1>)
MMV(q8_0, UQ8_0)
MMV(q4_k, UQ4_K)
MMV(q5_k, UQ5_K)
MMV(q6_k, UQ6_K)

// ---- The plain reference kernel ----

template <typename T>
__device__ float row_dot(const u8* row, const float* x, int K) {
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
