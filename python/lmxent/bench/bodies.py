"""The peers' implementations of each op: straightforward vectorised code.

NumPy / CuPy bodies (xp = numpy or cupy) compute in float32 for 16-bit input (float64
for float64), like lmxent; outputs of the logits' size keep the input's dtype. Bodies
without in-place updates also serve JAX (xp = jax.numpy). Then the torch bodies."""
import numpy as np


def compute(xp, a):
    """a in the compute dtype: float32 for 16-bit and float32 input, float64 kept."""
    return a if a.dtype == np.float64 else a.astype(np.float32)


def xp_lse(xp, x):
    z = compute(xp, x)
    m = z.max(axis=-1, keepdims=True)
    return (m + xp.log(xp.exp(z - m).sum(axis=-1, keepdims=True)))[:, 0]


def xp_log_softmax(xp, x):
    return (compute(xp, x) - xp_lse(xp, x)[:, None]).astype(x.dtype)


def xp_softmax(xp, x):
    z = compute(xp, x)
    e = xp.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(x.dtype)


def xp_ce(xp, x, t):
    return xp_lse(xp, x) - compute(xp, x[xp.arange(len(t)), t])


def xp_ce_grad_of(xp, z, t):
    """(mean loss, gradient) of float32/64 logits z."""
    n, r = len(t), xp.arange(len(t))
    lse = xp_lse(xp, z)
    g = xp.exp(z - lse[:, None])
    g[r, t] -= 1.0
    g /= n
    return xp.mean(lse - z[r, t]), g


def xp_ce_grad(xp, x, t):
    loss, g = xp_ce_grad_of(xp, compute(xp, x), t)
    return loss, g.astype(x.dtype, copy=False)


def xp_linear_ce(xp, h, w, t):
    h32, w32 = compute(xp, h), compute(xp, w)
    loss, g = xp_ce_grad_of(xp, h32 @ w32.T, t)
    return loss, (g @ w32).astype(h.dtype, copy=False), (g.T @ h32).astype(w.dtype, copy=False)


def xp_token_stats(xp, x, t):
    z, r = compute(xp, x), xp.arange(len(t))
    lse = xp_lse(xp, z)
    lp = z - lse[:, None]
    zt = z[r, t][:, None]
    rank = ((z > zt) | ((z == zt) & (xp.arange(z.shape[1]) < t[:, None]))).sum(-1)
    return (zt[:, 0] - lse, lse, -(xp.exp(lp) * lp).sum(-1), rank == 0,
            xp.exp(z.max(-1) - lse), rank)


def xp_kl_terms(xp, s, q):
    """Forward KL(teacher || student) of student logits s and teacher logits q:
    the log-probabilities of both and the teacher's probabilities."""
    ls = compute(xp, s) - xp_lse(xp, s)[:, None]
    lt = compute(xp, q) - xp_lse(xp, q)[:, None]
    return ls, lt, xp.exp(lt)


def xp_kl(xp, s, q):
    """The forward KL, batchmean (for JAX's autodiff)."""
    ls, lt, pt = xp_kl_terms(xp, s, q)
    return (pt * (lt - ls)).sum() / len(s)


def xp_kl_grad(xp, s, q):
    """The forward KL, batchmean, and its gradient (p_student - p_teacher) / N."""
    ls, lt, pt = xp_kl_terms(xp, s, q)
    return (pt * (lt - ls)).sum() / len(s), ((xp.exp(ls) - pt) / len(s)).astype(s.dtype)


# torch (and its peers' inputs)

def torch_token_stats(torch, x, t):
    z = x.float() if x.dtype != torch.float64 else x
    lse = torch.logsumexp(z, -1)
    lp = z - lse[:, None]
    zt = z.gather(1, t[:, None])
    ids = torch.arange(z.shape[1], device=z.device)
    rank = ((z > zt) | ((z == zt) & (ids < t[:, None]))).sum(-1)
    return (zt[:, 0] - lse, lse, -(lp.exp() * lp).sum(-1), rank == 0,
            (z.amax(-1) - lse).exp(), rank)


def torch_kl(torch, s, q):
    F = torch.nn.functional
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(q, -1), log_target=True,
                    reduction="batchmean")


def jax_head(jax, h, w, t):
    z = jax.numpy.matmul(h, w.T, precision="highest",  # no TF32: the others use none
                         preferred_element_type=jax.numpy.float32)
    return xp_ce(jax.numpy, z, t).mean()



# Decoding (temperature, top-k, top-p: spec.DECODING) the HF transformers way: top-k
# by torch.topk's k-th value, top-p by a full sort, softmax and cumsum (a token stays
# while the mass before it is < top_p), torch.multinomial; the raw logits' top-n
# log-probabilities by log_softmax and topk. One step more than HF: the tokens tied
# with the last one top-p keeps stay too (lmxent's rule, docs/decoding.md; HF keeps
# some of a tie group by sort position), so that 16-bit logits, full of ties, compare.

def xp_process(xp, x, temperature, top_k, top_p):
    """The same pipeline in NumPy/CuPy: top-k by a partition, top-p by a full sort."""
    z = compute(xp, x) / temperature
    V = z.shape[-1]
    z = xp.where(z < xp.partition(z, V - top_k, axis=-1)[:, V - top_k:V - top_k + 1], -xp.inf, z)
    sz = -xp.sort(-z, axis=-1)
    e = xp.exp(sz - sz[:, :1])
    p = e / e.sum(axis=-1, keepdims=True)
    last = xp.where(xp.cumsum(p, axis=-1) - p >= top_p, xp.inf, sz).min(axis=-1, keepdims=True)
    return xp.where(z < last, -xp.inf, z)


def xp_sample(xp, x, n, **opts):
    """An inverse-CDF draw from xp_process's distribution, then the raw top-n
    log-probabilities (see torch_sample_hf)."""
    z = xp_process(xp, x, **opts)
    w = xp.cumsum(xp.exp(z - z.max(axis=-1, keepdims=True)), axis=-1)
    u = xp.random.random((len(z), 1)) * w[:, -1:]
    tok = xp.minimum((w <= u).sum(axis=-1), z.shape[-1] - 1)
    lp = compute(xp, x) - xp_lse(xp, x)[:, None]
    lp[xp.arange(len(tok)), tok]  # the token's log-probability, as a server returns it
    V = lp.shape[-1]
    return -xp.sort(-xp.partition(lp, V - n, axis=-1)[:, V - n:], axis=-1)


def torch_process_hf(torch, x, temperature, top_k, top_p):
    z = x.float() / temperature
    z = z.masked_fill(z < torch.topk(z, top_k, -1).values[:, -1:], -float("inf"))
    sz, _ = torch.sort(z, descending=True)
    p = torch.softmax(sz, -1)
    last = sz.masked_fill(p.cumsum(-1) - p >= top_p, float("inf")).min(-1, keepdim=True).values
    return z.masked_fill(z < last, -float("inf"))


def torch_sample_hf(torch, x, n, **opts):
    """The top-n log-probabilities of the raw logits, after drawing a token (not
    returned: torch's generator is not lmxent's, so the draws are not compared)."""
    z = torch_process_hf(torch, x, **opts)
    tok = torch.multinomial(torch.softmax(z, -1), 1)
    lp = torch.log_softmax(x.float(), -1)
    lp.gather(-1, tok)  # the token's log-probability, as a server returns it
    return lp.topk(n, -1).values
