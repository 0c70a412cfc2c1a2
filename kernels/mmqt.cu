// Tensor-core tiled matmuls on weights in their GGUF storage type, for batched decode of 8 to 64
// rows (the host's TC_MIN_ROWS; the kernels take any count up to 64) on sm_80 and newer: the best
// path of `GemmPrecision::Tf32` (src/backend/cuda/matmul.rs).
// y[r, n] = sum_k x[r, k] w[n, k] (y = x Wᵀ), x [R, K] and y [R, N] row-major FP32, W [N, K] in
// the block layout of its type. On older GPUs (and for sm_52, which CI compiles) the kernels are
// empty and never launched: the host takes them only on sm_80+ with TF32 asked for.
//
// mmqt_<ty>_r<8 NT> (R <= 8 NT rows; 128 threads): a block computes R rows of 128 output columns
// over one K-range (`chunk` elements, split `blockIdx.y`), a warp 32 of the columns as two
// m-tiles of 16. The product is transposed (yᵀ = W xᵀ) so that the weights are the MMA's A
// operand, 16 columns a tile, and the rows its N = 8: `mma.sync.m16n8k8` with TF32 operands
// (10-bit mantissas, rounded to nearest by cvt.rna) and FP32 accumulators. No shared memory:
// each thread decodes its A fragments straight from the blocks with the piece decoders
// (kernels/pieces.cuh) and reads its B fragments from x through L1.
//
// The k order inside an MMA is free (the sum is the same whatever the permutation, so long as A
// and B agree), and it is chosen so that a thread's operands are whole pieces: in a slab of 32 k,
// lane (g = lane / 4, t = lane % 4) holds piece t (elements 8t .. 8t + 8) of weight rows g and
// g + 8, and of x row g of each n-tile. MMA step s < 4 of the slab takes, for the fragment's
// logical k = t, element 8t + 2s, and for k = t + 4, element 8t + 2s + 1; so every element of
// the slab is in exactly one step, and the 8 x floats a thread needs for a slab are two float4.
// The accumulator fragment: c0, c1 are weight row g at x rows 2t, 2t + 1; c2, c3 weight row g + 8.
//
// gate_up_mmqt_<ty>_r<8 NT>: the same over two matrices, 64 columns of each a block: a warp's
// m-tile 0 holds 16 gate columns and m-tile 1 the up's same columns, so a thread has the gate
// and up sums of each of its outputs and applies silu(g) * u itself.
//
// Split K as the FP32 tiled kernels (kernels/mmq.cu): with S > 1 splits the partial sums go to
// part [S][M][R][N] and mmq_reduce_m<M> (same layout) sums them in split order. Each output's
// arithmetic is its split's MMAs in slab order and depends on its own weight row and x row only,
// with the split picked from N, K and the device: a row's result is bit for bit the same in every
// batch of up to 64 rows (measured on the H200 from 2 rows up).
#include "pieces.cuh"

#define MMQT_BN 128
#define MMQT_BK 32

#if defined(M40LLM_HOST) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define MMQT_TENSOR_CORES 1
#endif

#ifdef MMQT_TENSOR_CORES
// v rounded to TF32 (nearest, ties away from zero), as a 32-bit register.
__device__ __forceinline__ u32 mmqt_tf32(float v) {
#ifdef M40LLM_HOST
    u32 b = (u32)__float_as_int(v);
    return (b + 0x1000u) & 0xffffe000u;
#else
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
#endif
}

// c += A B for one m16n8k8 TF32 MMA: a the thread's A fragment (a0 row g k t, a1 row g + 8 k t,
// a2 row g k t + 4, a3 row g + 8 k t + 4), b0 / b1 its B fragment (k t / t + 4, column g), c its
// accumulators (row g columns 2t, 2t + 1, then row g + 8). The host harness gathers the operands
// with shuffles and sums in FP32.
__device__ __forceinline__ void mmqt_mma(float* c, const u32* a, u32 b0, u32 b1) {
#ifdef M40LLM_HOST
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float ar[2][8], bc[2][8];
    for (int j = 0; j < 4; j++) {
        ar[0][j] = __int_as_float(__shfl_sync(FULL_MASK, a[0], 4 * g + j));
        ar[1][j] = __int_as_float(__shfl_sync(FULL_MASK, a[1], 4 * g + j));
        ar[0][j + 4] = __int_as_float(__shfl_sync(FULL_MASK, a[2], 4 * g + j));
        ar[1][j + 4] = __int_as_float(__shfl_sync(FULL_MASK, a[3], 4 * g + j));
        for (int h = 0; h < 2; h++) {
            bc[h][j] = __int_as_float(__shfl_sync(FULL_MASK, b0, 4 * (2 * t + h) + j));
            bc[h][j + 4] = __int_as_float(__shfl_sync(FULL_MASK, b1, 4 * (2 * t + h) + j));
        }
    }
    for (int i = 0; i < 2; i++)
        for (int h = 0; h < 2; h++) {
            float s = 0.0f;
            for (int k = 0; k < 8; k++) s = fmaf(ar[i][k], bc[h][k], s);
            c[2 * i + h] += s;
        }
#else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
#endif

// M weight matrices (1: y = x Wᵀ; 2: y = silu(x Gᵀ) * (x Uᵀ)), up to 8 NT rows, 128 threads.
// `part` null: write y; else the partial sums of split blockIdx.y.
template <typename P, int NT, int M>
__device__ __forceinline__ void mmqt_impl(const u8* __restrict__ w0, const u8* __restrict__ w1,
                                          const float* __restrict__ x, float* __restrict__ y,
                                          float* __restrict__ part, int R, int N, int K,
                                          i64 row_bytes, int chunk) {
#ifdef MMQT_TENSOR_CORES
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    // The warp's first column: M = 1, m-tile mt covers n0 + 16 mt ..; M = 2, both m-tiles n0 ..
    const int n0 = blockIdx.x * (MMQT_BN / M) + warp * (MMQT_BN / M / 4);
    const int k_begin = blockIdx.y * chunk;
    const int k_end = min(K, k_begin + chunk);
    // wrow[mt][h]: weight row g + 8 h of m-tile mt (past N: row N - 1, never written out).
    const u8* wrow[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int col = n0 + (M == 1 ? 16 * mt : 0) + g + 8 * h;
            col = col < N ? col : N - 1;
            wrow[mt][h] = (M == 1 || mt == 0 ? w0 : w1) + (i64)col * row_bytes;
        }
    P raw[2][2];
    auto stage = [&](int k0) {
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int h = 0; h < 2; h++) raw[mt][h].load(wrow[mt][h], (k0 >> 3) + t);
    };
    float acc[2][NT][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[mt][j][i] = 0.0f;
    if (k_begin < k_end) stage(k_begin);
    for (int k0 = k_begin; k0 < k_end; k0 += MMQT_BK) {
        // a[mt][h][e]: element 8t + e of the slab in weight row g + 8 h of m-tile mt.
        u32 a[2][2][8];
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                float v[8];
                raw[mt][h].decode((k0 >> 3) + t, v);
#pragma unroll
                for (int e = 0; e < 8; e++) a[mt][h][e] = mmqt_tf32(v[e]);
            }
        // The next slab's weight loads fly while this one's MMAs run.
        if (k0 + MMQT_BK < k_end) stage(k0 + MMQT_BK);
#pragma unroll
        for (int j = 0; j < NT; j++) {
            const int r = 8 * j + g;
            float4 x0 = make_float4(0.0f, 0.0f, 0.0f, 0.0f), x1 = x0;
            if (r < R) {
                const float* xp = x + (i64)r * K + k0 + 8 * t;
                x0 = __ldg((const float4*)xp);
                x1 = __ldg((const float4*)(xp + 4));
            }
            const u32 b[8] = {mmqt_tf32(x0.x), mmqt_tf32(x0.y), mmqt_tf32(x0.z), mmqt_tf32(x0.w),
                              mmqt_tf32(x1.x), mmqt_tf32(x1.y), mmqt_tf32(x1.z), mmqt_tf32(x1.w)};
#pragma unroll
            for (int s = 0; s < 4; s++)
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    const u32 f[4] = {a[mt][0][2 * s], a[mt][1][2 * s], a[mt][0][2 * s + 1],
                                      a[mt][1][2 * s + 1]};
                    mmqt_mma(acc[mt][j], f, b[2 * s], b[2 * s + 1]);
                }
        }
    }
    const i64 RN = (i64)R * N;
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int r = 8 * j + 2 * t + (i & 1), c = g + 8 * (i >> 1);
            if (r >= R) continue;
            if (M == 1) {
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    const int n = n0 + 16 * mt + c;
                    if (n >= N) continue;
                    if (part)
                        part[blockIdx.y * RN + (i64)r * N + n] = acc[mt][j][i];
                    else
                        y[(i64)r * N + n] = acc[mt][j][i];
                }
            } else {
                const int n = n0 + c;
                if (n >= N) continue;
                if (part) {
                    part[2 * blockIdx.y * RN + (i64)r * N + n] = acc[0][j][i];
                    part[(2 * blockIdx.y + 1) * RN + (i64)r * N + n] = acc[1][j][i];
                } else {
                    y[(i64)r * N + n] = silu1(acc[0][j][i]) * acc[1][j][i];
                }
            }
        }
#endif
}

#define MMQT_R(name, P, ROWS)                                                                    \
    extern "C" __global__ void __launch_bounds__(128)                                          \
        mmqt_##name##_r##ROWS(const u8* w, const float* x, float* y, float* part, int R, int N,  \
                            int K, i64 row_bytes, int chunk) {                                 \
        mmqt_impl<P, ROWS / 8, 1>(w, w, x, y, part, R, N, K, row_bytes, chunk);                  \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(128) gate_up_mmqt_##name##_r##ROWS(             \
        const u8* wg, const u8* wu, const float* x, float* y, float* part, int R, int N,       \
        int K, i64 row_bytes, int chunk) {                                                     \
        mmqt_impl<P, ROWS / 8, 2>(wg, wu, x, y, part, R, N, K, row_bytes, chunk);                \
    }
#define MMQT(name, P) MMQT_R(name, P, 8) MMQT_R(name, P, 16) MMQT_R(name, P, 32) MMQT_R(name, P, 64)

MMQT(f32, PF32)
MMQT(f16, PF16)
MMQT(bf16, PBF16)
MMQT(q4_0, PQ4_0)
MMQT(q4_1, PQ4_1)
MMQT(q5_0, PQ5_0)
MMQT(q5_1, PQ5_1)
MMQT(q8_0, PQ8_0)
MMQT(q4_k, PQ4_K)
MMQT(q5_k, PQ5_K)
MMQT(q6_k, PQ6_K)
