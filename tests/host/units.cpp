// The unit matvec kernels' decoders (kernels/matvec.cu) and the reference decoders they are
// written against (T::at, kernels/common.cuh), compiled for the host with kernels/host.h, checked
// against the CPU backend's dequantization (the Rust side writes the rows and their values).
// Run by tests/kernel_host.rs as `units DIR TYPE...`: DIR/TYPE.bin holds
//   u32 n_rows, u32 k, u32 row_bytes, n_rows * row_bytes bytes of blocks, n_rows * k f32 values.
// Checks, per type and row: T::at(row, e) for every element, and U::unit over the row's units
// (v[i] * scale at element xoff(u, i / 4) + i % 4), every element covered exactly once, all
// within 1e-6 of the row's largest magnitude; for walking decoders every thread's walk (see
// check_walk); the K-quants' decoders as their kernels run them (check_scaled). Exits non-zero
// when a type fails.
#include "../../kernels/matvec.cu"

#include <atomic>
#include <cstdio>
#include <string>
#include <vector>

struct Rows {
    unsigned n = 0, k = 0, row_bytes = 0;
    std::vector<unsigned char> bytes;  // 16-byte aligned start, rows back to back
    std::vector<float> want;
};

static bool load(const std::string& path, Rows& r) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) return false;
    unsigned h[3];
    bool ok = std::fread(h, 4, 3, f) == 3;
    if (ok) {
        r.n = h[0], r.k = h[1], r.row_bytes = h[2];
        r.bytes.resize((size_t)r.n * r.row_bytes + 64);
        r.want.resize((size_t)r.n * r.k);
        ok = std::fread(r.bytes.data(), 1, (size_t)r.n * r.row_bytes, f) ==
                 (size_t)r.n * r.row_bytes &&
             std::fread(r.want.data(), 4, r.want.size(), f) == r.want.size();
    }
    std::fclose(f);
    return ok;
}

// A walking decoder (U::WALK): every thread t of a block of bd threads walks units t, t + bd,
// ... of each row; each step must give exactly what U::unit gives (bit for bit: the same decode),
// and x's walk must land on U::xoff. The walk may read up to 16 bytes past a row (the weights
// are uploaded with UNIT_OVERREAD bytes of padding); the rows here sit in one buffer with 64
// spare bytes after the last.
template <typename U>
static int check_walk(const char* name, const Rows& r) {
    int bad = 0;
    if (!U::WALK) return 0;
    const int units = (int)r.k / U::W;
    for (unsigned row = 0; row < r.n; row++) {
        const u8* p = r.bytes.data() + (size_t)row * r.row_bytes;
        for (int bd : {32, 64, 96, 128}) {
            int st = U::step(bd), xs = U::xstep(bd);
            for (int t = 0; t < bd && t < units; t++) {
                typename U::Walk k = U::walk(p, t);
                for (int u = t, i = 0; u < units; u += bd, i++) {
                    float a[8], b[8];
                    float sa = U::unit_walk(k, st, a), sb = U::unit(p, u, b);
                    if ((std::memcmp(a, b, sizeof a) || std::memcmp(&sa, &sb, 4)) && bad++ < 5)
                        std::printf("%s row %u: the walk of thread %d of %d differs at unit %d\n",
                                    name, row, t, bd, u);
                    if ((U::xoff(t, 0) + i * xs != U::xoff(u, 0) ||
                         U::xoff(u, 1) - U::xoff(u, 0) != U::XJ) &&
                        bad++ < 5)
                        std::printf("%s: x's walk misses unit %d\n", name, u);
                }
            }
        }
    }
    return bad;
}

// A sub-block-scaled decoder (IsScaled: the K-quants), run as the kernels run it: blocks of bd
// threads (host_launch, real shuffles), each thread walking units t, t + bd, ... of a pair of
// weight rows (its scales shuffled from the lanes that decode them), writing each weight
// s v[i] + m at element xoff(u, i / 4) + i % 4. With `walk` the walk advances as the kernel's
// does when U::walks(bd), else it is rebuilt per unit. Checks every element against the CPU's
// (within 1e-6 of the row's largest magnitude) and that every element is written exactly once.
template <typename U>
static int check_scaled(const char* name, const Rows& r, bool walk) {
    int bad = 0;
    const int units = (int)r.k / U::W;
    for (unsigned row = 0; row < r.n; row++) {
        unsigned rows[2] = {row, (row + 1) % r.n};
        for (int bd : {32, 64, 96, 128}) {
            std::vector<float> got(2 * (size_t)r.k, NAN);
            std::vector<std::atomic<int> > seen(2 * (size_t)r.k);
            host_launch({1, 1, 1}, (unsigned)bd, [&] {
                typename U::Walk wk[2];
                const u8* p[2];
                for (int q = 0; q < 2; q++) {
                    p[q] = r.bytes.data() + (size_t)rows[q] * r.row_bytes;
                    wk[q] = U::walk(p[q], (int)threadIdx.x);
                }
                bool sh = walk && U::walks(bd);
                for (int u = (int)threadIdx.x; u < units; u += bd) {
                    if (!sh)
                        for (int q = 0; q < 2; q++) wk[q] = U::walk(p[q], u);
                    HalfScales sc[2];
                    U::template scales<2>(wk, sc);
                    for (int q = 0; q < 2; q++) {
                        float v[8];
                        U::quants(wk[q], v);
                        for (int i = 0; i < 8; i++) {
                            int e = U::xoff(u, i / 4) + i % 4;
                            if (e < 0 || e >= (int)r.k) continue;
                            float s = i < 4 ? sc[q].s0 : sc[q].s1, m = i < 4 ? sc[q].m0 : sc[q].m1;
                            got[(size_t)q * r.k + e] = std::fmaf(v[i], s, m);
                            seen[(size_t)q * r.k + e]++;
                        }
                    }
                    if (sh)
                        for (int q = 0; q < 2; q++) U::advance(wk[q], U::step(bd));
                }
            });
            for (int q = 0; q < 2; q++) {
                const float* want = r.want.data() + (size_t)rows[q] * r.k;
                float scale = 1e-30f;
                for (unsigned e = 0; e < r.k; e++) scale = std::fmax(scale, std::fabs(want[e]));
                for (unsigned e = 0; e < r.k; e++) {
                    float g = got[(size_t)q * r.k + e];
                    int n = seen[(size_t)q * r.k + e];
                    if (n != 1 && bad++ < 5)
                        std::printf("%s row %u, %d threads: element %u decoded %d times\n", name,
                                    rows[q], bd, e, n);
                    if (!(std::fabs(g - want[e]) <= 1e-6f * scale) && bad++ < 5)
                        std::printf("%s row %u, %d threads%s: element %u = %.9g, the CPU's %.9g\n",
                                    name, rows[q], bd, walk ? "" : " (no walk)", e, g, want[e]);
                }
            }
        }
    }
    return bad;
}

// T::at for every element of every row.
template <typename T>
static int check_at(const char* name, const Rows& r) {
    int bad = 0;
    for (unsigned row = 0; row < r.n; row++) {
        const u8* p = r.bytes.data() + (size_t)row * r.row_bytes;
        const float* want = r.want.data() + (size_t)row * r.k;
        float scale = 1e-30f;
        for (unsigned e = 0; e < r.k; e++) scale = std::fmax(scale, std::fabs(want[e]));
        for (unsigned e = 0; e < r.k; e++) {
            float got = T::at(p, (int)e);
            if (!(std::fabs(got - want[e]) <= 1e-6f * scale) && bad++ < 5)
                std::printf("%s row %u: at(%u) = %.9g, the CPU's %.9g\n", name, row, e, got,
                            want[e]);
        }
    }
    return bad;
}

// U::unit over every row's units, each element covered once; then the walks (check_walk).
template <typename U>
static int check_units(const char* name, const Rows& r) {
    int bad = 0;
    const int W = U::W;
    for (unsigned row = 0; row < r.n; row++) {
        const u8* p = r.bytes.data() + (size_t)row * r.row_bytes;
        const float* want = r.want.data() + (size_t)row * r.k;
        float scale = 1e-30f;
        for (unsigned e = 0; e < r.k; e++) scale = std::fmax(scale, std::fabs(want[e]));
        std::vector<int> seen(r.k, 0);
        for (int u = 0; u < (int)r.k / W; u++) {
            float v[8];
            float s = U::unit(p, u, v);
            for (int i = 0; i < W; i++) {
                int e = U::xoff(u, i / 4) + i % 4;
                if (e < 0 || e >= (int)r.k) {
                    if (bad++ < 5) std::printf("%s unit %d: element %d out of the row\n", name, u, e);
                    continue;
                }
                seen[e]++;
                if (!(std::fabs(v[i] * s - want[e]) <= 1e-6f * scale) && bad++ < 5)
                    std::printf("%s row %u unit %d: element %d = %.9g, the CPU's %.9g\n", name,
                                row, u, e, v[i] * s, want[e]);
            }
        }
        for (unsigned e = 0; e < r.k; e++)
            if (seen[e] != 1 && bad++ < 5)
                std::printf("%s row %u: element %u decoded %d times\n", name, row, e, seen[e]);
    }
    return bad + check_walk<U>(name, r);
}

// A type's reference decoder and its unit decoder: check_units, or for the sub-block-scaled
// decoders check_scaled with and without the walk.
template <typename T, typename U, bool S = IsScaled<U>::value>
struct Check {
    static int units(const char* name, const Rows& r) { return check_units<U>(name, r); }
};
template <typename T, typename U>
struct Check<T, U, true> {
    static int units(const char* name, const Rows& r) {
        return check_scaled<U>(name, r, true) + check_scaled<U>(name, r, false);
    }
};

template <typename T, typename U>
static int check(const char* name, const Rows& r) {
    if (r.k % U::W != 0) {
        std::printf("%s: K %u is not a whole number of units of %d\n", name, r.k, U::W);
        return 1;
    }
    int bad = check_at<T>(name, r) + Check<T, U>::units(name, r);
    std::printf("%s: %u rows of %u, %s\n", name, r.n, r.k, bad ? "FAILED" : "ok");
    return bad;
}

int main(int argc, char** argv) {
    if (argc < 3) {
        std::printf("usage: units DIR TYPE...\n");
        return 2;
    }
    int failed = 0;
    for (int i = 2; i < argc; i++) {
        std::string ty = argv[i];
        Rows r;
        if (!load(std::string(argv[1]) + "/" + ty + ".bin", r)) {
            std::printf("%s: cannot read %s/%s.bin\n", ty.c_str(), argv[1], ty.c_str());
            return 2;
        }
        const char* n = ty.c_str();
        int bad;
        if (ty == "f32") bad = check<TF32, UGen<TF32> >(n, r);
        else if (ty == "f16") bad = check<TF16, UF16>(n, r);
        else if (ty == "bf16") bad = check<TBF16, UGen<TBF16> >(n, r);
        else if (ty == "q4_0") bad = check<TQ4_0, UQ4_0>(n, r);
        else if (ty == "q4_1") bad = check<TQ4_1, UQ4_1>(n, r);
        else if (ty == "q5_0") bad = check<TQ5_0, UGen<TQ5_0> >(n, r);
        else if (ty == "q5_1") bad = check<TQ5_1, UGen<TQ5_1> >(n, r);
        else if (ty == "q8_0") bad = check<TQ8_0, UQ8_0>(n, r);
        else if (ty == "q4_k") bad = check<TQ4_K, UQ4_K>(n, r);
        else if (ty == "q5_k") bad = check<TQ5_K, UQ5_K>(n, r);
        else if (ty == "q6_k") bad = check<TQ6_K, UQ6_K>(n, r);
        else {
            std::printf("%s: no decoder of that name\n", n);
            return 2;
        }
        failed += bad != 0;
    }
    return failed ? 1 : 0;
}
