"""Sequence-level evaluation math: sequence scores, answer masks, perplexity, bits
per byte and calibration. Written once against the array module of the input
(NumPy or CuPy); the per-token log-probabilities come from one cross_entropy pass.

Conventions (the float64 oracle is lmxent.reference):

- A mean over zero tokens (or bytes) is 0.0, not NaN: an all-masked sequence has
  n_tokens 0, logprob_sum 0 and mean_logprob 0.0; perplexity(0, 0) is 1.0 and
  bits_per_byte(x, 0) is 0.0. No RuntimeWarning is emitted for these.
- Sums and means are float64; token counts and bin counts are int64.
- Arrays in -> arrays out of the same library (0-d for 0-d input); perplexity and
  bits_per_byte return a Python float when both arguments are Python numbers.
- Validation needs a few host reads of small arrays (token ids, lengths, counts);
  the logits are only read by the kernel.
"""
import math
from collections import namedtuple

import numpy as np

from . import _arrays as A
from ._options import mean
from .cross_entropy import cross_entropy

__all__ = ["sequence_scores", "answer_mask", "perplexity", "bits_per_byte", "calibration"]

SequenceScores = namedtuple("SequenceScores", "logprob_sum n_tokens mean_logprob")
SequenceScores.__doc__ = """Per-sequence scores, arrays shaped like tokens without the time axis:
logprob_sum (float64, sum of log p over the scored tokens, <= 0), n_tokens (int64) and
mean_logprob (float64, logprob_sum / n_tokens; 0.0 where n_tokens is 0)."""

Calibration = namedtuple("Calibration", "ece mce bin_edges counts accuracy confidence")
Calibration.__doc__ = """ece, mce (0-d float64), bin_edges (n_bins + 1,), counts (n_bins,)
int64, and per-bin mean accuracy and mean confidence (n_bins,) float64, NaN for empty bins."""


def _module(*values):
    """The array module of a call: CuPy if any argument is a CuPy array (the others,
    host arrays, lists and numbers, are then copied to the device), else NumPy."""
    return next((A.array_module(v) for v in values if A._is_cupy(v)), np)


def _position(flat_index, shape):
    return tuple(int(k) for k in np.unravel_index(int(flat_index), shape))


def _first_bad(bad, values, name, problem):
    """Raise ValueError naming the first True position of `bad` in `values`."""
    xp = A.array_module(bad)
    if bool(bad.any()):
        i = int(xp.argmax(bad.reshape(-1)))
        pos = _position(i, bad.shape)
        raise ValueError(f"{name}: value {values.reshape(-1)[i].item()} at position {pos} "
                         f"{problem}")


def _integers(x, name, xp):
    x = A.asarray(x, name, xp)
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integers, got dtype {x.dtype}")
    return x


def _flags(x, name, shape, xp):
    """A boolean array of `shape` from bool, or from integers / floats that are all 0 or 1."""
    x = A.asarray(x, name, xp)
    if x.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {x.shape}")
    if x.dtype.kind == "b":
        return x
    if x.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected booleans (or 0/1 numbers), got dtype {x.dtype}")
    _first_bad((x != 0) & (x != 1), x, name, "is not 0 or 1 (expected booleans)")
    return x != 0


def _reals(x, name, xp):
    """A float64 array of real numbers (bool, complex, object and str are refused)."""
    x = A.asarray(x, name, xp)
    if x.dtype.kind not in "fiu" and x.dtype != A.bfloat16_dtype():
        raise TypeError(f"{name}: expected real numbers, got dtype {x.dtype}")
    return x.astype(np.float64, copy=False)


# ------------------------------------------------------------------ sequences

def sequence_scores(logits, tokens, *, shift=True, mask=None, ignore_index=-100):
    """Log-probability of each sequence: logits (..., T, V), tokens (..., T) integer ids.

    shift=True (causal LM): logits[..., t, :] predicts tokens[..., t + 1], so token 0
    is never a target and the last position's logits are not used. shift=False:
    logits[..., t, :] scores tokens[..., t].

    A token is a target (scored) when mask is True there (mask: bool, or 0/1, shaped
    like tokens; None keeps every token) and it is not ignore_index: set mask False for
    prompt and padding tokens (see answer_mask). Only targets must be valid ids in
    [0, V); other tokens are never read.

    Returns SequenceScores(logprob_sum, n_tokens, mean_logprob), arrays of shape (...):
    float64 sums of log p(target) (NaN in a target's logits propagates to its sequence),
    int64 target counts, and the per-token mean, 0.0 for a sequence without targets.
    """
    x = A.as_float_array(logits, "logits")
    if x.ndim < 2:
        raise ValueError(f"logits: expected shape (..., T, V), got {x.shape}")
    V = x.shape[-1]
    if V == 0:
        raise ValueError("logits: the vocabulary axis is empty (V = 0)")
    xp = A.array_module(x)
    tokens = _integers(tokens, "tokens", xp)
    if tokens.shape != x.shape[:-1]:
        raise ValueError(f"tokens: expected shape {x.shape[:-1]} (the logits' shape without "
                         f"the vocabulary axis), got {tokens.shape}")
    ignore_index = A.ignore_index(ignore_index)

    # The core's id rule: uint64 ids >= 2**63 are out of range, never ignore_index.
    ids, keep = A.int64_ids(tokens, V, ignore_index, xp)
    if mask is not None:
        keep &= _flags(mask, "mask", tokens.shape, xp)
    if shift:
        keep[..., :1] = False  # the first token has no prediction
    _first_bad(keep & ((ids < 0) | (ids >= V)), tokens, "tokens",
               f"is out of range [0, {V}) and is not ignore_index ({ignore_index})")

    # Targets aligned with the logits' positions, so the kernel reads the logits in
    # place (logits[..., :-1, :] would be copied): with shift, position t scores token
    # t + 1 and the last position scores nothing.
    ids = xp.where(keep, ids, ignore_index)
    if shift:
        targets = xp.full(tokens.shape, ignore_index, dtype=np.int64)
        targets[..., :-1] = ids[..., 1:]
    else:
        targets = ids
    nll = cross_entropy(x, targets, ignore_index=ignore_index, reduction="none")
    # 0.0 - sum, not -sum: no -0.0 when empty; asarray: NumPy would give a scalar for 0-d
    logprob_sum = xp.asarray(0.0 - nll.sum(axis=-1, dtype=np.float64))
    n_tokens = xp.asarray(keep.sum(axis=-1, dtype=np.int64))
    return SequenceScores(logprob_sum, n_tokens, xp.asarray(mean(logprob_sum, n_tokens, xp)))


def answer_mask(prompt_lengths, lengths, T):
    """(..., T) bool mask of the answer tokens: position p of sequence b is kept when
    prompt_lengths[b] <= p < lengths[b]. prompt_lengths and lengths are integer arrays of
    the same shape (...), with 0 <= prompt_lengths <= lengths <= T.

    With sequence_scores(..., shift=True) position 0 is never scored, so a prompt of
    length 0 scores from token 1."""
    xp = _module(prompt_lengths, lengths)
    p = _integers(prompt_lengths, "prompt_lengths", xp)
    n = _integers(lengths, "lengths", xp)
    if p.shape != n.shape:
        raise ValueError(f"prompt_lengths and lengths must have the same shape, got "
                         f"{p.shape} and {n.shape}")
    T = A.integer(T, "T")
    if not 0 <= T < 2**63:
        raise ValueError(f"T must be >= 0 and fit in int64, got {T}")
    _first_bad(p < 0, p, "prompt_lengths", "is negative")
    _first_bad(n < 0, n, "lengths", "is negative")
    _first_bad(n > T, n, "lengths", f"exceeds T = {T} (T is too small)")
    _first_bad(p > n, p, "prompt_lengths", "exceeds the sequence's length")
    pos = xp.arange(T)
    return (p[..., None] <= pos) & (pos < n[..., None])


# -------------------------------------------------------- per-token / per-byte

def _per_count(nll_sum, count, count_name):
    """(nll_sum / count as a float64 array, 0.0 where count is 0; whether both
    arguments were numbers rather than arrays)."""
    scalar = all(isinstance(v, (int, float, np.generic)) for v in (nll_sum, count))
    xp = _module(nll_sum, count)
    total, count = _reals(nll_sum, "nll_sum", xp), _reals(count, count_name, xp)
    try:
        np.broadcast_shapes(total.shape, count.shape)
    except ValueError:
        raise ValueError(f"nll_sum and {count_name}: shapes {total.shape} and {count.shape} "
                         "do not broadcast") from None
    _first_bad(~xp.isfinite(count) | (count < 0), count, count_name,
               "is not a finite number >= 0")
    # nll_sum = -logprob_sum >= 0; a negative value is almost surely a log-probability
    # passed by mistake. NaN passes (NaN in the logits propagates) and so does +inf.
    _first_bad(total < 0, total, "nll_sum",
               "is negative (expected a negative log-likelihood: pass -logprob_sum)")
    return mean(total, count, xp), scalar


def _result(out, scalar):
    # NumPy turns 0-d results into scalars; arrays in give arrays out
    return float(out) if scalar else A.array_module(out).asarray(out)


def perplexity(nll_sum, n_tokens):
    """exp(nll_sum / n_tokens) elementwise (arrays broadcast); 1.0 where n_tokens is 0
    (a mean over zero tokens is 0), inf where the mean overflows exp. nll_sum is a
    summed negative log-likelihood in nats (-SequenceScores.logprob_sum, or a
    cross_entropy reduction="sum"); n_tokens >= 0 may be fractional (weighted counts).
    float64 array, or a Python float when both arguments are Python numbers."""
    mean, scalar = _per_count(nll_sum, n_tokens, "n_tokens")
    with np.errstate(over="ignore"):  # an overflowing exp is inf, not an error
        out = A.array_module(mean).exp(mean)
    return _result(out, scalar)


def bits_per_byte(nll_sum, n_bytes):
    """nll_sum / ln 2 / n_bytes elementwise (arrays broadcast): bits per byte of text,
    comparable across tokenizers (unlike perplexity per token). 0.0 where n_bytes is 0
    (a mean over zero bytes is 0, as for tokens). float64 array, or a Python float when
    both arguments are Python numbers."""
    mean, scalar = _per_count(nll_sum, n_bytes, "n_bytes")
    return _result(mean / math.log(2), scalar)


# --------------------------------------------------------------- calibration

def calibration(confidence, correct, *, n_bins=15):
    """Expected and maximum calibration error with equal-width bins over [0, 1].

    confidence: real numbers in [0, 1] (any shape, e.g. top_prob of token_stats);
    correct: booleans (or 0/1) of the same shape. Bin i is (edges[i], edges[i + 1]]
    with edges = linspace(0, 1, n_bins + 1); a confidence of exactly 0 goes in the
    first bin. ECE = sum over bins of (count / N) * |accuracy - confidence|, MCE = the
    largest |accuracy - confidence|; empty bins are skipped in both. Per-bin accuracy
    and confidence are NaN for empty bins. No samples: ece = mce = 0.0, all counts 0.

    Returns Calibration(ece, mce, bin_edges, counts, accuracy, confidence)."""
    xp = _module(confidence, correct)
    conf = _reals(confidence, "confidence", xp)
    ok = _flags(correct, "correct", conf.shape, xp)
    n_bins = A.integer(n_bins, "n_bins")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    _first_bad(~((conf >= 0) & (conf <= 1)), conf, "confidence",
               "is not a number in [0, 1]")  # NaN fails both comparisons

    conf, ok = conf.reshape(-1), ok.reshape(-1)
    edges = xp.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted 'left' finds i with edges[i] < c <= edges[i + 1], i.e. (lo, hi];
    # c = 0 gives -1 and joins the first bin.
    idx = xp.clip(xp.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts = xp.bincount(idx, minlength=n_bins).astype(np.int64)
    sum_conf = xp.bincount(idx, weights=conf, minlength=n_bins)
    sum_ok = xp.bincount(idx, weights=ok.astype(np.float64), minlength=n_bins)
    nonempty = counts > 0
    acc, mean_conf = mean(sum_ok, counts, xp), mean(sum_conf, counts, xp)
    # In each bin (count / N) * |acc - conf| = |sum_ok - sum_conf| / N; empty bins add 0.
    ece = xp.abs(sum_ok - sum_conf).sum() / max(conf.size, 1)
    mce = xp.abs(acc - mean_conf).max()  # 0 for empty bins, so they never win
    return Calibration(xp.asarray(ece), xp.asarray(mce), edges, counts,
                       xp.where(nonempty, acc, np.nan), xp.where(nonempty, mean_conf, np.nan))
