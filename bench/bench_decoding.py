"""Decoding on the CPU: lx.sample (temperature 0.7 + top-k 50 + top-p 0.9, one token
per row with 5 log-probabilities of the raw logits) against two torch CPU pipelines
of the same work:

  torch sort   the HF transformers way: temperature, top-k by torch.topk's k-th value,
               top-p by a full sort + softmax + cumsum, torch.multinomial, then
               log_softmax of the raw logits for the token's log-probability and
               the 5 most likely
  torch topk   top-k first with torch.topk(50), top-p over those 50 only (the
               fastest exact torch pipeline for this setting), multinomial, the same
               raw log-probabilities

and lmxent's passes against a copy of the same bytes (the read bandwidth). The draws
differ (different generators); lx.sample is checked against lmxent.reference first.

    python bench/bench_decoding.py                 # 64 x 128256, float32 and bfloat16
    python bench/bench_decoding.py --rows 8 --vocab 32000
"""
import argparse
import sys

import numpy as np

import lmxent as lx
from lmxent import reference as R
from lmxent.bench.timing import best_time

OPTS = dict(temperature=0.7, top_k=50, top_p=0.9)
TIMING = (5, 0.5, 10.0)  # repeats, min and max seconds


def torch_pipelines(torch):
    def logprobs(x, tok):  # raw log-probabilities: the token's and the 5 most likely
        lp = torch.log_softmax(x.float(), -1)
        return lp.gather(-1, tok[:, None]), lp.topk(5, -1)

    def sort_way(x):
        z = x.float() / OPTS["temperature"]
        kth = torch.topk(z, OPTS["top_k"], -1).values[:, -1:]
        z = z.masked_fill(z < kth, -float("inf"))
        sz, idx = torch.sort(z, descending=True)
        cum = torch.softmax(sz, -1).cumsum(-1)
        remove = cum - torch.softmax(sz, -1) >= OPTS["top_p"]  # mass before >= top_p
        z = z.scatter(-1, idx, sz.masked_fill(remove, -float("inf")))
        tok = torch.multinomial(torch.softmax(z, -1), 1)[:, 0]
        return tok, logprobs(x, tok)

    def topk_way(x):
        z = x.float() / OPTS["temperature"]
        v, i = torch.topk(z, OPTS["top_k"], -1)  # sorted descending
        p = torch.softmax(v, -1)
        v = v.masked_fill(p.cumsum(-1) - p >= OPTS["top_p"], -float("inf"))
        tok = i.gather(-1, torch.multinomial(torch.softmax(v, -1), 1))[:, 0]
        return tok, logprobs(x, tok)

    return {"torch sort": sort_way, "torch topk": topk_way}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128256)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    base = (3 * rng.standard_normal((args.rows, args.vocab))).astype(np.float32)
    try:
        import torch
        torch.set_num_threads(lx.get_num_threads())
    except ImportError:
        torch = None
    for dtype in (np.float32, lx.bfloat16_dtype()):
        if dtype is not None:
            measure(base, base.astype(dtype), torch, args)


def measure(base, x, torch, args):
    name = np.dtype(x.dtype).name
    got = lx.sample(x, num_logprobs=5, **OPTS)
    want = R.sample(x.astype(np.float64), num_logprobs=5, **OPTS)
    assert np.array_equal(got.tokens, want.tokens), "lx.sample differs from the reference"
    t_lx = best_time(lambda: lx.sample(x, num_logprobs=5, **OPTS), lambda: None, *TIMING)
    dst = np.empty_like(x)
    t_copy = best_time(lambda: np.copyto(dst, x), lambda: None, *TIMING)
    gbs = x.nbytes / t_lx / 1e9
    print(f"{args.rows}x{args.vocab} {name}: lmxent sample {t_lx * 1e3:8.2f} ms "
          f"({gbs:.1f} GB/s of logits; a copy of them: {2 * x.nbytes / t_copy / 1e9:.1f} GB/s)")
    if torch is None:
        return
    tx = torch.from_numpy(base).to(torch.bfloat16 if name == "bfloat16" else torch.float32)
    for label, fn in torch_pipelines(torch).items():
        fn(tx)
        t = best_time(lambda fn=fn: fn(tx), lambda: None, *TIMING)
        print(f"{'':>{len(str(args.rows)) + len(str(args.vocab)) + len(name) + 3}}"
              f"{label:>13} {t * 1e3:8.2f} ms  lmxent is {t / t_lx:5.1f}x faster")

if __name__ == "__main__":
    sys.exit(main())
