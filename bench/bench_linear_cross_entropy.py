"""The LM head on the CPU: lmxent.linear_cross_entropy (chunked, no logits) against
the paths that materialise the logits, torch eager, and the three matrix products
alone.

Implementations (mean cross-entropy of hidden @ weight.T; loss, d_hidden, d_weight):

  lmxent       lx.linear_cross_entropy at the default chunk (or --chunk-rows)
  naive NumPy  logits = h @ W.T, a NumPy log-sum-exp / softmax gradient, g @ W, g.T @ h
  logits+lx    logits = h @ W.T, lx.cross_entropy_with_grad(inplace=True), g @ W, g.T @ h
               (the lean materialised path: one N x V array)
  torch        F.cross_entropy(h @ W.T, t).backward() (eager, float32, same threads)
  torch chunked  F.linear_cross_entropy(h, W, t, options=LinearCrossEntropyOptions())
               (torch 2.13's chunked LM head, its default chunks), .backward()
  3 matmuls    h @ W.T, Z @ W, Z.T @ h into preallocated outputs: the work no LM head
               can avoid (float32 only)
  3 matmuls T  the same with Z @ W computed as (W.T @ Z.T) into a (D, N) output, the
               orientation lmxent uses for d_hidden (OpenBLAS threads it better)

Every implementation is checked first, on the timed inputs, against a float64
reference computed chunk by chunk (the loss; d_hidden of the first tokens; d_weight
of some vocabulary rows); a wrong result is reported and not timed.

Memory: the peak resident set (VmHWM, reset through /proc/self/clear_refs) during
one call, minus the resident set before it: every allocation (NumPy, torch, the
outputs) that the call touched, the same way for every implementation. Memory that
malloc and lmxent's output cache hold for reuse is released first, so that reusing
it counts. "working" is
that peak minus the call's outputs (d_hidden, d_weight), which every path returns.
The first call (the check) is the warm-up; the time is the median of --repeats calls
taken round robin over the implementations (this machine's load varies), with the
spread (min-max) in the JSON; the memory is measured in the last of them.

--memory (the figure of record for peak memory): every implementation, and lmxent at
each --sweep chunk, in a fresh subprocess: inputs built, one warm-up call of the same
implementation on a smaller problem (min(N, 1024) x D x min(V, 8192): BLAS's and
torch's one-off buffers), the high-water mark reset (/proc/self/clear_refs), then one
call with its outputs kept; "extra" = ru_maxrss - the resident set before the call -
the outputs' bytes (d_hidden, d_weight): the memory a method needs beyond its inputs
and outputs.

    python bench/bench_linear_cross_entropy.py              # 4096 x 512 x {32000, 128256}
    python bench/bench_linear_cross_entropy.py --quick      # one small shape
    python bench/bench_linear_cross_entropy.py --sweep 64,128,512,1024   # chunk rows
    python bench/bench_linear_cross_entropy.py --memory --sweep 64,128  # peak memory only
    OPENBLAS_NUM_THREADS=1 python bench/bench_linear_cross_entropy.py --threads 1
"""
import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
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


def torch_chunked(ht, Wt, tt):
    ht.grad = Wt.grad = None
    loss = F.linear_cross_entropy(ht, Wt, tt, options=torch.nn.LinearCrossEntropyOptions())
    loss.backward()
    return loss, (ht.grad, Wt.grad)


def three_matmuls(h, W, Z, dh, dW):
    np.matmul(h, W.T, out=Z)
    np.matmul(Z, W, out=dh)
    np.matmul(Z.T, h, out=dW)


def three_matmuls_t(h, W, Z, dh_t, dW):
    np.matmul(h, W.T, out=Z)
    np.matmul(W.T, Z.T, out=dh_t)
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

def make_problem(N, D, V, dtype):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((N, D), dtype=np.float32).astype(dtype)
    W = (rng.standard_normal((V, D), dtype=np.float32) / np.sqrt(D) * 2).astype(dtype)
    return h, W, rng.integers(0, V, N), rng


def to_torch(a):
    if a.dtype == lx.bfloat16_dtype():
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def bench_shape(N, D, V, dtype, repeats, chunk_rows, sweep, skip):
    h, W, t, rng = make_problem(N, D, V, dtype)
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
        ht, Wt = to_torch(h).clone().requires_grad_(True), to_torch(W).clone().requires_grad_(True)
        tt = torch.from_numpy(t)
        impls["torch"] = lambda: torch_eager(ht, Wt, tt)
        impls["torch chunked"] = lambda: torch_chunked(ht, Wt, tt)
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
        dh_t = np.empty((D, N), np.float32)
        timed["3 matmuls"] = lambda: three_matmuls(h, W, Z, dh, dW)
        timed["3 matmuls T"] = lambda: three_matmuls_t(h, W, Z, dh_t, dW)
        for name in ("3 matmuls", "3 matmuls T"):
            timed[name]()  # warm-up; the pages of Z are touched
            rows[name] = dict(impl=name, status="ok", note="outputs preallocated",
                              peak_bytes=None, working_bytes=Z.nbytes)
    # Round robin, so that a change in the machine's load hits every implementation;
    # the memory is measured in the last round (after the warm-up: a first call also
    # allocates the BLAS and thread pools' buffers).
    times = {n: [] for n in timed}
    for r in range(repeats):
        for name, fn in timed.items():
            if r < repeats - 1 or name.startswith("3 matmuls"):
                times[name].append(wall_time(fn))
                continue
            s, peak = peak_rss(partial(wall_time, fn))
            times[name].append(s)  # (wall, cpu)
            rows[name].update(peak_bytes=peak,
                              working_bytes=None if peak is None else peak - out_bytes)
    for name, ts in times.items():
        rows[name]["seconds"] = statistics.median(w for w, _ in ts)
        rows[name]["cpu_seconds"] = statistics.median(c for _, c in ts)
        rows[name]["spread"] = [min(w for w, _ in ts), max(w for w, _ in ts)]
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


# ---- peak memory, one fresh process per configuration ------------------------------

def _outputs(name, h, W, t, chunk):
    """(d_hidden, d_weight) of one call of implementation `name`."""
    if name == "lmxent":
        return lx.linear_cross_entropy(h, W, t, chunk_size=chunk)[1][:2]
    if name == "naive NumPy":
        return naive_numpy(h, W, t)[1]
    ht, Wt = to_torch(h).requires_grad_(True), to_torch(W).requires_grad_(True)
    fn = torch_chunked if name == "torch chunked" else torch_eager
    return fn(ht, Wt, torch.from_numpy(t))[1]


def _nbytes(a):
    return a.nbytes if isinstance(a, np.ndarray) else a.numel() * a.element_size()


def peak_child(name, N, D, V, dtype_name, chunk):
    """Prints {"extra_bytes", "output_bytes"} of one call (see --memory)."""
    (dtype,), _ = dtypes_from_names([dtype_name])
    chunk = None if chunk == "default" else int(chunk)
    _outputs(name, *make_problem(min(N, 1024), D, min(V, 8192), dtype)[:3], chunk)  # warm-up
    h, W, t, _ = make_problem(N, D, V, dtype)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    lx.set_output_cache(lx.set_output_cache(0))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # ru_maxrss follows the reset high-water mark
    before = _status("VmRSS")
    out = _outputs(name, h, W, t, chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out_bytes = sum(_nbytes(o) for o in out)
    print(json.dumps(dict(extra_bytes=peak - before - out_bytes, output_bytes=out_bytes)))


def memory_shape(N, D, V, dtype, chunk_rows, sweep, skip):
    """[{impl, chunk_rows, extra_bytes, output_bytes}], each from a fresh process."""
    name = np.dtype(dtype).name
    configs = [("lmxent", chunk_rows)] + [("lmxent", c) for c in sweep]
    if dtype == np.float32:
        configs.append(("naive NumPy", None))
    if torch is not None:
        configs += [("torch chunked", None), ("torch", None)]
    rows = []
    for impl, c in configs:
        if impl in skip:
            continue
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak-of", impl,
                              str(N), str(D), str(V), name, str(c or "default")],
                             capture_output=True, text=True)
        if impl == "lmxent" and c is None:
            z = np.zeros((), dtype)
            c = default_chunk_rows(np.broadcast_to(z, (N, D)), np.broadcast_to(z, (V, D)))
        r = dict(impl=impl, chunk_rows=c if impl == "lmxent" else None)
        if out.returncode == 0:
            r.update(json.loads(out.stdout.splitlines()[-1]))
        else:
            r["error"] = out.stderr.strip().splitlines()[-1:]
        rows.append(r)
        extra = fmt_mib(r.get("extra_bytes"))
        print(f"  {impl}{f', {c} rows' if impl == 'lmxent' else ''}: extra {extra}", flush=True)
    return rows


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
    ap.add_argument("--memory", action="store_true", help="only the peak memory, each "
                    "configuration in a fresh process (Linux)")
    ap.add_argument("--peak-of", nargs=6, help=argparse.SUPPRESS)  # the child of --memory
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "linear_cross_entropy.json"))
    args = ap.parse_args(argv)
    if args.peak_of:
        return peak_child(*args.peak_of[:1], *map(int, args.peak_of[1:4]), *args.peak_of[4:])
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
            if args.memory:
                results.append(dict(shape=[args.tokens, args.hidden, V], dtype=np.dtype(dt).name,
                                    memory=memory_shape(args.tokens, args.hidden, V, dt,
                                                        args.chunk_rows, sweep, skip)))
                continue
            res = bench_shape(args.tokens, args.hidden, V, dt, args.repeats, args.chunk_rows,
                              sweep, skip)
            print_shape(res)
            results.append(res)
    info["load_average_after"] = os.getloadavg()
    path = write_json(dict(info=info, results=results), os.path.dirname(os.path.abspath(args.json)),
                      os.path.basename(args.json))
    print(f"\nwrote {path}")
    return 1 if any(r.get("status") == "WRONG" or "error" in r for res in results
                    for r in res.get("results", []) + res.get("memory", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
