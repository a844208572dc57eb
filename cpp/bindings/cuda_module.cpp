// lmxent._cuda: CuPy arrays -> kernel views (the counterpart of cpu_module.cpp,
// with the same function signatures). Reads each array's dtype and
// __cuda_array_interface__ (v3), checks what the kernels assume (2-D,
// contiguous last axis, aligned, dtypes, lengths, writable outputs whose rows
// do not overlap, every array in device memory of one device), releases the
// GIL and enqueues the kernels on the stream the logits' interface names
// (CuPy's current stream). Nothing here waits for the device. The public API
// in python/lmxent reshapes, validates values and allocates outputs.
//
// The CUDA runtime is linked statically: importing this module needs no GPU
// and no driver; the first call that reaches the device reports what is
// missing.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <stdint.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "../../cuda/kernels.h"
#include "bf16_dtype.h"

namespace py = pybind11;
using lmxent::DType;
using lmxent::View2D;
using lmxent::bindings::bf16_dtype;

namespace {

[[noreturn]] void fail(const std::string& name, const std::string& what) {
  throw py::value_error(name + ": " + what);
}

void check(int err, const std::string& what) {
  if (err == (int)cudaSuccess) return;
  // A failed runtime call also leaves its error as the thread's "last error":
  // cleared here, or the next valid launch (which returns cudaGetLastError())
  // would report it. A sticky error (a kernel fault) stays: the context is lost.
  cudaGetLastError();
  const cudaError_t e = (cudaError_t)err;
  std::string msg = "lmxent._cuda: " + what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
  if (e == cudaErrorInsufficientDriver)
    msg += "; lmxent was built with CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
           std::to_string(CUDART_VERSION % 1000 / 10) +
           ", whose runtime needs a newer NVIDIA driver: update the driver, or build lmxent "
           "with a CUDA toolkit the driver supports";
  if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorUnsupportedPtxVersion)
    msg += "; rebuild lmxent with CMAKE_CUDA_ARCHITECTURES including this GPU";
  throw std::runtime_error(msg);
}

size_t itemsize(DType d) { return d == DType::F64 ? 8 : d == DType::F32 ? 4 : 2; }
DType compute_of(DType d) { return d == DType::F64 ? DType::F64 : DType::F32; }

// Makes `device` current on this thread and restores the thread's previous
// device when it goes out of scope, also when the call fails: the runtime's
// current device is the driver's current context, which CuPy shares.
class DeviceGuard {
 public:
  void enter(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    entered_ = device;
    if (device != previous_) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (previous_ >= 0 && entered_ != previous_ && cudaSetDevice(previous_) != cudaSuccess)
      cudaGetLastError();  // a destructor cannot report it; clear it for the next call
  }

 private:
  int previous_ = -1, entered_ = -1;
};

// The device and stream of one call, from its first array; later arrays must
// be on the same device. The device is current on this thread for the call
// (it is CuPy's current device whenever the call is valid: the outputs come
// from it), and the previous one again afterwards.
struct Call {
  int device = -1;
  void* stream = nullptr;
  DeviceGuard guard;
};

int sm_count(int device) {
  static int cache[256] = {};  // 0: not asked yet
  int* slot = device >= 0 && device < 256 ? &cache[device] : nullptr;
  if (slot && *slot) return *slot;
  int n = 1;
  check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  if (slot) *slot = n;
  return n;
}

// ptr must be device memory on the call's device (a pointer from another
// device, or host memory, would fault inside a kernel and poison the context).
void on_device(uintptr_t ptr, const std::string& name, const Call& c) {
  if (!ptr) return;
  cudaPointerAttributes at;
  check(cudaPointerGetAttributes(&at, (const void*)ptr), name + ": cudaPointerGetAttributes");
  if (at.type == cudaMemoryTypeManaged) return;
  if (at.type != cudaMemoryTypeDevice) fail(name, "is not in device memory");
  if (at.device != c.device)
    fail(name, "is on device " + std::to_string(at.device) + ", the other arrays on device " +
                   std::to_string(c.device));
}

// The stream named by an array interface: None (no synchronisation needed:
// CuPy's current stream), 1 legacy default, 2 per-thread default, else a
// cudaStream_t; these are the runtime's own handle values.
void* interface_stream(const py::dict& cai) {
  if (cai.contains("stream") && !cai["stream"].is_none())
    return (void*)(uintptr_t)py::cast<uintptr_t>(cai["stream"]);
  py::object s = py::module_::import("cupy").attr("cuda").attr("get_current_stream")();
  return (void*)(uintptr_t)py::cast<uintptr_t>(s.attr("ptr"));
}

// Work on `c.stream` must come after work already queued on `other`.
void order_after(void* other, const Call& c) {
  if (other == c.stream) return;
  cudaEvent_t ev;
  check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
  check(cudaEventRecord(ev, (cudaStream_t)other), "cudaEventRecord");
  check(cudaStreamWaitEvent((cudaStream_t)c.stream, ev, 0), "cudaStreamWaitEvent");
  check(cudaEventDestroy(ev), "cudaEventDestroy");  // released once it has completed
}

DType dtype_of(py::handle a, const std::string& name) {
  py::object dt = a.attr("dtype");
  const std::string kind = py::cast<std::string>(dt.attr("kind"));
  const int size = py::cast<int>(dt.attr("itemsize"));
  if (kind == "f" && py::cast<bool>(dt.attr("isnative"))) {
    switch (size) {
      case 4: return DType::F32;
      case 8: return DType::F64;
      case 2: return DType::F16;
    }
  }
  if (!bf16_dtype().is_none() && dt.equal(bf16_dtype())) return DType::BF16;
  fail(name, "unsupported dtype " + std::string(py::str(dt)) +
                 " (expected float32, float64, float16 or ml_dtypes.bfloat16)");
}

// An array's interface: pointer, shape and strides in bytes (C order when
// the interface gives no strides). The first array of a call fixes its device
// and stream.
struct Iface {
  uintptr_t ptr;
  py::tuple shape;
  std::vector<int64_t> strides;  // bytes
  bool readonly;
};

Iface iface(py::handle a, const std::string& name, size_t item, Call& c) {
  if (!py::hasattr(a, "__cuda_array_interface__")) fail(name, "expected a CuPy array");
  py::dict cai = a.attr("__cuda_array_interface__");
  Iface f;
  f.shape = cai["shape"];
  py::tuple data = cai["data"];
  f.ptr = py::cast<uintptr_t>(data[0]);
  f.readonly = py::cast<bool>(data[1]);
  const size_t nd = f.shape.size();
  f.strides.resize(nd);
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    py::tuple st = cai["strides"];
    for (size_t i = 0; i < nd; ++i) f.strides[i] = py::cast<int64_t>(st[i]);
  } else {
    int64_t s = (int64_t)item;
    for (size_t i = nd; i-- > 0;) {
      f.strides[i] = s;
      s *= py::cast<int64_t>(f.shape[i]);
    }
  }
  void* stream = interface_stream(cai);
  if (c.device < 0) {
    c.device = py::hasattr(a, "device") ? py::cast<int>(a.attr("device").attr("id")) : 0;
    if (f.ptr && !py::hasattr(a, "device")) {
      cudaPointerAttributes at;
      check(cudaPointerGetAttributes(&at, (const void*)f.ptr), name + ": cudaPointerGetAttributes");
      c.device = at.device;
    }
    c.guard.enter(c.device);
    c.stream = stream;
  } else {
    order_after(stream, c);
  }
  on_device(f.ptr, name, c);
  return f;
}

View2D view(py::handle a, const std::string& name, bool writable, Call& c) {
  View2D v;
  v.dtype = dtype_of(a, name);
  const int64_t is = (int64_t)itemsize(v.dtype);
  const Iface f = iface(a, name, (size_t)is, c);
  if (f.shape.size() != 2) fail(name, "expected a 2-D array, got " + std::to_string(f.shape.size()) + "-D");
  v.rows = py::cast<int64_t>(f.shape[0]);
  v.cols = py::cast<int64_t>(f.shape[1]);
  const bool empty = v.rows == 0 || v.cols == 0;  // nothing to read: strides do not matter
  if (!empty && v.cols > 1 && f.strides[1] != is) fail(name, "the last axis must be contiguous");
  if (!empty && f.strides[0] % is != 0) fail(name, "row stride is not a multiple of the item size");
  if (f.ptr % (uintptr_t)is != 0) fail(name, "array is not aligned");
  if (writable && f.readonly) fail(name, "array is read-only");
  v.data = (void*)f.ptr;
  v.stride = empty ? v.cols : f.strides[0] / is;
  // Outputs: rows written by different blocks must not share memory.
  if (writable && v.rows > 1 && (v.stride < 0 ? -v.stride : v.stride) < v.cols)
    fail(name, "rows overlap in memory");
  return v;
}

// A contiguous 1-D array of `dtype` with n elements, or None.
void* vec(py::handle o, DType dtype, int64_t n, const std::string& name, bool writable, Call& c) {
  if (o.is_none()) return nullptr;
  if (dtype_of(o, name) != dtype) fail(name, dtype == DType::F64 ? "expected float64" : "expected float32");
  const Iface f = iface(o, name, itemsize(dtype), c);
  if (f.shape.size() != 1 || py::cast<int64_t>(f.shape[0]) != n)
    fail(name, "expected shape (" + std::to_string(n) + ",)");
  if (n > 1 && f.strides[0] != (int64_t)itemsize(dtype)) fail(name, "must be contiguous");
  if (f.ptr % itemsize(dtype) != 0) fail(name, "array is not aligned");
  if (writable && f.readonly) fail(name, "array is read-only");
  return (void*)f.ptr;
}

// A contiguous 1-D integer array (kind 'i' or 'u', `item` bytes) of n elements:
// class ids and ranks (int64), row masks (uint8).
void* int_vec(py::handle o, char kind, int item, int64_t n, const std::string& name, bool writable, Call& c) {
  py::object dt = o.attr("dtype");
  const bool ok = py::cast<std::string>(dt.attr("kind")) == std::string(1, kind) &&
                  py::cast<int>(dt.attr("itemsize")) == item && py::cast<bool>(dt.attr("isnative"));
  const Iface f = iface(o, name, (size_t)item, c);
  if (!ok || f.shape.size() != 1 || py::cast<int64_t>(f.shape[0]) != n || (n > 1 && f.strides[0] != item) ||
      f.ptr % (uintptr_t)item != 0)
    fail(name, std::string("expected contiguous ") + (kind == 'i' ? "int" : "uint") + std::to_string(8 * item) +
                   " of shape (" + std::to_string(n) + ",)");
  if (writable && f.readonly) fail(name, "array is read-only");
  return (void*)f.ptr;
}

const int64_t* ids(py::handle o, int64_t n, Call& c) {
  return (const int64_t*)int_vec(o, 'i', 8, n, "targets", false, c);
}

// Scratch device memory from CuPy's allocator (its pool, on its current
// stream, which is the launch stream), or None.
py::object scratch(size_t bytes, const Call& c) {
  if (!bytes) return py::none();
  py::object mem = py::module_::import("cupy").attr("cuda").attr("alloc")(bytes);
  on_device(py::cast<uintptr_t>(mem.attr("ptr")), "scratch", c);
  return mem;
}

// scratch_fn: the bytes of scratch a call needs, or nullptr for none.
template <class A, class F>
void run(const A& args, const Call& c, size_t (*scratch_fn)(const A&, int), F launch, const char* what) {
  lmxent::cuda::Launch l;
  l.stream = c.stream;
  l.sm_count = sm_count(c.device);
  py::object mem = scratch(scratch_fn ? scratch_fn(args, l.sm_count) : 0, c);
  if (!mem.is_none()) l.scratch = (void*)py::cast<uintptr_t>(mem.attr("ptr"));
  cudaGetLastError();  // an earlier failed runtime call must not be reported as ours
  int err;
  {
    py::gil_scoped_release nogil;
    err = launch(args, l);
  }
  check(err, what);
}

void softmax(py::handle x, py::handle out, py::handle lse, double scale, bool log) {
  Call c;
  lmxent::SoftmaxArgs a;
  a.x = view(x, "x", false, c);
  if (!out.is_none()) {
    a.out = view(out, "out", true, c);
    if (a.out.dtype != a.x.dtype || a.out.rows != a.x.rows || a.out.cols != a.x.cols)
      fail("out", "must have the shape and dtype of x");
  }
  a.lse = vec(lse, compute_of(a.x.dtype), a.x.rows, "lse", true, c);
  a.tr.scale = scale;
  a.log = log;
  run(a, c, &lmxent::cuda::scratch, lmxent::cuda::Launcher(), "softmax launch");
}

void cross_entropy(py::handle logits, py::handle targets, py::handle probs, py::handle class_weight,
                   int64_t ignore_index, double scale, double softcap, double smoothing, double z_loss,
                   py::handle loss, py::handle lse, bool lse_given, py::handle grad, double grad_scale,
                   py::handle grad_rows, bool vocab_slice, py::handle grad_coef) {
  Call c;
  lmxent::CEArgs a;
  a.logits = view(logits, "logits", false, c);
  const DType ct = compute_of(a.logits.dtype);
  const int64_t n = a.logits.rows, V = a.logits.cols;
  if (targets.is_none() == probs.is_none()) fail("targets", "give exactly one of class ids or probabilities");
  if (!targets.is_none()) {
    a.targets = ids(targets, n, c);
  } else {
    a.probs = view(probs, "targets", false, c);
    if (a.probs.dtype != ct || a.probs.rows != n || a.probs.cols != V)
      fail("targets", "probabilities must match the logits' shape in the compute dtype");
  }
  a.class_weight = vec(class_weight, ct, V, "weight", false, c);
  a.ignore_index = ignore_index;
  a.tr.scale = scale;
  a.tr.softcap = softcap;
  a.smoothing = smoothing;
  a.z_loss = z_loss;
  a.loss = vec(loss, ct, n, "loss", true, c);
  a.lse = vec(lse, ct, n, "lse", !lse_given, c);
  a.lse_given = lse_given;
  if (lse_given && !a.lse) fail("lse", "required");
  if (!grad.is_none()) {
    a.grad = view(grad, "grad", true, c);
    if (a.grad.dtype != a.logits.dtype || a.grad.rows != n || a.grad.cols != V)
      fail("grad", "must have the shape and dtype of the logits");
  }
  a.grad_scale = grad_scale;
  a.grad_rows = vec(grad_rows, ct, n, "grad_output", false, c);
  a.vocab_slice = vocab_slice;
  a.grad_coef = vec(grad_coef, ct, n, "grad_coef", false, c);
  run(a, c, &lmxent::cuda::scratch, lmxent::cuda::Launcher(), "cross_entropy launch");
}

void token_stats(py::handle logits, py::handle targets, int64_t ignore_index, double scale, py::handle logprob,
                 py::handle lse, py::handle entropy, py::handle top_prob, py::handle rank) {
  Call c;
  lmxent::TokenStatsArgs a;
  a.logits = view(logits, "logits", false, c);
  const DType ct = compute_of(a.logits.dtype);
  const int64_t n = a.logits.rows;
  a.targets = ids(targets, n, c);
  a.ignore_index = ignore_index;
  a.tr.scale = scale;
  a.logprob = vec(logprob, ct, n, "logprob", true, c);
  a.lse = vec(lse, ct, n, "lse", true, c);
  a.entropy = vec(entropy, ct, n, "entropy", true, c);
  a.top_prob = vec(top_prob, ct, n, "top_prob", true, c);
  if (!rank.is_none()) a.rank = (int64_t*)int_vec(rank, 'i', 8, n, "rank", true, c);
  run(a, c, &lmxent::cuda::scratch, lmxent::cuda::Launcher(), "token_stats launch");
}

void kl_divergence(py::handle student, py::handle teacher, py::handle row_mask, double scale, int direction,
                   py::handle loss, py::handle grad, double grad_scale, py::handle grad_rows) {
  Call c;
  lmxent::KLArgs a;
  a.student = view(student, "student_logits", false, c);
  a.teacher = view(teacher, "teacher_logits", false, c);
  const DType ct = compute_of(a.student.dtype);
  const int64_t n = a.student.rows;
  if (a.teacher.dtype != a.student.dtype || a.teacher.rows != n || a.teacher.cols != a.student.cols)
    fail("teacher_logits", "must have the student's shape and dtype");
  if (!row_mask.is_none()) a.row_mask = (const uint8_t*)int_vec(row_mask, 'u', 1, n, "mask", false, c);
  if (direction < 0 || direction > 2) fail("direction", "must be 0 (forward), 1 (reverse) or 2 (js)");
  a.dir = (lmxent::KLDirection)direction;
  a.tr.scale = scale;
  a.loss = vec(loss, ct, n, "loss", true, c);
  if (!grad.is_none()) {
    a.grad = view(grad, "grad", true, c);
    if (a.grad.dtype != a.student.dtype || a.grad.rows != n || a.grad.cols != a.student.cols)
      fail("grad", "must have the shape and dtype of the student logits");
  }
  a.grad_scale = grad_scale;
  a.grad_rows = vec(grad_rows, ct, n, "grad_output", false, c);
  run(a, c, &lmxent::cuda::scratch, lmxent::cuda::Launcher(), "kl_divergence launch");
}

// (count, first row) of out-of-range class ids met on `device` by
// cross-entropy and token_stats since the last call, read after the work
// queued on `stream`; clears the records.
py::tuple take_status(int device, uintptr_t stream) {
  DeviceGuard guard;
  guard.enter(device);
  cudaGetLastError();
  unsigned long long count = 0, first = 0, count2 = 0, first2 = 0;
  int err;
  {
    py::gil_scoped_release nogil;
    err = lmxent::cuda::take_status((void*)stream, &count, &first);
    if (err == (int)cudaSuccess) err = lmxent::cuda::take_token_stats_status((void*)stream, &count2, &first2);
  }
  check(err, "take_status");
  count += count2;
  if (first2 && (!first || first2 < first)) first = first2;  // row + 1, 0 for none
  return py::make_tuple(count, first ? py::object(py::int_(first - 1)) : py::object(py::none()));
}

int device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "lmxent CUDA kernels (CuPy arrays)";
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
  m.def("take_status", &take_status, py::arg("device"), py::arg("stream"));
  m.def("device_count", &device_count, "CUDA devices this module can use (0 without a driver)");
  m.def("runtime_version", [] { return CUDART_VERSION; }, "CUDART_VERSION this module was built with");
}
