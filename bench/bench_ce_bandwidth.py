"""Cross-entropy and log_softmax against the memory: lmxent, torch and a copy (or a
read) of the same bytes on the same threads, timed in one process, interleaved.

Each round times every implementation once, in turn, so that load from other jobs
on a shared machine falls on all of them alike; a figure is the median over the
rounds, with its spread (min-max), and each ratio is the median of the per-round
ratios. The output-cache-off row runs in rounds of its own (with the copy): turning
the cache off frees the block the cached rows reuse. This is the harness of the
"against the memory" table of docs/benchmarks.md.

  copy   the logits copied into an already touched array (one read, one write),
         split in row blocks over the same number of Python threads (np.copyto
         releases the GIL): the floor of an op that reads and writes every logit
  read   the logits reduced (np.bitwise_or over their bits) in the same blocks:
         the floor of an op that reads every logit once

Rows (for each dtype and V, N x V ~ 2^27 logits):
  fused        lx.cross_entropy_with_grad, a new gradient each call (output cache on)
  fused nocache  the same with lx.set_output_cache(0): fresh pages every call
  forward      lx.cross_entropy (mean loss)
  log_softmax  lx.log_softmax into a new array (output cache on)
  torch ...    F.cross_entropy + backward (x.grad reset each call), F.cross_entropy,
               torch.log_softmax, on torch.set_num_threads(threads)

  python bench/bench_ce_bandwidth.py --threads 2 --rounds 7
  python bench/bench_ce_bandwidth.py --threads 1 --vocab 32000 --dtypes float32
"""
import argparse
import sys
import threading
import time

import numpy as np

import lmxent as lx
from lmxent import reference as ref


def blocks(n, k):
    return [(n * i // k, n * (i + 1) // k) for i in range(k)]


def threaded(k, fn, n):
    """fn(r0, r1) over k row blocks of n rows, on k threads (the caller runs one)."""
    parts = blocks(n, k)
    if k == 1:
        return lambda: fn(*parts[0])

    def run():
        ts = [threading.Thread(target=fn, args=b) for b in parts[1:]]
        for t in ts:
            t.start()
        fn(*parts[0])
        for t in ts:
            t.join()
    return run


def make(dtype, n, v, threads, torch):
    rng = np.random.default_rng(0)
    x32 = (rng.standard_normal((n, v), dtype=np.float32) * 2).astype(np.float32)
    t = rng.integers(0, v, n).astype(np.int64)
    if dtype == "bfloat16":
        import ml_dtypes
        x = x32.astype(ml_dtypes.bfloat16)
    else:
        x = x32
    del x32
    dst = np.empty_like(x)
    dst[...] = x
    bits = x.view(np.uint16 if x.itemsize == 2 else np.uint32)
    impls = {
        "copy": threaded(threads, lambda a, b: np.copyto(dst[a:b], x[a:b]), n),
        "read": threaded(threads, lambda a, b: np.bitwise_or.reduce(bits[a:b], axis=None), n),
        "fused": lambda: lx.cross_entropy_with_grad(x, t),
        "forward": lambda: lx.cross_entropy(x, t),
        "log_softmax": lambda: lx.log_softmax(x),
    }

    def nocache():
        old = lx.set_output_cache(0)
        try:
            return lx.cross_entropy_with_grad(x, t)
        finally:
            lx.set_output_cache(old)
    impls["fused nocache"] = nocache
    impls["_t"] = t
    if torch is not None:
        import torch.nn.functional as F
        tx = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) if dtype == "bfloat16" \
            else torch.from_numpy(x)
        tt = torch.from_numpy(t)
        leaf = tx.clone().requires_grad_(True)

        def tfused():
            leaf.grad = None
            F.cross_entropy(leaf, tt).backward()
            return leaf.grad
        impls.update({"torch fused": tfused,
                      "torch forward": lambda: F.cross_entropy(tx, tt),
                      "torch log_softmax": lambda: torch.log_softmax(tx, -1)})
    return x, impls


def check(x, t, impls):
    """lmxent's results on the first and last rows against the float64 reference
    (per-row gradients of the mean are the reference's over N); raises if wrong."""
    n, rows = len(t), [0, 1, len(t) - 1]
    x64, tr = x[rows].astype(np.float64), t[rows]
    tol = 2e-6 if x.dtype == np.float32 else 2e-2  # a few units of the output dtype
    loss, g = impls["fused"]()
    want = ref.cross_entropy_with_grad(x64, tr, reduction="sum")[1]
    got = {"fused": g[rows].astype(np.float64) * n,
           "log_softmax": impls["log_softmax"]()[rows].astype(np.float64)}
    want = {"fused": want, "log_softmax": ref.log_softmax(x64)}
    for k in got:
        err = np.max(np.abs(got[k] - want[k])) / max(1.0, np.max(np.abs(want[k])))
        if not err < tol:
            raise SystemExit(f"lmxent {k} is WRONG on {x.shape} {x.dtype}: error {err:.2g}")
    fwd = float(impls["forward"]())
    if not abs(fwd - float(loss)) <= 1e-5 * max(1.0, abs(float(loss))):
        raise SystemExit(f"lmxent forward {fwd} differs from the fused loss {float(loss)}")


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    dt = time.perf_counter() - t0
    del r  # released after the clock stops (the output cache takes it back)
    return dt


# (row, its floor, its ratio to torch's row)
ROWS = [("fused", "copy", "torch fused"), ("fused nocache", "copy", "torch fused"),
        ("forward", "read", "torch forward"), ("log_softmax", "copy", "torch log_softmax")]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench_ce_bandwidth.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--vocab", nargs="+", type=int, default=[32000, 128256, 262144])
    ap.add_argument("--elems", type=float, default=2 ** 27, help="N x V, about")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--only", nargs="+", help="rows to time (and their floors)")
    a = ap.parse_args(argv)
    torch = None
    if not a.no_torch:
        try:
            import torch
            torch.set_num_threads(a.threads)
        except ImportError:
            pass
    lx.set_num_threads(a.threads)
    print(f"lmxent {lx.cpu_info()}, threads {a.threads}, torch "
          f"{torch.__version__ if torch else '-'}, {a.rounds} rounds; ms median [min-max]")
    for dtype in a.dtypes:
        for v in a.vocab:
            n = max(1, int(a.elems) // v)
            x, impls = make(dtype, n, v, a.threads, torch)
            check(x, impls.pop("_t"), impls)
            if a.only:
                keep = set(a.only) | {"copy", "read"}
                impls = {k: f for k, f in impls.items() if k in keep or k.startswith("torch") and
                         any(k == r[2] and r[0] in keep for r in ROWS)}
            times = {k: [] for k in impls}
            phases = [[k for k in impls if k != "fused nocache"], ["copy", "fused nocache"]]
            for phase in phases:
                phase = [k for k in phase if k in impls]
                if len(phase) < 2:
                    continue
                for k in phase:
                    timed(impls[k])  # warm-up
                for _ in range(a.rounds):
                    for k in phase:
                        times[k].append(timed(impls[k]))
            ms = {k: np.array(v) * 1e3 for k, v in times.items()}
            # the copy's rounds of the second phase pair with the uncached row
            copy2 = ms["copy"][a.rounds:]
            ms["copy"] = ms["copy"][:a.rounds]
            print(f"{n}x{v} {dtype} ({x.nbytes / 1e6:.0f} MB): copy "
                  f"{np.median(ms['copy']):.1f} [{ms['copy'].min():.1f}-{ms['copy'].max():.1f}], "
                  f"read {np.median(ms['read']):.1f} [{ms['read'].min():.1f}-{ms['read'].max():.1f}]")
            for row, floor, peer in ROWS:
                if row not in ms:
                    continue
                t = ms[row]
                fl = copy2 if row == "fused nocache" else ms[floor]
                line = f"  {row:14s} {np.median(t):7.1f} [{t.min():.1f}-{t.max():.1f}]  " \
                       f"{np.median(fl / t) * 100:4.0f}% of {floor} " \
                       f"[{(fl / t).min() * 100:.0f}-{(fl / t).max() * 100:.0f}]"
                if peer in ms:
                    r = ms[peer] / t
                    line += f"  {np.median(r):5.1f}x torch [{r.min():.1f}-{r.max():.1f}] " \
                            f"(torch {np.median(ms[peer]):.0f} ms)"
                print(line, flush=True)
            del x, impls
    return 0


if __name__ == "__main__":
    sys.exit(main())
