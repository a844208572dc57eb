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

and lmxent against a copy of the same bytes in the same run: lmxent's call reads the
logits once (its CPU fast path: one pass for the max, the top-k candidates and the raw
log-sum; then only ~k candidates), so its GB/s of logits is that pass's read rate, given
beside the copy's (bytes read per second of a copy: half the copy's total traffic). The
draws differ (different generators); lx.sample is checked against lmxent.reference first.
Times are the median of interleaved runs (lmxent, copy, peers, repeated).

Then the other common serving settings, lmxent against the copy only (same 5 raw
log-probabilities): top-p 0.9 alone (one pass: candidates by mass, the level following
the running max), top-k 50 + top-p 0.9 with a repetition penalty of 1.2 over 64 previous tokens
per row (the penalized tokens as exceptions), and greedy (temperature 0).

    python bench/bench_decoding.py                 # 64 x 128256, float32 and bfloat16
    python bench/bench_decoding.py --rows 8 --vocab 32000
"""
import argparse
import sys

import numpy as np

import lmxent as lx
from lmxent import reference as R
from lmxent.bench.bodies import torch_process_hf
from lmxent.bench.timing import best_time

OPTS = dict(temperature=0.7, top_k=50, top_p=0.9)
SETTINGS = {  # name: options (prev_tokens filled in per shape)
    "top-p 0.9": dict(temperature=0.7, top_p=0.9),
    "top-k 50 + top-p 0.9 + rep 1.2": dict(temperature=0.7, top_k=50, top_p=0.9,
                                           repetition_penalty=1.2),
    "greedy": dict(temperature=0.0),
}
TIMING = (3, 0.2, 5.0)  # best of: repeats, min and max seconds


def torch_pipelines(torch):
    def logprobs(x, tok):  # raw log-probabilities: the token's and the 5 most likely
        lp = torch.log_softmax(x.float(), -1)
        return lp.gather(-1, tok[:, None]), lp.topk(5, -1)

    def sort_way(x):
        z = torch_process_hf(torch, x, **OPTS)
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
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    base = (3 * rng.standard_normal((args.rows, args.vocab))).astype(np.float32)
    try:
        import torch
        torch.set_num_threads(lx.get_num_threads())
    except ImportError:
        torch = None
    prev = rng.integers(0, args.vocab, (args.rows, 64))
    for dtype in (np.float32, lx.bfloat16_dtype()):
        if dtype is not None:
            measure(base, base.astype(dtype), torch, args)
            for label, opts in SETTINGS.items():
                opts = dict(opts, prev_tokens=prev) if "repetition_penalty" in opts else opts
                measure_setting(base.astype(dtype), label, opts, args)


def measure_setting(x, label, opts, args):
    got = lx.sample(x, num_logprobs=5, **opts)
    want = R.sample(x.astype(np.float64), num_logprobs=5, **opts)
    assert np.array_equal(got.tokens, want.tokens), f"lx.sample differs ({label})"
    dst = np.empty_like(x)
    calls = {"lmxent": lambda: lx.sample(x, num_logprobs=5, **opts),
             "copy": lambda: np.copyto(dst, x)}
    times = {k: [] for k in calls}
    for _ in range(args.repeats):
        for k, f in calls.items():
            times[k].append(best_time(f, lambda: None, *TIMING))
    t = {k: float(np.median(v)) for k, v in times.items()}
    print(f"{args.rows}x{args.vocab} {np.dtype(x.dtype).name}: {label:>31} "
          f"{t['lmxent'] * 1e3:8.2f} ms = {t['lmxent'] / t['copy']:5.1f} copies of the "
          f"logits ({t['copy'] * 1e3:.2f} ms)")


def measure(base, x, torch, args):
    name = np.dtype(x.dtype).name
    got = lx.sample(x, num_logprobs=5, **OPTS)
    want = R.sample(x.astype(np.float64), num_logprobs=5, **OPTS)
    assert np.array_equal(got.tokens, want.tokens), "lx.sample differs from the reference"
    dst = np.empty_like(x)
    calls = {"lmxent": lambda: lx.sample(x, num_logprobs=5, **OPTS),
             "copy": lambda: np.copyto(dst, x)}
    if torch is not None:
        tx = torch.from_numpy(base).to(torch.bfloat16 if name == "bfloat16" else torch.float32)
        for label, fn in torch_pipelines(torch).items():
            fn(tx)
            calls[label] = lambda fn=fn: fn(tx)
    times = {k: [] for k in calls}
    for _ in range(args.repeats):  # interleaved: a busy machine slows every row alike
        for k, f in calls.items():
            times[k].append(best_time(f, lambda: None, *TIMING))
    t = {k: float(np.median(v)) for k, v in times.items()}
    read, copy_read = x.nbytes / t["lmxent"] / 1e9, x.nbytes / t["copy"] / 1e9
    print(f"{args.rows}x{args.vocab} {name}: lmxent sample {t['lmxent'] * 1e3:8.2f} ms, "
          f"{read:.1f} GB/s read in its one pass over the logits = {read / copy_read:.0%} "
          f"of a copy's read rate ({copy_read:.1f} GB/s)")
    for label in calls:
        if label.startswith("torch"):
            print(f"{'':>{len(str(args.rows)) + len(str(args.vocab)) + len(name) + 3}}"
                  f"{label:>13} {t[label] * 1e3:8.2f} ms  lmxent is "
                  f"{t[label] / t['lmxent']:5.1f}x faster")


if __name__ == "__main__":
    sys.exit(main())
