"""Vocabulary-parallel cross-entropy, LM head, log-softmax and token statistics.

Each rank holds the columns [vocab_start, vocab_start + V_local) of every logit
row (its slice of the LM head); the slices tile [0, vocab_size). Per row, with
L the log-sum-exp of the whole row and lse_r, the one of rank r's slice, the
single-device loss of lmxent.cross_entropy (contract.h)

    loss = hard_w (L - z_t) + L sum_j t_j - sum_j t_j z_j + z_loss L^2

splits over the slices: rank r's kernel, run on its slice with the hard term
only where the target lies in it (CEArgs.vocab_slice) and without z-loss, gives

    l_r = a_r lse_r - (its part of hard_w z_t + sum_j t_j z_j),   a_r = hard_r + sum_{j in r} t_j

so that loss = sum_r (l_r + a_r (L - lse_r)) + z_loss L^2: every term stays
relative to its own slice's maximum, nothing cancels. One allgather of
(lse_r, l_r, a_r) per row gives every rank L (the contract's LSE merge of the
states (lse_r, 1)) and the loss. The gradient needs no further collective: it
is each slice's gradient from the global L and A = sum_r a_r + 2 z_loss L
(CEArgs.grad_coef), the hard term -hard_w [j == t] only in the target's slice.

The spread t_j = eps / V w_j (label smoothing; for probability targets q,
w_j ((1 - eps) q_j + eps / V)) is over the whole vocabulary V; the kernel
spreads over its V_local columns, so it gets eps' and class weights c w with
eps' / V_local c = eps / V and (1 - eps') c = 1 - eps:
c = 1 - eps + eps V_local / V, eps' = eps V_local / (V c).

Arguments every rank passes whole: class-id targets, class weights (V,) and
grad_output; its slice: the logits, probability targets, the LM head's weight
rows and bias. Before the first collective, every rank's arguments and the
slices are agreed on in one allgather of five numbers per rank (a rank whose
arguments are refused, or slices that do not tile [0, V), raise on every rank,
so no rank is left waiting); on CuPy under deferred validation
(lmxent._arrays.set_cuda_validation) it is skipped, with no host round trip.
docs/distributed.md lists each op's collectives and their cost.
"""
import contextlib

import numpy as np

from .. import _arrays as A
from ..cross_entropy import Checks, Options, checked_ids, checked_weight, grad_factor, reduce_loss
from ..linear_cross_entropy import _Grads, _Head
from ..token_stats import TokenStats
from .comm import as_comm

# local class ids of the kernel calls: a target in another slice, an ignored row
_ELSEWHERE, _IGNORED = -1, -2
# logits compared per block in token_stats' count of the logits above the target's
_COUNT_BLOCK = 1 << 20


class RankFailed(RuntimeError):
    """Raised on every other rank when one rank's arguments were refused."""


def _errstate(xp):
    """inf - inf and friends are expected in the row math (they are handled)."""
    return np.errstate(invalid="ignore", over="ignore", divide="ignore") if xp is np \
        else contextlib.nullcontext()


def _slice_rows(x, name, xp, inplace=False):
    """(x2 rows, lead shape) of a rank's slice (..., V_local); V_local may be 0."""
    if x.ndim < 1:
        raise ValueError(f"{name}: expected at least 1 dimension (the vocabulary), got a scalar")
    if x.shape[-1] == 0:
        return xp.empty((int(np.prod(x.shape[:-1], dtype=np.int64)), 0), x.dtype), x.shape[:-1]
    return A.rows(x, name, need_view=inplace)


def _vocab(vocab_start, vocab_size, local):
    """(V, vocab_start) checked on this rank."""
    V = A.integer(vocab_size, "vocab_size")
    v0 = A.integer(vocab_start, "vocab_start")
    if V <= 0:
        raise ValueError(f"vocab_size must be positive, got {V}")
    if not 0 <= v0 <= V - local:
        raise ValueError(f"vocab_start: the slice [{v0}, {v0 + local}) is not inside "
                         f"[0, {V})")
    return V, v0


def _agree(comm, xp, make):
    """Runs make() (this rank's argument checks; returns (result, (vocab_start,
    V_local, V, rows))) and agrees with every rank in one allgather of five numbers:
    raises on every rank if any rank failed, the slices do not tile [0, V) or the
    row counts differ. Returns make()'s result."""
    err, p = None, None
    try:
        p, layout = make()
        head = [0.0] + [float(v) for v in layout]
    except Exception as e:  # sent as a flag; raised below, on every rank
        err, head = e, [1.0, 0.0, 0.0, 0.0, 0.0]
    if not A.cuda_eager(xp):  # deferred validation: no round trip
        if err is not None:
            raise err
        return p
    got = comm.allgather(xp.asarray(np.array(head, np.float64)))
    got = got if xp is np else got.get()
    failed = [r for r in range(comm.size) if got[r, 0]]
    if err is not None:
        raise err
    if failed:
        raise RankFailed(f"the arguments of rank(s) {failed} were refused (see their error)")
    _check_tiling(got[:, 1:])
    return p


def _check_tiling(layout):
    """layout: (vocab_start, V_local, V, rows) per rank; the same on every rank."""
    starts, sizes, Vs, ns = (layout[:, i].astype(np.int64) for i in range(4))
    desc = ", ".join(f"rank {r}: [{s}, {s + k})" for r, (s, k) in enumerate(zip(starts, sizes)))
    if (Vs != Vs[0]).any():
        raise ValueError(f"vocab_size differs between ranks: {list(Vs)}")
    if (ns != ns[0]).any():
        raise ValueError(f"the number of token rows differs between ranks: {list(ns)} "
                         "(every rank passes the same targets)")
    order = np.argsort(starts[sizes > 0], kind="stable")
    s, k = starts[sizes > 0][order], sizes[sizes > 0][order]
    stops = s + k
    if len(s) == 0 or s[0] != 0 or stops[-1] != Vs[0] or (s[1:] != stops[:-1]).any():
        raise ValueError(f"the vocabulary slices must tile [0, {Vs[0]}) without gaps or "
                         f"overlaps; got {desc}")


def _merge_lse(lse, xp):
    """The LSE of whole rows from the slices' LSEs (P, n): the contract's merge of
    the states (lse_r, 1) (lse_merge, lse_final): -inf, +inf and NaN as there."""
    with _errstate(xp):
        m = lse.max(axis=0)
        fin = xp.isfinite(m)
        s = xp.exp(lse - xp.where(fin, m, 0.0)).sum(axis=0)
        return xp.where(fin, m + xp.log(s), m)


def _times(a, b, xp):
    """a * b with 0 where a is 0 (never 0 * inf)."""
    with _errstate(xp):
        return xp.where(a != 0, a * b, 0.0)


class _Targets:
    """The targets of one vocabulary-parallel cross-entropy, prepared for the kernel
    on this rank's slice: local class ids (or the probability slice), the class
    weights c w and eps' of the kernel call, a_r per row, the counted rows and the
    "mean" denominator (over every rank's tokens: the targets are whole)."""

    def __init__(self, targets, lead, n, V, v0, local, weight, opts, ct, xp, checks,
                 allow_probs=True):
        eps = opts.eps
        w = checked_weight(weight, V, ct, xp, checks)
        wl = None if w is None else w[v0:v0 + local]
        spread = eps / V * (local if w is None else wl.sum(dtype=np.float64))  # on the device
        t = A.asarray(targets, "targets", xp)
        self.ids = self.probs = None
        if t.dtype.kind in "iu":
            tids, valid, self.denom = checked_ids(t, lead, V, w, opts, xp, checks)
            inside = valid & (tids >= v0) & (tids < v0 + local)
            # an id outside [0, V) (only under deferred CUDA validation) stays out of
            # range here too: the kernel gives its row NaN and records it
            known = (tids >= 0) & (tids < V)
            self.ids = A.require(xp.where(inside, tids - v0, xp.where(
                valid, xp.where(known, _ELSEWHERE, local), _IGNORED)), np.int64)
            w_t = 1.0 if w is None else w[xp.clip(tids, 0, V - 1)].astype(np.float64)
            self.a = xp.where(inside, (1 - eps) * w_t, 0.0) + xp.where(valid, spread, 0.0)
            self.counted = valid
        elif allow_probs and (t.dtype.kind == "f" or t.dtype == A.bfloat16_dtype()):
            if t.shape != tuple(lead) + (local,):
                raise ValueError(f"targets: probability targets must have the local logits' "
                                 f"shape {tuple(lead) + (local,)}, got {t.shape}")
            if opts.ignore_index >= 0:
                raise ValueError("ignore_index is not supported for probability targets")
            self.probs = A.require(t.reshape(n, local), ct)
            qw = self.probs.sum(axis=1, dtype=np.float64) if wl is None else \
                xp.matmul(self.probs, wl).astype(np.float64)
            self.a = (1 - eps) * qw + spread
            self.counted = xp.full(n, True)
            self.denom = float(opts.normalizer if opts.normalizer is not None else n)
        else:
            raise TypeError(f"targets: expected integer class ids"
                            f"{' or float probabilities' if allow_probs else ''}, got dtype "
                            f"{t.dtype}")
        c = 1 - eps + eps * local / V
        self.kopts = Options(_IGNORED, opts.reduction, eps * local / V / c if c else 0.0, 0.0,
                             opts.softcap, opts.scale, opts.normalizer)
        if wl is not None:
            self.wl = A.require(wl * c, ct)
        else:
            self.wl = None if c == 1 else xp.full(local, c, ct)
        self.opts, self.ct, self.xp = opts, ct, xp

    def _run(self, x2, rows, **outputs):
        ids = None if self.ids is None else self.ids[rows]
        probs = None if self.probs is None else self.probs[rows]
        self.kopts.kernel(x2, ids, probs, self.wl, vocab_slice=True, **outputs)

    def forward(self, comm, x2, rows=slice(None)):
        """(L, per-row loss in float64, A) of the token rows `rows`, whose slice of
        logits is x2: one allgather of (lse_r, l_r, a_r)."""
        xp, n = self.xp, x2.shape[0]
        lse, ell = xp.full(n, -np.inf, self.ct), xp.zeros(n, self.ct)
        if x2.shape[1]:
            self._run(x2, rows, loss=ell, lse=lse)
        mine = xp.stack([lse.astype(np.float64), ell.astype(np.float64), self.a[rows]])
        got = comm.allgather(mine)  # (P, 3, n)
        lse_r, ell_r, a_r = got[:, 0], got[:, 1], got[:, 2]
        L = _merge_lse(lse_r, xp)
        with _errstate(xp):
            gap = _times(a_r, L - lse_r, xp)
            # a target or spread on a slice of -inf logits only: its own loss is
            # -inf - -inf (NaN) in the kernel, +inf over the whole row
            loss = xp.where(gap == np.inf, np.inf, ell_r + gap).sum(axis=0)
            coef = a_r.sum(axis=0)
            if self.opts.z_loss:
                loss = loss + _times(self.opts.z_loss, L * L, xp)
                coef = coef + 2 * self.opts.z_loss * L
        return L, xp.where(self.counted[rows], loss, 0.0), coef

    def backward(self, x2, L, coef, grad, scale, grad_rows, rows=slice(None)):
        """The gradient of this slice into grad (may be x2), from the whole rows' L and A."""
        if x2.shape[1]:
            self._run(x2, rows, lse=A.require(L, self.ct), lse_given=True, grad=grad,
                      grad_scale=scale, grad_rows=grad_rows,
                      grad_coef=A.require(coef, self.ct))


class _CE:
    """Validated arguments of one vocabulary-parallel cross-entropy on this rank."""

    def __init__(self, local_logits, targets, vocab_start, vocab_size, weight, ignore_index,
                 reduction, label_smoothing, z_loss, softcap, logit_scale, normalizer,
                 inplace=False):
        x = A.as_float_array(local_logits, "local_logits", inplace=inplace)
        self.xp = xp = A.array_module(x)
        self.x, (self.x2, self.lead) = x, _slice_rows(x, "local_logits", xp, inplace)
        self.n, self.local = self.x2.shape
        self.V, self.v0 = _vocab(vocab_start, vocab_size, self.local)
        self.ct = A.compute_dtype(x.dtype)
        opts = Options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                       normalizer)
        checks = Checks(xp)
        self.t = _Targets(targets, self.lead, self.n, self.V, self.v0, self.local, weight, opts,
                          self.ct, xp, checks)
        checks.done()

    def agreed(self):
        return self, (self.v0, self.local, self.V, self.n)

    def reduce(self, loss_rows):
        return reduce_loss(loss_rows.astype(self.ct), self.t.opts.reduction, self.t.denom,
                           self.lead, self.ct, self.xp)


def cross_entropy(local_logits, targets, *, comm, vocab_start, vocab_size, weight=None,
                  ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                  softcap=None, logit_scale=1.0, normalizer=None, return_lse=False):
    """lx.cross_entropy of the whole rows, from this rank's slice of the logits
    (..., V_local) = columns [vocab_start, vocab_start + V_local) of (..., vocab_size).
    targets: the whole class ids (...) or this rank's slice of probability targets;
    weight: the whole (vocab_size,) class weights. The same loss (and LSE of the
    whole rows with return_lse) on every rank. Collectives: the agreement and one
    allgather of 3 float64 per row."""
    xp = A.array_module(A.as_float_array(local_logits, "local_logits"))
    comm = as_comm(comm, xp)
    p = _agree(comm, xp, lambda: _CE(
        local_logits, targets, vocab_start, vocab_size, weight, ignore_index, reduction,
        label_smoothing, z_loss, softcap, logit_scale, normalizer).agreed())
    L, loss_rows, _ = p.t.forward(comm, p.x2)
    loss = p.reduce(loss_rows)
    return (loss, L.astype(p.ct).reshape(p.lead)) if return_lse else loss


def cross_entropy_with_grad(local_logits, targets, *, comm, vocab_start, vocab_size,
                            weight=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                            normalizer=None, grad_output=1.0, inplace=False):
    """(loss, d loss / d local_logits * grad_output): the loss of cross_entropy and
    this rank's slice of the gradient (over local_logits with inplace=True).
    grad_output: the whole scalar or per-token array. Two reads of the slice (the
    forward, then the gradient from the whole rows' LSE); no collective beyond
    cross_entropy's."""
    xp = A.array_module(A.as_float_array(local_logits, "local_logits"))
    comm = as_comm(comm, xp)

    def make():
        p = _CE(local_logits, targets, vocab_start, vocab_size, weight, ignore_index, reduction,
                label_smoothing, z_loss, softcap, logit_scale, normalizer, inplace=inplace)
        p.factor = grad_factor(grad_output, reduction, p.t.denom, p.lead, p.ct, xp)
        return p.agreed()
    p = _agree(comm, xp, make)
    L, loss_rows, coef = p.t.forward(comm, p.x2)
    g = p.x2 if inplace else A.empty(xp, p.x2.shape, p.x.dtype)
    p.t.backward(p.x2, L, coef, g, *p.factor)
    return p.reduce(loss_rows), (p.x if inplace else g.reshape(p.x.shape))


def linear_cross_entropy(hidden, local_weight, targets, *, comm, vocab_start, vocab_size,
                         bias=None, class_weight=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                         normalizer=None, grad_output=1.0, chunk_size=None,
                         memory_budget=None, return_grads=True):
    """lx.linear_cross_entropy with the LM head split by vocabulary rows: this
    rank holds local_weight = rows [vocab_start, vocab_start + V_local) of the
    (vocab_size, D) matrix (and that slice of bias); hidden (..., D), targets and
    class_weight (vocab_size,) are whole. Returns (loss, (d_hidden, d_weight,
    d_bias)): the whole loss and d_hidden on every rank, this rank's rows of
    d_weight and d_bias. Every rank needs V_local >= 1. Collectives: the
    agreement, one allgather of 3 float64 per row per chunk (each chunk's LSE of
    the whole rows), and one allreduce of d_hidden (N x D, the compute dtype)."""
    h = A.as_float_array(hidden, "hidden")
    xp = A.array_module(h)
    comm = as_comm(comm, xp)

    def make():
        opts = Options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                       normalizer)
        # _Head validates and chunks hidden and the local weight rows; the class ids
        # are checked against the whole vocabulary by _Targets (its own check sees zeros)
        head = _Head(h, local_weight, xp.zeros(h.shape[:-1], np.int64), bias,
                     chunk_size=chunk_size, memory_budget=memory_budget)
        head.V_all, head.v0 = _vocab(vocab_start, vocab_size, head.V)
        checks = Checks(xp)
        head.targets = _Targets(targets, head.lead, head.N, head.V_all, head.v0, head.V,
                                class_weight, opts, head.ct, xp, checks, allow_probs=False)
        checks.done()
        head.factor = grad_factor(grad_output, reduction, head.targets.denom, head.lead,
                                  head.ct, xp)
        return head, (head.v0, head.V, head.V_all, head.N)
    head = _agree(comm, xp, make)
    t, (scale, factor_rows) = head.targets, head.factor
    loss_rows = xp.empty(head.N, np.float64)
    grads = _Grads(head) if return_grads else None
    for sl, hc, z in head.chunks():
        L, loss_rows[sl], coef = t.forward(comm, z, sl)
        if grads is not None:  # the logits become their gradient, in place
            t.backward(z, L, coef, z, scale, None if factor_rows is None else factor_rows[sl],
                       sl)
            grads.add(sl, hc, z)
    loss = reduce_loss(loss_rows.astype(head.ct), reduction, t.denom, head.lead, head.ct, xp)
    if grads is None:
        return loss
    dh = grads.d_hidden
    if dh.dtype == head.ct:
        comm.allreduce(dh)
    else:  # 16-bit: summed in the compute dtype
        acc = dh.astype(head.ct)
        dh[...] = comm.allreduce(acc)
    return loss, grads.result()



class _Rows:
    """Validated arguments of the softmax-family ops and token_stats on this rank."""

    def __init__(self, local_logits, vocab_start, vocab_size, temperature):
        x = A.as_float_array(local_logits, "local_logits")
        self.xp = A.array_module(x)
        self.x, (self.x2, self.lead) = x, _slice_rows(x, "local_logits", self.xp)
        self.n, self.local = self.x2.shape
        self.V, self.v0 = _vocab(vocab_start, vocab_size, self.local)
        self.ct = A.compute_dtype(x.dtype)
        self.scale = 1.0 / A.positive(temperature, "temperature")

    def agreed(self):
        return self, (self.v0, self.local, self.V, self.n)

    def softmax_pass(self, log_out=None):
        """This slice's LSE per row (float64; -inf for an empty slice), and its
        log-softmax into log_out when given, in one pass."""
        xp = self.xp
        lse = xp.full(self.n, -np.inf, self.ct)
        if self.local:
            A.kernels(self.x).softmax(self.x2, log_out, lse, self.scale, True)
        return lse.astype(np.float64)


def _whole_lse(comm, p, log_out=None):
    """(L, this slice's lse) per row: one allgather of 1 float64 per row."""
    lse = p.softmax_pass(log_out)
    return _merge_lse(comm.allgather(lse), p.xp), lse


def logsumexp(local_logits, *, comm, vocab_start, vocab_size, temperature=1.0):
    """lx.logsumexp over the last axis of the whole rows (..., vocab_size), from this
    rank's slice; the same on every rank. Collectives: the agreement and one
    allgather of 1 float64 per row."""
    xp = A.array_module(A.as_float_array(local_logits, "local_logits"))
    comm = as_comm(comm, xp)
    p = _agree(comm, xp, lambda: _Rows(local_logits, vocab_start, vocab_size,
                                       temperature).agreed())
    return _whole_lse(comm, p)[0].astype(p.ct).reshape(p.lead)


def log_softmax(local_logits, *, comm, vocab_start, vocab_size, temperature=1.0):
    """This rank's slice of lx.log_softmax of the whole rows: its log-softmax minus
    L - lse_r (16-bit outputs are rounded twice). Collectives: as logsumexp."""
    xp = A.array_module(A.as_float_array(local_logits, "local_logits"))
    comm = as_comm(comm, xp)
    p = _agree(comm, xp, lambda: _Rows(local_logits, vocab_start, vocab_size,
                                       temperature).agreed())
    out = A.empty(xp, p.x2.shape, p.x.dtype)
    L, lse = _whole_lse(comm, p, out)
    with _errstate(xp):
        shift = (L - lse).astype(p.ct)[:, None]
    if out.dtype == p.ct:
        out -= shift
    else:
        out[...] = (out.astype(p.ct) - shift).astype(out.dtype)
    return out.reshape(p.x.shape)


def token_stats(local_logits, targets, *, comm, vocab_start, vocab_size, ignore_index=-100,
                temperature=1.0):
    """lx.token_stats of the whole rows, from this rank's slice; targets: the whole
    class ids. The same TokenStats on every rank. Collectives: the agreement, one
    allgather of 6 float64 per row (the slices' LSE, entropy, top probability, and
    the target's log-probability and logit from the slice holding it), then the
    target's rank: each slice counts its logits above the target's (a second read
    of the slice) and one allreduce of 1 float64 per row sums the counts."""
    xp = A.array_module(A.as_float_array(local_logits, "local_logits"))
    comm = as_comm(comm, xp)

    def make():
        p = _Rows(local_logits, vocab_start, vocab_size, temperature)
        p.ignore_index = A.ignore_index(ignore_index)
        p.ids, p.valid = A.class_ids(targets, p.lead, p.V, p.ignore_index, xp=xp)
        return p.agreed()
    p = _agree(comm, xp, make)
    n, v1, ct = p.n, p.v0 + p.local, p.ct
    inside = p.valid & (p.ids >= p.v0) & (p.ids < v1)
    local = A.require(xp.where(inside, p.ids - p.v0, _IGNORED), np.int64)
    lp, lse, ent, top = (xp.zeros(n, ct) for _ in range(4))
    rank = xp.zeros(n, np.int64)
    x_t = xp.zeros(n, np.float64)
    if p.local:
        lse[...] = -np.inf
        A.kernels(p.x).token_stats(p.x2, local, _IGNORED, p.scale, lp, lse, ent, top, rank)
        x_t = xp.where(inside, p.x2[xp.arange(n), xp.clip(local, 0, p.local - 1)]
                       .astype(ct).astype(np.float64), 0.0)
    else:
        lse[...] = -np.inf
    mine = xp.stack([lse.astype(np.float64), ent.astype(np.float64), top.astype(np.float64),
                     lp.astype(np.float64), x_t, inside.astype(np.float64)])
    got = comm.allgather(mine)  # (P, 6, n)
    lse_r, ent_r, top_r, lp_r, xt_r, own_r = (got[:, i] for i in range(6))
    L = _merge_lse(lse_r, xp)
    with _errstate(xp):
        share = xp.exp(lse_r - L)  # each slice's probability mass
        defined = xp.isfinite(L)
        entropy = xp.where(defined, _times(share, ent_r + (L - lse_r), xp).sum(axis=0), np.nan)
        top_prob = xp.where(defined, (top_r * share).max(axis=0), np.nan)
        logprob = _times(own_r, lp_r - (L - lse_r), xp).sum(axis=0)
    # the target's rank: logits above it here, and equal ones before it (a slice
    # before the target's counts its ties)
    xt = (xt_r * own_r).sum(axis=0)
    above = xp.where(inside, rank, 0).astype(np.float64)
    if p.local:
        ties = p.valid & (p.ids >= v1)
        others = p.valid & ~inside
        step = max(1, _COUNT_BLOCK // p.local)
        for s in range(0, n, step):
            e = min(s + step, n)
            xc, th = p.x2[s:e].astype(ct), xt[s:e, None]
            count = (xc > th).sum(axis=1) + xp.where(ties[s:e], (xc == th).sum(axis=1), 0)
            above[s:e] = xp.where(others[s:e], count, above[s:e])
    above = comm.allreduce(above)
    rank = xp.where(p.valid & ~xp.isnan(L), above, -1).astype(np.int64)
    shape = lambda a: a.reshape(p.lead)  # noqa: E731
    logprob = xp.where(p.valid, logprob, 0.0)
    return TokenStats(shape(logprob.astype(ct)), shape(L.astype(ct)), shape(entropy.astype(ct)),
                      shape(rank == 0), shape(top_prob.astype(ct)), shape(rank))


def global_normalizer(targets, *, comm, weight=None, ignore_index=-100):
    """The "mean" denominator of a batch split over data-parallel ranks: the kept
    tokens of every rank's targets counted (with class weights (V,): their
    weights summed), for normalizer= of every rank's loss, so that the mean is
    the mean over the whole batch. None when no rank has a kept token
    (normalizer=None then gives the 0 of a mean over nothing). A rank may have
    no tokens. One allgather of 2 float64 per rank (the count and whether the
    rank's arguments were refused: then every rank raises). NumPy: a float;
    CuPy: a 0-d device array (no host round trip under deferred validation;
    normalizer= reads it on the host)."""
    t0 = A.asarray(targets, "targets") if not A._is_cupy(targets) else targets
    xp = A.array_module(t0) if A._is_cupy(t0) else np
    comm = as_comm(comm, xp)
    err, count = None, 0.0
    try:
        ii = A.ignore_index(ignore_index)
        if weight is None:
            t = A.asarray(targets, "targets", xp)
            if t.dtype.kind not in "iu":
                raise TypeError(f"targets: expected integer class ids, got dtype {t.dtype}")
            count = xp.count_nonzero(A.int64_ids(t.reshape(-1), 0, ii, xp)[1])
        else:
            w = A.real_array(weight, "weight", xp)
            if w.ndim != 1:
                raise ValueError(f"weight: expected shape (V,), got {w.shape}")
            t = A.asarray(targets, "targets", xp)
            ids, valid = A.class_ids(t, t.shape, w.shape[0], ii, xp=xp)
            count = xp.where(valid, w.astype(np.float64)[xp.clip(ids, 0, w.shape[0] - 1)],
                             0.0).sum()
    except Exception as e:  # sent as a flag; raised below, on every rank
        err = e
    mine = xp.stack([xp.asarray(float(err is not None)), xp.asarray(count, np.float64)])
    got = comm.allgather(mine)
    if A.cuda_eager(xp):
        flags = got[:, 0] if xp is np else got[:, 0].get()
        if err is not None:
            raise err
        if flags.any():
            raise RankFailed(f"the arguments of rank(s) {[int(r) for r in np.flatnonzero(flags)]} were "
                             "refused (see their error)")
    elif err is not None:
        raise err
    total = got[:, 1].sum()
    if xp is np:
        return float(total) if total > 0 else None
    return total
