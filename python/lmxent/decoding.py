"""Decoding: logit processing (bias, penalties, temperature, top-k, top-p, min-p),
sampling with log-probabilities, top-k, and beam search (docs/decoding.md has the
exact semantics; lmxent.reference implements the same in float64).

Rows are the logits' leading shape; every parameter (temperature, top_k, top_p,
min_p, penalties, seed, offset) is a scalar or an array of that shape: a serving
batch mixes requests with different settings. The kernels (lmxent/decoding.h) do all
their math in float64, whatever the logits' dtype, and never sort the vocabulary:
top-k keeps a candidate set found from a sample of the row, top-p sorts only the
candidates near the max, the sample walks the survivors once. On the CPU, top-k,
top-p or min-p and greedy rows of 16/32-bit logits (penalties and a sparse bias
allowed) read the logits once or twice, in SIMD, and only the candidates go to
float64 (docs/decoding.md, "The kernels").

NumPy logits run on the CPU kernel; CuPy logits on the CUDA kernel (parameters are
host scalars or NumPy arrays, validated on the host and copied to the device).
The validation helpers here are also the reference's (one set of rules).
"""
from collections import namedtuple

import numpy as np

from . import _arrays as A

__all__ = ["process_logits", "sample", "top_k", "beam_search_step", "beam_search", "Samples",
           "Beams"]

Samples = namedtuple("Samples", "tokens logprob rank top_ids top_logprobs")
Samples.__doc__ = ("One sampled token per row: tokens int64 (-1: no distribution), logprob "
                   "float32 and rank int64 (0 = argmax) of the token, top_ids int64 and "
                   "top_logprobs float32 (rows + (num_logprobs,), descending; -1 and -inf "
                   "past the surviving tokens).")
Beams = namedtuple("Beams", "sequences scores lengths")
Beams.__doc__ = ("Beam search results: sequences (batch, W, t0 + T) padded with eos_id, "
                 "scores (batch, W) length-normalised, descending, lengths (batch, W).")

_LOGPROBS_OF = ("raw", "processed")


# ------------------------------------------------------------------ validation
# (shared with lmxent.reference)

def _is_int(v):
    """A Python or NumPy integer, not a bool (an int subclass, but surely a mistake)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_vocabulary(shape):
    if len(shape) < 1 or shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary axis of length >= 1, got shape {shape}")


def _check_rows_shape(a, name, lead):
    if a.shape not in ((), lead):
        raise ValueError(f"{name} must be a scalar or have the rows' shape {lead}, "
                         f"got shape {a.shape}")


def _scalar(v, integer):
    """v is a Python or NumPy number of the kind (an integer within int64 when
    `integer`): the common case, checked without building arrays first."""
    if _is_int(v):
        return -2**63 <= v < 2**63
    return not integer and isinstance(v, (float, np.floating)) and np.dtype(type(v)).itemsize <= 8


def _per_row(value, name, lead, off, ok, rule, integer=False):
    """`value` (None means `off`) as an array of the rows' shape `lead`: int64 ids/counts
    when `integer`, else float64. A scalar applies to every row. Raises ValueError
    naming the first row (flat index) where ok(values) is False."""
    v = off if value is None else value
    dtype = np.int64 if integer else np.float64
    if _scalar(v, integer):
        if not ok(v):
            raise ValueError(f"{name} must be {rule}, got {v} (row 0)")
        return np.full(lead, v, dtype)
    a = np.asarray(v)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or
                               (not integer and np.issubdtype(a.dtype, np.floating))):
        kind = "integers" if integer else "real numbers"
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    _check_rows_shape(a, name, lead)
    a = np.broadcast_to(a.astype(dtype), lead)
    good, values = np.ravel(ok(a)), np.ravel(a)
    if not good.all():
        r = int(np.argmin(good))
        raise ValueError(f"{name} must be {rule}, got {values[r]} (row {r})")
    return a


def _uint64_per_row(value, name, lead):
    """Seeds and offsets: integers in [0, 2**64), scalar or one per row."""
    if _is_int(value) and 0 <= value < 2**64:
        return np.uint64(value)
    a = np.asarray(value)
    wide = a.dtype == object and all(_is_int(v) for v in a.ravel())  # beyond 64 bits
    if not wide and (a.dtype == bool or not np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{name} must be integers, got {value!r}")
    if wide or (np.issubdtype(a.dtype, np.signedinteger) and (a < 0).any()):
        raise ValueError(f"{name} must be integers in [0, 2**64), got {value!r}")
    _check_rows_shape(a, name, lead)
    return a.astype(np.uint64)


def _row_offsets(seed, offset, lead):
    """(seed_r, offset_r) as uint64 arrays of the rows' shape: a scalar offset o means
    offset_r = (o + r) mod 2**64, r the flat row index."""
    seeds = _uint64_per_row(seed, "seed", lead)
    offsets = _uint64_per_row(offset, "offset", lead)
    if offsets.shape == ():
        rows = np.arange(int(np.prod(lead)), dtype=np.uint64).reshape(lead)
        offsets = offsets + rows  # uint64: wraps mod 2**64
    return np.broadcast_to(seeds, lead), offsets


def _bias(logit_bias, lead, V):
    """The logit bias as float64 (V,) or lead + (V,); sparse {id: bias} -> dense (V,)."""
    if isinstance(logit_bias, dict):
        b = np.zeros(V)
        for i, v in logit_bias.items():
            if not (_is_int(i) and 0 <= i < V):
                raise ValueError(f"logit_bias ids must be integers in [0, {V}), got {i!r}")
            b[i] = v
    else:
        b = np.asarray(logit_bias, dtype=np.float64)
        if b.shape not in ((V,), lead + (V,)):
            raise ValueError(f"dense logit_bias must have shape ({V},) or {lead + (V,)}, "
                             f"got {b.shape}")
    if (np.isnan(b) | (b == np.inf)).any():
        raise ValueError("logit_bias values must be finite or -inf (a ban)")
    return b


def _history(prev_tokens, lead, V):
    """prev_tokens (lead + (L,), -1 = padding) checked, as an int64 array."""
    t = np.asarray(prev_tokens)
    if not np.issubdtype(t.dtype, np.integer) or t.dtype == bool:
        raise TypeError(f"prev_tokens must be an integer array, got dtype {t.dtype}")
    if t.ndim != len(lead) + 1 or t.shape[:-1] != lead:
        raise ValueError(f"prev_tokens must have shape {lead} + (L,), got {t.shape}")
    bad = (t < -1) | (t >= V)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"prev_tokens[{pos}] = {t[pos]} is not a token id in [0, {V}) "
                         f"or -1 (padding)")
    return t.astype(np.int64)


Params = namedtuple("Params", "temperature top_k top_p min_p repetition presence frequency")


def _params(lead, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
            frequency_penalty, prev_tokens):
    """The per-row parameters, checked, as arrays of the rows' shape (float64; top_k
    int64), "off" values for None."""
    T = _per_row(temperature, "temperature", lead, 1.0, lambda v: (v >= 0) & np.isfinite(v),
                 ">= 0 and finite (0 = greedy)")
    k = _per_row(top_k, "top_k", lead, 0, lambda v: v >= 0, ">= 0 (0 = off)", integer=True)
    p = _per_row(top_p, "top_p", lead, 1.0, lambda v: (v > 0) & (v <= 1), "in (0, 1] (1 = off)")
    mp = _per_row(min_p, "min_p", lead, 0.0, lambda v: (v >= 0) & (v <= 1), "in [0, 1] (0 = off)")
    rp = _per_row(repetition_penalty, "repetition_penalty", lead, 1.0,
                  lambda v: (v > 0) & np.isfinite(v), "positive and finite (1 = off)")
    pres = _per_row(presence_penalty, "presence_penalty", lead, 0.0, np.isfinite, "finite")
    freq = _per_row(frequency_penalty, "frequency_penalty", lead, 0.0, np.isfinite, "finite")
    penalised = (rp != 1) | (pres != 0) | (freq != 0)
    if prev_tokens is None and penalised.any():
        raise ValueError("repetition, presence and frequency penalties need prev_tokens")
    return Params(T, k, p, mp, rp, pres, freq)


def _sample_options(num_logprobs, logprobs_of):
    if logprobs_of not in _LOGPROBS_OF:
        raise ValueError(f"logprobs_of must be one of {_LOGPROBS_OF}, got {logprobs_of!r}")
    if not (_is_int(num_logprobs) and num_logprobs >= 0):
        raise ValueError(f"num_logprobs must be an integer >= 0, got {num_logprobs!r}")
    return int(num_logprobs), logprobs_of == "raw"


# ------------------------------------------------------------------ kernels

def _decode(logits, opts, out, sampling):
    """Validate and run the decode kernel. sampling: (seed, offset, num_logprobs, raw)
    or None. Returns (x, xp, lead, processed rows or None, sample outputs or None)."""
    x = A.as_float_array(logits, "logits")
    _check_vocabulary(x.shape)
    xp = A.array_module(x)
    x2, lead = A.rows(x, "logits")
    n, V = x2.shape
    prm = _params(lead, *(opts[k] for k in ("temperature", "top_k", "top_p", "min_p",
                                            "repetition_penalty", "presence_penalty",
                                            "frequency_penalty", "prev_tokens")))

    def dev(a, dtype):  # a per-row (or flat) host array, contiguous, on x's device
        a = np.ascontiguousarray(np.asarray(a, dtype=dtype).reshape(-1))
        return a if xp is np else xp.asarray(a)

    bias = None
    if opts["logit_bias"] is not None:
        bias = dev(_bias(opts["logit_bias"], lead, V), np.float64).reshape(-1, V)
    prev, L = None, 0
    if opts["prev_tokens"] is not None:
        hist = _history(opts["prev_tokens"], lead, V)
        L = hist.shape[-1]
        prev = dev(hist, np.int64) if L else None
    per_row = [dev(v, np.int64 if name == "top_k" else np.float64)
               for name, v in zip(Params._fields, prm)]
    T, k, p, mp, rp, pres, freq = per_row
    res = None
    if out is not None:
        A.check_out(out, x.shape, x.dtype, xp=xp)
        res = A.direct_out(out, x2, xp)
        if res is None:
            res = A.empty(xp, x2.shape, x.dtype)
    elif sampling is None:
        res = A.empty(xp, x2.shape, x.dtype)
    smp = [None] * 5
    nlp, raw, seeds, offsets = 0, True, None, None
    if sampling is not None:
        seed, offset, nlp, raw = sampling
        seeds, offsets = (dev(a, np.uint64) for a in _row_offsets(seed, offset, lead))
        smp = [xp.empty(n, np.int64), xp.empty(n, np.float32), xp.empty(n, np.int64),
               xp.empty(n * nlp, np.int64), xp.empty(n * nlp, np.float32)]
    tokens, logprob, rank, top_ids, top_lps = smp
    A.kernels(x).decode(x2, bias, prev, L, T, k, p, mp, rp, pres, freq, res, seeds, offsets,
                        tokens, logprob, rank, nlp, top_ids, top_lps, raw)
    return x, xp, lead, res, smp


def _options(temperature, logit_bias, top_k, top_p, min_p, repetition_penalty,
             presence_penalty, frequency_penalty, prev_tokens):
    return dict(temperature=temperature, logit_bias=logit_bias, top_k=top_k, top_p=top_p,
                min_p=min_p, repetition_penalty=repetition_penalty,
                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                prev_tokens=prev_tokens)


def process_logits(logits, *, temperature=1.0, logit_bias=None, top_k=None, top_p=None,
                   min_p=None, repetition_penalty=None, presence_penalty=0.0,
                   frequency_penalty=0.0, prev_tokens=None, out=None):
    """The decoding distribution's logits, same shape and dtype: removed entries -inf,
    the rest transformed (see docs/decoding.md and lmxent.reference.process_logits for
    the order and the rules). A row with no distribution is all NaN."""
    opts = _options(temperature, logit_bias, top_k, top_p, min_p, repetition_penalty,
                    presence_penalty, frequency_penalty, prev_tokens)
    x, xp, lead, res, _ = _decode(logits, opts, out, None)
    y = res.reshape(x.shape)
    if out is None:
        return y
    if not A.shares_memory(out, res):
        out[...] = y
    return out


def sample(logits, *, temperature=1.0, logit_bias=None, top_k=None, top_p=None, min_p=None,
           repetition_penalty=None, presence_penalty=0.0, frequency_penalty=0.0,
           prev_tokens=None, seed=0, offset=0, num_logprobs=0, logprobs_of="raw"):
    """One token per row from process_logits(...)'s distribution -> Samples.

    Row r draws with the Philox-4x32-10 uniform u of (seed_r, offset_r) (a scalar offset
    o means o + r): the first token in vocabulary order whose cumulative weight exceeds
    u * total. logprob, rank and the num_logprobs most likely tokens are of the raw
    logits (logprobs_of="raw", vLLM's default) or the processed ones ("processed")."""
    nlp, raw = _sample_options(num_logprobs, logprobs_of)
    opts = _options(temperature, logit_bias, top_k, top_p, min_p, repetition_penalty,
                    presence_penalty, frequency_penalty, prev_tokens)
    x, xp, lead, _, smp = _decode(logits, opts, None, (seed, offset, nlp, raw))
    tokens, logprob, rank, top_ids, top_lps = smp
    return Samples(tokens.reshape(lead), logprob.reshape(lead), rank.reshape(lead),
                   top_ids.reshape(lead + (nlp,)), top_lps.reshape(lead + (nlp,)))


def top_k(x, k, axis=-1):
    """(values, indices) of the k largest entries along `axis`, descending, like
    torch.topk: values in x's dtype, indices int64; NaN counts as larger than any
    number, ties in the lower index first. No sort of the whole axis."""
    x = A.as_float_array(x, "x")
    xp = A.array_module(x)
    if x.ndim < 1:
        raise ValueError("x: expected at least 1 dimension, got a scalar")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of bounds for an array of {x.ndim} dimensions")
    axis %= x.ndim
    V = x.shape[axis]
    if not (_is_int(k) and 0 <= k <= V):
        raise ValueError(f"k must be an integer in [0, {V}], got {k!r}")
    k = int(k)
    moved = xp.moveaxis(x, axis, -1)
    lead = moved.shape[:-1]
    if V == 0:
        return xp.empty(lead + (0,), x.dtype), xp.empty(lead + (0,), np.int64)
    x2, lead = A.rows(moved, "x")
    values = xp.empty((x2.shape[0], k), x.dtype)
    indices = xp.empty(x2.shape[0] * k, np.int64)
    A.kernels(x).top_k(x2, k, values, indices)
    return (xp.moveaxis(values.reshape(lead + (k,)), -1, axis),
            xp.moveaxis(indices.reshape(lead + (k,)), -1, axis))


# ------------------------------------------------------------------ beam search
# (the loop and the step are shared with lmxent.reference, which passes its float64
# log_softmax and top_k)

def _beam_step(scores, logprobs, beam_width, finished, eos_id, top_k_fn, xp, dtype=None):
    s = xp.asarray(scores, dtype=dtype)
    lp = xp.asarray(logprobs, dtype=dtype)
    if s.ndim != 2 or lp.ndim != 3 or lp.shape[:2] != s.shape:
        raise ValueError(f"need scores (batch, W) and logprobs (batch, W, V), got "
                         f"{s.shape} and {lp.shape}")
    batch, W, V = lp.shape
    if not (_is_int(beam_width) and 1 <= beam_width <= W * V):
        raise ValueError(f"beam_width must be an integer in [1, W * V = {W * V}], "
                         f"got {beam_width!r}")
    cand = s[..., None] + lp
    if finished is not None:
        fin = xp.asarray(finished, dtype=bool)
        if fin.shape != s.shape:
            raise ValueError(f"finished must have shape {s.shape}, got {fin.shape}")
        if fin.any():
            if not (_is_int(eos_id) and 0 <= eos_id < V):
                raise ValueError(f"eos_id must be a token id in [0, {V}) when a beam has "
                                 f"finished, got {eos_id!r}")
            only_eos = xp.where(xp.arange(V) == eos_id, s[..., None], -xp.inf)
            cand = xp.where(fin[..., None], only_eos, cand)
    new_scores, flat = top_k_fn(cand.reshape(batch, W * V), int(beam_width))
    return new_scores, flat // V, flat % V


def beam_search_step(scores, logprobs, beam_width, *, finished=None, eos_id=None):
    """One step of beam search -> (new scores, parent beam, token), each (batch, beam_width):
    the beam_width best of scores[b, i] + logprobs[b, i, v] over (beam, token), by the
    top_k kernel over the (batch, W * V) candidates (ties: lower beam, then lower
    token). A finished beam (finished[b, i]) is the single candidate (its score,
    eos_id): it keeps its slot and its score."""
    xp = A.array_module(logprobs)
    return _beam_step(scores, logprobs, beam_width, finished, eos_id, top_k, xp)


def _beam_loop(step_fn, prompts, beam_width, max_len, eos_id, length_penalty, reorder,
               log_softmax, step):
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(f"prompts must be an integer array (batch, t0), got {prompts.dtype} "
                         f"{prompts.shape}")
    for name, v in (("beam_width", beam_width), ("max_len", max_len)):
        if not (_is_int(v) and v >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be finite, got {length_penalty}")
    batch, W = prompts.shape[0], int(beam_width)
    seqs = np.repeat(prompts.astype(np.int64), W, axis=0)
    scores = np.full((batch, W), -np.inf)
    scores[:, 0] = 0.0
    finished = np.zeros((batch, W), dtype=bool)
    lengths = np.zeros((batch, W), dtype=np.int64)
    beam_rows = np.arange(batch)[:, None] * W
    for _ in range(max_len):
        logits = np.asarray(step_fn(seqs.copy()), dtype=np.float64)
        if logits.ndim != 2 or logits.shape[0] != batch * W:
            raise ValueError(f"step_fn must return logits ({batch * W}, V), got {logits.shape}")
        V = logits.shape[1]
        if not (_is_int(eos_id) and 0 <= eos_id < V):
            raise ValueError(f"eos_id must be a token id in [0, {V}), got {eos_id}")
        logp = log_softmax(logits).reshape(batch, W, V)
        scores, parent, tokens = step(scores, logp, W, finished=finished, eos_id=eos_id)
        rows = (beam_rows + parent).reshape(-1)
        was_finished = finished.reshape(-1)[rows].reshape(batch, W)
        lengths = lengths.reshape(-1)[rows].reshape(batch, W) + ~was_finished
        finished = was_finished | (tokens == eos_id)
        seqs = np.concatenate([seqs[rows], tokens.reshape(-1, 1)], axis=1)
        if reorder is not None:
            reorder(rows)
        if finished.all():
            break
    with np.errstate(invalid="ignore"):  # -inf / L: a beam with no finite path
        norm = scores / lengths.astype(np.float64) ** length_penalty
    order = np.argsort(-norm, axis=1, kind="stable")
    seqs = seqs.reshape(batch, W, -1)
    pick = (np.arange(batch)[:, None], order)
    return Beams(seqs[pick], norm[pick], lengths[pick])


def beam_search(step_fn, prompts, *, beam_width, max_len, eos_id, length_penalty=1.0,
                reorder=None):
    """Beam search from `prompts` (batch, t0) -> Beams(sequences, scores, lengths).

    Each step calls step_fn(tokens (batch * W, t)) -> logits (batch * W, V) (NumPy), takes
    their log-softmax (float64) and beam_search_step, then reorder(parent) with the flat
    parent row (batch * W,) of each new row, when given (a KV cache follows with
    cache[parent]). Stops after max_len new tokens or when every beam has emitted eos_id.
    scores are sum log p / L**length_penalty (L the generated length, EOS included),
    sorted descending; see lmxent.reference.beam_search for the full conventions."""
    from .softmax import log_softmax
    return _beam_loop(step_fn, prompts, beam_width, max_len, eos_id, length_penalty, reorder,
                      log_softmax, beam_search_step)
