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

__all__ = ["logsumexp", "log_softmax", "softmax", "cross_entropy",
           "cross_entropy_with_grad", "cross_entropy_backward"]

_REDUCTIONS = ("none", "mean", "sum")


def _scaled(x, temperature):
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return np.asarray(x, dtype=np.float64) / temperature


def logsumexp(x, axis=-1, *, keepdims=False, temperature=1.0):
    """log(sum(exp(x / temperature))) along `axis`, computed stably."""
    x = _scaled(x, temperature)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # all -inf row -> -inf; +inf -> inf; NaN stays
    with np.errstate(divide="ignore"):
        out = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis=axis)


def log_softmax(x, axis=-1, *, temperature=1.0):
    """log(softmax(x / temperature)) along `axis`."""
    return _scaled(x, temperature) - logsumexp(x, axis, keepdims=True, temperature=temperature)


def softmax(x, axis=-1, *, temperature=1.0):
    """softmax(x / temperature) along `axis`."""
    return np.exp(log_softmax(x, axis, temperature=temperature))


def _transform(logits, softcap, logit_scale):
    """Return z (scaled, then soft-capped logits) and dz/dx."""
    z = logit_scale * np.asarray(logits, dtype=np.float64)
    if softcap is None:
        return z, np.full_like(z, logit_scale)
    if not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    z = softcap * np.tanh(z / softcap)
    return z, logit_scale * (1.0 - (z / softcap) ** 2)


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
    z, _ = _transform(logits, softcap, logit_scale)
    lse = logsumexp(z)
    with np.errstate(invalid="ignore"):  # 0 * inf where b_j == 0 and z_j == -inf
        terms = np.where(b != 0, b * (lse[..., None] - z), 0.0)
    loss = np.where(mask, terms.sum(axis=-1) + z_loss * lse**2, 0.0)
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
    z, dz_dx = _transform(logits, softcap, logit_scale)
    lse = np.asarray(lse, dtype=np.float64)
    if lse.shape != mask.shape:
        raise ValueError(f"lse must have shape {mask.shape}, got {lse.shape}")
    if reduction == "none":
        factor = np.broadcast_to(np.asarray(grad_output, dtype=np.float64), mask.shape)
    elif np.ndim(grad_output) != 0:
        raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}")
    elif reduction == "sum":
        factor = float(grad_output)
    else:
        factor = float(grad_output) / denom if denom != 0 else 0.0
    p = np.exp(z - lse[..., None])
    A = b.sum(axis=-1) + 2.0 * z_loss * lse
    g = (A[..., None] * p - b) * dz_dx * np.asarray(factor)[..., None]
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
    return loss, cross_entropy_backward(logits, targets, lse, grad_output, **opts)
