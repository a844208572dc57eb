// The output pool (see output_pool.h). A block is reused for a request of up
// to a quarter less than its size, so that outputs whose token count varies a
// little between steps still find one; the smallest fitting block is taken.
// Blocks are mapped from the OS directly, never from malloc's heap, so that a
// freed block really goes back (and its huge-page advice with it).
#include "output_pool.h"

#include <stdint.h>
#include <sys/mman.h>

#include <deque>
#include <mutex>
#include <new>

namespace lmxent {
namespace cpu {
namespace {

// n bytes (a multiple of kPoolAlign) at a kPoolAlign-aligned address: map
// kPoolAlign more and unmap the unaligned head and the rest of the tail.
void* map_block(size_t n) {
  void* m = mmap(nullptr, n + kPoolAlign, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  const uintptr_t a = (uintptr_t)m, p = (a + kPoolAlign - 1) / kPoolAlign * kPoolAlign;
  if (p > a) munmap(m, p - a);
  if (p + n < a + n + kPoolAlign) munmap((void*)(p + n), a + n + kPoolAlign - (p + n));
#if defined(MADV_HUGEPAGE)
  madvise((void*)p, n, MADV_HUGEPAGE);  // fewer faults and TLB misses; advice only
#endif
  return (void*)p;
}

void unmap_block(const PoolBlock& b) { munmap(b.p, b.n); }

struct Pool {
  std::mutex mu;
  std::deque<PoolBlock> idle;  // newest first
  size_t idle_bytes = 0, limit = 0;

  void trim() {  // under mu
    while (idle_bytes > limit) {
      idle_bytes -= idle.back().n;
      unmap_block(idle.back());
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

PoolBlock pool_take(size_t bytes) {
  if (bytes == 0 || bytes > SIZE_MAX / 2) return {nullptr, 0};
  const size_t n = (bytes + kPoolAlign - 1) / kPoolAlign * kPoolAlign;
  Pool& pl = pool();
  {
    std::lock_guard<std::mutex> lock(pl.mu);
    auto best = pl.idle.end();
    for (auto it = pl.idle.begin(); it != pl.idle.end(); ++it)
      if (it->n >= n && it->n - n <= it->n / 4 && (best == pl.idle.end() || it->n < best->n)) best = it;
    if (best != pl.idle.end()) {
      const PoolBlock b = *best;
      pl.idle.erase(best);
      pl.idle_bytes -= b.n;
      return b;
    }
  }
  return {map_block(n), n};
}

void pool_give(PoolBlock b) noexcept {
  Pool& pl = pool();
  std::lock_guard<std::mutex> lock(pl.mu);
  if (b.n > pl.limit) {  // would push out every other block
    unmap_block(b);
    return;
  }
  try {
    pl.idle.push_front(b);
  } catch (const std::bad_alloc&) {
    unmap_block(b);
    return;
  }
  pl.idle_bytes += b.n;
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
