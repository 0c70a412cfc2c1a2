// Whole kernels on the host: host_launch (kernels/host.h) runs a kernel's every thread as a
// fiber, with real barriers for __syncthreads and the warps' shuffles, so a kernel's index
// math, shared-memory tiling, reductions and edge handling are checked with no GPU, against f64
// references built on the reference decoders (T::at, themselves checked against the CPU by
// units.cpp). Run by tests/kernel_host.rs; prints a line per case, exits non-zero on a failure.
#include "../../kernels/attention.cu"
#include "../../kernels/dequant.cu"
#include "../../kernels/elementwise.cu"
#include "../../kernels/matvec.cu"
#include "../../kernels/mmq.cu"
#include "../../kernels/mmqt.cu"
#include "../../kernels/rope.cu"

#include <cstdio>
#include <string>
#include <vector>

static unsigned rnd = 2024;
static unsigned nx() {
    rnd = rnd * 1664525u + 1013904223u;
    return rnd >> 8;
}
static float unif() { return (float)(nx() & 0xffff) / 32768.0f - 1.0f; }

static int failures = 0;
static void report(const std::string& what, const std::vector<float>& got,
                   const std::vector<double>& want, double tol) {
    double scale = 1e-30, worst = 0;
    size_t at = 0;
    for (double w : want) scale = std::fmax(scale, std::fabs(w));
    for (size_t i = 0; i < got.size(); i++) {
        double e = std::isfinite(got[i]) ? std::fabs(got[i] - want[i]) / scale : INFINITY;
        if (e > worst) worst = e, at = i;
    }
    bool ok = worst <= tol;
    failures += !ok;
    std::printf("%s: %s (worst %.2e at %zu: %.7g vs %.7g)\n", what.c_str(), ok ? "ok" : "FAILED",
                worst, at, got.empty() ? 0.0 : got[at], want.empty() ? 0.0 : want[at]);
}

// ---- Unit matvec kernels: y = x W^T for R rows, W random blocks with sane FP16 scales. ----

// `n` rows of random blocks of `block_bytes` bytes holding `block_elems` elements, the FP16
// fields at `halves` (offsets in a block) drawn from small normal numbers; float types
// (block_elems 1) get random values of their width instead of random bits.
static std::vector<u8> random_rows(int n, int k, int block_bytes, int block_elems,
                                   std::vector<int> halves) {
    int rb = k / block_elems * block_bytes;
    std::vector<u8> w((size_t)n * rb + 16);
    for (auto& b : w) b = (u8)nx();
    if (block_elems == 1) {
        for (size_t i = 0; i + block_bytes <= (size_t)n * rb; i += block_bytes) {
            float f = unif();
            if (block_bytes == 4) std::memcpy(&w[i], &f, 4);
            u16 h = block_bytes == 2 && halves.empty() ? f2h(f) : (u16)(__float_as_int(f) >> 16);
            if (block_bytes == 2) std::memcpy(&w[i], &h, 2);
        }
        return w;
    }
    for (int r = 0; r < n; r++)
        for (int b = 0; b < k / block_elems; b++)
            for (int o : halves) {
                u16 h = (u16)(0x2000 + nx() % 0x1400) | (u16)((nx() & 1) << 15);
                std::memcpy(&w[(size_t)r * rb + (size_t)b * block_bytes + o], &h, 2);
            }
    return w;
}

typedef void (*Mmv)(const u8*, const float*, float*, int, int, i64);
typedef void (*GateUp)(const u8*, const u8*, const float*, float*, int, int, i64);

// The host's block for K (matmul.rs `unit_block`): a warp per 32 units of 8, 32 to 128 threads.
static unsigned unit_block(int k) { return (unsigned)std::min(128, std::max(32, (k / 8 + 31) / 32 * 32)); }

// `cols` output columns a block (`gate_cols` for gate/up, 0: cols / 2), blocks of `block`
// threads (0: unit_block(k)).
template <typename T>
static void check_mmv(const char* ty, int n, int k, int block_bytes, int block_elems,
                      std::vector<int> halves, int rows, int cols, Mmv kernel,
                      GateUp gate_up, int gate_cols = 0, unsigned block = 0) {
    int rb = k / block_elems * block_bytes;
    std::vector<u8> w = random_rows(n, k, block_bytes, block_elems, halves);
    std::vector<u8> w2 = random_rows(n, k, block_bytes, block_elems, halves);
    std::vector<float> x((size_t)rows * k);
    for (auto& v : x) v = unif();
    std::vector<double> want((size_t)rows * n), want_gu((size_t)rows * n);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < n; c++) {
            double a = 0, b = 0;
            for (int e = 0; e < k; e++) {
                a += (double)T::at(&w[(size_t)c * rb], e) * x[(size_t)r * k + e];
                b += (double)T::at(&w2[(size_t)c * rb], e) * x[(size_t)r * k + e];
            }
            want[(size_t)r * n + c] = a;
            want_gu[(size_t)r * n + c] = a / (1.0 + std::exp(-a)) * b;
        }
    unsigned threads = block ? block : unit_block(k);
    unsigned grid = (unsigned)((n + cols - 1) / cols);
    std::vector<float> y((size_t)rows * n, NAN);
    host_launch({grid, 1, 1}, threads, [&] { kernel(w.data(), x.data(), y.data(), n, k, rb); });
    report(std::string("mmv ") + ty + " rows " + std::to_string(rows) + " cols " +
               std::to_string(cols) + " " + std::to_string(n) + "x" + std::to_string(k),
           y, want, 1e-5);
    if (gate_up) {
        std::vector<float> g((size_t)rows * n, NAN);
        int gc = gate_cols ? gate_cols : std::max(1, cols / 2);
        unsigned ggrid = (unsigned)((n + gc - 1) / gc);
        host_launch({ggrid, 1, 1}, threads,
                    [&] { gate_up(w.data(), w2.data(), x.data(), g.data(), n, k, rb); });
        report(std::string("gate_up ") + ty + " rows " + std::to_string(rows), g, want_gu, 1e-5);
    }
}

// ---- One sequence's bits whatever the launch: the one-column kernel at one row (the K-quants
// take their unit steps four a pass there, see ScaledSteps), the four-column one (one a pass)
// and row 0 of the two-row kernel must give the same bits for every column, the matvec and the
// fused gate/up alike; and for the K-quants the one-column-a-warp kernels (`wc`, 128 threads:
// four columns a block, whatever K; `wc2`, `wc4`: two and four warps a column, two and one
// columns a block) the one-column kernel's, at the host's block for K and at 128 threads. ----
struct WcKernels {
    Mmv mmv;
    GateUp gate_up;
    int cols;  // a block of 128 threads
};

template <typename T>
static void check_same_bits(const char* ty, int k, int block_bytes, int block_elems,
                            std::vector<int> halves, Mmv r1, Mmv c1, Mmv r2, GateUp g_r1,
                            GateUp g_c1, GateUp g_r2, std::vector<WcKernels> wcs = {}) {
    const int n = 9;
    int rb = k / block_elems * block_bytes;
    std::vector<u8> w = random_rows(n, k, block_bytes, block_elems, halves);
    std::vector<u8> w2 = random_rows(n, k, block_bytes, block_elems, halves);
    std::vector<float> x(2 * (size_t)k);
    for (auto& v : x) v = unif();
    unsigned threads = unit_block(k);
    auto grid = [](int cols) { return HostDim3{(unsigned)((n + cols - 1) / cols), 1, 1}; };
    std::vector<float> a(n, NAN), b(n, NAN), c(2 * n, NAN);
    host_launch(grid(4), threads, [&] { r1(w.data(), x.data(), a.data(), n, k, rb); });
    host_launch(grid(1), threads, [&] { c1(w.data(), x.data(), b.data(), n, k, rb); });
    host_launch(grid(4), threads, [&] { r2(w.data(), x.data(), c.data(), n, k, rb); });
    std::vector<float> ga(n, NAN), gb(n, NAN), gc(2 * n, NAN);
    host_launch(grid(2), threads, [&] { g_r1(w.data(), w2.data(), x.data(), ga.data(), n, k, rb); });
    host_launch(grid(1), threads, [&] { g_c1(w.data(), w2.data(), x.data(), gb.data(), n, k, rb); });
    host_launch(grid(2), threads, [&] { g_r2(w.data(), w2.data(), x.data(), gc.data(), n, k, rb); });
    bool finite = true;
    for (float v : a) finite = finite && std::isfinite(v);
    bool ok = finite && std::memcmp(a.data(), b.data(), 4 * n) == 0 &&
              std::memcmp(a.data(), c.data(), 4 * n) == 0 &&
              std::memcmp(ga.data(), gb.data(), 4 * n) == 0 &&
              std::memcmp(ga.data(), gc.data(), 4 * n) == 0;
    if (!wcs.empty()) {
        std::vector<float> d(n, NAN), gd(n, NAN);
        host_launch(grid(1), 128, [&] { c1(w.data(), x.data(), d.data(), n, k, rb); });
        host_launch(grid(1), 128, [&] { g_c1(w.data(), w2.data(), x.data(), gd.data(), n, k, rb); });
        ok = ok && std::memcmp(a.data(), d.data(), 4 * n) == 0 &&
             std::memcmp(ga.data(), gd.data(), 4 * n) == 0;
    }
    for (const WcKernels& wc : wcs) {
        std::vector<float> e(n, NAN), ge(n, NAN);
        host_launch(grid(wc.cols), 128, [&] { wc.mmv(w.data(), x.data(), e.data(), n, k, rb); });
        host_launch(grid(wc.cols), 128,
                    [&] { wc.gate_up(w.data(), w2.data(), x.data(), ge.data(), n, k, rb); });
        ok = ok && std::memcmp(a.data(), e.data(), 4 * n) == 0 &&
             std::memcmp(ga.data(), ge.data(), 4 * n) == 0;
    }
    if (!ok) failures++;
    std::printf("same bits %s K %d (r1, r1 c1, r2 row 0%s; matvec and gate/up): %s\n", ty, k,
                wcs.empty() ? "" : ", r1 c1 at 128 threads, r1 wc, wc2, wc4", ok ? "ok" : "FAILED");
}

#define SAME_BITS(ty, T, K, BB, BE, HALVES)                                                     \
    check_same_bits<T>(#ty, K, BB, BE, HALVES, mmv_##ty##_r1, mmv_##ty##_r1_c1, mmv_##ty##_r2, \
                       gate_up_swiglu_##ty##_r1, gate_up_swiglu_##ty##_r1_c1,                 \
                       gate_up_swiglu_##ty##_r2)
// The K-quants: with their one-column-a-warp kernels too.
#define SAME_BITS_WC(ty, T, K, BB, BE, HALVES)                                                  \
    check_same_bits<T>(#ty, K, BB, BE, HALVES, mmv_##ty##_r1, mmv_##ty##_r1_c1, mmv_##ty##_r2, \
                       gate_up_swiglu_##ty##_r1, gate_up_swiglu_##ty##_r1_c1,                 \
                       gate_up_swiglu_##ty##_r2,                                               \
                       {{mmv_##ty##_r1_wc, gate_up_swiglu_##ty##_r1_wc, 4},                   \
                        {mmv_##ty##_r1_wc2, gate_up_swiglu_##ty##_r1_wc2, 2},                 \
                        {mmv_##ty##_r1_wc4, gate_up_swiglu_##ty##_r1_wc4, 1}})

// ---- mmv3: up to three matrices (the plan's multi_matmul) in one launch, at one row. Each
// output must be bit for bit the single-matrix kernel's (`single`, same columns a block), and
// within f64 rounding of the reference; `two` leaves the third matrix out (n2 = 0). ----
typedef void (*Mmv3)(const u8*, const u8*, const u8*, const float*, float*, float*, float*, int,
                     int, int, int, i64);

template <typename T>
static void check_mmv3(const char* ty, int k, int block_bytes, int block_elems,
                       std::vector<int> halves, int cols, Mmv3 kernel, Mmv single, bool two,
                       unsigned block = 0) {
    int rb = k / block_elems * block_bytes, m = two ? 2 : 3;
    int ns[3] = {9, 5, two ? 0 : 12};
    std::vector<u8> w[3];
    for (int i = 0; i < 3; i++) w[i] = random_rows(std::max(ns[i], 1), k, block_bytes, block_elems, halves);
    std::vector<float> x(k);
    for (auto& v : x) v = unif();
    std::vector<float> y[3];
    unsigned grid = 0;
    for (int i = 0; i < 3; i++) {
        y[i].assign(std::max(ns[i], 1), NAN);
        grid += (unsigned)((ns[i] + cols - 1) / cols);
    }
    unsigned threads = block ? block : unit_block(k);
    host_launch({grid, 1, 1}, threads, [&] {
        kernel(w[0].data(), w[1].data(), w[2].data(), x.data(), y[0].data(), y[1].data(),
               y[2].data(), ns[0], ns[1], ns[2], k, rb);
    });
    for (int i = 0; i < m; i++) {
        std::vector<float> alone(ns[i], NAN);
        host_launch({(unsigned)((ns[i] + cols - 1) / cols), 1, 1}, threads,
                    [&] { single(w[i].data(), x.data(), alone.data(), ns[i], k, rb); });
        std::vector<double> want(ns[i]);
        for (int c = 0; c < ns[i]; c++) {
            double a = 0;
            for (int e = 0; e < k; e++) a += (double)T::at(&w[i][(size_t)c * rb], e) * x[e];
            want[c] = a;
        }
        std::string what = std::string("mmv3 ") + ty + " cols " + std::to_string(cols) +
                           (two ? " of 2" : " of 3") + " matrix " + std::to_string(i);
        bool same = std::memcmp(alone.data(), y[i].data(), 4 * (size_t)ns[i]) == 0;
        if (!same) {
            failures++;
            std::printf("%s: FAILED (not the single-matrix kernel's bits)\n", what.c_str());
        }
        report(what, std::vector<float>(y[i].begin(), y[i].begin() + ns[i]), want, 1e-5);
    }
    if (two && !std::isnan(y[2][0])) {
        failures++;
        std::printf("mmv3 %s of 2: wrote the absent third output\n", ty);
    }
}

#define MMV3_CASES(ty, T, K, BB, BE, HALVES)                                              \
    do {                                                                                  \
        check_mmv3<T>(#ty, K, BB, BE, HALVES, 4, mmv3_##ty##_r1, mmv_##ty##_r1, false);  \
        check_mmv3<T>(#ty, K, BB, BE, HALVES, 1, mmv3_##ty##_r1_c1, mmv_##ty##_r1_c1,    \
                      false);                                                             \
        check_mmv3<T>(#ty, K, BB, BE, HALVES, 1, mmv3_##ty##_r1_c1, mmv_##ty##_r1_c1, true); \
    } while (0)
// The K-quants' one-column-a-warp mmv3 (four columns a block of 128 threads; wc2 and wc4: two
// and one).
#define MMV3_WC_CASES(ty, T, K, BB, BE, HALVES)                                                 \
    do {                                                                                        \
        check_mmv3<T>(#ty " wc", K, BB, BE, HALVES, 4, mmv3_##ty##_r1_wc, mmv_##ty##_r1_wc,     \
                      false, 128);                                                              \
        check_mmv3<T>(#ty " wc", K, BB, BE, HALVES, 4, mmv3_##ty##_r1_wc, mmv_##ty##_r1_wc,     \
                      true, 128);                                                               \
        check_mmv3<T>(#ty " wc2", K, BB, BE, HALVES, 2, mmv3_##ty##_r1_wc2, mmv_##ty##_r1_wc2,  \
                      false, 128);                                                              \
        check_mmv3<T>(#ty " wc4", K, BB, BE, HALVES, 1, mmv3_##ty##_r1_wc4, mmv_##ty##_r1_wc4,  \
                      true, 128);                                                               \
    } while (0)

// ---- Tiled matmuls (mmq.cu): R rows on a tile of BR, K in splits of `chunk`, then the
// reduction. ----
typedef void (*Mmq)(const u8*, const float*, float*, float*, int, int, int, i64, int);
typedef void (*GateUpMmq)(const u8*, const u8*, const float*, float*, float*, int, int, int, i64,
                          int);

// `kind` "mmq" (FP32 FMAs, 4 BR threads) or "mmqt" (TF32 MMAs, 128 threads: the host emulates
// the MMA with shuffles, FP32 sums of TF32-rounded operands, so it checks the fragments' index
// math and the k permutation, not the hardware's sum order).
template <typename T>
static void check_mmq(const char* ty, int n, int k, int block_bytes, int block_elems,
                      std::vector<int> halves, int rows, int br, int chunk, Mmq kernel,
                      GateUpMmq gate_up, const char* kind = "mmq") {
    const bool tc = std::string(kind) == "mmqt";
    int rb = k / block_elems * block_bytes, splits = (k + chunk - 1) / chunk;
    std::vector<u8> w = random_rows(n, k, block_bytes, block_elems, halves);
    std::vector<u8> w2 = random_rows(n, k, block_bytes, block_elems, halves);
    std::vector<float> x((size_t)rows * k);
    for (auto& v : x) v = unif();
    std::vector<double> want((size_t)rows * n), want_gu((size_t)rows * n);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < n; c++) {
            double a = 0, b = 0;
            for (int e = 0; e < k; e++) {
                a += (double)T::at(&w[(size_t)c * rb], e) * x[(size_t)r * k + e];
                b += (double)T::at(&w2[(size_t)c * rb], e) * x[(size_t)r * k + e];
            }
            want[(size_t)r * n + c] = a;
            want_gu[(size_t)r * n + c] = a / (1.0 + std::exp(-a)) * b;
        }
    long long rn = (long long)rows * n;
    for (int m = 1; m <= 2; m++) {
        std::vector<float> y(rn, NAN), part(splits > 1 ? (size_t)splits * m * rn : 1, NAN);
        float* pp = splits > 1 ? part.data() : nullptr;
        unsigned gx = (unsigned)((n + 128 / m - 1) / (128 / m));
        host_launch({gx, (unsigned)splits, 1}, tc ? 128 : br / 4 * 16, [&] {
            if (m == 1)
                kernel(w.data(), x.data(), y.data(), pp, rows, n, k, rb, chunk);
            else
                gate_up(w.data(), w2.data(), x.data(), y.data(), pp, rows, n, k, rb, chunk);
        });
        if (splits > 1)
            host_launch({(unsigned)((rn + 255) / 256), 1, 1}, 256, [&] {
                if (m == 1)
                    mmq_reduce_m1(part.data(), y.data(), rn, splits);
                else
                    mmq_reduce_m2(part.data(), y.data(), rn, splits);
            });
        // TF32 keeps 10 mantissa bits of each operand (2^-11 of each, relative).
        report(std::string(m == 1 ? "" : "gate_up_") + kind + " " + ty + " rows " +
                   std::to_string(rows) + " tile " + std::to_string(br) + " splits " +
                   std::to_string(splits) + " " + std::to_string(n) + "x" + std::to_string(k),
               y, m == 1 ? want : want_gu, tc ? 3e-3 : 1e-5);
    }
}

#define MMQ_CASES(ty, T, K, BB, BE, HALVES)                                                       \
    do {                                                                                         \
        check_mmq<T>(#ty, 67, K, BB, BE, HALVES, 9, 16, K, mmq_##ty##_r16, gate_up_mmq_##ty##_r16); \
        check_mmq<T>(#ty, 131, K, BB, BE, HALVES, 17, 32, K / 2, mmq_##ty##_r32,                 \
                     gate_up_mmq_##ty##_r32);                                                    \
        check_mmq<T>(#ty, 67, K, BB, BE, HALVES, 33, 64, 256, mmq_##ty##_r64,                    \
                     gate_up_mmq_##ty##_r64);                                                    \
    } while (0)

// The tensor-core tiles: 8 rows (one n-tile) whole, 9 of 16, 17 of 32, 33 of 64; 67 and 131
// columns end inside a warp's m-tiles; one split, two, three and a slab a split.
#define MMQT_CASES(ty, T, K, BB, BE, HALVES)                                                      \
    do {                                                                                         \
        check_mmq<T>(#ty, 67, K, BB, BE, HALVES, 8, 8, K, mmqt_##ty##_r8, gate_up_mmqt_##ty##_r8, \
                     "mmqt");                                                                    \
        check_mmq<T>(#ty, 131, K, BB, BE, HALVES, 9, 16, K / 2, mmqt_##ty##_r16,                 \
                     gate_up_mmqt_##ty##_r16, "mmqt");                                           \
        check_mmq<T>(#ty, 67, K, BB, BE, HALVES, 17, 32, 256, mmqt_##ty##_r32,                   \
                     gate_up_mmqt_##ty##_r32, "mmqt");                                           \
        check_mmq<T>(#ty, 67, K, BB, BE, HALVES, 33, 64, 32, mmqt_##ty##_r64,                    \
                     gate_up_mmqt_##ty##_r64, "mmqt");                                           \
    } while (0)

// ---- Attention over a paged FP16 cache against f64 softmax attention. ----

struct Case {
    int h, hkv, d, window;
    std::vector<std::pair<int, int> > tokens;  // (slot, position)
    // Flash-decoding's split policy (attn_decode_chunk): ceil(len / min_split) splits of a
    // context, at most max_splits.
    int min_split = 128, max_splits = 64;
    int page = 16;
    bool short_launch = false;  // also launch one split where the tokens need more
    bool all_groups = false;    // every G that divides H / Hkv, not only the launcher's
};

// The decode kernels by query heads a block (index G; 0: the per-head attention_decode_f16).
typedef void (*DecodeKernel)(const float*, const u16*, const u16*, const int*, const int*,
                             const int*, int, int, int, int, int, float, int, int, int, float*,
                             float*, float*, float*);
static const DecodeKernel decode_kernels[9] = {
    attention_decode_f16,    attention_decode_g1_f16, attention_decode_g2_f16,
    attention_decode_g3_f16, attention_decode_g4_f16, attention_decode_g5_f16,
    attention_decode_g6_f16, attention_decode_g7_f16, attention_decode_g8_f16};

// The lane-a-position decode kernels (head_dim 64 and 128) by query heads a block (index G):
// the general kernels' arguments, then the merge's counters (null: attention_combine merges).
typedef void (*LanesKernel)(const float*, const u16*, const u16*, const int*, const int*,
                            const int*, int, int, int, int, int, float, int, int, int, float*,
                            float*, float*, float*, unsigned*);
static const LanesKernel lanes_kernels[2][9] = {
    {nullptr, attention_decode_lanes_d64_g1_f16, attention_decode_lanes_d64_g2_f16,
     attention_decode_lanes_d64_g3_f16, attention_decode_lanes_d64_g4_f16,
     attention_decode_lanes_d64_g5_f16, attention_decode_lanes_d64_g6_f16,
     attention_decode_lanes_d64_g7_f16, attention_decode_lanes_d64_g8_f16},
    {nullptr, attention_decode_lanes_d128_g1_f16, attention_decode_lanes_d128_g2_f16,
     attention_decode_lanes_d128_g3_f16, attention_decode_lanes_d128_g4_f16,
     attention_decode_lanes_d128_g5_f16, attention_decode_lanes_d128_g6_f16,
     attention_decode_lanes_d128_g7_f16, attention_decode_lanes_d128_g8_f16}};

// The split count the launcher gives a step (Ops::attention_decode): the most any token needs.
static int decode_splits(const std::vector<int>& pos, int window, int min_split, int max_splits) {
    int splits = 1;
    for (int p : pos) {
        int len = window > 0 ? std::min(p + 1, window) : p + 1;
        int s = std::max(1, std::min((len + min_split - 1) / min_split, max_splits));
        int chunk = attn_decode_chunk(len, min_split, max_splits);
        if ((long)chunk * s < len) {
            std::printf("attn_decode_chunk(%d, %d, %d) = %d does not cover %d splits: FAILED\n",
                        len, min_split, max_splits, chunk, s);
            failures++;
        }
        splits = std::max(splits, s);
    }
    return splits;
}

// attn_decode_chunk at the values src/backend/cuda/ops.rs's unit test checks DecodeSplits at.
static void check_decode_chunks() {
    const int v[][4] = {{4096, 128, 66, 128}, {4097, 128, 66, 128}, {16384, 128, 66, 256},
                        {300, 128, 64, 128},  {1000, 128, 3, 352},  {1, 128, 64, 32},
                        {600, 128, 1, 608}};
    int bad = 0;
    for (auto& c : v) bad += attn_decode_chunk(c[0], c[1], c[2]) != c[3];
    failures += bad != 0;
    std::printf("attn_decode_chunk: %s\n", bad ? "FAILED" : "ok");
}

// attention_combine as it was before its loads were staged (one dependent load a split; its sums
// FMAs): the kernel must give its bits, on partials with empty splits, up to COMB_MAX splits and
// past.
static void combine_reference(const float* part_m, const float* part_l, const float* part_acc,
                              float* y, int H, int T, int D, int S) {
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            long base = ((long)t * H + h) * S;
            float M = -INFINITY;
            for (int s = 0; s < S; s++) M = fmaxf(M, part_m[base + s]);
            float L = 0.0f;
            for (int s = 0; s < S; s++)
                if (part_m[base + s] != -INFINITY) L = fmaf(part_l[base + s], expf(part_m[base + s] - M), L);
            float inv = 1.0f / L;
            for (int e = 0; e < D; e++) {
                float a = 0.0f;
                for (int s = 0; s < S; s++)
                    if (part_m[base + s] != -INFINITY)
                        a = fmaf(part_acc[(base + s) * D + e], expf(part_m[base + s] - M), a);
                y[(long)t * H * D + (long)h * D + e] = a * inv;
            }
        }
}

static void check_combine(int h, int t, int d, int splits) {
    int parts = t * h * splits;
    std::vector<float> pm(parts), pl(parts), pa((size_t)parts * d);
    for (int i = 0; i < parts; i++) {
        bool empty = nx() % 5 == 0 && i % splits != 0;
        pm[i] = empty ? -INFINITY : 3.0f * unif();
        pl[i] = empty ? 0.0f : 1.0f + 40.0f * std::fabs(unif());
        for (int e = 0; e < d; e++) pa[(size_t)i * d + e] = empty ? 0.0f : 10.0f * unif();
    }
    std::vector<float> y((size_t)t * h * d, NAN), want(y.size(), NAN);
    host_launch({(unsigned)h, (unsigned)t, 1}, 64, [&] {
        attention_combine(pm.data(), pl.data(), pa.data(), y.data(), h, d, splits);
    });
    combine_reference(pm.data(), pl.data(), pa.data(), want.data(), h, t, d, splits);
    bool same = std::memcmp(y.data(), want.data(), y.size() * sizeof(float)) == 0;
    failures += !same;
    std::printf("attention combine H%d D%d %d tokens %d splits: bit for bit %s\n", h, d, t, splits,
                same ? "ok" : "FAILED");
}

// Flash-decoding with kernel `g` (query heads a block; 0 the per-head kernel; with `lanes` the
// lane-a-position kernel of G = g, with `fused` merging in its last blocks) over `splits`
// splits, then the combine unless there is one (or the kernel merged).
static std::vector<float> run_decode(int g, const Case& c, int splits, const std::vector<float>& q,
                                     const std::vector<u16>& kc, const std::vector<u16>& vc,
                                     const std::vector<int>& pos, const std::vector<int>& slots,
                                     const std::vector<int>& tables, int per_slot, int page,
                                     float scale, bool lanes = false, bool fused = false) {
    int t = (int)pos.size(), parts = t * c.h * splits;
    std::vector<float> pm(parts, NAN), pl(parts, NAN), pa((size_t)parts * c.d, NAN), y(q.size(), NAN);
    unsigned gx = (unsigned)(g == 0 ? c.h : c.h / g);
    std::vector<unsigned> counters(gx * t, 0);
    if (lanes) {
        host_launch({gx, (unsigned)t, (unsigned)splits}, 128, [&] {
            lanes_kernels[c.d == 128][g](q.data(), kc.data(), vc.data(), pos.data(), slots.data(),
                                         tables.data(), per_slot, page, c.h, c.hkv, c.d, scale,
                                         c.window, c.min_split, c.max_splits, pm.data(), pl.data(),
                                         pa.data(), y.data(), fused ? counters.data() : nullptr);
        });
        bool reset = std::all_of(counters.begin(), counters.end(), [](unsigned v) { return v == 0; });
        if (!reset) {
            std::printf("attention decode lanes G%d: merge counters not reset: FAILED\n", g);
            failures++;
        }
        if (fused) return y;
    } else host_launch({gx, (unsigned)t, (unsigned)splits}, 128, [&] {
        decode_kernels[g](q.data(), kc.data(), vc.data(), pos.data(), slots.data(), tables.data(),
                          per_slot, page, c.h, c.hkv, c.d, scale, c.window, c.min_split,
                          c.max_splits, pm.data(), pl.data(), pa.data(), y.data());
    });
    if (splits > 1)
        host_launch({(unsigned)c.h, (unsigned)t, 1}, 64, [&] {
            attention_combine(pm.data(), pl.data(), pa.data(), y.data(), c.h, c.d, splits);
        });
    return y;
}

static void check_attention(const Case& c) {
    const int page = c.page, t = (int)c.tokens.size(), row = c.hkv * c.d;
    int max_pos = 0, n_slots = 0;
    for (auto& tk : c.tokens) max_pos = std::max(max_pos, tk.second), n_slots = std::max(n_slots, tk.first + 1);
    int per_slot = (max_pos + 1 + page - 1) / page, pool = n_slots * per_slot + 3;
    std::vector<int> perm(pool);
    for (int i = 0; i < pool; i++) perm[i] = i;
    for (int i = pool - 1; i > 0; i--) std::swap(perm[i], perm[nx() % (i + 1)]);
    std::vector<int> tables(perm.begin(), perm.begin() + n_slots * per_slot);
    std::vector<u16> kc((size_t)pool * page * row), vc(kc.size());
    for (auto& v : kc) v = f2h(unif());
    for (auto& v : vc) v = f2h(unif());
    std::vector<float> q((size_t)t * c.h * c.d);
    for (auto& v : q) v = 2.0f * unif();
    std::vector<int> pos(t), slots(t);
    for (int i = 0; i < t; i++) slots[i] = c.tokens[i].first, pos[i] = c.tokens[i].second;
    float scale = 1.0f / std::sqrt((float)c.d);
    std::vector<double> want((size_t)t * c.h * c.d);
    for (int i = 0; i < t; i++) {
        int p = pos[i], lo = c.window > 0 && p + 1 > c.window ? p + 1 - c.window : 0;
        for (int hh = 0; hh < c.h; hh++) {
            int g = hh / (c.h / c.hkv);
            std::vector<double> s;
            std::vector<long> cells;
            for (int pp = lo; pp <= p; pp++) {
                long cell = (long)tables[slots[i] * per_slot + pp / page] * page + pp % page;
                double d = 0;
                for (int e = 0; e < c.d; e++)
                    d += (double)q[((size_t)i * c.h + hh) * c.d + e] * h2f(kc[cell * row + g * c.d + e]);
                s.push_back(d * scale);
                cells.push_back(cell);
            }
            double m = -INFINITY, sum = 0;
            for (double v : s) m = std::fmax(m, v);
            for (double& v : s) sum += (v = std::exp(v - m));
            for (int e = 0; e < c.d; e++) {
                double a = 0;
                for (size_t j = 0; j < s.size(); j++) a += s[j] * h2f(vc[cells[j] * row + g * c.d + e]);
                want[((size_t)i * c.h + hh) * c.d + e] = a / sum;
            }
        }
    }
    char what[128];
    std::snprintf(what, sizeof what, "H%d/%d D%d window %d, %d tokens to %d", c.h, c.hkv, c.d,
                  c.window, t, max_pos);
    // Decode: the per-head kernel against f64 math, then the grouped kernel the launcher picks
    // (the largest G of 1..8 that divides H / Hkv; with all_groups every such G) against the
    // per-head kernel's bits.
    int splits = decode_splits(pos, c.window, c.min_split, c.max_splits);
    std::snprintf(what, sizeof what, "H%d/%d D%d window %d, %d tokens to %d, %d splits", c.h,
                  c.hkv, c.d, c.window, t, max_pos, splits);
    std::vector<float> y = run_decode(0, c, splits, q, kc, vc, pos, slots, tables, per_slot, page, scale);
    report(std::string("attention decode ") + what, y, want, 1e-4);
    int ratio = c.h / c.hkv, largest = 1;
    for (int g = 1; g <= 8; g++)
        if (ratio % g == 0) largest = g;
    for (int g = 1; g <= 8; g++) {
        if (ratio % g || (g != largest && !(c.all_groups && g > 1))) continue;
        std::vector<float> yg = run_decode(g, c, splits, q, kc, vc, pos, slots, tables, per_slot, page, scale);
        bool same = std::memcmp(yg.data(), y.data(), y.size() * sizeof(float)) == 0;
        failures += !same;
        std::printf("attention decode G%d %s: bit for bit %s\n", g, what, same ? "ok" : "FAILED");
    }
    // Fewer splits than the tokens need: the last split takes the rest of each context.
    if (c.short_launch && splits > 1) {
        std::vector<float> y1 = run_decode(largest, c, 1, q, kc, vc, pos, slots, tables, per_slot, page, scale);
        report(std::string("attention decode one launch split ") + what, y1, want, 1e-4);
    }
    // The lane-a-position kernels (head_dim 64 and 128), the same way: G = 1 against f64 math,
    // the other G against its bits.
    if (c.d == 64 || c.d == 128) {
        std::vector<float> yl = run_decode(1, c, splits, q, kc, vc, pos, slots, tables, per_slot, page, scale, true);
        report(std::string("attention decode lanes ") + what, yl, want, 1e-4);
        // Merged in the decode kernel's last blocks: attention_combine's bits, at every G.
        for (int g = 1; g <= 8; g++) {
            if (ratio % g || (g != 1 && g != largest && !c.all_groups)) continue;
            std::vector<float> yf = run_decode(g, c, splits, q, kc, vc, pos, slots, tables, per_slot, page, scale, true, true);
            bool same = std::memcmp(yf.data(), yl.data(), yl.size() * sizeof(float)) == 0;
            failures += !same;
            std::printf("attention decode lanes merged G%d %s: bit for bit %s\n", g, what, same ? "ok" : "FAILED");
        }
        for (int g = 2; g <= 8; g++) {
            if (ratio % g || (g != largest && !c.all_groups)) continue;
            std::vector<float> yg = run_decode(g, c, splits, q, kc, vc, pos, slots, tables, per_slot, page, scale, true);
            bool same = std::memcmp(yg.data(), yl.data(), yl.size() * sizeof(float)) == 0;
            failures += !same;
            std::printf("attention decode lanes G%d %s: bit for bit %s\n", g, what, same ? "ok" : "FAILED");
        }
        if (c.short_launch && splits > 1) {
            std::vector<float> y1 = run_decode(largest, c, 1, q, kc, vc, pos, slots, tables, per_slot, page, scale, true);
            report(std::string("attention decode lanes one launch split ") + what, y1, want, 1e-4);
        }
    }
    if (c.d <= PF_MAX_D) {
        int ratio = c.h / c.hkv, nt = PF_R / std::min(ratio, PF_R);
        unsigned gx = (unsigned)(c.hkv * ((ratio + PF_R - 1) / PF_R)), gy = (unsigned)((t + nt - 1) / nt);
        std::vector<float> yp(q.size(), NAN);
        host_launch({gx, gy, 1}, PF_THREADS, [&] {
            attention_prefill_f16(q.data(), kc.data(), vc.data(), pos.data(), slots.data(),
                                  tables.data(), per_slot, page, t, c.h, c.hkv, c.d, scale,
                                  c.window, yp.data());
        });
        report(std::string("attention prefill ") + what, yp, want, 1e-4);
    }
}

// ---- The fused rope + q/k/v write against rope_f32 then rope_kv_write_f16, bit for bit. ----

static void check_rope_qkv_write(int h, int hkv, int d, int n_rot, int neox, bool with_ff,
                                 const std::vector<std::pair<int, int> >& tokens) {
    const int page = 16, t = (int)tokens.size(), row = hkv * d;
    const float base = 10000.0f, fscale = 0.5f;
    int max_pos = 0, n_slots = 0;
    for (auto& tk : tokens) max_pos = std::max(max_pos, tk.second), n_slots = std::max(n_slots, tk.first + 1);
    int per_slot = (max_pos + 1 + page - 1) / page, pool = n_slots * per_slot + 3;
    std::vector<int> perm(pool);
    for (int i = 0; i < pool; i++) perm[i] = i;
    for (int i = pool - 1; i > 0; i--) std::swap(perm[i], perm[nx() % (i + 1)]);
    std::vector<int> tables(perm.begin(), perm.begin() + n_slots * per_slot);
    std::vector<int> pos(t), slots(t);
    for (int i = 0; i < t; i++) slots[i] = tokens[i].first, pos[i] = tokens[i].second;
    std::vector<float> q((size_t)t * h * d), k((size_t)t * row), v(k.size()), ff(n_rot / 2);
    for (auto& x : q) x = 2.0f * unif();
    for (auto& x : k) x = 2.0f * unif();
    for (auto& x : v) x = unif();
    for (int i = 0; i < n_rot / 2; i++) ff[i] = 1.0f + 0.25f * (float)i;
    const float* f = with_ff ? ff.data() : nullptr;
    size_t cells = (size_t)pool * page * row;
    // The two kernels, then the fused one, into caches that start out alike (NaN bits, so a
    // cell left unwritten by one of them shows).
    std::vector<float> q_two(q.size(), NAN), q_one(q.size(), NAN);
    std::vector<u16> kc_two(cells, 0x7e00), vc_two(cells, 0x7e00), kc_one(cells, 0x7e00),
        vc_one(cells, 0x7e00);
    host_launch({(unsigned)(t * h), 1, 1}, 32, [&] {
        rope_f32(q.data(), q_two.data(), pos.data(), f, h, d, n_rot, neox, base, fscale);
    });
    host_launch({(unsigned)(t * hkv), 1, 1}, 32, [&] {
        rope_kv_write_f16(k.data(), v.data(), kc_two.data(), vc_two.data(), pos.data(),
                          slots.data(), tables.data(), per_slot, page, (i64)pool * page, f, hkv,
                          d, n_rot, neox, base, fscale);
    });
    host_launch({(unsigned)(t * (h + hkv)), 1, 1}, 32, [&] {
        rope_qkv_write_f16(q.data(), q_one.data(), k.data(), v.data(), kc_one.data(),
                           vc_one.data(), pos.data(), slots.data(), tables.data(), per_slot, page,
                           (i64)pool * page, f, t, h, hkv, d, n_rot, neox, base, fscale);
    });
    bool q_same = std::memcmp(q_one.data(), q_two.data(), q.size() * sizeof(float)) == 0;
    bool k_same = kc_one == kc_two, v_same = vc_one == vc_two;
    // Every token's cell was written (a NaN-free K row where the token's cell is).
    bool written = true;
    for (int i = 0; i < t; i++) {
        long c = (long)tables[slots[i] * per_slot + pos[i] / page] * page + pos[i] % page;
        for (int e = 0; e < row; e++) written &= kc_one[c * row + e] != 0x7e00;
    }
    bool q_finite = true;
    for (float x : q_one) q_finite &= std::isfinite(x);
    bool ok = q_same && k_same && v_same && written && q_finite;
    failures += !ok;
    std::printf("rope_qkv_write H%d/%d D%d rot %d neox %d ff %d, %d tokens to %d: %s "
                "(q_rope %s, K %s, V %s)\n",
                h, hkv, d, n_rot, neox, (int)with_ff, t, max_pos, ok ? "ok" : "FAILED",
                q_same ? "same" : "differs", k_same ? "same" : "differs",
                v_same ? "same" : "differs");
}

static std::vector<std::pair<int, int> > run(int slot, int start, int n) {
    std::vector<std::pair<int, int> > v;
    for (int i = 0; i < n; i++) v.push_back({slot, start + i});
    return v;
}

// ---- FP16 dequantization (the FP16 tensor-core GEMM's weight operand) and the activations'
// conversion: every element bit for bit T::at rounded to FP16 and the FP32 dequantization's value
// rounded to FP16, and (independently of the rounding code) an FP16 value nearest to it. ----

// Whether `h` is an FP16 value nearest to `v` (ties to even), with v's sign; past the largest
// FP16 (65504, up to the halfway point 65520) round-to-nearest gives inf; NaN stays NaN.
static bool is_nearest_f16(float v, u16 h) {
    if (std::isnan(v)) return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0;
    u16 s = std::signbit(v) ? 0x8000 : 0;
    if ((h & 0x8000) != s) return false;
    int mag = h & 0x7fff;
    double x = v;
    if (std::fabs(x) >= 65520.0) return mag == 0x7c00;
    if (mag >= 0x7c00) return false;
    double d = std::fabs((double)host_h2f(h) - x);
    for (int nb : {mag - 1, mag + 1}) {
        if (nb < 0 || nb >= 0x7c00) continue;
        double e = std::fabs((double)host_h2f((u16)(s | nb)) - x);
        if (e < d || (e == d && (mag & 1))) return false;
    }
    return true;
}

typedef void (*DeqF16)(const u8*, u16*, i64, int, i64);
typedef void (*DeqF32)(const u8*, float*, i64, int, i64);

template <typename T>
static void check_dequant_f16(const char* ty, int n, int k, int block_bytes, int block_elems,
                              std::vector<int> halves, DeqF16 kernel, DeqF32 kernel32) {
    int rb = k / block_elems * block_bytes;
    std::vector<u8> w = random_rows(n, k, block_bytes, block_elems, halves);
    size_t total = (size_t)n * k;
    // Poisoned, with 8 halves past the end that must stay untouched.
    std::vector<u16> out(total + 8, 0x7e01);
    std::vector<float> out32(total, NAN);
    // Fewer threads than elements: the grid-stride loop covers the rest.
    host_launch({3, 1, 1}, 64, [&] { kernel(w.data(), out.data(), n, k, rb); });
    host_launch({3, 1, 1}, 64, [&] { kernel32(w.data(), out32.data(), n, k, rb); });
    size_t bad = 0, first = total;
    for (size_t e = 0; e < total; e++) {
        float v = T::at(&w[(e / k) * rb], (int)(e % k));
        bool ok = out[e] == host_f2h(v) && out[e] == host_f2h(out32[e]) && is_nearest_f16(v, out[e]);
        if (!ok && bad++ == 0) first = e;
    }
    bool tail = true;
    for (size_t e = total; e < out.size(); e++) tail &= out[e] == 0x7e01;
    bool ok = bad == 0 && tail;
    failures += !ok;
    std::printf("dequantize_to_f16 %s %dx%d: %s (%zu of %zu differ%s", ty, n, k, ok ? "ok" : "FAILED",
                bad, total, tail ? "" : ", wrote past the end");
    if (bad)
        std::printf("; first at %zu: %04x for %.9g", first, out[first],
                    (double)T::at(&w[(first / k) * rb], (int)(first % k)));
    std::printf(")\n");
}

static void check_f32_to_f16() {
    // Random values over many binades, and the edges: zeros, subnormals, the largest FP16 and
    // the halfway points around it, overflow, infinities, NaN, halfway ties.
    std::vector<float> x = {0.0f,     -0.0f,    1e-8f,    -1e-8f,   2.98e-8f, 6.0e-8f,
                            3e-6f,    -3e-6f,   6.1e-5f,  6.104e-5f, 1.0f,    -1.0f,
                            65504.0f, 65519.0f, 65520.0f, -65520.0f, 1e6f,    -1e30f,
                            INFINITY, -INFINITY, NAN,     1.00048828125f, 1.00146484375f, 2049.0f};
    for (int i = 0; i < 4000; i++) x.push_back(std::ldexp(unif(), (int)(nx() % 40) - 28));
    std::vector<u16> y(x.size() + 8, 0x7e01);
    host_launch({2, 1, 1}, 32, [&] { f32_to_f16(x.data(), y.data(), (i64)x.size()); });
    size_t bad = 0, first = x.size();
    for (size_t i = 0; i < x.size(); i++)
        if (!is_nearest_f16(x[i], y[i]) && bad++ == 0) first = i;
    bool tail = true;
    for (size_t i = x.size(); i < y.size(); i++) tail &= y[i] == 0x7e01;
    // The checker itself refuses truncation, a tie not to even, saturation and a lost sign.
    bool strict = !is_nearest_f16(1.00146484375f, 0x3c01) && !is_nearest_f16(1.00048828125f, 0x3c01) &&
                  !is_nearest_f16(65520.0f, 0x7bff) && !is_nearest_f16(1e-8f, 0x0001) &&
                  !is_nearest_f16(-0.0f, 0x0000) && is_nearest_f16(1.00048828125f, 0x3c00);
    bool ok = bad == 0 && tail && strict;
    failures += !ok;
    std::printf("f32_to_f16 %zu values: %s (%zu not the nearest FP16%s%s", x.size(),
                ok ? "ok" : "FAILED", bad, tail ? "" : ", wrote past the end",
                strict ? "" : ", the checker accepts a wrong rounding");
    if (bad) std::printf("; first %.9g -> %04x", (double)x[first], y[first]);
    std::printf(")\n");
}

// Every unit kernel of a type: R = 1 (C columns and one), 2, 4, 8 rows, matvec and gate/up.
// C8: the columns a block at 8 rows (2 for the K-quants, see Cols).
#define MMV_CASES(ty, T, K, BB, BE, HALVES, C, C8)                                               \
    do {                                                                                         \
        check_mmv<T>(#ty, 9, K, BB, BE, HALVES, 1, C, mmv_##ty##_r1, gate_up_swiglu_##ty##_r1);  \
        check_mmv<T>(#ty " c1", 9, K, BB, BE, HALVES, 1, 1, mmv_##ty##_r1_c1,                    \
                     gate_up_swiglu_##ty##_r1_c1);                                               \
        check_mmv<T>(#ty, 9, K, BB, BE, HALVES, 2, C, mmv_##ty##_r2, gate_up_swiglu_##ty##_r2);  \
        check_mmv<T>(#ty, 9, K, BB, BE, HALVES, 4, C, mmv_##ty##_r4, gate_up_swiglu_##ty##_r4);  \
        check_mmv<T>(#ty, 9, K, BB, BE, HALVES, 8, C8, mmv_##ty##_r8, gate_up_swiglu_##ty##_r8); \
    } while (0)
// The K-quants' one-column-a-warp kernels at one row: 4 columns a block of 128 threads (gate/up
// too), 9 columns (the last block's warps 1-3 past N).
#define WC_CASES(ty, T, K, BB, BE, HALVES)                                                        \
    do {                                                                                          \
        check_mmv<T>(#ty " wc", 9, K, BB, BE, HALVES, 1, 4, mmv_##ty##_r1_wc,                     \
                     gate_up_swiglu_##ty##_r1_wc, 4, 128);                                        \
        check_mmv<T>(#ty " wc2", 9, K, BB, BE, HALVES, 1, 2, mmv_##ty##_r1_wc2,                   \
                     gate_up_swiglu_##ty##_r1_wc2, 2, 128);                                       \
        check_mmv<T>(#ty " wc4", 9, K, BB, BE, HALVES, 1, 1, mmv_##ty##_r1_wc4,                   \
                     gate_up_swiglu_##ty##_r1_wc4, 1, 128);                                       \
    } while (0)

int main() {
    // 9 columns (not a multiple of 4); K = 17 blocks (odd: every other row of the 18- and
    // 34-byte types starts 2 bytes off a word) or 3 super-blocks (96 threads: Q6_K rebuilds its
    // walk each unit).
    std::vector<int> d0 = {0}, dm = {0, 2}, q6 = {208}, none = {}, bf = {-1};
    MMV_CASES(f32, TF32, 544, 4, 1, none, 4, 4);
    MMV_CASES(f16, TF16, 544, 2, 1, none, 4, 4);
    MMV_CASES(q4_0, TQ4_0, 544, 18, 32, d0, 4, 4);
    MMV_CASES(q4_1, TQ4_1, 544, 20, 32, dm, 4, 4);
    MMV_CASES(q5_0, TQ5_0, 544, 22, 32, d0, 4, 4);
    MMV_CASES(q5_1, TQ5_1, 544, 24, 32, dm, 4, 4);
    MMV_CASES(q8_0, TQ8_0, 544, 34, 32, d0, 4, 4);
    MMV_CASES(q4_k, TQ4_K, 768, 144, 256, dm, 4, 2);
    MMV_CASES(q5_k, TQ5_K, 768, 176, 256, dm, 4, 2);
    MMV_CASES(q6_k, TQ6_K, 768, 210, 256, q6, 4, 2);
    // K = 1280: 128 threads, so Q6_K's walk advances (an even number of super-blocks a step)
    // over rows that start 2 bytes off a word every other row.
    MMV_CASES(q4_k, TQ4_K, 1280, 144, 256, dm, 4, 2);
    MMV_CASES(q6_k, TQ6_K, 1280, 210, 256, q6, 4, 2);

    // K = 4096: one pass of four unit steps a thread at 128 threads; K = 5120: a pass and a
    // step on its own (Q6_K's rows start 2 bytes off a word every other row).
    // The one-column-a-warp kernels: K / 256 = 1, 3, 4, 5, 14, 16, 20 super-blocks (passes of
    // four and a shorter last one of 1, 2 or 3; below K = 1024 the host's block has fewer warps).
    for (int k : {256, 768, 1024, 1280, 3584, 4096, 5120}) {
        SAME_BITS_WC(q4_k, TQ4_K, k, 144, 256, dm);
        SAME_BITS_WC(q5_k, TQ5_K, k, 176, 256, dm);
        SAME_BITS_WC(q6_k, TQ6_K, k, 210, 256, q6);
    }
    for (int k : {768, 1280, 3584}) {
        WC_CASES(q4_k, TQ4_K, k, 144, 256, dm);
        WC_CASES(q5_k, TQ5_K, k, 176, 256, dm);
        WC_CASES(q6_k, TQ6_K, k, 210, 256, q6);
    }
    SAME_BITS(q4_0, TQ4_0, 4096, 18, 32, d0);

    MMV3_CASES(f16, TF16, 544, 2, 1, none);
    MMV3_CASES(q4_0, TQ4_0, 544, 18, 32, d0);
    MMV3_CASES(q4_1, TQ4_1, 544, 20, 32, dm);
    MMV3_CASES(q8_0, TQ8_0, 544, 34, 32, d0);
    MMV3_CASES(q4_k, TQ4_K, 768, 144, 256, dm);
    MMV3_CASES(q6_k, TQ6_K, 768, 210, 256, q6);
    MMV3_WC_CASES(q4_k, TQ4_K, 1280, 144, 256, dm);
    MMV3_WC_CASES(q5_k, TQ5_K, 1280, 176, 256, dm);
    MMV3_WC_CASES(q6_k, TQ6_K, 1280, 210, 256, q6);

    // FP16 dequantization, every weight type: 7 rows (odd: the 18- and 34-byte types' rows
    // start 2 bytes off a word every other row), K of 3 super-blocks.
    check_dequant_f16<TF32>("f32", 7, 768, 4, 1, none, dequantize_to_f16_f32, dequantize_f32);
    check_dequant_f16<TF16>("f16", 7, 768, 2, 1, none, dequantize_to_f16_f16, dequantize_f16);
    check_dequant_f16<TBF16>("bf16", 7, 768, 2, 1, bf, dequantize_to_f16_bf16, dequantize_bf16);
    check_dequant_f16<TQ4_0>("q4_0", 7, 768, 18, 32, d0, dequantize_to_f16_q4_0, dequantize_q4_0);
    check_dequant_f16<TQ4_1>("q4_1", 7, 768, 20, 32, dm, dequantize_to_f16_q4_1, dequantize_q4_1);
    check_dequant_f16<TQ5_0>("q5_0", 7, 768, 22, 32, d0, dequantize_to_f16_q5_0, dequantize_q5_0);
    check_dequant_f16<TQ5_1>("q5_1", 7, 768, 24, 32, dm, dequantize_to_f16_q5_1, dequantize_q5_1);
    check_dequant_f16<TQ8_0>("q8_0", 7, 768, 34, 32, d0, dequantize_to_f16_q8_0, dequantize_q8_0);
    check_dequant_f16<TQ4_K>("q4_k", 7, 768, 144, 256, dm, dequantize_to_f16_q4_k, dequantize_q4_k);
    check_dequant_f16<TQ5_K>("q5_k", 7, 768, 176, 256, dm, dequantize_to_f16_q5_k, dequantize_q5_k);
    check_dequant_f16<TQ6_K>("q6_k", 7, 768, 210, 256, q6, dequantize_to_f16_q6_k, dequantize_q6_k);
    check_f32_to_f16();

    // Tiled matmuls: 67 columns (a partial tile), one split, two, and three of 256.
    MMQ_CASES(f16, TF16, 768, 2, 1, none);
    MMQ_CASES(q4_0, TQ4_0, 768, 18, 32, d0);
    MMQ_CASES(q4_1, TQ4_1, 768, 20, 32, dm);
    MMQ_CASES(q5_0, TQ5_0, 768, 22, 32, d0);
    MMQ_CASES(q8_0, TQ8_0, 768, 34, 32, d0);
    MMQ_CASES(q4_k, TQ4_K, 768, 144, 256, dm);
    MMQ_CASES(q5_k, TQ5_K, 768, 176, 256, dm);
    MMQ_CASES(q6_k, TQ6_K, 768, 210, 256, q6);
    // A slab a split (what a matrix of few column tiles takes on a GPU of many SMs).
    check_mmq<TQ4_0>("q4_0", 67, 768, 18, 32, d0, 17, 32, 32, mmq_q4_0_r32, gate_up_mmq_q4_0_r32);
    check_mmq<TQ6_K>("q6_k", 67, 768, 210, 256, q6, 33, 64, 32, mmq_q6_k_r64, gate_up_mmq_q6_k_r64);
    // Tensor-core tiled matmuls (mmqt.cu), emulated.
    MMQT_CASES(f16, TF16, 768, 2, 1, none);
    MMQT_CASES(q4_0, TQ4_0, 768, 18, 32, d0);
    MMQT_CASES(q4_1, TQ4_1, 768, 20, 32, dm);
    MMQT_CASES(q5_1, TQ5_1, 768, 24, 32, dm);
    MMQT_CASES(q4_k, TQ4_K, 768, 144, 256, dm);
    MMQT_CASES(q6_k, TQ6_K, 768, 210, 256, q6);

    // Attention: head dims, GQA ratios, windows, one slot's prompt runs, interleaved sequences.
    std::vector<Case> cases;
    for (int d : {64, 128})
        for (int ratio : {1, 3})
            for (int window : {0, 33}) {
                std::vector<std::pair<int, int> > tk = run(0, 290, 11);
                auto b = run(1, 0, 3);
                tk.insert(tk.end(), b.begin(), b.end());
                tk.push_back({0, 40});
                cases.push_back({2 * ratio, 2, d, window, tk});
            }
    cases.push_back({16, 1, 256, 0, {{0, 600}, {1, 3}}});
    cases.push_back({8, 2, 128, 33, run(0, 100, 9)});
    cases.push_back({40, 2, 32, 0, run(0, 0, 5)});
    // Every group size 1..8 (G 5 and 7 alone, 6 with 2 and 3, 8 with 2 and 4), many short
    // splits, a window, too few splits allowed (longer chunks), and chunks of more pages (of 2
    // positions, and of 1) than one window stages (walked in windows of staged pages).
    std::vector<std::pair<int, int> > three = {{0, 200}, {1, 5}, {0, 63}};
    cases.push_back({14, 2, 128, 0, three, 32, 64});
    cases.push_back({12, 2, 64, 0, three, 32, 4, 16, false, true});
    cases.push_back({16, 2, 64, 50, three, 16, 64, 16, false, true});
    cases.push_back({10, 2, 128, 0, three, 64, 64});
    cases.push_back({8, 1, 64, 0, {{0, 1000}, {1, 130}}, 128, 3, 16, true});
    cases.push_back({4, 1, 32, 0, {{0, 600}}, 128, 1, 2});
    cases.push_back({4, 2, 64, 0, {{0, 700}, {1, 300}}, 128, 1, 1, false, true});
    check_decode_chunks();
    for (int splits : {2, 13, 128, 131}) check_combine(3, 2, 96, splits);
    for (auto& c : cases) check_attention(c);

    // Fused rope + KV write: GQA (H = 3 Hkv), two slots with scattered pages, a window of
    // positions (a prompt run past 290 crossing pages, another slot's start, a lone decode).
    std::vector<std::pair<int, int> > tk = run(0, 290, 11), b = run(1, 0, 3);
    tk.insert(tk.end(), b.begin(), b.end());
    tk.push_back({0, 40});
    check_rope_qkv_write(6, 2, 64, 64, 0, false, tk);
    check_rope_qkv_write(6, 2, 64, 32, 1, true, tk);
    check_rope_qkv_write(9, 3, 128, 128, 1, false, run(1, 2040, 9));
    check_rope_qkv_write(3, 1, 32, 16, 0, true, {{0, 7}});
    std::printf("%d failed\n", failures);
    return failures ? 1 : 0;
}
