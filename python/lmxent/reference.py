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
        zl = z_loss * lse**2 if z_loss != 0 else 0.0  # z_loss 0 adds 0, even to an infinite lse
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


# every public function above, in order (adding one needs no list)
__all__ = [name for name, f in list(globals().items()) if not name.startswith("_")
           and callable(f) and getattr(f, "__module__", None) == __name__]
