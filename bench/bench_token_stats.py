"""Token statistics and distillation KL on the CPU: lmxent against the same
numbers computed with torch and NumPy in separate passes (log_softmax, gather,
entropy, argmax, max, rank; log_softmax twice + F.kl_div + autograd).

Every implementation runs in this process on the same inputs after a check of
its result against lmxent.reference (float64) on a slice of rows; a wrong result
is reported as WRONG and not timed. cross_entropy forward is timed too: the
issue's target is token_stats within 1.3x of it. Bandwidth is reported against
a memory copy of the same bytes (token_stats reads the logits once; KL with its
gradient reads two arrays and writes one).

    python bench/bench_token_stats.py            # (4096, 32000) and (1024, 128256)
    python bench/bench_token_stats.py --quick    # one small shape
"""
import argparse
import os
import sys

import numpy as np

import lmxent as lx
from lmxent import reference as R
from bench_cross_entropy import as64, best_time, finish, machine_info, torch

if torch is not None:
    import torch.nn.functional as F


# ---- peers: the statistics as people compute them, one op per statistic -----

def np_stats(x, t):
    z = x.astype(np.float32, copy=False)
    m = z.max(-1, keepdims=True)
    lse = m + np.log(np.exp(z - m).sum(-1, keepdims=True))
    lp = z - lse
    p = np.exp(lp)
    zt = np.take_along_axis(z, t[:, None], 1)
    return (zt[:, 0] - lse[:, 0], lse[:, 0], -(p * lp).sum(-1), z.argmax(-1) == t,
            p.max(-1), (z > zt).sum(-1))


def torch_stats(xt, tt):
    lp = torch.log_softmax(xt, -1)
    p = lp.exp()
    lpt = lp.gather(1, tt[:, None])
    return (lpt[:, 0], torch.logsumexp(xt, -1), -(p * lp).sum(-1), lp.argmax(-1) == tt,
            p.max(-1).values, (lp > lpt).sum(-1))


def np_kl_with_grad(s, t):
    def log_softmax(z):
        m = z.max(-1, keepdims=True)
        return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
    ls, lt = log_softmax(s), log_softmax(t)
    q = np.exp(lt)
    return (q * (lt - ls)).sum() / len(s), (np.exp(ls) - q) / len(s)


def torch_kl_with_grad(st, tt):
    st.grad = None
    loss = F.kl_div(torch.log_softmax(st, -1), torch.log_softmax(tt, -1), log_target=True,
                    reduction="batchmean")
    loss.backward()
    return loss, st.grad


# ---- one shape --------------------------------------------------------------

def bench_shape(N, V, repeats, threads):
    rng = np.random.default_rng(0)
    x = 2.0 * rng.standard_normal((N, V), dtype=np.float32)
    y = 2.0 * rng.standard_normal((N, V), dtype=np.float32)
    t = rng.integers(0, V, N)
    dst = np.empty_like(x)
    copy_s = best_time(lambda: np.copyto(dst, x), repeats)
    copy_gbs = 2 * x.nbytes / copy_s / 1e9

    k = min(N, 32)
    ref = R.token_stats(x[:k], t[:k])
    ref_grad = R.kl_divergence(x[:k], y[:k], reduction="sum", return_grad=True)[1] / N
    names = ("logprob", "lse", "entropy", "correct", "top_prob", "rank")

    def stats_err(res):
        errs = [np.max(np.abs(as64(a)[:k] - np.asarray(getattr(ref, n), np.float64)))
                for a, n in zip(res, names)]
        return max(errs) <= 1e-4, float(max(errs))

    def kl_err(res):
        err = float(np.max(np.abs(as64(res[1])[:k] - ref_grad)))
        return err <= 1e-6 / N, err

    xt = torch.from_numpy(x) if torch is not None else None
    cases = {
        "token_stats": {
            "lmxent": (lambda: lx.token_stats(x, t), stats_err),
            "lmxent cross_entropy": (lambda: lx.cross_entropy(x, t, reduction="none"),
                                     lambda r: (True, float(np.max(np.abs(r[:k] + ref.logprob))))),
            "torch": (lambda: torch_stats(xt, torch.from_numpy(t)), stats_err),
            "numpy": (lambda: np_stats(x, t), stats_err),
        },
        "kl_divergence+grad": {
            "lmxent": (lambda: lx.kl_divergence(x, y, return_grad=True), kl_err),
            "torch": (lambda: torch_kl_with_grad(xt.clone().requires_grad_(True),
                                                 torch.from_numpy(y)), kl_err),
            "numpy": (lambda: np_kl_with_grad(x, y), kl_err),
        },
    }
    rows = []
    for op, impls in cases.items():
        moved = x.nbytes if op == "token_stats" else 3 * x.nbytes
        for impl, (fn, checker) in impls.items():
            if impl == "torch" and torch is None:
                rows.append(dict(op=op, impl=impl, status="skipped (torch not installed)"))
                continue
            ok, err = checker(fn())
            if not ok:
                rows.append(dict(op=op, impl=impl, status="WRONG", max_err=err))
                continue
            s = best_time(fn, repeats)
            rows.append(dict(op=op, impl=impl, status="ok", max_err=err, seconds=s,
                             gbs=moved / s / 1e9, copy_fraction=moved / s / 1e9 / copy_gbs))
    for r in rows:
        if r["impl"] == "lmxent" and r["status"] == "ok":
            for p in rows:
                if p["op"] == r["op"] and p["impl"] != "lmxent" and p["status"] == "ok":
                    r["x_" + p["impl"].replace("lmxent ", "")] = p["seconds"] / r["seconds"]
    return dict(shape=[N, V], dtype="float32", threads=threads, copy_seconds=copy_s,
                copy_gbs=copy_gbs, results=rows)


def print_shape(res):
    N, V = res["shape"]
    print(f"\n{N} x {V} float32, {res['threads']} threads; copy {res['copy_gbs']:.1f} GB/s")
    print(f"  {'op':<20}{'impl':<22}{'ms':>9}{'GB/s':>8}{'of copy':>9}{'vs torch':>10}"
          f"{'vs numpy':>10}{'vs CE fwd':>10}")
    for r in res["results"]:
        if r["status"] != "ok":
            print(f"  {r['op']:<20}{r['impl']:<22}  {r['status']}")
            continue
        cols = [f"{r[c]:.1f}x" if c in r else "" for c in ("x_torch", "x_numpy")]
        ce = f"{1 / r['x_cross_entropy']:.2f}" if "x_cross_entropy" in r else ""
        print(f"  {r['op']:<20}{r['impl']:<22}{r['seconds'] * 1e3:9.1f}{r['gbs']:8.1f}"
              f"{r['copy_fraction'] * 100:8.0f}%{cols[0]:>10}{cols[1]:>10}{ce:>10}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x32000,1024x128256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one small shape")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "token_stats.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.repeats = "512x32000", 3
    threads = lx.cpu_info()["threads"]
    if torch is not None:
        torch.set_num_threads(threads)
    info = machine_info()
    results = []
    for shape in args.shapes.split(","):
        N, V = (int(v) for v in shape.lower().split("x"))
        res = bench_shape(N, V, args.repeats, threads)
        print_shape(res)
        results.append(res)
    return finish(args.json, info, results)


if __name__ == "__main__":
    sys.exit(main())
