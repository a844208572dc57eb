"""lmxent's functions as torch custom ops (namespace "lmxent"), with fake (meta)
implementations for torch.compile and autograd formulas.

Where lmxent fuses the gradient into the forward pass (cross_entropy with a "mean"
or "sum", linear_cross_entropy, kl_divergence), the forward computes it with an
upstream gradient of 1, returns it as a non-differentiable extra output that
autograd saves, and the backward multiplies it by the real upstream gradient:
one pass over the logits in all. An eager `loss.backward()` on the CPU (upstream
exactly 1.0) hands the saved gradient on without touching it.

A per-token loss (reduction="none") has a per-token upstream gradient that the
forward cannot know: cross_entropy then saves the LSE and its backward is one pass
of lx.cross_entropy_backward; linear_cross_entropy and kl_divergence compute the
loss only and recompute with the upstream gradient in the backward (the LM head's
weight gradient sums over tokens, so saved gradients could not be rescaled)."""

import torch

import lmxent as lx

from . import _bridge as B

Tensor = torch.Tensor


def _ct(dtype):
    """Dtype of losses and LSEs: float64 for float64 inputs, else float32 (as lmxent)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _none(like):
    """The placeholder of an output not computed (custom ops return tensors only)."""
    return like.new_empty(0)


def _ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                normalizer):
    return {"ignore_index": ignore_index, "reduction": reduction,
            "label_smoothing": label_smoothing, "z_loss": z_loss, "softcap": softcap,
            "logit_scale": logit_scale, "normalizer": normalizer}


def scaled(t, g):
    """t * g for the upstream gradient g; t itself when g is a CPU 1.0 outside
    tracing (the usual eager loss.backward()), saving a pass over t."""
    if (type(g) is torch.Tensor and g.device.type == "cpu" and g.ndim == 0
            and not torch.compiler.is_compiling() and g.item() == 1.0):
        return t
    return t * g


def _extra_outputs(ctx, *outputs):
    """Outputs that are not differentiable: autograd would otherwise give the
    backward a zero-filled upstream gradient for each (a logits-sized allocation
    and fill for a saved gradient). The loss's upstream gradient is then None
    when the loss did not reach the differentiated result."""
    ctx.mark_non_differentiable(*outputs)
    ctx.set_materialize_grads(False)


def _no_backward(name):
    raise RuntimeError(f"lmxent::{name} was called without the outputs its backward needs: "
                       f"call lmxent.torch.{name}, which chooses them")


# ------------------------------------------------------------------ cross_entropy

@torch.library.custom_op("lmxent::cross_entropy", mutates_args=())
def _cross_entropy(logits: Tensor, targets: Tensor, weight: Tensor | None,
                   ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
                   softcap: float | None, logit_scale: float, normalizer: float | None,
                   with_grad: bool, with_lse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, LSE or empty, d loss / d logits or empty)."""
    opts = _ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                       normalizer)
    if with_grad:
        loss, grad = B.call(lx.cross_entropy_with_grad, logits, logits, targets, weight=weight,
                            **opts)
        return loss, _none(loss), grad
    if with_lse:
        loss, lse = B.call(lx.cross_entropy, logits, logits, targets, weight=weight,
                           return_lse=True, **opts)
        return loss, lse, _none(logits)
    loss = B.call(lx.cross_entropy, logits, logits, targets, weight=weight, **opts)
    return loss, _none(loss), _none(logits)


@_cross_entropy.register_fake
def _(logits, targets, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      logit_scale, normalizer, with_grad, with_lse):
    lead, ct = logits.shape[:-1], _ct(logits.dtype)
    loss = logits.new_empty(lead if reduction == "none" else (), dtype=ct)
    lse = logits.new_empty(lead if with_lse and not with_grad else (0,), dtype=ct)
    grad = logits.new_empty(logits.shape if with_grad else (0,))
    return loss, lse, grad


def _ce_setup(ctx, inputs, output):
    logits, targets, weight = inputs[:3]
    ctx.opts, ctx.with_grad = inputs[3:10], inputs[10]
    _loss, lse, grad = output
    _extra_outputs(ctx, lse, grad)
    ctx.has_lse = inputs[11] and not ctx.with_grad
    # only what the backward reads: with the fused gradient the logits may be freed
    ctx.save_for_backward(*((grad,) if ctx.with_grad else (logits, targets, weight, lse)))


def _ce_backward(ctx, g_loss, g_lse, g_grad):
    if g_loss is None:
        d = None
    elif ctx.with_grad:
        d = scaled(ctx.saved_tensors[0], g_loss)
    elif ctx.has_lse:
        logits, targets, weight, lse = ctx.saved_tensors
        d = torch.ops.lmxent.cross_entropy_backward(logits, targets, lse, g_loss, weight,
                                                    *ctx.opts)
    else:
        _no_backward("cross_entropy")
    return (d,) + (None,) * 11


_cross_entropy.register_autograd(_ce_backward, setup_context=_ce_setup)


@torch.library.custom_op("lmxent::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward(logits: Tensor, targets: Tensor, lse: Tensor, grad_output: Tensor,
                            weight: Tensor | None, ignore_index: int, reduction: str,
                            label_smoothing: float, z_loss: float, softcap: float | None,
                            logit_scale: float, normalizer: float | None) -> Tensor:
    """d loss / d logits * grad_output from the forward's LSE (one pass)."""
    opts = _ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                       normalizer)
    return B.call(lx.cross_entropy_backward, logits, logits, targets, lse, grad_output,
                  weight=weight, **opts)


@_cross_entropy_backward.register_fake
def _(logits, *args):
    return logits.new_empty(logits.shape)


# ----------------------------------------------------------- linear_cross_entropy

@torch.library.custom_op("lmxent::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor,
                          bias: Tensor | None, class_weight: Tensor | None,
                          ignore_index: int, reduction: str, label_smoothing: float,
                          z_loss: float, softcap: float | None, logit_scale: float,
                          normalizer: float | None, chunk_size: int | None,
                          memory_budget: int | None, grad_output: Tensor | None,
                          with_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, d_hidden, d_weight, d_bias), the gradients of loss * grad_output (1 when
    None), empty without with_grad (d_bias also without a bias)."""
    opts = _ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                       normalizer)
    r = B.call(lx.linear_cross_entropy, hidden, hidden, weight, targets, bias=bias,
               class_weight=class_weight, chunk_size=chunk_size, memory_budget=memory_budget,
               grad_output=1.0 if grad_output is None else grad_output,
               return_grads=with_grad, **opts)
    if not with_grad:
        return r, _none(hidden), _none(weight), _none(weight)
    loss, (dh, dw, db) = r
    return loss, dh, dw, _none(weight) if db is None else db


@_linear_cross_entropy.register_fake
def _(hidden, weight, targets, bias, class_weight, ignore_index, reduction, *args):
    with_grad = args[-1]
    lead = hidden.shape[:-1]
    loss = hidden.new_empty(lead if reduction == "none" else (), dtype=_ct(hidden.dtype))
    if not with_grad:
        return loss, _none(hidden), _none(weight), _none(weight)
    db = weight.new_empty(bias.shape) if bias is not None else _none(weight)
    return loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), db


def _lce_setup(ctx, inputs, output):
    ctx.opts, ctx.with_grad = inputs[5:14], inputs[-1]
    _extra_outputs(ctx, *output[1:])
    ctx.has_bias = inputs[3] is not None
    if ctx.with_grad:
        ctx.save_for_backward(*output[1:])
    else:
        ctx.save_for_backward(*inputs[:5])


def _lce_backward(ctx, g_loss, *unused):
    if g_loss is None:
        dh = dw = db = None
    elif ctx.with_grad:
        dh, dw, db = (scaled(t, g_loss) for t in ctx.saved_tensors)
    else:  # recomputed with the per-token upstream gradient
        _, dh, dw, db = torch.ops.lmxent.linear_cross_entropy(*ctx.saved_tensors, *ctx.opts,
                                                              g_loss, True)
    return (dh, dw, None, db if ctx.has_bias else None) + (None,) * 12


_linear_cross_entropy.register_autograd(_lce_backward, setup_context=_lce_setup)


# ------------------------------------------------------------------ kl_divergence

@torch.library.custom_op("lmxent::kl_divergence", mutates_args=())
def _kl_divergence(student: Tensor, teacher: Tensor, temperature: float, direction: str,
                   reduction: str, mask: Tensor | None, grad_output: Tensor | None,
                   with_grad: bool) -> tuple[Tensor, Tensor]:
    """(loss, d loss / d student * grad_output (1 when None), or empty)."""
    r = B.call(lx.kl_divergence, student, student, teacher, temperature=temperature,
               direction=direction, reduction=reduction, mask=mask,
               grad_output=1.0 if grad_output is None else grad_output, return_grad=with_grad)
    return r if with_grad else (r, _none(student))


@_kl_divergence.register_fake
def _(student, teacher, temperature, direction, reduction, mask, grad_output, with_grad):
    lead = student.shape[:-1]
    loss = student.new_empty(lead if reduction == "none" else (), dtype=_ct(student.dtype))
    return loss, student.new_empty(student.shape if with_grad else (0,))


def _kl_setup(ctx, inputs, output):
    ctx.opts, ctx.with_grad = inputs[2:5], inputs[-1]
    _extra_outputs(ctx, output[1])
    ctx.save_for_backward(*((output[1],) if ctx.with_grad else (inputs[0], inputs[1], inputs[5])))


def _kl_backward(ctx, g_loss, g_grad):
    if g_loss is None:
        d = None
    elif ctx.with_grad:
        d = scaled(ctx.saved_tensors[0], g_loss)
    else:
        student, teacher, mask = ctx.saved_tensors
        _, d = torch.ops.lmxent.kl_divergence(student, teacher, *ctx.opts, mask, g_loss, True)
    return (d,) + (None,) * 7


_kl_divergence.register_autograd(_kl_backward, setup_context=_kl_setup)


# ------------------------------------------------------ softmax, log_softmax, LSE

@torch.library.custom_op("lmxent::softmax", mutates_args=())
def _softmax(x: Tensor, dim: int, temperature: float, log: bool) -> Tensor:
    """softmax(x / T) (log=False) or its log along dim, in x's dtype."""
    fn = lx.log_softmax if log else lx.softmax
    return B.call(fn, x, x, axis=dim, temperature=temperature).contiguous()


@_softmax.register_fake
def _(x, dim, temperature, log):
    return x.new_empty(x.shape)


def _softmax_setup(ctx, inputs, output):
    ctx.dim, ctx.temperature, ctx.log = inputs[1:]
    ctx.save_for_backward(output)


def _softmax_backward(ctx, g):
    (y,) = ctx.saved_tensors
    ct, dim = _ct(y.dtype), ctx.dim
    y32, g32 = y.to(ct), g.to(ct)
    if ctx.log:  # d/dz log_softmax: g - softmax * sum(g)
        d = g32 - y32.exp() * g32.sum(dim, keepdim=True)
    else:  # d/dz softmax: y * (g - sum(g * y))
        d = y32 * (g32 - (g32 * y32).sum(dim, keepdim=True))
    return (d / ctx.temperature).to(y.dtype), None, None, None


_softmax.register_autograd(_softmax_backward, setup_context=_softmax_setup)


@torch.library.custom_op("lmxent::logsumexp", mutates_args=())
def _logsumexp(x: Tensor, dim: int, keepdim: bool, temperature: float) -> Tensor:
    """log sum exp(x / T) along dim: float32 (float64 for float64 x)."""
    return B.call(lx.logsumexp, x, x, axis=dim, keepdims=keepdim, temperature=temperature)


@_logsumexp.register_fake
def _(x, dim, keepdim, temperature):
    shape = list(x.shape)
    if keepdim:
        shape[dim] = 1
    else:
        del shape[dim]
    return x.new_empty(shape, dtype=_ct(x.dtype))


def _lse_setup(ctx, inputs, output):
    ctx.dim, ctx.keepdim, ctx.temperature = inputs[1:]
    ctx.save_for_backward(inputs[0])


def _lse_backward(ctx, g):
    (x,) = ctx.saved_tensors
    p = torch.ops.lmxent.softmax(x, ctx.dim, ctx.temperature, False)
    if not ctx.keepdim:
        g = g.unsqueeze(ctx.dim)
    return (p.to(g.dtype) * (g / ctx.temperature)).to(x.dtype), None, None, None


_logsumexp.register_autograd(_lse_backward, setup_context=_lse_setup)


# -------------------------------------------------------------------- token_stats

@torch.library.custom_op("lmxent::token_stats", mutates_args=())
def _token_stats(logits: Tensor, targets: Tensor, ignore_index: int,
                 temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logprob, lse, entropy, correct, top_prob, rank), as lx.token_stats."""
    return B.call(lx.token_stats, logits, logits, targets, ignore_index=ignore_index,
                  temperature=temperature)


@_token_stats.register_fake
def _(logits, targets, ignore_index, temperature):
    lead, ct = logits.shape[:-1], _ct(logits.dtype)
    f = [logits.new_empty(lead, dtype=ct) for _ in range(4)]
    return (f[0], f[1], f[2], logits.new_empty(lead, dtype=torch.bool), f[3],
            logits.new_empty(lead, dtype=torch.int64))
