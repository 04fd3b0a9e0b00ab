// Checked access to numpy arrays: dtype, C order and writability, with errors that name the
// argument. No copies are ever made.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

template <typename T>
const char* dtype_name();
template <> inline const char* dtype_name<float>() { return "float32"; }
template <> inline const char* dtype_name<uint8_t>() { return "uint8"; }
template <> inline const char* dtype_name<uint16_t>() { return "uint16"; }
template <> inline const char* dtype_name<int32_t>() { return "int32"; }

template <typename T>
void check_array(const py::array& a, const char* name, bool writable) {
    if (!a.dtype().is(py::dtype::of<T>()))
        throw py::type_error(std::string(name) + " must be a " + dtype_name<T>() + " array, got " +
                             std::string(py::str(a.dtype())));
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(name) + " must be C-contiguous (use numpy.ascontiguousarray)");
    if (writable && !a.writeable()) throw py::value_error(std::string(name) + " must be writable");
}

template <typename T>
const T* in_ptr(const py::array& a, const char* name) {
    check_array<T>(a, name, false);
    return static_cast<const T*>(a.data());
}

template <typename T>
T* out_ptr(py::array& a, const char* name) {
    check_array<T>(a, name, true);
    return static_cast<T*>(a.mutable_data());
}

inline ssize_t last_dim(const py::array& a, const char* name) {
    if (a.ndim() < 1) throw py::value_error(std::string(name) + " must have at least one dimension");
    return a.shape(a.ndim() - 1);
}

// Rows of a 2-D view: the product of every dimension but the last.
inline ssize_t leading_rows(const py::array& a) {
    ssize_t r = 1;
    for (ssize_t i = 0; i + 1 < a.ndim(); i++) r *= a.shape(i);
    return r;
}
