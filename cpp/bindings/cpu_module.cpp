// lmxent._cpu: NumPy arrays -> kernel views. The checks (what the kernels
// assume: 2-D, contiguous last axis, aligned, dtypes, lengths, writability)
// and the op bindings are core.h and ops.h, shared with lmxent._cuda, and a
// NumPy array is read by numpy_arrays.h; here are the kernel calls (with the
// GIL released, on the kernel table chosen at load time), the output pool and
// the CPU settings. The public API in python/lmxent reshapes, validates values and
// allocates outputs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <dlfcn.h>
#include <stdio.h>

#include <string>

#include "../cpu/kernels.h"
#include "../cpu/output_pool.h"
#include "../cpu/thread_pool.h"
#include "numpy_arrays.h"
#include "ops.h"

namespace py = pybind11;
using lmxent::DType;
using lmxent::View2D;
using lmxent::bindings::fail;

namespace {

// NumPy arrays (numpy_arrays.h), for core.h; the kernels of the active ISA.
struct Cpu : lmxent::bindings::NumpyArrays {
  template <class Args>
  static void run(const Args& a, Call&, const char*) {
    py::gil_scoped_release nogil;
    lmxent::cpu::run(a);  // the kernel of the active instruction set
  }
};

void math(const py::array& in, const py::array& out, int fn) {
  lmxent::bindings::Arrays<Cpu> c;
  View2D i = c.view(in, "in", false), o = c.view(out, "out", true);
  if (i.dtype != o.dtype || i.rows != 1 || o.rows != 1 || i.cols != o.cols || i.dtype == DType::F16 ||
      i.dtype == DType::BF16)
    fail("math", "expects two (1, n) float32 or float64 arrays");
  if (fn < 0 || fn > 2) fail("math", "fn must be 0 (exp of x <= 0), 1 (tanh) or 2 (log1p of 0 <= x <= 1)");
  py::gil_scoped_release nogil;
  lmxent::cpu::run(lmxent::MathArgs{i.data, o.data, i.cols, i.dtype, fn});
}

// An uninitialised uint8 array of `bytes` from the output pool; the block goes
// back to the pool when the last array viewing it is released. While in use it
// is traced in NumPy's tracemalloc domain, as NumPy's own data is. (The trace
// functions are looked up at run time: Python 3.11's tracemalloc.h declares
// them without extern "C", so a C++ call would not link.)
constexpr unsigned kNumpyTraceDomain = 389047;
struct Tracer {
  int (*track)(unsigned, uintptr_t, size_t) = nullptr;
  int (*untrack)(unsigned, uintptr_t) = nullptr;
  Tracer() {
    track = (int (*)(unsigned, uintptr_t, size_t))dlsym(RTLD_DEFAULT, "PyTraceMalloc_Track");
    untrack = (int (*)(unsigned, uintptr_t))dlsym(RTLD_DEFAULT, "PyTraceMalloc_Untrack");
  }
};
const Tracer& tracer() {
  static const Tracer t;
  return t;
}
using lmxent::cpu::PoolBlock;
bool finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}
void release_block(void* v) {
  PoolBlock* b = (PoolBlock*)v;
  // Untracking during interpreter exit crashes some CPython versions (gh-129185).
  if (tracer().untrack && !finalizing()) tracer().untrack(kNumpyTraceDomain, (uintptr_t)b->p);
  lmxent::cpu::pool_give(*b);
  delete b;
}
// MemoryError naming the size, as NumPy's does ("Unable to allocate 1.5 GiB ...").
[[noreturn]] void out_of_memory(size_t bytes) {
  const char* unit[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = (double)bytes;
  int u = 0;
  while (v >= 1024 && u < 6) v /= 1024, ++u;
  char msg[160];
  snprintf(msg, sizeof msg, "Unable to allocate %.3g %s (%zu bytes) for an lmxent output", v, unit[u],
           bytes);
  PyErr_SetString(PyExc_MemoryError, msg);
  throw py::error_already_set();
}
py::array pooled_empty(size_t bytes) {
  const PoolBlock b = lmxent::cpu::pool_take(bytes);
  if (!b.p) out_of_memory(bytes);
  PoolBlock* owned = nullptr;
  py::capsule owner;
  try {
    owned = new PoolBlock(b);
    owner = py::capsule(owned, release_block);  // from here on the capsule gives the block back
  } catch (...) {
    delete owned;
    lmxent::cpu::pool_give(b);
    throw;
  }
  // Traced at its real size (the block, 2 MiB granular), which is what it holds.
  if (tracer().track) tracer().track(kNumpyTraceDomain, (uintptr_t)b.p, b.n);
  return py::array(py::dtype("uint8"), {(py::ssize_t)bytes}, {(py::ssize_t)1}, b.p, owner);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "lmxent CPU kernels";
  lmxent::bindings::bind_ops<Cpu>(m);
  m.def("math", &math, "Test hook: out[0, i] = f(in[0, i]), f = exp of x <= 0 (fn 0), tanh (1) or log1p "
        "of 0 <= x <= 1 (2), in the vector math of the kernels.", py::arg("in"), py::arg("out"), py::arg("fn"));
  m.def("pooled_empty", &pooled_empty, "An uninitialised uint8 array of `bytes` from the output pool.",
        py::arg("bytes"));
  m.def("pool_info", [] {
    const lmxent::cpu::PoolInfo i = lmxent::cpu::pool_info();
    return py::make_tuple(i.limit, i.idle_bytes, i.idle_blocks);
  }, "The output pool's (limit, idle bytes, idle blocks).");
  m.def("pool_set_limit", &lmxent::cpu::pool_set_limit,
        "Sets the output pool's limit on idle bytes (0: off); returns the previous limit.", py::arg("limit"));
  m.def("isa", [] { return std::string(lmxent::cpu::active().isa); }, "The instruction set of the kernels in use.");
  m.def("set_isa", [](const std::string& name) {
    if (name.find('\0') != std::string::npos)  // select() reads a C string: "avx2\0x" is not avx2
      fail("isa", "a name with a NUL character is not an instruction set");
    if (!lmxent::cpu::select(name.c_str())) fail("isa", "'" + name + "' is not available on this processor");
  }, "Selects the kernels of an instruction set (a name from available_isas).", py::arg("name"));
  m.def("available_isas", [] {
    const char* names[8];
    int k = lmxent::cpu::available(names, 8);
    py::list l;
    for (int i = 0; i < k; ++i) l.append(names[i]);
    return l;
  }, "The instruction sets this build and processor can run.");
  // The process-wide thread count of the kernels; python/lmxent checks the
  // argument's type and range (1 to thread_limit) before set_num_threads.
  m.def("max_threads", &lmxent::cpu::num_threads, "The kernels' thread count.");
  m.attr("thread_limit") = lmxent::cpu::kMaxThreads;
  m.def("set_num_threads", [](int n) {
    if (n < 1 || n > lmxent::cpu::kMaxThreads)
      fail("n", "must be between 1 and " + std::to_string(lmxent::cpu::kMaxThreads));
    lmxent::cpu::set_num_threads(n);
  }, "Sets the kernels' thread count.", py::arg("n"));
}
