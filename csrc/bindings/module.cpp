// The private extension dllama_py._core. Only bindings live under csrc/bindings/.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_kernels(py::module_& m);
void bind_net(py::module_& m);

PYBIND11_MODULE(_core, m) {
    m.doc() = "dllama-py C++ core: quantization, matmul and forward-pass kernels";
    bind_kernels(m);
    bind_net(m);
}
