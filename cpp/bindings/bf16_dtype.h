// The NumPy dtype of ml_dtypes.bfloat16 (None without ml_dtypes), shared by the
// CPU and CUDA bindings. Looked up once per process through pybind11's
// gil_safe_call_once_and_store: a function-local `static py::object` would be
// destroyed after the interpreter has finalised, and its initialisation guard
// is held while it calls into Python, which can deadlock two threads.
#pragma once
#include <pybind11/gil_safe_call_once.h>
#include <pybind11/pybind11.h>

namespace lmxent {
namespace bindings {

inline const pybind11::object& bf16_dtype() {
  PYBIND11_CONSTINIT static pybind11::gil_safe_call_once_and_store<pybind11::object> storage;
  return storage
      .call_once_and_store_result([] {
        try {
          return pybind11::object(pybind11::module_::import("numpy").attr("dtype")(
              pybind11::module_::import("ml_dtypes").attr("bfloat16")));
        } catch (pybind11::error_already_set&) {
          return pybind11::object(pybind11::none());
        }
      })
      .get_stored();
}

}  // namespace bindings
}  // namespace lmxent
