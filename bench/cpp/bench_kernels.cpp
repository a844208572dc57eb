// The CPU kernels (cpp/cpu/kernels.h, lmxent::cpu::run) timed directly with Google
// Benchmark, without Python, NumPy or the bindings in the way: logsumexp,
// log_softmax, cross_entropy forward, cross_entropy with its gradient into a
// separate buffer and in place, and a memcpy of the same bytes as the baseline,
// for (4096, 32000) and (1024, 128256) in float32 and bfloat16, and (32, 32000),
// which stays in the caches and so shows the kernels' compute rate alone.
//
// Bytes processed: ops that only read the logits count them once; ops that
// write a V-sized output count one read and one write, like the memcpy. Google
// Benchmark prints them as bytes_per_second in units of 2^30 (G/s). Times are
// wall-clock (UseRealTime): the kernels run on lmxent's thread pool.
//
// Build (off by default; needs Google Benchmark, e.g. Debian's libbenchmark-dev):
//   cmake -S . -B build/bench -G Ninja -DLMXENT_CUDA=OFF -DLMXENT_BENCH=ON
//         -Dpybind11_DIR=$(python3 -m pybind11 --cmakedir) -DPython_EXECUTABLE=$(which python3)
//   ninja -C build/bench bench_kernels
// Run (Google Benchmark flags as usual; names are op/dtype/NxV):
//   build/bench/bench_kernels [--isa=base|avx2|avx512] [--benchmark_filter=4096x32000]
// The ISA is the one lmxent picks at load time (LMXENT_ISA=name in the
// environment caps it), or exactly the one given by --isa; LMXENT_NUM_THREADS
// (or OMP_NUM_THREADS) sets the threads. Both are printed in the context header.
// Debian's package warns "Library was built as DEBUG": that is Google Benchmark
// itself; the kernels are the -O3 per-ISA objects of the Python module.
//
// bench/bench_cross_entropy.py is the benchmark that compares lmxent with torch
// and NumPy and checks every result against the float64 reference.
#include <benchmark/benchmark.h>
#include <stdio.h>
#include <string.h>

#include <memory>
#include <string>
#include <vector>

#include "../../cpp/cpu/kernels.h"
#include "../../cpp/cpu/thread_pool.h"

namespace {

using lmxent::DType;
using lmxent::View2D;

struct Shape {
  int64_t rows, cols;
};

// float -> bfloat16 bits, rounded to nearest even (inputs here are finite).
uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

// The inputs of one (shape, dtype): logits, a second buffer of their size (the
// separate output, the in-place gradient's copy, the memcpy target), targets
// and per-row results. Half a gigabyte each for float32, so only the case
// being run is kept; benchmarks are registered grouped by case.
struct Case {
  Shape s;
  DType dt;
  std::vector<char> x, out;
  std::vector<int64_t> targets;
  std::vector<float> loss, lse;

  size_t bytes() const { return x.size(); }
  View2D view(void* data) const {
    View2D v;
    v.data = data;
    v.rows = s.rows;
    v.cols = s.cols;
    v.stride = s.cols;
    v.dtype = dt;
    return v;
  }
};

// Logits uniform in [-8, 8) from a counter hash (fast to fill in parallel; the
// kernels' speed does not depend on the values), targets uniform in [0, V).
Case& get_case(Shape s, DType dt) {
  static std::unique_ptr<Case> c;
  if (c && c->s.rows == s.rows && c->s.cols == s.cols && c->dt == dt) return *c;
  c.reset();  // free the previous case first
  c.reset(new Case{s, dt, {}, {}, {}, {}, {}});
  const int64_t n = s.rows * s.cols;
  const size_t item = dt == DType::F32 ? 4 : 2;
  c->x.resize(n * item);
  c->out.resize(n * item);
  auto hash = [](uint64_t z) {  // splitmix64
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  float* xf = (float*)c->x.data();
  uint16_t* xb = (uint16_t*)c->x.data();
  lmxent::cpu::parallel_tasks(lmxent::cpu::num_threads(), [&](int t, int nt) {
    for (int64_t i = n * t / nt; i < n * (t + 1) / nt; ++i) {
      const float v = (float)(hash(i) >> 40) * (16.0f / (1 << 24)) - 8.0f;
      if (dt == DType::F32) xf[i] = v; else xb[i] = to_bf16(v);
    }
  });
  c->targets.resize(s.rows);
  for (int64_t r = 0; r < s.rows; ++r) c->targets[r] = (int64_t)(hash(~r) % (uint64_t)s.cols);
  c->loss.resize(s.rows);
  c->lse.resize(s.rows);
  return *c;
}

enum class Op { Memcpy, Logsumexp, LogSoftmax, CrossEntropy, CEGrad, CEGradInplace };

struct OpInfo {
  Op op;
  const char* name;
  int passes;  // 1: reads the logits; 2: also writes a V-sized output
};

const OpInfo kOps[] = {
    {Op::Memcpy, "memcpy", 2},
    {Op::Logsumexp, "logsumexp", 1},
    {Op::LogSoftmax, "log_softmax", 2},
    {Op::CrossEntropy, "cross_entropy", 1},
    {Op::CEGrad, "cross_entropy_grad", 2},
    {Op::CEGradInplace, "cross_entropy_grad_inplace", 2},
};

// The args the bindings would fill for lx.cross_entropy(x, t, reduction="none")
// and lx.cross_entropy_with_grad(x, t) (mean: every gradient row times 1/N).
lmxent::CEArgs ce_args(Case& c, void* logits, void* grad) {
  lmxent::CEArgs a;
  a.logits = c.view(logits);
  a.targets = c.targets.data();
  a.loss = c.loss.data();
  if (grad) {
    a.grad = c.view(grad);
    a.grad_scale = 1.0 / (double)c.s.rows;
  }
  return a;
}

void run(benchmark::State& state, OpInfo info, Shape s, DType dt) {
  Case& c = get_case(s, dt);
  void* x = c.x.data();
  void* out = c.out.data();
  lmxent::SoftmaxArgs sa;
  sa.x = c.view(x);
  if (info.op == Op::Logsumexp) sa.lse = c.lse.data();
  if (info.op == Op::LogSoftmax) {
    sa.out = c.view(out);
    sa.log = true;
  }
  // In place, the kernel overwrites its input: it runs on a copy of the
  // logits, and after the first call on the previous call's gradient (finite
  // values, the same work).
  const bool inplace = info.op == Op::CEGradInplace;
  if (inplace) memcpy(out, x, c.bytes());
  const lmxent::CEArgs ca = ce_args(c, inplace ? out : x, inplace || info.op == Op::CEGrad ? out : nullptr);
  for (auto _ : state) {
    switch (info.op) {
      case Op::Memcpy: memcpy(out, x, c.bytes()); break;
      case Op::Logsumexp:
      case Op::LogSoftmax: lmxent::cpu::run(sa); break;
      default: lmxent::cpu::run(ca);
    }
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * (int64_t)(info.passes * c.bytes()));
}

}  // namespace

int main(int argc, char** argv) {
  // --isa=NAME selects that instruction set exactly (and is taken out of argv before
  // Google Benchmark reads its own flags).
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (strncmp(argv[i], "--isa=", 6) == 0) {
      if (!lmxent::cpu::select(argv[i] + 6)) {
        fprintf(stderr, "--isa: '%s' is not available on this processor\n", argv[i] + 6);
        return 2;
      }
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;

  const int threads = lmxent::cpu::num_threads();
  benchmark::AddCustomContext("lmxent_isa", lmxent::cpu::active().isa);
  benchmark::AddCustomContext("lmxent_threads", std::to_string(threads));

  const Shape shapes[] = {{4096, 32000}, {1024, 128256}, {32, 32000}};
  const struct { DType dt; const char* name; } dtypes[] = {{DType::F32, "f32"}, {DType::BF16, "bf16"}};
  for (const Shape& s : shapes)
    for (const auto& d : dtypes)
      for (const OpInfo& op : kOps) {
        const std::string name = std::string(op.name) + "/" + d.name + "/" + std::to_string(s.rows) +
                                 "x" + std::to_string(s.cols);
        benchmark::RegisterBenchmark(name.c_str(), run, op, s, d.dt)
            ->UseRealTime()
            ->Unit(benchmark::kMillisecond);
      }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
