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
#include "pieces.cuh"

#define MMQ_BN 128
#define MMQ_BK 32

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
