"""The LM head without materialising the logits: cross-entropy of
`hidden @ weight.T (+ bias)` and its gradients, computed a chunk of token rows at
a time, so that no more than `chunk rows x V` logits exist at once.

Per chunk: the logits go into ONE reused buffer (the array library's BLAS:
NumPy's on the CPU, cuBLAS through CuPy), the fused cross-entropy kernel turns
that buffer into the gradient in place, already multiplied by grad_output and
divided by the global "mean" denominator (so there is no second pass), and
three more products consume it:

    d_hidden[chunk] = g @ weight      d_weight += g.T @ hidden[chunk]      d_bias += g.sum(0)

Conventions are those of lmxent.cross_entropy (see lmxent.reference): the class
weights are called `class_weight` here because `weight` is the (V, D) matrix.
A "mean" over zero non-ignored tokens is 0 with zero gradients. Losses (and log
probabilities, LSE) are float32 (float64 for float64 inputs); per-token losses
are summed in float64, so the result does not depend on the chunk size beyond
the rounding of the matrix products.

Memory, besides the outputs: the logits buffer (chunk rows x V in float32, or
float64 for float64 input) and scratch of O(chunk rows x D + 2**19) elements.
16-bit inputs (float16, bfloat16) have no BLAS in NumPy: the weight is copied
to float32 once (V x D x 4 bytes) and d_weight is accumulated in float32 (another
V x D x 4 bytes) before the cast to the input dtype, as are d_hidden and d_bias
(accumulating 16-bit gradients over chunks is a known source of divergence).

Written once against the input's array module (numpy or cupy; docs/design.md, principle 5).
The one host synchronisation is for the "mean" denominator and target validation,
before the first chunk.
"""
import math

import numpy as np

from . import _arrays as A
from ._options import Checks, Options, checked_ids, checked_weight, grad_factor, reduce_loss

__all__ = ["linear_cross_entropy", "linear_target_logprobs"]

# Default chunk: a logits buffer no larger than the hidden states, but at least
# this many rows. Every chunk's two products with the weight read (and BLAS
# repacks) the whole (V, D) matrix, so thin chunks are slow: measured with
# OpenBLAS (AVX2, D=512, 4096 tokens), the first product runs at ~60 GFLOP/s with
# the 16 rows the hidden-state budget gives at V=128256 against ~180 at full size,
# and the whole call takes 1.32x / 1.23x / 1.12x / 1.08x the three full-size
# products with 128 / 256 / 384 / 512-row chunks (V=128256, one thread).
# The floor is also at most 3/4 of D rows: a buffer of at most 3/4 of d_weight's
# size, so that the call's memory beyond its outputs stays below that of torch's
# chunked F.linear_cross_entropy (about the outputs' size) when D is small
# (docs/lm_head.md has the curve of chunk size against time and memory).
MIN_CHUNK_ROWS = 384

# d_weight += g.T @ h: NumPy's and CuPy's matmul cannot accumulate (no BLAS
# beta=1) and a (V, D) temporary would cost as much as the logits buffer saves,
# so the product goes one block of the vocabulary at a time through a temporary
# of at most this many elements (and no larger than the logits buffer), and is
# added in; measured within 10% of a plain out= product at 256 rows per chunk,
# and no faster with larger blocks.
_BLOCK_ELEMS = 1 << 19

# The gradient with respect to the logits h @ W.T is logit_scale * dloss/dz (z the
# scaled logits). Above this scale (float32 compute) it could overflow float32 and
# the products' sums turn inf - inf into NaN: the kernel then writes dloss/dz and the
# scale multiplies the products' results instead (see _times). Below it nothing changes.
_SCALE_AFTER = 2.0**64


def _times(xp, a, scale):
    """a *= scale in place, for a scale beyond a's dtype's range: the mantissa, then
    the power of two (exact), so zeros stay zeros and the rest rounds to +-inf
    where the product overflows, as the float64 reference rounded would."""
    mantissa, exponent = math.frexp(scale)
    xp.multiply(a, mantissa, out=a)
    with np.errstate(over="ignore"):
        xp.ldexp(a, exponent, out=a)


def default_chunk_rows(hidden, weight):
    """The token rows of a chunk linear_cross_entropy takes by default for `hidden`
    (..., D) and `weight` (V, D): a logits buffer no larger than the hidden states,
    but at least min(MIN_CHUNK_ROWS, 3/4 D) rows (and at most every token)."""
    row_bytes = weight.shape[0] * A.compute_dtype(hidden.dtype).itemsize
    floor = min(MIN_CHUNK_ROWS, max(1, 3 * hidden.shape[-1] // 4))
    rows = max(hidden.nbytes // row_bytes, floor)
    return min(rows, hidden.size // hidden.shape[-1])


class _Head:
    """Validated arrays and sizes of one call: hidden as (N, D) rows, the weight
    (and bias) in the compute dtype, flat targets, and the chunk row count."""

    def __init__(self, hidden, weight, targets, bias=None, *, opts=None, class_weight=None,
                 chunk_size=None, memory_budget=None):
        opts = opts or Options(-100, "mean", 0.0, 0.0, None, 1.0, None)
        h = A.as_float_array(hidden, "hidden")
        if h.ndim < 1:
            raise ValueError("hidden: expected shape (..., D), got a scalar")
        D = h.shape[-1]
        if D == 0:
            raise ValueError("hidden: the feature axis is empty (D = 0)")
        self.lead = h.shape[:-1]
        self.N = N = int(np.prod(self.lead, dtype=np.int64))
        if N == 0:
            raise ValueError(f"hidden: no tokens (shape {h.shape})")
        self.xp = xp = A.array_module(h)
        self.dtype, self.ct = h.dtype, A.compute_dtype(h.dtype)

        w = A.as_float_array(weight, "weight")
        if w.ndim != 2 or w.shape[1] != D:
            raise ValueError(f"weight: expected shape (V, {D}) (the vocabulary by hidden's "
                             f"last axis), got {w.shape}")
        self.V = V = w.shape[0]
        if V == 0:
            raise ValueError("weight: the vocabulary is empty (V = 0)")
        self._same_dtype(w, "weight")
        self.b = None
        if bias is not None:
            b = A.as_float_array(bias, "bias")
            if b.shape != (V,):
                raise ValueError(f"bias: expected shape ({V},), got {b.shape}")
            self._same_dtype(b, "bias")
            self.b = b.astype(self.ct, copy=False)

        t = A.asarray(targets, "targets", xp)
        if t.dtype.kind not in "iu":
            raise TypeError(f"targets: expected integer class ids, got dtype {t.dtype} "
                            "(probability targets would be as large as the logits: use "
                            "lx.cross_entropy on materialised logits)")
        if t.shape != self.lead:
            raise ValueError(f"targets: expected shape {self.lead} (hidden's shape without "
                             f"the feature axis), got {t.shape}")
        # Class ids and weights are validated once here (one host round trip on CuPy,
        # none when deferred); the chunks call the kernel directly.
        self.opts, checks = opts, Checks(xp)
        self.cw = checked_weight(class_weight, V, self.ct, xp, checks, "class_weight")
        self.t, _, self.denom = checked_ids(t, self.lead, V, self.cw, opts, xp, checks)
        checks.done()

        self.rows = self._chunk_rows(chunk_size, memory_budget, h, w)
        self.hidden = h
        self.h2 = h.reshape(N, D)
        # The products need a BLAS layout: C or F order (weight.T of a (D, V) array
        # is fine); anything else is copied once.
        if w.dtype != self.ct or not (w.flags.c_contiguous or w.flags.f_contiguous):
            w = xp.ascontiguousarray(w, dtype=self.ct)
        self.w = w

    def _same_dtype(self, a, name):
        if a.dtype != self.dtype:
            raise TypeError(f"{name}: dtype {a.dtype} differs from hidden's dtype "
                            f"{self.dtype} (cast one of them)")

    def _chunk_rows(self, chunk_size, memory_budget, hidden, weight):
        row_bytes = self.V * self.ct.itemsize
        if chunk_size is not None and memory_budget is not None:
            raise ValueError("give chunk_size or memory_budget, not both")
        if chunk_size is not None:
            rows = A.integer(chunk_size, "chunk_size")
            if rows <= 0:
                raise ValueError(f"chunk_size must be a positive number of rows, got {rows}")
        elif memory_budget is not None:
            budget = A.integer(memory_budget, "memory_budget")
            if budget <= 0:
                raise ValueError(f"memory_budget must be a positive number of bytes, got {budget}")
            rows = budget // row_bytes
            if rows <= 0:
                raise ValueError(f"memory_budget: {budget} bytes is less than one row of "
                                 f"logits ({self.V} x {self.ct.itemsize} bytes)")
        else:
            return default_chunk_rows(hidden, weight)
        return min(rows, self.N)

    def kernel(self, z, sl, **outputs):
        """The fused cross-entropy kernel on z, the logits of the token rows `sl`."""
        self.opts.kernel(z, self.t[sl], None, self.cw, **outputs)

    def chunks(self):
        """Yield (rows slice, hidden rows in the compute dtype, their logits) chunk by
        chunk. The logits are a view of one buffer that the next chunk overwrites: a
        consumer may overwrite it too (the in-place gradient)."""
        xp = self.xp
        buf = A.empty(xp, (self.rows, self.V), self.ct)
        wT = self.w.T
        for start in range(0, self.N, self.rows):
            sl = slice(start, min(start + self.rows, self.N))
            h = self.h2[sl].astype(self.ct, copy=False)
            z = buf[: sl.stop - sl.start]
            xp.matmul(h, wT, out=z)
            if self.b is not None:
                xp.add(z, self.b, out=z)
            yield sl, h, z


class _Grads:
    """d_hidden, d_weight and d_bias, fed one chunk of logit gradients at a time.
    Accumulators are float32 for 16-bit inputs (for float32/float64 inputs they are
    the outputs themselves)."""

    def __init__(self, head, scale_after=None):
        xp, ct, N, V = head.xp, head.ct, head.N, head.V
        self.head, D = head, head.h2.shape[1]
        self.scale_after = scale_after  # a logit_scale the products still need (or None)
        self.d_hidden = A.empty(xp, (N, D), head.dtype)
        self.d_weight = A.empty(xp, (V, D), ct)
        self.d_bias = xp.empty(V, ct) if head.b is not None else None
        self.dh_t = A.empty(xp, (D, head.rows), ct)  # d_hidden of a chunk, transposed
        # d_weight += g.T @ h goes through this (see _BLOCK_ELEMS); no larger than the
        # logits buffer either; the first chunk's blocks go straight into d_weight
        block = max(1, min(_BLOCK_ELEMS, head.rows * V) // D)
        self.tmp = A.empty(xp, (min(V, block), D), ct) if head.rows < N else None
        self.step = min(V, block)

    def add(self, sl, h, g):
        """Add the chunk of rows `sl`: hidden rows h and logit gradients g (both in the
        compute dtype)."""
        xp, w = self.head.xp, self.head.w
        # d_hidden = g @ W as (W.T @ g.T).T: the same product, but OpenBLAS threads the
        # (D, rows) orientation well, while g @ W (K = V) ran 2-3x slower on 2 threads
        # than on one (rows <= 384, D = 512 and 2048). The transposed copy is small.
        part = self.dh_t[:, : sl.stop - sl.start]
        xp.matmul(w.T, g.T, out=part)
        if self.scale_after is not None:
            _times(xp, part, self.scale_after)
        self.d_hidden[sl] = part.T
        # d_weight by vocabulary blocks, also in the first chunk (which writes them):
        # one (V, D) product of a transposed g made OpenBLAS fault in ~24 MB of
        # buffers that the blocks never need.
        first, acc, step = sl.start == 0, self.d_weight, self.step
        for s in range(0, acc.shape[0], step):
            e = min(s + step, acc.shape[0])
            part = acc[s:e] if first else self.tmp[: e - s]
            xp.matmul(g[:, s:e].T, h, out=part)
            if not first:
                xp.add(acc[s:e], part, out=acc[s:e])
        if self.d_bias is not None:
            if first:
                xp.sum(g, axis=0, out=self.d_bias)
            else:
                xp.add(self.d_bias, g.sum(axis=0), out=self.d_bias)

    def result(self):
        """(d_hidden, d_weight, d_bias or None) in the input dtypes and shapes."""
        dt = self.head.dtype
        if self.scale_after is not None:
            for acc in (self.d_weight, self.d_bias):
                if acc is not None:
                    _times(self.head.xp, acc, self.scale_after)
        return (self.d_hidden.reshape(self.head.hidden.shape),
                self.d_weight.astype(dt, copy=False),
                None if self.d_bias is None else self.d_bias.astype(dt, copy=False))


def linear_cross_entropy(hidden, weight, targets, *, bias=None, class_weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, softcap=None, logit_scale=1.0, normalizer=None,
                         grad_output=1.0, chunk_size=None, memory_budget=None,
                         return_grads=True):
    """Cross-entropy of `targets` under the logits `hidden @ weight.T (+ bias)`, and
    its gradients, without materialising the logits.

    hidden (..., D) float; weight (V, D) of the same dtype (the layout of a tied
    input embedding); bias (V,) or None; targets (...) integer class ids, equal to
    hidden.shape[:-1]. Every option means what it means in lx.cross_entropy;
    `class_weight` (V,) is its `weight=` (renamed: `weight` is the matrix).

    Returns (loss, (d_hidden, d_weight, d_bias)): the loss (0-d, or per token for
    reduction='none', float32 or float64) and the gradients of `loss * grad_output`
    (a per-token array for 'none') in the dtypes and shapes of hidden, weight and
    bias (d_bias is None without a bias). return_grads=False returns the loss only.

    Chunks: `chunk_size` token rows, or as many as fit in `memory_budget` bytes of
    logits buffer (V x 4 bytes per row; x 8 for float64). By default the buffer is
    no larger than the hidden states, but at least min(MIN_CHUNK_ROWS, 3/4 D) rows
    (thinner chunks leave the matrix products bound by reading the weight)."""
    opts = Options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                   normalizer)
    head = _Head(hidden, weight, targets, bias, opts=opts, class_weight=class_weight,
                 chunk_size=chunk_size, memory_budget=memory_budget)
    xp = head.xp
    scale, factor_rows = grad_factor(grad_output, reduction, head.denom, head.lead, head.ct,
                                     xp)
    after = head.ct != np.float64 and opts.scale > _SCALE_AFTER
    if after:  # the kernel's factor: the gradient of the scaled logits
        scale /= opts.scale
    loss_rows = xp.empty(head.N, head.ct)
    grads = _Grads(head, opts.scale if after else None) if return_grads else None
    for sl, h, z in head.chunks():
        if grads is None:
            head.kernel(z, sl, loss=loss_rows[sl])
        else:  # the logits become their gradient, scaled by the factor
            head.kernel(z, sl, loss=loss_rows[sl], grad=z, grad_scale=scale,
                        grad_rows=None if factor_rows is None else factor_rows[sl])
            grads.add(sl, h, z)
    loss = reduce_loss(loss_rows, reduction, head.denom, head.lead, head.ct, xp)
    return loss if grads is None else (loss, grads.result())


def linear_target_logprobs(hidden, weight, targets, *, bias=None, ignore_index=-100,
                           softcap=None, logit_scale=1.0, chunk_size=None,
                           memory_budget=None):
    """Evaluation scoring without gradients or logits: per token, log p(target) under
    softmax of the logits `hidden @ weight.T (+ bias)` (scaled by logit_scale, then
    soft-capped, as in lx.cross_entropy), and the log-sum-exp of those logits.

    Returns (logprob, lse), both shaped like targets, float32 (float64 for float64
    input). Ignored positions (targets == ignore_index) get logprob 0, so that sums
    over a sequence skip them; their lse is still the row's LSE. Arguments and chunks
    as in linear_cross_entropy."""
    opts = Options(ignore_index, "none", 0.0, 0.0, softcap, logit_scale, None)
    head = _Head(hidden, weight, targets, bias, opts=opts, chunk_size=chunk_size,
                 memory_budget=memory_budget)
    xp = head.xp
    logprob, lse = xp.empty(head.N, head.ct), xp.empty(head.N, head.ct)
    for sl, _, z in head.chunks():
        head.kernel(z, sl, loss=logprob[sl], lse=lse[sl])
    xp.subtract(0.0, logprob, out=logprob)  # 0 - 0 = +0.0 for ignored tokens
    return logprob.reshape(head.lead), lse.reshape(head.lead)
