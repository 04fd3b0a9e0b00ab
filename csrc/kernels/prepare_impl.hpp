// Steps that several paths' prepare functions share, each into a scratch vector of the caller's
// (grown once to the largest batch seen) whose data they return.
// Each kernel file includes it inside its own namespace, as attention_impl.hpp: a function
// compiled with AVX-512 flags must not be the one the linker keeps for the other paths.
// (No include guard on purpose. The including file brings <vector> and kernels.hpp.)

// scale[i] = the fp16 scale of block i as f32, for n blocks, on the calling thread.
inline const float* block_scales(const BlockQ80* x, size_t n, std::vector<float>& scale) {
    if (scale.size() < n) scale.resize(n);
    float* s = scale.data();
    for (size_t i = 0; i < n; i++) s[i] = f16_lut(x[i].d);
    return s;
}

// bias[i][l] = -offset * (sum of x[i].qs[4l..4l+3]) for the 8 lanes of 4 values of each of n
// blocks, over the pool. A kernel that adds `offset` to the weights to make them unsigned (for
// u8 x s8 dot products of 4 pairs per int32 lane) adds this to undo it.
inline const int32_t* lane_biases(const BlockQ80* x, size_t n, int offset, std::vector<int32_t>& bias,
                                  ParallelFor parallel) {
    if (bias.size() < n * 8) bias.resize(n * 8);
    int32_t* out = bias.data();
    parallel(n, n * QK * 4, [=](size_t i0, size_t i1) {
        for (size_t i = i0; i < i1; i++) {
            const int8_t* q = x[i].qs;
            for (int l = 0; l < 8; l++)
                out[i * 8 + l] = -offset * (q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
        }
    });
    return out;
}

// sum[i] = the sum of block i's 32 values, on the calling thread (for kernels that broadcast
// input values against unsigned weights: -8 * sum undoes the weights' +8 for a whole block).
inline const int32_t* block_sums(const BlockQ80* x, size_t n, std::vector<int32_t>& sum) {
    if (sum.size() < n) sum.resize(n);
    int32_t* out = sum.data();
    for (size_t i = 0; i < n; i++) {
        int s = 0;
        for (int j = 0; j < QK; j++) s += x[i].qs[j];
        out[i] = s;
    }
    return out;
}
