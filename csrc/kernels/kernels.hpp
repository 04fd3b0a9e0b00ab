// Matmul and hot float kernels, one table per SIMD path, chosen at run time.
// Naming follows distributed-llama: matmul_<input>_<weight>_<output>.
#pragma once
#include <cstddef>
#include <cstdint>

#include "quants.hpp"

namespace dllama {

// A batch of Q80 input rows, prepared once per matmul for integer dot products.
// bias[b][k][lane] (8 lanes per block) = -offset * (sum of the 4 int8 values x[4*lane..4*lane+3])
// where offset is what the weight kernel adds to make its weights unsigned (8 for Q40, 128 for Q80).
// With the split layout (q40_split_layout), every group of 4 blocks is stored as the 4 first
// halves (values 0-15 of each block, 64 bytes) then the 4 second halves: the order of the
// unpacked low and high nibbles of 4 Q40 blocks. Its bias has 4 lanes per block:
// bias[b][k][lane] = -offset * (sum of x[4*lane..4*lane+3] and x[16+4*lane..16+4*lane+3]).
//
// With the lanes layout (q40_lanes_min_batch, for batches of at least that many rows), the
// batch is cut in groups of 16 rows (the last padded with zeros) and one 64-byte vector holds
// 4 consecutive values of one block for each of the 16 rows: lanes[g][k][c] = rows 16g..16g+15,
// values 4c..4c+3 of block k, so a weight dword broadcast against it feeds 16 rows at once.
struct PreparedQ80 {
    const BlockQ80* blocks;  // [B][nb]
    const float* scale;      // [B][nb] the blocks' fp16 scales as f32
    const int32_t* bias;     // [B][nb][8] (or [B][nb][4] with the split layout); null when unused
    const int8_t* split;     // [B][nb/4][128] with the split layout, else null
    const int8_t* lanes;       // [G][nb][8][64] with the lanes layout, else null
    const int32_t* lane_bias;  // [G][nb][16]: -8 * (sum of the block's values) per row
    const float* lane_scale;   // [G][nb][16]: the block's scale per row (0 for padding rows)
    const int32_t* block_sum;  // [B][nb]: sum of the block's 32 values (for Q40x16 weights), else null
};

// Single-threaded kernels over output rows [r0, r1); x has B rows, y is [B][rows].
struct KernelTable {
    const char* name;
    void (*matmul_f32_f32_f32)(const float* x, const float* w, float* y, int B, int rows, int cols, int r0, int r1);
    void (*matmul_f32_f16_f32)(const float* x, const uint16_t* w, float* y, int B, int rows, int cols, int r0,
                               int r1);
    void (*matmul_q80_q40_f32)(const PreparedQ80& x, const BlockQ40* w, float* y, int B, int rows, int nb, int r0,
                               int r1);
    void (*matmul_q80_q80_f32)(const PreparedQ80& x, const BlockQ80* w, float* y, int B, int rows, int nb, int r0,
                               int r1);
    // Q40x16 weights (groups of 16 rows): output rows [16*g0, min(16*g1, rows)).
    void (*matmul_q80_q40x16_f32)(const PreparedQ80& x, const BlockQ40x16* w, float* y, int B, int rows, int nb,
                                  int g0, int g1);
    void (*quantize_q80)(const float* x, BlockQ80* y, size_t n_blocks);
    float (*dot_f32)(const float* a, const float* b, int n);
    void (*axpy_f32)(float a, const float* x, float* y, int n);  // y += a * x
    // Causal attention of G query heads sharing one KV head over positions 0..n-1 (attention_impl.hpp).
    void (*attention_group)(const float* q, const float* kt, size_t kt_stride, const float* v_cache, size_t v_stride,
                            int n, int G, int hd, float scale, float* out, float* scores);
    void (*silu)(float* x, size_t n);  // x * sigmoid(x), in place
    // Offset each weight kernel adds to make weights unsigned; PreparedQ80::bias is built with
    // it (0: the kernel reads no bias).
    int q40_bias_offset;
    int q80_bias_offset;
    bool q40_split_layout;  // Q40 matmul reads PreparedQ80::split and 4-lane biases
    int q40_lanes_min_batch;  // from this batch size on, Q40 matmul reads the lanes layout (0: never)
    bool q40x16_fast;         // this path has a fast Q40x16 kernel (the engine repacks Q40 weights for it)
};

const KernelTable* kernels_scalar();
const KernelTable* kernels_avx2();        // null when not compiled in
const KernelTable* kernels_avx512();      // AVX-512 F/BW/VL/DQ without VNNI
const KernelTable* kernels_avx512vnni();  // AVX-512 with VNNI
const KernelTable* kernels_neon();

// The table in use (set by cpu_features.cpp from the CPU, DLLAMA_ISA or set_isa()).
const KernelTable& active_kernels();

// The reference Q40x16 kernel (any path without its own).
void matmul_q80_q40x16_ref(const PreparedQ80& x, const BlockQ40x16* w, float* y, int B, int rows, int nb, int g0,
                           int g1);

// Scalar helpers shared by the SIMD paths for their tails.
float dot_q80_q40_block(const BlockQ80& x, const BlockQ40& w);
float dot_q80_q80_block(const BlockQ80& x, const BlockQ80& w);

}  // namespace dllama
