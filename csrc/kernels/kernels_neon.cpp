// NEON kernels for aarch64 with the dot product extension (sdot) and fp16 conversion; built with
// -march=armv8.2-a+dotprod+fp16 and offered only when the CPU reports asimddp (cpu_features.cpp).
//
// Integer dot products are signed x signed (vdotq_s32): Q40 nibbles become int8 by subtracting 8,
// Q80 weights are used as they are, so the input needs no bias and no special layout: its
// prepare functions only turn the blocks' fp16 scales into floats.
//
// The matmuls work on tiles of up to 4 output rows x up to 4 batch rows. Per block, the 4 rows'
// int32 partial sums are folded with pairwise adds into one vector whose lane i is row i, scaled
// by a vector of the 4 rows' block scales and accumulated in float; lane i of the accumulator is
// then y[b][r + i], stored with one vector store.
#include <arm_neon.h>

#include <cmath>

#include <cfloat>
#include <cstring>
#include <vector>

#include "kernels.hpp"

namespace dllama {
namespace neon {
namespace {

#include "prepare_impl.hpp"

// The input of the Q40 and Q80 matmuls (PreparedQ80::layout).
struct Input {
    const BlockQ80* blocks;  // [B][nb]
    const float* scale;      // [B][nb] the blocks' fp16 scales as f32
};

// Per-thread scratch of the prepare function, grown to the largest batch seen.
struct Scratch {
    std::vector<float> scale;
    Input in;
};
thread_local Scratch t_scratch;

PreparedQ80 prepare_scales(const BlockQ80* x, int B, int nb, ParallelFor parallel) {
    Scratch& s = t_scratch;
    s.in = Input{x, block_scales(x, static_cast<size_t>(B) * nb, s.scale)};
    return PreparedQ80{x, &s.in};
}

// Bytes ahead of the current block that each weight row is prefetched (as the x86 paths do).
constexpr int kPrefetchAhead = 2048;

// The loops over the rows and batch rows of a tile have compile-time trip counts; unrolled, their
// arrays of vectors live in registers (GCC at -O2 would otherwise keep them on the stack).
#define DLLAMA_UNROLL _Pragma("GCC unroll 16")

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

// Horizontal sums of four vectors: lane i of the result is the sum of the lanes of v_i.
inline int32x4_t fold4(int32x4_t v0, int32x4_t v1, int32x4_t v2, int32x4_t v3) {
    return vpaddq_s32(vpaddq_s32(v0, v1), vpaddq_s32(v2, v3));
}
inline float32x4_t fold4(float32x4_t v0, float32x4_t v1, float32x4_t v2, float32x4_t v3) {
    return vpaddq_f32(vpaddq_f32(v0, v1), vpaddq_f32(v2, v3));
}

// Stores lanes 0..n-1 of v at y (n = 4: one vector store).
template <int N>
inline void store_lanes(float* y, float32x4_t v) {
    if constexpr (N == 4) {
        vst1q_f32(y, v);
    } else {
        float t[4];
        vst1q_f32(t, v);
        DLLAMA_UNROLL
        for (int i = 0; i < N; i++) y[i] = t[i];
    }
}

// One weight block unpacked to two int8 halves (values 0-15 and 16-31 of the block).
struct WeightBlock {
    int8x16_t lo, hi;
};

template <bool Q80W>
inline WeightBlock load_weight(const char* wrow, int k) {
    WeightBlock p;
    if constexpr (Q80W) {
        const BlockQ80& w = reinterpret_cast<const BlockQ80*>(wrow)[k];
        p.lo = vld1q_s8(w.qs);
        p.hi = vld1q_s8(w.qs + 16);
    } else {
        const BlockQ40& w = reinterpret_cast<const BlockQ40*>(wrow)[k];
        const uint8x16_t q = vld1q_u8(w.qs);
        const int8x16_t eight = vdupq_n_s8(8);
        p.lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0f))), eight);
        p.hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), eight);
    }
    return p;
}

template <bool Q80W>
inline uint16_t weight_scale_bits(const char* wrow, int k) {
    uint16_t d;
    if constexpr (Q80W) std::memcpy(&d, &reinterpret_cast<const BlockQ80*>(wrow)[k].d, 2);
    else std::memcpy(&d, &reinterpret_cast<const BlockQ40*>(wrow)[k].d, 2);
    return d;
}

// RT output rows (1..4) x BT batch rows, starting at output row r and batch row b.
template <bool Q80W, int RT, int BT>
inline void tile(const Input& x, const char* w, size_t wrow_bytes, float* y, int rows, int nb, int r, int b) {
    constexpr size_t kBlockBytes = Q80W ? sizeof(BlockQ80) : sizeof(BlockQ40);
    const char* wr[RT];
    DLLAMA_UNROLL
    for (int i = 0; i < RT; i++) wr[i] = w + static_cast<size_t>(r + i) * wrow_bytes;
    const BlockQ80* xr[BT];
    const float* xs[BT];
    DLLAMA_UNROLL
    for (int j = 0; j < BT; j++) {
        xr[j] = x.blocks + static_cast<size_t>(b + j) * nb;
        xs[j] = x.scale + static_cast<size_t>(b + j) * nb;
    }
    float32x4_t acc[BT];
    DLLAMA_UNROLL
    for (int j = 0; j < BT; j++) acc[j] = vdupq_n_f32(0.0f);
    const int32x4_t zero = vdupq_n_s32(0);

    for (int k = 0; k < nb; k++) {
        WeightBlock wb[RT];
        uint16x4_t dbits = vdup_n_u16(0);  // missing rows keep scale 0
        DLLAMA_UNROLL
        for (int i = 0; i < RT; i++) {
            prefetch(wr[i] + static_cast<size_t>(k) * kBlockBytes + kPrefetchAhead);
            wb[i] = load_weight<Q80W>(wr[i], k);
        }
        if constexpr (RT > 0) dbits = vset_lane_u16(weight_scale_bits<Q80W>(wr[0], k), dbits, 0);
        if constexpr (RT > 1) dbits = vset_lane_u16(weight_scale_bits<Q80W>(wr[1], k), dbits, 1);
        if constexpr (RT > 2) dbits = vset_lane_u16(weight_scale_bits<Q80W>(wr[2], k), dbits, 2);
        if constexpr (RT > 3) dbits = vset_lane_u16(weight_scale_bits<Q80W>(wr[3], k), dbits, 3);
        const float32x4_t dw = vcvt_f32_f16(vreinterpret_f16_u16(dbits));

        DLLAMA_UNROLL
        for (int j = 0; j < BT; j++) {
            const int8x16_t xlo = vld1q_s8(xr[j][k].qs);
            const int8x16_t xhi = vld1q_s8(xr[j][k].qs + 16);
            int32x4_t p[4] = {zero, zero, zero, zero};
            DLLAMA_UNROLL
            for (int i = 0; i < RT; i++) p[i] = vdotq_s32(vdotq_s32(zero, wb[i].lo, xlo), wb[i].hi, xhi);
            const float32x4_t s = vcvtq_f32_s32(fold4(p[0], p[1], p[2], p[3]));
            acc[j] = vfmaq_f32(acc[j], s, vmulq_n_f32(dw, xs[j][k]));
        }
    }
    DLLAMA_UNROLL
    for (int j = 0; j < BT; j++) store_lanes<RT>(y + static_cast<size_t>(b + j) * rows + r, acc[j]);
}

template <bool Q80W, int RT>
inline void batch_loop(const Input& x, const char* w, size_t wrow_bytes, float* y, int B, int rows, int nb,
                       int r) {
    int b = 0;
    for (; b + 4 <= B; b += 4) tile<Q80W, RT, 4>(x, w, wrow_bytes, y, rows, nb, r, b);
    for (; b + 2 <= B; b += 2) tile<Q80W, RT, 2>(x, w, wrow_bytes, y, rows, nb, r, b);
    for (; b < B; b++) tile<Q80W, RT, 1>(x, w, wrow_bytes, y, rows, nb, r, b);
}

template <bool Q80W, typename WBlock>
void matmul_q80(const PreparedQ80& p, const WBlock* w, float* y, int B, int rows, int nb, int r0, int r1) {
    const Input& x = *static_cast<const Input*>(p.layout);
    const char* wb = reinterpret_cast<const char*>(w);
    const size_t wrow = sizeof(WBlock) * static_cast<size_t>(nb);
    int r = r0;
    for (; r + 4 <= r1; r += 4) batch_loop<Q80W, 4>(x, wb, wrow, y, B, rows, nb, r);
    switch (r1 - r) {
        case 3: batch_loop<Q80W, 3>(x, wb, wrow, y, B, rows, nb, r); break;
        case 2: batch_loop<Q80W, 2>(x, wb, wrow, y, B, rows, nb, r); break;
        case 1: batch_loop<Q80W, 1>(x, wb, wrow, y, B, rows, nb, r); break;
        default: break;
    }
}

void matmul_q80_q40_f32(const PreparedQ80& x, const BlockQ40* w, float* y, int B, int rows, int nb, int r0, int r1) {
    matmul_q80<false>(x, w, y, B, rows, nb, r0, r1);
}
void matmul_q80_q80_f32(const PreparedQ80& x, const BlockQ80* w, float* y, int B, int rows, int nb, int r0, int r1) {
    matmul_q80<true>(x, w, y, B, rows, nb, r0, r1);
}

// ---- float matmuls: tiles of up to 4 rows sharing the x loads ----

inline float32x4_t load_w4(const float* p) { return vld1q_f32(p); }
inline float32x4_t load_w4(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
inline float load_w1(const float* p) { return *p; }
inline float load_w1(const uint16_t* p) { return f16_lut(*p); }

template <typename W, int RT>
inline void float_tile(const float* x, const W* w, float* y, int rows, int cols, int r, int b) {
    const W* wr[RT];
    DLLAMA_UNROLL
    for (int i = 0; i < RT; i++) {
        wr[i] = w + static_cast<size_t>(r + i) * cols;
        prefetch(wr[i]);
    }
    const float* xb = x + static_cast<size_t>(b) * cols;
    float32x4_t acc0[4], acc1[4];
    DLLAMA_UNROLL
    for (int i = 0; i < 4; i++) acc0[i] = acc1[i] = vdupq_n_f32(0.0f);
    constexpr int kAheadElems = kPrefetchAhead / static_cast<int>(sizeof(W));
    int c = 0;
    for (; c + 8 <= cols; c += 8) {
        const float32x4_t x0 = vld1q_f32(xb + c), x1 = vld1q_f32(xb + c + 4);
        DLLAMA_UNROLL
        for (int i = 0; i < RT; i++) {
            prefetch(wr[i] + c + kAheadElems);
            acc0[i] = vfmaq_f32(acc0[i], load_w4(wr[i] + c), x0);
            acc1[i] = vfmaq_f32(acc1[i], load_w4(wr[i] + c + 4), x1);
        }
    }
    for (; c + 4 <= cols; c += 4) {
        const float32x4_t x0 = vld1q_f32(xb + c);
        DLLAMA_UNROLL
        for (int i = 0; i < RT; i++) acc0[i] = vfmaq_f32(acc0[i], load_w4(wr[i] + c), x0);
    }
    DLLAMA_UNROLL
    for (int i = 0; i < RT; i++) acc0[i] = vaddq_f32(acc0[i], acc1[i]);
    float32x4_t s = fold4(acc0[0], acc0[1], acc0[2], acc0[3]);
    if (c < cols) {
        float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        DLLAMA_UNROLL
        for (int i = 0; i < RT; i++)
            for (int cc = c; cc < cols; cc++) tail[i] += load_w1(wr[i] + cc) * xb[cc];
        s = vaddq_f32(s, vld1q_f32(tail));
    }
    store_lanes<RT>(y + static_cast<size_t>(b) * rows + r, s);
}

template <typename W>
void matmul_float(const float* x, const W* w, float* y, int B, int rows, int cols, int r0, int r1) {
    int r = r0;
    for (; r + 4 <= r1; r += 4)
        for (int b = 0; b < B; b++) float_tile<W, 4>(x, w, y, rows, cols, r, b);
    for (int b = 0; b < B; b++) {
        switch (r1 - r) {
            case 3: float_tile<W, 3>(x, w, y, rows, cols, r, b); break;
            case 2: float_tile<W, 2>(x, w, y, rows, cols, r, b); break;
            case 1: float_tile<W, 1>(x, w, y, rows, cols, r, b); break;
            default: break;
        }
    }
}

void matmul_f32_f32_f32(const float* x, const float* w, float* y, int B, int rows, int cols, int r0, int r1) {
    matmul_float(x, w, y, B, rows, cols, r0, r1);
}
void matmul_f32_f16_f32(const float* x, const uint16_t* w, float* y, int B, int rows, int cols, int r0, int r1) {
    matmul_float(x, w, y, B, rows, cols, r0, r1);
}

// ---- quantization and vector helpers ----

// The bytes of quantize_q80_ref: amax (NaN ignored, as fmax does), d = amax / 127,
// id = 1 / d from the f32 d (0 when d < FLT_MIN), q = x * id rounded half to even,
// fp16(d) rounded to nearest even.
void quantize_q80(const float* x, BlockQ80* y, size_t n_blocks) {
    for (size_t k = 0; k < n_blocks; k++) {
        const float* v = x + k * QK;
        float32x4_t q[8];
        float32x4_t m = vdupq_n_f32(0.0f);
        DLLAMA_UNROLL
        for (int i = 0; i < 8; i++) {
            q[i] = vld1q_f32(v + 4 * i);
            m = vmaxnmq_f32(m, vabsq_f32(q[i]));
        }
        const float d = vmaxnmvq_f32(m) / 127.0f;
        const float id = d >= FLT_MIN ? 1.0f / d : 0.0f;  // 0 when 1/d would overflow
        const float16x4_t dh = vcvt_f16_f32(vdupq_n_f32(d));  // round to nearest even (FPCR default)
        const uint16_t dbits = vget_lane_u16(vreinterpret_u16_f16(dh), 0);
        std::memcpy(&y[k].d, &dbits, 2);
        int8x8_t out[4];
        DLLAMA_UNROLL
        for (int i = 0; i < 4; i++) {
            const int32x4_t a = vcvtnq_s32_f32(vmulq_n_f32(q[2 * i], id));  // half to even
            const int32x4_t c = vcvtnq_s32_f32(vmulq_n_f32(q[2 * i + 1], id));
            out[i] = vqmovn_s16(vcombine_s16(vqmovn_s32(a), vqmovn_s32(c)));
        }
        vst1q_s8(y[k].qs, vcombine_s8(out[0], out[1]));
        vst1q_s8(y[k].qs + 16, vcombine_s8(out[2], out[3]));
    }
}

float dot_f32(const float* a, const float* b, int n) {
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0, s2 = s0, s3 = s0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        s2 = vfmaq_f32(s2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        s3 = vfmaq_f32(s3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= n; i += 4) s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

void axpy_f32(float a, const float* x, float* y, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
        vst1q_f32(y + i + 4, vfmaq_n_f32(vld1q_f32(y + i + 4), vld1q_f32(x + i + 4), a));
    }
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; i++) y[i] += a * x[i];
}

#include "attention_impl.hpp"

const KernelTable kTable = {
    "neon", matmul_f32_f32_f32, matmul_f32_f16_f32, prepare_scales, matmul_q80_q40_f32, prepare_scales,
    matmul_q80_q80_f32, prepare_blocks, matmul_q80_q40x16_ref, quantize_q80, dot_f32, axpy_f32, attention_group,
    silu_f32, false,
};

}  // namespace
}  // namespace neon

const KernelTable* kernels_neon() { return &neon::kTable; }

}  // namespace dllama
