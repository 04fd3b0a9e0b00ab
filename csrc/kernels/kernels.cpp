// Threaded entry points for quantization and matmul: split the work over the pool and call
// the active SIMD path.
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.hpp"
#include "thread_pool.hpp"
#include "threaded.hpp"

namespace dllama {

#if !defined(DLLAMA_HAVE_X86)
const KernelTable* kernels_avx2() { return nullptr; }
const KernelTable* kernels_avx512() { return nullptr; }
const KernelTable* kernels_avx512vnni() { return nullptr; }
#endif
#if !defined(DLLAMA_HAVE_NEON)
const KernelTable* kernels_neon() { return nullptr; }
#endif

namespace {

// Below this many elements of work an op runs on the calling thread alone.
constexpr size_t kMinParallelWork = 1 << 14;

template <typename F>
void parallel_blocks(size_t n_blocks, size_t work, F&& fn) {
    ThreadPool& pool = global_pool();
    if (pool.size() == 1 || work < kMinParallelWork) {
        fn(size_t{0}, n_blocks);
        return;
    }
    pool.run([&](int t, int nt) {
        int64_t b, e;
        split_range(static_cast<int64_t>(n_blocks), t, nt, 1, &b, &e);
        if (b < e) fn(static_cast<size_t>(b), static_cast<size_t>(e));
    });
}

// Per-caller scratch for prepared Q80 inputs, grown once to the largest batch seen.
struct PrepScratch {
    std::vector<float> scale;
    std::vector<int32_t> bias;
    std::vector<int8_t> split;
    std::vector<int8_t> lanes;
    std::vector<int32_t> lane_bias;
    std::vector<float> lane_scale;
};
thread_local PrepScratch t_prep;

void prepare_lanes(const BlockQ80* x, int B, int nb, PrepScratch& s, PreparedQ80& p) {
    const int groups = (B + 15) / 16;
    const size_t cells = static_cast<size_t>(groups) * nb;
    if (s.lanes.size() < cells * 512) s.lanes.resize(cells * 512);
    if (s.lane_bias.size() < cells * 16) s.lane_bias.resize(cells * 16);
    if (s.lane_scale.size() < cells * 16) s.lane_scale.resize(cells * 16);
    int8_t* lanes = s.lanes.data();
    int32_t* lane_bias = s.lane_bias.data();
    float* lane_scale = s.lane_scale.data();
    // Over (group, block) cells: each cell is written whole, padding rows as zeros.
    parallel_blocks(cells, cells * 16 * QK, [&](size_t c0, size_t c1) {
        for (size_t cell = c0; cell < c1; cell++) {
            const int g = static_cast<int>(cell / nb), k = static_cast<int>(cell % nb);
            int8_t* dst = lanes + cell * 512;
            for (int lane = 0; lane < 16; lane++) {
                const int b = g * 16 + lane;
                if (b >= B) {
                    for (int c = 0; c < 8; c++) std::memset(dst + c * 64 + lane * 4, 0, 4);
                    lane_bias[cell * 16 + lane] = 0;
                    lane_scale[cell * 16 + lane] = 0.0f;
                    continue;
                }
                const BlockQ80& blk = x[static_cast<size_t>(b) * nb + k];
                int sum = 0;
                for (int c = 0; c < 8; c++) {
                    std::memcpy(dst + c * 64 + lane * 4, blk.qs + 4 * c, 4);
                    sum += blk.qs[4 * c] + blk.qs[4 * c + 1] + blk.qs[4 * c + 2] + blk.qs[4 * c + 3];
                }
                lane_bias[cell * 16 + lane] = -8 * sum;
                lane_scale[cell * 16 + lane] = f16_lut(blk.d);
            }
        }
    });
    p.lanes = lanes;
    p.lane_bias = lane_bias;
    p.lane_scale = lane_scale;
}

PreparedQ80 prepare_q80(const BlockQ80* x, int B, int nb, int offset, bool split_layout, int lanes_min_batch = 0) {
    PrepScratch& s = t_prep;
    const size_t total = static_cast<size_t>(B) * nb;
    if (s.scale.size() < total) s.scale.resize(total);
    float* scale = s.scale.data();
    for (size_t i = 0; i < total; i++) scale[i] = f16_lut(x[i].d);
    PreparedQ80 p{x, scale, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
    if (lanes_min_batch > 0 && B >= lanes_min_batch) {
        prepare_lanes(x, B, nb, s, p);
        return p;
    }
    if (offset == 0) return p;
    const int lanes = split_layout ? 4 : 8;
    if (s.bias.size() < total * lanes) s.bias.resize(total * lanes);
    int32_t* bias = s.bias.data();
    const int groups = nb / 4;
    if (split_layout && s.split.size() < static_cast<size_t>(B) * groups * 128)
        s.split.resize(static_cast<size_t>(B) * groups * 128);
    int8_t* split = s.split.data();
    parallel_blocks(total, total * QK * 4, [&](size_t i0, size_t i1) {
        for (size_t i = i0; i < i1; i++) {
            const int8_t* q = x[i].qs;
            for (int l = 0; l < lanes; l++) {
                int sum = q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3];
                if (split_layout) sum += q[16 + 4 * l] + q[16 + 4 * l + 1] + q[16 + 4 * l + 2] + q[16 + 4 * l + 3];
                bias[i * lanes + l] = -offset * sum;
            }
            const size_t b = i / nb, k = i % nb;
            if (split_layout && static_cast<int>(k) < groups * 4) {
                int8_t* dst = split + (b * groups + k / 4) * 128;
                std::memcpy(dst + 16 * (k % 4), q, 16);
                std::memcpy(dst + 64 + 16 * (k % 4), q + 16, 16);
            }
        }
    });
    p.bias = bias;
    if (split_layout) p.split = split;
    return p;
}

// Split output rows over the pool in multiples of 4 (the SIMD row tile).
template <typename F>
void parallel_rows(int rows, size_t work, F&& fn) {
    ThreadPool& pool = global_pool();
    if (pool.size() == 1 || work < kMinParallelWork) {
        fn(0, rows);
        return;
    }
    pool.run([&](int t, int nt) {
        int64_t b, e;
        split_range(rows, t, nt, 4, &b, &e);
        if (b < e) fn(static_cast<int>(b), static_cast<int>(e));
    });
}

}  // namespace

void quantize_q40(const float* x, BlockQ40* y, size_t n_blocks) {
    parallel_blocks(n_blocks, n_blocks * QK, [&](size_t b, size_t e) { quantize_q40_ref(x + b * QK, y + b, e - b); });
}
void dequantize_q40(const BlockQ40* x, float* y, size_t n_blocks) {
    parallel_blocks(n_blocks, n_blocks * QK, [&](size_t b, size_t e) { dequantize_q40_ref(x + b, y + b * QK, e - b); });
}
void quantize_q80(const float* x, BlockQ80* y, size_t n_blocks) {
    const KernelTable& k = active_kernels();
    parallel_blocks(n_blocks, n_blocks * QK, [&](size_t b, size_t e) { k.quantize_q80(x + b * QK, y + b, e - b); });
}
void dequantize_q80(const BlockQ80* x, float* y, size_t n_blocks) {
    parallel_blocks(n_blocks, n_blocks * QK, [&](size_t b, size_t e) { dequantize_q80_ref(x + b, y + b * QK, e - b); });
}
void convert_f32_to_f16(const float* x, uint16_t* y, size_t n) {
    parallel_blocks(n, n, [&](size_t b, size_t e) {
        for (size_t i = b; i < e; i++) y[i] = f32_to_f16(x[i]);
    });
}
void convert_f16_to_f32(const uint16_t* x, float* y, size_t n) {
    parallel_blocks(n, n, [&](size_t b, size_t e) {
        for (size_t i = b; i < e; i++) y[i] = f16_lut(x[i]);
    });
}

void matmul_f32_f32_f32(const float* x, const float* w, float* y, int B, int rows, int cols) {
    const KernelTable& k = active_kernels();
    parallel_rows(rows, static_cast<size_t>(rows) * cols,
                  [&](int r0, int r1) { k.matmul_f32_f32_f32(x, w, y, B, rows, cols, r0, r1); });
}
void matmul_f32_f16_f32(const float* x, const uint16_t* w, float* y, int B, int rows, int cols) {
    const KernelTable& k = active_kernels();
    parallel_rows(rows, static_cast<size_t>(rows) * cols,
                  [&](int r0, int r1) { k.matmul_f32_f16_f32(x, w, y, B, rows, cols, r0, r1); });
}
void matmul_q80_many(const BlockQ80* x, int B, int n_blocks, bool q80_weights, int n_mats, const void* const* ws,
                     float* const* ys, const int* rows) {
    const KernelTable& k = active_kernels();
    const PreparedQ80 p = q80_weights ? prepare_q80(x, B, n_blocks, k.q80_bias_offset, false)
                                      : prepare_q80(x, B, n_blocks, k.q40_bias_offset, k.q40_split_layout,
                                                    k.q40_lanes_min_batch);
    int total = 0;
    for (int m = 0; m < n_mats; m++) total += rows[m];
    // One pass over the rows of every matrix, split over the pool as if they were one matrix.
    auto run = [&](int r0, int r1) {
        int base = 0;
        for (int m = 0; m < n_mats; m++) {
            const int a = std::max(r0 - base, 0), b = std::min(r1 - base, rows[m]);
            if (a < b) {
                if (q80_weights)
                    k.matmul_q80_q80_f32(p, static_cast<const BlockQ80*>(ws[m]), ys[m], B, rows[m], n_blocks, a, b);
                else
                    k.matmul_q80_q40_f32(p, static_cast<const BlockQ40*>(ws[m]), ys[m], B, rows[m], n_blocks, a, b);
            }
            base += rows[m];
        }
    };
    parallel_rows(total, static_cast<size_t>(total) * n_blocks * QK, run);
}

// Scales and block sums of the input for Q40x16 weights.
PreparedQ80 prepare_q80_x16(const BlockQ80* x, int B, int nb) {
    PrepScratch& s = t_prep;
    const size_t total = static_cast<size_t>(B) * nb;
    if (s.scale.size() < total) s.scale.resize(total);
    if (s.bias.size() < total) s.bias.resize(total);
    float* scale = s.scale.data();
    int32_t* sums = s.bias.data();
    for (size_t i = 0; i < total; i++) {
        scale[i] = f16_lut(x[i].d);
        int sum = 0;
        for (int j = 0; j < QK; j++) sum += x[i].qs[j];
        sums[i] = sum;
    }
    return PreparedQ80{x, scale, nullptr, nullptr, nullptr, nullptr, nullptr, sums};
}

namespace {
// `count` (at most 16) row-major rows of Q40 blocks starting at `group` -> out[0, nb); the
// missing rows of a last, partial group are zeros.
void repack_group(const BlockQ40* group, int count, int nb, BlockQ40x16* out) {
    for (int k = 0; k < nb; k++) {
        BlockQ40x16& o = out[k];
        std::memset(&o, 0, sizeof(o));
        for (int r = 0; r < count; r++) {
            const BlockQ40& b = group[static_cast<size_t>(r) * nb + k];
            o.d[r] = b.d;
            for (int c = 0; c < 4; c++) std::memcpy(o.qs[c][r], b.qs + 4 * c, 4);
        }
    }
}
}  // namespace

void repack_q40x16(const BlockQ40* w, int rows, int nb, BlockQ40x16* out) {
    const int groups = (rows + 15) / 16;
    parallel_blocks(static_cast<size_t>(groups), static_cast<size_t>(rows) * nb * QK, [&](size_t g0, size_t g1) {
        for (size_t g = g0; g < g1; g++)
            repack_group(w + g * 16 * nb, std::min(16, rows - static_cast<int>(g) * 16), nb, out + g * nb);
    });
}

void repack_q40x16_inplace(BlockQ40* w, int rows, int nb) {
    // A group of 16 rows takes the same bytes in both layouts: copy it aside, write it back regrouped.
    const int groups = rows / 16;
    parallel_blocks(static_cast<size_t>(groups), static_cast<size_t>(rows) * nb * QK, [&](size_t g0, size_t g1) {
        std::vector<BlockQ40> group(static_cast<size_t>(16) * nb);
        for (size_t g = g0; g < g1; g++) {
            BlockQ40* rows_g = w + g * 16 * nb;
            std::memcpy(group.data(), rows_g, group.size() * sizeof(BlockQ40));
            repack_group(group.data(), 16, nb, reinterpret_cast<BlockQ40x16*>(rows_g));
        }
    });
}

void matmul_q80_q40x16_f32(const BlockQ80* x, const BlockQ40x16* w, float* y, int B, int rows, int n_blocks) {
    const KernelTable& k = active_kernels();
    const PreparedQ80 p = prepare_q80_x16(x, B, n_blocks);
    const int groups = (rows + 15) / 16;
    ThreadPool& pool = global_pool();
    if (pool.size() == 1 || static_cast<size_t>(rows) * n_blocks * QK < 16384) {
        k.matmul_q80_q40x16_f32(p, w, y, B, rows, n_blocks, 0, groups);
        return;
    }
    pool.run([&](int t, int nt) {
        int64_t b, e;
        split_range(groups, t, nt, 1, &b, &e);
        if (b < e) k.matmul_q80_q40x16_f32(p, w, y, B, rows, n_blocks, static_cast<int>(b), static_cast<int>(e));
    });
}

void matmul_q80_q40_f32(const BlockQ80* x, const BlockQ40* w, float* y, int B, int rows, int n_blocks) {
    const KernelTable& k = active_kernels();
    const PreparedQ80 p = prepare_q80(x, B, n_blocks, k.q40_bias_offset, k.q40_split_layout, k.q40_lanes_min_batch);
    parallel_rows(rows, static_cast<size_t>(rows) * n_blocks * QK,
                  [&](int r0, int r1) { k.matmul_q80_q40_f32(p, w, y, B, rows, n_blocks, r0, r1); });
}
void matmul_q80_q80_f32(const BlockQ80* x, const BlockQ80* w, float* y, int B, int rows, int n_blocks) {
    const KernelTable& k = active_kernels();
    const PreparedQ80 p = prepare_q80(x, B, n_blocks, k.q80_bias_offset, false);
    parallel_rows(rows, static_cast<size_t>(rows) * n_blocks * QK,
                  [&](int r0, int r1) { k.matmul_q80_q80_f32(p, w, y, B, rows, n_blocks, r0, r1); });
}

}  // namespace dllama
