// Bindings of the kernel library. Every call checks its arrays, then releases the GIL.
#include <pybind11/stl.h>

#include <vector>

#include "arrays.hpp"
#include "kernels/cpu_features.hpp"
#include "kernels/kernels.hpp"
#include "kernels/thread_pool.hpp"
#include "kernels/threaded.hpp"
#include "ops/ops.hpp"

using namespace dllama;

namespace {

std::vector<ssize_t> with_last(const py::array& a, ssize_t last) {
    std::vector<ssize_t> shape(a.shape(), a.shape() + a.ndim());
    shape.back() = last;
    return shape;
}

ssize_t blocks_of_values(const py::array& x, const char* name) {
    const ssize_t n = last_dim(x, name);
    if (n % QK != 0)
        throw py::value_error(std::string(name) + ": the last dimension (" + std::to_string(n) +
                              ") must be a multiple of 32 to quantize");
    return n / QK;
}

ssize_t blocks_of_bytes(const py::array& q, const char* name, ssize_t block_bytes) {
    const ssize_t n = last_dim(q, name);
    if (n % block_bytes != 0)
        throw py::value_error(std::string(name) + ": the last dimension (" + std::to_string(n) +
                              ") must be a multiple of the block size " + std::to_string(block_bytes));
    return n / block_bytes;
}

template <typename Block, void (*Quantize)(const float*, Block*, size_t)>
py::array_t<uint8_t> quantize(const py::array& x) {
    const float* xp = in_ptr<float>(x, "x");
    const ssize_t nb = blocks_of_values(x, "x");
    py::array_t<uint8_t> out(with_last(x, nb * static_cast<ssize_t>(sizeof(Block))));
    Block* op = reinterpret_cast<Block*>(out.mutable_data());
    const size_t total = static_cast<size_t>(leading_rows(x) * nb);
    py::gil_scoped_release nogil;
    Quantize(xp, op, total);
    return out;
}

template <typename Block, void (*Dequantize)(const Block*, float*, size_t), int Values = QK>
py::array_t<float> dequantize(const py::array& q) {
    const uint8_t* qp = in_ptr<uint8_t>(q, "q");
    const ssize_t nb = blocks_of_bytes(q, "q", sizeof(Block));
    py::array_t<float> out(with_last(q, nb * Values));
    float* op = out.mutable_data();
    const size_t total = static_cast<size_t>(leading_rows(q) * nb);
    py::gil_scoped_release nogil;
    Dequantize(reinterpret_cast<const Block*>(qp), op, total);
    return out;
}

void quantize_q80_into(const py::array& x, py::array& out) {
    const float* xp = in_ptr<float>(x, "x");
    uint8_t* op = out_ptr<uint8_t>(out, "out");
    const ssize_t nb = blocks_of_values(x, "x");
    const size_t total = static_cast<size_t>(leading_rows(x) * nb);
    if (static_cast<size_t>(out.size()) != total * sizeof(BlockQ80))
        throw py::value_error("out must hold " + std::to_string(total * sizeof(BlockQ80)) + " bytes, has " +
                              std::to_string(out.size()));
    py::gil_scoped_release nogil;
    quantize_q80(xp, reinterpret_cast<BlockQ80*>(op), total);
}

// Shapes of y = x W^T: x (B, x_cols), w (rows, w_cols), y (B, rows); returns B.
int check_matmul(const py::array& x, const py::array& w, const py::array& y, ssize_t x_cols, ssize_t w_cols) {
    if (w.ndim() != 2) throw py::value_error("w must be 2-D (rows, cols), got " + std::to_string(w.ndim()) + "-D");
    if (y.ndim() != 2) throw py::value_error("y must be 2-D (batch, rows)");
    const ssize_t B = x.ndim() == 2 ? x.shape(0) : 1;
    if (x.ndim() != 2 && x.ndim() != 1) throw py::value_error("x must be 1-D or 2-D (batch, cols)");
    if (last_dim(x, "x") != x_cols || w.shape(1) != w_cols)
        throw py::value_error("w has " + std::to_string(w.shape(1)) + " columns but x has " +
                              std::to_string(last_dim(x, "x")) + " per row; w must have shape (rows, " +
                              std::to_string(w_cols) + ")");
    if (y.shape(0) != B || y.shape(1) != w.shape(0))
        throw py::value_error("y must have shape (" + std::to_string(B) + ", " + std::to_string(w.shape(0)) + ")");
    return static_cast<int>(B);
}

void bind_matmul_f32(const py::array& x, const py::array& w, py::array& y) {
    const float *xp = in_ptr<float>(x, "x"), *wp = in_ptr<float>(w, "w");
    float* yp = out_ptr<float>(y, "y");
    const ssize_t cols = last_dim(x, "x");
    const int B = check_matmul(x, w, y, cols, cols);
    const int rows = static_cast<int>(w.shape(0));
    py::gil_scoped_release nogil;
    matmul_f32_f32_f32(xp, wp, yp, B, rows, static_cast<int>(cols));
}

void bind_matmul_f16(const py::array& x, const py::array& w, py::array& y) {
    const float* xp = in_ptr<float>(x, "x");
    const uint16_t* wp = in_ptr<uint16_t>(w, "w");
    float* yp = out_ptr<float>(y, "y");
    const ssize_t cols = last_dim(x, "x");
    const int B = check_matmul(x, w, y, cols, cols);
    const int rows = static_cast<int>(w.shape(0));
    py::gil_scoped_release nogil;
    matmul_f32_f16_f32(xp, wp, yp, B, rows, static_cast<int>(cols));
}

template <typename WBlock, void (*Matmul)(const BlockQ80*, const WBlock*, float*, int, int, int)>
void bind_matmul_q(const py::array& x, const py::array& w, py::array& y) {
    const uint8_t* xp = in_ptr<uint8_t>(x, "x");
    const uint8_t* wp = in_ptr<uint8_t>(w, "w");
    float* yp = out_ptr<float>(y, "y");
    const ssize_t nb = blocks_of_bytes(x, "x", sizeof(BlockQ80));
    const int B = check_matmul(x, w, y, nb * static_cast<ssize_t>(sizeof(BlockQ80)), nb * static_cast<ssize_t>(sizeof(WBlock)));
    const int rows = static_cast<int>(w.shape(0));
    py::gil_scoped_release nogil;
    Matmul(reinterpret_cast<const BlockQ80*>(xp), reinterpret_cast<const WBlock*>(wp), yp, B, rows, static_cast<int>(nb));
}

void check_same_size(const py::array& a, const py::array& b, const char* an, const char* bn) {
    if (a.size() != b.size())
        throw py::value_error(std::string(an) + " and " + bn + " must have the same number of elements (" +
                              std::to_string(a.size()) + " vs " + std::to_string(b.size()) + ")");
}

}  // namespace

void bind_kernels(py::module_& m) {
    m.attr("Q40_BLOCK_SIZE") = QK;
    m.attr("Q40_BLOCK_BYTES") = static_cast<int>(sizeof(BlockQ40));
    m.attr("Q80_BLOCK_SIZE") = QK;
    m.attr("Q80_BLOCK_BYTES") = static_cast<int>(sizeof(BlockQ80));

    m.def("compiled_isas", &compiled_isas, "SIMD paths compiled into this build");
    m.def("supported_isas", &supported_isas, "Compiled SIMD paths that this CPU can run, slowest first");
    m.def("best_isa", &best_isa, "The SIMD path chosen automatically for this CPU");
    m.def("get_isa", &get_isa, "The SIMD path in use");
    m.def("set_isa", &set_isa, py::arg("name"), "Force a SIMD path (also settable with DLLAMA_ISA)");
    m.def("get_num_threads", &get_num_threads);
    m.def("set_num_threads", &set_num_threads, py::arg("n"), py::call_guard<py::gil_scoped_release>());
    m.def("hardware_threads", &hardware_threads);

    m.def("quantize_q40", &quantize<BlockQ40, quantize_q40>, py::arg("x"));
    m.def("dequantize_q40", &dequantize<BlockQ40, dequantize_q40>, py::arg("q"));
    m.def("quantize_q80", &quantize<BlockQ80, quantize_q80>, py::arg("x"));
    m.def("dequantize_q80", &dequantize<BlockQ80, dequantize_q80>, py::arg("q"));
    m.def("quantize_q80_into", &quantize_q80_into, py::arg("x"), py::arg("out"));
    m.def("dequantize_q4k", &dequantize<BlockQ4K, dequantize_q4k, QK_K>, py::arg("q"),
          "llama.cpp Q4_K super-blocks (uint8 rows of 144-byte blocks) to float32 (threaded)");
    m.def("dequantize_q5k", &dequantize<BlockQ5K, dequantize_q5k, QK_K>, py::arg("q"),
          "llama.cpp Q5_K super-blocks (uint8 rows of 176-byte blocks) to float32 (threaded)");
    m.def("dequantize_q6k", &dequantize<BlockQ6K, dequantize_q6k, QK_K>, py::arg("q"),
          "llama.cpp Q6_K super-blocks (uint8 rows of 210-byte blocks) to float32 (threaded)");
    m.def("f32_to_f16", [](const py::array& x) {
        const float* xp = in_ptr<float>(x, "x");
        py::array_t<uint16_t> out(std::vector<ssize_t>(x.shape(), x.shape() + x.ndim()));
        uint16_t* op = out.mutable_data();
        const size_t n = static_cast<size_t>(x.size());
        py::gil_scoped_release nogil;
        convert_f32_to_f16(xp, op, n);
        return out;
    }, py::arg("x"));
    m.def("f16_to_f32", [](const py::array& h) {
        const uint16_t* hp = in_ptr<uint16_t>(h, "h");
        py::array_t<float> out(std::vector<ssize_t>(h.shape(), h.shape() + h.ndim()));
        float* op = out.mutable_data();
        const size_t n = static_cast<size_t>(h.size());
        py::gil_scoped_release nogil;
        convert_f16_to_f32(hp, op, n);
        return out;
    }, py::arg("h"));

    m.def("matmul_f32_f32_f32", &bind_matmul_f32, py::arg("x"), py::arg("w"), py::arg("y"));
    m.def("matmul_f32_f16_f32", &bind_matmul_f16, py::arg("x"), py::arg("w"), py::arg("y"));
    m.def("matmul_q80_q40_f32", &bind_matmul_q<BlockQ40, matmul_q80_q40_f32>, py::arg("x"), py::arg("w"), py::arg("y"));
    m.def("matmul_q80_q80_f32", &bind_matmul_q<BlockQ80, matmul_q80_q80_f32>, py::arg("x"), py::arg("w"), py::arg("y"));

    m.def("repack_q40x16", [](const py::array& w) {
        const uint8_t* wp = in_ptr<uint8_t>(w, "w");
        if (w.ndim() != 2) throw py::value_error("w must be 2-D (rows, cols/32*18)");
        const ssize_t nb = blocks_of_bytes(w, "w", sizeof(BlockQ40));
        const int rows = static_cast<int>(w.shape(0));
        const ssize_t groups = (rows + 15) / 16;
        py::array_t<uint8_t> out(std::vector<ssize_t>{groups, nb * static_cast<ssize_t>(sizeof(BlockQ40x16))});
        uint8_t* op = out.mutable_data();
        {
            py::gil_scoped_release nogil;
            repack_q40x16(reinterpret_cast<const BlockQ40*>(wp), rows, static_cast<int>(nb),
                          reinterpret_cast<BlockQ40x16*>(op));
        }
        return out;
    }, py::arg("w"), "Q40 weights (rows, cols/32*18) regrouped 16 rows at a time: (ceil(rows/16), cols/32*288)");
    m.def("repack_q40x16_inplace", [](py::array& w) {
        uint8_t* wp = out_ptr<uint8_t>(w, "w");
        if (w.ndim() != 2) throw py::value_error("w must be 2-D (rows, cols/32*18)");
        const ssize_t nb = blocks_of_bytes(w, "w", sizeof(BlockQ40));
        const int rows = static_cast<int>(w.shape(0));
        if (rows % 16) throw py::value_error("in-place regrouping needs a multiple of 16 rows, got " + std::to_string(rows));
        {
            py::gil_scoped_release nogil;
            repack_q40x16_inplace(reinterpret_cast<BlockQ40*>(wp), rows, static_cast<int>(nb));
        }
        return w.attr("reshape")(rows / 16, nb * static_cast<ssize_t>(sizeof(BlockQ40x16)));
    }, py::arg("w"), "repack_q40x16 in w's own memory (rows a multiple of 16); returns w viewed as (rows/16, cols/32*288)");
    m.def("matmul_q80_q40x16_f32", [](const py::array& x, const py::array& w, py::array& y) {
        const uint8_t* xp = in_ptr<uint8_t>(x, "x");
        const uint8_t* wp = in_ptr<uint8_t>(w, "w");
        float* yp = out_ptr<float>(y, "y");
        const ssize_t nb = blocks_of_bytes(x, "x", sizeof(BlockQ80));
        const ssize_t B = x.ndim() == 2 ? x.shape(0) : 1;
        if (y.ndim() != 2 || y.shape(0) != B) throw py::value_error("y must have shape (batch, rows)");
        const int rows = static_cast<int>(y.shape(1));
        if (w.ndim() != 2 || w.shape(0) != (rows + 15) / 16 || w.shape(1) != nb * static_cast<ssize_t>(sizeof(BlockQ40x16)))
            throw py::value_error("w must be Q40x16 weights of shape (ceil(rows/16), cols/32*288) for y's rows and x's cols");
        py::gil_scoped_release nogil;
        matmul_q80_q40x16_f32(reinterpret_cast<const BlockQ80*>(xp), reinterpret_cast<const BlockQ40x16*>(wp), yp,
                              static_cast<int>(B), rows, static_cast<int>(nb));
    }, py::arg("x"), py::arg("w"), py::arg("y"), "y (B, rows) = x @ W^T for Q40x16 weights");
    m.def("q40x16_fast", []() { return active_kernels().q40x16_fast; },
          "whether the SIMD path in use has a fast kernel for Q40x16 weights");
    m.def("matmul_q80_many", [](const py::array& x, const std::vector<py::array>& ws, std::vector<py::array> ys,
                                 bool q80_weights) {
        const uint8_t* xp = in_ptr<uint8_t>(x, "x");
        const ssize_t nb = blocks_of_bytes(x, "x", sizeof(BlockQ80));
        const ssize_t wbytes = nb * static_cast<ssize_t>(q80_weights ? sizeof(BlockQ80) : sizeof(BlockQ40));
        if (ws.size() != ys.size() || ws.empty()) throw py::value_error("ws and ys must be non-empty lists of equal length");
        std::vector<const void*> wp;
        std::vector<float*> yp;
        std::vector<int> rows;
        int B = 1;
        for (size_t m = 0; m < ws.size(); m++) {
            wp.push_back(in_ptr<uint8_t>(ws[m], "ws[i]"));
            yp.push_back(out_ptr<float>(ys[m], "ys[i]"));
            B = check_matmul(x, ws[m], ys[m], nb * static_cast<ssize_t>(sizeof(BlockQ80)), wbytes);
            rows.push_back(static_cast<int>(ws[m].shape(0)));
        }
        py::gil_scoped_release nogil;
        matmul_q80_many(reinterpret_cast<const BlockQ80*>(xp), B, static_cast<int>(nb), q80_weights,
                        static_cast<int>(ws.size()), wp.data(), yp.data(), rows.data());
    }, py::arg("x"), py::arg("ws"), py::arg("ys"), py::arg("q80_weights"),
       "ys[i] = x @ ws[i]^T for Q40 (or Q80) weights sharing one Q80 input, prepared once");
    m.def("rms_norm", [](const py::array& x, const py::array& w, py::array& out, float eps) {
        const float *xp = in_ptr<float>(x, "x"), *wp = in_ptr<float>(w, "w");
        float* op = out_ptr<float>(out, "out");
        const ssize_t n = last_dim(x, "x");
        if (w.size() != n) throw py::value_error("w must have " + std::to_string(n) + " elements");
        check_same_size(x, out, "x", "out");
        const int rows = static_cast<int>(leading_rows(x));
        py::gil_scoped_release nogil;
        rms_norm(xp, wp, op, rows, static_cast<int>(n), eps);
    }, py::arg("x"), py::arg("w"), py::arg("out"), py::arg("eps"),
       "out[r] = w * x[r] / sqrt(mean(x[r]^2) + eps) over the last dimension (out may be x)");
    m.def("silu", [](py::array& x) {
        float* p = out_ptr<float>(x, "x");
        const size_t n = static_cast<size_t>(x.size());
        py::gil_scoped_release nogil;
        silu(p, n);
    }, py::arg("x"));
    m.def("gelu", [](py::array& x) {
        float* p = out_ptr<float>(x, "x");
        const size_t n = static_cast<size_t>(x.size());
        py::gil_scoped_release nogil;
        gelu(p, n);
    }, py::arg("x"));
    m.def("mul", [](py::array& x, const py::array& y) {
        float* p = out_ptr<float>(x, "x");
        const float* q = in_ptr<float>(y, "y");
        check_same_size(x, y, "x", "y");
        const size_t n = static_cast<size_t>(x.size());
        py::gil_scoped_release nogil;
        mul(p, q, n);
    }, py::arg("x"), py::arg("y"), "x *= y");
    m.def("add", [](py::array& x, const py::array& y) {
        float* p = out_ptr<float>(x, "x");
        const float* q = in_ptr<float>(y, "y");
        check_same_size(x, y, "x", "y");
        const size_t n = static_cast<size_t>(x.size());
        py::gil_scoped_release nogil;
        add(p, q, n);
    }, py::arg("x"), py::arg("y"), "x += y");
    m.def("add_q80", [](py::array& x, const py::array& q) {
        float* p = out_ptr<float>(x, "x");
        const uint8_t* qp = in_ptr<uint8_t>(q, "q");
        const ssize_t nb = static_cast<ssize_t>(q.size()) / static_cast<ssize_t>(sizeof(BlockQ80));
        if (q.size() % sizeof(BlockQ80) || nb * QK != x.size())
            throw py::value_error("q must hold the Q80 blocks of exactly x.size values");
        py::gil_scoped_release nogil;
        add_q80(p, reinterpret_cast<const BlockQ80*>(qp), static_cast<size_t>(nb));
    }, py::arg("x"), py::arg("q"), "x += dequantize_q80(q)");
    m.def("softmax", [](py::array& x) {
        float* p = out_ptr<float>(x, "x");
        const int n = static_cast<int>(last_dim(x, "x"));
        const int rows = static_cast<int>(leading_rows(x));
        py::gil_scoped_release nogil;
        softmax(p, rows, n);
    }, py::arg("x"), "softmax over the last dimension, in place");
    m.def("embedding", [](const py::array& table, const py::array& ids, py::array& out) {
        const float* tp = in_ptr<float>(table, "table");
        const int32_t* ip = in_ptr<int32_t>(ids, "ids");
        float* op = out_ptr<float>(out, "out");
        if (table.ndim() != 2) throw py::value_error("table must be 2-D (vocab, dim)");
        const int vocab = static_cast<int>(table.shape(0)), dim = static_cast<int>(table.shape(1));
        const int B = static_cast<int>(ids.size());
        if (out.size() != static_cast<ssize_t>(B) * dim) throw py::value_error("out must have shape (len(ids), dim)");
        py::gil_scoped_release nogil;
        embedding(tp, vocab, dim, ip, B, op);
    }, py::arg("table"), py::arg("ids"), py::arg("out"));
    m.def("rope_frequencies", [](int head_dim, float theta, float scaling_factor, float low_freq_factor,
                                 float high_freq_factor, int original_max_seq_len) {
        if (head_dim < 2 || head_dim % 2) throw py::value_error("head_dim must be even");
        py::array_t<float> out(head_dim / 2);
        rope_frequencies(out.mutable_data(), head_dim, theta, scaling_factor, low_freq_factor, high_freq_factor,
                         original_max_seq_len);
        return out;
    }, py::arg("head_dim"), py::arg("theta"), py::arg("scaling_factor") = 1.0f, py::arg("low_freq_factor") = 1.0f,
       py::arg("high_freq_factor") = 4.0f, py::arg("original_max_seq_len") = 8192);
    m.def("rope", [](py::array& x, const py::array& positions, const py::array& inv_freq, int n_heads, int head_dim,
                     const std::string& style) {
        float* xp = out_ptr<float>(x, "x");
        const int32_t* pp = in_ptr<int32_t>(positions, "positions");
        const float* fp = in_ptr<float>(inv_freq, "inv_freq");
        RopeStyle s;
        if (style == "interleaved") s = RopeStyle::Interleaved;
        else if (style == "rotate_half") s = RopeStyle::RotateHalf;
        else throw py::value_error("rope style must be 'interleaved' or 'rotate_half', got '" + style + "'");
        const ssize_t B = positions.size();
        if (x.size() != B * n_heads * head_dim)
            throw py::value_error("x must have shape (len(positions), n_heads * head_dim)");
        if (inv_freq.size() != head_dim / 2) throw py::value_error("inv_freq must have head_dim / 2 elements");
        py::gil_scoped_release nogil;
        rope(xp, pp, static_cast<int>(B), n_heads, head_dim, fp, s);
    }, py::arg("x"), py::arg("positions"), py::arg("inv_freq"), py::arg("n_heads"), py::arg("head_dim"),
       py::arg("style"));
    m.def("attention", [](const py::array& q, const py::array& k_cache, const py::array& v_cache,
                          const py::array& positions, py::array& out, int n_heads, int n_kv_heads, int head_dim) {
        const float* qp = in_ptr<float>(q, "q");
        const float* kp = in_ptr<float>(k_cache, "k_cache");
        const float* vp = in_ptr<float>(v_cache, "v_cache");
        const int32_t* pp = in_ptr<int32_t>(positions, "positions");
        float* op = out_ptr<float>(out, "out");
        const ssize_t B = positions.size();
        if (q.size() != B * n_heads * head_dim || out.size() != q.size())
            throw py::value_error("q and out must have shape (len(positions), n_heads * head_dim)");
        if (k_cache.ndim() != 3 || k_cache.shape(0) != n_kv_heads || k_cache.shape(1) != head_dim)
            throw py::value_error("k_cache must have shape (n_kv_heads, head_dim, seq_len): keys transposed");
        const int seq_len = static_cast<int>(k_cache.shape(2));
        if (v_cache.ndim() != 2 || v_cache.shape(0) != seq_len ||
            v_cache.shape(1) != static_cast<ssize_t>(n_kv_heads) * head_dim)
            throw py::value_error("v_cache must have shape (seq_len, n_kv_heads * head_dim)");
        py::gil_scoped_release nogil;
        attention(qp, kp, vp, pp, static_cast<int>(B), n_heads, n_kv_heads, head_dim, seq_len, op);
    }, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("positions"), py::arg("out"), py::arg("n_heads"),
       py::arg("n_kv_heads"), py::arg("head_dim"));
    m.def("moe_gate", [](const py::array& logits, int k, bool normalize) {
        const float* lp = in_ptr<float>(logits, "logits");
        const int n_experts = static_cast<int>(last_dim(logits, "logits"));
        const int B = static_cast<int>(leading_rows(logits));
        py::array_t<int32_t> idx(std::vector<ssize_t>{B, k});
        py::array_t<float> wts(std::vector<ssize_t>{B, k});
        int32_t* ip = idx.mutable_data();
        float* wp = wts.mutable_data();
        {
            py::gil_scoped_release nogil;
            moe_gate(lp, B, n_experts, k, normalize, ip, wp);
        }
        return py::make_tuple(idx, wts);
    }, py::arg("logits"), py::arg("k"), py::arg("normalize") = true,
       "softmax over experts, top k by probability; returns (indices int32 (B,k), weights f32 (B,k))");
    m.def("stream_read", [](const py::array& data) {
        const uint8_t* p = in_ptr<uint8_t>(data, "data");
        const size_t n = static_cast<size_t>(data.size());
        py::gil_scoped_release nogil;
        return stream_read(p, n);
    }, py::arg("data"), "read every byte once on all threads (bandwidth probe); returns a checksum");
}
