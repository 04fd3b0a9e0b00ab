// Attention over one KV head for the query heads that share it, and SiLU, written for the
// auto-vectoriser.
// Each kernel file includes it inside its own namespace, so it is compiled with that path's
// SIMD flags (SSE2 baseline, AVX2, AVX-512).
// (No include guard on purpose: every kernel file includes it once, in its own namespace.)

// x * sigmoid(x) in place.
inline void silu_f32(float* x, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) x[i] = x[i] / (1.0f + std::exp(-x[i]));
}

// q: G query heads of head_dim values, consecutive; k/v: cache rows 0..n-1, row t at
// cache + t * kv_stride; out: G heads; scores: scratch of G * n floats.
inline void attention_group(const float* q, const float* k_cache, const float* v_cache, size_t kv_stride, int n,
                            int G, int hd, float scale, float* out, float* scores) {
    for (int t = 0; t < n; t++) {
        const float* kr = k_cache + static_cast<size_t>(t) * kv_stride;
        for (int g = 0; g < G; g++) {
            const float* qg = q + static_cast<size_t>(g) * hd;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int d = 0; d < hd; d++) s += qg[d] * kr[d];
            scores[static_cast<size_t>(g) * n + t] = s * scale;
        }
    }
    for (int g = 0; g < G; g++) {
        float* sg = scores + static_cast<size_t>(g) * n;
        float m = sg[0];
        for (int t = 1; t < n; t++) m = sg[t] > m ? sg[t] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int t = 0; t < n; t++) {
            sg[t] = std::exp(sg[t] - m);
            sum += sg[t];
        }
        const float inv = 1.0f / sum;
        for (int t = 0; t < n; t++) sg[t] *= inv;
        float* og = out + static_cast<size_t>(g) * hd;
        for (int d = 0; d < hd; d++) og[d] = 0.0f;
    }
    for (int t = 0; t < n; t++) {
        const float* vr = v_cache + static_cast<size_t>(t) * kv_stride;
        for (int g = 0; g < G; g++) {
            const float w = scores[static_cast<size_t>(g) * n + t];
            float* og = out + static_cast<size_t>(g) * hd;
#pragma omp simd
            for (int d = 0; d < hd; d++) og[d] += w * vr[d];
        }
    }
}
