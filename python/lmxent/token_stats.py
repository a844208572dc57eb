"""Token statistics: everything evaluation reads off the logits at the target,
in one pass of a compiled kernel over each row.

Per token, with z = logits / temperature, lse = log sum_j exp(z_j), p = exp(z - lse):

    logprob   log p_t = z_t - lse          (0 where the target is ignored)
    lse       the log-sum-exp of z
    entropy   -sum_j p_j log p_j, in nats
    correct   argmax_j z_j == t            (numpy's argmax: the first index on ties)
    top_prob  max_j p_j
    rank      #{j : z_j > z_t} + #{j < t : z_j == z_t}: the target's place in a
              stable sort by decreasing logit, so rank 0 <=> correct and
              rank < k <=> the target is in the top k (first index on ties)

Ignored targets (== ignore_index) get logprob 0, correct False and rank -1; lse,
entropy and top_prob do not depend on the target and are computed for them too.
A row containing NaN has NaN float statistics, correct False and rank -1; a row
whose softmax is undefined (+inf, or all -inf) has NaN entropy and top_prob.

NumPy logits run on the CPU kernel. CuPy logits run on the CUDA kernel, on
CuPy's current stream, and the statistics are CuPy arrays; host class ids are
copied to the device. The class ids are checked on the device with one host
round trip per call, unless validation is deferred
(lmxent._arrays.set_cuda_validation): then an out-of-range id gets a NaN
logprob and rank -1 and is reported by check_cuda_errors().
"""
from collections import namedtuple

import numpy as np

from . import _arrays as A

__all__ = ["token_stats", "TokenStats"]

TokenStats = namedtuple("TokenStats", "logprob lse entropy correct top_prob rank")
TokenStats.__doc__ = ("Per-token statistics, each shaped like the targets: float logprob, "
                      "lse, entropy, top_prob (float32, float64 for float64 logits), bool "
                      "correct, int64 rank.")


def token_stats(logits, targets, *, ignore_index=-100, temperature=1.0):
    """Log-probability of the target, LSE, entropy, top-1 correctness, largest
    probability and rank of the target, for logits (..., V) and class ids (...),
    in one read of the logits. Returns a TokenStats named tuple of arrays shaped
    like `targets` (see the module docstring for the conventions)."""
    x = A.as_float_array(logits, "logits")
    xp = A.array_module(x)
    x2, lead = A.rows(x, "logits")
    n, V = x2.shape
    ignore_index = A.ignore_index(ignore_index)
    scale = 1.0 / A.positive(temperature, "temperature")
    ids, _ = A.class_ids(targets, lead, V, ignore_index, xp=xp)  # last: on CuPy a round trip
    ct = A.compute_dtype(x.dtype)
    out = [xp.empty(n, ct) for _ in range(4)]  # logprob, lse, entropy, top_prob
    rank = xp.empty(n, np.int64)
    A.kernels(x).token_stats(x2, ids, ignore_index, scale, *out, rank)
    logprob, lse, entropy, top_prob = (o.reshape(lead) for o in out)
    rank = rank.reshape(lead)
    return TokenStats(logprob, lse, entropy, rank == 0, top_prob, rank)
