// Quantized block formats, byte-compatible with distributed-llama (dllama-format.md section 2).
#pragma once
#include <cstddef>
#include <cstdint>

namespace dllama {

constexpr int QK = 32;  // values per Q40 / Q80 block

// Q40: 32 values in 18 bytes. Byte j holds element j (low nibble) and j+16 (high nibble);
// value = (nibble - 8) * d.
struct BlockQ40 {
    uint16_t d;  // fp16 scale
    uint8_t qs[QK / 2];
};
// Q80: 32 values in 34 bytes, value = q * d.
struct BlockQ80 {
    uint16_t d;  // fp16 scale
    int8_t qs[QK];
};
// Q40 weights of 16 consecutive rows, one block column: the 16 scales, then the rows' nibble
// bytes in 4-byte quads: qs[c][r] holds bytes 4c..4c+3 of row r's block (values 4c..4c+3 in the
// low nibbles, 16+4c..16+4c+3 in the high ones). A matmul puts the 16 rows in vector lanes.
// Same size as 16 Q40 blocks; rows past the matrix's end are zero.
struct BlockQ40x16 {
    uint16_t d[16];
    uint8_t qs[4][16][4];
};
static_assert(sizeof(BlockQ40x16) == 16 * 18, "Q40x16 block must hold 16 Q40 blocks");
static_assert(sizeof(BlockQ40) == 18, "Q40 block must be 18 bytes");
static_assert(sizeof(BlockQ80) == 34, "Q80 block must be 34 bytes");

// IEEE half <-> float, round to nearest even (the same bits as F16C and numpy).
uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);
// Lookup table filled at load time: fp16 bits -> float.
extern float g_f16_table[65536];
inline float f16_lut(uint16_t h) { return g_f16_table[h]; }

// Reference (scalar) quantizers over whole blocks; n_blocks blocks of 32 values each.
void quantize_q40_ref(const float* x, BlockQ40* y, size_t n_blocks);
void dequantize_q40_ref(const BlockQ40* x, float* y, size_t n_blocks);
void quantize_q80_ref(const float* x, BlockQ80* y, size_t n_blocks);
void dequantize_q80_ref(const BlockQ80* x, float* y, size_t n_blocks);

// ---- llama.cpp's K-quants (GGUF files), read to be requantized: 256 values per super-block ----
constexpr int QK_K = 256;
// Q4_K: 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min packed in `scales`;
// value = d * scale * nibble - dmin * min. 144 bytes.
struct BlockQ4K {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qs[QK_K / 2];
};
// Q5_K: Q4_K plus a fifth bit per value in qh. 176 bytes.
struct BlockQ5K {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2];
};
// Q6_K: 16 sub-blocks of 16 with int8 scales; 4 low bits in ql, 2 high bits in qh,
// value = d * scale * (q - 32). 210 bytes.
struct BlockQ6K {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    uint16_t d;
};
static_assert(sizeof(BlockQ4K) == 144 && sizeof(BlockQ5K) == 176 && sizeof(BlockQ6K) == 210, "K-quant sizes");
void dequantize_q4k_ref(const BlockQ4K* x, float* y, size_t n_blocks);
void dequantize_q5k_ref(const BlockQ5K* x, float* y, size_t n_blocks);
void dequantize_q6k_ref(const BlockQ6K* x, float* y, size_t n_blocks);

}  // namespace dllama
