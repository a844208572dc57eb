// The decoding ops on the GPU: process_logits / sample (DecodeArgs) and top_k
// (TopKArgs), the CUDA counterpart of cpp/cpu/ops/decoding.cpp. The row math
// is lmxent/decoding.h, the same LMXENT_HD code the CPU runs, so both take
// the same float64 operations in the same order (only exp/log may differ by
// an ulp): one GPU thread per row, its float64 row buffers in global scratch
// (decode_row_bytes per row), launched on the caller's stream with no host
// synchronisation.
//
// This is the straightforward correct design, not a fast one: a thread walks
// its whole row (uncoalesced reads, no block-wide reductions), so a batch of
// B rows uses B threads. A block-per-row version (block-wide max and
// threshold search by repeated reductions) is the next step. No GPU was
// available when this was written: it is compiled and reviewed, and the
// stand-in CuPy of tests/test_cuda.py checks the Python path (on the CPU).
#include <type_traits>

#include "lmxent/decoding.h"
#include "rows.cuh"

namespace lmxent {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 64;

template <class T>
__global__ void decode_kernel(DecodeArgs a, char* scratch) {
  typedef typename Compute<T>::type C;
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= a.logits.rows) return;
  const int64_t V = a.logits.cols;
  const DecodeScratch s =
      decode_scratch(scratch + r * decode_row_bytes(V, a.prev_len, a.num_logprobs), V, a.prev_len);
  const T* x = (const T*)a.logits.data + r * a.logits.stride;
  T* o = (T*)a.out.data + r * a.out.stride;
  auto raw = [x](int64_t j) { return (double)to_c(x[j]); };
  auto store = [o](int64_t j, double v) { o[j] = from_c<T>((C)v); };
  decode_one(a, r, raw, [&](double v) { for (int64_t j = 0; j < V; ++j) store(j, v); }, store,
             [&](double m) { return dec_log_sum(raw, V, m); }, s, decode_zs(s, a.prev_len));
}

template <class T>
__global__ void top_k_kernel(TopKArgs a, char* scratch) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= a.x.rows) return;
  const int64_t V = a.x.cols, k = a.k;
  const DecodeScratch s = decode_scratch(scratch + r * decode_row_bytes(V, 0, 0), V, 0);
  const T* x = (const T*)a.x.data + r * a.x.stride;
  T* vals = (T*)a.values.data + r * a.values.stride;
  int64_t* ids = a.indices + r * k;
  top_k_one(a, [x](int64_t j) { return (double)to_c(x[j]); },
            [=](int64_t i, int64_t j) { vals[i] = x[j]; ids[i] = j; }, s);
}

template <class Args, class Kernel>
int enqueue(const Args& a, const View2D& rows, const Launch& l, Kernel kernel) {
  if (rows.rows == 0 || rows.cols == 0) return (int)cudaSuccess;
  const unsigned blocks = (unsigned)((rows.rows + kRowsPerBlock - 1) / kRowsPerBlock);
  kernel<<<blocks, kRowsPerBlock, 0, (cudaStream_t)l.stream>>>(a, (char*)l.scratch);
  return (int)cudaGetLastError();
}

}  // namespace

size_t scratch(const DecodeArgs& a, int) {
  return (size_t)a.logits.rows * (size_t)decode_row_bytes(a.logits.cols, a.prev_len, a.num_logprobs);
}

int launch(const DecodeArgs& a, const Launch& l) {
  int e = (int)cudaSuccess;
  with_dtype(a.logits.dtype, [&](auto* tag) {
    e = enqueue(a, a.logits, l, decode_kernel<std::remove_pointer_t<decltype(tag)>>);
  });
  return e;
}

size_t scratch(const TopKArgs& a, int) {
  return a.k == 0 ? 0 : (size_t)a.x.rows * (size_t)decode_row_bytes(a.x.cols, 0, 0);
}

int launch(const TopKArgs& a, const Launch& l) {
  if (a.k == 0) return (int)cudaSuccess;
  int e = (int)cudaSuccess;
  with_dtype(a.x.dtype, [&](auto* tag) {
    e = enqueue(a, a.x, l, top_k_kernel<std::remove_pointer_t<decltype(tag)>>);
  });
  return e;
}

}  // namespace cuda
}  // namespace lmxent
