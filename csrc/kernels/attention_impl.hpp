// Attention over one KV head for the query heads that share it, and SiLU, written for the
// auto-vectoriser.
// Each kernel file includes it inside its own namespace, so it is compiled with that path's
// SIMD flags (SSE2 baseline, AVX2, AVX-512).
// (No include guard on purpose: every kernel file includes it once, in its own namespace.)

// exp(x) for the vectoriser: Cephes-style range reduction and polynomial (relative error below
// 2e-7), scaled by 2^n in two halves so subnormal results and overflow to infinity come out as
// libm's do. Finite-math lets GCC turn the clamps into vector min/max; the inputs here (scores
// minus their maximum, activations) are finite.
#define DLLAMA_FINITE __attribute__((optimize("finite-math-only")))
DLLAMA_FINITE static inline float exp_approx(float x) {
    x = __builtin_fminf(__builtin_fmaxf(x, -104.0f), 89.0f);
    const float t = x * 1.44269504088896341f + 0.5f;
    float n = static_cast<float>(static_cast<int32_t>(t));
    n = n - static_cast<float>(n > t);  // floor(t)
    float r = x - n * 0.693359375f;      // ln 2 in two parts: an exact reduction
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t ni = static_cast<int32_t>(n), half = ni >> 1;
    const int32_t b1 = (half + 127) << 23, b2 = (ni - half + 127) << 23;
    float s1, s2;
    std::memcpy(&s1, &b1, 4);
    std::memcpy(&s2, &b2, 4);
    return p * s1 * s2;
}

// In place: s[t] = exp(s[t] - max) / sum over t.
DLLAMA_FINITE inline void softmax_row(float* s, int n) {
    float m = s[0];
    for (int t = 1; t < n; t++) m = s[t] > m ? s[t] : m;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int t = 0; t < n; t++) {
        s[t] = exp_approx(s[t] - m);
        sum += s[t];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int t = 0; t < n; t++) s[t] *= inv;
}

// x * sigmoid(x) in place.
DLLAMA_FINITE inline void silu_f32(float* x, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) x[i] = x[i] / (1.0f + exp_approx(-x[i]));
}

// q: G query heads of head_dim values, consecutive. kt: this KV head's keys transposed, row d
// (one per head dimension) at kt + d * kt_stride holding positions 0..n-1; v: value rows, row t
// at v_cache + t * v_stride; out: G heads; scores: scratch of G * n floats. The scores loop runs
// over positions, so it vectorises without horizontal sums.
inline void attention_group(const float* q, const float* kt, size_t kt_stride, const float* v_cache, size_t v_stride,
                            int n, int G, int hd, float scale, float* out, float* scores) {
    for (size_t i = 0; i < static_cast<size_t>(G) * n; i++) scores[i] = 0.0f;
    for (int d = 0; d < hd; d++) {
        const float* krow = kt + static_cast<size_t>(d) * kt_stride;
        for (int g = 0; g < G; g++) {
            const float qd = q[static_cast<size_t>(g) * hd + d] * scale;
            float* sg = scores + static_cast<size_t>(g) * n;
#pragma omp simd
            for (int t = 0; t < n; t++) sg[t] += qd * krow[t];
        }
    }
    for (int g = 0; g < G; g++) {
        softmax_row(scores + static_cast<size_t>(g) * n, n);
        float* og = out + static_cast<size_t>(g) * hd;
        for (int d = 0; d < hd; d++) og[d] = 0.0f;
    }
    for (int t = 0; t < n; t++) {
        const float* vr = v_cache + static_cast<size_t>(t) * v_stride;
        for (int g = 0; g < G; g++) {
            const float w = scores[static_cast<size_t>(g) * n + t];
            float* og = out + static_cast<size_t>(g) * hd;
#pragma omp simd
            for (int d = 0; d < hd; d++) og[d] += w * vr[d];
        }
    }
}
