"""python -m lmxent [check | bench | demo]

check (the default): every kernel runs on random data of a few shapes and dtypes
(awkward sizes included, and outputs in reused blocks of the output cache) and is
compared with lmxent.reference (float64, on the same rounded inputs). One line per
op: its worst error relative to the largest reference value, the tolerance, pass
or FAIL. Then the instruction set and threads in use, and a quick timing against
a plain NumPy implementation. The exit status is 1 if any check fails.

bench: lmxent against the peers installed on this machine (python -m lmxent bench -h).
demo: trains a small byte-level language model end to end (python -m lmxent demo -h).
"""
import argparse
import sys
import time

import numpy as np

import lmxent as lx
from lmxent import bench, demo
from lmxent import reference as R
from lmxent._cli import EPS, rel_error

# the last is large enough (4 MiB in float32) that outputs come from the output cache,
# in blocks that earlier ops' outputs filled and released
SHAPES = [(1, 1), (3, 7), (33, 1000), (4, 50257), (2, 70001), (64, 16411)]
OPTIONS = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0, logit_scale=0.5,
               ignore_index=0)


def dtypes():
    out = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)]
    return out + ([lx.bfloat16_dtype()] if lx.bfloat16_dtype() is not None else [])


def _ops():
    """name -> f(x, t, w, rng) returning [(got, want, output dtype name), ...]."""
    def ce_opts(x, w, full):
        return dict(OPTIONS, weight=w) if full else {}

    def ce(full):
        def run(x, t, w, rng):
            o, x64 = ce_opts(x, w, full), x.astype(np.float64)
            got = lx.cross_entropy(x, t, reduction="none", **o)
            return [(got, R.cross_entropy(x64, t, reduction="none", **o), got.dtype.name)]
        return run

    def ce_grad(full):
        def run(x, t, w, rng):
            o, x64 = ce_opts(x, w, full), x.astype(np.float64)
            loss, g = lx.cross_entropy_with_grad(x, t, **o)
            rl, rg = R.cross_entropy_with_grad(x64, t, **o)
            return [(loss, rl, loss.dtype.name), (g, rg, x.dtype.name)]
        return run

    def backward(x, t, w, rng):
        x64 = x.astype(np.float64)
        _, lse = lx.cross_entropy(x, t, reduction="none", return_lse=True)
        go = rng.normal(size=t.shape)
        got = lx.cross_entropy_backward(x, t, lse, go, reduction="none")
        want = R.cross_entropy_backward(x64, t, lse.astype(np.float64), go, reduction="none")
        return [(got, want, x.dtype.name)]

    def prob_targets(x, t, w, rng):
        q = rng.dirichlet(np.ones(x.shape[-1]), size=x.shape[0]).astype(x.dtype)
        x64, q64 = x.astype(np.float64), q.astype(np.float64)
        loss, g = lx.cross_entropy_with_grad(x, q, label_smoothing=0.1)
        rl, rg = R.cross_entropy_with_grad(x64, q64, label_smoothing=0.1)
        return [(loss, rl, loss.dtype.name), (g, rg, x.dtype.name)]

    def family(name):
        def run(x, t, w, rng):
            got = getattr(lx, name)(x, temperature=0.7)
            return [(got, getattr(R, name)(x.astype(np.float64), temperature=0.7), got.dtype.name)]
        return run

    def token_stats(x, t, w, rng):
        got = lx.token_stats(x, t, temperature=0.7)
        want = R.token_stats(x.astype(np.float64), t, temperature=0.7)
        return [(g, r, g.dtype.name if g.dtype.kind == "f" else "float64")
                for g, r in zip(got, want)]  # integer fields must match exactly

    def kl(direction):
        def run(x, t, w, rng):
            y = rng.normal(scale=3.0, size=x.shape).astype(x.dtype)
            loss, g = lx.kl_divergence(x, y, direction=direction, return_grad=True,
                                       reduction="sum")
            rl, rg = R.kl_divergence(x.astype(np.float64), y.astype(np.float64),
                                     direction=direction, return_grad=True, reduction="sum")
            return [(loss, rl, loss.dtype.name), (g, rg, x.dtype.name)]
        return run

    def lm_head(x, t, w, rng):
        if x.shape[-1] > 5000 or x.dtype == np.float16:  # a (V, D) weight; NumPy has no f16 BLAS
            return []
        h = rng.normal(size=(x.shape[0], 16)).astype(x.dtype)
        W = (rng.normal(size=(x.shape[-1], 16)) / 4).astype(x.dtype)
        loss, grads = lx.linear_cross_entropy(h, W, t, chunk_size=2)
        rl, rg = R.linear_cross_entropy(h.astype(np.float64), W.astype(np.float64), t)
        return [(loss, rl, loss.dtype.name), (grads[0], rg[0], x.dtype.name),
                (grads[1], rg[1], x.dtype.name)]

    return {
        "logsumexp": family("logsumexp"),
        "log_softmax": family("log_softmax"),
        "softmax": family("softmax"),
        "cross_entropy": ce(False),
        "cross_entropy (all options)": ce(True),
        "cross_entropy_with_grad": ce_grad(False),
        "cross_entropy_with_grad (all options)": ce_grad(True),
        "cross_entropy_with_grad (probabilities)": prob_targets,
        "cross_entropy_backward": backward,
        "token_stats": token_stats,
        "kl_divergence (forward, with grad)": kl("forward"),
        "kl_divergence (reverse, with grad)": kl("reverse"),
        "kl_divergence (js, with grad)": kl("js"),
        "linear_cross_entropy (LM head)": lm_head,
    }


def check(verbose=True):
    rng = np.random.default_rng(2026)
    failed = 0
    for name, run in _ops().items():
        worst, worst_ratio = 0.0, 0.0
        for shape in SHAPES:
            N, V = shape
            base = rng.normal(scale=3.0, size=shape)
            t = rng.integers(0, V, N)
            w = rng.uniform(0.5, 2.0, V)
            for dt in dtypes():
                x = base.astype(dt)
                for got, want, out_name in run(x, t, w, rng):
                    err = rel_error(got, want)
                    # float32 math with a float32 (or 16-bit) result: a few ulps. A
                    # Jensen-Shannon gradient entry is p_j (c_j - sum_k p_k c_k) with
                    # c = log(p / m) / 2: the two terms, up to ln(2) / 2 each, nearly cancel
                    # where p_j is large and q_j is not small, so its error is ulps of them
                    # (and of the 16k-term sum), not of the result
                    ulps = 256 if "js" in name else 16
                    tol = ulps * EPS["float64" if dt == np.float64 else "float32"] + 2 * EPS[out_name]
                    worst = max(worst, err)
                    worst_ratio = max(worst_ratio, err / tol)
        ok = worst_ratio <= 1.0
        failed += not ok
        if verbose:
            print(f"  {name:<42} worst error {worst:9.2e}   {worst_ratio:5.2f} of tolerance   "
                  f"{'pass' if ok else 'FAIL'}")
    return failed


def timing():
    rng = np.random.default_rng(0)
    N, V = 512, 32000
    x = rng.normal(size=(N, V)).astype(np.float32)
    t = rng.integers(0, V, N)

    def numpy_ce_with_grad():
        m = x.max(-1, keepdims=True)
        e = np.exp(x - m)
        s = e.sum(-1, keepdims=True)
        loss = np.mean(np.log(s[:, 0]) + m[:, 0] - x[np.arange(N), t])
        e /= s * N
        e[np.arange(N), t] -= 1.0 / N
        return loss, e

    def best(f, n=5):
        f()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)

    ours = best(lambda: lx.cross_entropy_with_grad(x, t))
    theirs = best(numpy_ce_with_grad)
    print(f"  cross_entropy_with_grad {N}x{V} float32: lmxent {ours * 1e3:.1f} ms, "
          f"NumPy {theirs * 1e3:.1f} ms ({theirs / ours:.1f}x)")


def self_check():
    info = lx.cpu_info()
    print(f"lmxent {lx.__version__}: CPU kernels {info['isa']} (available: "
          f"{', '.join(info['available'])}), {info['threads']} threads, output cache "
          f"{lx.output_cache_info()['limit'] / 2**30:.2g} GiB, numpy {np.__version__}"
          + ("" if lx.bfloat16_dtype() is not None else "; bfloat16 skipped (no ml_dtypes)"))
    print("checking every kernel against lmxent.reference (float64):")
    failed = check()
    print("timing:")
    timing()
    print(f"{'all checks passed' if not failed else f'{failed} check(s) FAILED'}")
    return 1 if failed else 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lmxent", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="{check,bench,demo}")
    sub.add_parser("check", help="compare every kernel with lmxent.reference (the default)")
    for name, module, what in (("bench", bench, "lmxent against the peers on this machine"),
                               ("demo", demo, "train a byte-level language model end to end")):
        p = sub.add_parser(name, help=what, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run, parser=p)
    args = ap.parse_args(argv)
    if args.command in (None, "check"):
        return self_check()
    return args.run(args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
