// Causal grouped-query attention over the paged FP16 KV cache (src/ir/op.rs AttentionParams).
// K and V are FP16 in [n_cells, n_kv_heads * head_dim]; the cell of position p of a slot is
// tables[slot * table_stride + p / page_size] * page_size + p % page_size. Token t (query row t)
// attends positions lo..=pos[t] of its slot, lo = 0, or pos[t] + 1 - window with a sliding
// window (window > 0). Scores s = scale * q·k, softmax with the max subtracted, all in FP32.
#include "common.cuh"

#define MAX_D 256

__device__ __forceinline__ i64 attn_cell(const int* tables, int table_stride, int slot, int p,
                                         int page_size) {
    return (i64)tables[(i64)slot * table_stride + p / page_size] * page_size + p % page_size;
}

__device__ __forceinline__ int attn_lo(int p, int window) {
    return window > 0 && p + 1 > window ? p + 1 - window : 0;
}

// ---- Decode: flash-decoding. The context of each (token, query head) is split into chunks,
// one block per (G query heads of one KV head, token, chunk): the block reads each K and V row
// of its chunk once for all G heads of the group (GQA: H / Hkv query heads share a KV head), so
// the cache is read H / Hkv / G times in all instead of H / Hkv times. A warp walks its chunk
// LP lanes to a position (LP = D / 8 rounded up to a power of two: each lane reads 8 FP16 of K
// and of V as one 16-byte load), 32 / LP positions side by side and DEC_NP such steps per
// iteration; with DEC_PF the next iteration's loads are issued before this one is computed, so
// a warp has up to 2 * DEC_NP * 32 / LP positions' loads in flight. The chunk's page numbers
// are staged in shared memory first. Each lane group keeps, per head, its 8 elements of q and
// of acc and an online softmax over its positions; the groups then merge by shuffles, the warps
// in shared memory, and the block writes each head's partial (max m, sum l, unnormalized
// acc[D]) for attention_combine, or, with one split, the output y itself (no combine launch:
// short contexts). Each head's arithmetic is the same whatever G is (G = 1 is the per-head
// kernel), so every G gives the same bits.
//
// The chunk of token t is a function of its own context length alone (attn_decode_chunk:
// ceil(len / min_split) splits, at most max_splits, each a multiple of DEC_GRAN positions), so
// a token's result does not depend on the other tokens of the step; the launch's split count
// (gridDim.z) is the largest any token needs (src/backend/cuda/ops.rs computes the same), and
// the last split takes whatever is left of the context, should it need more.
// Grid: (H / G, T, n_splits); block: 128 (DEC_NW warps). G divides H / Hkv. D a multiple of 32,
// at most MAX_D; K and V rows 16-byte aligned. part_m, part_l: [T, H, n_splits];
// part_acc: [T, H, n_splits, D]; y: [T, H * D].
#define DEC_NW 4      // warps a block
#define DEC_NP 4      // positions per lane group in flight per iteration
#define DEC_PAGES 256 // page numbers of a chunk staged in shared memory (else read per position)
#define DEC_GRAN 32   // a chunk is a multiple of this many positions

// Positions of each split of a context of `len` positions (src/backend/cuda/ops.rs mirrors it).
__device__ __forceinline__ int attn_decode_chunk(int len, int min_split, int max_splits) {
    i64 n = len > 0 ? len : 1, ms = min_split > 0 ? min_split : 1;
    i64 s = (n + ms - 1) / ms;
    if (s > max_splits) s = max_splits;
    if (s < 1) s = 1;
    i64 c = (n + s - 1) / s;
    return (int)((c + DEC_GRAN - 1) / DEC_GRAN * DEC_GRAN);
}

// The positions [start, stop) that split s of S takes of a context ending at p_end: its chunk,
// empty past the context, and for the last split whatever is left.
__device__ __forceinline__ void attn_decode_span(int p_end, int window, int min_split,
                                                 int max_splits, int s, int S, int* start,
                                                 int* stop) {
    int lo = attn_lo(p_end, window);
    int len = p_end + 1 - lo;
    int chunk = attn_decode_chunk(len, min_split, max_splits);
    *start = (i64)s * chunk >= len ? p_end + 1 : lo + s * chunk;
    *stop = s == S - 1 ? p_end + 1 : min(*start + chunk, p_end + 1);
}

__device__ __forceinline__ void widen8(uint4 w, float* f) {
    u32 v[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = h2f((u16)(v[i] & 0xffff));
        f[2 * i + 1] = h2f((u16)(v[i] >> 16));
    }
}

// DL consecutive FP16 of a V row (a lane's elements in attn_decode_lanes) as DL / 2 words: one
// 4- or 8-byte load.
template <int DL>
__device__ __forceinline__ void lpd_words(const u16* p, u32* w);
template <>
__device__ __forceinline__ void lpd_words<2>(const u16* p, u32* w) {
    w[0] = __ldg((const u32*)p);
}
template <>
__device__ __forceinline__ void lpd_words<4>(const u16* p, u32* w) {
    uint2 v = __ldg((const uint2*)p);
    w[0] = v.x;
    w[1] = v.y;
}

// The K and V loads of one iteration: DEC_NP positions p0 + i * step, each at most `last` (a
// position of the window whose pages are staged in sm_pages from page page0): a position past
// the context loads the last one's row, finite, and its score is masked, so no load is
// predicated and no register zeroed. Pages are a power of two cells (src/backend/step.rs), so
// a position's page is a shift and its cell a shift and a mask; a cell's first element is one
// 32 x 32 -> 64-bit multiply (cells fit in 32 bits, their elements need not). A division by the
// page size and a table read for unstaged chunks were most of the loop's integer work.
__device__ __forceinline__ void dec_fetch(const u16* kc, const u16* vc, const int* sm_pages,
                                          int page_shift, int page0, u32 col, u32 row, int p0,
                                          int step, int last, bool on, uint4* kr, uint4* vr) {
    u32 in_page = (1u << page_shift) - 1;
#pragma unroll
    for (int i = 0; i < DEC_NP; i++) {
        int p = min(p0 + i * step, last);
        u32 page = (u32)sm_pages[(p >> page_shift) - page0];
        u32 cell = (page << page_shift) | ((u32)p & in_page);
        unsigned long long c = (unsigned long long)cell * row + col;
        if (on) {
            kr[i] = *(const uint4*)(kc + c);
            vr[i] = *(const uint4*)(vc + c);
        } else {
            kr[i] = make_uint4(0, 0, 0, 0);
            vr[i] = kr[i];
        }
    }
}

// The end of a decode block (attn_decode, attn_decode_lanes): its warps' (m, l, acc) merged,
// warps in order, into each head's partial of split s, or with one split into the output itself.
// sm_m, sm_l: [G][NW] of the warps' maxima and sums; sm_acc: [G][NW][ws] of their accumulators
// (stored before the call, whose first step is the barrier); sm_M, sm_L: [G] of scratch.
template <int G, int NW>
__device__ __forceinline__ void dec_write(const float* sm_m, const float* sm_l,
                                          const float* sm_acc, int ws, float* sm_M, float* sm_L,
                                          int t, int H, int h0, int D, int s, int S, float* part_m,
                                          float* part_l, float* part_acc, float* y) {
    __syncthreads();
    if (threadIdx.x < G) {
        int j = threadIdx.x;
        float M = -INFINITY;
        for (int w = 0; w < NW; w++) M = fmaxf(M, sm_m[j * NW + w]);
        float L = 0.0f;
        if (M != -INFINITY)
            for (int w = 0; w < NW; w++) L += sm_l[j * NW + w] * expf(sm_m[j * NW + w] - M);
        sm_M[j] = M;
        sm_L[j] = L;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
        int j = i / D, e = i - j * D;
        float M = sm_M[j];
        i64 idx = ((i64)t * H + h0 + j) * S + s;
        if (M == -INFINITY) {
            if (e == 0) {
                part_m[idx] = -INFINITY;
                part_l[idx] = 0.0f;
            }
            part_acc[idx * D + e] = 0.0f;
            continue;
        }
        float a = 0.0f;
        for (int w = 0; w < NW; w++)
            a += sm_acc[(j * NW + w) * ws + e] * expf(sm_m[j * NW + w] - M);
        if (S == 1) {
            // One split: the block's result is the output, normalized exactly as
            // attention_combine would (its merge of a single partial multiplies by e^0 = 1).
            float inv = 1.0f / sm_L[j];
            y[(i64)t * H * D + (i64)(h0 + j) * D + e] = a * inv;
            continue;
        }
        if (e == 0) {
            part_m[idx] = M;
            part_l[idx] = sm_L[j];
        }
        part_acc[idx * D + e] = a;
    }
}

template <int G, bool PF>
__device__ __forceinline__ void attn_decode(const float* q, const u16* kc, const u16* vc,
                                            const int* pos, const int* slots, const int* tables,
                                            int table_stride, int page_size, int H, int Hkv, int D,
                                            float scale, int window, int min_split, int max_splits,
                                            float* part_m, float* part_l, float* part_acc,
                                            float* y) {
    const int NW = DEC_NW;
    __shared__ float sm_m[G][NW], sm_l[G][NW], sm_M[G], sm_L[G];
    __shared__ float sm_acc[G][NW][MAX_D];
    __shared__ int sm_pages[DEC_PAGES];
    int h0 = blockIdx.x * G, t = blockIdx.y, s = blockIdx.z, S = gridDim.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int g = h0 / (H / Hkv);
    u32 row = (u32)(Hkv * D);
    int start, stop;
    attn_decode_span(pos[t], window, min_split, max_splits, s, S, &start, &stop);
    int slot = slots[t];
    int lp = 4;
    while (lp * 8 < D) lp <<= 1;
    int pw = 32 / lp;
    int li = lane & (lp - 1), pi = lane / lp;
    bool on = li * 8 < D;

    float qr[G][8], acc[G][8], m[G], l[G];
#pragma unroll
    for (int j = 0; j < G; j++) {
        const float* qh = q + (i64)t * H * D + (i64)(h0 + j) * D + li * 8;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            qr[j][k] = on ? qh[k] * scale : 0.0f;
            acc[j][k] = 0.0f;
        }
        m[j] = -INFINITY;
        l[j] = 0.0f;
    }
    // The chunk is walked in windows of whole iterations whose page numbers are staged in
    // shared memory first (one window for chunks up to about DEC_PAGES pages): the loop's K/V
    // loads then depend on no other global load (a table read before every position doubled
    // the latency chain). A window is a multiple of an iteration's positions, so the
    // iterations, and with them every sum, are the same whatever the window.
    int page_shift = __ffs(page_size) - 1;  // a power of two (src/backend/step.rs)
    i64 table_row = (i64)slot * table_stride;
    int step = NW * pw, iter = DEC_NP * step;
    i64 span = (i64)(DEC_PAGES - 1) << page_shift;  // positions a window's pages surely hold
    int win = (int)(span < (1 << 30) ? span : (1 << 30)) / iter * iter;
    u32 col = (u32)(g * D + li * 8);
    for (int ws = start; ws < stop; ws += win) {
        int we = min(ws + win, stop);
        int page0 = ws >> page_shift;
        int n_pages = ((we - 1) >> page_shift) - page0 + 1;
        __syncthreads();  // the previous window's page reads are done
        for (int i = threadIdx.x; i < n_pages; i += blockDim.x)
            sm_pages[i] = tables[table_row + page0 + i];
        __syncthreads();
        uint4 kr[DEC_NP], vr[DEC_NP];
        int first = ws + warp * pw;
        if (PF)
            dec_fetch(kc, vc, sm_pages, page_shift, page0, col, row, first + pi, step, we - 1, on,
                      kr, vr);
        for (int p0 = first; p0 < we; p0 += iter) {
            if (!PF)
                dec_fetch(kc, vc, sm_pages, page_shift, page0, col, row, p0 + pi, step, we - 1,
                          on, kr, vr);
            uint4 kn[DEC_NP], vn[DEC_NP];
            if (PF)  // the next iteration's loads fly while this one is computed
                dec_fetch(kc, vc, sm_pages, page_shift, page0, col, row, p0 + iter + pi, step,
                          we - 1, on, kn, vn);
            float sc[G][DEC_NP];
#pragma unroll
            for (int i = 0; i < DEC_NP; i++) {
                float kf[8];
                widen8(kr[i], kf);
#pragma unroll
                for (int j = 0; j < G; j++) {
                    float d = 0.0f;
#pragma unroll
                    for (int k = 0; k < 8; k++) d += qr[j][k] * kf[k];
                    sc[j][i] = d;
                }
            }
            for (int o = lp >> 1; o > 0; o >>= 1)
#pragma unroll
                for (int j = 0; j < G; j++)
#pragma unroll
                    for (int i = 0; i < DEC_NP; i++)
                        sc[j][i] += __shfl_xor_sync(FULL_MASK, sc[j][i], o);
            float m_new[G];
#pragma unroll
            for (int j = 0; j < G; j++) {
                m_new[j] = m[j];
#pragma unroll
                for (int i = 0; i < DEC_NP; i++) {
                    if (p0 + pi + i * step >= stop) sc[j][i] = -INFINITY;
                    m_new[j] = fmaxf(m_new[j], sc[j][i]);
                }
                if (m_new[j] != -INFINITY) {
                    float c = expf(m[j] - m_new[j]);
                    l[j] *= c;
#pragma unroll
                    for (int k = 0; k < 8; k++) acc[j][k] *= c;
                }
            }
#pragma unroll
            for (int i = 0; i < DEC_NP; i++) {
                float vf[8];
                widen8(vr[i], vf);
#pragma unroll
                for (int j = 0; j < G; j++)
                    if (m_new[j] != -INFINITY) {
                        float e = expf(sc[j][i] - m_new[j]);
                        l[j] += e;
#pragma unroll
                        for (int k = 0; k < 8; k++) acc[j][k] = fmaf(e, vf[k], acc[j][k]);
                    }
            }
#pragma unroll
            for (int j = 0; j < G; j++)
                if (m_new[j] != -INFINITY) m[j] = m_new[j];
            if (PF)
#pragma unroll
                for (int i = 0; i < DEC_NP; i++) {
                    kr[i] = kn[i];
                    vr[i] = vn[i];
                }
        }
    }
    // Merge the warp's position groups (lanes li, li + lp, ...): every lane ends with the total.
    for (int o = lp; o < 32; o <<= 1)
#pragma unroll
        for (int j = 0; j < G; j++) {
            float m_o = __shfl_xor_sync(FULL_MASK, m[j], o);
            float l_o = __shfl_xor_sync(FULL_MASK, l[j], o);
            float a_o[8];
#pragma unroll
            for (int k = 0; k < 8; k++) a_o[k] = __shfl_xor_sync(FULL_MASK, acc[j][k], o);
            float M = fmaxf(m[j], m_o);
            if (M != -INFINITY) {
                float ca = expf(m[j] - M), cb = expf(m_o - M);
                l[j] = l[j] * ca + l_o * cb;
#pragma unroll
                for (int k = 0; k < 8; k++) acc[j][k] = acc[j][k] * ca + a_o[k] * cb;
                m[j] = M;
            }
        }
    if (lane == 0)
#pragma unroll
        for (int j = 0; j < G; j++) {
            sm_m[j][warp] = m[j];
            sm_l[j][warp] = l[j];
        }
    if (pi == 0 && on)
#pragma unroll
        for (int j = 0; j < G; j++)
#pragma unroll
            for (int k = 0; k < 8; k++) sm_acc[j][warp][li * 8 + k] = acc[j][k];
    dec_write<G, NW>(&sm_m[0][0], &sm_l[0][0], &sm_acc[0][0][0], MAX_D, sm_M, sm_L, t, H, h0, D,
                     s, S, part_m, part_l, part_acc, y);
}

#define ATTN_DECODE(NAME, G, PF)                                                                 \
    extern "C" __global__ void NAME(const float* q, const u16* kc, const u16* vc, const int* pos, \
                                    const int* slots, const int* tables, int table_stride,       \
                                    int page_size, int H, int Hkv, int D, float scale,           \
                                    int window, int min_split, int max_splits, float* part_m,    \
                                    float* part_l, float* part_acc, float* y) {                  \
        attn_decode<G, PF>(q, kc, vc, pos, slots, tables, table_stride, page_size, H, Hkv, D,    \
                           scale, window, min_split, max_splits, part_m, part_l, part_acc, y);   \
    }
// The per-head kernel (one query head a block, no prefetch): the fallback, and the A/B
// baseline (M40LLM_ATTN_GROUPED=0).
ATTN_DECODE(attention_decode_f16, 1, false)
// G query heads of one KV head a block (G the largest of 1..8 dividing H / Hkv).
ATTN_DECODE(attention_decode_g1_f16, 1, true)
ATTN_DECODE(attention_decode_g2_f16, 2, true)
ATTN_DECODE(attention_decode_g3_f16, 3, true)
ATTN_DECODE(attention_decode_g4_f16, 4, true)
ATTN_DECODE(attention_decode_g5_f16, 5, false)
ATTN_DECODE(attention_decode_g6_f16, 6, false)
ATTN_DECODE(attention_decode_g7_f16, 7, false)
ATTN_DECODE(attention_decode_g8_f16, 8, false)

// Merges the n_splits partials of each (token, head): y[t, h*D + e] = sum_s acc_s[e] e^(m_s - M)
// / sum_s l_s e^(m_s - M), every sum in split order (FMAs). comb_heads merges G heads h0.. of
// token t with the block's threads, an element a thread at a time: attention_combine runs it
// for one head a block, the lane-a-position decode kernels in their last block of a group (the
// same function, so the same bits). Up to COMB_MAX splits the partials' m and l are staged in
// shared memory, each split's weight e^(m_s - M) is computed once, and a thread issues the acc
// loads of COMB_NP splits before it adds them; the first COMB_NP of them go out before the m and
// l loads, so that up to COMB_NP splits the merge waits on one round trip to memory, not two (at
// 33 splits and 8 loads a round it was latency-bound: 8.7 µs for 17 KB a head under ncu on the
// H200). More splits take the per-element loop, the same arithmetic. The partials are read
// through L2 (__ldcg): in the decode kernels other blocks wrote them during this launch.
#define COMB_MAX 128
#define COMB_NP 32
__device__ __forceinline__ void comb_fetch(const float* part_acc, i64 base, int D, int e, int s0,
                                           int S, float* v) {
#pragma unroll
    for (int k = 0; k < COMB_NP; k++)
        v[k] = s0 + k < S ? __ldcg(part_acc + (base + s0 + k) * D + e) : 0.0f;
}

// sm_pm, sm_pl, sm_w: G * COMB_MAX floats of shared memory each.
template <int G>
__device__ __forceinline__ void comb_heads(const float* part_m, const float* part_l,
                                           const float* part_acc, float* y, int H, int D, int S,
                                           int t, int h0, float* sm_pm, float* sm_pl,
                                           float* sm_w) {
    i64 base0 = ((i64)t * H + h0) * S;  // head h0 + j's partials from base0 + j * S
    float* out = y + (i64)t * H * D + (i64)h0 * D;
    if (S > COMB_MAX) {
        for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
            int j = i / D, e = i - j * D;
            i64 base = base0 + (i64)j * S;
            float M = -INFINITY;
            for (int s = 0; s < S; s++) M = fmaxf(M, __ldcg(part_m + base + s));
            float L = 0.0f;
            for (int s = 0; s < S; s++) {
                float ms = __ldcg(part_m + base + s);
                if (ms != -INFINITY) L = fmaf(__ldcg(part_l + base + s), expf(ms - M), L);
            }
            float inv = 1.0f / L, a = 0.0f;
            for (int s = 0; s < S; s++) {
                float ms = __ldcg(part_m + base + s);
                if (ms != -INFINITY)
                    a = fmaf(__ldcg(part_acc + (base + s) * D + e), expf(ms - M), a);
            }
            out[i] = a * inv;
        }
        return;
    }
    // This thread's first element's first COMB_NP splits, in flight with the m and l loads.
    float first[COMB_NP];
    int i0 = threadIdx.x;
    if (i0 < G * D) comb_fetch(part_acc, base0 + (i64)(i0 / D) * S, D, i0 % D, 0, S, first);
    for (int i = threadIdx.x; i < G * S; i += blockDim.x) {
        int j = i / S, s = i - j * S;
        sm_pm[j * COMB_MAX + s] = __ldcg(part_m + base0 + i);
        sm_pl[j * COMB_MAX + s] = __ldcg(part_l + base0 + i);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * S; i += blockDim.x) {
        int j = i / S, s = i - j * S;
        const float* pm = sm_pm + j * COMB_MAX;
        float M = -INFINITY;
        for (int r = 0; r < S; r++) M = fmaxf(M, pm[r]);
        sm_w[j * COMB_MAX + s] = pm[s] != -INFINITY ? expf(pm[s] - M) : 0.0f;
    }
    __syncthreads();
    for (int i = i0; i < G * D; i += blockDim.x) {
        int j = i / D, e = i - j * D;
        const float* pm = sm_pm + j * COMB_MAX;
        const float *pl = sm_pl + j * COMB_MAX, *w = sm_w + j * COMB_MAX;
        i64 base = base0 + (i64)j * S;
        float L = 0.0f;
        for (int s = 0; s < S; s++)
            if (pm[s] != -INFINITY) L = fmaf(pl[s], w[s], L);
        float inv = 1.0f / L, a = 0.0f;
        for (int s0 = 0; s0 < S; s0 += COMB_NP) {
            float v[COMB_NP];
            if (i == i0 && s0 == 0) {
#pragma unroll
                for (int k = 0; k < COMB_NP; k++) v[k] = first[k];
            } else {
                comb_fetch(part_acc, base, D, e, s0, S, v);
            }
#pragma unroll
            for (int k = 0; k < COMB_NP; k++)
                if (s0 + k < S && pm[s0 + k] != -INFINITY) a = fmaf(v[k], w[s0 + k], a);
        }
        out[i] = a * inv;
    }
}

// Grid: (H, T); block: any multiple of 32 (the host launches D threads, one an element).
extern "C" __global__ void attention_combine(const float* part_m, const float* part_l,
                                             const float* part_acc, float* y, int H, int D,
                                             int S) {
    __shared__ float sm_pm[COMB_MAX], sm_pl[COMB_MAX], sm_w[COMB_MAX];
    comb_heads<1>(part_m, part_l, part_acc, y, H, D, S, blockIdx.y, blockIdx.x, sm_pm, sm_pl,
                  sm_w);
}

// ---- Decode, a lane a position (head_dim 64 and 128: attention_decode_lanes_d<D>_g<G>_f16).
// The same flash-decoding blocks, splits and partials as attn_decode above, laid out so that no
// lane repeats another's work. A warp takes 32 positions of its chunk at a time (the block's 4
// warps 128): first each lane computes the G scores of its own position, K row against the G
// query heads staged in shared memory (a K element widened once for G FMAs); the warp's maximum
// (shuffles) updates its running max and one exp a (position, head) its weight; then the warp
// walks the 32 positions with lanes over the head's elements (lane e of D / 32 consecutive
// ones), the weights broadcast by shuffles, each V row one coalesced read for the G heads. Every
// load of a tile (the lane's K row, its elements of the 32 V rows) is issued before the first
// FMA, so a tile waits on one round trip to memory (a first version that loaded V after the
// scores, in eights, lost 5% of 8B Q4_0 decode at short contexts to the waits). attn_decode's lanes
// instead split a position's dot over D / 8 lanes, whose reduction shuffles and softmax every
// lane of the group repeated: about 140 instructions a position a lane at depth 4 096 on the
// 8B shape, the integer and shuffle work most of them (ncu). Per head the arithmetic is the
// same whatever G is (dot over e in order, per-lane sums of weights, the warps merged as
// attn_decode merges them), so every G gives the same bits, and a token's bits depend on its
// own chunks alone.
#define LPD_NW 4  // warps a block
template <int G, int DL>
__device__ __forceinline__ void attn_decode_lanes(const float* q, const u16* kc, const u16* vc,
                                                  const int* pos, const int* slots,
                                                  const int* tables, int table_stride,
                                                  int page_size, int H, int Hkv, float scale,
                                                  int window, int min_split, int max_splits,
                                                  float* part_m, float* part_l, float* part_acc,
                                                  float* y, u32* counters) {
    const int NW = LPD_NW, D = 32 * DL;
    __shared__ float4 sm_q[G * D / 4];
    __shared__ float sm_m[G][NW], sm_l[G][NW], sm_M[G], sm_L[G];
    __shared__ float sm_acc[G][NW][D];
    __shared__ int sm_pages[DEC_PAGES];
    int h0 = blockIdx.x * G, t = blockIdx.y, s = blockIdx.z, S = gridDim.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int g = h0 / (H / Hkv);
    u32 row = (u32)(Hkv * D);
    int start, stop;
    attn_decode_span(pos[t], window, min_split, max_splits, s, S, &start, &stop);
    int slot = slots[t];
    {
        float* qs = (float*)sm_q;
        const float* qh = q + (i64)t * H * D + (i64)h0 * D;
        for (int i = threadIdx.x; i < G * D; i += blockDim.x) qs[i] = qh[i] * scale;
    }
    float acc[G][DL], m[G], l[G];
#pragma unroll
    for (int j = 0; j < G; j++) {
#pragma unroll
        for (int k = 0; k < DL; k++) acc[j][k] = 0.0f;
        m[j] = -INFINITY;
        l[j] = 0.0f;
    }
    int page_shift = __ffs(page_size) - 1;  // a power of two (src/backend/step.rs)
    u32 in_page = (1u << page_shift) - 1;
    i64 table_row = (i64)slot * table_stride;
    const int iter = NW * 32;
    i64 span = (i64)(DEC_PAGES - 1) << page_shift;
    int win = (int)(span < (1 << 30) ? span : (1 << 30)) / iter * iter;
    u32 col = (u32)(g * D);
    for (int ws = start; ws < stop; ws += win) {
        int we = min(ws + win, stop);
        int page0 = ws >> page_shift;
        int n_pages = ((we - 1) >> page_shift) - page0 + 1;
        __syncthreads();  // the previous window's page reads (and the q stores) are done
        for (int i = threadIdx.x; i < n_pages; i += blockDim.x)
            sm_pages[i] = tables[table_row + page0 + i];
        __syncthreads();
        for (int p0 = ws + warp * 32; p0 < we; p0 += iter) {
            // Scores: this lane's position (past the window: the last one's row, masked).
            int p = min(p0 + lane, we - 1);
            u32 page = (u32)sm_pages[(p >> page_shift) - page0];
            u32 cell = (page << page_shift) | ((u32)p & in_page);
            // Every load of the tile: this lane's K row, then its elements of the tile's 32 V
            // rows (cells broadcast; a position past the window loads the last one's row).
            const uint4* kp = (const uint4*)(kc + ((unsigned long long)cell * row + col));
            uint4 kw[D / 8];
#pragma unroll
            for (int i = 0; i < D / 8; i++) kw[i] = __ldg(kp + i);
            const u16* vl = vc + col + lane * DL;
            u32 vw[32][DL / 2];
#pragma unroll
            for (int k = 0; k < 32; k++) {
                u32 ck = __shfl_sync(FULL_MASK, cell, k);
                lpd_words<DL>(vl + (unsigned long long)ck * row, vw[k]);
            }
            float sc[G];
#pragma unroll
            for (int j = 0; j < G; j++) sc[j] = 0.0f;
#pragma unroll
            for (int i = 0; i < D / 8; i++) {
                float kf[8];
                widen8(kw[i], kf);
#pragma unroll
                for (int j = 0; j < G; j++) {
                    float4 a = sm_q[(j * D) / 4 + i * 2];
                    float4 b = sm_q[(j * D) / 4 + i * 2 + 1];
                    sc[j] = fmaf(a.x, kf[0], sc[j]);
                    sc[j] = fmaf(a.y, kf[1], sc[j]);
                    sc[j] = fmaf(a.z, kf[2], sc[j]);
                    sc[j] = fmaf(a.w, kf[3], sc[j]);
                    sc[j] = fmaf(b.x, kf[4], sc[j]);
                    sc[j] = fmaf(b.y, kf[5], sc[j]);
                    sc[j] = fmaf(b.z, kf[6], sc[j]);
                    sc[j] = fmaf(b.w, kf[7], sc[j]);
                }
            }
            // The running max (p0 itself is in the window: the tile's max is finite) and this
            // lane's weights.
            bool in = p0 + lane < we;
            float e[G];
#pragma unroll
            for (int j = 0; j < G; j++) {
                float v = in ? sc[j] : -INFINITY;
                float m_new = fmaxf(m[j], warp_max(v));
                float c = expf(m[j] - m_new);
                l[j] *= c;
#pragma unroll
                for (int k = 0; k < DL; k++) acc[j][k] *= c;
                e[j] = in ? expf(v - m_new) : 0.0f;
                l[j] += e[j];
                m[j] = m_new;
            }
            // Values: a position past the window weighs 0.
#pragma unroll
            for (int k = 0; k < 32; k++) {
                float vf[DL];
#pragma unroll
                for (int w = 0; w < DL / 2; w++) {
                    vf[2 * w] = h2f((u16)(vw[k][w] & 0xffff));
                    vf[2 * w + 1] = h2f((u16)(vw[k][w] >> 16));
                }
#pragma unroll
                for (int j = 0; j < G; j++) {
                    float ek = __shfl_sync(FULL_MASK, e[j], k);
#pragma unroll
                    for (int d = 0; d < DL; d++) acc[j][d] = fmaf(ek, vf[d], acc[j][d]);
                }
            }
        }
    }
    // Each warp's sum of weights, then the warps merged as attn_decode merges them.
#pragma unroll
    for (int j = 0; j < G; j++) l[j] = warp_sum(l[j]);
    if (lane == 0)
#pragma unroll
        for (int j = 0; j < G; j++) {
            sm_m[j][warp] = m[j];
            sm_l[j][warp] = l[j];
        }
#pragma unroll
    for (int j = 0; j < G; j++)
#pragma unroll
        for (int k = 0; k < DL; k++) sm_acc[j][warp][lane * DL + k] = acc[j][k];
    dec_write<G, NW>(&sm_m[0][0], &sm_l[0][0], &sm_acc[0][0][0], D, sm_M, sm_L, t, H, h0, D,
                     s, S, part_m, part_l, part_acc, y);
    if (S == 1 || counters == nullptr) return;
    // With counters (zero between launches), the last block of the (token, group) to write its
    // partials merges the group's heads: no attention_combine launch. Its count is reset for the
    // next launch once every block has counted. (The host passes counters to one-head-a-block
    // launches only, DecodeSplits::merges: G heads' merge in one block measured slower than
    // attention_combine's block a head.)
    __shared__ int sm_last;
    __shared__ float sm_cm[G * COMB_MAX], sm_cl[G * COMB_MAX], sm_cw[G * COMB_MAX];
    __threadfence();  // this block's partials, before its count
    __syncthreads();
    if (threadIdx.x == 0) {
        u32* c = counters + (i64)t * gridDim.x + blockIdx.x;
        sm_last = atomicAdd(c, 1u) == (u32)(S - 1);
        if (sm_last) *c = 0;
    }
    __syncthreads();
    if (!sm_last) return;
    __threadfence();  // the other blocks' partials, after their counts
    comb_heads<G>(part_m, part_l, part_acc, y, H, D, S, t, h0, sm_cm, sm_cl, sm_cw);
}

#define ATTN_DECODE_LANES(D, G)                                                                \
    extern "C" __global__ void attention_decode_lanes_d##D##_g##G##_f16(                       \
        const float* q, const u16* kc, const u16* vc, const int* pos, const int* slots,         \
        const int* tables, int table_stride, int page_size, int H, int Hkv, int D_,             \
        float scale, int window, int min_split, int max_splits, float* part_m, float* part_l,   \
        float* part_acc, float* y, u32* counters) {                                             \
        (void)D_;                                                                               \
        attn_decode_lanes<G, D / 32>(q, kc, vc, pos, slots, tables, table_stride, page_size, H, \
                                     Hkv, scale, window, min_split, max_splits, part_m, part_l, \
                                     part_acc, y, counters);                                    \
    }
ATTN_DECODE_LANES(64, 1)
ATTN_DECODE_LANES(64, 2)
ATTN_DECODE_LANES(64, 3)
ATTN_DECODE_LANES(64, 4)
ATTN_DECODE_LANES(64, 5)
ATTN_DECODE_LANES(64, 6)
ATTN_DECODE_LANES(64, 7)
ATTN_DECODE_LANES(64, 8)
ATTN_DECODE_LANES(128, 1)
ATTN_DECODE_LANES(128, 2)
ATTN_DECODE_LANES(128, 3)
ATTN_DECODE_LANES(128, 4)
ATTN_DECODE_LANES(128, 5)
ATTN_DECODE_LANES(128, 6)
ATTN_DECODE_LANES(128, 7)
ATTN_DECODE_LANES(128, 8)

// ---- Prefill: tiled over query rows and positions (FP32 flash attention without tensor
// cores). A block takes PF_R query rows: nt consecutive tokens of the step times nh query heads
// of one KV head (nh = min(H / Hkv, PF_R), nt = PF_R / nh), so each tile of PF_BK positions of
// K and V, widened into shared memory once, serves every row (the GQA heads and the tokens of a
// prompt). Per tile: S = Q Kᵀ with each thread 1 row x 4 positions (float4 shared loads, K rows
// padded against bank conflicts), an online softmax per row over the 8 lanes that hold it, and
// O += P V with each thread up to 4 rows x 4 elements. Tokens of the block that belong to
// different slots (sequences) are taken one slot at a time, each over its own positions.
// Grid: (Hkv * ceil((H / Hkv) / PF_R), ceil(T / nt)); block: PF_THREADS. D a multiple of 32, at
// most PF_MAX_D; 43 KB of shared memory (under sm_52's 48 KB a block).
#define PF_R 16
#define PF_BK 32
#define PF_MAX_D 128
#define PF_KS (PF_MAX_D + 4)
#define PF_THREADS 128
#define PF_LD (PF_BK * PF_MAX_D / 2 / PF_THREADS)  // words of K (and of V) a thread loads a tile

// Loads the words of K and V that thread (j0, lw) stores for the tile of n positions from p0:
// position j0 + k js in kw[k], vw[k] (zero past n). Power-of-two pages by shift and mask.
__device__ __forceinline__ void pf_fetch(const u16* kc, const u16* vc, const int* tables,
                                         int table_stride, int slot, int page_size, int row,
                                         int col, int p0, int n, bool on, int j0, int js, int lw,
                                         u32* kw, u32* vw) {
    bool pow2 = (page_size & (page_size - 1)) == 0;
    int sh = __ffs(page_size) - 1;
    const int* tab = tables + (i64)slot * table_stride;
#pragma unroll
    for (int k = 0; k < PF_LD; k++) {
        int j = j0 + k * js;
        kw[k] = 0;
        vw[k] = 0;
        if (on && j < n) {
            int p = p0 + j;
            int pg = pow2 ? p >> sh : p / page_size, off = pow2 ? p & (page_size - 1) : p % page_size;
            i64 c = ((i64)tab[pg] * page_size + off) * row + col + 2 * lw;
            kw[k] = *(const u32*)(kc + c);
            vw[k] = *(const u32*)(vc + c);
        }
    }
}

extern "C" __global__ void attention_prefill_f16(
    const float* q, const u16* kc, const u16* vc, const int* pos, const int* slots,
    const int* tables, int table_stride, int page_size, int T, int H, int Hkv, int D, float scale,
    int window, float* y) {
    __shared__ __align__(16) float qs[PF_R][PF_MAX_D];
    __shared__ __align__(16) float ks[PF_BK][PF_KS];
    __shared__ __align__(16) float vs[PF_BK][PF_MAX_D];
    __shared__ float ps[PF_R][PF_BK + 1];
    __shared__ float corr_s[PF_R], l_s[PF_R];
    __shared__ int tok_pos[PF_R], tok_lo[PF_R], tok_slot[PF_R];
    int ratio = H / Hkv;
    int chunks = (ratio + PF_R - 1) / PF_R;
    int g = blockIdx.x / chunks;
    int h0 = g * ratio + (blockIdx.x % chunks) * PF_R;
    int nh = min(PF_R, g * ratio + ratio - h0);
    int nt_blk = PF_R / min(ratio, PF_R);
    int t0 = blockIdx.y * nt_blk;
    int nt = min(nt_blk, T - t0);
    int rows = nt * nh;
    int tid = threadIdx.x;
    int row = Hkv * D;
    for (int i = tid; i < PF_R * D; i += PF_THREADS) {
        int r = i / D, e = i % D;
        qs[r][e] = r < rows ? q[(i64)(t0 + r / nh) * H * D + (i64)(h0 + r % nh) * D + e] * scale
                            : 0.0f;
    }
    if (tid < nt) {
        int p = pos[t0 + tid];
        tok_pos[tid] = p;
        tok_lo[tid] = attn_lo(p, window);
        tok_slot[tid] = slots[t0 + tid];
    }
    __syncthreads();
    // S phase: row rs, positions cs + 8 k of the tile. PV phase: item tid + PF_THREADS u is row
    // item / (D / 4), elements 4 (item % (D / 4)) .. + 3.
    int rs = tid >> 3, cs = tid & 7;
    int ed = D >> 2;
    // Tile loads: thread tid takes 32-bit word lw (two FP16) of positions j0, j0 + js, ...
    int wpr = D >> 1, js = PF_THREADS / wpr, lw = tid % wpr, j0 = tid / wpr;
    bool ld_on = j0 < js;
    unsigned done = 0, all = (1u << nt) - 1;
    while (done != all) {
        int first = __ffs(~done) - 1;
        int slot = tok_slot[first];
        unsigned act = 0;
        int lo = 0x7fffffff, hi = -1;
        for (int i = 0; i < nt; i++)
            if (!((done >> i) & 1) && tok_slot[i] == slot) {
                act |= 1u << i;
                lo = min(lo, tok_lo[i]);
                hi = max(hi, tok_pos[i]);
            }
        done |= act;
        bool s_on = rs < rows && ((act >> (rs / nh)) & 1);
        int s_hi = s_on ? tok_pos[rs / nh] : -1, s_lo = s_on ? tok_lo[rs / nh] : 0;
        float m_run = -INFINITY, l_run = 0.0f;
        float4 acc[4];
#pragma unroll
        for (int u = 0; u < 4; u++) acc[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        u32 kw[PF_LD], vw[PF_LD];
        pf_fetch(kc, vc, tables, table_stride, slot, page_size, row, g * D, lo,
                 min(PF_BK, hi + 1 - lo), ld_on, j0, js, lw, kw, vw);
        for (int p0 = lo; p0 <= hi; p0 += PF_BK) {
            int n = min(PF_BK, hi + 1 - p0);
            __syncthreads();
#pragma unroll
            for (int k = 0; k < PF_LD; k++) {
                int j = j0 + k * js;
                if (ld_on && j < n) {
                    ks[j][2 * lw] = h2f((u16)(kw[k] & 0xffff));
                    ks[j][2 * lw + 1] = h2f((u16)(kw[k] >> 16));
                    vs[j][2 * lw] = h2f((u16)(vw[k] & 0xffff));
                    vs[j][2 * lw + 1] = h2f((u16)(vw[k] >> 16));
                }
            }
            __syncthreads();
            // The next tile's loads fly while this one is computed.
            if (p0 + PF_BK <= hi)
                pf_fetch(kc, vc, tables, table_stride, slot, page_size, row, g * D, p0 + PF_BK,
                         min(PF_BK, hi + 1 - p0 - PF_BK), ld_on, j0, js, lw, kw, vw);
            float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int e = 0; e < D; e += 4) {
                float4 qv = *(const float4*)&qs[rs][e];
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    float4 kv = *(const float4*)&ks[cs + 8 * k][e];
                    sc[k] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
                }
            }
            float mt = -INFINITY;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                int j = cs + 8 * k, p = p0 + j;
                bool ok = s_on && j < n && p >= s_lo && p <= s_hi;
                sc[k] = ok ? sc[k] : -INFINITY;
                mt = fmaxf(mt, sc[k]);
            }
            for (int o = 4; o > 0; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(FULL_MASK, mt, o));
            float m_new = fmaxf(m_run, mt);
            float cr = 1.0f, sum = 0.0f;
            if (m_new != -INFINITY) {
                cr = expf(m_run - m_new);
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    sc[k] = expf(sc[k] - m_new);
                    sum += sc[k];
                }
            } else {
#pragma unroll
                for (int k = 0; k < 4; k++) sc[k] = 0.0f;
            }
            for (int o = 4; o > 0; o >>= 1) sum += __shfl_xor_sync(FULL_MASK, sum, o);
            l_run = l_run * cr + sum;
            m_run = m_new;
#pragma unroll
            for (int k = 0; k < 4; k++) ps[rs][cs + 8 * k] = sc[k];
            if (cs == 0) corr_s[rs] = cr;
            __syncthreads();
#pragma unroll
            for (int u = 0; u < 4; u++) {
                int i = tid + PF_THREADS * u;
                int r = i / ed, e = 4 * (i % ed);
                if (r < rows && ((act >> (r / nh)) & 1)) {
                    float c = corr_s[r];
                    float4 a = acc[u];
                    a.x *= c;
                    a.y *= c;
                    a.z *= c;
                    a.w *= c;
                    for (int j = 0; j < n; j++) {
                        float p = ps[r][j];
                        float4 v = *(const float4*)&vs[j][e];
                        a.x += p * v.x;
                        a.y += p * v.y;
                        a.z += p * v.z;
                        a.w += p * v.w;
                    }
                    acc[u] = a;
                }
            }
        }
        if (cs == 0 && s_on) l_s[rs] = l_run;
        __syncthreads();
#pragma unroll
        for (int u = 0; u < 4; u++) {
            int i = tid + PF_THREADS * u;
            int r = i / ed, e = 4 * (i % ed);
            if (r < rows && ((act >> (r / nh)) & 1)) {
                float inv = 1.0f / l_s[r];
                float* out = y + (i64)(t0 + r / nh) * H * D + (i64)(h0 + r % nh) * D + e;
                out[0] = acc[u].x * inv;
                out[1] = acc[u].y * inv;
                out[2] = acc[u].z * inv;
                out[3] = acc[u].w * inv;
            }
        }
    }
}
