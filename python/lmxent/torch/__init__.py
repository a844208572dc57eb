"""lmxent for PyTorch: lmxent's functions on torch tensors, differentiable through
autograd, registered as torch custom ops (torch.ops.lmxent.*) so that
torch.compile(fullgraph=True) traces them without a graph break. See docs/torch.md.

    import lmxent.torch as lt
    loss = lt.cross_entropy(logits, targets, label_smoothing=0.1)
    loss.backward()

Options are those of the NumPy API (lmxent.cross_entropy etc.); the NumPy-only
ones (out=, inplace, return_grads, grad_output) are not offered: autograd
supplies the upstream gradient. Tensors are passed to the kernels without copies
(bfloat16 included); CUDA tensors go to lmxent's CuPy path on torch's current
stream (not yet run on a GPU). Importing this module needs torch; `import lmxent`
does not import it."""
import numbers

import torch

from lmxent import TokenStats

from . import _ops  # noqa: F401 -- registers torch.ops.lmxent.*

_CE_REDUCTIONS = ("none", "mean", "sum")


def _number(value, name, kind, allow_none):
    """value as a Python float (kind numbers.Real) or int (numbers.Integral), for the
    ops' schema; a TypeError naming the argument otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if kind is numbers.Integral else "a real number"
        raise TypeError(f"{name} must be {what}, got {value!r}")
    return int(value) if kind is numbers.Integral else float(value)


def _float(value, name, allow_none=False):
    return _number(value, name, numbers.Real, allow_none)


def _int(value, name, allow_none=False):
    return _number(value, name, numbers.Integral, allow_none)


def _needs_grad(t):
    return torch.is_grad_enabled() and t.requires_grad


def _constant(t, name):
    """Gradients flow to the logits (hidden, weight, bias, student) only: refuse a
    differentiable tensor elsewhere rather than give it a silent zero gradient."""
    if t is not None and _needs_grad(t):
        raise ValueError(f"{name} requires grad, but lmxent.torch does not differentiate "
                         f"with respect to it: pass {name}.detach()")


def _reduction(reduction, allowed):
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")
    return reduction


def _ce_args(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
             normalizer):
    """The cross-entropy options in the ops' schema order, type-checked."""
    return (_int(ignore_index, "ignore_index"), _reduction(reduction, _CE_REDUCTIONS),
            _float(label_smoothing, "label_smoothing"), _float(z_loss, "z_loss"),
            _float(softcap, "softcap", True), _float(logit_scale, "logit_scale"),
            _float(normalizer, "normalizer", True))


def cross_entropy(logits, targets, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                  normalizer=None, return_lse=False):
    """Cross-entropy of targets (class ids (...) or probabilities (..., V)) under
    softmax of logits (..., V), the vocabulary on the LAST axis (torch's
    F.cross_entropy takes it on axis 1). Options as lmxent.cross_entropy. Returns the
    loss (float32, float64 for float64 logits), and with return_lse=True also the
    per-token LSE (not differentiable). Differentiable with respect to the logits."""
    _constant(targets, "targets")
    _constant(weight, "weight")
    opts = _ce_args(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                    normalizer)
    need = _needs_grad(logits)
    # the gradient in the forward pass unless the upstream gradient is per token (or
    # the LSE is wanted, which cross_entropy_with_grad does not return): then the LSE,
    # and the backward's single pass
    fused = need and not return_lse and reduction != "none"
    loss, lse, _ = torch.ops.lmxent.cross_entropy(logits, targets, weight, *opts, fused,
                                                  bool(return_lse) or (need and not fused))
    return (loss, lse) if return_lse else loss


def linear_cross_entropy(hidden, weight, targets, *, bias=None, class_weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                         softcap=None, logit_scale=1.0, normalizer=None, chunk_size=None,
                         memory_budget=None):
    """Cross-entropy of targets (...) under the logits hidden (..., D) @ weight.T (V, D)
    (+ bias), without materialising them (lmxent.linear_cross_entropy). Differentiable
    with respect to hidden, weight and bias; the gradients are computed in the forward
    pass (for reduction="none", recomputed in the backward with the per-token upstream
    gradient)."""
    _constant(targets, "targets")
    _constant(class_weight, "class_weight")
    opts = _ce_args(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                    normalizer)
    need = any(t is not None and _needs_grad(t) for t in (hidden, weight, bias))
    loss, *_ = torch.ops.lmxent.linear_cross_entropy(
        hidden, weight, targets, bias, class_weight, *opts,
        _int(chunk_size, "chunk_size", True), _int(memory_budget, "memory_budget", True),
        None, need and reduction != "none")
    return loss


def kl_divergence(student_logits, teacher_logits, *, temperature=1.0, direction="forward",
                  reduction="batchmean", mask=None):
    """KL divergence between softmax(teacher / T) and softmax(student / T) over the
    last axis (lmxent.kl_divergence: direction "forward", "reverse" or "js";
    reduction "batchmean", "sum" or "none"). Differentiable with respect to the
    student; the teacher must not require grad."""
    _constant(teacher_logits, "teacher_logits")
    if direction not in ("forward", "reverse", "js"):
        raise ValueError(f"direction must be one of ('forward', 'reverse', 'js'), "
                         f"got {direction!r}")
    reduction = _reduction(reduction, ("none", "sum", "batchmean"))
    need = _needs_grad(student_logits) and reduction != "none"
    loss, _ = torch.ops.lmxent.kl_divergence(student_logits, teacher_logits,
                                             _float(temperature, "temperature"), direction,
                                             reduction, mask, None, need)
    return loss


def _dim(x, dim):
    dim = _int(dim, "dim")
    if not -x.ndim <= dim < max(x.ndim, 1):
        raise ValueError(f"dim {dim} is out of bounds for a tensor of {x.ndim} dimensions")
    return dim % max(x.ndim, 1)


def log_softmax(x, dim=-1, *, temperature=1.0):
    """log softmax(x / temperature) along dim, in x's dtype."""
    return torch.ops.lmxent.softmax(x, _dim(x, dim), _float(temperature, "temperature"), True)


def softmax(x, dim=-1, *, temperature=1.0):
    """softmax(x / temperature) along dim, in x's dtype."""
    return torch.ops.lmxent.softmax(x, _dim(x, dim), _float(temperature, "temperature"), False)


def logsumexp(x, dim=-1, *, keepdim=False, temperature=1.0):
    """log sum exp(x / temperature) along dim (float32; float64 for float64 x)."""
    return torch.ops.lmxent.logsumexp(x, _dim(x, dim), bool(keepdim),
                                      _float(temperature, "temperature"))


def token_stats(logits, targets, *, ignore_index=-100, temperature=1.0):
    """lmxent.token_stats on tensors: a TokenStats of tensors shaped like targets
    (logprob, lse, entropy, correct, top_prob, rank); not differentiable."""
    return TokenStats(*torch.ops.lmxent.token_stats(
        logits, targets, _int(ignore_index, "ignore_index"), _float(temperature, "temperature")))


class CrossEntropyLoss(torch.nn.Module):
    """cross_entropy as a module: CrossEntropyLoss(weight=None, **options)(logits, targets)."""

    def __init__(self, weight=None, *, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.options = {"ignore_index": ignore_index, "reduction": reduction,
                        "label_smoothing": label_smoothing, "z_loss": z_loss,
                        "softcap": softcap, "logit_scale": logit_scale}
        _ce_args(normalizer=None, **self.options)  # bad options fail here, not at the call

    def forward(self, logits, targets, normalizer=None):
        return cross_entropy(logits, targets, weight=self.weight, normalizer=normalizer,
                             **self.options)


class LinearCrossEntropyLoss(CrossEntropyLoss):
    """linear_cross_entropy as a module: LinearCrossEntropyLoss(class_weight=None,
    **options)(hidden, weight, targets, bias=None), e.g. with an lm_head's weight."""

    def __init__(self, class_weight=None, *, chunk_size=None, memory_budget=None, **options):
        super().__init__(class_weight, **options)
        self.options.update(chunk_size=chunk_size, memory_budget=memory_budget)

    def forward(self, hidden, weight, targets, bias=None, normalizer=None):
        return linear_cross_entropy(hidden, weight, targets, bias=bias,
                                    class_weight=self.weight, normalizer=normalizer,
                                    **self.options)


# last: _hf calls the functions above
from ._hf import causal_lm_head_loss, causal_lm_loss  # noqa: E402

__all__ = [
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "TokenStats",
    "causal_lm_head_loss",
    "causal_lm_loss",
    "cross_entropy",
    "kl_divergence",
    "linear_cross_entropy",
    "log_softmax",
    "logsumexp",
    "softmax",
    "token_stats",
]
