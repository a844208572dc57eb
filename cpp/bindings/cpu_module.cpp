// lmxent._cpu: NumPy arrays -> kernel views. Checks what the kernels assume
// (2-D, contiguous last axis, aligned, dtypes, lengths, writability), releases
// the GIL and calls the kernel table chosen at load time. The public API in
// python/lmxent reshapes, validates values and allocates outputs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <dlfcn.h>
#include <stdio.h>

#include <string>

#include "../cpu/kernels.h"
#include "../cpu/output_pool.h"
#include "../cpu/thread_pool.h"
#include "bf16_dtype.h"

namespace py = pybind11;
using lmxent::DType;
using lmxent::View2D;
using lmxent::bindings::bf16_dtype;

namespace {

[[noreturn]] void fail(const std::string& name, const std::string& what) {
  throw py::value_error(name + ": " + what);
}

DType dtype_of(const py::array& a, const std::string& name) {
  py::dtype dt = a.dtype();
  const bool native = py::cast<bool>(py::reinterpret_borrow<py::object>(dt).attr("isnative"));
  if (dt.kind() == 'f' && native) {
    switch (dt.itemsize()) {
      case 4: return DType::F32;
      case 8: return DType::F64;
      case 2: return DType::F16;
    }
  }
  if (!bf16_dtype().is_none() && py::reinterpret_borrow<py::object>(dt).equal(bf16_dtype()))
    return DType::BF16;
  fail(name, "unsupported dtype " + std::string(py::str(dt)) +
                 " (expected float32, float64, float16 or ml_dtypes.bfloat16)");
}

size_t itemsize(DType d) { return d == DType::F64 ? 8 : d == DType::F32 ? 4 : 2; }

View2D view(const py::array& a, const std::string& name, bool writable) {
  View2D v;
  v.dtype = dtype_of(a, name);
  if (a.ndim() != 2) fail(name, "expected a 2-D array, got " + std::to_string(a.ndim()) + "-D");
  const py::ssize_t is = (py::ssize_t)itemsize(v.dtype);
  // An empty array has nothing to read: its strides do not matter.
  const bool empty = a.shape(0) == 0 || a.shape(1) == 0;
  if (!empty && a.shape(1) > 1 && a.strides(1) != is) fail(name, "the last axis must be contiguous");
  if (!empty && a.strides(0) % is != 0) fail(name, "row stride is not a multiple of the item size");
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) fail(name, "array is not aligned");
  if (writable && !a.writeable()) fail(name, "array is read-only");
  v.data = const_cast<void*>(a.data());
  v.rows = a.shape(0);
  v.cols = a.shape(1);
  v.stride = empty ? v.cols : a.strides(0) / is;
  return v;
}

// A contiguous 1-D array of the compute type with n elements, or None.
void* vec(const py::object& o, DType compute, int64_t n, const std::string& name, bool writable) {
  if (o.is_none()) return nullptr;
  py::array a = py::reinterpret_borrow<py::array>(o);
  if (dtype_of(a, name) != compute) fail(name, compute == DType::F64 ? "expected float64" : "expected float32");
  if (a.ndim() != 1 || a.shape(0) != n) fail(name, "expected shape (" + std::to_string(n) + ",)");
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_)) fail(name, "must be contiguous");
  if (writable && !a.writeable()) fail(name, "array is read-only");
  return const_cast<void*>(a.data());
}

DType compute_of(DType d) { return d == DType::F64 ? DType::F64 : DType::F32; }

void softmax(const py::array& x, const py::object& out, const py::object& lse, double scale, bool log) {
  lmxent::SoftmaxArgs a;
  a.x = view(x, "x", false);
  if (!out.is_none()) {
    a.out = view(py::reinterpret_borrow<py::array>(out), "out", true);
    if (a.out.dtype != a.x.dtype || a.out.rows != a.x.rows || a.out.cols != a.x.cols)
      fail("out", "must have the shape and dtype of x");
  }
  a.lse = vec(lse, compute_of(a.x.dtype), a.x.rows, "lse", true);
  a.tr.scale = scale;
  a.log = log;
  py::gil_scoped_release nogil;
  lmxent::cpu::run(a);
}

// Class ids: contiguous int64 of length n (values validated in Python).
const int64_t* ids(const py::object& o, int64_t n, const std::string& name) {
  py::array t = py::reinterpret_borrow<py::array>(o);
  if (!py::isinstance<py::array_t<int64_t>>(t) || t.ndim() != 1 || t.shape(0) != n ||
      !(t.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
    fail(name, "expected contiguous int64 of shape (" + std::to_string(n) + ",)");
  return (const int64_t*)t.data();
}

void cross_entropy(const py::array& logits, const py::object& targets, const py::object& probs,
                   const py::object& class_weight, int64_t ignore_index, double scale,
                   double softcap, double smoothing, double z_loss, const py::object& loss,
                   const py::object& lse, bool lse_given, const py::object& grad,
                   double grad_scale, const py::object& grad_rows, bool vocab_slice,
                   const py::object& grad_coef) {
  lmxent::CEArgs a;
  a.logits = view(logits, "logits", false);
  const DType c = compute_of(a.logits.dtype);
  const int64_t n = a.logits.rows, V = a.logits.cols;
  if (targets.is_none() == probs.is_none()) fail("targets", "give exactly one of class ids or probabilities");
  if (!targets.is_none()) {
    a.targets = ids(targets, n, "targets");
  } else {
    a.probs = view(py::reinterpret_borrow<py::array>(probs), "targets", false);
    if (a.probs.dtype != c || a.probs.rows != n || a.probs.cols != V)
      fail("targets", "probabilities must match the logits' shape in the compute dtype");
  }
  a.class_weight = vec(class_weight, c, V, "weight", false);
  a.ignore_index = ignore_index;
  a.tr.scale = scale;
  a.tr.softcap = softcap;
  a.smoothing = smoothing;
  a.z_loss = z_loss;
  a.loss = vec(loss, c, n, "loss", true);
  a.lse = vec(lse, c, n, "lse", !lse_given);
  a.lse_given = lse_given;
  if (lse_given && !a.lse) fail("lse", "required");
  if (!grad.is_none()) {
    a.grad = view(py::reinterpret_borrow<py::array>(grad), "grad", true);
    if (a.grad.dtype != a.logits.dtype || a.grad.rows != n || a.grad.cols != V)
      fail("grad", "must have the shape and dtype of the logits");
  }
  a.grad_scale = grad_scale;
  a.grad_rows = vec(grad_rows, c, n, "grad_output", false);
  a.vocab_slice = vocab_slice;
  a.grad_coef = vec(grad_coef, c, n, "grad_coef", false);
  py::gil_scoped_release nogil;
  lmxent::cpu::run(a);
}

void token_stats(const py::array& logits, const py::object& targets, int64_t ignore_index, double scale,
                 const py::object& logprob, const py::object& lse, const py::object& entropy,
                 const py::object& top_prob, const py::object& rank) {
  lmxent::TokenStatsArgs a;
  a.logits = view(logits, "logits", false);
  const DType c = compute_of(a.logits.dtype);
  const int64_t n = a.logits.rows;
  a.targets = ids(targets, n, "targets");
  a.ignore_index = ignore_index;
  a.tr.scale = scale;
  a.logprob = vec(logprob, c, n, "logprob", true);
  a.lse = vec(lse, c, n, "lse", true);
  a.entropy = vec(entropy, c, n, "entropy", true);
  a.top_prob = vec(top_prob, c, n, "top_prob", true);
  if (!rank.is_none()) {
    if (!py::reinterpret_borrow<py::array>(rank).writeable()) fail("rank", "array is read-only");
    a.rank = const_cast<int64_t*>(ids(rank, n, "rank"));
  }
  py::gil_scoped_release nogil;
  lmxent::cpu::run(a);
}

void kl_divergence(const py::array& student, const py::array& teacher, const py::object& row_mask,
                   double scale, int direction, const py::object& loss, const py::object& grad,
                   double grad_scale, const py::object& grad_rows) {
  lmxent::KLArgs a;
  a.student = view(student, "student_logits", false);
  a.teacher = view(teacher, "teacher_logits", false);
  const DType c = compute_of(a.student.dtype);
  const int64_t n = a.student.rows;
  if (a.teacher.dtype != a.student.dtype || a.teacher.rows != n || a.teacher.cols != a.student.cols)
    fail("teacher_logits", "must have the student's shape and dtype");
  if (!row_mask.is_none()) {
    py::array m = py::reinterpret_borrow<py::array>(row_mask);
    if (!py::isinstance<py::array_t<uint8_t>>(m) || m.ndim() != 1 || m.shape(0) != n ||
        !(m.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
      fail("mask", "expected contiguous uint8 of shape (" + std::to_string(n) + ",)");
    a.row_mask = (const uint8_t*)m.data();
  }
  if (direction < 0 || direction > 2) fail("direction", "must be 0 (forward), 1 (reverse) or 2 (js)");
  a.dir = (lmxent::KLDirection)direction;
  a.tr.scale = scale;
  a.loss = vec(loss, c, n, "loss", true);
  if (!grad.is_none()) {
    a.grad = view(py::reinterpret_borrow<py::array>(grad), "grad", true);
    if (a.grad.dtype != a.student.dtype || a.grad.rows != n || a.grad.cols != a.student.cols)
      fail("grad", "must have the shape and dtype of the student logits");
  }
  a.grad_scale = grad_scale;
  a.grad_rows = vec(grad_rows, c, n, "grad_output", false);
  py::gil_scoped_release nogil;
  lmxent::cpu::run(a);
}

void math(const py::array& in, const py::array& out, int fn) {
  View2D i = view(in, "in", false), o = view(out, "out", true);
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
  m.def("softmax", &softmax, py::arg("x"), py::arg("out"), py::arg("lse"), py::arg("scale"), py::arg("log"));
  m.def("cross_entropy", &cross_entropy, py::arg("logits"), py::arg("targets"), py::arg("probs"),
        py::arg("class_weight"), py::arg("ignore_index"), py::arg("scale"), py::arg("softcap"),
        py::arg("smoothing"), py::arg("z_loss"), py::arg("loss"), py::arg("lse"), py::arg("lse_given"),
        py::arg("grad"), py::arg("grad_scale"), py::arg("grad_rows"), py::arg("vocab_slice"),
        py::arg("grad_coef"));
  m.def("token_stats", &token_stats, py::arg("logits"), py::arg("targets"), py::arg("ignore_index"),
        py::arg("scale"), py::arg("logprob"), py::arg("lse"), py::arg("entropy"), py::arg("top_prob"),
        py::arg("rank"));
  m.def("kl_divergence", &kl_divergence, py::arg("student"), py::arg("teacher"), py::arg("row_mask"),
        py::arg("scale"), py::arg("direction"), py::arg("loss"), py::arg("grad"), py::arg("grad_scale"),
        py::arg("grad_rows"));
  m.def("math", &math);
  m.def("pooled_empty", &pooled_empty, py::arg("bytes"));
  m.def("pool_info", [] {
    const lmxent::cpu::PoolInfo i = lmxent::cpu::pool_info();
    return py::make_tuple(i.limit, i.idle_bytes, i.idle_blocks);
  });
  m.def("pool_set_limit", &lmxent::cpu::pool_set_limit, py::arg("limit"));
  m.def("isa", [] { return std::string(lmxent::cpu::active().isa); });
  m.def("set_isa", [](const std::string& name) {
    if (name.find('\0') != std::string::npos)  // select() reads a C string: "avx2\0x" is not avx2
      fail("isa", "a name with a NUL character is not an instruction set");
    if (!lmxent::cpu::select(name.c_str())) fail("isa", "'" + name + "' is not available on this processor");
  });
  m.def("available_isas", [] {
    const char* names[8];
    int k = lmxent::cpu::available(names, 8);
    py::list l;
    for (int i = 0; i < k; ++i) l.append(names[i]);
    return l;
  });
  // The process-wide thread count of the kernels; python/lmxent checks the
  // argument's type and range (1 to thread_limit) before set_num_threads.
  m.def("max_threads", &lmxent::cpu::num_threads);
  m.attr("thread_limit") = lmxent::cpu::kMaxThreads;
  m.def("set_num_threads", [](int n) {
    if (n < 1 || n > lmxent::cpu::kMaxThreads)
      fail("n", "must be between 1 and " + std::to_string(lmxent::cpu::kMaxThreads));
    lmxent::cpu::set_num_threads(n);
  }, py::arg("n"));
}
