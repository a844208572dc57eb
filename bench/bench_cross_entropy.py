"""Cross-entropy and the softmax family on the CPU: lmxent against its peers (torch,
NumPy, JAX where installed), with lmxent's other forms of the same call.

The harness of python -m lmxent bench checks every implementation against
lmxent.reference before timing it and compares bandwidth with a memory copy (see
python -m lmxent bench -h); this script runs its logsumexp, log_softmax,
cross_entropy and cross_entropy_with_grad at the shapes below, with these rows added:

  lmxent uncached  lmxent with its output cache off: every call gets fresh pages from
                   the OS (page faults, zeroing), as torch's CPU allocator does; plain
                   "lmxent" reuses the block the previous result released
  lmxent out=      into a buffer reused across calls
  torch out=       torch.log_softmax into a reused tensor
  lmxent inplace   (a row of the harness) the gradient over the logits

    python bench/bench_cross_entropy.py                 # 4096x32000 and 1024x128256
    python bench/bench_cross_entropy.py --quick         # two small shapes
    python bench/bench_cross_entropy.py --shapes 2048x50257 --dtypes float32

Writes bench/results/cross_entropy.json (and .png with matplotlib).
"""
import os
import sys

import lmxent as lx
from lmxent import bench

SHAPES = [(4096, 32000), (1024, 128256)]
OPS = ["logsumexp", "log_softmax", "cross_entropy", "cross_entropy_with_grad"]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def uncached(call):
    """lmxent's call(problem) with the output cache off."""
    def factory(p, _):
        def run():
            old = lx.set_output_cache(0)
            try:
                return call(p)
            finally:
                lx.set_output_cache(old)
        return run
    return factory


def out_into(call):
    """lmxent's call(problem, out) writing into a buffer reused across calls."""
    def factory(p, _):
        out = p.dev.xp.empty_like(p.x)
        return lambda: call(p, out)
    return factory


def torch_log_softmax_out(p, _):
    torch = bench.import_peer("torch", "torch")
    x = bench.torch_view(torch, p.get("x"))
    out = torch.empty_like(x)
    return lambda: torch.log_softmax(x, -1, out=out)


EXTRA = {
    "log_softmax": {
        "lmxent uncached": uncached(lambda p: lx.log_softmax(p.x)),
        "lmxent out=": out_into(lambda p, out: lx.log_softmax(p.x, out=out)),
        "torch out=": torch_log_softmax_out,
    },
    "cross_entropy_with_grad": {
        "lmxent uncached": uncached(lambda p: lx.cross_entropy_with_grad(p.x, p.t)),
        "lmxent out=": out_into(lambda p, out: lx.cross_entropy_with_grad(p.x, p.t, out=out)),
    },
}


def main(argv=None):
    ap = bench.parser("bench_cross_entropy.py", __doc__, ops=OPS, out=RESULTS)
    args = ap.parse_args(argv)
    if not args.quick:  # --quick: the harness's quick shapes
        args.shapes = args.shapes or SHAPES
    return bench.run(args, ap, EXTRA, report_name="cross_entropy")


if __name__ == "__main__":
    sys.exit(main())
