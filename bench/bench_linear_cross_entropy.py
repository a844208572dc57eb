"""The LM head on the CPU: lmxent.linear_cross_entropy (chunked, no logits) against
the paths that materialise the logits, torch eager, and the three matrix products
alone.

Implementations (mean cross-entropy of hidden @ weight.T; loss, d_hidden, d_weight):

  lmxent       lx.linear_cross_entropy at the default chunk (or --chunk-rows)
  naive NumPy  logits = h @ W.T, a NumPy log-sum-exp / softmax gradient, g @ W, g.T @ h
  logits+lx    logits = h @ W.T, lx.cross_entropy_with_grad(inplace=True), g @ W, g.T @ h
               (the lean materialised path: one N x V array)
  torch        F.cross_entropy(h @ W.T, t).backward() (eager, float32, same threads)
  3 matmuls    h @ W.T, Z @ W, Z.T @ h into preallocated outputs: the work no LM head
               can avoid; the issue's time target is 1.15x of this

Every implementation is checked first, on the timed inputs, against a float64
reference computed chunk by chunk (the loss; d_hidden of the first tokens; d_weight
of some vocabulary rows); a wrong result is reported and not timed.

Memory: the peak resident set (VmHWM, reset through /proc/self/clear_refs) during
one call, minus the resident set before it: every allocation (NumPy, torch, the
outputs) that the call touched, the same way for every implementation. Memory that
malloc and lmxent's output cache hold for reuse is released first, so that reusing
it counts. "working" is
that peak minus the call's outputs (d_hidden, d_weight), which every path returns.
The first call (the check) is the warm-up; the time is the best of --repeats calls
taken round robin over the implementations (this machine's load varies); the
memory is measured in the last of them.

    python bench/bench_linear_cross_entropy.py              # 4096 x 512 x {32000, 128256}
    python bench/bench_linear_cross_entropy.py --quick      # one small shape
    python bench/bench_linear_cross_entropy.py --sweep 64,128,512,1024   # chunk rows
    OPENBLAS_NUM_THREADS=1 python bench/bench_linear_cross_entropy.py --threads 1
"""
import argparse
import ctypes
import gc
import os
import platform
import sys
import time
from functools import partial

import numpy as np

import lmxent as lx
from lmxent import reference as R
from lmxent.bench import dtypes_from_names, write_json
from lmxent.linear_cross_entropy import MIN_CHUNK_ROWS, default_chunk_rows

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # torch is an optional peer
    torch = None

MiB = 1 << 20


# ---- measuring ---------------------------------------------------------------

def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_rss(fn):
    """(fn(), peak resident bytes during fn beyond those resident before), or None for
    the bytes where /proc/self/clear_refs is not available (not Linux)."""
    gc.collect()
    try:  # hand freed heap memory back first, so that reusing it counts as growth
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    lx.set_output_cache(lx.set_output_cache(0))  # the same for lmxent's output cache
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        before = _status("VmRSS")
    except OSError:
        return fn(), None
    out = fn()
    return out, _status("VmHWM") - before


def wall_time(fn):
    """(wall seconds, CPU seconds of this process) of one call. With one thread the
    CPU time is the work done, whatever else the machine runs; spinning BLAS and
    OpenMP threads inflate it with more."""
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


# ---- implementations ------------------------------------------------------------

def naive_numpy(h, W, t):
    z = h @ W.T
    m = z.max(axis=1, keepdims=True)
    g = z - m
    np.exp(g, out=g)
    s = g.sum(axis=1, keepdims=True)
    rows = np.arange(len(t))
    loss = np.mean(np.log(s[:, 0]) + m[:, 0] - z[rows, t], dtype=np.float64)
    del z
    g /= s * len(t)
    g[rows, t] -= 1.0 / len(t)
    return loss, (g @ W, g.T @ h)


def logits_lmxent(h, W, t):
    z = h @ W.T
    loss, g = lx.cross_entropy_with_grad(z, t, inplace=True)
    return loss, (g @ W, g.T @ h)


def torch_eager(ht, Wt, tt):
    ht.grad = Wt.grad = None
    loss = F.cross_entropy(ht @ Wt.T, tt)
    loss.backward()
    return loss, (ht.grad, Wt.grad)


def three_matmuls(h, W, Z, dh, dW):
    np.matmul(h, W.T, out=Z)
    np.matmul(Z, W, out=dh)
    np.matmul(Z.T, h, out=dW)


# ---- checking -------------------------------------------------------------------

def as64(a):
    if torch is not None and isinstance(a, torch.Tensor):
        a = a.detach().float().numpy()
    return np.asarray(a, dtype=np.float64)


def reference_parts(h, W, t, k, vocab_rows):
    """Float64 loss, d_hidden[:k] and d_weight[vocab_rows] of the mean cross-entropy,
    computed without the full logits (the LSE of every token, chunk by chunk)."""
    N = len(t)
    h64, W64 = h.astype(np.float64), W.astype(np.float64)
    lse = np.empty(N)
    for s in range(0, N, 256):
        lse[s:s + 256] = R.logsumexp(h64[s:s + 256] @ W64.T)
    loss = float(np.mean(lse - np.einsum("nd,nd->n", h64, W64[t])))
    dh = R.linear_cross_entropy(h64[:k], W64, t[:k], normalizer=N)[1][0]
    zJ = h64 @ W64[vocab_rows].T
    gJ = (np.exp(zJ - lse[:, None]) - (t[:, None] == vocab_rows[None, :])) / N
    return loss, dh, gJ.T @ h64


def check(res, want, k, vocab_rows, low):
    loss, (dh, dW) = res[0], res[1][:2]  # lmxent also returns d_bias (None)
    rloss, rdh, rdW = want
    errs = [abs(float(as64(loss)) - rloss) / max(1.0, abs(rloss)),
            float(np.max(np.abs(as64(dh)[:k] - rdh)) / np.max(np.abs(rdh))),
            float(np.max(np.abs(as64(dW)[vocab_rows] - rdW)) / np.max(np.abs(rdW)))]
    tol = 2e-2 if low else 1e-4  # relative to the largest element
    return max(errs) <= tol, max(errs)


# ---- one shape ------------------------------------------------------------------

def bench_shape(N, D, V, dtype, repeats, chunk_rows, sweep, skip):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((N, D), dtype=np.float32).astype(dtype)
    W = (rng.standard_normal((V, D), dtype=np.float32) / np.sqrt(D) * 2).astype(dtype)
    t = rng.integers(0, V, N)
    k, vocab_rows = min(N, 32), np.unique(np.concatenate([t[:8], rng.integers(0, V, 24)]))
    low = dtype != np.float32
    want = reference_parts(h, W, t, k, vocab_rows)
    lmx_rows = chunk_rows or default_chunk_rows(h, W)
    out_bytes = h.nbytes + W.nbytes

    impls = {"lmxent": lambda: lx.linear_cross_entropy(h, W, t, chunk_size=chunk_rows)}
    if dtype == np.float32:  # NumPy has no BLAS for 16-bit
        impls["naive NumPy"] = lambda: naive_numpy(h, W, t)
        impls["logits+lx"] = lambda: logits_lmxent(h, W, t)
    if torch is not None:
        to_t = (lambda a: torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)) if low \
            else torch.from_numpy
        ht, Wt = to_t(h).clone().requires_grad_(True), to_t(W).clone().requires_grad_(True)
        tt = torch.from_numpy(t)
        impls["torch"] = lambda: torch_eager(ht, Wt, tt)
    impls = {n: f for n, f in impls.items() if n not in skip}
    for c in sweep:
        impls[f"lmxent chunk {c}"] = lambda c=c: lx.linear_cross_entropy(h, W, t, chunk_size=c)
    rows = {}
    for name, fn in impls.items():  # check; also the warm-up
        ok, err = check(fn(), want, k, vocab_rows, low)
        rows[name] = dict(impl=name, status="ok" if ok else "WRONG", max_rel_err=err)
        print(f"  {name}: {'ok' if ok else 'WRONG'} (max relative error {err:.1e})", flush=True)
    timed = {n: f for n, f in impls.items() if rows[n]["status"] == "ok"}
    if dtype == np.float32:
        Z, dh, dW = np.empty((N, V), np.float32), np.empty_like(h), np.empty_like(W)
        timed["3 matmuls"] = lambda: three_matmuls(h, W, Z, dh, dW)
        timed["3 matmuls"]()  # warm-up; the pages of Z are touched
        rows["3 matmuls"] = dict(impl="3 matmuls", status="ok", note="outputs preallocated",
                                 peak_bytes=None, working_bytes=Z.nbytes)
    # Round robin, so that a change in the machine's load hits every implementation;
    # the memory is measured in the last round (after the warm-up: a first call also
    # allocates the BLAS and thread pools' buffers).
    times = {n: [] for n in timed}
    for r in range(repeats):
        for name, fn in timed.items():
            if r < repeats - 1 or name == "3 matmuls":
                times[name].append(wall_time(fn))
                continue
            s, peak = peak_rss(partial(wall_time, fn))
            times[name].append(s)  # (wall, cpu)
            rows[name].update(peak_bytes=peak,
                              working_bytes=None if peak is None else peak - out_bytes)
    for name, ts in times.items():
        rows[name]["seconds"] = min(w for w, _ in ts)
        rows[name]["cpu_seconds"] = min(c for _, c in ts)
        print(f"  {name}: {rows[name]['seconds']:.3f} s (CPU {rows[name]['cpu_seconds']:.3f} s), "
              f"peak {fmt_mib(rows[name]['peak_bytes'])}", flush=True)
    swept = [dict(rows.pop(f"lmxent chunk {c}"), chunk_rows=c) for c in sweep]
    rows = list(rows.values())
    by = {r["impl"]: r for r in rows if r["status"] == "ok"}
    ratios = {}
    if "lmxent" in by:
        me = by["lmxent"]
        for name, r in by.items():
            if name != "lmxent":
                ratios[f"time_vs_{name}"] = me["seconds"] / r["seconds"]
                ratios[f"cpu_time_vs_{name}"] = me["cpu_seconds"] / r["cpu_seconds"]
                if r.get("working_bytes") and me.get("working_bytes") is not None:
                    ratios[f"working_vs_{name}"] = me["working_bytes"] / r["working_bytes"]
                if r.get("peak_bytes") and me.get("peak_bytes") is not None:
                    ratios[f"peak_vs_{name}"] = me["peak_bytes"] / r["peak_bytes"]
    return dict(shape=[N, D, V], dtype=np.dtype(dtype).name, chunk_rows=lmx_rows,
                output_bytes=out_bytes, results=rows, ratios=ratios, sweep=swept)


def fmt_mib(b):
    return "n/a" if b is None else f"{b / MiB:.0f} MiB"


def print_shape(res):
    N, D, V = res["shape"]
    print(f"\n{N} x {D} x {V} {res['dtype']}: lmxent chunk {res['chunk_rows']} rows, outputs "
          f"{fmt_mib(res['output_bytes'])}")
    print(f"  {'impl':<13}{'s':>9}{'CPU s':>9}{'peak':>11}{'working':>11}{'lmxent time':>13}"
          f"{'(CPU)':>7}{'lmxent peak':>13}{'lmxent working':>16}")
    rat = res["ratios"]
    for r in res["results"]:
        if r["status"] != "ok":
            print(f"  {r['impl']:<13} {r['status']}")
            continue
        n = r["impl"]
        tr = f"{rat[f'time_vs_{n}']:.2f}x" if f"time_vs_{n}" in rat else ""
        cr = f"{rat[f'cpu_time_vs_{n}']:.2f}x" if f"cpu_time_vs_{n}" in rat else ""
        pr = f"{rat[f'peak_vs_{n}'] * 100:.1f}%" if f"peak_vs_{n}" in rat else ""
        wr = f"{rat[f'working_vs_{n}'] * 100:.1f}%" if f"working_vs_{n}" in rat else ""
        print(f"  {n:<13}{r['seconds']:9.3f}{r['cpu_seconds']:9.3f}{fmt_mib(r['peak_bytes']):>11}"
              f"{fmt_mib(r['working_bytes']):>11}{tr:>13}{cr:>7}{pr:>13}{wr:>16}")
    base = next((r for r in res["results"] if r["impl"] == "3 matmuls"), None)
    for r in res["sweep"]:
        if r["status"] != "ok":
            print(f"  lmxent, {r['chunk_rows']} rows: {r['status']}")
            continue
        vs = (f", {r['seconds'] / base['seconds']:.2f}x the 3 matmuls (CPU "
              f"{r['cpu_seconds'] / base['cpu_seconds']:.2f}x)") if base else ""
        print(f"  lmxent, {r['chunk_rows']:5d} rows: {r['seconds']:.3f} s{vs}, peak "
              f"{fmt_mib(r['peak_bytes'])}, working {fmt_mib(r['working_bytes'])}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", default="32000,128256")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunk-rows", type=int, default=None, help="lmxent chunk (default: "
                    f"hidden-sized, at least {MIN_CHUNK_ROWS} rows)")
    ap.add_argument("--sweep", default="", help="also time lmxent at these chunk rows")
    ap.add_argument("--skip", default="", help="implementations not to run, e.g. 'naive NumPy'")
    ap.add_argument("--threads", type=int, default=None, help="lmxent and torch threads "
                    "(default: lmxent's); set OPENBLAS_NUM_THREADS for NumPy's BLAS")
    ap.add_argument("--quick", action="store_true", help="1024 x 256 x 32000, float32")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "linear_cross_entropy.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.vocab, args.dtypes = 1024, 256, "32000", "float32"
    dtypes, skipped = dtypes_from_names(args.dtypes.split(","))
    for name, why in skipped.items():
        print(f"{name} skipped: {why}")
    if args.threads is not None:
        lx.set_num_threads(args.threads)
    threads = lx.cpu_info()["threads"]
    if torch is not None:
        torch.set_num_threads(threads)
    blas_threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    info = dict(machine=platform.machine(), processor=platform.processor(),
                cpu_count=os.cpu_count(), lmxent=lx.__version__, lmxent_cpu=lx.cpu_info(),
                numpy=np.__version__, torch=torch.__version__ if torch is not None else None,
                python=sys.version.split()[0], openblas_num_threads=blas_threads,
                load_average=os.getloadavg())
    print(f"lmxent {lx.__version__} ({lx.cpu_info()['isa']}, {threads} threads), numpy "
          f"{np.__version__} (OPENBLAS_NUM_THREADS={blas_threads}), torch {info['torch']}; "
          f"load average {os.getloadavg()[0]:.1f}")
    sweep = [int(c) for c in args.sweep.split(",") if c]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results = []
    for V in (int(v) for v in args.vocab.split(",")):
        for dt in dtypes:
            print(f"\n{args.tokens} x {args.hidden} x {V} {np.dtype(dt).name} ...", flush=True)
            res = bench_shape(args.tokens, args.hidden, V, dt, args.repeats, args.chunk_rows,
                              sweep, skip)
            print_shape(res)
            results.append(res)
    info["load_average_after"] = os.getloadavg()
    path = write_json(dict(info=info, results=results), os.path.dirname(os.path.abspath(args.json)),
                      os.path.basename(args.json))
    print(f"\nwrote {path}")
    return 1 if any(r["status"] == "WRONG" for res in results for r in res["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
