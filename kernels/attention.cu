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

// ---- Decode: flash-decoding. The context of each (token, head) is split into chunks of
// `chunk` positions, one block per (head, token, chunk). Each warp of the block walks the
// chunk's positions (warp w takes positions w, w + warps, ...) with an online softmax over its
// lane's D / 32 elements; the warps then merge in shared memory and the block writes its
// partial (max m, sum l, unnormalized acc[D]) for attention_combine.
// Grid: (H, T, n_splits); block: 128 (4 warps). D a multiple of 32, at most MAX_D.
// part_m, part_l: [T, H, n_splits]; part_acc: [T, H, n_splits, D].
extern "C" __global__ void attention_decode_f16(
    const float* q, const u16* kc, const u16* vc, const int* pos, const int* slots,
    const int* tables, int table_stride, int page_size, int H, int Hkv, int D, float scale,
    int window, int chunk, float* part_m, float* part_l, float* part_acc) {
    const int NW = 4;
    __shared__ float sm_m[NW], sm_l[NW];
    __shared__ float sm_acc[NW][MAX_D];
    int h = blockIdx.x, t = blockIdx.y, s = blockIdx.z, S = gridDim.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int g = h / (H / Hkv);
    int row = Hkv * D;
    int p_end = pos[t];
    int lo = attn_lo(p_end, window);
    int start = lo + s * chunk;
    int stop = min(start + chunk, p_end + 1);
    int slot = slots[t];
    int nd = D >> 5;

    float qr[MAX_D / 32], acc[MAX_D / 32];
    const float* qh = q + (i64)t * H * D + (i64)h * D;
#pragma unroll
    for (int j = 0; j < MAX_D / 32; j++) {
        qr[j] = j < nd ? qh[lane + 32 * j] : 0.0f;
        acc[j] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int p = start + warp; p < stop; p += NW) {
        i64 c = attn_cell(tables, table_stride, slot, p, page_size);
        const u16* kr = kc + c * row + g * D;
        const u16* vr = vc + c * row + g * D;
        float d = 0.0f;
#pragma unroll
        for (int j = 0; j < MAX_D / 32; j++)
            if (j < nd) d += qr[j] * h2f(kr[lane + 32 * j]);
        float sc = scale * warp_sum(d);
        float m_new = fmaxf(m, sc);
        float corr = expf(m - m_new);
        float e = expf(sc - m_new);
        l = l * corr + e;
#pragma unroll
        for (int j = 0; j < MAX_D / 32; j++)
            if (j < nd) acc[j] = acc[j] * corr + e * h2f(vr[lane + 32 * j]);
        m = m_new;
    }
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < MAX_D / 32; j++)
        if (j < nd) sm_acc[warp][lane + 32 * j] = acc[j];
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < NW; w++) M = fmaxf(M, sm_m[w]);
    i64 idx = ((i64)t * H + h) * S + s;
    if (M == -INFINITY) {
        if (threadIdx.x == 0) {
            part_m[idx] = -INFINITY;
            part_l[idx] = 0.0f;
        }
        for (int e = threadIdx.x; e < D; e += blockDim.x) part_acc[idx * D + e] = 0.0f;
        return;
    }
    float L = 0.0f;
    for (int w = 0; w < NW; w++) L += sm_l[w] * expf(sm_m[w] - M);
    if (threadIdx.x == 0) {
        part_m[idx] = M;
        part_l[idx] = L;
    }
    for (int e = threadIdx.x; e < D; e += blockDim.x) {
        float a = 0.0f;
        for (int w = 0; w < NW; w++) a += sm_acc[w][e] * expf(sm_m[w] - M);
        part_acc[idx * D + e] = a;
    }
}

// Merges the n_splits partials of each (token, head): y[t, h*D + e] = sum_s acc_s[e] e^(m_s - M)
// / sum_s l_s e^(m_s - M). Grid: (H, T); block: any multiple of 32.
extern "C" __global__ void attention_combine(const float* part_m, const float* part_l,
                                             const float* part_acc, float* y, int H, int D,
                                             int S) {
    int h = blockIdx.x, t = blockIdx.y;
    i64 base = ((i64)t * H + h) * S;
    float M = -INFINITY;
    for (int s = 0; s < S; s++) M = fmaxf(M, part_m[base + s]);
    float L = 0.0f;
    for (int s = 0; s < S; s++)
        if (part_m[base + s] != -INFINITY) L += part_l[base + s] * expf(part_m[base + s] - M);
    float inv = 1.0f / L;
    for (int e = threadIdx.x; e < D; e += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < S; s++)
            if (part_m[base + s] != -INFINITY)
                a += part_acc[(base + s) * D + e] * expf(part_m[base + s] - M);
        y[(i64)t * H * D + (i64)h * D + e] = a * inv;
    }
}

// ---- Prefill: tiled. One block per (token, KV head, group of up to PF_G query heads of that
// KV head): tiles of PF_TILE positions of K and V are widened into shared memory once and used
// by every query head of the group (the GQA sharing); an online softmax per head runs over the
// tiles. Grid: (Hkv * ceil((H / Hkv) / PF_G), T); block: PF_THREADS. D at most PF_MAX_D.
#define PF_TILE 32
#define PF_G 8
#define PF_MAX_D 128
#define PF_THREADS 128
extern "C" __global__ void attention_prefill_f16(
    const float* q, const u16* kc, const u16* vc, const int* pos, const int* slots,
    const int* tables, int table_stride, int page_size, int H, int Hkv, int D, float scale,
    int window, float* y) {
    __shared__ float ks[PF_TILE][PF_MAX_D];
    __shared__ float vs[PF_TILE][PF_MAX_D];
    __shared__ float qs[PF_G][PF_MAX_D];
    __shared__ float ps[PF_G][PF_TILE];
    __shared__ float m_run[PF_G], l_run[PF_G], corr[PF_G];
    int ratio = H / Hkv;
    int chunks = (ratio + PF_G - 1) / PF_G;
    int g = blockIdx.x / chunks;
    int h0 = g * ratio + (blockIdx.x % chunks) * PF_G;
    int nh = min(PF_G, g * ratio + ratio - h0);
    int t = blockIdx.y;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    int row = Hkv * D;
    int p_end = pos[t];
    int lo = attn_lo(p_end, window);
    int slot = slots[t];
    const int per = (PF_G * PF_MAX_D) / PF_THREADS;  // accumulator elements per thread
    float acc[per];
#pragma unroll
    for (int u = 0; u < per; u++) acc[u] = 0.0f;
    for (int i = tid; i < nh * D; i += blockDim.x)
        qs[i / D][i % D] = q[(i64)t * H * D + (i64)h0 * D + i];
    if (tid < PF_G) {
        m_run[tid] = -INFINITY;
        l_run[tid] = 0.0f;
    }
    for (int p0 = lo; p0 <= p_end; p0 += PF_TILE) {
        int n = min(PF_TILE, p_end + 1 - p0);
        __syncthreads();
        for (int i = tid; i < n * D; i += blockDim.x) {
            int j = i / D, e = i % D;
            i64 c = attn_cell(tables, table_stride, slot, p0 + j, page_size);
            ks[j][e] = h2f(kc[c * row + g * D + e]);
            vs[j][e] = h2f(vc[c * row + g * D + e]);
        }
        __syncthreads();
        for (int i = tid; i < nh * PF_TILE; i += blockDim.x) {
            int hh = i / PF_TILE, j = i % PF_TILE;
            float d = -INFINITY;
            if (j < n) {
                d = 0.0f;
                for (int e = 0; e < D; e++) d += qs[hh][e] * ks[j][e];
                d *= scale;
            }
            ps[hh][j] = d;
        }
        __syncthreads();
        // One warp per head: the tile's max, the weights and the running sums.
        for (int hh = warp; hh < nh; hh += nwarps) {
            float sc = ps[hh][lane];
            float m_tile = warp_max(sc);
            float m_new = fmaxf(m_run[hh], m_tile);
            float e = lane < n ? expf(sc - m_new) : 0.0f;
            float sum = warp_sum(e);
            ps[hh][lane] = e;
            if (lane == 0) {
                float cr = expf(m_run[hh] - m_new);
                corr[hh] = cr;
                l_run[hh] = l_run[hh] * cr + sum;
                m_run[hh] = m_new;
            }
        }
        __syncthreads();
#pragma unroll
        for (int u = 0; u < per; u++) {
            int i = tid + u * PF_THREADS;
            int hh = i / D, e = i % D;
            if (hh < nh) {
                float a = acc[u] * corr[hh];
                for (int j = 0; j < n; j++) a += ps[hh][j] * vs[j][e];
                acc[u] = a;
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < per; u++) {
        int i = tid + u * PF_THREADS;
        int hh = i / D, e = i % D;
        if (hh < nh) y[(i64)t * H * D + (i64)(h0 + hh) * D + e] = acc[u] / l_run[hh];
    }
}
