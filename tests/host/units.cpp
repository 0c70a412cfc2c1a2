// The unit matvec kernels' decoders (kernels/matvec.cu) and the reference decoders they are
// written against (T::at, kernels/common.cuh), compiled for the host with kernels/host.h, checked
// against the CPU backend's dequantization (the Rust side writes the rows and their values).
// Run by tests/kernel_host.rs as `units DIR TYPE...`: DIR/TYPE.bin holds
//   u32 n_rows, u32 k, u32 row_bytes, n_rows * row_bytes bytes of blocks, n_rows * k f32 values.
// Checks, per type and row: T::at(row, e) for every element, and U::unit over the row's units
// (v[i] * scale at element xoff(u, i / 4) + i % 4), every element covered exactly once, all
// within 1e-6 of the row's largest magnitude; for walking decoders every thread's walk (see
// check_walk). Exits non-zero when a type fails.
#include "../../kernels/matvec.cu"

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

template <typename T, typename U>
static int check(const char* name, const Rows& r) {
    int bad = 0;
    const int W = U::W;
    if (r.k % W != 0) {
        std::printf("%s: K %u is not a whole number of units of %d\n", name, r.k, W);
        return 1;
    }
    for (unsigned row = 0; row < r.n; row++) {
        const u8* p = r.bytes.data() + (size_t)row * r.row_bytes;
        const float* want = r.want.data() + (size_t)row * r.k;
        float scale = 1e-30f;
        for (unsigned e = 0; e < r.k; e++) scale = std::fmax(scale, std::fabs(want[e]));
        auto close = [&](float got, float w) { return std::fabs(got - w) <= 1e-6f * scale; };
        for (unsigned e = 0; e < r.k; e++) {
            float got = T::at(p, (int)e);
            if (!close(got, want[e]) && bad++ < 5)
                std::printf("%s row %u: at(%u) = %.9g, the CPU's %.9g\n", name, row, e, got,
                            want[e]);
        }
        std::vector<int> seen(r.k, 0);
        for (int u = 0; u < (int)r.k / W; u++) {
            float v[32];
            float s = U::unit(p, u, v);
            for (int i = 0; i < W; i++) {
                int e = U::xoff(u, i / 4) + i % 4;
                if (e < 0 || e >= (int)r.k) {
                    if (bad++ < 5) std::printf("%s unit %d: element %d out of the row\n", name, u, e);
                    continue;
                }
                seen[e]++;
                if (!close(v[i] * s, want[e]) && bad++ < 5)
                    std::printf("%s row %u unit %d: element %d = %.9g, the CPU's %.9g\n", name,
                                row, u, e, v[i] * s, want[e]);
            }
        }
        for (unsigned e = 0; e < r.k; e++)
            if (seen[e] != 1 && bad++ < 5)
                std::printf("%s row %u: element %u decoded %d times\n", name, row, e, seen[e]);
    }
    bad += check_walk<U>(name, r);
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
