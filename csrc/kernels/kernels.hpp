// Matmul and hot float kernels, one table per SIMD path, chosen at run time.
// Naming follows distributed-llama: matmul_<input>_<weight>_<output>.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>

#include "quants.hpp"

namespace dllama {

// How a table's prepare function spreads its work over the thread pool: fn(begin, end) over
// [0, n) items in disjoint ranges, on the pool when `work` (about one unit per value touched) is
// worth it, else on the calling thread. The generic code passes one that uses the global pool.
using ParallelFor = void (*)(size_t n, size_t work, const std::function<void(size_t, size_t)>& fn);

// A batch of Q80 input rows as one table's quantized matmul reads it, built by that table's
// prepare function for the weight format. Integer dot products want the input in the form the
// path's instructions take (x86 makes the weights unsigned and needs biases per input block to
// undo it; AVX-512 regroups the input to match the unpacked nibbles, or puts batch rows in vector
// lanes), so each path defines `layout` itself; the generic code only hands it from the prepare
// function to the matmul. It lives in that table's per-thread scratch: valid until the same thread
// prepares another input on the same table.
struct PreparedQ80 {
    const BlockQ80* blocks;  // [B][nb], the input as given
    const void* layout;      // the path's own; null when its kernel reads the blocks alone
};

// Single-threaded kernels over output rows [r0, r1); x has B rows, y is [B][rows].
struct KernelTable {
    const char* name;
    void (*matmul_f32_f32_f32)(const float* x, const float* w, float* y, int B, int rows, int cols, int r0, int r1);
    void (*matmul_f32_f16_f32)(const float* x, const uint16_t* w, float* y, int B, int rows, int cols, int r0,
                               int r1);
    // Quantized matmuls: prepare_<w> is called once per matmul on the calling thread (it may use
    // the pool through `parallel`), then the matmul on ranges of output rows from the pool.
    PreparedQ80 (*prepare_q40)(const BlockQ80* x, int B, int nb, ParallelFor parallel);
    void (*matmul_q80_q40_f32)(const PreparedQ80& x, const BlockQ40* w, float* y, int B, int rows, int nb, int r0,
                               int r1);
    PreparedQ80 (*prepare_q80)(const BlockQ80* x, int B, int nb, ParallelFor parallel);
    void (*matmul_q80_q80_f32)(const PreparedQ80& x, const BlockQ80* w, float* y, int B, int rows, int nb, int r0,
                               int r1);
    // Q40x16 weights (groups of 16 rows): output rows [16*g0, min(16*g1, rows)).
    PreparedQ80 (*prepare_q40x16)(const BlockQ80* x, int B, int nb, ParallelFor parallel);
    void (*matmul_q80_q40x16_f32)(const PreparedQ80& x, const BlockQ40x16* w, float* y, int B, int rows, int nb,
                                  int g0, int g1);
    void (*quantize_q80)(const float* x, BlockQ80* y, size_t n_blocks);
    float (*dot_f32)(const float* a, const float* b, int n);
    void (*axpy_f32)(float a, const float* x, float* y, int n);  // y += a * x
    // Causal attention of G query heads sharing one KV head over positions 0..n-1 (attention_impl.hpp).
    void (*attention_group)(const float* q, const float* kt, size_t kt_stride, const float* v_cache, size_t v_stride,
                            int n, int G, int hd, float scale, float* out, float* scores);
    void (*silu)(float* x, size_t n);  // x * sigmoid(x), in place
    bool q40x16_fast;  // this path has a fast Q40x16 kernel (the engine repacks Q40 weights for it)
};

const KernelTable* kernels_scalar();
const KernelTable* kernels_avx2();        // null when not compiled in
const KernelTable* kernels_avx512();      // AVX-512 F/BW/VL/DQ without VNNI
const KernelTable* kernels_avx512vnni();  // AVX-512 with VNNI
const KernelTable* kernels_neon();

// The table in use (set by cpu_features.cpp from the CPU, DLLAMA_ISA or set_isa()).
const KernelTable& active_kernels();

// The input as given ({x, null}), for kernels that read the blocks alone: the scalar ones and the
// reference Q40x16 kernel.
PreparedQ80 prepare_blocks(const BlockQ80* x, int B, int nb, ParallelFor parallel);
// The reference Q40x16 kernel (any path without its own), with prepare_blocks.
void matmul_q80_q40x16_ref(const PreparedQ80& x, const BlockQ40x16* w, float* y, int B, int rows, int nb, int g0,
                           int g1);

// Scalar helpers shared by the SIMD paths for their tails.
float dot_q80_q40_block(const BlockQ80& x, const BlockQ40& w);
float dot_q80_q80_block(const BlockQ80& x, const BlockQ80& w);

}  // namespace dllama
