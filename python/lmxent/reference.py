"""Float64 NumPy reference implementation of lmxent (the oracle).

Plain NumPy, straight from the formulas, for verifying the compiled kernels. Every input
is converted to float64 and every result is a float64 NumPy array (scalars are 0-d).

Cross-entropy notation, per token (row of logits, vocabulary V on the last axis):

    z   = logit_scale * x, then z = softcap * tanh(z / softcap) if softcap is given
    lse = log(sum_j exp(z_j)),   p = exp(z - lse)
    b   = the token's effective target weights, so that
          loss = sum_j b_j * (lse - z_j) + z_loss * lse**2
          grad = A * p - b,  A = sum_j b_j + 2 * z_loss * lse   (w.r.t. z)
    class id t:  b_j = (1 - eps) * w[t] * [j == t] + (eps / V) * w[j]
    probs q:     b_j = w[j] * ((1 - eps) * q_j + eps / V)

Ignored tokens (class id == ignore_index) have loss 0 and gradient 0. "mean" divides the
summed loss by the number of non-ignored tokens (the sum of w[t] over them when `weight`
is given; the number of rows for probability targets), or by `normalizer` when given; a
"mean" with denominator 0 is 0.0 (not NaN, unlike torch).
"""
import numpy as np

_REDUCTIONS = ("none", "mean", "sum")


def _check_temperature(temperature):
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _log_softmax_lse(u, k, axis=-1, relative=False):
    """(log softmax, lse) of z = k * u along `axis` (keepdims): z - lse, with
    lse = m + log sum exp(z - m) for m the max of z; where k m is huge (a temperature
    or scale far from 1) relative to the max of u instead,
    k (u - m) - log sum exp(k (u - m)), exact for any k > 0 (z and lse themselves may
    overflow; k (u - m) only to -inf, a probability of 0)."""
    u = np.asarray(u, dtype=np.float64)
    m = np.max(u, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # all -inf row -> -inf; +inf -> inf; NaN stays
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        km = np.where(m == 0, 0.0, k * m)
        z = k * u
        lse = km + np.log(np.sum(np.exp(z - km), axis=axis, keepdims=True))
        d = np.where(u == m, 0.0, k * (u - m))  # k (u - m) is 0 at the max, even for k = inf
        ls = np.log(np.sum(np.exp(d), axis=axis, keepdims=True))
        huge = relative | (np.abs(km) > 2.0**20)  # z - lse would lose log sum to rounding
        return np.where(huge, d - ls, z - lse), np.where(huge, km + ls, lse)


def logsumexp(x, axis=-1, *, keepdims=False, temperature=1.0):
    """log(sum(exp(x / temperature))) along `axis`, computed stably."""
    _check_temperature(temperature)
    _, out = _log_softmax_lse(x, 1.0 / temperature, axis)
    return out if keepdims else np.squeeze(out, axis=axis)


def log_softmax(x, axis=-1, *, temperature=1.0):
    """log(softmax(x / temperature)) along `axis`."""
    _check_temperature(temperature)
    return _log_softmax_lse(x, 1.0 / temperature, axis)[0]


def softmax(x, axis=-1, *, temperature=1.0):
    """softmax(x / temperature) along `axis`."""
    return np.exp(log_softmax(x, axis, temperature=temperature))


def _transform(logits, softcap, logit_scale):
    """Return (u, k) with z = k * u the scaled, then soft-capped logits, and dz/dx.
    Without a softcap u = logits and k = logit_scale (z may be beyond float64's range:
    see _log_softmax_lse)."""
    x = np.asarray(logits, dtype=np.float64)
    if softcap is None:
        return x, logit_scale, np.full_like(x, logit_scale)
    if not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    with np.errstate(over="ignore", invalid="ignore"):
        t = np.tanh(logit_scale * x / softcap)
        z = np.where(np.abs(t) < 2.0**-27, logit_scale * x, softcap * t)  # tanh(y) = y there
    return z, 1.0, logit_scale * (1.0 - t * t)


def _row_terms(logits, targets, weight, ignore_index, reduction, label_smoothing,
               normalizer):
    """Validate; return effective targets b (..., V), token mask and mean denominator."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if normalizer is not None:
        if reduction != "mean":
            raise ValueError("normalizer is only allowed with reduction='mean'")
        if not normalizer > 0:
            raise ValueError(f"normalizer must be positive, got {normalizer}")
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {eps}")
    shape = np.shape(logits)
    if len(shape) < 1:
        raise ValueError("logits must have at least one dimension (the vocabulary)")
    V = shape[-1]
    w = np.ones(V) if weight is None else np.asarray(weight, dtype=np.float64)
    if w.shape != (V,):
        raise ValueError(f"weight must have shape ({V},), got {w.shape}")
    targets = np.asarray(targets)

    if np.issubdtype(targets.dtype, np.integer):  # class ids
        if targets.shape != shape[:-1]:
            raise ValueError(f"class-id targets must have shape {shape[:-1]}, "
                             f"got {targets.shape}")
        mask = targets != ignore_index
        bad = mask & ((targets < 0) | (targets >= V))
        if bad.any():
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"target {targets[pos]} at position {pos} is out of range "
                             f"[0, {V}) and is not ignore_index ({ignore_index})")
        t = np.where(mask, targets, 0)
        b = (1.0 - eps) * w[t][..., None] * (np.arange(V) == t[..., None])
        b = np.where(mask[..., None], b + (eps / V) * w, 0.0)
        denom = mask.sum() if weight is None else np.sum(w[t] * mask)
    else:  # probability targets: every row counts, no ignore_index
        q = np.asarray(targets, dtype=np.float64)
        if q.shape != shape:
            raise ValueError(f"probability targets must have shape {shape}, got {q.shape}")
        if ignore_index >= 0:  # like torch: a class-id ignore_index means a mistake
            raise ValueError("ignore_index is not supported for probability targets")
        b = w * ((1.0 - eps) * q + eps / V)
        mask = np.ones(shape[:-1], dtype=bool)
        denom = mask.size
    return b, mask, float(denom if normalizer is None else normalizer)


def cross_entropy(logits, targets, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                  normalizer=None, return_lse=False):
    """Cross-entropy of `targets` under softmax(logits); see the module docstring."""
    b, mask, denom = _row_terms(logits, targets, weight, ignore_index, reduction,
                                label_smoothing, normalizer)
    u, k, _ = _transform(logits, softcap, logit_scale)
    lsm, lse = _log_softmax_lse(u, k)
    lse = lse[..., 0]
    with np.errstate(invalid="ignore", over="ignore"):  # 0 * inf where b_j == 0 and z_j == -inf
        terms = np.where(b != 0, -b * lsm, 0.0)
        # z_loss 0 adds 0, even to an infinite lse; (z_loss * lse) * lse: no overflow of lse**2
        # when z_loss is tiny
        zl = (z_loss * lse) * lse if z_loss != 0 else 0.0
        loss = np.where(mask, terms.sum(axis=-1) + zl, 0.0)
    if reduction == "sum":
        loss = np.float64(loss.sum())
    elif reduction == "mean":
        loss = np.float64(loss.sum() / denom if denom != 0 else 0.0)
    return (loss, lse) if return_lse else loss


def cross_entropy_backward(logits, targets, lse, grad_output, *, weight=None,
                           ignore_index=-100, reduction="mean", label_smoothing=0.0,
                           z_loss=0.0, softcap=None, logit_scale=1.0, normalizer=None):
    """Gradient of cross_entropy w.r.t. logits, given the per-token `lse` of z."""
    b, mask, denom = _row_terms(logits, targets, weight, ignore_index, reduction,
                                label_smoothing, normalizer)
    u, k, dz_dx = _transform(logits, softcap, logit_scale)
    lse = np.asarray(lse, dtype=np.float64)
    if lse.shape != mask.shape:
        raise ValueError(f"lse must have shape {mask.shape}, got {lse.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        p = np.exp(k * u - lse[..., None])
    return _grad(b, mask, denom, p, lse, dz_dx, grad_output, reduction, z_loss)


def _grad(b, mask, denom, p, lse, dz_dx, grad_output, reduction, z_loss):
    """(A p - b) dz/dx times the grad_output factor, on the non-ignored tokens."""
    if reduction == "none":
        factor = np.broadcast_to(np.asarray(grad_output, dtype=np.float64), mask.shape)
    elif np.ndim(grad_output) != 0:
        raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}")
    elif reduction == "sum":
        factor = float(grad_output)
    else:
        factor = float(grad_output) / denom if denom != 0 else 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        A = b.sum(axis=-1) + (2.0 * z_loss * lse if z_loss != 0 else 0.0)
        Ap = np.where(p == 0, 0.0, A[..., None] * p)  # A may be huge where p underflowed
        g = (Ap - b) * dz_dx * np.asarray(factor)[..., None]
    return np.where(mask[..., None], g, 0.0)


def cross_entropy_with_grad(logits, targets, *, weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, z_loss=0.0,
                            softcap=None, logit_scale=1.0, normalizer=None,
                            grad_output=1.0):
    """Return (cross_entropy(...), its gradient w.r.t. logits scaled by grad_output)."""
    opts = dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                logit_scale=logit_scale, normalizer=normalizer)
    loss, lse = cross_entropy(logits, targets, return_lse=True, **opts)
    # p from the log-softmax (exp(z - lse) loses it where z and lse are huge)
    b, mask, denom = _row_terms(logits, targets, weight, ignore_index, reduction,
                                label_smoothing, normalizer)
    u, k, dz_dx = _transform(logits, softcap, logit_scale)
    p = np.exp(_log_softmax_lse(u, k)[0])
    return loss, _grad(b, mask, denom, p, lse, dz_dx, grad_output, reduction, z_loss)


# ---------------------------------------------------------------------------
# Evaluation math (lmxent.evaluation): sequence scores, answer masks, perplexity,
# bits per byte, calibration. Loops straight from the definitions. Counts are int64
# and masks bool; everything else is float64. A mean over zero tokens/bytes is 0.0.

from .evaluation import Calibration, SequenceScores  # noqa: E402 (the same result types)


def sequence_scores(logits, tokens, *, shift=True, mask=None, ignore_index=-100):
    """Sum, count and mean of log p(token) over each sequence's targets: token t is a
    target when mask[t] (default True), tokens[t] != ignore_index and, with shift, t >= 1;
    it is scored by logits[t - 1] (shift=True) or logits[t] (shift=False)."""
    x = np.asarray(logits, dtype=np.float64)
    tokens = np.asarray(tokens)
    if x.ndim < 2 or tokens.shape != x.shape[:-1]:
        raise ValueError(f"tokens must have shape {x.shape[:-1]}, got {tokens.shape}")
    V, T = x.shape[-1], tokens.shape[-1]
    keep = tokens != ignore_index
    if mask is not None:
        keep &= np.asarray(mask).astype(bool)
    lead = tokens.shape[:-1]
    logprob_sum, n_tokens = np.zeros(lead), np.zeros(lead, dtype=np.int64)
    for s in np.ndindex(lead):
        logp = log_softmax(x[s])  # (T, V)
        for t in range(1 if shift else 0, T):
            if not keep[s + (t,)]:
                continue
            tok = int(tokens[s + (t,)])
            if not 0 <= tok < V:
                raise ValueError(f"token {tok} at position {s + (t,)} is out of range [0, {V})")
            logprob_sum[s] += logp[t - 1 if shift else t, tok]
            n_tokens[s] += 1
    mean = np.divide(logprob_sum, n_tokens, out=np.zeros(lead), where=n_tokens > 0)
    return SequenceScores(logprob_sum, n_tokens, mean)


def answer_mask(prompt_lengths, lengths, T):
    """mask[..., p] = prompt_lengths[...] <= p < lengths[...]."""
    prompt_lengths, lengths = np.asarray(prompt_lengths), np.asarray(lengths)
    if prompt_lengths.shape != lengths.shape:
        raise ValueError("prompt_lengths and lengths must have the same shape")
    mask = np.zeros(lengths.shape + (T,), dtype=bool)
    for s in np.ndindex(lengths.shape):
        if not 0 <= prompt_lengths[s] <= lengths[s] <= T:
            raise ValueError(f"need 0 <= prompt_length <= length <= T at {s}")
        for p in range(prompt_lengths[s], lengths[s]):
            mask[s + (p,)] = True
    return mask


def _mean_per(total, count):
    """total / count elementwise, 0.0 where count is 0."""
    total, count = np.asarray(total, dtype=np.float64), np.asarray(count, dtype=np.float64)
    if (count < 0).any():
        raise ValueError("counts must be >= 0")
    out = np.zeros(np.broadcast_shapes(total.shape, count.shape))
    return np.divide(total, count, out=out, where=count > 0)


def perplexity(nll_sum, n_tokens):
    """exp(nll_sum / n_tokens); 1.0 where n_tokens is 0."""
    with np.errstate(over="ignore"):
        return np.exp(_mean_per(nll_sum, n_tokens))


def bits_per_byte(nll_sum, n_bytes):
    """nll_sum / ln 2 / n_bytes; 0.0 where n_bytes is 0."""
    return _mean_per(nll_sum, n_bytes) / np.log(2)


def calibration(confidence, correct, *, n_bins=15):
    """ECE and MCE over equal-width bins (lo, hi] of [0, 1] (confidence 0 joins the
    first bin); bins weighted by their fraction of the samples; empty bins skipped
    (their accuracy and confidence are NaN)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ok = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.shape != ok.shape or not ((conf >= 0) & (conf <= 1)).all():
        raise ValueError("need confidences in [0, 1] and one correct flag per confidence")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.zeros(n_bins, dtype=np.int64)
    accuracy, mean_conf = np.full(n_bins, np.nan), np.full(n_bins, np.nan)
    ece = mce = 0.0
    for i in range(n_bins):
        in_bin = (conf > edges[i]) & (conf <= edges[i + 1])
        if i == 0:
            in_bin |= conf == 0
        counts[i] = in_bin.sum()
        if counts[i] == 0:
            continue
        accuracy[i], mean_conf[i] = ok[in_bin].mean(), conf[in_bin].mean()
        gap = abs(accuracy[i] - mean_conf[i])
        ece += counts[i] / conf.size * gap
        mce = max(mce, gap)
    return Calibration(np.float64(ece), np.float64(mce), edges, counts, accuracy, mean_conf)


# ---- token statistics and KL divergence ------------------------------------


def token_stats(logits, targets, *, ignore_index=-100, temperature=1.0):
    """Per-token logprob, lse, entropy, correct, top_prob, rank (lmxent.token_stats's
    conventions: ignored targets get logprob 0, correct False, rank -1; NaN rows rank -1)."""
    from .token_stats import TokenStats
    _check_temperature(temperature)
    z = np.asarray(logits, dtype=np.float64)  # ranks and argmax: the order of x / T
    V = z.shape[-1]
    lp, lse = _log_softmax_lse(z, 1.0 / temperature)
    lse = lse[..., 0]
    with np.errstate(invalid="ignore"):
        p = np.exp(lp)
        entropy = -np.sum(np.where(p > 0, p * lp, 0.0), axis=-1)
        entropy = np.where(np.isfinite(lse), entropy, np.nan)
        t = np.asarray(targets)
        ignored = t == ignore_index
        tt = np.where(ignored, 0, t).astype(np.int64)
        zt = np.take_along_axis(z, tt[..., None], -1)
        above = np.sum(z > zt, axis=-1) + np.sum((z == zt) & (np.arange(V) < tt[..., None]), axis=-1)
        rank = np.where(ignored | np.isnan(lse), -1, above)
        logprob = np.where(ignored, 0.0, np.take_along_axis(lp, tt[..., None], -1)[..., 0])
        top_prob = np.exp(np.max(lp, axis=-1))
    return TokenStats(logprob, lse, entropy, rank == 0, top_prob, rank)


def _log_probs(x, temperature):
    """log softmax of x / temperature over the last axis, always relative to the row's
    max: KL subtracts two of them, so the shared offset of a row (1e6 + log 3 keeps
    only ~10 digits of log 3 in float64) must cancel exactly."""
    _check_temperature(temperature)
    return _log_softmax_lse(x, 1.0 / temperature, relative=True)[0]


def kl_divergence(student_logits, teacher_logits, *, temperature=1.0, direction="forward",
                  reduction="batchmean", mask=None, grad_output=1.0, return_grad=False):
    """KL(q || p) (forward), KL(p || q) (reverse) or Jensen-Shannon (js) of
    p = softmax(student / T), q = softmax(teacher / T); terms with zero weight are 0.
    "batchmean" divides by the number of rows counted (mask True); 0 rows give 0.
    With return_grad, also d loss / d student_logits * grad_output."""
    ls = _log_probs(student_logits, temperature)
    lt = _log_probs(teacher_logits, temperature)
    p, q = np.exp(ls), np.exp(lt)

    def weighted(w, a):  # sum_j w_j a_j with w_j = 0 contributing 0
        return np.where(w > 0, w * a, 0.0)

    # an overflow below is a true inf, or dropped by weighted()
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if direction == "forward":
            kl = weighted(q, lt - ls).sum(-1)
            g = p - q
        elif direction == "reverse":
            kl = weighted(p, ls - lt).sum(-1)
            g = weighted(p, ls - lt - kl[..., None])
        elif direction == "js":
            lm = np.log((p + q) / 2)
            kl_p = weighted(p, ls - lm).sum(-1)
            kl = (kl_p + weighted(q, lt - lm).sum(-1)) / 2
            g = weighted(p, (ls - lm) / 2 - kl_p[..., None] / 2)
        else:
            raise ValueError(f"unknown direction {direction!r}")
    # NaN where either softmax is undefined (a NaN, +inf, or no finite logit)
    defined = np.isfinite(logsumexp(student_logits, temperature=temperature)) & \
        np.isfinite(logsumexp(teacher_logits, temperature=temperature))
    kl = np.where(defined, kl, np.nan)
    g = np.where(defined[..., None], g, np.nan)
    keep = np.ones(kl.shape, bool) if mask is None else np.asarray(mask, bool)
    kl = np.where(keep, kl, 0.0)
    count = int(keep.sum())
    g = np.where(keep[..., None], g, 0.0) / temperature
    if reduction == "none":
        out, gs = kl, np.asarray(grad_output, np.float64)[..., None]
    elif reduction in ("sum", "batchmean"):
        div = count if reduction == "batchmean" else 1
        out = np.float64(kl.sum() / div if div else 0.0)
        gs = float(grad_output) / div if div else 0.0
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    return (out, g * gs) if return_grad else out


# ---------------------------------------------------------------------------
# The LM head (lmxent.linear_cross_entropy): the same losses of the logits
# hidden @ weight.T + bias, here materialised. `class_weight` is cross_entropy's
# `weight` (the name `weight` is the (V, D) matrix).


def _head_logits(hidden, weight, bias):
    z = np.asarray(hidden, dtype=np.float64) @ np.asarray(weight, dtype=np.float64).T
    return z if bias is None else z + np.asarray(bias, dtype=np.float64)


def linear_cross_entropy(hidden, weight, targets, *, bias=None, class_weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, softcap=None, logit_scale=1.0, normalizer=None,
                         grad_output=1.0, return_grads=True):
    """cross_entropy of the logits hidden @ weight.T + bias, and the gradients of
    loss * grad_output w.r.t. hidden, weight and bias (None without a bias)."""
    logits = _head_logits(hidden, weight, bias)
    opts = dict(weight=class_weight, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                logit_scale=logit_scale, normalizer=normalizer)
    if not return_grads:
        return cross_entropy(logits, targets, **opts)
    loss, g = cross_entropy_with_grad(logits, targets, grad_output=grad_output, **opts)
    V, D = np.shape(weight)
    h2, g2 = np.asarray(hidden, dtype=np.float64).reshape(-1, D), g.reshape(-1, V)
    d_bias = None if bias is None else g2.sum(axis=0)
    return loss, (g @ np.asarray(weight, dtype=np.float64), g2.T @ h2, d_bias)


def linear_target_logprobs(hidden, weight, targets, *, bias=None, ignore_index=-100,
                           softcap=None, logit_scale=1.0):
    """(log p(target), lse) per token under the logits hidden @ weight.T + bias (scaled,
    then soft-capped); ignored tokens have log-probability 0."""
    loss, lse = cross_entropy(_head_logits(hidden, weight, bias), targets,
                              ignore_index=ignore_index, reduction="none", softcap=softcap,
                              logit_scale=logit_scale, return_lse=True)
    return 0.0 - loss, lse  # loss = lse - z[target], 0 for ignored tokens


# ---------------------------------------------------------------------------
# Decoding (issue 17; docs/decoding.md): logit processing, sampling, top-k and beam
# search. Row-by-row float64 NumPy that the kernels are checked against exactly
# (up to uniforms within rounding of a boundary). Rows are logits.shape[:-1]; every
# per-row parameter is a scalar or an array of that shape. Results are float64
# (float64 logits, log-probabilities and scores) and int64 (ids, ranks, lengths).

from . import _philox  # noqa: E402

# the same result types, and one set of rules for the kernels and the reference
from .decoding import (  # noqa: E402
    Beams,  # noqa: F401
    Samples,
    _beam_loop,
    _beam_step,
    _bias,
    _check_vocabulary,
    _history,
    _is_int,
    _params,
    _row_offsets,
    _sample_options,
)


def _history_counts(prev_tokens, lead, V):
    """counts[..., j] = how often id j occurs in prev_tokens (lead + (L,), -1 = padding)."""
    t = _history(prev_tokens, lead, V)
    counts = np.zeros(lead + (V,), dtype=np.int64)
    for s in np.ndindex(lead):
        for tok in t[s]:
            if tok >= 0:
                counts[s + (tok,)] += 1
    return counts


def _top_p_keep(x, top_p):
    """Top-p of one row of logits: keep token j iff the probability mass of the tokens
    strictly more likely than j is < top_p. This is the notebook's top_p_filter (walk
    in descending probability, keep each token whose preceding mass is < top_p, so the
    token that crosses the threshold is kept) plus every token tied with the last one
    kept. The mass is a float64 cumulative sum in descending order of probability."""
    p = np.exp(x - np.max(x))
    p /= p.sum()
    desc = np.sort(p)[::-1]
    cum = np.cumsum(desc)
    n_above = np.searchsorted(-desc, -p, side="left")  # tokens with a larger probability
    mass_above = np.where(n_above > 0, cum[np.maximum(n_above - 1, 0)], 0.0)
    return mass_above < top_p


def _process(logits, temperature, logit_bias, top_k, top_p, min_p, repetition_penalty,
             presence_penalty, frequency_penalty, prev_tokens):
    """Validate; return (processed float64 logits, NaN-row mask) of process_logits."""
    x = np.array(logits, dtype=np.float64)  # a copy: processed in place below
    _check_vocabulary(x.shape)
    lead, V = x.shape[:-1], x.shape[-1]
    T, k, p, mp, rp, pres, freq = _params(lead, temperature, top_k, top_p, min_p,
                                          repetition_penalty, presence_penalty,
                                          frequency_penalty, prev_tokens)

    if logit_bias is not None:
        with np.errstate(invalid="ignore"):  # +inf logit + -inf bias: a NaN row
            x += _bias(logit_bias, lead, V)
    if prev_tokens is not None:
        counts = _history_counts(prev_tokens, lead, V)
        seen = counts > 0
        r = rp[..., None]
        with np.errstate(over="ignore", invalid="ignore"):  # overflow: a NaN row below
            x = np.where(seen, np.where(x < 0, x * r, x / r), x)  # HF: each distinct id once
            x = x - pres[..., None] * seen - freq[..., None] * counts  # OpenAI
    nan_row = np.zeros(lead, dtype=bool)
    for s in np.ndindex(lead):
        row = x[s]
        if T[s] == 0:  # greedy: only the first argmax stays, with its logit
            row[np.arange(V) != np.argmax(row)] = -np.inf
        else:
            with np.errstate(over="ignore"):
                row /= T[s]
        # no distribution: a NaN or +inf logit, or one that overflowed on the way here
        nan_row[s] = np.isnan(row).any() or (row == np.inf).any()
        if nan_row[s] or np.max(row) == -np.inf:
            continue  # NaN rows become NaN below; nothing to remove from all -inf
        if 0 < k[s] < V:
            row[row < np.sort(row)[::-1][k[s] - 1]] = -np.inf  # ties with the k-th stay
        if p[s] < 1:
            row[~_top_p_keep(row, p[s])] = -np.inf
        if mp[s] > 0:
            row[np.exp(row - np.max(row)) < mp[s]] = -np.inf  # p_j < min_p * max p
    x[nan_row] = np.nan
    return x, nan_row


def process_logits(logits, *, temperature=1.0, logit_bias=None, top_k=None, top_p=None,
                   min_p=None, repetition_penalty=None, presence_penalty=0.0,
                   frequency_penalty=0.0, prev_tokens=None):
    """The decoding distribution's logits: removed entries -inf, the rest transformed.

    In order, each step on the output of the previous one (HF transformers' order):
    logit_bias (dense (V,) or rows + (V,), or sparse {id: bias} for every row) is added;
    for each distinct id in prev_tokens (rows + (L,), -1 = padding) the repetition
    penalty divides a positive logit and multiplies a negative one (HF), then
    presence_penalty + frequency_penalty * count is subtracted (OpenAI); the logits are
    divided by temperature, or for temperature 0 only the first argmax is kept
    (unscaled); top_k keeps every entry >= the k-th largest; top_p keeps the tokens
    whose strictly-more-likely mass is < top_p (see _top_p_keep); min_p keeps
    p >= min_p * max p, computed as exp(z - max z) >= min_p. "Off": top_k None/0,
    top_p None/1, min_p None/0, repetition_penalty None/1, penalties 0. A row with a
    NaN or +inf after the temperature step (a NaN or +inf logit, or an overflow of
    the penalties or of logits / temperature) has no distribution: it is all NaN."""
    return _process(logits, temperature, logit_bias, top_k, top_p, min_p,
                    repetition_penalty, presence_penalty, frequency_penalty, prev_tokens)[0]


def top_k(x, k, axis=-1):
    """(values, indices) of the k largest entries along `axis`, descending, like
    torch.topk: NaN counts as larger than any number; ties in the lower index first
    (torch leaves the order of ties unspecified)."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    if not (_is_int(k) and 0 <= k <= x.shape[-1]):
        raise ValueError(f"k must be an integer in [0, {x.shape[-1]}], got {k!r}")
    nan = np.isnan(x)
    order = np.lexsort((np.where(nan, 0.0, -x), ~nan), axis=-1)[..., :k]  # stable
    values = np.take_along_axis(x, order, -1)
    return np.moveaxis(values, -1, axis), np.moveaxis(order, -1, axis)


def _top_logprobs(z, logp, n):
    """The n most likely entries of each row of z (ids -1 and log-probabilities -inf past
    the row's finite entries; NaN where the row's log-probabilities are NaN)."""
    lead, V = z.shape[:-1], z.shape[-1]
    ids = np.full(lead + (n,), -1, dtype=np.int64)
    lps = np.full(lead + (n,), -np.inf)
    m = min(n, V)
    _, idx = top_k(z, m)
    vals = np.take_along_axis(logp, idx, -1)
    alive = vals > -np.inf
    ids[..., :m] = np.where(alive, idx, -1)
    lps[..., :m] = np.where(alive, vals, -np.inf)
    nan = np.any(np.isnan(logp), axis=-1)
    lps[nan] = np.nan
    return ids, lps


def sample(logits, *, temperature=1.0, logit_bias=None, top_k=None, top_p=None, min_p=None,
           repetition_penalty=None, presence_penalty=0.0, frequency_penalty=0.0,
           prev_tokens=None, seed=0, offset=0, num_logprobs=0, logprobs_of="raw"):
    """Draw one token per row from process_logits(...)'s distribution -> Samples.

    Row r (flat index over the rows) takes u_r = the Philox-4x32-10 uniform of
    (seed_r, offset_r) (lmxent._philox: 53 bits, [0, 1)); a scalar offset o means
    offset_r = (o + r) mod 2**64. With w_j = exp(y_j - max y) of the processed logits y
    and C_j = w_0 + ... + w_j (float64, vocabulary order), the token is the first j with
    C_j > u_r * C_{V-1} (the last j with w_j > 0 if rounding leaves none). A row with no
    distribution (NaN, or every entry -inf) gives token -1, logprob NaN and rank -1.

    logprob, rank (#{j: z_j > z_t} + #{j < t: z_j == z_t}, 0 = argmax) and the
    num_logprobs most likely (top_ids, top_logprobs; descending, ties lower id first;
    -1 and -inf past the finite entries, NaN logprobs for a NaN row) are of the raw
    logits z (logprobs_of="raw") or the processed ones ("processed")."""
    num_logprobs, raw = _sample_options(num_logprobs, logprobs_of)
    y, nan_row = _process(logits, temperature, logit_bias, top_k, top_p, min_p,
                          repetition_penalty, presence_penalty, frequency_penalty,
                          prev_tokens)
    lead, V = y.shape[:-1], y.shape[-1]
    u = _philox.uniform(*_row_offsets(seed, offset, lead))

    tokens = np.full(lead, -1, dtype=np.int64)
    for s in np.ndindex(lead):
        row = y[s]
        if nan_row[s] or np.max(row) == -np.inf:
            continue
        w = np.exp(row - np.max(row))
        cum = np.cumsum(w)
        above = np.nonzero(cum > u[s] * cum[-1])[0]
        tokens[s] = above[0] if above.size else np.nonzero(w > 0)[0][-1]

    z = np.asarray(logits, dtype=np.float64) if raw else y
    logp = _log_softmax_lse(z, 1.0)[0]
    t = np.maximum(tokens, 0)[..., None]
    zt = np.take_along_axis(z, t, -1)
    rank = np.sum(z > zt, axis=-1) + np.sum((z == zt) & (np.arange(V) < t), axis=-1)
    drawn = tokens >= 0
    logprob = np.where(drawn, np.take_along_axis(logp, t, -1)[..., 0], np.nan)
    top_ids, top_lps = _top_logprobs(z, logp, num_logprobs)
    return Samples(tokens, logprob, np.where(drawn, rank, -1), top_ids, top_lps)


def beam_search_step(scores, logprobs, beam_width, *, finished=None, eos_id=None):
    """One step of beam search -> (new scores, parent beam, token), each (batch, beam_width).

    Candidates: scores[b, i] + logprobs[b, i, v] for every beam i and token v; a finished
    beam (finished[b, i]) instead gives the single candidate (its score, token eos_id):
    it keeps its slot and its score (the notebook's convention), competing with the
    extensions. The beam_width best candidates are chosen by top_k over the flattened
    (beam, token) index, so ties go to the lower beam, then the lower token."""
    return _beam_step(scores, logprobs, beam_width, finished, eos_id, top_k, np, np.float64)


def beam_search(step_fn, prompts, *, beam_width, max_len, eos_id, length_penalty=1.0,
                reorder=None):
    """Beam search from `prompts` (batch, t0) -> Beams(sequences, scores, lengths).

    Every step calls step_fn(tokens (batch * W, t)) -> logits (batch * W, V), takes their
    float64 log-softmax and beam_search_step; then reorder(parent) with the flat parent
    row (batch * W,) of each new row, when given (a KV cache follows with cache[parent]).
    At the start the W beams of a prompt are copies; only the first has score 0 (the
    others -inf), so the first step picks W different tokens. The search stops after
    max_len new tokens or when every beam has finished (emitted eos_id).

    sequences (batch, W, t0 + T): the prompt and T generated tokens, padded with eos_id
    after a beam's EOS; lengths (batch, W) int64: the generated length L, EOS included;
    scores (batch, W): sum of log-probabilities / L**length_penalty, sorted descending
    (ties keep the beam order), sequences and lengths in the same order."""
    return _beam_loop(step_fn, prompts, beam_width, max_len, eos_id, length_penalty, reorder,
                      log_softmax, beam_search_step)


# every public function above, in order (adding one needs no list)
__all__ = [name for name, f in list(globals().items()) if not name.startswith("_")
           and callable(f) and getattr(f, "__module__", None) == __name__]
