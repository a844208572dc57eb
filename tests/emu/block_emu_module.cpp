// lmxent_block_emu: the GPU decoding kernels' algorithm (cuda/decoding_block.h)
// run on the host over an emulated block (block_emulator.h), with lmxent._cpu's
// bindings (ops.h) so that the tests call it in place of the CPU module's
// decode and top_k (tests/test_decoding_block.py). One block walks the rows in
// turn, as one block of the GPU grid does. Test-only: built by the tests
// (CMake option LMXENT_BLOCK_EMULATOR), never installed.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <type_traits>
#include <vector>

#include "../../cpp/bindings/numpy_arrays.h"
#include "../../cpp/bindings/ops.h"
#include "../../cpp/cpu/simd.h"
#include "lmxent/row_math.h"
#include "../../cuda/decoding_block.h"
#include "block_emulator.h"

namespace py = pybind11;
using lmxent::DecodeArgs;
using lmxent::TopKArgs;
using lmxent::emu::EmuBlock;
using lmxent::emu::Emulator;
namespace block = lmxent::block;
namespace cpu = lmxent::cpu;

namespace {

int g_threads = 32;     // threads of the emulated block
uint64_t g_seed = 1;    // the order of the threads between barriers
int64_t g_barriers = 0; // barriers passed by the last call
int64_t g_reads = 0;    // logits read by the last call (fibers share one OS thread)

// Runs body(block, row buffers) on one emulated block. The buffers have the
// launcher's per-block size, filled with garbage (a GPU's scratch is not
// cleared) and followed by a guard that must stay intact.
template <class F>
void emulate(int64_t bytes, F&& body) {
  // the GPU grid puts block b's buffers at b * bytes: a double there must be aligned
  if (bytes % 16) throw std::logic_error("block emulator: row buffers of a size that misaligns the next block's");
  constexpr uint64_t kGarbage = 0xa5a5a5a5a5a5a5a5ull, kGuard = 0x6c6d78656e74ull;
  const int64_t words = (bytes + 7) / 8;
  std::vector<uint64_t> scratch(words + 8, kGarbage);
  for (int i = 0; i < 8; ++i) scratch[words + i] = kGuard;
  Emulator e(g_threads, block::kWords, g_seed);
  g_reads = 0;
  unsigned char* mem = (unsigned char*)scratch.data();
  g_barriers = e.run([&](EmuBlock& b) { body(b, mem); });
  for (int i = 0; i < 8; ++i)
    if (scratch[words + i] != kGuard) throw std::out_of_range("block emulator: a write past the row buffers");
}

struct Emu : lmxent::bindings::NumpyArrays {
  static void run(const DecodeArgs& a, Call&, const char*) {
    const int64_t V = a.logits.cols;
    if (a.logits.rows == 0 || V == 0) return;
    py::gil_scoped_release nogil;
    lmxent::with_storage<cpu::f16_t, cpu::bf16_t>(a.logits.dtype, [&](auto* tag) {
      typedef std::remove_pointer_t<decltype(tag)> T;
      typedef typename cpu::Compute<T>::type C;
      emulate(block::row_bytes(a),
              [&](EmuBlock& b, unsigned char* mem) {
                for (int64_t r = 0; r < a.logits.rows; ++r) {
                  const T* x = (const T*)a.logits.data + r * a.logits.stride;
                  T* o = (T*)a.out.data + r * a.out.stride;
                  block::decode_block(
                      b, a, r, [x](int64_t j) { return ++g_reads, (double)cpu::to_compute(x[j]); },
                      [o](int64_t j, double v) { cpu::from_compute(o + j, (C)v); }, (double*)mem,
                      mem + 8 * V);
                }
              });
    });
  }
  static void run(const TopKArgs& a, Call&, const char*) {
    if (a.k == 0 || a.x.rows == 0) return;
    py::gil_scoped_release nogil;
    lmxent::with_storage<cpu::f16_t, cpu::bf16_t>(a.x.dtype, [&](auto* tag) {
      typedef std::remove_pointer_t<decltype(tag)> T;
      emulate(block::row_bytes(a), [&](EmuBlock& b, unsigned char* mem) {
        for (int64_t r = 0; r < a.x.rows; ++r) {
          const T* x = (const T*)a.x.data + r * a.x.stride;
          T* vals = (T*)a.values.data + r * a.values.stride;
          int64_t* ids = a.indices + r * a.k;
          block::top_k_block(
              b, a, r, [x](int64_t j) { return ++g_reads, (double)cpu::to_compute(x[j]); },
              [=](int64_t i, int64_t j) { vals[i] = x[j]; ids[i] = j; }, mem);
        }
      });
    });
  }
  template <class Args>
  static void run(const Args&, Call&, const char* op) {
    lmxent::bindings::fail(op, "has no block kernel to emulate");
  }
};

}  // namespace

PYBIND11_MODULE(lmxent_block_emu, m) {
  m.doc() = "The GPU decoding kernels' algorithm on an emulated block (tests only)";
  lmxent::bindings::bind_ops<Emu>(m);
  m.def("configure", [](int threads, uint64_t seed) {
    if (threads < 1 || threads > 1024) lmxent::bindings::fail("threads", "must be in [1, 1024]");
    g_threads = threads;
    g_seed = seed;
  }, "Threads of the emulated block and the seed of their order between barriers.",
        py::arg("threads"), py::arg("seed"));
  m.def("barriers", [] { return g_barriers; }, "Barriers the last call passed.");
  m.def("reads", [] { return g_reads; }, "Logits the last call read.");
}
