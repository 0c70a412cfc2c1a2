// Rotary position embedding (src/ir/op.rs RopeParams), and the fused rope + KV write.
// Angles as ggml's CPU rope (src/backend/cpu/kernels/rope.rs): theta_scale = powf(base, -2/n_rot),
// theta_i = p * theta_scale^i by repeated f32 multiplication, angle = freq_scale * (theta_i / ff[i]).
#include "common.cuh"

// Element e of head `x` (head_dim elements) after rotation for position p.
__device__ __forceinline__ float rope_elem(const float* x, int e, int p, int n_rot, int neox,
                                           float theta_scale, float freq_scale, const float* ff) {
    if (e >= n_rot) return x[e];
    int half = n_rot >> 1;
    int i, a, b;
    if (neox) {
        i = e < half ? e : e - half;
        a = i;
        b = i + half;
    } else {
        i = e >> 1;
        a = 2 * i;
        b = a + 1;
    }
    float theta = (float)p;
    for (int j = 0; j < i; j++) theta *= theta_scale;
    float f = ff ? ff[i] : 1.0f;
    float angle = freq_scale * (theta / f);
    float c = cosf(angle), s = sinf(angle);
    float x0 = x[a], x1 = x[b];
    // No fused multiply-adds, like the CPU reference.
    return e == a ? __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s))
                  : __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
}

// Head b (of H per token) of x rotated into y: what one block of rope_f32 does.
__device__ __forceinline__ void rope_head(const float* x, float* y, const int* pos,
                                          const float* ff, i64 b, int H, int D, int n_rot,
                                          int neox, float freq_base, float freq_scale) {
    int t = (int)(b / H);
    const float* head = x + b * D;
    float* out = y + b * D;
    float theta_scale = powf(freq_base, -2.0f / (float)n_rot);
    int p = pos[t];
    for (int e = threadIdx.x; e < D; e += blockDim.x)
        out[e] = rope_elem(head, e, p, n_rot, neox, theta_scale, freq_scale, ff);
}

// x, y: [T, H * D]; y must not alias x. pos: [T]. ff: [n_rot / 2] or null.
// Grid: (T * H); block: any multiple of 32.
extern "C" __global__ void rope_f32(const float* x, float* y, const int* pos, const float* ff,
                                    int H, int D, int n_rot, int neox, float freq_base,
                                    float freq_scale) {
    rope_head(x, y, pos, ff, (i64)blockIdx.x, H, D, n_rot, neox, freq_base, freq_scale);
}

// The cell of position p of `slot`: table[slot][p / page_size] * page_size + p % page_size.
__device__ __forceinline__ i64 cell_of(const int* tables, int table_stride, int slot, int p,
                                       int page_size) {
    return (i64)tables[(i64)slot * table_stride + p / page_size] * page_size + p % page_size;
}

// Writes each token's k and v (rounded to FP16) into its cell of the paged K and V caches
// ([n_cells, row] of FP16; row = n_kv_heads * head_dim). The cell of token t is that of position
// pos[t] in slot slots[t]'s page table. Cells outside 0..n_cells are skipped (the host checks).
// Grid: (T); block: any multiple of 32.
extern "C" __global__ void kv_write_f16(const float* k, const float* v, u16* kc, u16* vc,
                                        const int* pos, const int* slots, const int* tables,
                                        int table_stride, int page_size, i64 n_cells, int row) {
    int t = blockIdx.x;
    i64 c = cell_of(tables, table_stride, slots[t], pos[t], page_size);
    if (c < 0 || c >= n_cells) return;
    for (int e = threadIdx.x; e < row; e += blockDim.x) {
        kc[c * row + e] = f2h(k[(i64)t * row + e]);
        vc[c * row + e] = f2h(v[(i64)t * row + e]);
    }
}

// KV head b (of Hkv per token): k rotated and v, rounded to FP16, into the token's cell: what
// one block of rope_kv_write_f16 does.
__device__ __forceinline__ void rope_kv_head(const float* k, const float* v, u16* kc, u16* vc,
                                             const int* pos, const int* slots, const int* tables,
                                             int table_stride, int page_size, i64 n_cells,
                                             const float* ff, i64 b, int Hkv, int D, int n_rot,
                                             int neox, float freq_base, float freq_scale) {
    int t = (int)(b / Hkv), h = (int)(b % Hkv);
    int row = Hkv * D;
    int p = pos[t];
    i64 c = cell_of(tables, table_stride, slots[t], p, page_size);
    if (c < 0 || c >= n_cells) return;
    float theta_scale = powf(freq_base, -2.0f / (float)n_rot);
    const float* kh = k + (i64)t * row + (i64)h * D;
    const float* vh = v + (i64)t * row + (i64)h * D;
    for (int e = threadIdx.x; e < D; e += blockDim.x) {
        kc[c * row + h * D + e] = f2h(rope_elem(kh, e, p, n_rot, neox, theta_scale, freq_scale, ff));
        vc[c * row + h * D + e] = f2h(vh[e]);
    }
}

// kv_write(rope(k, pos), v): grid (T * Hkv), one head per block.
extern "C" __global__ void rope_kv_write_f16(const float* k, const float* v, u16* kc, u16* vc,
                                             const int* pos, const int* slots, const int* tables,
                                             int table_stride, int page_size, i64 n_cells,
                                             const float* ff, int Hkv, int D, int n_rot, int neox,
                                             float freq_base, float freq_scale) {
    rope_kv_head(k, v, kc, vc, pos, slots, tables, table_stride, page_size, n_cells, ff,
                 (i64)blockIdx.x, Hkv, D, n_rot, neox, freq_base, freq_scale);
}

// (rope(q, pos), kv_write(rope(k, pos), v)) in one launch: q, q_rope [T, H * D] (q_rope must
// not alias q), k, v [T, Hkv * D]. Grid (T * (H + Hkv)), one head per block: blocks below T * H
// rotate a query head as rope_f32, the rest write a KV head as rope_kv_write_f16, with the same
// arithmetic (bit-identical to the two kernels).
extern "C" __global__ void rope_qkv_write_f16(const float* q, float* q_rope, const float* k,
                                              const float* v, u16* kc, u16* vc, const int* pos,
                                              const int* slots, const int* tables,
                                              int table_stride, int page_size, i64 n_cells,
                                              const float* ff, int T, int H, int Hkv, int D,
                                              int n_rot, int neox, float freq_base,
                                              float freq_scale) {
    i64 b = (i64)blockIdx.x, nq = (i64)T * H;
    if (b < nq)
        rope_head(q, q_rope, pos, ff, b, H, D, n_rot, neox, freq_base, freq_scale);
    else
        rope_kv_head(k, v, kc, vc, pos, slots, tables, table_stride, page_size, n_cells, ff,
                     b - nq, Hkv, D, n_rot, neox, freq_base, freq_scale);
}
