// Standalone check of the SIMD kernel tables against the scalar reference, with no pybind11 and
// no Python, so that it can be cross-compiled for aarch64 and run under qemu-user
// (tests/native/run_neon.sh). Every compiled path this CPU runs is compared with "scalar":
// quantize_q80 byte for byte, each matmul within a tolerance relative to sum |x||w|, dot_f32
// and axpy_f32 likewise.
//
// Usage: test_kernels_neon [--require ISA]... [--expect-only ISA]...
//   --require ISA      fail unless ISA is compiled, supported by this CPU and selectable
//   --expect-only ISA  fail unless the supported paths are exactly the ISAs given this way (for
//                      an emulated ARMv8.0 CPU: "--expect-only scalar")
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu_features.hpp"
#include "kernels/kernels.hpp"
#include "kernels/quants.hpp"
#include "kernels/thread_pool.hpp"
#include "kernels/threaded.hpp"

using namespace dllama;

namespace {

int g_failures = 0;
int g_checks = 0;

void fail(const std::string& what) {
    if (g_failures < 40) std::printf("FAIL: %s\n", what.c_str());
    g_failures++;
}

void check(bool ok, const std::string& what) {
    g_checks++;
    if (!ok) fail(what);
}

std::string join(const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
    return s;
}

bool contains(const std::vector<std::string>& v, const std::string& x) {
    for (const auto& e : v)
        if (e == x) return true;
    return false;
}

std::mt19937 g_rng(12345);

float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(g_rng); }
int uniform_int(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g_rng); }

std::vector<float> random_floats(size_t n, float scale) {
    std::vector<float> v(n);
    for (auto& x : v) x = uniform(-scale, scale);
    return v;
}

// ---- quantize_q80: byte-identical to quantize_q80_ref ----

std::vector<float> quantize_inputs() {
    std::vector<float> v;
    auto block = [&](auto gen) {
        for (int j = 0; j < QK; j++) v.push_back(gen(j));
    };
    // Blocks whose scale spans the whole float range: fp16(d) normal, subnormal, zero and inf;
    // id = 0 when d < FLT_MIN.
    for (int i = 0; i < 4000; i++) {
        const float scale = std::ldexp(1.0f, uniform_int(-140, 30)) * uniform(0.5f, 1.0f);
        block([&](int) { return uniform(-scale, scale); });
    }
    // Exact ties: amax = 127 gives d = 1 and id = 1, so x.5 values test half to even.
    for (int i = 0; i < 200; i++) {
        block([&](int j) {
            if (j == 0) return (i & 1) ? 127.0f : -127.0f;
            return static_cast<float>(uniform_int(-126, 125)) + 0.5f;
        });
    }
    // Ties at other powers of two: amax = 127 * 2^e.
    for (int i = 0; i < 200; i++) {
        const float s = std::ldexp(1.0f, uniform_int(-20, 20));
        block([&](int j) {
            if (j == 5) return 127.0f * s;
            return (static_cast<float>(uniform_int(-126, 125)) + 0.5f) * s;
        });
    }
    block([](int) { return 0.0f; });
    block([](int) { return -0.0f; });
    block([](int j) { return j == 7 ? FLT_MIN : 0.0f; });
    block([](int j) { return j == 7 ? 126.0f * FLT_MIN : -FLT_MIN; });  // d < FLT_MIN: all zero
    block([](int j) { return j == 7 ? 127.0f * FLT_MIN : -FLT_MIN; });  // d == FLT_MIN
    block([](int j) { return static_cast<float>(j - 16) * 1e-42f; });   // denormal inputs
    block([](int j) { return j == 3 ? 3.0e38f : -1.0e38f; });            // huge: fp16(d) = inf
    block([](int j) { return 65504.0f * 127.0f * (j % 2 ? 1.0f : -1.0f); });
    block([](int j) { return static_cast<float>(j) - 15.5f; });
    return v;
}

void test_quantize(const KernelTable& ref, const KernelTable& t) {
    const std::vector<float> x = quantize_inputs();
    const size_t nb = x.size() / QK;
    std::vector<BlockQ80> a(nb), b(nb), c(nb);
    quantize_q80_ref(x.data(), a.data(), nb);
    ref.quantize_q80(x.data(), b.data(), nb);
    t.quantize_q80(x.data(), c.data(), nb);
    check(std::memcmp(a.data(), b.data(), nb * sizeof(BlockQ80)) == 0, "scalar table quantize_q80 != quantize_q80_ref");
    size_t bad = 0, first = nb;
    for (size_t k = 0; k < nb; k++) {
        if (std::memcmp(&a[k], &c[k], sizeof(BlockQ80)) != 0) {
            if (first == nb) first = k;
            bad++;
        }
    }
    g_checks++;
    if (bad) {
        char msg[256];
        std::snprintf(msg, sizeof msg, "%s quantize_q80: %zu of %zu blocks differ (first: block %zu, d %04x vs %04x)",
                      t.name, bad, nb, first, a[first].d, c[first].d);
        fail(msg);
    }
    // Odd block counts through the threaded entry point.
    set_isa(t.name);
    for (size_t n : {size_t{1}, size_t{3}, size_t{17}, nb}) {
        std::vector<BlockQ80> d(n);
        dllama::quantize_q80(x.data(), d.data(), n);
        check(std::memcmp(a.data(), d.data(), n * sizeof(BlockQ80)) == 0,
              std::string(t.name) + " threaded quantize_q80 differs, n_blocks " + std::to_string(n));
    }
    std::printf("  quantize_q80   %zu blocks byte-identical to quantize_q80_ref: %s\n", nb, bad ? "NO" : "yes");
}

// ---- matmuls ----

struct ErrStat {
    double worst = 0.0;  // max |y - y_ref| / sum |x||w|
    int cases = 0;
};

// Compares y against y_ref for the rows [r0, r1) of each batch row; S[b][r] = sum |x||w|.
void compare(const char* kernel, const char* isa, const std::vector<float>& y, const std::vector<float>& y_ref,
             const std::vector<double>& S, int B, int rows, int r0, int r1, int cols, ErrStat& st) {
    const double tol = 2e-5;
    st.cases++;
    for (int b = 0; b < B; b++) {
        for (int r = r0; r < r1; r++) {
            const size_t i = static_cast<size_t>(b) * rows + r;
            const double err = std::fabs(static_cast<double>(y[i]) - y_ref[i]);
            const double rel = err / (S[i] > 0 ? S[i] : 1e-30);
            if (rel > st.worst) st.worst = rel;
            g_checks++;
            if (!(rel <= tol) || !std::isfinite(y[i])) {
                char msg[256];
                std::snprintf(msg, sizeof msg, "%s %s B=%d rows=%d cols=%d: y[%d][%d] = %.8g, scalar %.8g (S %.4g)",
                              isa, kernel, B, rows, cols, b, r, y[i], y_ref[i], S[i]);
                fail(msg);
            }
        }
    }
}

// sum_c |x[b][c]| |w[r][c]| for dequantized operands.
std::vector<double> abs_products(const std::vector<float>& x, const std::vector<float>& w, int B, int rows, int cols) {
    std::vector<double> S(static_cast<size_t>(B) * rows, 0.0);
    for (int b = 0; b < B; b++)
        for (int r = 0; r < rows; r++) {
            double s = 0.0;
            for (int c = 0; c < cols; c++)
                s += std::fabs(static_cast<double>(x[static_cast<size_t>(b) * cols + c])) *
                     std::fabs(static_cast<double>(w[static_cast<size_t>(r) * cols + c]));
            S[static_cast<size_t>(b) * rows + r] = s;
        }
    return S;
}

uint16_t random_scale_bits(float lo, float hi) {
    const float v = uniform(lo, hi);
    return f32_to_f16(uniform_int(0, 1) ? v : -v);
}

// Fills y with a sentinel, runs fn, and checks rows outside [r0, r1) were left alone.
template <typename F>
std::vector<float> run_rows(int B, int rows, int r0, int r1, const char* what, F&& fn) {
    const float sentinel = -1234.5f;
    std::vector<float> y(static_cast<size_t>(B) * rows, sentinel);
    fn(y.data());
    for (int b = 0; b < B; b++)
        for (int r = 0; r < rows; r++)
            if (r < r0 || r >= r1)
                check(y[static_cast<size_t>(b) * rows + r] == sentinel, std::string(what) + " wrote outside its rows");
    return y;
}

struct MatmulStats {
    ErrStat f32, f16, q40, q80, q40x16;
};

// The ParallelFor handed to the tables' prepare functions when their kernels are called directly:
// [0, n) in ranges of 3 items, last first, on the calling thread. A prepare function must build the
// same input from any split of its items.
void chunked_for(size_t n, size_t work, const std::function<void(size_t, size_t)>& fn) {
    for (size_t e = n; e > 0;) {
        const size_t b = e > 3 ? e - 3 : 0;
        fn(b, e);
        e = b;
    }
}

void test_matmuls(const KernelTable& t, MatmulStats& ms) {
    const int kRows[] = {13, 37};
    const int kBlocks[] = {1, 3, 5, 17};
    const int kBatch[] = {1, 3, 7, 17};
    // Each matmul runs through the threaded entry point (kernels/threaded.hpp) and, on a sub-range of
    // rows, as the table's own prepare function and kernel called directly.
    for (int rows : kRows) {
        for (int nbk : kBlocks) {
            for (int B : kBatch) {
                const int cols = nbk * QK;
                const size_t nx = static_cast<size_t>(B) * cols, nw = static_cast<size_t>(rows) * cols;
                const int r0 = 1, r1 = rows - 2;  // a sub-range with ragged ends for the direct calls

                // Q80 input, as the engine makes it.
                const std::vector<float> xf = random_floats(nx, 2.0f);
                std::vector<BlockQ80> xq(static_cast<size_t>(B) * nbk);
                quantize_q80_ref(xf.data(), xq.data(), xq.size());
                std::vector<float> xdq(nx);
                dequantize_q80_ref(xq.data(), xdq.data(), xq.size());

                // Q40 weights: random nibbles and scales.
                std::vector<BlockQ40> w40(static_cast<size_t>(rows) * nbk);
                for (auto& blk : w40) {
                    blk.d = random_scale_bits(0.001f, 0.1f);
                    for (auto& q : blk.qs) q = static_cast<uint8_t>(uniform_int(0, 255));
                }
                std::vector<float> w40f(nw);
                dequantize_q40_ref(w40.data(), w40f.data(), w40.size());
                const auto S40 = abs_products(xdq, w40f, B, rows, cols);
                set_isa("scalar");
                std::vector<float> y40_ref(static_cast<size_t>(B) * rows);
                dllama::matmul_q80_q40_f32(xq.data(), w40.data(), y40_ref.data(), B, rows, nbk);
                set_isa(t.name);
                auto y = run_rows(B, rows, 0, rows, "q40", [&](float* o) {
                    dllama::matmul_q80_q40_f32(xq.data(), w40.data(), o, B, rows, nbk);
                });
                compare("matmul_q80_q40_f32", t.name, y, y40_ref, S40, B, rows, 0, rows, cols, ms.q40);
                y = run_rows(B, rows, r0, r1, "q40 direct", [&](float* o) {
                    const PreparedQ80 p = t.prepare_q40(xq.data(), B, nbk, chunked_for);
                    t.matmul_q80_q40_f32(p, w40.data(), o, B, rows, nbk, r0, r1);
                });
                compare("matmul_q80_q40_f32 (rows 1..n-2)", t.name, y, y40_ref, S40, B, rows, r0, r1, cols, ms.q40);

                // The same Q40 weights regrouped 16 rows at a time.
                const int groups = (rows + 15) / 16;
                std::vector<BlockQ40x16> w16(static_cast<size_t>(groups) * nbk);
                repack_q40x16(w40.data(), rows, nbk, w16.data());
                y = run_rows(B, rows, 0, rows, "q40x16", [&](float* o) {
                    dllama::matmul_q80_q40x16_f32(xq.data(), w16.data(), o, B, rows, nbk);
                });
                compare("matmul_q80_q40x16_f32", t.name, y, y40_ref, S40, B, rows, 0, rows, cols, ms.q40x16);
                y = run_rows(B, rows, 16, rows, "q40x16 direct", [&](float* o) {
                    const PreparedQ80 p = t.prepare_q40x16(xq.data(), B, nbk, chunked_for);
                    t.matmul_q80_q40x16_f32(p, w16.data(), o, B, rows, nbk, 1, groups);
                });
                compare("matmul_q80_q40x16_f32 (groups 1..)", t.name, y, y40_ref, S40, B, rows, 16, rows, cols,
                        ms.q40x16);

                // Q80 weights: int8 in [-127, 127] as the quantizer makes them.
                std::vector<BlockQ80> w80(static_cast<size_t>(rows) * nbk);
                for (auto& blk : w80) {
                    blk.d = random_scale_bits(0.001f, 0.1f);
                    for (auto& q : blk.qs) q = static_cast<int8_t>(uniform_int(-127, 127));
                }
                std::vector<float> w80f(nw);
                dequantize_q80_ref(w80.data(), w80f.data(), w80.size());
                const auto S80 = abs_products(xdq, w80f, B, rows, cols);
                set_isa("scalar");
                std::vector<float> y80_ref(static_cast<size_t>(B) * rows);
                dllama::matmul_q80_q80_f32(xq.data(), w80.data(), y80_ref.data(), B, rows, nbk);
                set_isa(t.name);
                y = run_rows(B, rows, 0, rows, "q80", [&](float* o) {
                    dllama::matmul_q80_q80_f32(xq.data(), w80.data(), o, B, rows, nbk);
                });
                compare("matmul_q80_q80_f32", t.name, y, y80_ref, S80, B, rows, 0, rows, cols, ms.q80);
                y = run_rows(B, rows, r0, r1, "q80 direct", [&](float* o) {
                    const PreparedQ80 p = t.prepare_q80(xq.data(), B, nbk, chunked_for);
                    t.matmul_q80_q80_f32(p, w80.data(), o, B, rows, nbk, r0, r1);
                });
                compare("matmul_q80_q80_f32 (rows 1..n-2)", t.name, y, y80_ref, S80, B, rows, r0, r1, cols, ms.q80);

                // Float weights, at the block-multiple width and at ragged widths.
                for (int fc : {cols, cols + 3, cols - 7 > 0 ? cols - 7 : 5}) {
                    const size_t fnx = static_cast<size_t>(B) * fc, fnw = static_cast<size_t>(rows) * fc;
                    const std::vector<float> x = random_floats(fnx, 1.0f);
                    const std::vector<float> w = random_floats(fnw, 0.5f);
                    std::vector<uint16_t> wh(fnw);
                    std::vector<float> whf(fnw);
                    for (size_t i = 0; i < fnw; i++) {
                        wh[i] = f32_to_f16(w[i]);
                        whf[i] = f16_lut(wh[i]);
                    }
                    const auto Sf = abs_products(x, w, B, rows, fc);
                    const auto Sh = abs_products(x, whf, B, rows, fc);
                    std::vector<float> yf_ref(static_cast<size_t>(B) * rows), yh_ref(yf_ref.size());
                    kernels_scalar()->matmul_f32_f32_f32(x.data(), w.data(), yf_ref.data(), B, rows, fc, 0, rows);
                    kernels_scalar()->matmul_f32_f16_f32(x.data(), wh.data(), yh_ref.data(), B, rows, fc, 0, rows);
                    y = run_rows(B, rows, 0, rows, "f32", [&](float* o) {
                        dllama::matmul_f32_f32_f32(x.data(), w.data(), o, B, rows, fc);
                    });
                    compare("matmul_f32_f32_f32", t.name, y, yf_ref, Sf, B, rows, 0, rows, fc, ms.f32);
                    y = run_rows(B, rows, r0, r1, "f32 direct", [&](float* o) {
                        t.matmul_f32_f32_f32(x.data(), w.data(), o, B, rows, fc, r0, r1);
                    });
                    compare("matmul_f32_f32_f32 (rows 1..n-2)", t.name, y, yf_ref, Sf, B, rows, r0, r1, fc, ms.f32);
                    y = run_rows(B, rows, 0, rows, "f16", [&](float* o) {
                        dllama::matmul_f32_f16_f32(x.data(), wh.data(), o, B, rows, fc);
                    });
                    compare("matmul_f32_f16_f32", t.name, y, yh_ref, Sh, B, rows, 0, rows, fc, ms.f16);
                    y = run_rows(B, rows, r0, r1, "f16 direct", [&](float* o) {
                        t.matmul_f32_f16_f32(x.data(), wh.data(), o, B, rows, fc, r0, r1);
                    });
                    compare("matmul_f32_f16_f32 (rows 1..n-2)", t.name, y, yh_ref, Sh, B, rows, r0, r1, fc, ms.f16);
                }
            }
        }
    }
    std::printf("  matmul_f32_f32_f32  %4d cases, worst |y - scalar| / sum|x||w| = %.2e\n", ms.f32.cases, ms.f32.worst);
    std::printf("  matmul_f32_f16_f32  %4d cases, worst |y - scalar| / sum|x||w| = %.2e\n", ms.f16.cases, ms.f16.worst);
    std::printf("  matmul_q80_q40_f32  %4d cases, worst |y - scalar| / sum|x||w| = %.2e\n", ms.q40.cases, ms.q40.worst);
    std::printf("  matmul_q80_q80_f32  %4d cases, worst |y - scalar| / sum|x||w| = %.2e\n", ms.q80.cases, ms.q80.worst);
    std::printf("  matmul_q80_q40x16_f32 %2d cases, worst |y - scalar| / sum|x||w| = %.2e\n", ms.q40x16.cases,
                ms.q40x16.worst);
}

// ---- dot / axpy ----

void test_vector_ops(const KernelTable& ref, const KernelTable& t) {
    double worst_dot = 0.0, worst_axpy = 0.0;
    for (int n : {0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 1000, 4099}) {
        for (int rep = 0; rep < 3; rep++) {
            const auto a = random_floats(n, 3.0f), b = random_floats(n, 3.0f);
            double S = 0.0;
            for (int i = 0; i < n; i++) S += std::fabs(static_cast<double>(a[i]) * b[i]);
            const float d_ref = ref.dot_f32(a.data(), b.data(), n), d = t.dot_f32(a.data(), b.data(), n);
            const double rel = n ? std::fabs(static_cast<double>(d) - d_ref) / S : std::fabs(d - d_ref);
            if (rel > worst_dot) worst_dot = rel;
            check(rel <= 1e-5, std::string(t.name) + " dot_f32 n=" + std::to_string(n) + ": " +
                                   std::to_string(d) + " vs " + std::to_string(d_ref));

            const float alpha = uniform(-2.0f, 2.0f);
            std::vector<float> y_ref = random_floats(n + 1, 1.0f), y = y_ref;
            ref.axpy_f32(alpha, a.data(), y_ref.data(), n);
            t.axpy_f32(alpha, a.data(), y.data(), n);
            check(y[n] == y_ref[n], std::string(t.name) + " axpy_f32 wrote past n");
            for (int i = 0; i < n; i++) {
                const double mag = std::fabs(static_cast<double>(alpha) * a[i]) + std::fabs(static_cast<double>(y_ref[i]));
                const double rel2 = std::fabs(static_cast<double>(y[i]) - y_ref[i]) / (mag > 0 ? mag : 1e-30);
                if (rel2 > worst_axpy) worst_axpy = rel2;
                check(rel2 <= 1e-6, std::string(t.name) + " axpy_f32 n=" + std::to_string(n) + " element " +
                                        std::to_string(i));
            }
        }
    }
    std::printf("  dot_f32   worst |d - scalar| / sum|a||b| = %.2e\n", worst_dot);
    std::printf("  axpy_f32  worst |y - scalar| / (|a x| + |y|) = %.2e\n", worst_axpy);
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<std::string> require, expect_only;
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        if ((a == "--require" || a == "--expect-only") && i + 1 < argc) {
            (a == "--require" ? require : expect_only).push_back(argv[++i]);
        } else {
            std::fprintf(stderr, "usage: %s [--require ISA]... [--expect-only ISA]...\n", argv[0]);
            return 2;
        }
    }
    try {
        const auto compiled = compiled_isas(), supported = supported_isas();
        std::printf("compiled paths: %s\nsupported here: %s\nbest: %s, active by default: %s\n", join(compiled).c_str(),
                    join(supported).c_str(), best_isa().c_str(), get_isa().c_str());
        check(get_isa() == best_isa() || std::getenv("DLLAMA_ISA"), "default path is not the best one");

        for (const auto& isa : require) {
            check(contains(compiled, isa), isa + " is not compiled in");
            check(contains(supported, isa), isa + " is not supported by this CPU");
            try {
                set_isa(isa);
                check(get_isa() == isa, "set_isa(\"" + isa + "\") left get_isa() = " + get_isa());
            } catch (const std::exception& e) {
                fail("set_isa(\"" + isa + "\") threw: " + e.what());
            }
        }
        if (!expect_only.empty()) check(supported == expect_only, "supported paths are " + join(supported) +
                                                                      ", expected exactly " + join(expect_only));
        // A path this build or CPU lacks is refused with a message naming the available ones.
        for (const char* isa : {"neon", "avx2", "avx512", "avx512vnni"}) {
            if (contains(supported, isa)) continue;
            bool threw = false;
            try {
                set_isa(isa);
            } catch (const std::invalid_argument& e) {
                threw = std::string(e.what()).find("scalar") != std::string::npos;
            }
            check(threw, std::string("set_isa(\"") + isa + "\") should throw invalid_argument naming the paths");
        }

        set_num_threads(3);  // uneven row splits: ranges start at multiples of 4, the last one ragged
        const KernelTable& ref = *kernels_scalar();
        for (const auto& isa : supported) {
            if (isa == "scalar") continue;
            set_isa(isa);
            const KernelTable& t = active_kernels();
            std::printf("%s vs scalar (own Q40x16 kernel: %s):\n", t.name, t.q40x16_fast ? "yes" : "no");
            test_quantize(ref, t);
            MatmulStats ms;
            test_matmuls(t, ms);
            test_vector_ops(ref, t);
        }
        // The default path (scalar on a CPU without SIMD paths) runs a matmul end to end.
        set_isa(best_isa());
        std::vector<float> x = random_floats(64, 1.0f), yv(4);
        std::vector<BlockQ80> xq(2);
        dllama::quantize_q80(x.data(), xq.data(), 2);
        std::vector<BlockQ40> w(8);
        std::vector<float> wf = random_floats(256, 1.0f);
        quantize_q40_ref(wf.data(), w.data(), 8);
        dllama::matmul_q80_q40_f32(xq.data(), w.data(), yv.data(), 1, 4, 2);
        for (float v : yv) check(std::isfinite(v), "default path matmul gave a non-finite value");
    } catch (const std::exception& e) {
        fail(std::string("exception: ") + e.what());
    }
    std::printf("%d checks, %d failures\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
