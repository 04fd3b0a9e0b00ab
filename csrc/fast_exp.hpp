// exp(x) in float, branch-free so that loops over it vectorise: Cephes-style range reduction
// and polynomial (relative error below 2e-7), scaled by 2^n in two halves so that results in
// the subnormal range and overflow to infinity come out as libm's do.
#pragma once
#include <cmath>
#include <cstdint>

namespace dllama {

static inline float pow2_int(int32_t n) {  // 2^n for -126 <= n <= 127
    return __builtin_bit_cast(float, (n + 127) << 23);
}

// static: every kernel file compiles its own copy with its own SIMD flags (no shared out-of-line copy).
static inline float fast_exp(float x) {
    x = std::fmin(std::fmax(x, -104.0f), 89.0f);  // beyond: 0 and infinity either way
    const float t = x * 1.44269504088896341f + 0.5f;
    float n = static_cast<float>(static_cast<int32_t>(t));  // floor(t), without a libm call
    n -= static_cast<float>(n > t);
    float r = x - n * 0.693359375f;  // ln 2 in two parts, for an exact reduction
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t ni = static_cast<int32_t>(n);
    const int32_t half = ni >> 1;
    return p * pow2_int(half) * pow2_int(ni - half);
}

}  // namespace dllama
