// Tiled matmuls on weights in their GGUF storage type, for the middle row counts (batched decode
// of 9 to 64 sequences): y[r, n] = sum_k x[r, k] w[n, k] (y = x Wᵀ), x [R, K] and y [R, N]
// row-major FP32, W [N, K] in the block layout of its type.
//
// mmq_<ty>_r<BR> (R <= BR rows, BR = 16, 32 or 64): a block computes all R rows of 64 output
// columns over one K-range (`chunk` elements, split `blockIdx.y`). It walks the range in slabs
// of 32: the block's threads decode the 64 weight rows' 32 elements ONCE into shared memory as
// FP32 (scale applied; pieces of 8 consecutive elements, 4 threads to a row's 32), copy the
// slab of x beside them, and each thread then runs a register tile of 4 rows x 4 columns: per
// 4 k, 4 float4 loads of x (its rows), 4 of W (its columns), 64 FMAs. So the decode is paid once
// per weight per launch (amortized over the rows) and the inner loop is FMAs fed by two float4
// shared loads per 16 FMAs. FP32 arithmetic only (legal for sm_52).
//
// Layouts (floats; MMQ_LD = 36 = 32 + 4, so consecutive rows fall 4 banks apart): ws [64][36]
// (weight row n of the tile, its slab elements), xs [BR][36] (x row r, its slab elements). A
// thread (column group tn < 16, row group tr < BR / 4) owns columns tn + 16c (c < 4) and rows
// tr + (BR/4) i (i < 4); a warp holds 8 consecutive column groups and 4 consecutive row groups,
// so its W loads are 8 distinct float4 in 8 distinct bank quads and its x loads 4: one wavefront
// each, every float4 shared by 4 or 8 lanes. The decode's and the x copy's float4 stores spread
// evenly over the bank quads (4 wavefronts a warp, the minimum).
//
// gate_up_mmq_<ty>_r<BR>: the same with two matrices, 32 columns of each per block (tile rows
// 0..32 the gate's columns n0.., 32..64 the up's same columns), so a thread holds the gate and
// the up sum of its 2 columns and applies silu(g) * u itself.
//
// Split K: grid (ceil(N / columns), S). With S = 1 a block writes y; with S > 1 it writes its
// partial sums to part [S][M][R][N] (M = 1, or 2 for gate/up) and mmq_reduce_m<M> sums the S
// partials in split order (then applies silu(g) * u for gate/up). Every output is one FMA chain
// over its split's k in increasing order, by one thread, whatever R and BR are, and the host
// picks S from N, K and the device alone: a row's result is bit for bit the same in every batch
// of 9 to 64 rows (and in every 64-row chunk of a larger one). It is not the unit kernels'
// (kernels/matvec.cu) sum order, so 8 rows and 9 rows differ in the last bits.
#include "common.cuh"

#define MMQ_BN 64
#define MMQ_BK 32
#define MMQ_LD 36

__device__ __forceinline__ u32 qldg32(const u8* p) { return __ldg((const unsigned int*)p); }
__device__ __forceinline__ u16 qldg16(const u8* p) { return __ldg((const unsigned short*)p); }
__device__ __forceinline__ uint4 qldg128(const u8* p) { return __ldg((const uint4*)p); }

// The `WORDS` little-endian words starting at byte `p` (any alignment), as aligned word loads
// (the last one is the word holding the last byte: nothing past the field is read).
template <int WORDS>
__device__ __forceinline__ void q_words(const u8* p, u32* out) {
    size_t a = (size_t)p;
    const u8* base = (const u8*)(a & ~(size_t)3);
    u32 sh = (u32)(a & 3) * 8;
    u32 w[WORDS + 1];
#pragma unroll
    for (int i = 0; i < WORDS; i++) w[i] = qldg32(base + 4 * i);
    w[WORDS] = qldg32((const u8*)((a + 4 * WORDS - 1) & ~(size_t)3));
#pragma unroll
    for (int i = 0; i < WORDS; i++) out[i] = __funnelshift_r(w[i], w[i + 1], sh);
}

// 2^23 + byte i of v (one PRMT); minus 2^23 (plus an offset) it is the byte's value, exactly.
#define QMAGIC 8388608.0f
__device__ __forceinline__ float qbyte(u32 v, int i) {
    return __int_as_float(__byte_perm(v, 0x4B000000u, 0x7650u | (u32)i));
}

// out[i] = (byte i of lo, then of hi, minus off) * d for 8 bytes.
__device__ __forceinline__ void q8bytes(u32 lo, u32 hi, float off, float d, float* out) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[i] = (qbyte(lo, i) - (QMAGIC + off)) * d;
        out[4 + i] = (qbyte(hi, i) - (QMAGIC + off)) * d;
    }
}

// out[i] = (byte i of lo, then of hi) * d + m for 8 bytes.
__device__ __forceinline__ void q8bytes_dm(u32 lo, u32 hi, float d, float m, float* out) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[i] = fmaf(qbyte(lo, i) - QMAGIC, d, m);
        out[4 + i] = fmaf(qbyte(hi, i) - QMAGIC, d, m);
    }
}

// Bits 0..3 of b as bit 0 of bytes 0..3 (the four shifted copies of b do not overlap).
__device__ __forceinline__ u32 spread4(u32 b) { return ((b & 15u) * 0x00204081u) & 0x01010101u; }

// ---- Piece decoders: piece p of a row is its elements 8p..8p + 8, scaled: v[i] = w[8p + i]. ----

// Q4_0 (18-byte blocks: f16 d, 16 bytes of nibbles; element j < 16 the low nibble of byte j,
// 16 + j its high nibble): piece 4b + j is the low (j < 2) or high nibbles of bytes 8 (j & 1)...
struct PQ4_0 {
    static __device__ __forceinline__ void piece(const u8* row, int p, float* v) {
        const u8* b = row + (i64)(p >> 2) * 18;
        int j = p & 3;
        u32 q[2];
        q_words<2>(b + 2 + 8 * (j & 1), q);
        int sh = 4 * (j >> 1);
        q8bytes((q[0] >> sh) & 0x0F0F0F0Fu, (q[1] >> sh) & 0x0F0F0F0Fu, 8.0f, h2f(qldg16(b)), v);
    }
};

// Q4_1 (20-byte blocks: f16 d, f16 m, nibbles as Q4_0): w = d q + m.
struct PQ4_1 {
    static __device__ __forceinline__ void piece(const u8* row, int p, float* v) {
        const u8* b = row + (i64)(p >> 2) * 20;
        int j = p & 3;
        u32 dm = qldg32(b);
        u32 q0 = qldg32(b + 4 + 8 * (j & 1)), q1 = qldg32(b + 8 + 8 * (j & 1));
        int sh = 4 * (j >> 1);
        q8bytes_dm((q0 >> sh) & 0x0F0F0F0Fu, (q1 >> sh) & 0x0F0F0F0Fu, h2f((u16)(dm & 0xffff)),
                   h2f((u16)(dm >> 16)), v);
    }
};

// Q5_0 (22-byte blocks: f16 d, u32 qh (bit e: element e's fifth bit), nibbles as Q4_0): w = d
// (q - 16).
struct PQ5_0 {
    static __device__ __forceinline__ void piece(const u8* row, int p, float* v) {
        const u8* b = row + (i64)(p >> 2) * 22;
        int j = p & 3;
        u32 qh, q[2];
        q_words<1>(b + 2, &qh);
        q_words<2>(b + 6 + 8 * (j & 1), q);
        int sh = 4 * (j >> 1);
        u32 hb = qh >> (8 * j);
        u32 lo = ((q[0] >> sh) & 0x0F0F0F0Fu) | (spread4(hb) << 4);
        u32 hi = ((q[1] >> sh) & 0x0F0F0F0Fu) | (spread4(hb >> 4) << 4);
        q8bytes(lo, hi, 16.0f, h2f(qldg16(b)), v);
    }
};

// Q5_1 (24-byte blocks: f16 d, f16 m, u32 qh, nibbles): w = d q + m.
struct PQ5_1 {
    static __device__ __forceinline__ void piece(const u8* row, int p, float* v) {
        const u8* b = row + (i64)(p >> 2) * 24;
        int j = p & 3;
        u32 dm = qldg32(b), qh = qldg32(b + 4);
        u32 q0 = qldg32(b + 8 + 8 * (j & 1)), q1 = qldg32(b + 12 + 8 * (j & 1));
        int sh = 4 * (j >> 1);
        u32 hb = qh >> (8 * j);
        u32 lo = ((q0 >> sh) & 0x0F0F0F0Fu) | (spread4(hb) << 4);
        u32 hi = ((q1 >> sh) & 0x0F0F0F0Fu) | (spread4(hb >> 4) << 4);
        q8bytes_dm(lo, hi, h2f((u16)(dm & 0xffff)), h2f((u16)(dm >> 16)), v);
    }
};

// Q8_0 (34-byte blocks: f16 d, 32 int8): the bytes flipped to unsigned (x ^ 0x80 = x + 128).
struct PQ8_0 {
    static __device__ __forceinline__ void piece(const u8* row, int p, float* v) {
        const u8* b = row + (i64)(p >> 2) * 34;
        u32 q[2];
        q_words<2>(b + 2 + 8 * (p & 3), q);
        q8bytes(q[0] ^ 0x80808080u, q[1] ^ 0x80808080u, 128.0f, h2f(qldg16(b)), v);
    }
};

// The scale and min of sub-block j of a Q4_K/Q5_K super-block whose first 16 bytes are h,
// times d and dmin.
__device__ __forceinline__ void q_scale_min(uint4 h, int j, float* dsc, float* dm) {
    int k = j & 3;
    u32 a = (h.y >> (8 * k)) & 0xff, b = (h.z >> (8 * k)) & 0xff, c = (h.w >> (8 * k)) & 0xff;
    u32 sc = j < 4 ? (a & 63) : ((c & 15) | ((a >> 6) << 4));
    u32 m = j < 4 ? (b & 63) : ((c >> 4) | ((b >> 6) << 4));
    float d = h2f((u16)(h.x & 0xffff)), dmin = h2f((u16)(h.x >> 16));
    *dsc = d * (__int_as_float(0x4B000000u | sc) - QMAGIC);
    *dm = dmin * (__int_as_float(0x4B000000u | m) - QMAGIC);
}

// Q4_K (144-byte super-blocks of 256: f16 d, f16 dmin, 12 bytes of scales and mins, four groups
// of 32 bytes, low nibbles sub-block 2g, high nibbles 2g + 1): element 64 g + 32 h + l is nibble
// h of byte 32 g + l; piece 32 s + 8 g + 4 h + l / 8. w = d sc q - dmin m.
struct PQ4_K {
    static __device__ __forceinline__ void piece(const u8* row, int p, float* v) {
        const u8* s = row + (i64)(p >> 5) * 144;
        int q = p & 31, g = q >> 3, h = (q >> 2) & 1, l0 = 8 * (q & 3);
        uint4 hd = qldg128(s);
        float dsc, dm;
        q_scale_min(hd, 2 * g + h, &dsc, &dm);
        u32 q0 = qldg32(s + 16 + 32 * g + l0), q1 = qldg32(s + 20 + 32 * g + l0);
        int sh = 4 * h;
        q8bytes_dm((q0 >> sh) & 0x0F0F0F0Fu, (q1 >> sh) & 0x0F0F0F0Fu, dsc, -dm, v);
    }
};

// Q5_K (176-byte super-blocks: f16 d, f16 dmin, 12 bytes of scales, 32 bytes qh, 128 of nibbles
// as Q4_K): element 64 g + 32 h + l has bit 2 g + h of qh[l] as its fifth bit.
struct PQ5_K {
    static __device__ __forceinline__ void piece(const u8* row, int p, float* v) {
        const u8* s = row + (i64)(p >> 5) * 176;
        int q = p & 31, g = q >> 3, h = (q >> 2) & 1, l0 = 8 * (q & 3), sub = 2 * g + h;
        uint4 hd = qldg128(s);
        float dsc, dm;
        q_scale_min(hd, sub, &dsc, &dm);
        u32 h0 = qldg32(s + 16 + l0), h1 = qldg32(s + 20 + l0);
        u32 q0 = qldg32(s + 48 + 32 * g + l0), q1 = qldg32(s + 52 + 32 * g + l0);
        int sh = 4 * h;
        u32 lo = ((q0 >> sh) & 0x0F0F0F0Fu) | (((h0 >> sub) & 0x01010101u) << 4);
        u32 hi = ((q1 >> sh) & 0x0F0F0F0Fu) | (((h1 >> sub) & 0x01010101u) << 4);
        q8bytes_dm(lo, hi, dsc, -dm, v);
    }
};

// Q6_K (210-byte super-blocks: 128 bytes ql, 64 bytes qh, 16 int8 scales, f16 d): element
// 128 g + 32 k + e is nibble k >> 1 of ql[64 g + 32 (k & 1) + e] with bits 2k..2k+1 of qh[32 g +
// e] above it, minus 32, times d scale[8 g + 2 k + e / 16]; piece 32 s + 16 g + 4 k + e / 8.
struct PQ6_K {
    static __device__ __forceinline__ void piece(const u8* row, int p, float* v) {
        const u8* s = row + (i64)(p >> 5) * 210;
        int q = p & 31, g = q >> 4, k = (q >> 2) & 3, e0 = 8 * (q & 3);
        u32 ql[2], qh[2];
        q_words<2>(s + 64 * g + 32 * (k & 1) + e0, ql);
        q_words<2>(s + 128 + 32 * g + e0, qh);
        float sc = (float)(int)(i8)__ldg(s + 192 + 8 * g + 2 * k + (e0 >> 4));
        float d = h2f(qldg16(s + 208)) * sc;
        int sh = 4 * (k >> 1);
        u32 lo = ((ql[0] >> sh) & 0x0F0F0F0Fu) | (((qh[0] >> (2 * k)) & 0x03030303u) << 4);
        u32 hi = ((ql[1] >> sh) & 0x0F0F0F0Fu) | (((qh[1] >> (2 * k)) & 0x03030303u) << 4);
        q8bytes(lo, hi, 32.0f, d, v);
    }
};

// F32: two 16-byte loads (rows are 16-byte aligned when K is a multiple of 32).
struct PF32 {
    static __device__ __forceinline__ void piece(const u8* row, int p, float* v) {
        uint4 a = qldg128(row + (i64)p * 32), b = qldg128(row + (i64)p * 32 + 16);
        u32 w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = __int_as_float(w[i]);
    }
};

// F16 and BF16: 8 halves, one 16-byte load.
struct PF16 {
    static __device__ __forceinline__ void piece(const u8* row, int p, float* v) {
        uint4 h = qldg128(row + (i64)p * 16);
        u32 q[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[2 * i] = h2f((u16)(q[i] & 0xffff));
            v[2 * i + 1] = h2f((u16)(q[i] >> 16));
        }
    }
};
struct PBF16 {
    static __device__ __forceinline__ void piece(const u8* row, int p, float* v) {
        uint4 h = qldg128(row + (i64)p * 16);
        u32 q[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[2 * i] = __int_as_float(q[i] << 16);
            v[2 * i + 1] = __int_as_float(q[i] & 0xffff0000u);
        }
    }
};

// ---- The tiled kernel ----

// M weight matrices (1: y = x Wᵀ; 2: y = silu(x Gᵀ) * (x Uᵀ)), up to BR rows, TR rows a thread:
// (BR / TR) * 16 threads (the host's `TILED_TILES` must agree). `part` null: write y; else the
// partial sums of split blockIdx.y.
template <typename P, int BR, int TR, int M>
__device__ __forceinline__ void mmq_impl(const u8* __restrict__ w0, const u8* __restrict__ w1,
                                         const float* __restrict__ x, float* __restrict__ y,
                                         float* __restrict__ part, int R, int N, int K,
                                         i64 row_bytes, int chunk) {
    const int G = BR / TR, T = G * 16, PIECES = MMQ_BN * MMQ_BK / 8 / T;
    static_assert(G % 4 == 0 && BR % TR == 0, "a warp covers 4 row groups");
    __shared__ __align__(16) float ws[MMQ_BN * MMQ_LD];
    __shared__ __align__(16) float xs[BR * MMQ_LD];
    // A warp covers 8 column groups x 4 row groups (see the header: one wavefront per load).
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int tn = (lane & 7) + 8 * (warp & 1), tr = (lane >> 3) + 4 * (warp >> 1);
    const int n0 = blockIdx.x * (MMQ_BN / M);
    const int k_begin = blockIdx.y * chunk;
    const int k_end = min(K, k_begin + chunk);
    // The weight rows this thread decodes pieces of: tile row pi / 4 (past N: row N - 1,
    // decoded but never written out), piece pi % 4 of each slab.
    const u8* wrow[PIECES];
#pragma unroll
    for (int i = 0; i < PIECES; i++) {
        int n = (tid + i * T) >> 2;
        int col = n0 + (M == 1 ? n : (n & 31));
        col = col < N ? col : N - 1;
        wrow[i] = (M == 1 || n < 32 ? w0 : w1) + (i64)col * row_bytes;
    }
    float acc[TR][4];
#pragma unroll
    for (int i = 0; i < TR; i++)
#pragma unroll
        for (int c = 0; c < 4; c++) acc[i][c] = 0.0f;
    for (int k0 = k_begin; k0 < k_end; k0 += MMQ_BK) {
        // The slab of x (rows past R as zeros), then the decoded weights.
#pragma unroll
        for (int it = 0; it < BR * 8 / T; it++) {
            int idx = tid + it * T, r = idx >> 3, j = idx & 7;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (r < R) v = __ldg((const float4*)(x + (i64)r * K + k0 + 4 * j));
            *(float4*)&xs[r * MMQ_LD + 4 * j] = v;
        }
#pragma unroll
        for (int i = 0; i < PIECES; i++) {
            int pi = tid + i * T, n = pi >> 2, kp = pi & 3;
            float v[8];
            P::piece(wrow[i], (k0 >> 3) + kp, v);
            *(float4*)&ws[n * MMQ_LD + 8 * kp] = make_float4(v[0], v[1], v[2], v[3]);
            *(float4*)&ws[n * MMQ_LD + 8 * kp + 4] = make_float4(v[4], v[5], v[6], v[7]);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < MMQ_BK; kk += 4) {
            float4 a[TR];
#pragma unroll
            for (int i = 0; i < TR; i++) a[i] = *(const float4*)&xs[(tr + G * i) * MMQ_LD + kk];
#pragma unroll
            for (int c = 0; c < 4; c++) {
                float4 b = *(const float4*)&ws[(tn + 16 * c) * MMQ_LD + kk];
#pragma unroll
                for (int i = 0; i < TR; i++) {
                    acc[i][c] = fmaf(a[i].x, b.x, acc[i][c]);
                    acc[i][c] = fmaf(a[i].y, b.y, acc[i][c]);
                    acc[i][c] = fmaf(a[i].z, b.z, acc[i][c]);
                    acc[i][c] = fmaf(a[i].w, b.w, acc[i][c]);
                }
            }
        }
        __syncthreads();
    }
    const i64 RN = (i64)R * N;
#pragma unroll
    for (int i = 0; i < TR; i++) {
        int r = tr + G * i;
        if (r >= R) continue;
        if (M == 1) {
#pragma unroll
            for (int c = 0; c < 4; c++) {
                int n = n0 + tn + 16 * c;
                if (n >= N) continue;
                if (part)
                    part[blockIdx.y * RN + (i64)r * N + n] = acc[i][c];
                else
                    y[(i64)r * N + n] = acc[i][c];
            }
        } else {
#pragma unroll
            for (int c = 0; c < 2; c++) {
                int n = n0 + tn + 16 * c;
                if (n >= N) continue;
                if (part) {
                    part[2 * blockIdx.y * RN + (i64)r * N + n] = acc[i][c];
                    part[(2 * blockIdx.y + 1) * RN + (i64)r * N + n] = acc[i][c + 2];
                } else {
                    y[(i64)r * N + n] = silu1(acc[i][c]) * acc[i][c + 2];
                }
            }
        }
    }
}

// No __launch_bounds__ (ptxas would trade registers for occupancy).
#define MMQ_R(name, P, BR, TR)                                                                \
    extern "C" __global__ void mmq_##name##_r##BR(const u8* w, const float* x, float* y,      \
                                                  float* part, int R, int N, int K,           \
                                                  i64 row_bytes, int chunk) {                 \
        mmq_impl<P, BR, TR, 1>(w, w, x, y, part, R, N, K, row_bytes, chunk);                  \
    }                                                                                         \
    extern "C" __global__ void gate_up_mmq_##name##_r##BR(                                    \
        const u8* wg, const u8* wu, const float* x, float* y, float* part, int R, int N,      \
        int K, i64 row_bytes, int chunk) {                                                    \
        mmq_impl<P, BR, TR, 2>(wg, wu, x, y, part, R, N, K, row_bytes, chunk);                \
    }
// Rows a thread per row tile: 4 (4 x 4 outputs, 4 BR threads a block); 8 halves the x loads
// per FMA at half the threads (BR = 32 or 64 only; change `TILED_TILES` in matmul.rs with it).
#define MMQ(name, P) MMQ_R(name, P, 16, 4) MMQ_R(name, P, 32, 4) MMQ_R(name, P, 64, 4)

MMQ(f32, PF32)
MMQ(f16, PF16)
MMQ(bf16, PBF16)
MMQ(q4_0, PQ4_0)
MMQ(q4_1, PQ4_1)
MMQ(q5_0, PQ5_0)
MMQ(q5_1, PQ5_1)
MMQ(q8_0, PQ8_0)
MMQ(q4_k, PQ4_K)
MMQ(q5_k, PQ5_K)
MMQ(q6_k, PQ6_K)

// y[i] = the sum of the S partials part[s][0][i] in split order (i < RN = R * N); gate/up:
// silu(that of part[s][0]) * that of part[s][1]. Grid: ceil(RN / 256); block: 256.
extern "C" __global__ void mmq_reduce_m1(const float* __restrict__ part, float* __restrict__ y,
                                         long long RN, int S) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= RN) return;
    float a = part[i];
    for (int s = 1; s < S; s++) a += part[s * RN + i];
    y[i] = a;
}
extern "C" __global__ void mmq_reduce_m2(const float* __restrict__ part, float* __restrict__ y,
                                         long long RN, int S) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= RN) return;
    float g = part[i], u = part[RN + i];
    for (int s = 1; s < S; s++) {
        g += part[2 * s * RN + i];
        u += part[(2 * s + 1) * RN + i];
    }
    y[i] = silu1(g) * u;
}
