// The ops of a Llama / Qwen3 / Qwen3-MoE forward pass besides quantization and matmul (those are
// the kernels' threaded entry points, kernels/threaded.hpp), batched over B rows and split over the
// global thread pool. Shapes are given as [rows][cols], row-major, float32 unless said.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels/quants.hpp"

namespace dllama {

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
