// The binding core shared by lmxent._cpu (NumPy arrays) and lmxent._cuda
// (CuPy arrays): the dtype rules, the error messages, and the checks that turn
// an array into what the kernels assume (2-D, contiguous last axis, aligned,
// dtypes, lengths, writable outputs whose rows do not overlap). Written once
// against a module type M; each module supplies only how to read its arrays
// and how to call its kernels:
//
//   M::Array, M::Maybe   parameter types of a required array and of one that
//                        may be None (they give the signatures pybind11 shows)
//   M::Call              per-call state (the CUDA device and stream)
//   M::dtype(a, name)    -> DTypeInfo of an array (fails for a foreign object)
//   M::layout(a, name, itemsize, call) -> Layout: pointer, shape, byte
//                        strides, writability, alignment
//   M::run(args, call, op)  the kernel call, with the GIL released
//
// ops.h builds each op's argument struct from these checks once for both.
#pragma once
#include <pybind11/gil_safe_call_once.h>
#include <pybind11/pybind11.h>

#include <stdint.h>

#include <string>
#include <utility>

#include "lmxent/contract.h"

namespace lmxent {
namespace bindings {

namespace py = pybind11;

[[noreturn]] inline void fail(const std::string& name, const std::string& what) {
  throw py::value_error(name + ": " + what);
}

inline int64_t itemsize(DType d) { return d == DType::F64 ? 8 : d == DType::F32 ? 4 : 2; }
inline DType compute_of(DType d) { return d == DType::F64 ? DType::F64 : DType::F32; }

// The NumPy dtype of ml_dtypes.bfloat16 (None without ml_dtypes). Looked up
// once per process through pybind11's gil_safe_call_once_and_store: a
// function-local `static py::object` would be destroyed after the interpreter
// has finalised, and its initialisation guard is held while it calls into
// Python, which can deadlock two threads.
inline const py::object& bf16_dtype() {
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::object> storage;
  return storage
      .call_once_and_store_result([] {
        try {
          return py::object(py::module_::import("numpy").attr("dtype")(
              py::module_::import("ml_dtypes").attr("bfloat16")));
        } catch (py::error_already_set&) {
          return py::object(py::none());
        }
      })
      .get_stored();
}

// An array's dtype as the rules below read it.
struct DTypeInfo {
  char kind;      // 'f', 'i', 'u', ...
  int64_t size;   // bytes
  bool native;    // native byte order
  py::object dtype;
};

// A floating dtype the kernels take, or a ValueError naming the argument.
inline DType float_dtype(const DTypeInfo& d, const std::string& name) {
  if (d.kind == 'f' && d.native) {
    switch (d.size) {
      case 4: return DType::F32;
      case 8: return DType::F64;
      case 2: return DType::F16;
    }
  }
  if (!bf16_dtype().is_none() && d.dtype.equal(bf16_dtype())) return DType::BF16;
  fail(name, "unsupported dtype " + std::string(py::str(d.dtype)) +
                 " (expected float32, float64, float16 or ml_dtypes.bfloat16)");
}

// Where an array's elements are. Shape and strides (bytes) of the first two
// axes; the checks below refuse any other number of axes before reading them.
struct Layout {
  uintptr_t ptr = 0;
  int64_t ndim = 0;
  int64_t shape[2] = {0, 0};
  int64_t strides[2] = {0, 0};
  bool readonly = false;
  bool aligned = false;
};

// The checks of one call's arrays (the first array of a CUDA call fixes its
// device and stream in `call`).
template <class M>
struct Arrays {
  typename M::Call call;

  View2D view(py::handle a, const std::string& name, bool writable) {
    View2D v;
    v.dtype = float_dtype(M::dtype(a, name), name);
    const int64_t is = itemsize(v.dtype);
    const Layout f = M::layout(a, name, is, call);
    if (f.ndim != 2) fail(name, "expected a 2-D array, got " + std::to_string(f.ndim) + "-D");
    v.rows = f.shape[0];
    v.cols = f.shape[1];
    const bool empty = v.rows == 0 || v.cols == 0;  // nothing to read: strides do not matter
    if (!empty && v.cols > 1 && f.strides[1] != is) fail(name, "the last axis must be contiguous");
    if (!empty && f.strides[0] % is != 0) fail(name, "row stride is not a multiple of the item size");
    if (!f.aligned) fail(name, "array is not aligned");
    if (writable && f.readonly) fail(name, "array is read-only");
    v.data = (void*)f.ptr;
    v.stride = empty ? v.cols : f.strides[0] / is;
    // Outputs: rows written by different threads or blocks must not share memory.
    if (writable && v.rows > 1 && (v.stride < 0 ? -v.stride : v.stride) < v.cols)
      fail(name, "rows overlap in memory");
    return v;
  }

  // A view of `ref`'s shape in `dtype`, or an empty view for None.
  View2D like(py::handle a, const std::string& name, bool writable, const View2D& ref, DType dtype,
              const char* mismatch) {
    if (a.is_none()) return View2D();
    View2D v = view(a, name, writable);
    if (v.dtype != dtype || v.rows != ref.rows || v.cols != ref.cols) fail(name, mismatch);
    return v;
  }

  // A contiguous 1-D array of `dtype` with n elements, or None (nullptr).
  void* vec(py::handle o, DType dtype, int64_t n, const std::string& name, bool writable) {
    if (o.is_none()) return nullptr;
    if (float_dtype(M::dtype(o, name), name) != dtype)
      fail(name, dtype == DType::F64 ? "expected float64" : "expected float32");
    const int64_t is = itemsize(dtype);
    const Layout f = M::layout(o, name, is, call);
    if (f.ndim != 1 || f.shape[0] != n) fail(name, "expected shape (" + std::to_string(n) + ",)");
    if (n > 1 && f.strides[0] != is) fail(name, "must be contiguous");
    if (!f.aligned) fail(name, "array is not aligned");
    if (writable && f.readonly) fail(name, "array is read-only");
    return (void*)f.ptr;
  }

  // A contiguous 1-D integer array (kind 'i' or 'u', `item` bytes) of n
  // elements: class ids and ranks (int64), row masks (uint8).
  void* int_vec(py::handle o, char kind, int64_t item, int64_t n, const std::string& name, bool writable) {
    const DTypeInfo d = M::dtype(o, name);
    const Layout f = M::layout(o, name, item, call);
    if (d.kind != kind || d.size != item || !d.native || f.ndim != 1 || f.shape[0] != n ||
        (n > 1 && f.strides[0] != item) || !f.aligned)
      fail(name, std::string("expected contiguous ") + (kind == 'i' ? "int" : "uint") + std::to_string(8 * item) +
                     " of shape (" + std::to_string(n) + ",)");
    if (writable && f.readonly) fail(name, "array is read-only");
    return (void*)f.ptr;
  }

  // Class ids: int64, values validated in Python.
  const int64_t* ids(py::handle o, int64_t n, const std::string& name) {
    return (const int64_t*)int_vec(o, 'i', 8, n, name, false);
  }
};

// Binds op `name`: a Python function of the parameters P... (named by
// `names`, the same in both modules) that builds the op's argument struct with
// `build` and runs the module's kernel on it. The names are also recorded in
// `params` (the module's `ops` dict), which the CuPy stand-in of the tests
// reads to forward any call to the CPU module.
template <class M, class Args, class... P, class... Names>
void def_op(py::module_& m, py::dict& params, const char* name, const char* doc,
            Args (*build)(Arrays<M>&, P...), Names... names) {
  static_assert(sizeof...(Names) == sizeof...(P), "one name per parameter");
  m.def(
      name,
      [build, name](P... p) {
        Arrays<M> c;
        const Args a = build(c, std::forward<P>(p)...);
        M::run(a, c.call, name);
      },
      doc, py::arg(names)...);
  params[name] = py::make_tuple(names...);
}

}  // namespace bindings
}  // namespace lmxent
