// logsumexp, softmax and log_softmax over rows, with a temperature (the CUDA
// counterpart of cpp/cpu/ops/softmax.cpp).
//
// Memory traffic: pass 1 reads each row once (online LSE); pass 2, only when
// an output is asked for, reads the row again (from L2: the block does it
// right after pass 1) and writes the output. Few long rows are split across
// blocks: a first kernel writes each block's partial state, a second merges
// them and writes the output of its slice.
#include <type_traits>

#include "rows.cuh"

namespace lmxent {
namespace cuda {
namespace {

template <class T>
struct SoftmaxK {
  typedef typename Compute<T>::type C;
  SoftmaxArgs a;
  Tr<C, false> tr;

  __device__ const T* x(int64_t r) const { return (const T*)a.x.data + r * a.x.stride; }

  __device__ Acc<C> partial(int64_t r, int64_t c0, int64_t c1) const {
    Acc<C> acc = acc_empty<C>();
    row_walk<false>(x(r), (T*)nullptr, c0, c1, [&](int64_t, auto& v) { acc_add(acc, v, tr.k); });
    return acc;
  }

  // The row's z - lse, relative to its max (cpp/cpu/ops/softmax.cpp), from its
  // merged state (one thread); writes the LSE when `write`.
  __device__ RowShift finish(int64_t r, const Acc<C>& acc, bool write) const {
    const double lse = acc_lse(acc, tr.kz);
    if (write && a.lse) ((C*)a.lse)[r] = (C)lse;
    return RowShift((double)acc.m, acc.s, lse, true);
  }

  __device__ void pass2(int64_t r, const RowShift& rs, int64_t c0, int64_t c1) const {
    const ShiftV<C> sh(rs, tr.kz);
    const bool log = a.log;
    row_walk<true>(x(r), (T*)a.out.data + r * a.out.stride, c0, c1, [&](int64_t, auto& v) {
      for (auto& e : v) {
        const C d = sh.sub(e);
        e = log ? d : expc(d);
      }
    });
  }
};

// One block per row.
template <class T>
__global__ void __launch_bounds__(kMaxThreads, 2) softmax_rows(SoftmaxK<T> k) {
  typedef typename Compute<T>::type C;
  __shared__ Acc<C> sh[kMaxWarps];
  __shared__ RowShift row_sh;
  const int64_t V = k.a.x.cols;
  for (int64_t r = blockIdx.x; r < k.a.x.rows; r += gridDim.x) {
    const Acc<C> acc = block_reduce(k.partial(r, 0, V), k.tr.k, sh);
    if (threadIdx.x == 0) row_sh = k.finish(r, acc, true);
    __syncthreads();
    const RowShift rs = row_sh;
    if (k.a.out.data) k.pass2(r, rs, 0, V);
    __syncthreads();  // every thread has read row_sh before the next row writes it
  }
}

// Split rows, kernel 1: block (r, s) writes the state of slice s of row r.
template <class T>
__global__ void __launch_bounds__(kMaxThreads, 2) softmax_part(SoftmaxK<T> k, Part* parts, int64_t slice) {
  typedef typename Compute<T>::type C;
  __shared__ Acc<C> sh[kMaxWarps];
  const int64_t V = k.a.x.cols, S = gridDim.y, s = blockIdx.y;
  const int64_t c0 = s * slice, c1 = c0 + slice < V ? c0 + slice : V;
  for (int64_t r = blockIdx.x; r < k.a.x.rows; r += gridDim.x) {
    const Acc<C> acc = block_reduce(k.partial(r, c0, c1), k.tr.k, sh);
    if (threadIdx.x == 0) parts[r * S + s] = to_part(acc);
  }
}

// Split rows, kernel 2: merge the row's parts, write the LSE (slice 0) and the
// output of slice blockIdx.y (gridDim.y is 1 when there is no output).
template <class T>
__global__ void __launch_bounds__(kMaxThreads, 2) softmax_finish(SoftmaxK<T> k, const Part* parts, int S,
                                                              int64_t slice) {
  typedef typename Compute<T>::type C;
  __shared__ Acc<C> sh[kMaxWarps];
  __shared__ RowShift row_sh;
  const int64_t V = k.a.x.cols, s = blockIdx.y;
  const int64_t c0 = s * slice, c1 = c0 + slice < V ? c0 + slice : V;
  for (int64_t r = blockIdx.x; r < k.a.x.rows; r += gridDim.x) {
    const Acc<C> acc = merge_parts(parts + r * S, S, k.tr.k, sh);
    if (threadIdx.x == 0) row_sh = k.finish(r, acc, s == 0);
    __syncthreads();
    const RowShift rs = row_sh;
    if (k.a.out.data) k.pass2(r, rs, c0, c1);
    __syncthreads();
  }
}

template <class T>
cudaError_t enqueue(const SoftmaxArgs& a, const Launch& l) {
  typedef typename Compute<T>::type C;
  const Plan p = make_plan(a.x.rows, a.x.cols, (int)sizeof(T), l.sm_count);
  const SoftmaxK<T> k{a, Tr<C, false>(a.tr)};
  const cudaStream_t st = (cudaStream_t)l.stream;
  if (p.split == 1) {
    softmax_rows<T><<<p.grid_rows, p.threads, 0, st>>>(k);
  } else {
    Part* parts = (Part*)l.scratch;
    softmax_part<T><<<dim3(p.grid_rows, p.split), p.threads, 0, st>>>(k, parts, p.slice);
    softmax_finish<T><<<dim3(p.grid_rows, a.out.data ? p.split : 1), p.threads, 0, st>>>(k, parts, p.split,
                                                                                       p.slice);
  }
  return cudaGetLastError();
}

}  // namespace

size_t scratch(const SoftmaxArgs& a, int sm_count) {
  if (a.x.rows == 0 || a.x.cols == 0) return 0;
  return parts_bytes(make_plan(a.x.rows, a.x.cols, (int)item_size(a.x.dtype), sm_count), a.x.rows);
}

int launch(const SoftmaxArgs& a, const Launch& l) {
  if (a.x.rows == 0 || a.x.cols == 0) return (int)cudaSuccess;
  cudaError_t e = cudaSuccess;
  with_dtype(a.x.dtype, [&](auto* tag) { e = enqueue<std::remove_pointer_t<decltype(tag)>>(a, l); });
  return (int)e;
}

}  // namespace cuda
}  // namespace lmxent
