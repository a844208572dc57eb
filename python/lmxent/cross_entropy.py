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
from . import _arrays as A
from ._options import Checks, Options, checked_ids, checked_weight, grad_factor, reduce_loss

__all__ = ["cross_entropy", "cross_entropy_with_grad", "cross_entropy_backward"]


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
