// lmxent._cuda: CuPy arrays -> kernel views, the counterpart of
// cpu_module.cpp: the checks (2-D, contiguous last axis, aligned, dtypes,
// lengths, writable outputs whose rows do not overlap) and the op bindings are
// core.h and ops.h, shared with lmxent._cpu, so both have the same signatures.
// Here is how to read a CuPy array (its dtype and __cuda_array_interface__ v3,
// every array in device memory of one device), and the launches: the GIL
// released, the kernels enqueued on the stream the logits' interface names
// (CuPy's current stream). Nothing here waits for the device.
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
#include "ops.h"

namespace py = pybind11;
using lmxent::bindings::fail;

namespace {

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

// An array's interface: pointer, shape, strides in bytes (C order when the
// interface gives no strides), read-only flag. The first array of a call
// fixes its device and stream.
lmxent::bindings::Layout iface(py::handle a, const std::string& name, int64_t item, Call& c) {
  if (!py::hasattr(a, "__cuda_array_interface__")) fail(name, "expected a CuPy array");
  py::dict cai = a.attr("__cuda_array_interface__");
  lmxent::bindings::Layout f;
  py::tuple shape = cai["shape"];
  py::tuple data = cai["data"];
  f.ptr = py::cast<uintptr_t>(data[0]);
  f.readonly = py::cast<bool>(data[1]);
  const size_t nd = shape.size();
  std::vector<int64_t> strides(nd);
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    py::tuple st = cai["strides"];
    for (size_t i = 0; i < nd; ++i) strides[i] = py::cast<int64_t>(st[i]);
  } else {
    int64_t s = item;
    for (size_t i = nd; i-- > 0;) {
      strides[i] = s;
      s *= py::cast<int64_t>(shape[i]);
    }
  }
  f.ndim = (int64_t)nd;
  for (size_t i = 0; i < 2 && i < nd; ++i) f.shape[i] = py::cast<int64_t>(shape[i]), f.strides[i] = strides[i];
  f.aligned = f.ptr % (uintptr_t)item == 0;
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

// Scratch device memory from CuPy's allocator (its pool, on its current
// stream, which is the launch stream), or None.
py::object scratch(size_t bytes, const Call& c) {
  if (!bytes) return py::none();
  py::object mem = py::module_::import("cupy").attr("cuda").attr("alloc")(bytes);
  on_device(py::cast<uintptr_t>(mem.attr("ptr")), "scratch", c);
  return mem;
}

// Any op: its scratch (from the op's scratch()), then its launcher, both
// declared for every op by LMXENT_OP in the contract.
template <class A>
void kernel(const A& args, Call& c, const char* op) {
  lmxent::cuda::Launch l;
  l.stream = c.stream;
  l.sm_count = sm_count(c.device);
  py::object mem = scratch(lmxent::cuda::scratch(args, l.sm_count), c);
  if (!mem.is_none()) l.scratch = (void*)py::cast<uintptr_t>(mem.attr("ptr"));
  cudaGetLastError();  // an earlier failed runtime call must not be reported as ours
  int err;
  {
    py::gil_scoped_release nogil;
    err = lmxent::cuda::launch(args, l);
  }
  check(err, std::string(op) + " launch");
}

// CuPy arrays, for core.h.
struct Cuda {
  using Array = py::handle;
  using Maybe = py::handle;
  using Call = ::Call;

  static lmxent::bindings::DTypeInfo dtype(py::handle a, const std::string&) {
    py::object dt = a.attr("dtype");
    return {py::cast<std::string>(dt.attr("kind"))[0], py::cast<int64_t>(dt.attr("itemsize")),
            py::cast<bool>(dt.attr("isnative")), dt};
  }
  static lmxent::bindings::Layout layout(py::handle a, const std::string& name, int64_t item, Call& c) {
    return iface(a, name, item, c);
  }
  template <class Args>
  static void run(const Args& a, Call& c, const char* op) {
    kernel(a, c, op);
  }
};

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
  lmxent::bindings::bind_ops<Cuda>(m);
  m.def("take_status", &take_status,
        "(count, first row or None) of the out-of-range class ids met on `device` since the last call, "
        "read after the work queued on `stream`; clears the record.",
        py::arg("device"), py::arg("stream"));
  m.def("device_count", &device_count, "CUDA devices this module can use (0 without a driver)");
  m.def("runtime_version", [] { return CUDART_VERSION; }, "CUDART_VERSION this module was built with");
}
