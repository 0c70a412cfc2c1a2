// Embedding gather and row selection.
#include "common.cuh"

// y[r, :] = dequantize(table[ids[r], :]) for r in 0..R; table has n_rows rows of `row_bytes`
// bytes holding E elements. An id outside the table writes a row of NaN (the host validates ids
// first; this keeps a bad id visible instead of reading out of bounds).
// Grid: (R); block: any multiple of 32.
template <typename T>
__device__ void embedding_impl(const u8* table, const int* ids, float* y, int n_rows, int E,
                               i64 row_bytes) {
    int r = blockIdx.x;
    int id = ids[r];
    float* out = y + (i64)r * E;
    if (id < 0 || id >= n_rows) {
        for (int i = threadIdx.x; i < E; i += blockDim.x) out[i] = __int_as_float(0x7fc00000);
        return;
    }
    const u8* row = table + (i64)id * row_bytes;
    for (int i = threadIdx.x; i < E; i += blockDim.x) out[i] = T::at(row, i);
}

#define EMBEDDING(name, T)                                                                    \
    extern "C" __global__ void embedding_##name(const u8* table, const int* ids, float* y,    \
                                                int n_rows, int E, i64 row_bytes) {           \
        embedding_impl<T>(table, ids, y, n_rows, E, row_bytes);                               \
    }
FOR_EACH_WEIGHT_TYPE(EMBEDDING)

// y[o, :] = x[rows[o], :] for o in 0..O, rows within 0..T (else NaN). Grid: (O).
extern "C" __global__ void select_rows(const float* x, const int* rows, float* y, int T, int N) {
    int o = blockIdx.x;
    int r = rows[o];
    float* out = y + (i64)o * N;
    if (r < 0 || r >= T) {
        for (int i = threadIdx.x; i < N; i += blockDim.x) out[i] = __int_as_float(0x7fc00000);
        return;
    }
    const float* in = x + (i64)r * N;
    for (int i = threadIdx.x; i < N; i += blockDim.x) out[i] = in[i];
}
