// Matrix-vector products with weights in their GGUF storage type: y[r, n] = sum_k x[r, k] w[n, k]
// (y = x Wᵀ) for a few rows r (decode: one row per running sequence).
//
// mmv_<ty>_r<R> (and gate_up_swiglu_<ty>_r<R>): one block per C output columns, its threads
// split the weight rows into units of 8 weights. A thread decodes a unit once (the loads and
// the bit-twiddling happen once per weight) and applies it to all R activation rows, so a step over
// R sequences reads each weight once. The decoding is instruction-lean, for Maxwell (sm_52: no
// dp4a, no half arithmetic, I2F at a quarter of the FMA rate): nibbles and bytes become floats
// by placing them in the mantissa of 2^23 with one byte permute and one subtraction (exact),
// unaligned block fields are read as aligned words and funnel-shifted, and every weight load
// goes through the read-only cache. Each row's arithmetic is the same whatever R is (the same
// FMA chain per unit, the same reduction), so a sequence gets bit-identical results alone and
// in a batch (the columns a block computes change nothing in a column's arithmetic). Grid:
// (ceil(N / C)), C = 4 output columns a block (2 for gate/up; `_r1_c1`: 1); block: 32 to 128
// threads, a multiple of 32 (the host picks by K).
//
// mmv_<ty>_r1_wc (and gate_up_swiglu_, mmv3_; the K-quants only): one output column a warp, 4
// a block of 128 threads, each warp computing what `_r1_c1`'s whole block of 128 threads
// computes, bit for bit (wc_impl); the host takes them where that is its block (K >= 1024).
// `_r1_wc2` and `_r1_wc4`: the same with a column's work split over 2 or 4 warps (2 and 1
// columns a block), the same bits, for matrices too narrow to fill the device at 4 a block.
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

// OFF + q for the four quants q < OFF of a word (OFF = 16 or 32, a power of two): `m` holds in
// byte i the mantissa bits of q, q << (7 - log2 OFF), which one PRMT puts under the top byte of
// OFF's float (0x41 for 16 with the exponent's low bit 0x80 in m's bytes, 0x42 for 32). No
// subtraction: the decoder's scales carry -OFF s into the min (k4_scales).
template <int OFF>
__device__ __forceinline__ void k4_floats(u32 m, float* out) {
    static_assert(OFF == 16 || OFF == 32, "2^4 or 2^5");
    const u32 top = OFF == 16 ? 0x41000000u : 0x42000000u;
#pragma unroll
    for (int i = 0; i < 4; i++) out[i] = __int_as_float(__byte_perm(m, top, 0x7054u | (u32)i << 8));
}

// ---- Unit decoders: unit u of a row gives v[8] and a scale (the weights are v[i] * scale;
// the K-quants', below, have a scale per half); element i of the unit sits at x index
// xoff(u, i / 4) + i % 4. The lanes of a warp take consecutive units, so the layout decides how
// the warp's x loads coalesce: the 32-element-block types have four lanes to a block, reading
// 64 contiguous bytes of x together. ----

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

// ---- Sub-block-scaled decoders (the K-quants). A unit is 8 weights in two halves of 4 from
// two sub-blocks, each half with a scale of its own (and for Q4_K and Q5_K a min): weight i is
// s0 v[i] + m0 (i < 4) or s1 v[i] + m1 (i >= 4), v the quants as floats. A weight row's share of
// y is then s0 (v[0..4] . x0) + s1 (v[4..8] . x1) + m0 sum(x0) + m1 sum(x1): the scales apply
// once per half and activation row, the mins to sums of x that every weight row of the block
// shares. Units of 8 let a warp's x loads coalesce (eight lanes read a 128-byte line together,
// four lines a load), where units of 32 made every lane read lines of its own.
//
// A super-block is 32 units, one per lane of a warp (bd is a multiple of 32 and the lanes keep
// their unit of the super-block as they walk). Its 16 scales and mins are decoded once per two
// weight rows, one value a lane (lanes 0-15 the first row's, 16-31 the second's), and shuffled
// to the lanes whose units need them: four packed 6-bit fields decoded by every lane for every
// unit cost more than the unit's own nibbles. So every lane of a warp runs every unit step
// (K is a multiple of 256). ----

struct HalfScales {
    float s0, s1, m0, m1;
};

// A thread's place in one weight row: `b` its unit's super-block, `q` (and `h`, for types with
// high bits) the aligned word holding its quants, `sh` the funnel shift (Q6_K's 210-byte
// super-blocks start 2 bytes off a word every other one).
struct KWalk {
    const u8* b;
    const u8* q;
    const u8* h;
    u32 sh;
};

// bfe.u32 / bfi.b32: a bit field of `a` (`len` bits from `pos`), and `a`'s low `len` bits put
// into `b` at `pos`. With positions and lengths that depend only on the lane (hoisted out of the
// loop) each is one instruction where shifts and masks are two or three.
__device__ __forceinline__ u32 bfe(u32 a, u32 pos, u32 len) {
#ifdef M40LLM_HOST
    return len == 0 ? 0u : (u32)(((unsigned long long)a >> pos) & ((1ull << len) - 1));
#else
    u32 r;
    asm("bfe.u32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(pos), "r"(len));
    return r;
#endif
}
__device__ __forceinline__ u32 bfi(u32 a, u32 b, u32 pos, u32 len) {
#ifdef M40LLM_HOST
    u32 m = (u32)(((1ull << len) - 1) << pos);
    return (b & ~m) | ((a << pos) & m);
#else
    u32 r;
    asm("bfi.b32 %0, %1, %2, %3, %4;" : "=r"(r) : "r"(a), "r"(b), "r"(pos), "r"(len));
    return r;
#endif
}

// The shuffles of one weight row's scales: `val` holds, in lane 16 o + j, value j of the row
// (o = 0 for the first row of the pair, 1 for the second); a0 and a1 the indices the lane's
// unit needs for its halves, b0 and b1 those of its mins (negative: no mins).
__device__ __forceinline__ HalfScales shuffle_scales(float val, int o, int a0, int a1, int b0,
                                                     int b1) {
    HalfScales s;
    s.s0 = __shfl_sync(FULL_MASK, val, 16 * o + a0);
    s.s1 = __shfl_sync(FULL_MASK, val, 16 * o + a1);
    s.m0 = b0 < 0 ? 0.0f : __shfl_sync(FULL_MASK, val, 16 * o + b0);
    s.m1 = b1 < 0 ? 0.0f : __shfl_sync(FULL_MASK, val, 16 * o + b1);
    return s;
}

// The super-block a lane decodes scales of for the row pair p, p + 1: lanes 0-15 row p's,
// 16-31 row p + 1's (p's when there is none). The select is of the pointers' values: an index
// chosen at run time would put the walks in local memory.
template <int Q>
__device__ __forceinline__ const u8* pair_row(const KWalk (&wk)[Q], int p, int lane) {
    const u8* b0 = wk[p].b;
    const u8* b1 = p + 1 < Q ? wk[p + 1].b : b0;
    return (lane & 16) ? b1 : b0;
}

// Q4_K and Q5_K's scales and mins: the super-block's first 16 bytes are f16 d, f16 dmin and 12
// bytes (h.y, h.z, h.w) of 6-bit fields. Sub-block j < 4 has scale byte j & 63 of h.y and min
// byte j & 63 of h.z; j >= 4 has scale (byte j - 4 of h.w & 15) | (byte j - 4 of h.y >> 6) << 4
// and min (byte j - 4 of h.w >> 4) | (byte j - 4 of h.z >> 6) << 4. Lane l (of a row pair)
// decodes value l & 15: d * scale[l & 7] for l & 8 == 0, else -dmin * min[l & 7].
__device__ __forceinline__ float k4_scale(uint4 h, int lane) {
    int j = lane & 7, k = j & 3;
    u32 mn = (lane >> 3) & 1;
    bool lo = j < 4;
    u32 a = mn ? h.z : h.y;
    u32 p1 = bfe(a, lo ? 8 * k : 8 * k + 6, lo ? 6 : 2);
    u32 p2 = bfe(h.w, 8 * k + 4 * mn, lo ? 0 : 4);
    u32 v = bfi(p1, p2, lo ? 0 : 4, lo ? 6 : 2);
    // d (low half) or dmin (high half, negated: its sign bit flipped).
    float dd = h2f((u16)((h.x >> (16 * mn)) ^ (mn << 15)));
    return (__int_as_float(0x4B000000u | v) - MAGIC) * dd;
}

// The scale and min shuffles of Q4_K / Q5_K for Q weight rows: unit i of a super-block covers
// sub-blocks 2 (i >> 3) and 2 (i >> 3) + 1.
// The decoders give the quants as OFF + q (k4_floats), so a weight s q + m is s (OFF + q) +
// (m - OFF s): a min lane (lane & 8) adds -OFF times its sub-block's scale, which lane ^ 8
// holds; a scale lane adds 0 times the min (branch-free, one shuffle a row pair).
template <int Q, int OFF>
__device__ __forceinline__ void k4_scales(const KWalk (&wk)[Q], HalfScales (&sc)[Q]) {
    int lane = threadIdx.x & 31, s = 2 * (lane >> 3);
    float off = (lane & 8) ? -(float)OFF : 0.0f;
#pragma unroll
    for (int p = 0; p < Q; p += 2) {
        const u8* b = pair_row<Q>(wk, p, lane);
        float val = k4_scale(ldg128(b), lane);
        val = fmaf(off, __shfl_xor_sync(FULL_MASK, val, 8), val);
#pragma unroll
        for (int o = 0; o < 2 && p + o < Q; o++)
            sc[p + o] = shuffle_scales(val, o, s, s + 1, 8 + s, 9 + s);
    }
}

// What the sub-block-scaled decoders share: their walk (D::BYTES-byte super-blocks, one a warp
// a unit step; every pointer advances by the same bytes), which may advance over a multiple of
// D::ALIGN super-blocks (the walk's words keep their alignment; the shift is set once).
template <typename D>
struct SubScaled : PerUnit<D> {
    typedef KWalk Walk;
    static const int ALIGN = 1;
    static __device__ __forceinline__ bool walks(int bd) { return (bd >> 5) % D::ALIGN == 0; }
    static __device__ __forceinline__ int step(int bd) { return (bd >> 5) * D::BYTES; }
    static __device__ __forceinline__ void advance(Walk& k, int st) {
        k.b += st;
        k.q += st;
        k.h += st;
    }
};

// Q4_K and Q5_K: their scales and mins (k4_scales, with the offset D::OFF of the quants'
// floats folded into the mins) and their layout of a unit's weights.
template <typename D>
struct K4Scaled : SubScaled<D> {
    template <int Q>
    static __device__ __forceinline__ void scales(const KWalk (&wk)[Q], HalfScales (&sc)[Q]) {
        k4_scales<Q, D::OFF>(wk, sc);
    }
    static const bool MINS = true;
    static const int XJ = 32;
    static __device__ __forceinline__ int xoff(int u, int j) {
        int i = u & 31;
        return 256 * (u >> 5) + 64 * (i >> 3) + 4 * (i & 7) + 32 * j;
    }
};

// Q4_K (144-byte super-blocks of 256: 16 bytes of d, dmin, scales and mins, then four groups of
// 32 bytes whose low nibbles are sub-block 2g and high nibbles sub-block 2g + 1): unit i is
// bytes 4i..4i + 4 of the nibbles, group g = i / 8: weights 64 g + 4 (i & 7) + 0..3 (low
// nibbles) and 32 further on (high). w = d sc q - dmin m, the quants as 16 + q (nibble q as
// bits 6..3 of a byte, 0x80 the exponent's low bit: k4_floats<16>).
struct UQ4_K : K4Scaled<UQ4_K> {
    static const int W = 8;
    static const int BYTES = 144;
    static const int OFF = 16;
    static __device__ __forceinline__ Walk walk(const u8* row, int u) {
        Walk k;
        k.b = row + (i64)(u >> 5) * BYTES;
        k.q = k.b + 16 + 4 * (u & 31);
        k.h = k.q;
        k.sh = 0;
        return k;
    }
    static __device__ __forceinline__ void quants(const Walk& k, float* v) {
        u32 q = ldg32(k.q);
        k4_floats<16>(((q << 3) & 0x78787878u) | 0x80808080u, v);
        k4_floats<16>(((q >> 1) & 0x78787878u) | 0x80808080u, v + 4);
    }
};

// Q5_K (176-byte super-blocks of 256: 16 bytes of d, dmin, scales and mins as Q4_K, 32 bytes of
// high bits qh, then nibbles as Q4_K): weight l of sub-block s has bit s of qh[l] as its fifth
// bit. Unit i as Q4_K's: its high bits are bits 2g and 2g + 1 of qh[4 (i & 7)..4 (i & 7) + 4].
// The quants as 32 + q (q as bits 6..2 of a byte: k4_floats<32>).
struct UQ5_K : K4Scaled<UQ5_K> {
    static const int W = 8;
    static const int BYTES = 176;
    static const int OFF = 32;
    static __device__ __forceinline__ Walk walk(const u8* row, int u) {
        Walk k;
        int i = u & 31;
        k.b = row + (i64)(u >> 5) * BYTES;
        k.q = k.b + 48 + 4 * i;
        k.h = k.b + 16 + 4 * (i & 7);
        k.sh = 0;
        return k;
    }
    static __device__ __forceinline__ void quants(const Walk& k, float* v) {
        // Bit 2g of qh is the low half's fifth bit, 2g + 1 the high half's.
        u32 q = ldg32(k.q), t = ldg32(k.h) >> (2 * ((threadIdx.x & 31) >> 3));
        k4_floats<32>(((q << 2) & 0x3C3C3C3Cu) | ((t << 6) & 0x40404040u), v);
        k4_floats<32>(((q >> 2) & 0x3C3C3C3Cu) | ((t << 5) & 0x40404040u), v + 4);
    }
};

// Q6_K (210-byte super-blocks of 256: 128 bytes of low nibbles ql, 64 of 2-bit highs qh, 16 int8
// scales, f16 d). Weight 128 g + 32 k + l (g < 2, k < 4, l < 32) is the low (k < 2) or high
// nibble of ql[64 g + 32 (k & 1) + l] with bits 2k..2k+1 of qh[32 g + l] above it, minus 32,
// times d * scale[8 g + 2 k + l / 16]. Unit i = 16 g + 8 h + m is ql bytes 4i..4i + 4: weights
// 128 g + 32 h + 4 m + 0..3 (low nibbles, k = h) and 64 further on (high, k = h + 2), with the
// qh bytes 32 g + 4 m.. and scales 8 g + 2 h + m / 4 and 4 further on. A 210-byte stride keeps
// the alignment only over an even number of super-blocks (ALIGN): with bd / 32 odd the walk is
// rebuilt each unit.
struct UQ6_K : SubScaled<UQ6_K> {
    static const int W = 8;
    static const int BYTES = 210;
    static const int ALIGN = 2;
    static __device__ __forceinline__ Walk walk(const u8* row, int u) {
        Walk k;
        int i = u & 31;
        k.b = row + (i64)(u >> 5) * BYTES;
        size_t a = (size_t)(k.b + 4 * i);
        k.q = (const u8*)(a & ~(size_t)3);
        k.h = (const u8*)(((size_t)(k.b + 128 + 32 * (i >> 4) + 4 * (i & 7))) & ~(size_t)3);
        k.sh = (u32)(a & 3) * 8;
        return k;
    }
    // Lane l (of a row pair) decodes d * scale[l & 15].
    template <int Q>
    static __device__ __forceinline__ void scales(const Walk (&wk)[Q], HalfScales (&sc)[Q]) {
        int lane = threadIdx.x & 31, i = lane;
        int a = 8 * (i >> 4) + 2 * ((i >> 3) & 1) + ((i & 7) >> 2);
#pragma unroll
        for (int p = 0; p < Q; p += 2) {
            const u8* b = pair_row<Q>(wk, p, lane);
            u32 s = (u32)__ldg(b + 192 + (lane & 15)) ^ 0x80u;
            float val = (mbyte(s, 0) - (MAGIC + 128.0f)) * h2f(ldg16(b + 208));
#pragma unroll
            for (int o = 0; o < 2 && p + o < Q; o++)
                sc[p + o] = shuffle_scales(val, o, a, a + 4, -1, -1);
        }
    }
    static __device__ __forceinline__ void quants(const Walk& k, float* v) {
        u32 ql = __funnelshift_r(ldg32(k.q), ldg32_at<4>(k.q), k.sh);
        u32 qh = __funnelshift_r(ldg32(k.h), ldg32_at<4>(k.h), k.sh);
        u32 t = qh >> (2 * ((threadIdx.x >> 3) & 1));
        bytes4((ql & 0x0F0F0F0Fu) | ((t << 4) & 0x30303030u), 32.0f, v);
        bytes4(((ql >> 4) & 0x0F0F0F0Fu) | (t & 0x30303030u), 32.0f, v + 4);
    }
    static const bool MINS = false;
    static const int XJ = 64;
    static __device__ __forceinline__ int xoff(int u, int j) {
        int i = u & 31;
        return 256 * (u >> 5) + 128 * (i >> 4) + 32 * ((i >> 3) & 1) + 4 * (i & 7) + 64 * j;
    }
};

// Which decoders are sub-block-scaled (their unit loop is mmv_loop_scaled).
template <typename U>
struct IsScaled {
    static const bool value = false;
};
template <>
struct IsScaled<UQ4_K> {
    static const bool value = true;
};
template <>
struct IsScaled<UQ5_K> {
    static const bool value = true;
};
template <>
struct IsScaled<UQ6_K> {
    static const bool value = true;
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
// 7%). The K-quants at 8 rows take 2 columns (1 of each for gate/up): their scale shuffles and
// 8-row accumulators at 4 columns held 168 registers a thread (measured on the H200, 8B
// Q4_K_M tg64x8: 540 tokens/s at 4 columns, 667 at 2; Q4_0 falls from 1 048 to 712 at 2, so
// the others keep 4). matmul.rs `unit_cols` says the same to the host.
template <typename U, int M, int R>
struct Cols {
    static const int N = (IsScaled<U>::value && R == 8 ? 2 : 4) / M;
};

// The unit loop of mmv_impl for the decoders of one scale a unit: this thread's units of the
// rows, accumulated into acc. SH: the decoder walks each row (U::WALK) instead of decoding unit
// u from scratch.
template <typename U, int R, int M, int C, bool SH>
__device__ __forceinline__ void mmv_loop(const u8* const* rows, const float* __restrict__ x,
                                         int K, float (&acc)[M * C][R]) {
    const int W = U::W;
    int units = K / W;
    if (SH) {
        // Walking decoders: the rows' and x's addresses advance by constants.
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
        // Every weight row's unit live at once, each x load used for all.
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
    }
}

// The walks of a pass of P unit steps from unit u (this thread's units u, u + bd, ...,
// u + (P - 1) bd of the Q weight rows; wk at unit u): step p of row q at w[p * Q + q]. SH: wk
// advanced p steps of st bytes, else rebuilt for the unit.
template <typename U, int Q, int P, bool SH>
__device__ __forceinline__ void pass_walks(const u8* const* rows, const typename U::Walk (&wk)[Q],
                                           int u, int st, typename U::Walk (&w)[P * Q]) {
#pragma unroll
    for (int p = 0; p < P; p++)
#pragma unroll
        for (int q = 0; q < Q; q++) {
            if (SH) {
                w[p * Q + q] = wk[q];
                if (p > 0) U::advance(w[p * Q + q], p * st);
            } else {
                w[p * Q + q] = U::walk(rows[q], u + p * (int)blockDim.x);
            }
        }
}

// P unit steps of the sub-block-scaled decoders over the Q weight rows: step p of row q at walk
// w[p * Q + q], xw the x of step 0, xs the x stride of a step. All P steps' scales and quants
// are loaded before the first FMA: at one row a thread has little else in flight (4 bytes of
// quants a step), and a step's shuffled scales would otherwise wait on its own loads before
// the next step's are issued. The P steps' walks are decoded as P * Q weight rows, so the row
// pairs of `scales` pair step p with p + 1 when Q = 1 (a lane's scale value is the same
// whatever the pairing). Row q's steps accumulate into acc[q] in the steps' order, so every P
// gives the same bits; SPREAD: step p into acc[p * Q + q] instead (the one-column-a-warp
// kernels: a step per virtual warp).
template <typename U, int R, int Q, int P, bool SPREAD, int N>
__device__ __forceinline__ void scaled_steps(const typename U::Walk (&w)[P * Q], const float* xw,
                                             int xs, int K, float (&acc)[N][R]) {
    static_assert(SPREAD ? N >= P * Q : N == Q, "an accumulator for every step's row");
    HalfScales sc[P * Q];
    U::template scales<P * Q>(w, sc);
    float v[P * Q][8];
#pragma unroll
    for (int i = 0; i < P * Q; i++) U::quants(w[i], v[i]);
#pragma unroll
    for (int p = 0; p < P; p++)
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float* xr = xw + (i64)p * xs + (i64)r * K;
            float4 x0 = ldx4_at<0>(xr), x1 = ldx4_at<U::XJ>(xr);
            float sx0 = 0.0f, sx1 = 0.0f;
            if (U::MINS) {
                sx0 = (x0.x + x0.y) + (x0.z + x0.w);
                sx1 = (x1.x + x1.y) + (x1.z + x1.w);
            }
#pragma unroll
            for (int q = 0; q < Q; q++) {
                const float* vq = v[p * Q + q];
                const HalfScales& s = sc[p * Q + q];
                float& out = acc[SPREAD ? p * Q + q : q][r];
                float d0 = vq[0] * x0.x, d1 = vq[4] * x1.x;
                d0 = fmaf(vq[1], x0.y, d0);
                d1 = fmaf(vq[5], x1.y, d1);
                d0 = fmaf(vq[2], x0.z, d0);
                d1 = fmaf(vq[6], x1.z, d1);
                d0 = fmaf(vq[3], x0.w, d0);
                d1 = fmaf(vq[7], x1.w, d1);
                float a = fmaf(s.s0, d0, out);
                a = fmaf(s.s1, d1, a);
                if (U::MINS) {
                    a = fmaf(s.m0, sx0, a);
                    a = fmaf(s.m1, sx1, a);
                }
                out = a;
            }
        }
}

// Unit steps a pass of mmv_loop_scaled: 4 at one row for one or two weight rows a thread (the
// one-column kernels: matvec, gate/up, mmv3), else 1 (the several-column kernels have Q loads
// a step already; at 8 rows the 4-step pass would hold too many registers).
template <int R, int Q>
struct ScaledSteps {
    static const int P = R == 1 && Q <= 2 ? 4 : 1;
};

// The unit loop of the sub-block-scaled decoders (IsScaled): this thread's units of the rows,
// accumulated into acc, ScaledSteps::P steps a pass and the rest one at a time. SH: the walk
// advances a constant step a unit (U::walks(bd)), else it is rebuilt for each unit.
template <typename U, int R, int M, int C, bool SH>
__device__ __forceinline__ void mmv_loop_scaled(const u8* const* rows, const float* __restrict__ x,
                                                int K, float (&acc)[M * C][R]) {
    const int Q = M * C, P = ScaledSteps<R, Q>::P;
    int bd = blockDim.x, units = K / 8, st = U::step(bd), xs = 8 * bd;
    typename U::Walk wk[Q];
#pragma unroll
    for (int q = 0; q < Q; q++) wk[q] = U::walk(rows[q], threadIdx.x);
    const float* xw = x + U::xoff(threadIdx.x, 0);
    int u = threadIdx.x;
    if (P > 1) {
        for (; u + (P - 1) * bd < units; u += P * bd, xw += P * xs) {
            typename U::Walk w[P * Q];
            pass_walks<U, Q, P, SH>(rows, wk, u, st, w);
            scaled_steps<U, R, Q, P, false>(w, xw, xs, K, acc);
            if (SH) {
#pragma unroll
                for (int q = 0; q < Q; q++) U::advance(wk[q], P * st);
            }
        }
    }
    for (; u < units; u += bd, xw += xs) {
        typename U::Walk w[Q];
        pass_walks<U, Q, 1, SH>(rows, wk, u, st, w);
        scaled_steps<U, R, Q, 1, false>(w, xw, xs, K, acc);
        if (SH) {
#pragma unroll
            for (int q = 0; q < Q; q++) U::advance(wk[q], st);
        }
    }
}

// The unit loop a decoder takes: mmv_loop_scaled for the K-quants, else mmv_loop (walking when
// the decoder walks and the block is a multiple of 8 threads).
template <typename U, int R, int M, int C, bool S = IsScaled<U>::value>
struct UnitLoop {
    static __device__ __forceinline__ void run(const u8* const* rows, const float* x, int K,
                                               float (&acc)[M * C][R]) {
        if (U::WALK && (blockDim.x & 7) == 0)
            mmv_loop<U, R, M, C, true>(rows, x, K, acc);
        else
            mmv_loop<U, R, M, C, false>(rows, x, K, acc);
    }
};
template <typename U, int R, int M, int C>
struct UnitLoop<U, R, M, C, true> {
    static __device__ __forceinline__ void run(const u8* const* rows, const float* x, int K,
                                               float (&acc)[M * C][R]) {
        if (U::walks(blockDim.x))
            mmv_loop_scaled<U, R, M, C, true>(rows, x, K, acc);
        else
            mmv_loop_scaled<U, R, M, C, false>(rows, x, K, acc);
    }
};

// Block `blk` of the launch over one matrix (pair): output columns blk * C .. blk * C + C.
template <typename U, int R, int M, int C>
__device__ __forceinline__ void mmv_impl(const u8* __restrict__ w0, const u8* __restrict__ w1,
                                         const float* __restrict__ x, float* __restrict__ y,
                                         int N, int K, i64 row_bytes, int blk) {
    __shared__ float red[MMV_THREADS / 32][M * C * R];
    int n0 = blk * C;
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
    UnitLoop<U, R, M, C>::run(rows, x, K, acc);
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

// ---- One output column a warp (`_wc`): the K-quants at one row, when the host's block for
// the one-column kernel would be V = 4 warps (K >= 1024). There, at K = 4096, each of the
// block's threads decodes 4 units a weight row, so its fixed costs (the walk setup, the warp
// sum, the block's shared-memory reduction and barrier) weigh on every weight.
//
// Logical thread (v, l) of that V-warp block walks units l + 32 v + 32 V k, k = 0, 1, ...: lane
// l's unit of super-blocks v, v + V, v + 2 V, ..., accumulated in that order (four steps a pass
// or one: the same FMA chain). The block then sums warp v's warp_sum into a = 0 + t_0 + ... +
// t_{V-1}, in that order. A wc warp is that whole block: its lane l keeps the V logical threads'
// accumulators (acc[v], row m's at acc[v * M + m]) and walks consecutive super-blocks in passes
// of V, step p of a pass (super-block s + p, logical warp p's next step) into acc[p]; a last,
// shorter pass takes the super-blocks left when K / 256 is not a multiple of V (logical warps
// p and up one step fewer). Then the same V warp sums, added in the same order. So the column's
// bits are the one-column kernel's at V warps (and at the fewer warps the host gives shorter K:
// warps without units add zeros), and with them the batch invariance of the unit kernels;
// there is no shared memory and no barrier, and a warp whose column is past N leaves as a whole.
// Grid: ceil(N / (blockDim.x / 32)), block: 128 (4 columns a block).
//
// With W warps a column (`_wc2`, `_wc4`), warp j of the column keeps logical warps j S .. j S +
// S - 1 (S = V / W): passes of S steps over super-blocks s + j S.., s advancing by V as before,
// so each logical warp's chain is unchanged; the W warps' sums meet in shared memory and the
// column's first warp adds them in logical-warp order. The same bits; the host takes them where
// 4 columns a block would leave too few blocks to fill the device (an 8B's 4096 columns on an
// H200's 132 SMs: one partial wave of warps that walk K = 14 336 with little else in flight).

// A pass of P steps (P <= V) over super-blocks s..s + P of the M rows: wk[a][m] is row m's walk
// at super-block s + a (a < ALIGN, the super-blocks over which a walk keeps its alignment), xw
// the x of super-block s. Step p accumulates into acc[p * M + m].
template <typename U, int M, int P, int N>
__device__ __forceinline__ void wc_pass(const KWalk (&wk)[U::ALIGN][M], const float* xw, int K,
                                        float (&acc)[N][1]) {
    KWalk w[P * M];
#pragma unroll
    for (int p = 0; p < P; p++)
#pragma unroll
        for (int m = 0; m < M; m++) {
            w[p * M + m] = wk[p % U::ALIGN][m];
            if (p >= U::ALIGN) U::advance(w[p * M + m], (p - p % U::ALIGN) * U::BYTES);
        }
    scaled_steps<U, 1, M, P, true>(w, xw, 256, K, acc);
}

// The last pass: `left` (< P) super-blocks, a pass of that many steps.
template <typename U, int M, int P>
struct WcTail {
    template <int N>
    static __device__ __forceinline__ void run(int left, const KWalk (&wk)[U::ALIGN][M],
                                               const float* xw, int K, float (&acc)[N][1]) {
        if (left == P)
            wc_pass<U, M, P>(wk, xw, K, acc);
        else
            WcTail<U, M, P - 1>::run(left, wk, xw, K, acc);
    }
};
template <typename U, int M>
struct WcTail<U, M, 0> {
    template <int N>
    static __device__ __forceinline__ void run(int, const KWalk (&)[U::ALIGN][M], const float*,
                                               int, float (&)[N][1]) {}
};

// warp_sum of N values at once (N a power of two, at most 32), in N - 1 + 5 - log2 N shuffles
// instead of 5 N: a transposed butterfly. At the step of distance o a lane keeps the half of
// its values its bit o selects and gets the other half's partner lane's sums; each sum is
// warp_sum's, bit for bit (its tree, each add of two lanes' partials the same either way
// round). Returns the total of value i = (lane >> (5 - log2 N)) on that lane (value i's total
// sits on lanes (32 / N) i ...); the values are clobbered.
template <int N>
__device__ __forceinline__ float warp_sums(float (&v)[N]) {
    static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "a power of two up to 32");
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int h = N / 2, o = 16; h >= 1; h /= 2, o /= 2) {
        bool hi = (lane & o) != 0;
#pragma unroll
        for (int i = 0; i < h; i++) {
            float keep = hi ? v[i + h] : v[i], send = hi ? v[i] : v[i + h];
            v[i] = keep + __shfl_xor_sync(FULL_MASK, send, o);
        }
    }
    float t = v[0];
#pragma unroll
    for (int o = 16 / N; o > 0; o >>= 1) t += __shfl_xor_sync(FULL_MASK, t, o);
    return t;
}

// Part j of column n (W parts, S = V / W of the V logical warps each: j S .. j S + S - 1), by
// this warp: the walk of its logical warps' super-blocks (j S + p + V i, pass i, step p), then
// their S (S M) sums at once (warp_sums). Returns logical warp j S + v's row-m total on lane
// (32 / (S M)) (v M + m).
template <typename U, int M, int V, int W>
__device__ __forceinline__ float wc_part(const u8* __restrict__ w0, const u8* __restrict__ w1,
                                         const float* __restrict__ x, int K, i64 row_bytes, int n,
                                         int j) {
    const int S = V / W;
    int lane = threadIdx.x & 31;
    KWalk wk[U::ALIGN][M];
#pragma unroll
    for (int a = 0; a < U::ALIGN; a++)
#pragma unroll
        for (int m = 0; m < M; m++)
            wk[a][m] = U::walk((m == 0 ? w0 : w1) + (i64)n * row_bytes, 32 * (j * S + a) + lane);
    const float* xw = x + U::xoff(lane, 0) + 256 * j * S;
    float acc[S * M][1];
#pragma unroll
    for (int i = 0; i < S * M; i++) acc[i][0] = 0.0f;
    int sbs = K / 256, s = 0;
    for (; s + V <= sbs; s += V, xw += 256 * V) {
        wc_pass<U, M, S>(wk, xw, K, acc);
#pragma unroll
        for (int a = 0; a < U::ALIGN; a++)
#pragma unroll
            for (int m = 0; m < M; m++) U::advance(wk[a][m], V * U::BYTES);
    }
    // Fewer than V super-blocks left: logical warp p takes one if p < left.
    int left = min(max(sbs - s - j * S, 0), S);
    WcTail<U, M, W == 1 ? S - 1 : S>::run(left, wk, xw, K, acc);
    float t[S * M];
#pragma unroll
    for (int i = 0; i < S * M; i++) t[i] = acc[i][0];
    return warp_sums<S * M>(t);
}

// Column n of the launch over one matrix (pair), by W warps of the block (this one its part j;
// the block's warps w..w + W - 1 with w = W (warp / W)). W = 1: the V sums are in this warp;
// else the parts' sums meet in shared memory after a barrier every warp of the block reaches
// (a column past N computes nothing). Either way a = 0 + t_0 + ... + t_{V-1}, in that order.
template <typename U, int M, int V, int W>
__device__ __forceinline__ void wc_impl(const u8* __restrict__ w0, const u8* __restrict__ w1,
                                        const float* __restrict__ x, float* __restrict__ y, int N,
                                        int K, i64 row_bytes, int n, int j) {
    static_assert(IsScaled<U>::value, "a warp per column emulates mmv_loop_scaled's block");
    static_assert(V % U::ALIGN == 0, "a pass keeps the walks' alignment");
    static_assert(V % W == 0 && W * (MMV_THREADS / 32 / W) == MMV_THREADS / 32,
                  "whole parts of logical warps, whole columns a block");
    const int S = V / W, gap = 32 / (S * M);  // value i's total on lane gap * i
    int lane = threadIdx.x & 31;
    if (W == 1) {
        if (n >= N) return;  // the whole warp
        float tot = wc_part<U, M, V, 1>(w0, w1, x, K, row_bytes, n, 0), a = 0.0f, b = 0.0f;
#pragma unroll
        for (int v = 0; v < V; v++) {
            a += v == 0 ? tot : __shfl_sync(FULL_MASK, tot, gap * v * M);
            if (M > 1) b += __shfl_sync(FULL_MASK, tot, gap * (v * M + 1));
        }
        if (lane == 0) y[n] = M > 1 ? silu1(a) * b : a;
        return;
    }
    __shared__ float part[MMV_THREADS / 32][S * M];
    int warp = threadIdx.x >> 5;
    bool live = n < N;  // the same for the column's W warps
    if (live) {
        float tot = wc_part<U, M, V, W>(w0, w1, x, K, row_bytes, n, j);
        if (lane % gap == 0) part[warp][lane / gap] = tot;
    }
    __syncthreads();
    if (live && j == 0 && lane == 0) {
        float a = 0.0f, b = 0.0f;
#pragma unroll
        for (int p = 0; p < W; p++)
#pragma unroll
            for (int v = 0; v < S; v++) {
                a += part[warp + p][v * M];
                if (M > 1) b += part[warp + p][v * M + 1];
            }
        y[n] = M > 1 ? silu1(a) * b : a;
    }
}

// The column of this warp and its part: blockDim.x / 32 / W columns a block, W warps each.
template <int W>
__device__ __forceinline__ int wc_column() {
    return blockIdx.x * ((blockDim.x >> 5) / W) + (threadIdx.x >> 5) / W;
}
template <int W>
__device__ __forceinline__ int wc_part_index() {
    return (threadIdx.x >> 5) % W;
}

// No __launch_bounds__: with it ptxas trades registers for occupancy and the R = 8 kernels spill.
#define MMV_R(name, U, R)                                                                        \
    extern "C" __global__ void mmv_##name##_r##R(const u8* w, const float* x, float* y, int N,  \
                                                 int K, i64 row_bytes) {                        \
        mmv_impl<U, R, 1, Cols<U, 1, R>::N>(w, w, x, y, N, K, row_bytes, blockIdx.x);               \
    }                                                                                            \
    extern "C" __global__ void gate_up_swiglu_##name##_r##R(                                     \
        const u8* wg, const u8* wu, const float* x, float* y, int N, int K, i64 row_bytes) {     \
        mmv_impl<U, R, 2, Cols<U, 2, R>::N>(wg, wu, x, y, N, K, row_bytes, blockIdx.x);             \
    }
// One row, one output column per block (see Cols).
#define MMV_C1(name, U)                                                                          \
    extern "C" __global__ void mmv_##name##_r1_c1(const u8* w, const float* x, float* y, int N, \
                                                  int K, i64 row_bytes) {                       \
        mmv_impl<U, 1, 1, 1>(w, w, x, y, N, K, row_bytes, blockIdx.x);                           \
    }                                                                                            \
    extern "C" __global__ void gate_up_swiglu_##name##_r1_c1(                                    \
        const u8* wg, const u8* wu, const float* x, float* y, int N, int K, i64 row_bytes) {     \
        mmv_impl<U, 1, 2, 1>(wg, wu, x, y, N, K, row_bytes, blockIdx.x);                         \
    }
// One row, one output column per W warps (SFX: _wc for W = 1, _wc2, _wc4), emulating the
// one-column kernel's block of MMV_THREADS threads (see wc_impl). GU_BOUNDS: the gate/up kernel's
// launch bounds, if any.
#define MMV_WC(name, U, W, SFX, GU_BOUNDS)                                                       \
    extern "C" __global__ void mmv_##name##_r1##SFX(const u8* w, const float* x, float* y,      \
                                                    int N, int K, i64 row_bytes) {              \
        wc_impl<U, 1, MMV_THREADS / 32, W>(w, w, x, y, N, K, row_bytes, wc_column<W>(),          \
                                           wc_part_index<W>());                                 \
    }                                                                                            \
    extern "C" __global__ void GU_BOUNDS gate_up_swiglu_##name##_r1##SFX(                        \
        const u8* wg, const u8* wu, const float* x, float* y, int N, int K, i64 row_bytes) {     \
        wc_impl<U, 2, MMV_THREADS / 32, W>(wg, wu, x, y, N, K, row_bytes, wc_column<W>(),        \
                                           wc_part_index<W>());                                 \
    }
// The plan's multi_matmul at one row (Q, K and V: up to three matrices of one type and K) in
// one launch: blocks [0, b0) compute y0 = x W0ᵀ, the next b1 y1, the rest y2 (bi = ceil(ni /
// C), C the columns a block; n2 = 0 for two matrices). Each block computes what mmv_<ty>_r1
// (C = 4), _r1_c1 (C = 1) or _r1_wc<W> (C = blockDim.x / 32 / W) computes for its columns, so every
// output is bit for bit the same as from the separate launches, with two launches fewer per
// layer in the decode step.
struct Mmv3Block {
    const u8* w;
    float* y;
    int n, b;  // the matrix's columns, the block's index among its blocks
};
__device__ __forceinline__ Mmv3Block mmv3_block(const u8* w0, const u8* w1, const u8* w2,
                                                float* y0, float* y1, float* y2, int n0, int n1,
                                                int n2, int C) {
    Mmv3Block k = {w0, y0, n0, (int)blockIdx.x};
    int b0 = (n0 + C - 1) / C, b1 = (n1 + C - 1) / C;
    if (k.b >= b0) {
        k.b -= b0, k.w = w1, k.y = y1, k.n = n1;
        if (k.b >= b1) k.b -= b1, k.w = w2, k.y = y2, k.n = n2;
    }
    return k;
}
#define MMV3_ARGS                                                                         \
    const u8 *w0, const u8 *w1, const u8 *w2, const float *x, float *y0, float *y1,       \
        float *y2, int n0, int n1, int n2, int K, i64 row_bytes
#define MMV3(name, U, C, SFX)                                                             \
    extern "C" __global__ void mmv3_##name##_r1##SFX(MMV3_ARGS) {                         \
        Mmv3Block k = mmv3_block(w0, w1, w2, y0, y1, y2, n0, n1, n2, C);                  \
        mmv_impl<U, 1, 1, C>(k.w, k.w, x, k.y, k.n, K, row_bytes, k.b);                   \
    }
#define MMV3_WC(name, U, W, SFX)                                                          \
    extern "C" __global__ void mmv3_##name##_r1##SFX(MMV3_ARGS) {                         \
        int cols = (blockDim.x >> 5) / W;                                                 \
        Mmv3Block k = mmv3_block(w0, w1, w2, y0, y1, y2, n0, n1, n2, cols);               \
        wc_impl<U, 1, MMV_THREADS / 32, W>(k.w, k.w, x, k.y, k.n, K, row_bytes,           \
                                           k.b * cols + (threadIdx.x >> 5) / W,           \
                                           wc_part_index<W>());                           \
    }
#define MMV(name, U)                                                                         \
    MMV_R(name, U, 1) MMV_R(name, U, 2) MMV_R(name, U, 4) MMV_R(name, U, 8) MMV_C1(name, U) \
    MMV3(name, U, 4, ) MMV3(name, U, 1, _c1)

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
// The K-quants' one-column-a-warp kernels (wc_impl), and two and four warps a column. Q4_K's
// and Q5_K's one-warp gate/up at 8 blocks an SM: ptxas fits them in 64 registers without spills
// on sm_52 and sm_90 (without the bound 72 and 77 on sm_52, Q4_K 68 on sm_90): 32 warps an SM
// where 28 fitted, 3.7% more tokens/s for an 8B Q4_K_M on the H200. Q6_K's would spill at 64
// (72 on sm_52) and keeps its registers.
#define WCS(name, U, GU_BOUNDS)                                          \
    MMV_WC(name, U, 1, _wc, GU_BOUNDS) MMV3_WC(name, U, 1, _wc)          \
    MMV_WC(name, U, 2, _wc2, ) MMV3_WC(name, U, 2, _wc2)                 \
    MMV_WC(name, U, 4, _wc4, ) MMV3_WC(name, U, 4, _wc4)
WCS(q4_k, UQ4_K, __launch_bounds__(MMV_THREADS, 8))
WCS(q5_k, UQ5_K, __launch_bounds__(MMV_THREADS, 8))
WCS(q6_k, UQ6_K, )

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

// ---- A persistent chain of matvecs (the `persistent` feature's prototype,
// src/backend/cuda/persistent.rs): phases y_i = x_i W_iᵀ at one row, all in one launch, the
// grid waiting at a barrier between phases instead of ending the kernel. A block takes the
// virtual blocks b, b + gridDim.x, ... of a phase, each the block that mmv_q4_0_r1
// (mmv_impl, 4 columns) or mmv_q4_k_r1_wc (wc_impl, a column a warp) would be: the same bits
// as the separate launches. The question it answers is what a launch boundary inside a CUDA
// graph costs against a grid barrier (docs/perf.md "persistent").
//
// Constraints the host checks: the grid is resident at once (at most the occupancy times the
// multiprocessors: a block that never runs would hold the others at the barrier forever), and
// no phase writes memory an earlier phase or itself read or wrote: activations are read through
// the non-coherent read-only cache, which a grid barrier does not invalidate. The host harness
// runs blocks one after another, so there the chain is left out. ----
#ifndef M40LLM_HOST
// One phase: its weight (n rows of row_bytes), x (k floats) and y (n floats).
struct ChainPhase {
    const u8* w;
    const float* x;
    float* y;
    i64 row_bytes;
    int n, k;
};

// The barrier's words (the host zeroes BAR_WORDS of them once): the generation alone on the
// first 128-byte line, which the waiting blocks poll, the count on the second, so polls and
// arrivals do not contend for a line.
#define BAR_GEN 0
#define BAR_COUNT 32
#define BAR_WORDS 64

// Every block of the grid waits here until all have arrived: a block notes the generation,
// publishes its writes (fence), then arrives at the count; the last to arrive resets it and
// moves the generation on, which the others spin on (volatile: read from L2 each time). A
// two-level form (32 group counts, each group's last arrival at the root) measured slower on
// the H200 and was dropped (docs/perf.md).
__device__ __forceinline__ void grid_sync(unsigned* bar) {
    __syncthreads();
    if (threadIdx.x == 0) {
        volatile unsigned* gen = bar + BAR_GEN;
        unsigned g = *gen;
        __threadfence();
        if (atomicAdd(bar + BAR_COUNT, 1u) == gridDim.x - 1) {
            atomicExch(bar + BAR_COUNT, 0u);
            __threadfence();
            atomicAdd(bar + BAR_GEN, 1u);
        } else {
            while (*gen == g) {
            }
        }
        __threadfence();
    }
    __syncthreads();
}

// The phases of `phases` in order; `bar` BAR_WORDS zeroed words the launches of one chain share
// (a barrier leaves the count at zero). At most 64 registers (8 blocks an SM), near the separate
// kernels' 56 (without the bound ptxas takes 66-72: fewer blocks resident than they get).
#define MMV_CHAIN(name, COLS, BODY)                                                          \
    extern "C" __global__ void __launch_bounds__(MMV_THREADS, 8)                            \
        mmv_chain_##name(const ChainPhase* phases, int n_phases, unsigned* bar) {            \
        for (int i = 0; i < n_phases; i++) {                                                 \
            const ChainPhase ph = phases[i];                                                 \
            int blocks = (ph.n + COLS - 1) / COLS;                                           \
            for (int b = blockIdx.x; b < blocks; b += gridDim.x) {                           \
                BODY;                                                                        \
                __syncthreads(); /* mmv_impl's shared sums are reused by the next block */   \
            }                                                                                \
            if (i + 1 < n_phases) grid_sync(bar);                                            \
        }                                                                                    \
    }
MMV_CHAIN(q4_0_r1, 4,
          (mmv_impl<UQ4_0, 1, 1, 4>(ph.w, ph.w, ph.x, ph.y, ph.n, ph.k, ph.row_bytes, b)))
MMV_CHAIN(q4_k_r1_wc, 4,
          (wc_impl<UQ4_K, 1, MMV_THREADS / 32, 1>(ph.w, ph.w, ph.x, ph.y, ph.n, ph.k,
                                                  ph.row_bytes, b * 4 + (threadIdx.x >> 5), 0)))
#endif
