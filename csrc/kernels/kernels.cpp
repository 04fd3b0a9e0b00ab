// Threaded entry points for quantization and matmul: split the work over the pool and call
// the active SIMD path. A quantized matmul asks the path's table to prepare its input (the
// layout is the path's business), then splits the output rows over the pool.
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

// The pool as the tables' prepare functions get it (ParallelFor): each builds its own input
// layout, over the pool when it is large enough.
void parallel_prepare(size_t n, size_t work, const std::function<void(size_t, size_t)>& fn) {
    parallel_blocks(n, work, fn);
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
void dequantize_q4k(const BlockQ4K* x, float* y, size_t n_blocks) {
    parallel_blocks(n_blocks, n_blocks * QK_K, [&](size_t b, size_t e) { dequantize_q4k_ref(x + b, y + b * QK_K, e - b); });
}
void dequantize_q5k(const BlockQ5K* x, float* y, size_t n_blocks) {
    parallel_blocks(n_blocks, n_blocks * QK_K, [&](size_t b, size_t e) { dequantize_q5k_ref(x + b, y + b * QK_K, e - b); });
}
void dequantize_q6k(const BlockQ6K* x, float* y, size_t n_blocks) {
    parallel_blocks(n_blocks, n_blocks * QK_K, [&](size_t b, size_t e) { dequantize_q6k_ref(x + b, y + b * QK_K, e - b); });
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
    const PreparedQ80 p = q80_weights ? k.prepare_q80(x, B, n_blocks, parallel_prepare)
                                      : k.prepare_q40(x, B, n_blocks, parallel_prepare);
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
    const PreparedQ80 p = k.prepare_q40x16(x, B, n_blocks, parallel_prepare);
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
    const PreparedQ80 p = k.prepare_q40(x, B, n_blocks, parallel_prepare);
    parallel_rows(rows, static_cast<size_t>(rows) * n_blocks * QK,
                  [&](int r0, int r1) { k.matmul_q80_q40_f32(p, w, y, B, rows, n_blocks, r0, r1); });
}
void matmul_q80_q80_f32(const BlockQ80* x, const BlockQ80* w, float* y, int B, int rows, int n_blocks) {
    const KernelTable& k = active_kernels();
    const PreparedQ80 p = k.prepare_q80(x, B, n_blocks, parallel_prepare);
    parallel_rows(rows, static_cast<size_t>(rows) * n_blocks * QK,
                  [&](int r0, int r1) { k.matmul_q80_q80_f32(p, w, y, B, rows, n_blocks, r0, r1); });
}

}  // namespace dllama
