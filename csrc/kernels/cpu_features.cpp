#include "cpu_features.hpp"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_FPHP
#define HWCAP_FPHP (1 << 9)
#endif
#ifndef HWCAP_ASIMDHP
#define HWCAP_ASIMDHP (1 << 10)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

namespace dllama {

namespace {

struct Path {
    const char* name;
    const KernelTable* (*table)();
};

const Path kPaths[] = {
    {"scalar", kernels_scalar},         {"neon", kernels_neon},
    {"avx2", kernels_avx2},             {"avx512", kernels_avx512},
    {"avx512vnni", kernels_avx512vnni},
};

#if defined(__x86_64__) || defined(__i386__)
bool os_saves_zmm(bool want_avx512) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE)) return false;
    unsigned lo, hi;
    asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    const unsigned need = want_avx512 ? 0xe6u : 0x6u;  // SSE+AVX state, plus opmask and ZMM state
    return (lo & need) == need;
}
#endif

#if defined(__aarch64__)
// The NEON path is compiled with -march=armv8.2-a+dotprod+fp16: it needs the dot product
// instructions (asimddp) and may use half-precision ones (fphp, asimdhp). ARMv8.0 cores such as
// the Raspberry Pi 3/4's Cortex-A53/A72 lack them and run the scalar path instead.
bool arm_has_dotprod_fp16() {
#if defined(__APPLE__)
    return true;  // every arm64 Mac (Apple M1 and later) has both
#elif defined(__linux__)
    const unsigned long hw = getauxval(AT_HWCAP);
    const unsigned long need = HWCAP_ASIMDDP | HWCAP_FPHP | HWCAP_ASIMDHP;
    return (hw & need) == need;
#else
    return false;  // no known way to ask: stay on the scalar path
#endif
}
#endif

bool cpu_runs(const std::string& name) {
    if (name == "scalar") return true;
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    const bool fma = c & bit_FMA, f16c = c & bit_F16C;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool avx2 = b & bit_AVX2;
    const bool avx512 = (b & bit_AVX512F) && (b & bit_AVX512BW) && (b & bit_AVX512VL) && (b & bit_AVX512DQ);
    const bool vnni = c & bit_AVX512VNNI;
    if (name == "avx2") return avx2 && fma && f16c && os_saves_zmm(false);
    if (name == "avx512") return avx2 && fma && f16c && avx512 && os_saves_zmm(true);
    if (name == "avx512vnni") return avx2 && fma && f16c && avx512 && vnni && os_saves_zmm(true);
    return false;
#elif defined(__aarch64__)
    if (name == "neon") return arm_has_dotprod_fp16();
    return false;
#else
    return false;
#endif
}

const KernelTable* table_for(const std::string& name) {
    for (const auto& p : kPaths)
        if (name == p.name) return p.table();
    return nullptr;
}

std::string join(const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
    return s;
}

std::atomic<const KernelTable*> g_active{nullptr};

const KernelTable* initial_table() {
    if (const char* env = std::getenv("DLLAMA_ISA")) {
        if (*env) {
            try {
                set_isa(env);
            } catch (const std::invalid_argument& error) {
                throw std::invalid_argument(std::string("DLLAMA_ISA=") + env + ": " + error.what());
            }
            return g_active.load();
        }
    }
    return table_for(best_isa());
}

}  // namespace

std::vector<std::string> compiled_isas() {
    std::vector<std::string> out;
    for (const auto& p : kPaths)
        if (p.table()) out.emplace_back(p.name);
    return out;
}

std::vector<std::string> supported_isas() {
    std::vector<std::string> out;
    for (const auto& p : kPaths)
        if (p.table() && cpu_runs(p.name)) out.emplace_back(p.name);
    return out;
}

std::string best_isa() { return supported_isas().back(); }

void set_isa(const std::string& name) {
    const auto ok = supported_isas();
    for (const auto& s : ok) {
        if (s == name) {
            g_active.store(table_for(name));
            return;
        }
    }
    throw std::invalid_argument("SIMD path '" + name + "' is not available here; this build and CPU support: " +
                                join(ok));
}

std::string get_isa() { return active_kernels().name; }

const KernelTable& active_kernels() {
    const KernelTable* t = g_active.load(std::memory_order_acquire);
    if (!t) {
        t = initial_table();
        g_active.store(t);
    }
    return *t;
}

}  // namespace dllama
