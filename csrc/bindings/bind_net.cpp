// Bindings of the network layer (csrc/net/net.hpp). Buffers are numpy arrays used in place, as raw
// bytes; every network call releases the GIL. NetError becomes dllama_py._core.NetError, a
// ConnectionError carrying .peer, .peer_name and .label.
#include <pybind11/gil_safe_call_once.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "arrays.hpp"
#include "net/net.hpp"

using dllama::Mesh;
using dllama::NetError;

namespace {

// A numpy array's bytes, for a buffer the network writes into.
uint8_t* array_bytes(py::array& a, const char* name) {
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(name) + " must be C-contiguous (use numpy.ascontiguousarray)");
    if (!a.writeable()) throw py::value_error(std::string(name) + " must be writable");
    return static_cast<uint8_t*>(a.mutable_data());
}

// A contiguous read-only view of any buffer-protocol object (bytes, bytearray, memoryview, numpy),
// held for as long as this lives so it can be read with the GIL released.
class ReadBuffer {
public:
    explicit ReadBuffer(const py::object& obj) {
        if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
    }
    ~ReadBuffer() { PyBuffer_Release(&view_); }
    ReadBuffer(const ReadBuffer&) = delete;
    ReadBuffer& operator=(const ReadBuffer&) = delete;
    const uint8_t* data() const { return static_cast<const uint8_t*>(view_.buf); }
    size_t size() const { return static_cast<size_t>(view_.len); }

private:
    Py_buffer view_{};
};

std::vector<size_t> sizes_from(const std::vector<int64_t>& values, const char* name) {
    std::vector<size_t> out(values.size());
    for (size_t i = 0; i < values.size(); i++) {
        if (values[i] < 0)
            throw py::value_error(std::string(name) + "[" + std::to_string(i) + "] must not be negative, got " +
                                  std::to_string(values[i]));
        out[i] = static_cast<size_t>(values[i]);
    }
    return out;
}

// Lets Ctrl-C abort an operation that is waiting on the network in the main thread.
void check_signals() {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

std::unique_ptr<Mesh> make_mesh(int node_index, int n_nodes, std::vector<int> fds, std::vector<std::string> names,
                                int timeout_ms) {
    auto mesh = std::make_unique<Mesh>(node_index, n_nodes, std::move(fds), std::move(names), timeout_ms);
    mesh->set_interrupt_check(check_signals);
    return mesh;
}

}  // namespace

void bind_net(py::module_& m) {
    PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::object> net_error_storage;
    net_error_storage.call_once_and_store_result([&]() {
        return py::object(py::exception<NetError>(m, "NetError", PyExc_ConnectionError));
    });
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const NetError& e) {
            py::object type = net_error_storage.get_stored();
            py::object error = type(e.what());
            error.attr("peer") = e.peer() >= 0 ? py::object(py::int_(e.peer())) : py::object(py::none());
            error.attr("peer_name") = e.peer_name();
            error.attr("label") = e.label();
            PyErr_SetObject(type.ptr(), error.ptr());
        }
    });

    py::class_<Mesh>(m, "Mesh", "A full mesh of connected sockets and the collective operations over it")
        .def(py::init(&make_mesh), py::arg("node_index"), py::arg("n_nodes"), py::arg("fds"), py::arg("peer_names"),
             py::arg("timeout_ms"))
        .def_readonly_static("DEFAULT_SPIN_US", &Mesh::kDefaultSpinUs)
        .def_property_readonly("node_index", &Mesh::node_index)
        .def_property_readonly("n_nodes", &Mesh::n_nodes)
        .def_property("timeout_ms", &Mesh::timeout_ms, &Mesh::set_timeout_ms)
        .def_property("spin_us", &Mesh::spin_us, &Mesh::set_spin_us,
                      "microseconds an operation retries non-blocking socket calls before sleeping in poll()")
        .def_property_readonly("closed", &Mesh::is_closed)
        .def_property_readonly("bytes_sent", &Mesh::bytes_sent)
        .def_property_readonly("bytes_received", &Mesh::bytes_received)
        .def("reset_counters", &Mesh::reset_counters)
        .def(
            "all_gather",
            [](Mesh& mesh, py::array& buf, int64_t slice_bytes, const std::string& label) {
                uint8_t* p = array_bytes(buf, "buf");
                if (slice_bytes < 0 || static_cast<int64_t>(buf.nbytes()) != slice_bytes * mesh.n_nodes())
                    throw py::value_error("buf holds " + std::to_string(buf.nbytes()) + " bytes, expected n_nodes (" +
                                          std::to_string(mesh.n_nodes()) + ") x slice_bytes (" +
                                          std::to_string(slice_bytes) + ")");
                py::gil_scoped_release nogil;
                mesh.all_gather(p, static_cast<size_t>(slice_bytes), label);
            },
            py::arg("buf").noconvert(), py::arg("slice_bytes"), py::arg("label") = "",
            "buf holds n_nodes slices of slice_bytes; sends slice node_index to every peer, receives theirs in place")
        .def(
            "all_gather_v",
            [](Mesh& mesh, py::array& buf, const std::vector<int64_t>& offsets, const std::vector<int64_t>& sizes,
               const std::string& label) {
                uint8_t* p = array_bytes(buf, "buf");
                const std::vector<size_t> o = sizes_from(offsets, "offsets"), s = sizes_from(sizes, "sizes");
                py::gil_scoped_release nogil;
                mesh.all_gather_v(p, static_cast<size_t>(buf.nbytes()), o, s, label);
            },
            py::arg("buf").noconvert(), py::arg("offsets"), py::arg("sizes"), py::arg("label") = "",
            "all_gather with slice i at buf bytes [offsets[i], offsets[i] + sizes[i])")
        .def(
            "all_to_all",
            [](Mesh& mesh, py::array& send, const std::vector<int64_t>& send_offsets,
               const std::vector<int64_t>& send_sizes, py::array& recv, const std::vector<int64_t>& recv_offsets,
               const std::vector<int64_t>& recv_sizes, const std::string& label) {
                const uint8_t* sp = array_bytes(send, "send");
                uint8_t* rp = array_bytes(recv, "recv");
                const std::vector<size_t> so = sizes_from(send_offsets, "send_offsets"),
                                          ss = sizes_from(send_sizes, "send_sizes"),
                                          ro = sizes_from(recv_offsets, "recv_offsets"),
                                          rs = sizes_from(recv_sizes, "recv_sizes");
                py::gil_scoped_release nogil;
                mesh.all_to_all(sp, static_cast<size_t>(send.nbytes()), so, ss, rp, static_cast<size_t>(recv.nbytes()),
                                ro, rs, label);
            },
            py::arg("send").noconvert(), py::arg("send_offsets"), py::arg("send_sizes"), py::arg("recv").noconvert(),
            py::arg("recv_offsets"), py::arg("recv_sizes"), py::arg("label") = "",
            "send bytes [send_offsets[p], +send_sizes[p]) to every peer p and receive peer p's into recv at "
            "[recv_offsets[p], +recv_sizes[p])")
        .def(
            "broadcast",
            [](Mesh& mesh, int root, py::array& buf, const std::string& label) {
                uint8_t* p = array_bytes(buf, "buf");
                py::gil_scoped_release nogil;
                mesh.broadcast(root, p, static_cast<size_t>(buf.nbytes()), label);
            },
            py::arg("root"), py::arg("buf").noconvert(), py::arg("label") = "",
            "root sends buf's bytes to every peer; the others receive them into buf")
        .def(
            "gather",
            [](Mesh& mesh, int root, py::array& buf, const std::vector<int64_t>& offsets,
               const std::vector<int64_t>& sizes, const std::string& label) {
                uint8_t* p = array_bytes(buf, "buf");
                const std::vector<size_t> o = sizes_from(offsets, "offsets"), s = sizes_from(sizes, "sizes");
                py::gil_scoped_release nogil;
                mesh.gather(root, p, static_cast<size_t>(buf.nbytes()), o, s, label);
            },
            py::arg("root"), py::arg("buf").noconvert(), py::arg("offsets"), py::arg("sizes"), py::arg("label") = "",
            "every non-root sends its slice to root, which receives them in place")
        .def(
            "send_message",
            [](Mesh& mesh, int peer, const py::object& data, const std::string& label) {
                ReadBuffer view(data);
                py::gil_scoped_release nogil;
                mesh.send_message(peer, view.data(), view.size(), label);
            },
            py::arg("peer"), py::arg("data"), py::arg("label") = "",
            "framed message (u32 LE length + payload) from any contiguous buffer")
        .def(
            "broadcast_message",
            [](Mesh& mesh, const py::object& data, const std::string& label) {
                ReadBuffer view(data);
                py::gil_scoped_release nogil;
                mesh.broadcast_message(view.data(), view.size(), label);
            },
            py::arg("data"), py::arg("label") = "",
            "root (node 0) only: one framed message to every peer at once; each reads it with recv_message(0, ...)")
        .def(
            "recv_message",
            [](Mesh& mesh, int peer, int64_t max_bytes, const std::string& label) {
                if (max_bytes < 0) throw py::value_error("max_bytes must not be negative");
                std::vector<uint8_t> data;
                {
                    py::gil_scoped_release nogil;
                    data = mesh.recv_message(peer, static_cast<size_t>(max_bytes), label);
                }
                return py::bytes(reinterpret_cast<const char*>(data.data()), data.size());
            },
            py::arg("peer"), py::arg("max_bytes"), py::arg("label") = "",
            "one framed message; a length above max_bytes is refused before allocating")
        .def(
            "recv_message_into",
            [](Mesh& mesh, int peer, py::array& buf, const std::string& label) {
                uint8_t* p = array_bytes(buf, "buf");
                py::gil_scoped_release nogil;
                return mesh.recv_message_into(peer, p, static_cast<size_t>(buf.nbytes()), label);
            },
            py::arg("peer"), py::arg("buf").noconvert(), py::arg("label") = "",
            "one framed message into buf (refused above buf.nbytes); returns its length")
        .def(
            "wait_readable",
            [](Mesh& mesh, int peer, std::optional<int> timeout_ms, const std::string& label) {
                py::gil_scoped_release nogil;
                return mesh.wait_readable(peer, timeout_ms ? std::max(*timeout_ms, 0) : -1, label);
            },
            py::arg("peer"), py::arg("timeout_ms") = py::none(), py::arg("label") = "",
            "waits until peer has bytes (or closed); False on timeout, which is not a failure")
        .def(
            "close",
            [](Mesh& mesh) {
                py::gil_scoped_release nogil;  // may wait for an operation running in another thread
                mesh.close();
            })
        .def("__enter__", [](Mesh& mesh) -> Mesh& { return mesh; }, py::return_value_policy::reference)
        .def("__exit__", [](Mesh& mesh, const py::object&, const py::object&, const py::object&) {
            py::gil_scoped_release nogil;
            mesh.close();
        });
}
