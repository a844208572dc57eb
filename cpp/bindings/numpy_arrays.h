// How core.h reads a NumPy array (buffer protocol): dtype, pointer, shape,
// strides, writability, alignment. lmxent._cpu's module type derives from it
// and adds its kernel call; so does the tests' block emulator (tests/emu/).
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "core.h"

namespace lmxent {
namespace bindings {

struct NumpyArrays {
  using Array = const py::array&;
  using Maybe = const py::object&;
  struct Call {};

  static py::array array(py::handle a, const std::string& name) {
    if (!py::isinstance<py::array>(a))
      fail(name, "expected a NumPy array, got " + std::string(py::str(py::type::of(a).attr("__name__"))));
    return py::reinterpret_borrow<py::array>(a);
  }
  static DTypeInfo dtype(py::handle a, const std::string& name) {
    py::dtype dt = array(a, name).dtype();
    const bool native = py::cast<bool>(dt.attr("isnative"));
    return {dt.kind(), (int64_t)dt.itemsize(), native, dt};
  }
  static Layout layout(py::handle h, const std::string& name, int64_t, Call&) {
    const py::array a = array(h, name);
    Layout f;
    f.ptr = (uintptr_t)a.data();
    f.ndim = a.ndim();
    for (int i = 0; i < 2 && i < f.ndim; ++i) f.shape[i] = a.shape(i), f.strides[i] = a.strides(i);
    f.readonly = !a.writeable();
    f.aligned = a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_;
    return f;
  }
};

}  // namespace bindings
}  // namespace lmxent
