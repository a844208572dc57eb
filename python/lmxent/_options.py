"""Option handling shared by the cross-entropy family, the LM head and KL: the
validated scalar options of a cross-entropy call and its kernel call, the value
checks of one call (raised at once on NumPy, one host round trip on CuPy), class
weights and ids, the caller's grad_output as kernel factors, and the reduction of
per-row losses with a "mean" over a zero denominator being 0."""
import numpy as np

from . import _arrays as A

_REDUCTIONS = ("none", "mean", "sum")


def mean(total, denom, xp):
    """total / denom, 0 where denom is 0 (nothing counted; no division by zero is
    evaluated): elementwise for an array denominator (on the device when it is
    there), a number (a 0-d device array on CuPy) for a host number."""
    if isinstance(denom, (int, float)):
        if denom != 0:
            return total / denom
        return 0.0 if xp is np else xp.zeros((), np.float64)
    counted = denom != 0
    return xp.where(counted, total / xp.where(counted, denom, 1), 0.0)


class Options:
    """The validated scalar options of one cross-entropy call (also the LM head's)."""

    def __init__(self, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                 normalizer):
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.eps = A.finite(label_smoothing, "label_smoothing", 0.0, 1.0)
        self.z_loss = A.finite(z_loss, "z_loss", 0.0)
        self.softcap = A.positive(softcap, "softcap", allow_none=True)
        self.scale = A.positive(logit_scale, "logit_scale")
        self.ignore_index = A.ignore_index(ignore_index)
        if normalizer is not None and reduction != "mean":
            raise ValueError("normalizer is only allowed with reduction='mean'")
        self.normalizer = A.positive(normalizer, "normalizer", allow_none=True)

    def kernel(self, x2, tids, probs, w, **outputs):
        """Runs the cross-entropy kernel of x2's library on validated arrays."""
        o = outputs
        A.kernels(x2).cross_entropy(
            x2, tids, probs, w, self.ignore_index, self.scale, self.softcap or 0.0, self.eps,
            self.z_loss, o.get("loss"), o.get("lse"), o.get("lse_given", False), o.get("grad"),
            o.get("grad_scale", 1.0), o.get("grad_rows"), o.get("vocab_slice", False),
            o.get("grad_coef"))


class Checks:
    """Value checks of one call: raised at once on NumPy; on CuPy collected as
    device booleans and read together by done() (one host round trip), or skipped
    when validation is deferred (then `eager` is False and nothing is collected)."""

    def __init__(self, xp):
        self.xp, self.eager, self._pending = xp, A.cuda_eager(xp), []

    def __call__(self, failed, error):
        if self.xp is np:
            if failed:
                raise error()
        elif self.eager:
            self._pending.append((failed, error))

    def done(self):
        if self._pending:
            failed = self.xp.stack([f for f, _ in self._pending]).get()
            for bad_value, (_, error) in zip(failed, self._pending):
                if bad_value:
                    raise error()


def checked_weight(weight, V, ct, xp, checks, name="weight"):
    """Class weights (V,) in the compute dtype ct, or None; non-finite ones refused."""
    if weight is None:
        return None
    w = A.real_array(weight, name, xp)
    if w.shape != (V,):
        raise ValueError(f"{name}: expected shape ({V},), got {w.shape}")
    w = A.require(w, ct)
    if checks.eager:
        checks(~xp.isfinite(w).all(), lambda: ValueError(f"{name}: contains a non-finite value"))
    return w


def checked_ids(t, lead, V, w, opts, xp, checks):
    """(flat int64 ids, mask of the non-ignored, the "mean" denominator) of integer
    class ids shaped `lead`. The denominator is a float, or a device scalar when it
    is counted on the device (no round trip)."""
    if t.shape != tuple(lead):
        raise ValueError(f"targets: class ids must have shape {tuple(lead)} (the logits' "
                         f"shape without the vocabulary axis), got {t.shape}")
    flat = t.reshape(-1)
    ids, valid = A.int64_ids(flat, V, opts.ignore_index, xp)
    if checks.eager:
        checks(*A.bad_ids(flat, ids, valid, V, tuple(lead), opts.ignore_index, xp=xp))
    tids = A.require(ids, np.int64)
    if opts.normalizer is not None or opts.reduction != "mean":
        denom = opts.normalizer or 0.0  # only a "mean" divides
    elif xp is np:
        denom = (int(np.count_nonzero(valid)) if w is None
                 else float(w[tids[valid]].sum(dtype=np.float64)))
    elif w is None:  # counted on the device
        denom = xp.count_nonzero(valid).astype(np.float64)
    else:
        denom = xp.where(valid, w[xp.clip(tids, 0, V - 1)], 0).sum(dtype=np.float64)
    return tids, valid, denom if A._is_cupy(denom) else float(denom)


def grad_factor(grad_output, reduction, denom, lead, ct, xp):
    """(grad_scale, grad_rows) for the kernel from the caller's grad_output: a scalar
    already divided by the "mean" denominator, or per-row factors (flat, of the
    compute dtype ct). On CuPy a device grad_output, or a "mean" whose denominator is
    on the device, becomes per-row factors: no host round trip."""
    n = int(np.prod(lead, dtype=np.int64))
    device = xp is not np and A._is_cupy(grad_output)
    g = A.real_array(grad_output, "grad_output", xp if device else np)
    if g.ndim == 0:
        if not device and not (reduction == "mean" and A._is_cupy(denom)):
            g = float(g)
            if reduction == "mean":
                g = mean(g, denom, xp)
            return g, None
        g = g.astype(np.float64) if device else float(g)
        if reduction == "mean":
            g = mean(g, denom, xp)
        return 1.0, A.require(xp.broadcast_to(xp.asarray(g, dtype=ct), (n,)), ct)
    if reduction != "none":
        raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}")
    g = A.asarray(g, "grad_output", xp)
    try:
        g = xp.broadcast_to(g, tuple(lead))
    except ValueError:
        raise ValueError(f"grad_output: shape {g.shape} does not broadcast to the "
                         f"per-token loss shape {tuple(lead)}") from None
    return 1.0, A.require(g.reshape(-1), ct)


def reduce_loss(loss_rows, reduction, denom, lead, ct, xp):
    """The loss of per-row losses: "none" reshaped to `lead`, else their float64
    sum (divided by the denominator for "mean", 0 when it is 0) as a 0-d array."""
    if reduction == "none":
        return loss_rows.reshape(lead)
    total = loss_rows.sum(dtype=np.float64)
    if reduction == "mean":
        total = mean(total, denom, xp)
    return xp.asarray(total, dtype=ct)
