// The decoding ops on the GPU: process_logits / sample (DecodeArgs) and top_k
// (TopKArgs), the CUDA counterpart of cpp/cpu/ops/decoding.cpp. One block of
// kThreads per row: the algorithm is cuda/decoding_block.h, written over a
// block type; here is that type on the GPU (shared memory, warp shuffles,
// barriers, atomics) and the launches, on the caller's stream with no host
// synchronisation. The same algorithm runs on the host over a block of fibers
// in the tests (tests/emu/), so its logic is tested without a GPU; this file's
// block primitives run only on one (the GPU check).
//
// A grid of min(rows, multiprocessors) blocks walks the rows (grid-stride),
// each with its float64 row buffer in global scratch: about 8 V bytes per
// block (more with penalties or a top-n list; block::row_bytes), so the
// scratch does not grow with the batch.
#include <type_traits>

#include "decoding_block.h"
#include "rows.cuh"

namespace lmxent {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kSlot = 4;  // 64-bit words per warp's slot: the largest reduced state

// A trivially copyable value from lane ^ o (xor) or lane - o (up), 32 bits at a time.
template <class S>
__device__ __forceinline__ S shfl_pod(const S& v, int o, bool up) {
  static_assert(sizeof(S) % 4 == 0 && sizeof(S) <= 8 * kSlot, "a reduced state's size");
  unsigned w[sizeof(S) / 4];
  memcpy(w, &v, sizeof(S));
#pragma unroll
  for (int i = 0; i < (int)(sizeof(S) / 4); ++i)
    w[i] = up ? __shfl_up_sync(kFullMask, w[i], o) : __shfl_xor_sync(kFullMask, w[i], o);
  S out;
  memcpy(&out, w, sizeof(S));
  return out;
}

// The block of decoding_block.h on the GPU.
struct GpuBlock {
  uint64_t* shared;  // block::kWords
  uint64_t* slots;   // kWarps * kSlot
  __device__ int tid() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
  __device__ uint64_t* words() const { return shared; }
  __device__ uint64_t atomic_add(uint64_t* p, uint64_t v) const {
    return atomicAdd((unsigned long long*)p, (unsigned long long)v);
  }
  __device__ uint32_t atomic_add(uint32_t* p, uint32_t v) const { return atomicAdd(p, v); }
  __device__ uint32_t exchange(uint32_t* p, uint32_t v) const { return atomicExch(p, v); }

  // Warps by shuffles, then every thread merges the warps' results in order:
  // the same value in every thread.
  template <class S, class M>
  __device__ S reduce(S v, M merge) const {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = merge(v, shfl_pod(v, o, false));
    S* sh = reinterpret_cast<S*>(slots);
    if (lane == 0) memcpy(&sh[warp * (8 * kSlot / sizeof(S))], &v, sizeof(S));
    __syncthreads();
    memcpy(&v, &sh[0], sizeof(S));
    for (int w = 1; w < nw; ++w) v = merge(v, sh[w * (8 * kSlot / sizeof(S))]);
    __syncthreads();
    return v;
  }

  // Exclusive prefix sum in thread order (warp scans by shuffles, then the
  // warps' totals in order), and the block's total.
  template <class S>
  __device__ S scan(S v, S* total) const {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    S inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const S u = shfl_pod(inc, o, true);
      if (lane >= o) inc += u;
    }
    S ex = shfl_pod(inc, 1, true);
    ex = lane == 0 ? (S)0 : ex;
    S* sh = reinterpret_cast<S*>(slots);
    if (lane == 31) sh[warp] = inc;
    __syncthreads();
    S before = 0, all = 0;
    for (int w = 0; w < nw; ++w) {
      if (w == warp) before = all;
      all += sh[w];
    }
    __syncthreads();
    *total = all;
    return before + ex;
  }
};

// This block's row buffers.
__device__ __forceinline__ char* row_buffer(char* scratch, int64_t bytes) {
  return scratch + (int64_t)blockIdx.x * bytes;
}

template <class T>
__global__ void __launch_bounds__(kThreads) decode_kernel(DecodeArgs a, char* scratch, int64_t bytes) {
  typedef typename Compute<T>::type C;
  __shared__ uint64_t shared[block::kWords];
  __shared__ uint64_t slots[kWarps * kSlot];
  GpuBlock b{shared, slots};
  const int64_t V = a.logits.cols;
  double* y = (double*)row_buffer(scratch, bytes);
  unsigned char* aux = (unsigned char*)(y + V);
  for (int64_t r = blockIdx.x; r < a.logits.rows; r += gridDim.x) {
    const T* x = (const T*)a.logits.data + r * a.logits.stride;
    T* o = (T*)a.out.data + r * a.out.stride;
    block::decode_block(
        b, a, r, [x](int64_t j) { return (double)to_c(x[j]); },
        [o](int64_t j, double v) { o[j] = from_c<T>((C)v); }, y, aux);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) top_k_kernel(TopKArgs a, char* scratch, int64_t bytes) {
  __shared__ uint64_t shared[block::kWords];
  __shared__ uint64_t slots[kWarps * kSlot];
  GpuBlock b{shared, slots};
  unsigned char* aux = (unsigned char*)row_buffer(scratch, bytes);
  for (int64_t r = blockIdx.x; r < a.x.rows; r += gridDim.x) {
    const T* x = (const T*)a.x.data + r * a.x.stride;
    T* vals = (T*)a.values.data + r * a.values.stride;
    int64_t* ids = a.indices + r * a.k;
    block::top_k_block(
        b, a, r, [x](int64_t j) { return (double)to_c(x[j]); },
        [=](int64_t i, int64_t j) { vals[i] = x[j]; ids[i] = j; }, aux);
  }
}

unsigned grid(int64_t rows, int sm_count) { return (unsigned)(rows < sm_count ? rows : sm_count); }

template <class Args, class Kernel>
int enqueue(const Args& a, const View2D& rows, const Launch& l, int64_t bytes, Kernel kernel) {
  if (rows.rows == 0 || rows.cols == 0) return (int)cudaSuccess;
  kernel<<<grid(rows.rows, l.sm_count), kThreads, 0, (cudaStream_t)l.stream>>>(a, (char*)l.scratch, bytes);
  return (int)cudaGetLastError();
}

}  // namespace

size_t scratch(const DecodeArgs& a, int sm_count) {
  return (size_t)grid(a.logits.rows, sm_count) * (size_t)block::row_bytes(a);
}

int launch(const DecodeArgs& a, const Launch& l) {
  int e = (int)cudaSuccess;
  with_dtype(a.logits.dtype, [&](auto* tag) {
    e = enqueue(a, a.logits, l, block::row_bytes(a), decode_kernel<std::remove_pointer_t<decltype(tag)>>);
  });
  return e;
}

size_t scratch(const TopKArgs& a, int sm_count) {
  return a.k == 0 ? 0 : (size_t)grid(a.x.rows, sm_count) * (size_t)block::row_bytes(a);
}

int launch(const TopKArgs& a, const Launch& l) {
  if (a.k == 0) return (int)cudaSuccess;
  int e = (int)cudaSuccess;
  with_dtype(a.x.dtype, [&](auto* tag) {
    e = enqueue(a, a.x, l, block::row_bytes(a), top_k_kernel<std::remove_pointer_t<decltype(tag)>>);
  });
  return e;
}

}  // namespace cuda
}  // namespace lmxent
