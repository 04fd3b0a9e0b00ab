// Every op of a Llama / Qwen3 / Qwen3-MoE forward pass, batched over B rows and split over the
// global thread pool. Shapes are given as [rows][cols], row-major, float32 unless said.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels/quants.hpp"

namespace dllama {

// ---- quantization (threaded over blocks) ----
void quantize_q40(const float* x, BlockQ40* y, size_t n_blocks);
void dequantize_q40(const BlockQ40* x, float* y, size_t n_blocks);
void quantize_q80(const float* x, BlockQ80* y, size_t n_blocks);
void dequantize_q80(const BlockQ80* x, float* y, size_t n_blocks);
void convert_f32_to_f16(const float* x, uint16_t* y, size_t n);
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

// ---- elementwise and normalisation ----
// y[r] = w * x[r] / sqrt(mean(x[r]^2) + eps) for each of n_rows rows of length n (y may be x).
void rms_norm(const float* x, const float* w, float* y, int n_rows, int n, float eps);
void silu(float* x, size_t n);                 // x * sigmoid(x), in place
void gelu(float* x, size_t n);                 // exact (erf) GELU, in place
void mul(float* x, const float* y, size_t n);  // x *= y
void add(float* x, const float* y, size_t n);  // x += y
void add_q80(float* x, const BlockQ80* y, size_t n_blocks);  // x += dequantized y
void softmax(float* x, int n_rows, int n);     // each row in place
// Rows of the embedding table: out[b] = table[ids[b]]; throws on an id outside [0, vocab).
void embedding(const float* table, int vocab, int dim, const int32_t* ids, int B, float* out);

// ---- RoPE ----
// inv_freq[j] for j < head_dim/2: theta^(-2j/head_dim), with Llama 3.1 smoothing when
// scaling_factor != 1 (low/high frequency factors and the original context length).
void rope_frequencies(float* inv_freq, int head_dim, float theta, float scaling_factor, float low_freq_factor,
                      float high_freq_factor, int original_max_seq_len);
enum class RopeStyle { Interleaved = 0, RotateHalf = 1 };
// x is [B][n_heads * head_dim]; row b is at position positions[b]. Interleaved rotates pairs
// (x[2j], x[2j+1]) (Meta Llama layout); RotateHalf rotates (x[j], x[j + head_dim/2]) (Qwen3, HF).
void rope(float* x, const int32_t* positions, int B, int n_heads, int head_dim, const float* inv_freq,
          RopeStyle style);

// ---- attention ----
// Causal multi-head attention with grouped KV heads over a KV cache: keys transposed
// [n_kv_heads][head_dim][seq_len], values [seq_len][n_kv_heads*head_dim]. q and out are
// [B][n_heads*head_dim]; row b attends to positions 0..positions[b].
void attention(const float* q, const float* k_cache, const float* v_cache, const int32_t* positions, int B,
               int n_heads, int n_kv_heads, int head_dim, int seq_len, float* out);

// ---- mixture of experts ----
// Softmax over each row of router logits [B][n_experts], then the top k experts by probability
// (ties: lower index first); weights renormalised to sum to 1 when normalize is true.
void moe_gate(const float* logits, int B, int n_experts, int k, bool normalize, int32_t* indices, float* weights);

}  // namespace dllama

namespace dllama {
// Reads every byte of a buffer once (threaded) and returns a checksum: the memory read
// bandwidth probe of the benchmarks.
uint64_t stream_read(const uint8_t* data, size_t n);
}  // namespace dllama
