"""Cross-entropy and the softmax family on the CPU: lmxent against torch and NumPy.

Every implementation runs in this process on the same inputs, after a check of
its result against lmxent.reference (float64) on a slice of the rows; a wrong
result is reported as wrong and not timed. A memory copy of the same bytes
(np.copyto, one read and one write) is timed too, so bandwidth is reported
against what this machine moves, not a datasheet.

Bytes counted: forward ops read the logits once; ops that write a (V-sized)
output count one read and one write, the same as the copy.

Outputs: "lmxent" and "torch" return new arrays. lmxent's come from its output
cache (lx.set_output_cache): in a loop, the block the previous result released
is reused, already faulted in, as CuPy's and torch's GPU allocators do. torch's
CPU allocator hands out fresh pages, whose first touch (page faults, the OS
zeroing them) is part of its time; "lmxent uncached" is lmxent with the cache
off, which pays the same. "out=" rows write into a buffer reused across calls
(lmxent's out=; torch's out= for log_softmax), and "inplace" over the logits.
Each speedup compares like with like: lmxent X over torch X where torch has
that form, else over torch's plain call.

    python bench/bench_cross_entropy.py                 # the issue's shapes
    python bench/bench_cross_entropy.py --quick         # one small shape
    python bench/bench_cross_entropy.py --shapes 2048x50257 --dtypes float32
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np

import lmxent as lx
from lmxent import reference as R

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # torch is an optional peer
    torch = None


def best_time(fn, repeats, min_time=0.5):
    """Best wall time of fn() after one warm-up call; at least `repeats` runs and
    at least min_time seconds in total."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 20):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.min(times))


def uncached(fn):
    """fn with lmxent's output cache off: every call gets fresh pages."""
    def run():
        old = lx.set_output_cache(0)
        try:
            return fn()
        finally:
            lx.set_output_cache(old)
    return run


def machine_info():
    """What the numbers were measured on (printed, and stored in the JSON)."""
    info = dict(machine=platform.machine(), processor=platform.processor(),
                cpu_count=os.cpu_count(), lmxent=lx.__version__, lmxent_cpu=lx.cpu_info(),
                numpy=np.__version__, torch=torch.__version__ if torch is not None else None,
                python=sys.version.split()[0])
    print(f"lmxent {lx.__version__} ({lx.cpu_info()['isa']}, {lx.cpu_info()['threads']} "
          f"threads), numpy {np.__version__}, torch {info['torch']}")
    return info


def finish(path, info, results):
    """Writes the JSON; the exit status is 1 if any implementation was WRONG."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(info=info, results=results), f, indent=1)
    print(f"\nwrote {path}")
    return 1 if any(r["status"] == "WRONG" for res in results for r in res["results"]) else 0


# ---- peers ------------------------------------------------------------------

def np_lse(x):
    x = x.astype(np.float32, copy=False)
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[:, 0]


def np_log_softmax(x):
    x = x.astype(np.float32, copy=False)
    return x - np_lse(x)[:, None]


def np_ce(x, t):
    x = x.astype(np.float32, copy=False)
    return np.mean(np_lse(x) - x[np.arange(len(t)), t])


def np_ce_with_grad(x, t):
    x = x.astype(np.float32, copy=False)
    lse = np_lse(x)
    g = np.exp(x - lse[:, None])
    g[np.arange(len(t)), t] -= 1.0
    g /= len(t)
    return np.mean(lse - x[np.arange(len(t)), t]), g


def to_torch(x):
    if x.dtype == lx.bfloat16_dtype():
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def torch_ce_with_grad(xt, tt):
    xt.grad = None
    loss = F.cross_entropy(xt, tt)
    loss.backward()
    return loss, xt.grad


# ---- checks -----------------------------------------------------------------

def as64(a):
    if torch is not None and isinstance(a, torch.Tensor):
        a = a.detach().float().numpy()
    return np.asarray(a, dtype=np.float64)


def check(name, got, want, rows, tol):
    """Max abs error of got[:rows] (a loss, or per-row arrays) against want."""
    got = as64(got)
    got = got if got.ndim == 0 else got[:rows]
    err = float(np.max(np.abs(got - want)))
    return err <= tol, err


# ---- one shape --------------------------------------------------------------

def bench_shape(N, V, dtype, repeats, threads):
    rng = np.random.default_rng(0)
    x = (2.0 * rng.standard_normal((N, V), dtype=np.float32)).astype(dtype)
    t = rng.integers(0, V, N)
    nbytes = x.nbytes
    dst = np.empty_like(x)
    copy_s = best_time(lambda: np.copyto(dst, x), repeats)
    copy_gbs = 2 * nbytes / copy_s / 1e9

    # references on a slice of rows (float64, from the same rounded inputs)
    k = min(N, 64)
    x64 = np.asarray(x[:k], np.float64)
    ref = {"lse": R.logsumexp(x64), "log_softmax": R.log_softmax(x64)}
    ref_loss_rows = R.cross_entropy(x64, t[:k], reduction="none")
    ref_grad_rows = R.cross_entropy_with_grad(x64, t[:k], reduction="none")[1] / N
    full_loss = float(np.mean(ref_loss_rows)) if k == N else None
    low = dtype != np.float32
    tol_val = 3e-2 if low else 1e-5    # 16-bit outputs round to ~3 significant digits
    tol_grad = (1e-2 if low else 1e-6) / N

    out = np.empty_like(x)
    xt = to_torch(x) if torch is not None else None
    out_t = torch.empty_like(xt) if torch is not None else None
    tt = torch.from_numpy(t) if torch is not None else None
    xg = xt.clone().requires_grad_(True) if torch is not None else None

    def loss_check(res):
        loss = res[0] if isinstance(res, tuple) else res
        if full_loss is None:  # the mean over all rows: check the per-row losses instead
            return True, 0.0
        return check("loss", loss, full_loss, k, tol_val)

    cases = {  # op -> impl -> (callable, checker)
        "logsumexp": {
            "lmxent": (lambda: lx.logsumexp(x), lambda r: check("", r, ref["lse"], k, tol_val * 10)),
            "torch": (lambda: torch.logsumexp(xt, -1), lambda r: check("", r, ref["lse"], k, tol_val * 10)),
            "numpy": (lambda: np_lse(x), lambda r: check("", r, ref["lse"], k, tol_val * 10)),
        },
        "log_softmax": {
            "lmxent": (lambda: lx.log_softmax(x),
                       lambda r: check("", r, ref["log_softmax"], k, tol_val * 10)),
            "lmxent uncached": (uncached(lambda: lx.log_softmax(x)),
                                lambda r: check("", r, ref["log_softmax"], k, tol_val * 10)),
            "lmxent out=": (lambda: lx.log_softmax(x, out=out),
                            lambda r: check("", r, ref["log_softmax"], k, tol_val * 10)),
            "torch": (lambda: torch.log_softmax(xt, -1),
                      lambda r: check("", r, ref["log_softmax"], k, tol_val * 10)),
            "torch out=": (lambda: torch.log_softmax(xt, -1, out=out_t),
                           lambda r: check("", r, ref["log_softmax"], k, tol_val * 10)),
            "numpy": (lambda: np_log_softmax(x),
                      lambda r: check("", r, ref["log_softmax"], k, tol_val * 10)),
        },
        "cross_entropy": {
            "lmxent": (lambda: lx.cross_entropy(x, t, reduction="none"),
                       lambda r: check("", r, ref_loss_rows, k, tol_val * 10)),
            "torch": (lambda: F.cross_entropy(xt, tt, reduction="none"),
                      lambda r: check("", r, ref_loss_rows, k, tol_val * 10)),
            "numpy": (lambda: np_lse(x) - x[np.arange(N), t].astype(np.float32),
                      lambda r: check("", r, ref_loss_rows, k, tol_val * 10)),
        },
        "cross_entropy_with_grad": {
            "lmxent": (lambda: lx.cross_entropy_with_grad(x, t),
                       lambda r: check("", r[1], ref_grad_rows, k, tol_grad)),
            "lmxent uncached": (uncached(lambda: lx.cross_entropy_with_grad(x, t)),
                                lambda r: check("", r[1], ref_grad_rows, k, tol_grad)),
            "lmxent out=": (lambda: lx.cross_entropy_with_grad(x, t, out=out),
                            lambda r: check("", r[1], ref_grad_rows, k, tol_grad)),
            "lmxent inplace": (lambda: lx.cross_entropy_with_grad(out, t, inplace=True),
                               None),  # timed on its own output; checked below
            "torch": (lambda: torch_ce_with_grad(xg, tt),
                      lambda r: check("", r[1], ref_grad_rows, k, tol_grad)),
            "numpy": (lambda: np_ce_with_grad(x, t),
                      lambda r: check("", r[1], ref_grad_rows, k, tol_grad)),
        },
    }
    rows = []
    for op, impls in cases.items():
        moved = nbytes if op in ("logsumexp", "cross_entropy") else 2 * nbytes
        for impl, (fn, checker) in impls.items():
            if impl.startswith("torch") and torch is None:
                rows.append(dict(op=op, impl=impl, status="skipped (torch not installed)"))
                continue
            if impl == "lmxent inplace":
                np.copyto(out, x)
                _, g = fn()
                ok, err = check("", g, ref_grad_rows, k, tol_grad)
            else:
                ok, err = checker(fn())
            if not ok:
                rows.append(dict(op=op, impl=impl, status="WRONG", max_err=err))
                continue
            s = best_time(fn, repeats)
            rows.append(dict(op=op, impl=impl, status="ok", max_err=err, seconds=s,
                             gbs=moved / s / 1e9, copy_fraction=moved / s / 1e9 / copy_gbs))
    ok = {(r["op"], r["impl"]): r for r in rows if r["status"] == "ok"}
    for (op, impl), r in ok.items():  # lmxent X over peer X, else over the peer's plain call
        if impl.startswith("lmxent"):
            form = impl[len("lmxent"):]
            for peer in ("torch", "numpy"):
                p = ok.get((op, peer + form)) or ok.get((op, peer))
                if p is not None:
                    r[f"x_{peer}"] = p["seconds"] / r["seconds"]
    return dict(shape=[N, V], dtype=np.dtype(dtype).name, threads=threads,
                copy_seconds=copy_s, copy_gbs=copy_gbs, results=rows)


def print_shape(res):
    N, V = res["shape"]
    print(f"\n{N} x {V} {res['dtype']}, {res['threads']} threads; "
          f"copy {res['copy_seconds'] * 1e3:.1f} ms = {res['copy_gbs']:.1f} GB/s")
    print(f"  {'op':<25}{'impl':<17}{'ms':>9}{'GB/s':>8}{'of copy':>9}{'vs torch':>10}{'vs numpy':>10}")
    for r in res["results"]:
        if r["status"] != "ok":
            print(f"  {r['op']:<25}{r['impl']:<17}  {r['status']}"
                  + (f" (max err {r['max_err']:.2e})" if "max_err" in r else ""))
            continue
        vt = f"{r['x_torch']:.1f}x" if "x_torch" in r else ""
        vn = f"{r['x_numpy']:.1f}x" if "x_numpy" in r else ""
        print(f"  {r['op']:<25}{r['impl']:<17}{r['seconds'] * 1e3:9.1f}{r['gbs']:8.1f}"
              f"{r['copy_fraction'] * 100:8.0f}%{vt:>10}{vn:>10}")


def parse_dtypes(text):
    """'float32,bfloat16' -> dtypes; bfloat16 is left out (with a line saying so)
    when ml_dtypes is not installed."""
    dtypes = []
    for name in text.split(","):
        dt = lx.bfloat16_dtype() if name == "bfloat16" else np.dtype(name)
        if dt is None:
            print("bfloat16 skipped: ml_dtypes is not installed")
            continue
        dtypes.append(dt)
    return dtypes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x32000,1024x128256")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one small shape, float32")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "cross_entropy.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.dtypes, args.repeats = "512x32000", "float32", 3
    dtypes = parse_dtypes(args.dtypes)
    threads = lx.cpu_info()["threads"]
    if torch is not None:
        torch.set_num_threads(threads)
    info = machine_info()
    results = []
    for shape in args.shapes.split(","):
        N, V = (int(v) for v in shape.lower().split("x"))
        for dt in dtypes:
            res = bench_shape(N, V, dt, args.repeats, threads)
            print_shape(res)
            results.append(res)
    return finish(args.json, info, results)


if __name__ == "__main__":
    sys.exit(main())
