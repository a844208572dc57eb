"""Cross-entropy over the last axis, its gradient fused into the same pass, and
the backward from a saved log-sum-exp. Conventions (those of
torch.nn.functional.cross_entropy, plus logit_scale, softcap, z_loss and
normalizer) are written out in lmxent.reference, the float64 oracle.

Losses are float32 (float64 for float64 logits); per-token losses are summed
in float64. Gradients have the logits' dtype.

NumPy logits run on the CPU kernels. CuPy logits run on the CUDA kernels, on
CuPy's current stream, and stay on the device: the "mean" denominator is
counted there and the loss is a 0-d CuPy array. Their other array arguments may
be CuPy or host arrays (copied to the device). Their class ids and class
weights are checked on the device with one host round trip per call, unless
validation is deferred (lmxent._arrays.set_cuda_validation)."""
import numpy as np

from . import _arrays as A

_REDUCTIONS = ("none", "mean", "sum")


def _mean(total, denom, xp):
    """total / denom, 0 when denom is 0 (nothing counted), on the device when the
    denominator is there."""
    if A._is_cupy(denom):
        return xp.where(denom != 0, total / xp.where(denom != 0, denom, 1), 0.0)
    if denom != 0:
        return total / denom
    return 0.0 if xp is np else xp.zeros((), np.float64)


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
                g = _mean(g, denom, xp)
            return g, None
        g = g.astype(np.float64) if device else float(g)
        if reduction == "mean":
            g = _mean(g, denom, xp)
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
        total = _mean(total, denom, xp)
    return xp.asarray(total, dtype=ct)


class _Problem:
    """Validated arguments of one call, ready for the kernel."""

    def __init__(self, logits, targets, weight, ignore_index, reduction, label_smoothing,
                 z_loss, softcap, logit_scale, normalizer, inplace=False):
        x = A.as_float_array(logits, "logits", inplace=inplace)
        self.xp = xp = A.array_module(x)
        self.x, (self.x2, self.lead) = x, A.rows(x, "logits", need_view=inplace)
        n, V = self.x2.shape
        self.ct = ct = A.compute_dtype(x.dtype)
        self.opts = o = Options(ignore_index, reduction, label_smoothing, z_loss, softcap,
                                logit_scale, normalizer)
        checks = Checks(xp)
        self.w = checked_weight(weight, V, ct, xp, checks)
        t = A.asarray(targets, "targets", xp)
        self.tids = self.probs = None
        if t.dtype.kind in "iu":
            self.tids, _, self.denom = checked_ids(t, self.lead, V, self.w, o, xp, checks)
        elif t.dtype.kind == "f" or t.dtype == A.bfloat16_dtype():
            if t.shape != x.shape:
                raise ValueError(f"targets: probability targets must have the logits' shape "
                                 f"{x.shape}, got {t.shape}")
            if o.ignore_index >= 0:
                raise ValueError("ignore_index is not supported for probability targets")
            self.probs = A.require(t.reshape(n, V), ct)
            self.denom = float(o.normalizer if o.normalizer is not None else n)
        else:
            raise TypeError(f"targets: expected integer class ids or float probabilities, "
                            f"got dtype {t.dtype}")
        checks.done()

    def run(self, **outputs):
        self.opts.kernel(self.x2, self.tids, self.probs, self.w, **outputs)

    def reduce(self, loss_rows):
        return reduce_loss(loss_rows, self.opts.reduction, self.denom, self.lead, self.ct, self.xp)

    def grad_factor(self, grad_output):
        return grad_factor(grad_output, self.opts.reduction, self.denom, self.lead, self.ct,
                           self.xp)

    def new_grad(self, inplace, out, reads=()):
        """(rows the kernel writes the gradient to, the array returned, and a buffer
        to copy into `out` (or the logits) afterwards or None). `reads`: the other
        arrays of the call the kernel reads (the LSE, per-row factors)."""
        others = (self.probs, self.w) + tuple(reads)
        if inplace:
            if out is not None:
                raise ValueError("give out= or inplace=True, not both")
            A.check_no_self_overlap(self.x, "logits")
            if any(A.shares_memory(self.x2, o) for o in others):  # read while overwritten
                g = A.empty(self.xp, self.x2.shape, self.x.dtype)
                return g, self.x, g
            return self.x2, self.x, None
        if out is None:
            g = A.empty(self.xp, self.x2.shape, self.x.dtype)
            return g, g.reshape(self.x.shape), None
        A.check_out(out, self.x.shape, self.x.dtype, xp=self.xp)
        rows = A.direct_out(out, self.x2, self.xp, others)
        if rows is not None:
            return rows, out, None
        g = A.empty(self.xp, self.x2.shape, self.x.dtype)  # out overlaps an input in part
        return g, out, g

    def grad_into(self, written, returned, buffer, **run_args):
        """Runs the kernel writing the gradient, and returns it (in `out` if given)."""
        self.run(grad=written, **run_args)
        if buffer is not None:
            returned[...] = buffer.reshape(returned.shape)
        return returned


def cross_entropy(logits, targets, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                  normalizer=None, return_lse=False):
    """Cross-entropy of `targets` (class ids (...) or probabilities (..., V)) under
    softmax of `logits` (..., V). Returns the loss, and the per-token LSE of the
    transformed logits with return_lse=True."""
    p = _Problem(logits, targets, weight, ignore_index, reduction, label_smoothing, z_loss,
                 softcap, logit_scale, normalizer)
    loss = p.xp.empty(p.x2.shape[0], p.ct)
    lse = p.xp.empty(p.x2.shape[0], p.ct) if return_lse else None
    p.run(loss=loss, lse=lse)
    out = p.reduce(loss)
    return (out, lse.reshape(p.lead)) if return_lse else out


def cross_entropy_with_grad(logits, targets, *, weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                            logit_scale=1.0, normalizer=None, grad_output=1.0, inplace=False,
                            out=None):
    """(loss, d loss / d logits * grad_output) in one pass over the logits.
    inplace=True writes the gradient over `logits` and returns that array; out= (an
    array of the logits' shape and dtype, e.g. reused across steps) receives it
    instead of a new array."""
    p = _Problem(logits, targets, weight, ignore_index, reduction, label_smoothing, z_loss,
                 softcap, logit_scale, normalizer, inplace=inplace)
    scale, rows = p.grad_factor(grad_output)
    loss = p.xp.empty(p.x2.shape[0], p.ct)
    g = p.grad_into(*p.new_grad(inplace, out, (rows,)), loss=loss, grad_scale=scale,
                    grad_rows=rows)
    return p.reduce(loss), g


def cross_entropy_backward(logits, targets, lse, grad_output, *, weight=None,
                           ignore_index=-100, reduction="mean", label_smoothing=0.0,
                           z_loss=0.0, softcap=None, logit_scale=1.0, normalizer=None,
                           out=None):
    """d loss / d logits * grad_output, from the per-token `lse` returned by
    cross_entropy(..., return_lse=True) with the same options; into `out` if given
    (the logits themselves are allowed)."""
    p = _Problem(logits, targets, weight, ignore_index, reduction, label_smoothing, z_loss,
                 softcap, logit_scale, normalizer)
    lse = A.real_array(lse, "lse", p.xp)
    if lse.shape != p.lead:
        raise ValueError(f"lse: expected shape {p.lead}, got {lse.shape}")
    lse = A.require(lse.reshape(-1), p.ct)
    scale, rows = p.grad_factor(grad_output)
    return p.grad_into(*p.new_grad(False, out, (lse, rows)), lse=lse, lse_given=True,
                       grad_scale=scale, grad_rows=rows)
