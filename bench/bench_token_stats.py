"""Token statistics and distillation KL on the CPU: lmxent against the same numbers
computed by its peers (torch, NumPy, JAX where installed) in separate passes.

The harness of python -m lmxent bench checks every implementation against
lmxent.reference before timing it and compares bandwidth with a memory copy (see
python -m lmxent bench -h); this script runs its token_stats, kl_divergence (with
the gradient) and cross_entropy (forward, per token) at the shapes below, then
prints token_stats' time over cross_entropy's (the target: within 1.3x, as it reads
the logits once too).

    python bench/bench_token_stats.py            # (4096, 32000) and (1024, 128256)
    python bench/bench_token_stats.py --quick    # two small shapes

Writes bench/results/token_stats.json (and .png with matplotlib).
"""
import json
import os
import sys

from lmxent import bench

SHAPES = [(4096, 32000), (1024, 128256)]
OPS = ["token_stats", "kl_divergence", "cross_entropy"]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None):
    ap = bench.parser("bench_token_stats.py", __doc__, ops=OPS, dtypes=["float32"],
                      out=RESULTS)
    args = ap.parse_args(argv)
    if not args.quick:  # --quick: the harness's quick shapes
        args.shapes = args.shapes or SHAPES
    code = bench.run(args, ap, report_name="token_stats")
    with open(os.path.join(args.out, "token_stats.json")) as f:
        report = json.load(f)
    for res in report["results"]:
        s = {r["op"]: r.get("seconds") for r in res["results"] if r["impl"] == "lmxent"}
        if s.get("token_stats") and s.get("cross_entropy"):
            print(f"{res['shape'][0]}x{res['shape'][1]} {res['dtype']}: token_stats takes "
                  f"{s['token_stats'] / s['cross_entropy']:.2f}x the time of cross_entropy")
    return code


if __name__ == "__main__":
    sys.exit(main())
