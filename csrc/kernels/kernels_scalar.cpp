// The scalar path: the reference every SIMD path is tested against.
#include <cmath>
#include <cstddef>

#include <cstring>

#include "kernels.hpp"

namespace dllama {

float dot_q80_q40_block(const BlockQ80& x, const BlockQ40& w) {
    int32_t sum = 0;
    for (int j = 0; j < QK / 2; j++) {
        sum += ((w.qs[j] & 0x0f) - 8) * x.qs[j];
        sum += ((w.qs[j] >> 4) - 8) * x.qs[j + QK / 2];
    }
    return static_cast<float>(sum) * f16_lut(w.d) * f16_lut(x.d);
}

float dot_q80_q80_block(const BlockQ80& x, const BlockQ80& w) {
    int32_t sum = 0;
    for (int j = 0; j < QK; j++) sum += w.qs[j] * x.qs[j];
    return static_cast<float>(sum) * f16_lut(w.d) * f16_lut(x.d);
}

PreparedQ80 prepare_blocks(const BlockQ80* x, int B, int nb, ParallelFor parallel) { return PreparedQ80{x, nullptr}; }

void matmul_q80_q40x16_ref(const PreparedQ80& x, const BlockQ40x16* w, float* y, int B, int rows, int nb, int g0,
                           int g1) {
    for (int g = g0; g < g1; g++) {
        for (int r = 0; r < 16 && 16 * g + r < rows; r++) {
            for (int b = 0; b < B; b++) {
                float s = 0.0f;
                for (int k = 0; k < nb; k++) {
                    const BlockQ40x16& blk = w[static_cast<size_t>(g) * nb + k];
                    BlockQ40 one;
                    one.d = blk.d[r];
                    for (int c = 0; c < 4; c++)
                        for (int j = 0; j < 4; j++) one.qs[4 * c + j] = blk.qs[c][r][j];
                    s += dot_q80_q40_block(x.blocks[static_cast<size_t>(b) * nb + k], one);
                }
                y[static_cast<size_t>(b) * rows + 16 * g + r] = s;
            }
        }
    }
}

namespace {

void matmul_f32_f32_f32(const float* x, const float* w, float* y, int B, int rows, int cols, int r0, int r1) {
    for (int r = r0; r < r1; r++) {
        const float* wr = w + static_cast<size_t>(r) * cols;
        for (int b = 0; b < B; b++) {
            const float* xb = x + static_cast<size_t>(b) * cols;
            float s = 0.0f;
            for (int c = 0; c < cols; c++) s += wr[c] * xb[c];
            y[static_cast<size_t>(b) * rows + r] = s;
        }
    }
}

void matmul_f32_f16_f32(const float* x, const uint16_t* w, float* y, int B, int rows, int cols, int r0, int r1) {
    for (int r = r0; r < r1; r++) {
        const uint16_t* wr = w + static_cast<size_t>(r) * cols;
        for (int b = 0; b < B; b++) {
            const float* xb = x + static_cast<size_t>(b) * cols;
            float s = 0.0f;
            for (int c = 0; c < cols; c++) s += f16_lut(wr[c]) * xb[c];
            y[static_cast<size_t>(b) * rows + r] = s;
        }
    }
}

template <typename WBlock, float (*Dot)(const BlockQ80&, const WBlock&)>
void matmul_q80(const PreparedQ80& x, const WBlock* w, float* y, int B, int rows, int nb, int r0, int r1) {
    for (int r = r0; r < r1; r++) {
        const WBlock* wr = w + static_cast<size_t>(r) * nb;
        for (int b = 0; b < B; b++) {
            const BlockQ80* xb = x.blocks + static_cast<size_t>(b) * nb;
            float s = 0.0f;
            for (int k = 0; k < nb; k++) s += Dot(xb[k], wr[k]);
            y[static_cast<size_t>(b) * rows + r] = s;
        }
    }
}

float dot_f32(const float* a, const float* b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

void axpy_f32(float a, const float* x, float* y, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

#include "attention_impl.hpp"

const KernelTable kTable = {
    "scalar",
    matmul_f32_f32_f32,
    matmul_f32_f16_f32,
    prepare_blocks,
    matmul_q80<BlockQ40, dot_q80_q40_block>,
    prepare_blocks,
    matmul_q80<BlockQ80, dot_q80_q80_block>,
    prepare_blocks,
    matmul_q80_q40x16_ref,
    quantize_q80_ref,
    dot_f32,
    axpy_f32,
    attention_group,
    silu_f32,
    false,
};

}  // namespace

const KernelTable* kernels_scalar() { return &kTable; }

}  // namespace dllama
