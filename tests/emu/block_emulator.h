// A CUDA thread block on the host, for testing the block algorithms of
// cuda/decoding_block.h without a GPU. Each thread of the block is a fiber
// (ucontext) on the calling thread; sync() is a barrier: every fiber runs
// until it reaches the barrier (or ends), then the next phase starts, the
// fibers taken in a new pseudo-random order each phase, so that a result
// depending on the order of threads between barriers changes with the seed.
// A barrier that some threads skip (a divergent __syncthreads, undefined on a
// GPU) is an error. reduce() and scan() merge in thread order through a
// shared slot per thread; atomics are plain (fibers never interleave inside one).
// Shared memory starts as garbage, as on a GPU.
#pragma once
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

#include <functional>
#include <stdexcept>
#include <vector>

namespace lmxent {
namespace emu {

class Emulator;

// The block type of decoding_block.h.
struct EmuBlock {
  Emulator* e;
  int t;
  int tid() const { return t; }
  inline int size() const;
  inline void sync() const;
  inline uint64_t* words() const;
  uint64_t atomic_add(uint64_t* p, uint64_t v) const { const uint64_t o = *p; *p = o + v; return o; }
  uint32_t atomic_add(uint32_t* p, uint32_t v) const { const uint32_t o = *p; *p = o + v; return o; }
  uint32_t exchange(uint32_t* p, uint32_t v) const { const uint32_t o = *p; *p = v; return o; }
  template <class S, class M>
  S reduce(S v, M merge) const;
  template <class S>
  S scan(S v, S* total) const;
};

class Emulator {
 public:
  static constexpr size_t kStack = 256 << 10;
  static constexpr size_t kSlot = 64;  // bytes per thread for reduce/scan

  Emulator(int threads, int words, uint64_t seed)
      : threads_(threads), words_(words, 0xa5a5a5a5a5a5a5a5ull), slots_(threads * kSlot, 0xa5), seed_(seed | 1) {}

  // Runs body(block) in every thread of the block; returns the barriers passed.
  int64_t run(const std::function<void(EmuBlock&)>& body) {
    body_ = &body;
    std::vector<std::vector<char>> stacks(threads_, std::vector<char>(kStack));
    ctx_.assign(threads_, ucontext_t());
    state_.assign(threads_, kReady);
    for (int t = 0; t < threads_; ++t) {
      getcontext(&ctx_[t]);
      ctx_[t].uc_stack.ss_sp = stacks[t].data();
      ctx_[t].uc_stack.ss_size = kStack;
      ctx_[t].uc_link = &main_;
      makecontext(&ctx_[t], (void (*)())entry, 2, (int)((uintptr_t)this >> 32), (int)(uintptr_t)this);
    }
    std::vector<int> order(threads_);
    int64_t barriers = 0;
    for (;;) {
      for (int t = 0; t < threads_; ++t) order[t] = t;
      for (int t = threads_ - 1; t > 0; --t) {  // Fisher-Yates with xorshift64
        seed_ ^= seed_ << 13, seed_ ^= seed_ >> 7, seed_ ^= seed_ << 17;
        const int s = (int)(seed_ % (uint64_t)(t + 1));
        const int x = order[t];
        order[t] = order[s];
        order[s] = x;
      }
      for (int t : order) {
        current_ = t;
        swapcontext(&main_, &ctx_[t]);
      }
      int waiting = 0, done = 0;
      for (int t = 0; t < threads_; ++t) (state_[t] == kWaiting ? waiting : done) += 1;
      if (done == threads_) return barriers;
      if (done) throw std::logic_error("block emulator: a barrier reached by some threads only");
      for (int t = 0; t < threads_; ++t) state_[t] = kReady;
      ++barriers;
    }
  }

 private:
  friend struct EmuBlock;
  enum State { kReady, kWaiting, kDone };

  static void entry(int hi, int lo) {
    Emulator* e = (Emulator*)(((uintptr_t)(uint32_t)hi << 32) | (uintptr_t)(uint32_t)lo);
    const int t = e->current_;
    EmuBlock b{e, t};
    (*e->body_)(b);
    e->state_[t] = kDone;  // returns to main_ (uc_link)
  }
  void wait(int t) {
    state_[t] = kWaiting;
    swapcontext(&ctx_[t], &main_);
  }

  int threads_;
  std::vector<uint64_t> words_;
  std::vector<unsigned char> slots_;
  uint64_t seed_;
  const std::function<void(EmuBlock&)>* body_ = nullptr;
  std::vector<ucontext_t> ctx_;
  std::vector<State> state_;
  ucontext_t main_;
  int current_ = 0;

 public:
  unsigned char* slot(int t) { return slots_.data() + t * kSlot; }
};

inline int EmuBlock::size() const { return e->threads_; }
inline void EmuBlock::sync() const { e->wait(t); }
inline uint64_t* EmuBlock::words() const { return e->words_.data(); }

template <class S, class M>
S EmuBlock::reduce(S v, M merge) const {
  static_assert(sizeof(S) <= Emulator::kSlot, "a reduced state's size");
  memcpy(e->slot(t), &v, sizeof(S));
  sync();
  memcpy(&v, e->slot(0), sizeof(S));
  for (int i = 1; i < size(); ++i) {
    S w;
    memcpy(&w, e->slot(i), sizeof(S));
    v = merge(v, w);
  }
  sync();
  return v;
}

template <class S>
S EmuBlock::scan(S v, S* total) const {
  memcpy(e->slot(t), &v, sizeof(S));
  sync();
  S before = 0, all = 0;
  for (int i = 0; i < size(); ++i) {
    S w;
    memcpy(&w, e->slot(i), sizeof(S));
    if (i == t) before = all;
    all += w;
  }
  sync();
  *total = all;
  return before;
}

}  // namespace emu
}  // namespace lmxent
