// The small ops of the forward pass. Plain C++ written for the auto-vectoriser; the hot inner
// products of attention go through the active SIMD path.
#include "ops.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/kernels.hpp"
#include "kernels/thread_pool.hpp"

namespace dllama {

namespace {

constexpr size_t kMinParallelWork = 1 << 15;

// fn(begin, end) over [0, n) items, on the pool when there is enough work.
template <typename F>
void parallel_for(int64_t n, size_t work, F&& fn) {
    ThreadPool& pool = global_pool();
    if (pool.size() == 1 || work < kMinParallelWork || n < 2) {
        fn(int64_t{0}, n);
        return;
    }
    pool.run([&](int t, int nt) {
        int64_t b, e;
        split_range(n, t, nt, 1, &b, &e);
        if (b < e) fn(b, e);
    });
}

}  // namespace

void rms_norm(const float* x, const float* w, float* y, int n_rows, int n, float eps) {
    parallel_for(n_rows, static_cast<size_t>(n_rows) * n, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; r++) {
            const float* xr = x + r * n;
            float* yr = y + r * n;
            float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
            for (int i = 0; i < n; i++) ss += xr[i] * xr[i];
            const float scale = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
            for (int i = 0; i < n; i++) yr[i] = w[i] * (xr[i] * scale);
        }
    });
}

void silu(float* x, size_t n) {
    const KernelTable& k = active_kernels();
    parallel_for(static_cast<int64_t>(n), n * 8, [&](int64_t b, int64_t e) { k.silu(x + b, static_cast<size_t>(e - b)); });
}

void gelu(float* x, size_t n) {
    parallel_for(static_cast<int64_t>(n), n * 8, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.70710678118654752f));
    });
}

void mul(float* x, const float* y, size_t n) {
    parallel_for(static_cast<int64_t>(n), n, [&](int64_t b, int64_t e) {
#pragma omp simd
        for (int64_t i = b; i < e; i++) x[i] *= y[i];
    });
}

void add(float* x, const float* y, size_t n) {
    parallel_for(static_cast<int64_t>(n), n, [&](int64_t b, int64_t e) {
#pragma omp simd
        for (int64_t i = b; i < e; i++) x[i] += y[i];
    });
}

void add_q80(float* x, const BlockQ80* y, size_t n_blocks) {
    parallel_for(static_cast<int64_t>(n_blocks), n_blocks * QK, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; k++) {
            const float d = f16_lut(y[k].d);
            float* o = x + k * QK;
#pragma omp simd
            for (int j = 0; j < QK; j++) o[j] += static_cast<float>(y[k].qs[j]) * d;
        }
    });
}

void softmax(float* x, int n_rows, int n) {
    parallel_for(n_rows, static_cast<size_t>(n_rows) * n * 4, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; r++) {
            float* xr = x + r * n;
            float m = xr[0];
            for (int i = 1; i < n; i++) m = std::max(m, xr[i]);
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int i = 0; i < n; i++) {
                xr[i] = std::exp(xr[i] - m);
                s += xr[i];
            }
            const float inv = 1.0f / s;
#pragma omp simd
            for (int i = 0; i < n; i++) xr[i] *= inv;
        }
    });
}

void embedding(const float* table, int vocab, int dim, const int32_t* ids, int B, float* out) {
    for (int b = 0; b < B; b++) {
        if (ids[b] < 0 || ids[b] >= vocab)
            throw std::out_of_range("token id " + std::to_string(ids[b]) + " is outside the vocabulary [0, " +
                                    std::to_string(vocab) + ")");
        std::copy(table + static_cast<size_t>(ids[b]) * dim, table + static_cast<size_t>(ids[b] + 1) * dim,
                  out + static_cast<size_t>(b) * dim);
    }
}

void rope_frequencies(float* inv_freq, int head_dim, float theta, float scaling_factor, float low_freq_factor,
                      float high_freq_factor, int original_max_seq_len) {
    const int half = head_dim / 2;
    for (int j = 0; j < half; j++) {
        float f = 1.0f / std::pow(theta, static_cast<float>(2 * j) / static_cast<float>(head_dim));
        if (scaling_factor != 1.0f) {
            // Llama 3.1: long wavelengths are slowed by the factor, short ones kept, a smooth blend between.
            const float low_wavelen = static_cast<float>(original_max_seq_len) / low_freq_factor;
            const float high_wavelen = static_cast<float>(original_max_seq_len) / high_freq_factor;
            const float wavelen = 2.0f * static_cast<float>(M_PI) / f;
            if (wavelen > low_wavelen) {
                f = f / scaling_factor;
            } else if (wavelen >= high_wavelen) {
                const float smooth = (static_cast<float>(original_max_seq_len) / wavelen - low_freq_factor) /
                                     (high_freq_factor - low_freq_factor);
                f = (1.0f - smooth) * f / scaling_factor + smooth * f;
            }
        }
        inv_freq[j] = f;
    }
}

void rope(float* x, const int32_t* positions, int B, int n_heads, int head_dim, const float* inv_freq,
          RopeStyle style) {
    const int half = head_dim / 2;
    parallel_for(B, static_cast<size_t>(B) * n_heads * head_dim * 8, [&](int64_t b0, int64_t b1) {
        std::vector<float> cs(static_cast<size_t>(head_dim));
        for (int64_t b = b0; b < b1; b++) {
            for (int j = 0; j < half; j++) {
                const double angle = static_cast<double>(positions[b]) * static_cast<double>(inv_freq[j]);
                cs[j] = static_cast<float>(std::cos(angle));
                cs[half + j] = static_cast<float>(std::sin(angle));
            }
            for (int h = 0; h < n_heads; h++) {
                float* v = x + (b * n_heads + h) * static_cast<int64_t>(head_dim);
                for (int j = 0; j < half; j++) {
                    const float c = cs[j], s = cs[half + j];
                    float* a = style == RopeStyle::Interleaved ? v + 2 * j : v + j;
                    float* d = style == RopeStyle::Interleaved ? v + 2 * j + 1 : v + j + half;
                    const float a0 = *a, d0 = *d;
                    *a = a0 * c - d0 * s;
                    *d = a0 * s + d0 * c;
                }
            }
        }
    });
}

void attention(const float* q, const float* k_cache, const float* v_cache, const int32_t* positions, int B,
               int n_heads, int n_kv_heads, int head_dim, int seq_len, float* out) {
    if (n_kv_heads <= 0 || n_heads % n_kv_heads != 0)
        throw std::invalid_argument("n_heads must be a multiple of n_kv_heads");
    for (int b = 0; b < B; b++)
        if (positions[b] < 0 || positions[b] >= seq_len)
            throw std::out_of_range("position " + std::to_string(positions[b]) + " is outside the KV cache (" +
                                    std::to_string(seq_len) + " positions)");
    const KernelTable& k = active_kernels();
    const int group = n_heads / n_kv_heads;
    const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    size_t work = 0;
    for (int b = 0; b < B; b++) work += static_cast<size_t>(positions[b] + 1) * q_dim * 2;
    // One task per (row, KV head): its query heads read each key and value row once together.
    parallel_for(static_cast<int64_t>(B) * n_kv_heads, work, [&](int64_t i0, int64_t i1) {
        std::vector<float> scores;
        for (int64_t i = i0; i < i1; i++) {
            const int b = static_cast<int>(i / n_kv_heads), kvh = static_cast<int>(i % n_kv_heads);
            const int n = positions[b] + 1;
            const size_t head0 = static_cast<size_t>(b) * q_dim + static_cast<size_t>(kvh) * group * head_dim;
            scores.resize(static_cast<size_t>(group) * n);
            k.attention_group(q + head0, k_cache + static_cast<size_t>(kvh) * head_dim * seq_len,
                              static_cast<size_t>(seq_len), v_cache + static_cast<size_t>(kvh) * head_dim,
                              static_cast<size_t>(kv_dim), n, group, head_dim, scale, out + head0, scores.data());
        }
    });
}

void moe_gate(const float* logits, int B, int n_experts, int k, bool normalize, int32_t* indices, float* weights) {
    if (k < 1 || k > n_experts) throw std::invalid_argument("top-k must be between 1 and the number of experts");
    std::vector<float> p(static_cast<size_t>(n_experts));
    std::vector<int> order(static_cast<size_t>(n_experts));
    for (int b = 0; b < B; b++) {
        const float* l = logits + static_cast<size_t>(b) * n_experts;
        float m = l[0];
        for (int e = 1; e < n_experts; e++) m = std::max(m, l[e]);
        float s = 0.0f;
        for (int e = 0; e < n_experts; e++) {
            p[e] = std::exp(l[e] - m);
            s += p[e];
        }
        for (int e = 0; e < n_experts; e++) {
            p[e] /= s;
            order[e] = e;
        }
        std::stable_sort(order.begin(), order.end(), [&](int a, int c) { return p[a] > p[c]; });
        float total = 0.0f;
        for (int j = 0; j < k; j++) total += p[order[j]];
        for (int j = 0; j < k; j++) {
            indices[static_cast<size_t>(b) * k + j] = order[j];
            weights[static_cast<size_t>(b) * k + j] = normalize ? p[order[j]] / total : p[order[j]];
        }
    }
}

}  // namespace dllama

namespace dllama {

uint64_t stream_read(const uint8_t* data, size_t n) {
    const size_t words = n / 8;
    const uint64_t* w = reinterpret_cast<const uint64_t*>(data);
    ThreadPool& pool = global_pool();
    std::vector<uint64_t> partial(static_cast<size_t>(pool.size()), 0);
    pool.run([&](int t, int nt) {
        int64_t b, e;
        split_range(static_cast<int64_t>(words), t, nt, 64, &b, &e);
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        int64_t i = b;
        for (; i + 4 <= e; i += 4) {
            s0 += w[i];
            s1 += w[i + 1];
            s2 += w[i + 2];
            s3 += w[i + 3];
        }
        for (; i < e; i++) s0 += w[i];
        partial[t] = s0 + s1 + s2 + s3;
    });
    uint64_t s = 0;
    for (uint64_t p : partial) s += p;
    for (size_t i = words * 8; i < n; i++) s += data[i];
    return s;
}

}  // namespace dllama
