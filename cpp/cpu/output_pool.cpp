// The output pool (see output_pool.h). A block is reused for a request of up
// to a quarter less than its size, so that outputs whose token count varies a
// little between steps still find one; the smallest fitting block is taken.
#include "output_pool.h"

#include <stdlib.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <deque>
#include <mutex>

namespace lmxent {
namespace cpu {
namespace {

struct Block {
  void* p;
  size_t n;
};

struct Pool {
  std::mutex mu;
  std::deque<Block> idle;  // newest first
  size_t idle_bytes = 0, limit = 0;

  void trim() {  // under mu
    while (idle_bytes > limit) {
      idle_bytes -= idle.back().n;
      free(idle.back().p);
      idle.pop_back();
    }
  }
};

// Never destroyed: an output released late in interpreter shutdown may still
// come back to it.
Pool& pool() {
  static Pool* p = new Pool;
  return *p;
}

}  // namespace

void* pool_take(size_t bytes, size_t* got) {
  const size_t n = (bytes + kPoolAlign - 1) / kPoolAlign * kPoolAlign;
  Pool& pl = pool();
  {
    std::lock_guard<std::mutex> lock(pl.mu);
    auto best = pl.idle.end();
    for (auto it = pl.idle.begin(); it != pl.idle.end(); ++it)
      if (it->n >= n && it->n - n <= it->n / 4 && (best == pl.idle.end() || it->n < best->n)) best = it;
    if (best != pl.idle.end()) {
      const Block b = *best;
      pl.idle.erase(best);
      pl.idle_bytes -= b.n;
      *got = b.n;
      return b.p;
    }
  }
  void* p = aligned_alloc(kPoolAlign, n);
  if (!p) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, n, MADV_HUGEPAGE);  // fewer faults and TLB misses; advice only
#endif
  *got = n;
  return p;
}

void pool_give(void* p, size_t bytes) {
  Pool& pl = pool();
  std::lock_guard<std::mutex> lock(pl.mu);
  if (bytes > pl.limit) {  // would push out every other block
    free(p);
    return;
  }
  pl.idle.push_front({p, bytes});
  pl.idle_bytes += bytes;
  pl.trim();
}

PoolInfo pool_info() {
  Pool& pl = pool();
  std::lock_guard<std::mutex> lock(pl.mu);
  return {pl.limit, pl.idle_bytes, pl.idle.size()};
}

size_t pool_set_limit(size_t limit) {
  Pool& pl = pool();
  std::lock_guard<std::mutex> lock(pl.mu);
  const size_t old = pl.limit;
  pl.limit = limit;
  pl.trim();
  return old;
}

}  // namespace cpu
}  // namespace lmxent
