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
from lmxent._cli import rel_error
from lmxent._registry import REGISTRY

# the last is large enough (4 MiB in float32) that outputs come from the output cache,
# in blocks that earlier ops' outputs filled and released
SHAPES = [(1, 1), (3, 7), (33, 1000), (4, 50257), (2, 70001), (64, 16411)]


def dtypes():
    out = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)]
    return out + ([lx.bfloat16_dtype()] if lx.bfloat16_dtype() is not None else [])


def _ops():
    """The self-check's rows, from the op registry: label -> registry.Check."""
    return {label: c for row in REGISTRY for label, c in row.checks.items()}


def check(verbose=True):
    rng = np.random.default_rng(2026)
    failed = 0
    for name, c in _ops().items():
        worst, worst_ratio = 0.0, 0.0
        for shape in SHAPES:
            N, V = shape
            base = rng.normal(scale=3.0, size=shape)
            t = rng.integers(0, V, N)
            w = rng.uniform(0.5, 2.0, V)
            for dt in dtypes():
                x = base.astype(dt)
                for got, want, out_name in c.run(x, t, w, rng):
                    err = rel_error(got, want)
                    worst = max(worst, err)
                    worst_ratio = max(worst_ratio, err / c.tolerance(dt, out_name))
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
