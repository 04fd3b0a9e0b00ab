#include "quants.hpp"

#include <cfloat>
#include <cmath>
#include <cstring>

namespace dllama {

float g_f16_table[65536];

uint16_t f32_to_f16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t exp = (x >> 23) & 0xffu;
    uint32_t mant = x & 0x7fffffu;
    if (exp == 0xff) {  // inf or nan
        return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0u));
    }
    int e = static_cast<int>(exp) - 127 + 15;
    if (e >= 0x1f) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
    if (e <= 0) {  // subnormal half (or zero)
        if (e < -10) return static_cast<uint16_t>(sign);
        mant |= 0x800000u;
        const int shift = 14 - e;
        uint32_t half = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1);
        const uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1u))) half++;
        return static_cast<uint16_t>(sign | half);
    }
    uint32_t half = (static_cast<uint32_t>(e) << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) half++;  // may carry into exponent: correct
    return static_cast<uint16_t>(sign | half);
}

float f16_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t x;
    if (exp == 0) {
        if (mant == 0) {
            x = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do {
                e++;
                mant <<= 1;
            } while (!(mant & 0x400u));
            x = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) {
        x = sign | 0x7f800000u | (mant << 13);
    } else {
        x = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

namespace {
struct TableInit {
    TableInit() {
        for (uint32_t i = 0; i < 65536; i++) g_f16_table[i] = f16_to_f32(static_cast<uint16_t>(i));
    }
} g_table_init;
}  // namespace

void quantize_q40_ref(const float* x, BlockQ40* y, size_t n_blocks) {
    for (size_t b = 0; b < n_blocks; b++) {
        const float* v = x + b * QK;
        // The element of largest magnitude, sign kept; when the largest positive and the most
        // negative value tie in magnitude the positive one wins, as in distributed-llama's converter.
        // Plain comparisons (the compiler vectorizes them; std::fmax is a library call per value,
        // 11x slower): NaNs are skipped as fmax skips them, and a block of NaNs keeps its NaN scale.
        float hi = -INFINITY, lo = INFINITY;
        for (int j = 0; j < QK; j++) {
            hi = v[j] > hi ? v[j] : hi;
            lo = v[j] < lo ? v[j] : lo;
        }
        const float max = hi < lo ? NAN : (-lo > hi ? lo : hi);
        const float d = max / -8.0f;
        const float id = std::fabs(d) >= FLT_MIN ? 1.0f / d : 0.0f;  // 0 when 1/d would overflow
        y[b].d = f32_to_f16(d);
        for (int j = 0; j < QK / 2; j++) {
            float a = v[j] * id + 8.5f;
            float c = v[j + QK / 2] * id + 8.5f;
            a = a < 0.0f ? 0.0f : (a > 15.0f ? 15.0f : a);
            c = c < 0.0f ? 0.0f : (c > 15.0f ? 15.0f : c);
            y[b].qs[j] = static_cast<uint8_t>(static_cast<int>(a) | (static_cast<int>(c) << 4));
        }
    }
}

void dequantize_q40_ref(const BlockQ40* x, float* y, size_t n_blocks) {
    for (size_t b = 0; b < n_blocks; b++) {
        const float d = f16_lut(x[b].d);
        float* o = y + b * QK;
        for (int j = 0; j < QK / 2; j++) {
            o[j] = static_cast<float>((x[b].qs[j] & 0x0f) - 8) * d;
            o[j + QK / 2] = static_cast<float>((x[b].qs[j] >> 4) - 8) * d;
        }
    }
}

void quantize_q80_ref(const float* x, BlockQ80* y, size_t n_blocks) {
    for (size_t b = 0; b < n_blocks; b++) {
        const float* v = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = std::fmax(amax, std::fabs(v[j]));
        const float d = amax / 127.0f;
        const float id = d >= FLT_MIN ? 1.0f / d : 0.0f;  // from the f32 d (not the fp16 one); 0 when 1/d overflows
        y[b].d = f32_to_f16(d);
        for (int j = 0; j < QK; j++) {
            y[b].qs[j] = static_cast<int8_t>(std::nearbyint(v[j] * id));  // half to even
        }
    }
}

void dequantize_q80_ref(const BlockQ80* x, float* y, size_t n_blocks) {
    for (size_t b = 0; b < n_blocks; b++) {
        const float d = f16_lut(x[b].d);
        for (int j = 0; j < QK; j++) y[b * QK + j] = static_cast<float>(x[b].qs[j]) * d;
    }
}

// ---- K-quants (the layouts are llama.cpp's, ggml-common.h; the arithmetic written from them) ----
namespace {
// Sub-block j's 6-bit scale and min: j < 4 in the low 6 bits of bytes j and j+4; j >= 4 split
// between the low/high nibble of byte j+4 and the top 2 bits of bytes j-4 and j.
inline void scale_min_k4(int j, const uint8_t* q, int* sc, int* mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}
}  // namespace

void dequantize_q4k_ref(const BlockQ4K* x, float* y, size_t n_blocks) {
    for (size_t b = 0; b < n_blocks; b++) {
        const float d = f16_lut(x[b].d), dmin = f16_lut(x[b].dmin);
        const uint8_t* q = x[b].qs;
        for (int j = 0; j < QK_K / 64; j++) {  // 64 values: low nibbles of 32 bytes, then high ones
            int sc, mn;
            scale_min_k4(2 * j, x[b].scales, &sc, &mn);
            const float d1 = d * sc, m1 = dmin * mn;
            scale_min_k4(2 * j + 1, x[b].scales, &sc, &mn);
            const float d2 = d * sc, m2 = dmin * mn;
            for (int l = 0; l < 32; l++) *y++ = d1 * (q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * (q[l] >> 4) - m2;
            q += 32;
        }
    }
}

void dequantize_q5k_ref(const BlockQ5K* x, float* y, size_t n_blocks) {
    for (size_t b = 0; b < n_blocks; b++) {
        const float d = f16_lut(x[b].d), dmin = f16_lut(x[b].dmin);
        const uint8_t* ql = x[b].qs;
        const uint8_t* qh = x[b].qh;
        uint8_t u1 = 1, u2 = 2;  // the bit of qh that holds each half's fifth bit
        for (int j = 0; j < QK_K / 64; j++) {
            int sc, mn;
            scale_min_k4(2 * j, x[b].scales, &sc, &mn);
            const float d1 = d * sc, m1 = dmin * mn;
            scale_min_k4(2 * j + 1, x[b].scales, &sc, &mn);
            const float d2 = d * sc, m2 = dmin * mn;
            for (int l = 0; l < 32; l++) *y++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
            ql += 32;
            u1 = static_cast<uint8_t>(u1 << 2);
            u2 = static_cast<uint8_t>(u2 << 2);
        }
    }
}

void dequantize_q6k_ref(const BlockQ6K* x, float* y, size_t n_blocks) {
    for (size_t b = 0; b < n_blocks; b++) {
        const float d = f16_lut(x[b].d);
        const uint8_t* ql = x[b].ql;
        const uint8_t* qh = x[b].qh;
        const int8_t* sc = x[b].scales;
        for (int n = 0; n < QK_K / 128; n++) {  // 128 values: four runs of 32 from 64 ql and 32 qh bytes
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * sc[is] * q1;
                y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3;
                y[l + 96] = d * sc[is + 6] * q4;
            }
            y += 128;
            ql += 64;
            qh += 32;
            sc += 8;
        }
    }
}

}  // namespace dllama
