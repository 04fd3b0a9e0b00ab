// The threaded entry points of the kernels: quantization, conversion and matmul, split over the
// global thread pool and run on the active SIMD path (kernels.cpp). Shapes are [rows][cols],
// row-major.
#pragma once
#include <cstddef>
#include <cstdint>

#include "quants.hpp"

namespace dllama {

// ---- quantization (threaded over blocks) ----
void quantize_q40(const float* x, BlockQ40* y, size_t n_blocks);
void dequantize_q40(const BlockQ40* x, float* y, size_t n_blocks);
void quantize_q80(const float* x, BlockQ80* y, size_t n_blocks);
void dequantize_q80(const BlockQ80* x, float* y, size_t n_blocks);
void convert_f32_to_f16(const float* x, uint16_t* y, size_t n);
// llama.cpp's K-quants to float (n_blocks super-blocks of QK_K values), for requantizing GGUF weights.
void dequantize_q4k(const BlockQ4K* x, float* y, size_t n_blocks);
void dequantize_q5k(const BlockQ5K* x, float* y, size_t n_blocks);
void dequantize_q6k(const BlockQ6K* x, float* y, size_t n_blocks);
void convert_f16_to_f32(const uint16_t* x, float* y, size_t n);

// ---- matmul y[B][rows] = x[B][cols] * w[rows][cols]^T (threaded over rows) ----
void matmul_f32_f32_f32(const float* x, const float* w, float* y, int B, int rows, int cols);
void matmul_f32_f16_f32(const float* x, const uint16_t* w, float* y, int B, int rows, int cols);
void matmul_q80_q40_f32(const BlockQ80* x, const BlockQ40* w, float* y, int B, int rows, int n_blocks);
void matmul_q80_q80_f32(const BlockQ80* x, const BlockQ80* w, float* y, int B, int rows, int n_blocks);
// Q40 weights regrouped 16 rows at a time (for the paths that put weight rows in vector lanes);
// out holds ceil(rows/16) * nb blocks.
void repack_q40x16(const BlockQ40* w, int rows, int nb, BlockQ40x16* out);
// The same in place, for rows % 16 == 0 (the bytes of 16 rows become one row of Q40x16 blocks).
void repack_q40x16_inplace(BlockQ40* w, int rows, int nb);
void matmul_q80_q40x16_f32(const BlockQ80* x, const BlockQ40x16* w, float* y, int B, int rows, int n_blocks);
// Several matrices against one input (q/k/v, or w1/w3): the input is prepared once and the rows
// of all of them are split over the pool together. ws[m] holds rows[m] rows of Q40 (or Q80) blocks.
void matmul_q80_many(const BlockQ80* x, int B, int n_blocks, bool q80_weights, int n_mats, const void* const* ws,
                     float* const* ys, const int* rows);

}  // namespace dllama
