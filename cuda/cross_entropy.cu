// Cross-entropy forward, fused forward + gradient, and backward from a saved
// LSE, for class-id or probability targets, with class weights, label
// smoothing, z-loss, softcap and logit scale (the CUDA counterpart of
// cpp/cpu/ops/cross_entropy.cpp; the formulas are in lmxent/contract.h).
//
// Memory traffic: the forward reads each logit once. The fused gradient has
// the same block re-read its row (from L2) and write the gradient, possibly
// over the logits. The backward from a saved LSE has no pass 1 for class ids
// (except with class weights and label smoothing, whose sum_j t_j it needs).
//
// A class id outside [0, V) that is not ignore_index is never used as an
// index: its row gets a NaN loss and gradient and is recorded in g_bad (see
// take_status). The Python layer checks the ids before the launch unless the
// caller chose deferred validation.
#include <type_traits>

#include "rows.cuh"

namespace lmxent {
namespace cuda {

// Rows with an out-of-range class id since the last take_status on this
// device: [0] their count, [1] the largest 2^64 - 1 - row (0: none), that is
// the smallest row.
__device__ unsigned long long g_bad[2];

namespace {

// t_j of the contract (cpp/cpu/rows.h Uniform/Weighted/ProbSpread):
// (qa q_j + uk) w_j for probability targets, uk w_j for class ids (w_j = 1
// without class weights). q and w are plain loads: q may be the logits
// themselves written in place.
template <class C>
struct Spread {
  C qa, uk;
  const C* w;
  __device__ C at(const C* q, int64_t j) const {
    const C t = q ? qa * q[j] + uk : uk;
    return w ? t * w[j] : t;
  }
};

template <class T, bool SC, bool SP>
struct CEK {
  typedef typename Compute<T>::type C;
  CEArgs a;
  Tr<C, SC> tr;
  Spread<C> sp;
  double hard_k;      // (1 - eps) for class ids, 0 for probability targets
  double t_sum_k;     // sum_j t_j for unweighted class ids (the same on every row)
  bool weighted_ids;  // class ids, class weights and smoothing: sum_j t_j from pass 1

  __device__ bool prob() const { return a.probs.data != nullptr; }
  __device__ const T* x(int64_t r) const { return (const T*)a.logits.data + r * a.logits.stride; }
  __device__ const C* q(int64_t r) const {
    return prob() ? (const C*)a.probs.data + r * a.probs.stride : nullptr;
  }

  __device__ int status(int64_t r, int64_t* t) const {
    *t = -1;
    if (prob()) return 0;
    *t = a.targets[r];
    if (*t == a.ignore_index) return 1;
    if (*t == -1 && a.vocab_slice) return 0;  // the target is in another slice
    return (*t < 0 || *t >= a.logits.cols) ? 2 : 0;
  }
  __device__ bool need_lse(int st) const { return !a.lse_given && (st != 1 || a.lse); }
  __device__ bool need_sums(int st) const {
    return SP && st == 0 && (!a.lse_given || prob() || weighted_ids);
  }
  __device__ bool need_pass1(int st) const { return need_lse(st) || need_sums(st); }
  __device__ double x_t(int64_t r, int st, int64_t t) const {
    return st == 0 && t >= 0 ? (double)to_c(x(r)[t]) : 0.0;
  }

  // Pass 1 over [c0, c1): this thread's LSE state (in u = pre(x)) and the
  // spread sums sum t_j, sum t_j u_j and sum t_j (u_j - m).
  __device__ Acc<C> partial(int64_t r, int64_t c0, int64_t c1) const {
    Acc<C> acc = acc_empty<C>();
    const C* qr = q(r);
    row_walk<false>(x(r), (T*)nullptr, c0, c1, [&](int64_t j, auto& v) {
      for (auto& e : v) e = tr.pre(e);
      const C m0 = acc.m;
      acc_add(acc, v, tr.k);
      if constexpr (SP) {
        const C mx = acc.m == -inf<C>() ? (C)0 : acc.m;  // all -inf: tu = sum t_j u_j
        C ts = 0, tz = 0, tu = 0;
        int i = 0;
        for (const C u : v) {
          const C t = sp.at(qr, j + i++);
          ts += t;
          if (t != (C)0) {  // a zero target never meets -inf
            tz += t * u;
            tu += t * (u - mx);
          }
        }
        acc.tu = spread_rebase(acc.tu, acc.ts, (double)m0, (double)acc.m) + (double)tu;
        acc.ts += (double)ts;
        acc.tz += (double)tz;
      }
    });
    return acc;
  }

  // The row's scalars (CERow, lmxent/row_math.h; one thread). `write`: this
  // block writes the per-row outputs (loss, LSE) and records a bad class id.
  __device__ CERow finish(int64_t r, int st, int64_t t, const Acc<C>& acc, double x_t, bool write) const {
    CERow k{};
    k.t = t;
    k.state = st;
    k.lse = a.lse_given ? (double)((const C*)a.lse)[r] : acc_lse(acc, tr.kz);
    if (write && !a.lse_given && a.lse) ((C*)a.lse)[r] = (C)k.lse;
    if (st != 0) {
      if (write && a.loss) ((C*)a.loss)[r] = st == 1 ? (C)0 : (C)NAN;
      if (write && st == 2) {
        atomicAdd(&g_bad[0], 1ull);
        atomicMax(&g_bad[1], ~0ull - (unsigned long long)r);
      }
      return k;
    }
    k.sh = RowShift((double)acc.m, acc.s, k.lse, !a.lse_given);
    k.x_t = x_t;
    k.u_t = tr.one_u((C)x_t);
    const double t_sum = !SP ? 0.0 : (prob() || weighted_ids) ? acc.ts : t_sum_k;
    ce_row<C>(a, r, tr.kz, hard_k, SpreadSums{t_sum, tr.kz * acc.tz, acc.tu}, write, k);
    return k;
  }

  // Pass 2 over [c0, c1): g_j = (A p_j - t_j) dz_j/dx_j rs, without the hard
  // target term (fix_target adds it); p_j from z_j - lse relative to the
  // row's max and the options as split factors (cpp/cpu/ops/cross_entropy.cpp).
  __device__ void pass2(int64_t r, const CERow& k, int64_t c0, int64_t c1) const {
    T* g = (T*)a.grad.data + r * a.grad.stride;
    if (k.state != 0) {
      row_fill(g, c0, c1, k.state == 1 ? (C)0 : (C)NAN);
      return;
    }
    const ShiftV<C> sh(k.sh, tr.kz);
    const Factor<C> A(k.A * k.rs), rs(k.rs);
    const C* qr = q(r);
    row_walk<true>(x(r), g, c0, c1, [&](int64_t j, auto& v) {
      int i = 0;
      for (auto& e : v) {
        C th = 0;  // set under a softcap
        const C u = tr.pre(e, &th);
        const C t = SP ? sp.at(qr, j + i) : (C)0;
        e = tr.times_slope(A(expc(sh.sub(u))) - rs(t), th);
        ++i;
      }
    });
  }

  // The target element, from the logit saved before pass 2 (which may have
  // overwritten it), in double and rounded once (cpp/cpu CEOp::after).
  __device__ void fix_target(int64_t r, const CERow& k) const {
    if (k.state != 0 || k.t < 0) return;
    const double t = SP ? (double)sp.at(nullptr, k.t) : 0.0;
    const double g = ce_target_grad(k, tr.kz, t, tr.slope_one(k.x_t));
    ((T*)a.grad.data + r * a.grad.stride)[k.t] = from_c<T>((C)g);
  }
};

// One block per row.
template <class T, bool SC, bool SP>
__global__ void __launch_bounds__(kMaxThreads, 2) ce_rows(CEK<T, SC, SP> k) {
  typedef typename Compute<T>::type C;
  __shared__ Acc<C> sh[kMaxWarps];
  __shared__ CERow rk;
  const int64_t V = k.a.logits.cols;
  for (int64_t r = blockIdx.x; r < k.a.logits.rows; r += gridDim.x) {
    int64_t t;
    const int st = k.status(r, &t);
    Acc<C> acc = acc_empty<C>();
    if (k.need_pass1(st)) acc = block_reduce(k.partial(r, 0, V), k.tr.k, sh);
    if (threadIdx.x == 0) rk = k.finish(r, st, t, acc, k.x_t(r, st, t), true);
    __syncthreads();
    const CERow row = rk;
    if (k.a.grad.data) {
      k.pass2(r, row, 0, V);
      __syncthreads();  // the target column's pass-2 store comes first
      if (threadIdx.x == 0) k.fix_target(r, row);
    }
    __syncthreads();  // every thread has read rk before the next row writes it
  }
}

// Split rows, kernel 1: block (r, s) writes the state of slice s of row r;
// the block holding the target column saves its logit.
template <class T, bool SC, bool SP>
__global__ void __launch_bounds__(kMaxThreads, 2) ce_part(CEK<T, SC, SP> k, Part* parts, double* xts,
                                                       int64_t slice) {
  typedef typename Compute<T>::type C;
  __shared__ Acc<C> sh[kMaxWarps];
  const int64_t V = k.a.logits.cols, S = gridDim.y, s = blockIdx.y;
  const int64_t c0 = s * slice, c1 = c0 + slice < V ? c0 + slice : V;
  for (int64_t r = blockIdx.x; r < k.a.logits.rows; r += gridDim.x) {
    int64_t t;
    const int st = k.status(r, &t);
    if (k.need_pass1(st)) {
      const Acc<C> acc = block_reduce(k.partial(r, c0, c1), k.tr.k, sh);
      if (threadIdx.x == 0) parts[r * S + s] = to_part(acc);
    }
    if (threadIdx.x == 0 && t >= c0 && t < c1) xts[r] = k.x_t(r, st, t);
  }
}

// Split rows, kernel 2: merge the row's parts; slice 0 writes the per-row
// outputs; each block writes the gradient of its slice (gridDim.y is 1
// without a gradient).
template <class T, bool SC, bool SP>
__global__ void __launch_bounds__(kMaxThreads, 2) ce_finish(CEK<T, SC, SP> k, const Part* parts,
                                                         const double* xts, int S, int64_t slice) {
  typedef typename Compute<T>::type C;
  __shared__ Acc<C> sh[kMaxWarps];
  __shared__ CERow rk;
  const int64_t V = k.a.logits.cols, s = blockIdx.y;
  const int64_t c0 = s * slice, c1 = c0 + slice < V ? c0 + slice : V;
  for (int64_t r = blockIdx.x; r < k.a.logits.rows; r += gridDim.x) {
    int64_t t;
    const int st = k.status(r, &t);
    Acc<C> acc = acc_empty<C>();
    if (k.need_pass1(st)) acc = merge_parts(parts + r * S, S, k.tr.k, sh);
    if (threadIdx.x == 0) rk = k.finish(r, st, t, acc, st == 0 && t >= 0 ? xts[r] : 0.0, s == 0);
    __syncthreads();
    const CERow row = rk;
    if (k.a.grad.data) {
      k.pass2(r, row, c0, c1);
      __syncthreads();
      if (threadIdx.x == 0 && row.t >= c0 && row.t < c1) k.fix_target(r, row);
    }
    __syncthreads();
  }
}

template <class T, bool SC, bool SP>
cudaError_t enqueue(const CEArgs& a, const Launch& l) {
  typedef typename Compute<T>::type C;
  const int64_t n = a.logits.rows, V = a.logits.cols;
  const bool prob = a.probs.data != nullptr;
  const CESpread cs = ce_spread(prob, a.smoothing, V);
  const Spread<C> sp{(C)cs.q_scale, (C)cs.uniform, (const C*)a.class_weight};
  const CEK<T, SC, SP> k{a, Tr<C, SC>(a.tr), sp, prob ? 0.0 : 1.0 - a.smoothing,
                         // sum_j t_j from the rounded t_j the kernels use, so gradient rows sum to 0
                         SP && !prob ? (double)sp.uk * (double)V : 0.0,
                         SP && !prob && a.class_weight};
  const Plan p = make_plan(n, V, (int)sizeof(T), l.sm_count);
  const cudaStream_t st = (cudaStream_t)l.stream;
  if (p.split == 1) {
    ce_rows<T, SC, SP><<<p.grid_rows, p.threads, 0, st>>>(k);
  } else {
    Part* parts = (Part*)l.scratch;
    double* xts = (double*)((char*)l.scratch + parts_bytes(p, n));
    ce_part<T, SC, SP><<<dim3(p.grid_rows, p.split), p.threads, 0, st>>>(k, parts, xts, p.slice);
    ce_finish<T, SC, SP><<<dim3(p.grid_rows, a.grad.data ? p.split : 1), p.threads, 0, st>>>(
        k, parts, xts, p.split, p.slice);
  }
  return cudaGetLastError();
}

template <class T, bool SC>
cudaError_t by_spread(const CEArgs& a, const Launch& l) {
  // Spread targets: probabilities, or class ids with label smoothing.
  if (a.probs.data || a.smoothing != 0.0) return enqueue<T, SC, true>(a, l);
  return enqueue<T, SC, false>(a, l);
}

}  // namespace

size_t scratch(const CEArgs& a, int sm_count) {
  const int64_t n = a.logits.rows;
  if (n == 0 || a.logits.cols == 0) return 0;
  const Plan p = make_plan(n, a.logits.cols, (int)item_size(a.logits.dtype), sm_count);
  return p.split > 1 ? parts_bytes(p, n) + (size_t)n * sizeof(double) : 0;
}

int launch(const CEArgs& a, const Launch& l) {
  if (a.logits.rows == 0 || a.logits.cols == 0) return (int)cudaSuccess;
  cudaError_t e = cudaSuccess;
  with_dtype(a.logits.dtype, [&](auto* tag) {
    typedef std::remove_pointer_t<decltype(tag)> T;
    e = softcaps<typename Compute<T>::type>(a.tr) ? by_spread<T, true>(a, l) : by_spread<T, false>(a, l);
  });
  return (int)e;
}

int take_status(void* stream, unsigned long long* count, unsigned long long* first_row) {
  return take_record(g_bad, stream, count, first_row);
}

}  // namespace cuda
}  // namespace lmxent
