// AVX2 + FMA + F16C kernels: one 32-value block per 256-bit register.
#include <immintrin.h>

#include <cfloat>
#include <cmath>

#include <cstring>
#include <vector>

#include "kernels.hpp"

namespace dllama {
namespace avx2 {
namespace {

#include "prepare_impl.hpp"

// ---- the input, as this path's kernels read it (PreparedQ80::layout) ----

// Q40 and Q80 weights: the blocks' scales as floats and, for Q40, 8 biases per block
// (lane_biases with offset 8): the nibbles go into vpmaddubsw unsigned, 0..15 instead of -8..7.
// Q80 weights need no bias: their signs move onto x (vpsignb).
struct Input {
    const BlockQ80* blocks;  // [B][nb]
    const float* scale;      // [B][nb]
    const int32_t* bias;     // [B][nb][8] for Q40 weights, else null
};
// Q40x16 weights: the scales and each block's value sum (the same +8 undone for a whole block).
struct InputX16 {
    const BlockQ80* blocks;    // [B][nb]
    const float* scale;        // [B][nb]
    const int32_t* block_sum;  // [B][nb]
};

// Per-thread scratch of the prepare functions, grown to the largest batch seen.
struct Scratch {
    std::vector<float> scale;
    std::vector<int32_t> ints;  // biases or block sums
    Input in;
    InputX16 x16;
};
thread_local Scratch t_scratch;

PreparedQ80 prepare_q40(const BlockQ80* x, int B, int nb, ParallelFor parallel) {
    Scratch& s = t_scratch;
    const size_t n = static_cast<size_t>(B) * nb;
    s.in.blocks = x;
    s.in.scale = block_scales(x, n, s.scale);
    s.in.bias = lane_biases(x, n, 8, s.ints, parallel);
    return PreparedQ80{x, &s.in};
}

PreparedQ80 prepare_q80(const BlockQ80* x, int B, int nb, ParallelFor parallel) {
    Scratch& s = t_scratch;
    s.in = Input{x, block_scales(x, static_cast<size_t>(B) * nb, s.scale), nullptr};
    return PreparedQ80{x, &s.in};
}

PreparedQ80 prepare_q40x16(const BlockQ80* x, int B, int nb, ParallelFor parallel) {
    Scratch& s = t_scratch;
    const size_t n = static_cast<size_t>(B) * nb;
    s.x16 = InputX16{x, block_scales(x, n, s.scale), block_sums(x, n, s.ints)};
    return PreparedQ80{x, &s.x16};
}

inline __m256i madd_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

struct WeightBlock {
    __m256i u;     // unsigned operand
    __m256i sgn;   // Q80: the raw weights, whose signs move onto x
    __m256 scale;
};

template <bool Q80W>
inline WeightBlock load_weight(const char* wrow, int k) {
    WeightBlock p;
    if constexpr (Q80W) {
        const BlockQ80& w = reinterpret_cast<const BlockQ80*>(wrow)[k];
        p.sgn = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.qs));
        p.u = _mm256_abs_epi8(p.sgn);
        p.scale = _mm256_set1_ps(_cvtsh_ss(w.d));
    } else {
        const BlockQ40& w = reinterpret_cast<const BlockQ40*>(wrow)[k];
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs));
        const __m128i m = _mm_set1_epi8(0x0f);
        p.u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
        p.sgn = p.u;
        p.scale = _mm256_set1_ps(_cvtsh_ss(w.d));
    }
    return p;
}

template <bool Q80W, int RT, int BT>
inline void tile(const Input& x, const char* w, size_t wrow_bytes, float* y, int rows, int nb, int r, int b) {
    __m256 acc[RT][BT];
    for (int i = 0; i < RT; i++)
        for (int j = 0; j < BT; j++) acc[i][j] = _mm256_setzero_ps();
    for (int k = 0; k < nb; k++) {
        WeightBlock wb[RT];
        for (int i = 0; i < RT; i++) {
            // One prefetch per block reaches every cache line of the row well ahead of use.
            _mm_prefetch(w + (r + i) * wrow_bytes + k * (Q80W ? sizeof(BlockQ80) : sizeof(BlockQ40)) + 2048, _MM_HINT_T0);
            wb[i] = load_weight<Q80W>(w + (r + i) * wrow_bytes, k);
        }
        for (int j = 0; j < BT; j++) {
            const size_t xi = static_cast<size_t>(b + j) * nb + k;
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.blocks[xi].qs));
            const __m256 dx = _mm256_broadcast_ss(x.scale + xi);
            for (int i = 0; i < RT; i++) {
                __m256i d;
                if constexpr (Q80W) {
                    d = madd_u8s8(wb[i].u, _mm256_sign_epi8(xv, wb[i].sgn));
                } else {
                    const __m256i bias = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.bias + xi * 8));
                    d = _mm256_add_epi32(madd_u8s8(wb[i].u, xv), bias);
                }
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(wb[i].scale, dx), acc[i][j]);
            }
        }
    }
    for (int i = 0; i < RT; i++)
        for (int j = 0; j < BT; j++) y[static_cast<size_t>(b + j) * rows + r + i] = hsum(acc[i][j]);
}

template <bool Q80W, int RT, int BT>
inline void rows_loop(const Input& x, const char* w, size_t wrow_bytes, float* y, int B, int rows, int nb,
                      int r0, int r1) {
    int r = r0;
    for (; r + RT <= r1; r += RT) {
        int b = 0;
        for (; b + BT <= B; b += BT) tile<Q80W, RT, BT>(x, w, wrow_bytes, y, rows, nb, r, b);
        for (; b < B; b++) tile<Q80W, RT, 1>(x, w, wrow_bytes, y, rows, nb, r, b);
    }
    for (; r < r1; r++)
        for (int b = 0; b < B; b++) tile<Q80W, 1, 1>(x, w, wrow_bytes, y, rows, nb, r, b);
}

template <bool Q80W, typename WBlock>
void matmul_q80(const PreparedQ80& p, const WBlock* w, float* y, int B, int rows, int nb, int r0, int r1) {
    const Input& x = *static_cast<const Input*>(p.layout);
    const char* wb = reinterpret_cast<const char*>(w);
    const size_t wrow = sizeof(WBlock) * static_cast<size_t>(nb);
    if (B == 1) rows_loop<Q80W, 4, 1>(x, wb, wrow, y, B, rows, nb, r0, r1);
    else rows_loop<Q80W, 2, 4>(x, wb, wrow, y, B, rows, nb, r0, r1);
}


// ---- Q40x16 weights: 8 weight rows per register, two halves per group of 16 ----
template <int BT>
inline void tile_q40x16(const InputX16& x, const BlockQ40x16* w, float* y, int rows, int nb, int g, int half,
                        int b) {
    __m256 acc[BT];
    for (int j = 0; j < BT; j++) acc[j] = _mm256_setzero_ps();
    const __m256i m = _mm256_set1_epi8(0x0f);
    const __m256i ones = _mm256_set1_epi16(1);
    const BlockQ40x16* wg = w + static_cast<size_t>(g) * nb;
    for (int k = 0; k < nb; k++) {
        const BlockQ40x16& blk = wg[k];
        _mm_prefetch(reinterpret_cast<const char*>(&blk) + 8 * sizeof(BlockQ40x16) + 128 * half, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(&blk) + 8 * sizeof(BlockQ40x16) + 128 * half + 64, _MM_HINT_T0);
        __m256i lo[4], hi[4];
        for (int c = 0; c < 4; c++) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qs[c][8 * half]));
            lo[c] = _mm256_and_si256(v, m);
            hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.d + 8 * half)));
        for (int j = 0; j < BT; j++) {
            const size_t xi = static_cast<size_t>(b + j) * nb + k;
            const int32_t* q = reinterpret_cast<const int32_t*>(x.blocks[xi].qs);
            // Sixteen-bit sums are exact here: a vpmaddubsw pair is at most 2*15*128 = 3840 in size and
            // eight of them 30720 < 32767, so one vpmaddwd per block widens them (not eight).
            __m256i s16 = _mm256_maddubs_epi16(lo[0], _mm256_set1_epi32(q[0]));
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[0], _mm256_set1_epi32(q[4])));
            for (int c = 1; c < 4; c++) {
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo[c], _mm256_set1_epi32(q[c])));
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[c], _mm256_set1_epi32(q[4 + c])));
            }
            const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(s16, ones), _mm256_set1_epi32(-8 * x.block_sum[xi]));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(x.scale[xi])), acc[j]);
        }
    }
    const int first = 16 * g + 8 * half;
    const int valid = rows - first < 8 ? rows - first : 8;
    for (int j = 0; j < BT; j++) {
        float* out = y + static_cast<size_t>(b + j) * rows + first;
        if (valid == 8) {
            _mm256_storeu_ps(out, acc[j]);
        } else {
            alignas(32) float tmp[8];
            _mm256_store_ps(tmp, acc[j]);
            for (int r = 0; r < valid; r++) out[r] = tmp[r];
        }
    }
}

void matmul_q80_q40x16_f32(const PreparedQ80& p, const BlockQ40x16* w, float* y, int B, int rows, int nb, int g0,
                           int g1) {
    const InputX16& x = *static_cast<const InputX16*>(p.layout);
    for (int g = g0; g < g1; g++) {
        for (int half = 0; half < 2 && 16 * g + 8 * half < rows; half++) {
            int b = 0;
            for (; b + 4 <= B; b += 4) tile_q40x16<4>(x, w, y, rows, nb, g, half, b);
            for (; b < B; b++) tile_q40x16<1>(x, w, y, rows, nb, g, half, b);
        }
    }
}

void matmul_q80_q40_f32(const PreparedQ80& x, const BlockQ40* w, float* y, int B, int rows, int nb, int r0, int r1) {
    matmul_q80<false>(x, w, y, B, rows, nb, r0, r1);
}
void matmul_q80_q80_f32(const PreparedQ80& x, const BlockQ80* w, float* y, int B, int rows, int nb, int r0, int r1) {
    matmul_q80<true>(x, w, y, B, rows, nb, r0, r1);
}

float dot_f32(const float* a, const float* b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

float dot_f16_f32(const uint16_t* a, const float* b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i))),
                             _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i + 8))),
                             _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i))),
                             _mm256_loadu_ps(b + i), s0);
    float s = hsum(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += _cvtsh_ss(a[i]) * b[i];
    return s;
}

void axpy_f32(float a, const float* x, float* y, int n) {
    const __m256 va = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

void matmul_f32_f32_f32(const float* x, const float* w, float* y, int B, int rows, int cols, int r0, int r1) {
    for (int r = r0; r < r1; r++)
        for (int b = 0; b < B; b++)
            y[static_cast<size_t>(b) * rows + r] = dot_f32(w + static_cast<size_t>(r) * cols, x + static_cast<size_t>(b) * cols, cols);
}

void matmul_f32_f16_f32(const float* x, const uint16_t* w, float* y, int B, int rows, int cols, int r0, int r1) {
    for (int r = r0; r < r1; r++)
        for (int b = 0; b < B; b++)
            y[static_cast<size_t>(b) * rows + r] =
                dot_f16_f32(w + static_cast<size_t>(r) * cols, x + static_cast<size_t>(b) * cols, cols);
}

void quantize_q80(const float* x, BlockQ80* y, size_t n_blocks) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (size_t k = 0; k < n_blocks; k++) {
        __m256 v[4];
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(x + k * QK + 8 * i);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float d = _mm_cvtss_f32(h) / 127.0f;
        const float id = d >= FLT_MIN ? 1.0f / d : 0.0f;  // 0 when 1/d would overflow
        y[k].d = static_cast<uint16_t>(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT));
        const __m256 vid = _mm256_set1_ps(id);
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vid));  // half to even
        const __m256i p01 = _mm256_packs_epi32(q[0], q[1]), p23 = _mm256_packs_epi32(q[2], q[3]);
        __m256i p = _mm256_packs_epi16(p01, p23);
        // undo the lane interleaving of the packs
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[k].qs), p);
    }
}

#include "attention_impl.hpp"

const KernelTable kTable = {
    "avx2", matmul_f32_f32_f32, matmul_f32_f16_f32, prepare_q40, matmul_q80_q40_f32, prepare_q80, matmul_q80_q80_f32,
    prepare_q40x16, matmul_q80_q40x16_f32, quantize_q80, dot_f32, axpy_f32, attention_group, silu_f32, true,
};

}  // namespace
}  // namespace avx2

const KernelTable* kernels_avx2() { return &avx2::kTable; }

}  // namespace dllama
