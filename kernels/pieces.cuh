// Piece decoders of every weight type, shared by the tiled kernels (kernels/mmq.cu: FP32 FMAs,
// any GPU) and the tensor-core tiled kernels (kernels/mmqt.cu, sm_80+): piece p of a weight row
// is its elements 8p .. 8p + 8. `load(row, p)` issues the piece's global loads into the struct's
// registers and nothing else; `decode(p, v)` turns them into the 8 scaled floats (a kernel puts
// other work between the two, so the loads' latency hides behind it). FP32 arithmetic only.
#pragma once
#include "common.cuh"

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

// ---- Piece decoders (v[i] = w[8p + i]) ----

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
