// The row machinery shared by the CUDA op families (the counterpart of
// cpp/cpu/rows.h): storage <-> compute types, 16-byte vector loads and
// stores, the row walker, the per-thread online log-sum-exp accumulator, the
// block reduction and the launch plan.
//
// A row (or a slice of one) is walked by one block: a scalar head up to the
// first 16-byte boundary, 16-byte vectors (4 float, 8 half/bfloat16, 2 double)
// four at a time per thread, a scalar tail. Pass 1 reads each logit once and
// keeps an online LSE state per thread, merged across the block (lse_merge of
// the contract); pass 2 reads the row again (from L2 for the rows in flight)
// and writes the output, possibly over the input: each element is read and
// written by the same thread, so in place needs no extra barrier.
//
// Indices are 64-bit throughout (rows * stride and columns beyond 2^31).
//
// The math of a row is lmxent/row_math.h, shared with the CPU (Prims below
// gives it its scalar primitives). The transform options stay in double
// there (Tr, Factor) and pass 2 takes z - lse relative to the row's max
// (RowShift), so a temperature of 1e-300 or a softcap beyond float's range
// give the CPU's answers (tests/test_edges.py). The stand-in CuPy of
// tests/test_cuda.py routes to the CPU module, so only a GPU run (the GPU
// check) executes this code.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "lmxent/row_math.h"

namespace lmxent {
namespace cuda {

constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- types -------------------------------------------------------------------

// Storage type -> compute type: double for double, float for everything else.
template <class T> struct Compute { typedef float type; };
template <> struct Compute<double> { typedef double type; };

__device__ __forceinline__ float to_c(float v) { return v; }
__device__ __forceinline__ double to_c(double v) { return v; }
__device__ __forceinline__ float to_c(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_c(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_c(typename Compute<T>::type v);
template <> __device__ __forceinline__ float from_c<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_c<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_c<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_c<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Accurate library functions (no fast-math: exp2f/expf/tanhf are within 2 ulp).
// Host and device: the shared row math (Prims below) is __host__ __device__.
__host__ __device__ __forceinline__ float exp2c(float x) { return exp2f(x); }
__host__ __device__ __forceinline__ double exp2c(double x) { return exp2(x); }
__host__ __device__ __forceinline__ float expc(float x) { return expf(x); }
__host__ __device__ __forceinline__ double expc(double x) { return exp(x); }
__host__ __device__ __forceinline__ float tanhc(float x) { return tanhf(x); }
__host__ __device__ __forceinline__ double tanhc(double x) { return tanh(x); }
__host__ __device__ __forceinline__ float log1pc(float x) { return log1pf(x); }
__host__ __device__ __forceinline__ double log1pc(double x) { return log1p(x); }
// The max ignores NaN (fmax), so a NaN reaches the sum through exp instead.
__host__ __device__ __forceinline__ float maxc(float a, float b) { return fmaxf(a, b); }
__host__ __device__ __forceinline__ double maxc(double a, double b) { return fmax(a, b); }

}  // namespace cuda

inline namespace LMXENT_ISA {
// The primitives of the shared row math (lmxent/row_math.h) on scalars of C.
template <class C>
struct Prims {
  typedef C U;
  __host__ __device__ static C splat(C v) { return v; }
  __host__ __device__ static C lane0(C v) { return v; }
  __host__ __device__ static C tanh(C v) { return cuda::tanhc(v); }
  __host__ __device__ static C exp_neg(C v) { return cuda::expc(v); }
  __host__ __device__ static C log1p_unit(C v) { return cuda::log1pc(v); }
  __host__ __device__ static C max(C a, C b) { return cuda::maxc(a, b); }
  __host__ __device__ static C select(bool m, C a, C b) { return m ? a : b; }
};
}  // namespace LMXENT_ISA

namespace cuda {

template <class C> __host__ __device__ constexpr C inf() { return (C)INFINITY; }
constexpr double kLog2e = 1.4426950408889634;

// ---- 16-byte vectors -----------------------------------------------------------

template <class T> struct VecOf { static constexpr int N = 16 / sizeof(T); };

template <class T, int N>
struct alignas(16) Pack {
  T v[N];
};

// Pass 1 loads through L1 (plain ld.global: never the read-only path, the
// kernel may write the same memory later in place); pass 2 loads and all
// stores are marked streaming (evict first), so the rows still waiting for
// their pass 2 keep their place in L2.
template <bool Stream>
__device__ __forceinline__ uint4 ld16(const void* p) {
  if (Stream) return __ldcs(reinterpret_cast<const uint4*>(p));
  return *reinterpret_cast<const uint4*>(p);
}
__device__ __forceinline__ void st16(void* p, uint4 v) { __stcs(reinterpret_cast<uint4*>(p), v); }

template <class T, int N, class C>
__device__ __forceinline__ void unpack(uint4 raw, C (&v)[N]) {
  Pack<T, N> p;
  memcpy(&p, &raw, 16);
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = to_c(p.v[i]);
}
template <class T, int N, class C>
__device__ __forceinline__ uint4 pack(const C (&v)[N]) {
  Pack<T, N> p;
#pragma unroll
  for (int i = 0; i < N; ++i) p.v[i] = from_c<T>(v[i]);
  uint4 raw;
  memcpy(&raw, &p, 16);
  return raw;
}

// ---- the row walker --------------------------------------------------------------
// Calls f(j, v) over this thread's share of the columns [c0, c1) of `in`, v a
// C[K] array of consecutive values starting at column j (K = 1 or the vector
// width). With Write, v (modified by f) is stored to the same columns of
// `out`: vectorised only when in and out have the same offset from a 16-byte
// boundary (else element by element, still correct). U vectors are loaded
// before any is used (loads in flight); pass 2, whose per-element math needs
// more registers, keeps 2.
template <bool Write, class T, class F>
__device__ __forceinline__ void row_walk(const T* in, T* out, int64_t c0, int64_t c1, F&& f) {
  typedef typename Compute<T>::type C;
  constexpr int N = VecOf<T>::N;
  constexpr int U = Write ? 2 : 4;
  const int64_t tid = threadIdx.x, nth = blockDim.x;
  const int64_t n = c1 - c0;
  if (n <= 0) return;
  const T* ip = in + c0;
  T* op = Write ? out + c0 : nullptr;
  const uintptr_t ia = reinterpret_cast<uintptr_t>(ip);
  // ia is a multiple of sizeof(T) (checked by the binding), so the head is whole elements.
  int64_t head = (int64_t)(((16 - (ia & 15)) & 15) / sizeof(T));
  const bool vec = !Write || ((reinterpret_cast<uintptr_t>(op) & 15) == (ia & 15));
  if (!vec || head > n) head = n;
  auto one = [&](int64_t j) {
    C v[1] = {to_c(ip[j])};
    f(c0 + j, v);
    if (Write) op[j] = from_c<T>(v[0]);
  };
  for (int64_t j = tid; j < head; j += nth) one(j);
  const int64_t nv = (n - head) / N;
  const T* vp = ip + head;
  T* wp = Write ? op + head : nullptr;
  int64_t i = tid;
  for (; i + (U - 1) * nth < nv; i += U * nth) {
    uint4 raw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) raw[u] = ld16<Write>(vp + (i + u * nth) * N);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      C v[N];
      unpack<T>(raw[u], v);
      f(c0 + head + (i + u * nth) * N, v);
      if (Write) st16(wp + (i + u * nth) * N, pack<T>(v));
    }
  }
  for (; i < nv; i += nth) {
    C v[N];
    unpack<T>(ld16<Write>(vp + i * N), v);
    f(c0 + head + i * N, v);
    if (Write) st16(wp + i * N, pack<T>(v));
  }
  for (int64_t j = head + nv * N + tid; j < n; j += nth) one(j);
}

// out[j] = value over [c0, c1) (zeros for an ignored row, NaN for a bad one):
// stores only, 16 bytes at a time after a scalar head.
template <class T>
__device__ __forceinline__ void row_fill(T* out, int64_t c0, int64_t c1, typename Compute<T>::type value) {
  typedef typename Compute<T>::type C;
  constexpr int N = VecOf<T>::N;
  const int64_t tid = threadIdx.x, nth = blockDim.x;
  const int64_t n = c1 - c0;
  if (n <= 0) return;
  T* op = out + c0;
  int64_t head = (int64_t)(((16 - (reinterpret_cast<uintptr_t>(op) & 15)) & 15) / sizeof(T));
  if (head > n) head = n;
  const T e = from_c<T>(value);
  for (int64_t j = tid; j < head; j += nth) op[j] = e;
  C v[N];
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = value;
  const uint4 raw = pack<T>(v);
  const int64_t nv = (n - head) / N;
  for (int64_t i = tid; i < nv; i += nth) st16(op + head + i * N, raw);
  for (int64_t j = head + nv * N + tid; j < n; j += nth) op[j] = e;
}

// ---- online log-sum-exp per thread -------------------------------------------------
// In u space: s = sum exp2((u - m) k) with m the largest u seen (exactly 1 for
// the max term, so lse >= max). The sums are kept in double (one add per
// vector); with the spread-target sums ts = sum t_j, tz = sum t_j u_j and
// tu = sum t_j (u_j - m) of cross-entropy (spread_rebase in the contract). A NaN never becomes m (fmax skips it) but reaches s; with
// m = +inf the sum means nothing (lse_final returns +inf) unless a NaN is met.
template <class C>
struct Acc {
  C m;
  double s, ts, tz, tu;
};
template <class C>
__device__ __forceinline__ Acc<C> acc_empty() { return {-inf<C>(), 0.0, 0.0, 0.0, 0.0}; }

template <class C, int K>
__device__ __forceinline__ void acc_add(Acc<C>& a, const C (&u)[K], const Factor<C>& k) {
  C vm = u[0];
#pragma unroll
  for (int i = 1; i < K; ++i) vm = maxc(vm, u[i]);
  if (vm > a.m) {
    a.s *= (double)exp2c(k(a.m - vm));  // 0 when a.m = -inf or vm = +inf; NaN stays
    a.m = vm;
  }
  if (a.m < inf<C>()) {
    const C sh = a.m == -inf<C>() ? (C)0 : a.m;  // no -inf - -inf
    C part = 0;
#pragma unroll
    for (int i = 0; i < K; ++i) part += exp2c(k(u[i] - sh));
    a.s += (double)part;
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i)
      if (u[i] != u[i]) a.s = (double)NAN;
  }
}

// The exp of a merge: exp(kz (b.m - a.m)) = exp2(k (b.m - a.m)), in C as the elements.
template <class C>
struct MergeExp {
  Factor<C> k;
  __host__ __device__ double operator()(double d) const { return (double)exp2c(k((C)d)); }
};

template <class C>
__device__ __forceinline__ Acc<C> acc_merge(const Acc<C>& a, const Acc<C>& b, const Factor<C>& k) {
  const LseState<double> r =
      lse_merge(LseState<double>{(double)a.m, a.s}, LseState<double>{(double)b.m, b.s}, MergeExp<C>{k});
  const double tu = spread_rebase(a.tu, a.ts, (double)a.m, r.m) + spread_rebase(b.tu, b.ts, (double)b.m, r.m);
  return {(C)r.m, r.s, a.ts + b.ts, a.tz + b.tz, tu};
}

struct DLog {
  __host__ __device__ double operator()(double v) const { return ::log(v); }
};
// The row's LSE of z = kz u, in double (lse_final of the contract).
template <class C>
__device__ __forceinline__ double acc_lse(const Acc<C>& a, double kz) {
  return lse_final(LseState<double>{kz * (double)a.m, a.s}, DLog());
}

template <class C>
__device__ __forceinline__ Acc<C> shfl_xor(const Acc<C>& a, int o) {
  return {__shfl_xor_sync(kFullMask, a.m, o), __shfl_xor_sync(kFullMask, a.s, o),
          __shfl_xor_sync(kFullMask, a.ts, o), __shfl_xor_sync(kFullMask, a.tz, o),
          __shfl_xor_sync(kFullMask, a.tu, o)};
}

// The block's merged state, valid in thread 0. blockDim.x is a multiple of 32;
// every thread must call it; `sh` holds kMaxWarps states. Ends with a barrier,
// so the caller may reuse `sh` right after.
template <class C>
__device__ Acc<C> block_reduce(Acc<C> a, const Factor<C>& k, Acc<C>* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) a = acc_merge(a, shfl_xor(a, o), k);
  if (lane == 0) sh[warp] = a;
  __syncthreads();
  if (warp == 0) {
    a = lane < nwarps ? sh[lane] : acc_empty<C>();
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) a = acc_merge(a, shfl_xor(a, o), k);
  }
  __syncthreads();
  return a;
}

// ---- split rows: partial states in scratch ------------------------------------------

struct Part {  // one block's pass-1 result over its slice, u space
  double m, s, ts, tz, tu;
};
template <class C>
__device__ __forceinline__ Part to_part(const Acc<C>& a) { return {(double)a.m, a.s, a.ts, a.tz, a.tu}; }
template <class C>
__device__ __forceinline__ Acc<C> from_part(const Part& p) { return {(C)p.m, p.s, p.ts, p.tz, p.tu}; }

// The merged state of a split row from its S parts (all threads call it).
template <class C>
__device__ Acc<C> merge_parts(const Part* parts, int S, const Factor<C>& k, Acc<C>* sh) {
  Acc<C> a = acc_empty<C>();
  for (int i = threadIdx.x; i < S; i += blockDim.x) a = acc_merge(a, from_part<C>(parts[i]), k);
  return block_reduce(a, k, sh);
}

// ---- launch plan ------------------------------------------------------------------

// Rows are split across blocks when they are fewer than the multiprocessors
// and long: about 2 blocks per multiprocessor, slices of at least kMinSlice
// columns (whole 16-byte vectors). Otherwise one block per row (grid-stride
// over rows). Threads: about 4 vectors each, 32 to kMaxThreads.
constexpr int64_t kMinSlice = 4096;
constexpr int kMaxSplit = 1024;
constexpr int64_t kMaxGrid = (int64_t)1 << 30;

struct Plan {
  int threads;
  int split;             // blocks per row (1: no split)
  int64_t slice;         // columns per block when split
  unsigned grid_rows;    // grid.x: blocks over rows (grid-stride beyond)
};

inline Plan make_plan(int64_t rows, int64_t cols, int item, int sm_count) {
  Plan p;
  p.split = 1;
  p.slice = cols;
  if (rows < sm_count && cols >= 2 * kMinSlice) {
    int64_t s = (2 * (int64_t)sm_count + rows - 1) / rows;
    if (s > cols / kMinSlice) s = cols / kMinSlice;
    if (s > kMaxSplit) s = kMaxSplit;
    if (s > 1) {
      const int64_t per_vec = 16 / item;
      p.split = (int)s;
      p.slice = ((cols + s - 1) / s + per_vec - 1) / per_vec * per_vec;
      p.split = (int)((cols + p.slice - 1) / p.slice);  // no empty slice
    }
  }
  const int64_t vecs = (p.slice * item + 15) / 16;
  int64_t t = ((vecs + 3) / 4 + 31) / 32 * 32;
  p.threads = (int)(t < 32 ? 32 : t > kMaxThreads ? kMaxThreads : t);
  p.grid_rows = (unsigned)(rows < kMaxGrid ? rows : kMaxGrid);
  return p;
}

// Scratch layout of a split call: rows * split parts, then rows doubles
// (cross-entropy: the target logit, saved before pass 2 may overwrite it).
inline size_t parts_bytes(const Plan& p, int64_t rows) {
  return p.split > 1 ? (size_t)rows * (size_t)p.split * sizeof(Part) : 0;
}

// Copies a device record of bad class ids ({count, ~0 - first row + 1}, kept
// with atomicMax so the smallest row wins) to the host on `stream`, waits for
// it and clears it.
template <class Symbol>
inline int take_record(const Symbol& symbol, void* stream, unsigned long long* count,
                       unsigned long long* first_row) {
  const cudaStream_t st = (cudaStream_t)stream;
  unsigned long long h[2] = {0, 0};
  void* dev = nullptr;
  cudaError_t e = cudaGetSymbolAddress(&dev, symbol);
  if (e == cudaSuccess) e = cudaMemcpyAsync(h, dev, sizeof h, cudaMemcpyDeviceToHost, st);
  if (e == cudaSuccess) e = cudaMemsetAsync(dev, 0, sizeof h, st);
  if (e == cudaSuccess) e = cudaStreamSynchronize(st);
  *count = h[0];
  *first_row = h[1] ? ~0ull - h[1] + 1 : 0;
  return (int)e;
}

// Calls f((T*)nullptr) with the storage type T of a dtype.
template <class F>
inline void with_dtype(DType dt, F&& f) {
  with_storage<__half, __nv_bfloat16>(dt, f);
}


// ---- additions for token_stats and kl_divergence ------------------------------------

// The block's merge of per-thread states of any type S: merge(a, b) combines
// two states, shfl_xor(a, o) (an overload per state type) fetches lane ^ o's.
// The same shape as block_reduce: valid in thread 0, every thread calls it,
// `sh` holds kMaxWarps states, ends with a barrier.
template <class S, class M>
__device__ S block_merge(S a, const S& empty, M merge, S* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) a = merge(a, shfl_xor(a, o));
  if (lane == 0) sh[warp] = a;
  __syncthreads();
  if (warp == 0) {
    a = lane < nwarps ? sh[lane] : empty;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) a = merge(a, shfl_xor(a, o));
  }
  __syncthreads();
  return a;
}

// Two plain sums (Jensen-Shannon's pass 2).
struct Sum2 {
  double a, b;
};
__device__ __forceinline__ Sum2 shfl_xor(const Sum2& v, int o) {
  return {__shfl_xor_sync(kFullMask, v.a, o), __shfl_xor_sync(kFullMask, v.b, o)};
}
__device__ __forceinline__ Sum2 sum2_add(const Sum2& x, const Sum2& y) { return {x.a + y.a, x.b + y.b}; }

// ---- token statistics: entropy and rank in the LSE walk ----------------------------
// Beside Acc's online LSE (u space, e_j = exp2((u_j - m) k)): the entropy sum
// h = sum_j e_j (u_j - m) (ent_merge of the contract, in u units: the entropy
// is log s - kz h / s) and the count of entries ranked above the target.
template <class C>
struct EntAcc {
  C m;
  double s, h;
  long long above;
};
template <class C>
__device__ __forceinline__ EntAcc<C> ent_empty() { return {-inf<C>(), 0.0, 0.0, 0}; }

// Adds K consecutive values starting at column j.
template <class C, int K>
__device__ __forceinline__ void ent_add(EntAcc<C>& a, const C (&u)[K], int64_t j, const RankOf<C>& rk,
                                        const Factor<C>& k) {
  C vm = u[0];
#pragma unroll
  for (int i = 1; i < K; ++i) vm = maxc(vm, u[i]);
  if (vm > a.m) {
    // h moves with s: h' = f (h + (m - M) s). Nothing to move while s is 0
    // (m = -inf), where (m - M) s would be NaN.
    if (a.s != 0.0) {
      const double f = (double)exp2c(k(a.m - vm));  // as acc_add: 0 for vm = +inf
      a.h = f * (a.h + ((double)a.m - (double)vm) * a.s);
      a.s *= f;
    }
    a.m = vm;
  }
  if (a.m < inf<C>()) {
    const C sh = a.m == -inf<C>() ? (C)0 : a.m;
    C ps = 0, ph = 0;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const C d = u[i] - sh, e = exp2c(k(d));
      ps += e;
      ph += e > (C)0 ? e * d : (C)0;  // a zero weight never meets d = -inf
    }
    a.s += (double)ps;
    a.h += (double)ph;
  } else {  // +inf in the row: no entropy (ent_final); only a NaN still matters to the LSE
#pragma unroll
    for (int i = 0; i < K; ++i)
      if (u[i] != u[i]) a.s = (double)NAN;
  }
  if (rk.t >= 0) {
    // The target's index relative to j, clamped to [-1, K] so the test is 32-bit.
    const int64_t rel = rk.t - j;
    const int tl = rel < 0 ? -1 : rel > K ? K : (int)rel;
    int n = 0;
#pragma unroll
    for (int i = 0; i < K; ++i) n += ranks_above(u[i], rk.ut, i < tl);
    a.above += n;
  }
}

template <class C>
__device__ __forceinline__ EntAcc<C> ent_acc_merge(const EntAcc<C>& a, const EntAcc<C>& b, const Factor<C>& k) {
  const LseState<double> sa{(double)a.m, a.s}, sb{(double)b.m, b.s};
  const MergeExp<C> e{k};
  const LseState<double> r = lse_merge(sa, sb, e);
  return {(C)r.m, r.s, ent_merge(sa, a.h, sb, b.h, e), a.above + b.above};
}

template <class C>
__device__ __forceinline__ EntAcc<C> shfl_xor(const EntAcc<C>& a, int o) {
  return {__shfl_xor_sync(kFullMask, a.m, o), __shfl_xor_sync(kFullMask, a.s, o),
          __shfl_xor_sync(kFullMask, a.h, o), __shfl_xor_sync(kFullMask, a.above, o)};
}

// ---- KL divergence: two online LSE states and a weighted sum --------------------
// Student and teacher rows in u space (z = kz u), each with its own max and
// sum, and the direction's sum d = sum_j e_j (a_j - b_j) of the values
// centred on each side's own max, weighted by the exps of one side (TW: the
// teacher's, forward KL; else the student's), which moves with both maxima
// (kl_move, kl_merge_sum of the contract).
template <class C>
struct KLAcc {
  C ms, mt;
  double ss, st, d;
};
template <class C>
__device__ __forceinline__ KLAcc<C> kl_empty() { return {-inf<C>(), -inf<C>(), 0.0, 0.0, 0.0}; }

// One side's move to a larger max; returns the factor its sums were scaled by
// (1 when the max stays). As acc_add: 0 from m = -inf (s is 0) or to +inf.
template <class C, int K>
__device__ __forceinline__ double lse_lift(C& m, double& s, const C (&u)[K], const Factor<C>& k) {
  C vm = u[0];
#pragma unroll
  for (int i = 1; i < K; ++i) vm = maxc(vm, u[i]);
  if (!(vm > m)) return 1.0;
  const double f = (double)exp2c(k(m - vm));
  s *= f;
  m = vm;
  return f;
}

// D: the direction needs d (forward, reverse; not Jensen-Shannon). A row with
// +inf or NaN gets no special case: its LSE is not finite, which the kernel
// turns into a NaN loss and gradient.
template <bool TW, bool D, class C, int K>
__device__ __forceinline__ void kl_add(KLAcc<C>& a, const C (&us)[K], const C (&ut)[K], const Factor<C>& k) {
  const C ms0 = a.ms, mt0 = a.mt;
  const double ss0 = a.ss, st0 = a.st;
  const double fs = lse_lift(a.ms, a.ss, us, k), ft = lse_lift(a.mt, a.st, ut, k);
  if (D && (a.ms != ms0 || a.mt != mt0))  // a max moved
    a.d = TW ? kl_move(a.d, st0, ft, (double)mt0, (double)a.mt, (double)ms0, (double)a.ms)
             : kl_move(a.d, ss0, fs, (double)ms0, (double)a.ms, (double)mt0, (double)a.mt);
  const C shs = a.ms == -inf<C>() ? (C)0 : a.ms, sht = a.mt == -inf<C>() ? (C)0 : a.mt;
  C ps = 0, pt = 0, pd = 0;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const C cs = us[i] - shs, ct = ut[i] - sht;  // centred: never ut - us
    const C es = exp2c(k(cs)), et = exp2c(k(ct));
    ps += es;
    pt += et;
    if (D) {
      const C e = TW ? et : es, diff = TW ? ct - cs : cs - ct;
      pd += e > (C)0 ? e * diff : (C)0;  // a zero weight contributes 0, even against -inf
    }
  }
  a.ss += (double)ps;
  a.st += (double)pt;
  if (D) a.d += (double)pd;
}

template <bool TW, class C>
__device__ __forceinline__ KLAcc<C> kl_acc_merge(const KLAcc<C>& a, const KLAcc<C>& b, const Factor<C>& k) {
  const MergeExp<C> e{k};
  const LseState<double> as{(double)a.ms, a.ss}, bs{(double)b.ms, b.ss};
  const LseState<double> at{(double)a.mt, a.st}, bt{(double)b.mt, b.st};
  const LseState<double> rs = lse_merge(as, bs, e), rt = lse_merge(at, bt, e);
  const double d = TW ? kl_merge_sum(at, as, a.d, bt, bs, b.d, e) : kl_merge_sum(as, at, a.d, bs, bt, b.d, e);
  return {(C)rs.m, (C)rt.m, rs.s, rt.s, d};
}

template <class C>
__device__ __forceinline__ KLAcc<C> shfl_xor(const KLAcc<C>& a, int o) {
  return {__shfl_xor_sync(kFullMask, a.ms, o), __shfl_xor_sync(kFullMask, a.mt, o),
          __shfl_xor_sync(kFullMask, a.ss, o), __shfl_xor_sync(kFullMask, a.st, o),
          __shfl_xor_sync(kFullMask, a.d, o)};
}

// The two-row walker: f(j, va, vb) over this thread's share of the columns
// [c0, c1) of rows a and b (the same columns of both); with Write, va
// (modified by f) is stored to the same columns of `out` (which may be a:
// each element is read and written by the same thread). Vectorised when a, b
// and out have the same offset from a 16-byte boundary, else element by
// element (still correct). Two vector pairs in flight per thread.
template <bool Write, class T, class F>
__device__ __forceinline__ void row_walk2(const T* a, const T* b, T* out, int64_t c0, int64_t c1, F&& f) {
  typedef typename Compute<T>::type C;
  constexpr int N = VecOf<T>::N;
  constexpr int U = 2;
  const int64_t tid = threadIdx.x, nth = blockDim.x;
  const int64_t n = c1 - c0;
  if (n <= 0) return;
  const T* ap = a + c0;
  const T* bp = b + c0;
  T* op = Write ? out + c0 : nullptr;
  const uintptr_t ia = reinterpret_cast<uintptr_t>(ap) & 15;
  int64_t head = (int64_t)(((16 - ia) & 15) / sizeof(T));
  const bool vec = (reinterpret_cast<uintptr_t>(bp) & 15) == ia &&
                   (!Write || (reinterpret_cast<uintptr_t>(op) & 15) == ia);
  if (!vec || head > n) head = n;
  auto one = [&](int64_t j) {
    C va[1] = {to_c(ap[j])}, vb[1] = {to_c(bp[j])};
    f(c0 + j, va, vb);
    if (Write) op[j] = from_c<T>(va[0]);
  };
  for (int64_t j = tid; j < head; j += nth) one(j);
  const int64_t nv = (n - head) / N;
  const T* pa = ap + head;
  const T* pb = bp + head;
  T* wp = Write ? op + head : nullptr;
  auto vecs = [&](int64_t i, uint4 ra, uint4 rb) {
    C va[N], vb[N];
    unpack<T>(ra, va);
    unpack<T>(rb, vb);
    f(c0 + head + i * N, va, vb);
    if (Write) st16(wp + i * N, pack<T>(va));
  };
  int64_t i = tid;
  for (; i + (U - 1) * nth < nv; i += U * nth) {
    uint4 ra[U], rb[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      ra[u] = ld16<Write>(pa + (i + u * nth) * N);
      rb[u] = ld16<Write>(pb + (i + u * nth) * N);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) vecs(i + u * nth, ra[u], rb[u]);
  }
  for (; i < nv; i += nth) vecs(i, ld16<Write>(pa + i * N), ld16<Write>(pb + i * N));
  for (int64_t j = head + nv * N + tid; j < n; j += nth) one(j);
}

}  // namespace cuda
}  // namespace lmxent
