"""What the benchmark knows of an op family (Op): its outputs, its float64
reference on a problem, the bytes or FLOPs it costs, and its implementations; and
the pieces the op registry (lmxent._registry) builds them from."""
import numpy as np

import lmxent as lx
from lmxent import reference as R

from .peers import jax_impl, torch_impl, xp_impl
from .problem import summed

# the decoding ops' setting (the issue's benchmark): temperature, top-k, top-p; and
# the number of raw log-probabilities sample returns
DECODING = dict(temperature=0.7, top_k=50, top_p=0.9)
NUM_LOGPROBS = 5

# above this many multiply-adds a float64 reference of the LM head's summed outputs
# (loss, d_weight) is too slow on the host; they are then left unchecked (and said so)
HEAD_CHECK_MACS = 2**34


class Op:
    """One op family: the lmxent functions it needs (it runs only when this build
    has them all), the names of its outputs and which of them are summed over all
    rows (`whole`; the others are per row), its float64 reference outputs for a
    problem (per-row ones on problem.rows; None: left unchecked), the bytes it must
    move or the FLOPs it must do, and its implementations: row name -> factory
    (problem, peer handle) -> a call returning the outputs in that order."""

    def __init__(self, name, needs, outputs, reference, impls, *, whole=(),
                 moved=lambda p: 0, flops=lambda p: 0):
        self.name, self.needs, self.outputs, self.reference = name, needs, outputs, reference
        self.impls, self.whole, self.moved, self.flops = impls, whole, moved, flops

    @property
    def available(self):
        return all(hasattr(lx, n) for n in self.needs)


def read(p):        # one read of the logits
    return p.x.nbytes


def read_write(p):  # one read, one write
    return 2 * p.x.nbytes


def inplace(call):
    """lmxent with inplace=True: the first call (the checked one) overwrites a copy of
    the logits with the gradient; the timed calls then run on their own output."""
    def factory(p, _):
        buf = p.x.copy()
        return lambda: call(p, buf)
    return factory


def softmax_family(name, xp_body, moved):
    return Op(name, (name,), (name,), lambda p: (getattr(R, name)(p.rows64("x")),), {
        "lmxent": lambda p, _: lambda: getattr(lx, name)(p.x),
        "numpy": xp_impl(xp_body, ["x"]),
        "torch": torch_impl(lambda torch, x: getattr(torch, name)(x, -1), ["x"]),
        "quack": torch_impl(lambda quack, x: quack.softmax(x), ["x"])
        if name == "softmax" else None,
        "jax": jax_impl(lambda jax, x: xp_body(jax.numpy, x), ["x"]),
    }, moved=moved)


def ce_with_grad_reference(p):
    loss = summed(lambda x, t: (R.cross_entropy(x, t, reduction="sum"),),
                  p.chunks64("x", "t"))[0] / p.N
    grad = R.cross_entropy_with_grad(p.rows64("x"), p.rows64("t"), normalizer=p.N)[1]
    return loss, grad


def head_reference(p):
    """The LM head from the reference cross-entropy of float64 logits h @ W.T:
    d_hidden = g @ W, d_weight = g.T @ h."""
    W = p.host("weight").astype(np.float64)
    g_rows = R.cross_entropy_with_grad(p.rows64("hidden") @ W.T, p.rows64("t"),
                                       normalizer=p.N)[1]
    if p.N * p.V * p.D > HEAD_CHECK_MACS:
        return None, g_rows @ W, None

    def part(h, t):
        loss, g = R.cross_entropy_with_grad(h @ W.T, t, reduction="sum")
        return loss, g.T @ h
    loss, d_weight = summed(part, p.chunks64("hidden", "t"))
    return loss / p.N, g_rows @ W, d_weight / p.N


def kl_reference(p):
    loss = summed(lambda s, q: (R.kl_divergence(s, q, reduction="sum"),),
                  p.chunks64("x", "teacher"))[0] / p.N
    grad = R.kl_divergence(p.rows64("x"), p.rows64("teacher"), reduction="sum",
                           return_grad=True)[1] / p.N
    return loss, grad


def process_logits_reference(p):
    return (R.process_logits(p.rows64("x"), **DECODING),)


def sample_reference(p):
    """The raw logits' top-n log-probabilities (deterministic: the draws of peers
    with other generators are not compared, nor the ids, whose order among ties
    torch leaves unspecified; tests/test_decoding.py and the self-check compare
    lmxent's tokens and ids with the reference's)."""
    return (R.sample(p.rows64("x"), num_logprobs=NUM_LOGPROBS, **DECODING).top_logprobs,)
