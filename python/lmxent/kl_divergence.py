"""KL divergence between the softmax distributions of student and teacher logits,
with the gradient with respect to the student fused into the same kernel.

With p = softmax(student / T) and q = softmax(teacher / T) over the last axis:

    direction="forward"   KL(q || p) = sum_j q_j (log q_j - log p_j)  (distillation,
                          torch.nn.functional.kl_div(log p, log q, log_target=True))
    direction="reverse"   KL(p || q) = sum_j p_j (log p_j - log q_j)  (mode-seeking)
    direction="js"        Jensen-Shannon: (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2

Terms where the weighting distribution is 0 contribute 0, so a teacher with
zero-probability classes (logit -inf) gives a finite forward KL. Per-row values are
clamped at 0 (only rounding makes them negative). The temperature divides both
logits; Hinton-style distillation multiplies the loss by T**2 itself.

Reductions: "none" (per row, masked rows 0), "sum", "batchmean" (the sum divided by
the number of rows counted, i.e. not masked: torch's batchmean divides by the batch
size, which differs only when a mask is given; 0 rows counted give 0.0). torch's
"mean" (divide by rows * V) is not the mean KL and is refused.

NumPy logits run on the CPU kernel. CuPy logits run on the CUDA kernel, on CuPy's
current stream, and stay on the device (a host teacher, mask or grad_output is
copied there): the loss is a 0-d CuPy array and the "batchmean" count of a mask
is taken on the device, so a call never waits for the GPU.
"""
import numpy as np

from . import _arrays as A
from ._options import grad_factor, reduce_loss

__all__ = ["kl_divergence"]

_DIRECTIONS = {"forward": 0, "reverse": 1, "js": 2}
_REDUCTIONS = ("none", "sum", "batchmean")


def kl_divergence(student_logits, teacher_logits, *, temperature=1.0, direction="forward",
                  reduction="batchmean", mask=None, grad_output=1.0, return_grad=False,
                  inplace=False):
    """KL divergence of softmax(teacher / T) and softmax(student / T) over the last
    axis of (..., V) logits of the same shape. `mask` (...) marks the rows counted
    (False: loss 0, gradient 0). return_grad=True returns (loss, d loss / d student
    * grad_output), the gradient in the student's dtype; inplace=True writes it over
    `student_logits`. The teacher is converted to the student's dtype if it differs."""
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {tuple(_DIRECTIONS)}, got {direction!r}")
    if reduction == "mean":
        raise ValueError("reduction='mean' (torch's sum / (rows * V)) is not the mean KL; "
                         "use 'batchmean' (per counted row), 'sum' or 'none'")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if inplace and not return_grad:
        raise ValueError("inplace=True writes the gradient: it needs return_grad=True")
    s = A.as_float_array(student_logits, "student_logits", inplace=inplace)
    xp = A.array_module(s)
    t = A.as_float_array(teacher_logits, "teacher_logits")
    if A.array_module(t) is not xp:  # a host teacher goes to the device; the reverse is refused
        t = A.asarray(t, "teacher_logits", xp)
    if t.shape != s.shape:
        raise ValueError(f"teacher_logits: expected the student's shape {s.shape}, got {t.shape}")
    if inplace and (np.shares_memory if xp is np else xp.may_share_memory)(s, t):
        raise ValueError("inplace=True: teacher_logits shares memory with student_logits, "
                         "which the gradient would overwrite")
    if t.dtype != s.dtype:
        t = t.astype(s.dtype)
    s2, lead = A.rows(s, "student_logits", need_view=inplace)
    t2, _ = A.rows(t, "teacher_logits")
    n = s2.shape[0]
    ct = A.compute_dtype(s.dtype)
    scale = 1.0 / A.positive(temperature, "temperature")
    # 1/T far outside float32's range: the float64 kernel computes the limit (uniform,
    # one-hot), on float64 copies of both rows -- only for such temperatures
    kt = ct if ct == np.float64 or 2.0**-100 <= scale <= 2.0**100 else np.dtype(np.float64)

    m = None
    if mask is not None:
        m = A.asarray(mask, "mask", xp)
        if m.dtype != np.bool_:
            raise TypeError(f"mask: expected a boolean array, got dtype {m.dtype}")
        if m.shape != lead:
            raise ValueError(f"mask: expected shape {lead} (the logits' shape without the "
                             f"vocabulary axis), got {m.shape}")
        m = A.require(m.reshape(-1), np.uint8)
    # rows counted: on the device for a CuPy mask (no round trip)
    mean = "mean" if reduction == "batchmean" else reduction  # divided by `counted`
    counted = n if m is None else int(np.count_nonzero(m)) if xp is np else xp.count_nonzero(m)

    grad_scale, grad_rows = 1.0, None
    g2 = g = None
    if return_grad:
        grad_scale, grad_rows = grad_factor(grad_output, mean, counted, lead, kt, xp)
        if inplace:
            A.check_no_self_overlap(s, "student_logits")
            if A.shares_memory(s2, grad_rows):
                raise ValueError("inplace=True: grad_output shares memory with "
                                 "student_logits, which the gradient would overwrite")
            g2, g = s2, s
        else:
            g = A.empty(xp, s.shape, s.dtype)
            g2 = g.reshape(s2.shape)

    ks, kt2, kg = s2, t2, g2
    if kt != ct:
        ks, kt2 = s2.astype(kt), t2.astype(kt)
        kg = None if g2 is None else xp.empty(s2.shape, kt)
    loss = xp.empty(n, kt)
    A.kernels(s).kl_divergence(ks, kt2, m, scale, _DIRECTIONS[direction], loss, kg, grad_scale,
                               grad_rows)
    if kg is not g2:
        g2[...] = kg.astype(g2.dtype)
    out = reduce_loss(loss.astype(ct, copy=False), mean, counted, lead, ct, xp)
    return (out, g) if return_grad else out
