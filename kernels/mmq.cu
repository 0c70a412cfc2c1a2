// Tiled matmuls on weights in their GGUF storage type, for the middle row counts (batched decode
// of 9 to 64 sequences): y[r, n] = sum_k x[r, k] w[n, k] (y = x Wᵀ), x [R, K] and y [R, N]
// row-major FP32, W [N, K] in the block layout of its type.
//
// mmq_<ty>_r<BR> (R <= BR rows, BR = 16, 32 or 64; 4 BR threads): a block computes all R rows
// of 128 output columns over one K-range (`chunk` elements, split `blockIdx.y`). It walks the
// range in slabs of 32 k: the threads decode the 128 weight rows' 32 elements ONCE into shared
// memory as FP32 (scale applied; pieces of 8 consecutive elements, four threads to a row's 32)
// and copy the slab of x beside them, both transposed (k-major: ws[k][n], xs[k][r]); then each
// thread runs an outer product: per k one float4 of x (its 4 rows) and two float4 of W (its 8
// columns) feed 32 FMAs. So the decode is paid once per weight per launch (amortized over the
// rows), and the inner loop is 32 FMAs to 3 shared loads. The next slab's global loads (the raw
// block bytes: each decoder is split into `load` and `decode`, and x) are issued before the
// current slab's FMAs and decoded after them, so their latency hides behind the arithmetic.
// FP32 arithmetic only (legal for sm_52).
//
// Layout and banks. A thread (column group cg < 16, row group rg < BR / 4) owns rows 4 rg .. +4
// and columns 4 cg .. +4 and 64 + 4 cg .. +4; a warp holds 8 consecutive column groups and 4
// consecutive row groups, so each shared load of the inner loop reads 4 or 8 distinct float4
// in distinct banks (one wavefront). Both tiles are swizzled so that the transposed stores are
// conflict-free too: element (k, n) of W lives at ws[k][n ^ 8 ((k / 8) % 4)] (the four threads
// decoding a row's 32 k write their 8 rows into four different 8-column groups), element (k, r)
// of x at xs[k][r ^ 4 ((k / 4) & SW)] (SW = min(7, BR / 4 - 1)). The swizzles flip bits 2 and
// up, so a thread's float4 stays contiguous.
//
// gate_up_mmq_<ty>_r<BR>: the same with two matrices, 64 columns of each per block (tile columns
// 0..64 the gate's columns n0.., 64..128 the up's same columns), so a thread holds the gate and
// the up sum of its 4 columns and applies silu(g) * u itself.
//
// Split K: grid (ceil(N / columns), S). With S = 1 a block writes y; with S > 1 it writes its
// partial sums to part [S][M][R][N] (M = 1, or 2 for gate/up) and mmq_reduce_m<M> sums the S
// partials in split order (then applies silu(g) * u for gate/up). Every output is one FMA chain
// over its split's k in increasing order, by one thread, whatever R and BR are, and the host
// picks S from N, K and the device alone: a row's result is bit for bit the same in every batch
// of 9 to 64 rows (and in every 64-row chunk of a larger one). It is not the unit kernels'
// (kernels/matvec.cu) sum order, so 8 rows and 9 rows differ in the last bits.
#include "common.cuh"

#define MMQ_BN 128
#define MMQ_BK 32

__device__ __forceinline__ u32 qldg32(const u8* p) { return __ldg((const unsigned int*)p); }
__device__ __forceinline__ u16 qldg16(const u8* p) { return __ldg((const unsigned short*)p); }
__device__ __forceinline__ uint4 qldg128(const u8* p) { return __ldg((const uint4*)p); }

// `WORDS` little-endian words starting at byte `p` (any alignment), loaded as aligned words
// (the last one is the word holding the last byte: nothing past the field is read): `load`
// issues the loads, `get` funnels them into place once they are needed.
template <int WORDS>
struct QWords {
    u32 w[WORDS + 1];
    u32 sh;
    __device__ __forceinline__ void load(const u8* p) {
        size_t a = (size_t)p;
        const u8* base = (const u8*)(a & ~(size_t)3);
        sh = (u32)(a & 3) * 8;
#pragma unroll
        for (int i = 0; i < WORDS; i++) w[i] = qldg32(base + 4 * i);
        w[WORDS] = qldg32((const u8*)((a + 4 * WORDS - 1) & ~(size_t)3));
    }
    __device__ __forceinline__ u32 get(int i) const { return __funnelshift_r(w[i], w[i + 1], sh); }
};

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

// ---- Piece decoders: piece p of a row is its elements 8p..8p + 8, scaled: v[i] = w[8p + i].
// `load(row, p)` issues the piece's global loads into the struct's registers and nothing else;
// `decode(p, v)` turns them into the 8 floats (the tiled kernel puts a slab of FMAs between the
// two). ----

// Q4_0 (18-byte blocks: f16 d, 16 bytes of nibbles; element j < 16 the low nibble of byte j,
// 16 + j its high nibble): piece 4b + j is the low (j < 2) or high nibbles of bytes 8 (j & 1)...
struct PQ4_0 {
    QWords<2> q;
    u16 d;
    __device__ __forceinline__ void load(const u8* row, int p) {
        const u8* b = row + (i64)(p >> 2) * 18;
        q.load(b + 2 + 8 * (p & 1));
        d = qldg16(b);
    }
    __device__ __forceinline__ void decode(int p, float* v) const {
        int sh = 4 * ((p & 3) >> 1);
        q8bytes((q.get(0) >> sh) & 0x0F0F0F0Fu, (q.get(1) >> sh) & 0x0F0F0F0Fu, 8.0f, h2f(d), v);
    }
};

// Q4_1 (20-byte blocks: f16 d, f16 m, nibbles as Q4_0): w = d q + m.
struct PQ4_1 {
    u32 dm, q0, q1;
    __device__ __forceinline__ void load(const u8* row, int p) {
        const u8* b = row + (i64)(p >> 2) * 20;
        dm = qldg32(b);
        q0 = qldg32(b + 4 + 8 * (p & 1));
        q1 = qldg32(b + 8 + 8 * (p & 1));
    }
    __device__ __forceinline__ void decode(int p, float* v) const {
        int sh = 4 * ((p & 3) >> 1);
        q8bytes_dm((q0 >> sh) & 0x0F0F0F0Fu, (q1 >> sh) & 0x0F0F0F0Fu, h2f((u16)(dm & 0xffff)),
                   h2f((u16)(dm >> 16)), v);
    }
};

// Q5_0 (22-byte blocks: f16 d, u32 qh (bit e: element e's fifth bit), nibbles as Q4_0): w = d
// (q - 16).
struct PQ5_0 {
    QWords<1> qh;
    QWords<2> q;
    u16 d;
    __device__ __forceinline__ void load(const u8* row, int p) {
        const u8* b = row + (i64)(p >> 2) * 22;
        qh.load(b + 2);
        q.load(b + 6 + 8 * (p & 1));
        d = qldg16(b);
    }
    __device__ __forceinline__ void decode(int p, float* v) const {
        int j = p & 3, sh = 4 * (j >> 1);
        u32 hb = qh.get(0) >> (8 * j);
        u32 lo = ((q.get(0) >> sh) & 0x0F0F0F0Fu) | (spread4(hb) << 4);
        u32 hi = ((q.get(1) >> sh) & 0x0F0F0F0Fu) | (spread4(hb >> 4) << 4);
        q8bytes(lo, hi, 16.0f, h2f(d), v);
    }
};

// Q5_1 (24-byte blocks: f16 d, f16 m, u32 qh, nibbles): w = d q + m.
struct PQ5_1 {
    u32 dm, qh, q0, q1;
    __device__ __forceinline__ void load(const u8* row, int p) {
        const u8* b = row + (i64)(p >> 2) * 24;
        dm = qldg32(b);
        qh = qldg32(b + 4);
        q0 = qldg32(b + 8 + 8 * (p & 1));
        q1 = qldg32(b + 12 + 8 * (p & 1));
    }
    __device__ __forceinline__ void decode(int p, float* v) const {
        int j = p & 3, sh = 4 * (j >> 1);
        u32 hb = qh >> (8 * j);
        u32 lo = ((q0 >> sh) & 0x0F0F0F0Fu) | (spread4(hb) << 4);
        u32 hi = ((q1 >> sh) & 0x0F0F0F0Fu) | (spread4(hb >> 4) << 4);
        q8bytes_dm(lo, hi, h2f((u16)(dm & 0xffff)), h2f((u16)(dm >> 16)), v);
    }
};

// Q8_0 (34-byte blocks: f16 d, 32 int8): the bytes flipped to unsigned (x ^ 0x80 = x + 128).
struct PQ8_0 {
    QWords<2> q;
    u16 d;
    __device__ __forceinline__ void load(const u8* row, int p) {
        const u8* b = row + (i64)(p >> 2) * 34;
        q.load(b + 2 + 8 * (p & 3));
        d = qldg16(b);
    }
    __device__ __forceinline__ void decode(int, float* v) const {
        q8bytes(q.get(0) ^ 0x80808080u, q.get(1) ^ 0x80808080u, 128.0f, h2f(d), v);
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
    uint4 hd;
    u32 q0, q1;
    __device__ __forceinline__ void load(const u8* row, int p) {
        const u8* s = row + (i64)(p >> 5) * 144;
        int q = p & 31, g = q >> 3, l0 = 8 * (q & 3);
        hd = qldg128(s);
        q0 = qldg32(s + 16 + 32 * g + l0);
        q1 = qldg32(s + 20 + 32 * g + l0);
    }
    __device__ __forceinline__ void decode(int p, float* v) const {
        int q = p & 31, g = q >> 3, h = (q >> 2) & 1;
        float dsc, dm;
        q_scale_min(hd, 2 * g + h, &dsc, &dm);
        int sh = 4 * h;
        q8bytes_dm((q0 >> sh) & 0x0F0F0F0Fu, (q1 >> sh) & 0x0F0F0F0Fu, dsc, -dm, v);
    }
};

// Q5_K (176-byte super-blocks: f16 d, f16 dmin, 12 bytes of scales, 32 bytes qh, 128 of nibbles
// as Q4_K): element 64 g + 32 h + l has bit 2 g + h of qh[l] as its fifth bit.
struct PQ5_K {
    uint4 hd;
    u32 h0, h1, q0, q1;
    __device__ __forceinline__ void load(const u8* row, int p) {
        const u8* s = row + (i64)(p >> 5) * 176;
        int q = p & 31, g = q >> 3, l0 = 8 * (q & 3);
        hd = qldg128(s);
        h0 = qldg32(s + 16 + l0);
        h1 = qldg32(s + 20 + l0);
        q0 = qldg32(s + 48 + 32 * g + l0);
        q1 = qldg32(s + 52 + 32 * g + l0);
    }
    __device__ __forceinline__ void decode(int p, float* v) const {
        int q = p & 31, g = q >> 3, h = (q >> 2) & 1, sub = 2 * g + h;
        float dsc, dm;
        q_scale_min(hd, sub, &dsc, &dm);
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
    QWords<2> ql, qh;
    u8 sc;
    u16 d;
    __device__ __forceinline__ void load(const u8* row, int p) {
        const u8* s = row + (i64)(p >> 5) * 210;
        int q = p & 31, g = q >> 4, k = (q >> 2) & 3, e0 = 8 * (q & 3);
        ql.load(s + 64 * g + 32 * (k & 1) + e0);
        qh.load(s + 128 + 32 * g + e0);
        sc = __ldg(s + 192 + 8 * g + 2 * k + (e0 >> 4));
        d = qldg16(s + 208);
    }
    __device__ __forceinline__ void decode(int p, float* v) const {
        int k = (p >> 2) & 3, sh = 4 * (k >> 1);
        float dd = h2f(d) * (float)(int)(i8)sc;
        u32 lo = ((ql.get(0) >> sh) & 0x0F0F0F0Fu) | (((qh.get(0) >> (2 * k)) & 0x03030303u) << 4);
        u32 hi = ((ql.get(1) >> sh) & 0x0F0F0F0Fu) | (((qh.get(1) >> (2 * k)) & 0x03030303u) << 4);
        q8bytes(lo, hi, 32.0f, dd, v);
    }
};

// F32: two 16-byte loads (rows are 16-byte aligned when K is a multiple of 32).
struct PF32 {
    uint4 a, b;
    __device__ __forceinline__ void load(const u8* row, int p) {
        a = qldg128(row + (i64)p * 32);
        b = qldg128(row + (i64)p * 32 + 16);
    }
    __device__ __forceinline__ void decode(int, float* v) const {
        u32 w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = __int_as_float(w[i]);
    }
};

// F16 and BF16: 8 halves, one 16-byte load.
struct PF16 {
    uint4 h;
    __device__ __forceinline__ void load(const u8* row, int p) { h = qldg128(row + (i64)p * 16); }
    __device__ __forceinline__ void decode(int, float* v) const {
        u32 q[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[2 * i] = h2f((u16)(q[i] & 0xffff));
            v[2 * i + 1] = h2f((u16)(q[i] >> 16));
        }
    }
};
struct PBF16 {
    uint4 h;
    __device__ __forceinline__ void load(const u8* row, int p) { h = qldg128(row + (i64)p * 16); }
    __device__ __forceinline__ void decode(int, float* v) const {
        u32 q[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[2 * i] = __int_as_float(q[i] << 16);
            v[2 * i + 1] = __int_as_float(q[i] & 0xffff0000u);
        }
    }
};

// ---- The tiled kernel ----

// Stores 4 consecutive floats of y (or a split's partials) at row offset `at`, columns n..n+4:
// one float4 where all four exist and the address is 16-byte aligned (N a multiple of 4), else
// one by one up to N.
__device__ __forceinline__ void mmq_store4(float* out, i64 at, int n, int N, float4 v) {
    if (n + 3 < N && (N & 3) == 0) {
        *(float4*)(out + at + n) = v;
        return;
    }
    float e[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int c = 0; c < 4; c++)
        if (n + c < N) out[at + n + c] = e[c];
}

// M weight matrices (1: y = x Wᵀ; 2: y = silu(x Gᵀ) * (x Uᵀ)), up to BR rows, 4 BR threads
// (the host's `TILED_TILES` must agree). `part` null: write y; else the partial sums of split
// blockIdx.y.
template <typename P, int BR, int M>
__device__ __forceinline__ void mmq_impl(const u8* __restrict__ w0, const u8* __restrict__ w1,
                                         const float* __restrict__ x, float* __restrict__ y,
                                         float* __restrict__ part, int R, int N, int K,
                                         i64 row_bytes, int chunk) {
    const int T = 4 * BR, PIECES = MMQ_BN * MMQ_BK / 8 / T, XLOADS = BR * MMQ_BK / 4 / T;
    const int SW = BR / 4 - 1 < 7 ? BR / 4 - 1 : 7;
    static_assert(BR % 16 == 0, "a warp covers 4 row groups");
    static_assert(PIECES * T * 8 == MMQ_BN * MMQ_BK && XLOADS * T * 4 == BR * MMQ_BK,
                  "the block's load shares");
    __shared__ __align__(16) float ws[MMQ_BK * MMQ_BN];
    __shared__ __align__(16) float xs[MMQ_BK * BR];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // A warp covers 8 column groups x 4 row groups (see the header: distinct banks a load).
    const int cg = (lane & 7) + 8 * (warp & 1), rg = (lane >> 3) + 4 * (warp >> 1);
    const int n0 = blockIdx.x * (MMQ_BN / M);
    const int k_begin = blockIdx.y * chunk;
    const int k_end = min(K, k_begin + chunk);
    // This thread decodes piece kp (of 4 in a slab) of tile rows tid / 4 + (T / 4) i (past N:
    // row N - 1, decoded but never written out), and copies x row tid / 8 + (T / 8) i's float4
    // xj of each slab.
    const int kp = tid & 3, xj = tid & 7;
    const u8* wrow[PIECES];
#pragma unroll
    for (int i = 0; i < PIECES; i++) {
        int n = (tid >> 2) + i * (T / 4);
        int col = n0 + (M == 1 ? n : (n & 63));
        col = col < N ? col : N - 1;
        wrow[i] = (M == 1 || n < 64 ? w0 : w1) + (i64)col * row_bytes;
    }
    P raw[PIECES];
    float4 xv[XLOADS];
    // Issues slab k0's global loads into raw and xv.
    auto stage = [&](int k0) {
#pragma unroll
        for (int i = 0; i < PIECES; i++) raw[i].load(wrow[i], (k0 >> 3) + kp);
#pragma unroll
        for (int i = 0; i < XLOADS; i++) {
            int r = (tid >> 3) + i * (T / 8);
            xv[i] = r < R ? __ldg((const float4*)(x + (i64)r * K + k0 + 4 * xj))
                          : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
    };
    // acc[i][c]: row 4 rg + i, column c < 4: 4 cg + c, else 64 + 4 cg + c - 4.
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int c = 0; c < 8; c++) acc[i][c] = 0.0f;
    if (k_begin < k_end) stage(k_begin);
    for (int k0 = k_begin; k0 < k_end; k0 += MMQ_BK) {
        __syncthreads();  // the previous slab's FMAs are done with the tiles
#pragma unroll
        for (int i = 0; i < PIECES; i++) {
            int n = ((tid >> 2) + i * (T / 4)) ^ (kp << 3);
            float v[8];
            raw[i].decode((k0 >> 3) + kp, v);
#pragma unroll
            for (int e = 0; e < 8; e++) ws[(8 * kp + e) * MMQ_BN + n] = v[e];
        }
#pragma unroll
        for (int i = 0; i < XLOADS; i++) {
            int r = ((tid >> 3) + i * (T / 8)) ^ ((xj & SW) << 2);
            xs[(4 * xj + 0) * BR + r] = xv[i].x;
            xs[(4 * xj + 1) * BR + r] = xv[i].y;
            xs[(4 * xj + 2) * BR + r] = xv[i].z;
            xs[(4 * xj + 3) * BR + r] = xv[i].w;
        }
        __syncthreads();
        // The next slab's loads fly while this one's FMAs run.
        if (k0 + MMQ_BK < k_end) stage(k0 + MMQ_BK);
#pragma unroll
        for (int k = 0; k < MMQ_BK; k++) {
            int wc = (4 * cg) ^ (((k >> 3) & 3) << 3);
            float4 b0 = *(const float4*)&ws[k * MMQ_BN + wc];
            float4 b1 = *(const float4*)&ws[k * MMQ_BN + 64 + wc];
            float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
            float4 a = *(const float4*)&xs[k * BR + 4 * (rg ^ ((k >> 2) & SW))];
            float av[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int c = 0; c < 8; c++) acc[i][c] = fmaf(av[i], bv[c], acc[i][c]);
        }
    }
    const i64 RN = (i64)R * N;
    const int n = n0 + 4 * cg;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int r = 4 * rg + i;
        if (r >= R) continue;
        const float* a = acc[i];
        if (M == 1) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                float4 v = make_float4(a[4 * h], a[4 * h + 1], a[4 * h + 2], a[4 * h + 3]);
                if (part)
                    mmq_store4(part, blockIdx.y * RN + (i64)r * N, n + 64 * h, N, v);
                else
                    mmq_store4(y, (i64)r * N, n + 64 * h, N, v);
            }
        } else if (part) {
            mmq_store4(part, 2 * blockIdx.y * RN + (i64)r * N, n, N,
                       make_float4(a[0], a[1], a[2], a[3]));
            mmq_store4(part, (2 * blockIdx.y + 1) * RN + (i64)r * N, n, N,
                       make_float4(a[4], a[5], a[6], a[7]));
        } else {
            mmq_store4(y, (i64)r * N, n, N,
                       make_float4(silu1(a[0]) * a[4], silu1(a[1]) * a[5], silu1(a[2]) * a[6],
                                   silu1(a[3]) * a[7]));
        }
    }
}

// No __launch_bounds__ (ptxas would trade registers for occupancy).
#define MMQ_R(name, P, BR)                                                                    \
    extern "C" __global__ void mmq_##name##_r##BR(const u8* w, const float* x, float* y,      \
                                                  float* part, int R, int N, int K,           \
                                                  i64 row_bytes, int chunk) {                 \
        mmq_impl<P, BR, 1>(w, w, x, y, part, R, N, K, row_bytes, chunk);                      \
    }                                                                                         \
    extern "C" __global__ void gate_up_mmq_##name##_r##BR(                                    \
        const u8* wg, const u8* wu, const float* x, float* y, float* part, int R, int N,      \
        int K, i64 row_bytes, int chunk) {                                                    \
        mmq_impl<P, BR, 2>(wg, wu, x, y, part, R, N, K, row_bytes, chunk);                    \
    }
// 4 rows x 8 columns a thread. 8 x 8 (4 shared loads per 64 FMAs where 4 x 8 take 3 per 32)
// measured slower on the H200 (4096 x 4096 Q4_0 at 32 rows 0.050 ms against 0.047, at 64 0.088
// against 0.074: 160-250 registers, half the threads a block).
#define MMQ(name, P) MMQ_R(name, P, 16) MMQ_R(name, P, 32) MMQ_R(name, P, 64)

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
