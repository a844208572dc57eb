"""Cross-entropy over the last axis, its gradient fused into the same pass, and
the backward from a saved log-sum-exp. Conventions (those of
torch.nn.functional.cross_entropy, plus logit_scale, softcap, z_loss and
normalizer) are written out in lmxent.reference, the float64 oracle.

Losses are float32 (float64 for float64 logits); per-token losses are summed
in float64. Gradients have the logits' dtype."""
import numpy as np

from . import _arrays as A

_REDUCTIONS = ("none", "mean", "sum")
_INT64 = np.iinfo(np.int64)


class _Problem:
    """Validated arguments of one call, ready for the kernel."""

    def __init__(self, logits, targets, weight, ignore_index, reduction, label_smoothing,
                 z_loss, softcap, logit_scale, normalizer, inplace=False):
        x = A.as_float_array(logits, "logits", inplace=inplace)
        self.x, (self.x2, self.lead) = x, A.rows(x, "logits", need_view=inplace)
        n, V = self.x2.shape
        self.ct = ct = A.compute_dtype(x.dtype)
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.eps = A.finite(label_smoothing, "label_smoothing", 0.0, 1.0)
        self.z_loss = A.finite(z_loss, "z_loss", 0.0)
        self.softcap = A.positive(softcap, "softcap", allow_none=True)
        self.scale = A.positive(logit_scale, "logit_scale")
        self.ignore_index = A.integer(ignore_index, "ignore_index")
        if not _INT64.min <= self.ignore_index <= _INT64.max:  # the kernel takes an int64
            raise ValueError(f"ignore_index must fit in int64, got {self.ignore_index}")
        if normalizer is not None and reduction != "mean":
            raise ValueError("normalizer is only allowed with reduction='mean'")
        normalizer = A.positive(normalizer, "normalizer", allow_none=True)

        self.w = None
        if weight is not None:
            w = A.real_array(weight, "weight")
            if w.shape != (V,):
                raise ValueError(f"weight: expected shape ({V},), got {w.shape}")
            self.w = np.require(w, ct, "CA")
            if not np.isfinite(self.w).all():
                raise ValueError("weight: contains a non-finite value")

        t = targets if isinstance(targets, np.ndarray) else np.asarray(targets)
        self.tids = self.probs = None
        if t.dtype.kind in "iu":
            if t.shape != self.lead:
                raise ValueError(f"targets: class ids must have shape {self.lead} (the logits' "
                                 f"shape without the vocabulary axis), got {t.shape}")
            # Checked in the ids' own dtype: the cast to int64 would wrap uint64 ids
            # >= 2**63 to negative values (even onto ignore_index).
            flat = t.reshape(-1)
            valid = flat != self.ignore_index
            bad = valid & ((flat < 0) | (flat >= V))
            if bad.any():
                i = int(np.argmax(bad))
                pos = tuple(int(k) for k in np.unravel_index(i, self.lead)) if self.lead else ()
                raise ValueError(f"targets: value {flat[i]} at position {pos} is out of range "
                                 f"[0, {V}) and is not ignore_index ({self.ignore_index})")
            self.tids = tids = np.require(flat, np.int64, "CA")
            if normalizer is not None:
                denom = normalizer
            elif self.w is None:
                denom = int(np.count_nonzero(valid))
            else:
                denom = float(self.w[tids[valid]].sum(dtype=np.float64))
        elif t.dtype.kind == "f" or t.dtype == A.bfloat16_dtype():
            if t.shape != x.shape:
                raise ValueError(f"targets: probability targets must have the logits' shape "
                                 f"{x.shape}, got {t.shape}")
            if self.ignore_index >= 0:
                raise ValueError("ignore_index is not supported for probability targets")
            self.probs = np.require(t.reshape(n, V), ct, "CA")
            denom = normalizer if normalizer is not None else n
        else:
            raise TypeError(f"targets: expected integer class ids or float probabilities, "
                            f"got dtype {t.dtype}")
        self.denom = float(denom)

    def run(self, *, loss=None, lse=None, lse_given=False, grad=None, grad_scale=1.0,
            grad_rows=None):
        A.kernels(self.x).cross_entropy(
            self.x2, self.tids, self.probs, self.w, self.ignore_index, self.scale,
            self.softcap or 0.0, self.eps, self.z_loss, loss, lse, lse_given, grad,
            grad_scale, grad_rows)

    def reduce(self, loss_rows):
        if self.reduction == "none":
            return loss_rows.reshape(self.lead)
        total = loss_rows.sum(dtype=np.float64)
        if self.reduction == "mean":
            total = total / self.denom if self.denom != 0 else 0.0
        return np.asarray(total, dtype=self.ct)

    def grad_factor(self, grad_output):
        """(grad_scale, grad_rows) for the kernel from the caller's grad_output."""
        g = A.real_array(grad_output, "grad_output")
        if g.ndim == 0:
            g = float(g)
            if self.reduction == "mean":
                g = g / self.denom if self.denom != 0 else 0.0
            return g, None
        if self.reduction != "none":
            raise ValueError(f"grad_output must be a scalar for reduction={self.reduction!r}")
        try:
            g = np.broadcast_to(g, self.lead)
        except ValueError:
            raise ValueError(f"grad_output: shape {g.shape} does not broadcast to the "
                             f"per-token loss shape {self.lead}") from None
        return 1.0, np.require(g.reshape(-1), self.ct, "CA")

    def new_grad(self, inplace):
        if inplace:
            return self.x2, self.x
        g = np.empty(self.x2.shape, self.x.dtype)
        return g, g.reshape(self.x.shape)


def cross_entropy(logits, targets, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                  normalizer=None, return_lse=False):
    """Cross-entropy of `targets` (class ids (...) or probabilities (..., V)) under
    softmax of `logits` (..., V). Returns the loss, and the per-token LSE of the
    transformed logits with return_lse=True."""
    p = _Problem(logits, targets, weight, ignore_index, reduction, label_smoothing, z_loss,
                 softcap, logit_scale, normalizer)
    loss = np.empty(p.x2.shape[0], p.ct)
    lse = np.empty(p.x2.shape[0], p.ct) if return_lse else None
    p.run(loss=loss, lse=lse)
    out = p.reduce(loss)
    return (out, lse.reshape(p.lead)) if return_lse else out


def cross_entropy_with_grad(logits, targets, *, weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                            logit_scale=1.0, normalizer=None, grad_output=1.0, inplace=False):
    """(loss, d loss / d logits * grad_output) in one pass over the logits.
    inplace=True writes the gradient over `logits` and returns that array."""
    p = _Problem(logits, targets, weight, ignore_index, reduction, label_smoothing, z_loss,
                 softcap, logit_scale, normalizer, inplace=inplace)
    scale, rows = p.grad_factor(grad_output)
    loss = np.empty(p.x2.shape[0], p.ct)
    g2, g = p.new_grad(inplace)
    p.run(loss=loss, grad=g2, grad_scale=scale, grad_rows=rows)
    return p.reduce(loss), g


def cross_entropy_backward(logits, targets, lse, grad_output, *, weight=None,
                           ignore_index=-100, reduction="mean", label_smoothing=0.0,
                           z_loss=0.0, softcap=None, logit_scale=1.0, normalizer=None):
    """d loss / d logits * grad_output, from the per-token `lse` returned by
    cross_entropy(..., return_lse=True) with the same options."""
    p = _Problem(logits, targets, weight, ignore_index, reduction, label_smoothing, z_loss,
                 softcap, logit_scale, normalizer)
    lse = A.real_array(lse, "lse")
    if lse.shape != p.lead:
        raise ValueError(f"lse: expected shape {p.lead}, got {lse.shape}")
    lse = np.require(lse.reshape(-1), p.ct, "CA")
    scale, rows = p.grad_factor(grad_output)
    g2, g = p.new_grad(False)
    p.run(lse=lse, lse_given=True, grad=g2, grad_scale=scale, grad_rows=rows)
    return g
