"""The GPU benchmark (issue 14, part C): lmxent's CUDA kernels against torch eager,
torch.compile, Liger-Kernel, Cut Cross-Entropy and quack, in one process, on the
same device memory (CuPy arrays seen by torch through DLPack: no copies).

Cases, for each dtype (bfloat16, float32) and V in 32000, 128256, 262144 at 16384
tokens: fused cross-entropy forward + backward, forward only (mean loss),
log_softmax, token_stats, kl_divergence with its gradient; and the LM head at
16384 x 4096 x 128256 bfloat16 (lx.linear_cross_entropy) against the three matrix
products alone, torch's naive head, torch's chunked F.linear_cross_entropy (when
this torch has it), Liger's fused linear cross-entropy and Cut Cross-Entropy.

- Correct first: every result (lmxent's and each peer's) is compared, before it
  is timed, with torch in float32 on the same inputs, row chunk by row chunk:
  error = max |got - ref| / max |ref| per output, tolerance 2e-4 for float32
  outputs and 2e-2 for 16-bit ones; ranks must match exactly. Out of tolerance:
  WRONG, not timed. An exception: "error" with the message; the case goes on.
- Timing: CUDA events on the legacy default stream (where CuPy's and torch's
  default streams both run), the median of --repeats calls after the checked
  call (the warm-up; torch.compile's compilation is timed separately).
- Bandwidth: bytes the op must move over the median time: one read of the
  logits (forward, token_stats), a read and a write (log_softmax, fused
  gradient), two reads and a write (KL with gradient); "of copy" is that over a
  device-to-device copy of the logits (one read, one write) timed in the same run.
- LM head: GFLOP/s of 6 N D V, and the memory each implementation allocates
  during the call above its inputs (outputs included): CuPy's memory pool for
  lmxent and the naive CuPy path (the pool is emptied first; its growth is the
  high-water mark), torch.cuda.max_memory_allocated for torch and its peers.
- Order: every eager case first, then the LM head, then torch.compile (whose
  compilations take seconds each) until --budget seconds are spent; what does not
  fit is listed as skipped ("time budget"). The JSON is rewritten after every
  case, so an interrupted run keeps what it measured.

    python bench/bench_gpu.py --out results/            # the whole benchmark (~3 min on an H200)
    python bench/bench_gpu.py --quick --out /tmp/q      # small shapes, bfloat16, a smoke test
    python bench/bench_gpu.py --dry-run                 # the plan and the peers; no GPU needed

Writes bench_gpu.json (every row, the machine, the versions) and bench_gpu.png
(GB/s against V, a panel per op; the LM head's times and memory) into --out.
"""
import argparse
import importlib.util
import math
import os
import sys
import time
import traceback

import numpy as np

import lmxent as lx
from lmxent.bench import (
    GPU_MODULES,
    Skip,
    choices,
    event_times,
    import_peer,
    machine_info,
    positive_int,
    sizes,
    torch_kl,
    torch_token_stats,
    torch_view,
    write_json,
)

TOKENS = 16384
VOCABS = (32000, 128256, 262144)
HEAD = (16384, 4096, 128256)         # tokens, hidden, vocabulary
QUICK = dict(tokens=4096, vocab=(32000, 128256), head=(4096, 1024, 32000),
             dtypes=("bfloat16",), repeats=3)
DTYPES = ("bfloat16", "float32")
OPS = ("ce_fwd_bwd", "ce_forward", "log_softmax", "token_stats", "kl_divergence", "lm_head")
PEERS = ("torch", "torch.compile", "liger", "cce", "quack", "torch.linear_cross_entropy")
REF_ROWS = 1024                      # rows per chunk of the float32 reference
SUMMARY_MARK = "==== bench_gpu summary ===="


def _seed(parts):
    """An integer seed from a list of integers (every point draws its own data)."""
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


# ------------------------------------------------------------------ arguments

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="bench_gpu.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results"), metavar="DIR",
                    help="where bench_gpu.json and bench_gpu.png go (default bench/results)")
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK['tokens']} tokens, V in {QUICK['vocab']}, LM head "
                         f"{'x'.join(map(str, QUICK['head']))}, bfloat16, 3 repeats")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan and which peers are installed; touch no GPU")
    ap.add_argument("--dtypes", type=choices(DTYPES, "dtype"), metavar="DT,...",
                    help="bfloat16, float32 (default both; --quick: bfloat16)")
    ap.add_argument("--vocab", type=sizes("V[,V...]", "vocabulary sizes"), metavar="V,...",
                    help=f"vocabulary sizes (default {','.join(map(str, VOCABS))})")
    ap.add_argument("--tokens", type=positive_int, help=f"rows (default {TOKENS})")
    ap.add_argument("--head", type=sizes("NxDxV", "tokens x hidden x vocabulary"), metavar="NxDxV",
                    help=f"LM head size (default {'x'.join(map(str, HEAD))}, bfloat16)")
    ap.add_argument("--head-dtype", type=choices(DTYPES, "dtype"), default=["bfloat16"],
                    metavar="DT", help="the LM head's dtype (default bfloat16)")
    ap.add_argument("--ops", type=choices(OPS, "op"), metavar="OP,...",
                    help="cases to run: " + ", ".join(OPS) + " (default all)")
    ap.add_argument("--peers", type=choices(PEERS, "peer"), metavar="PEER,...",
                    help="peers to try: " + ", ".join(PEERS) + " (default all)")
    ap.add_argument("--repeats", type=positive_int, help="timed calls per case (default 5)")
    ap.add_argument("--budget", type=float, default=200.0, metavar="SECONDS",
                    help="stop starting cases after this long (default 200)")
    args = ap.parse_args(argv)
    if not args.budget > 0:
        ap.error(f"--budget: expected a positive number of seconds, got {args.budget}")
    q = args.quick
    args.dtypes = args.dtypes or (QUICK["dtypes"] if q else DTYPES)
    args.vocab = args.vocab or (QUICK["vocab"] if q else VOCABS)
    args.tokens = args.tokens or (QUICK["tokens"] if q else TOKENS)
    args.head = args.head or (QUICK["head"] if q else HEAD)
    args.ops = args.ops or OPS
    args.peers = args.peers or PEERS
    args.repeats = args.repeats or (QUICK["repeats"] if q else 5)
    return args


# ---------------------------------------------------------------------- peers

def load_peers(names, torch):
    """({name: handle}, {name: why skipped}) for the requested peers."""
    peers, skipped = {}, {}
    for name in names:
        try:
            if torch is None:
                raise Skip("needs torch with CUDA")
            if name == "torch":
                peers[name] = torch
            elif name == "torch.compile":
                if importlib.util.find_spec("triton") is None:
                    raise Skip("triton is not installed")
                peers[name] = torch
            elif name == "torch.linear_cross_entropy":
                if not hasattr(torch.nn.functional, "linear_cross_entropy"):
                    raise Skip(f"torch {torch.__version__} has no F.linear_cross_entropy")
                peers[name] = torch
            else:  # liger, cce, quack
                peers[name] = import_peer(*GPU_MODULES[name])
        except Skip as e:
            skipped[name] = str(e)
    return peers, skipped


def installed(name):
    """Dry run: whether a module can be found, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------- the run

class Bench:
    def __init__(self, args, cp, torch):
        self.args, self.cp, self.torch = args, cp, torch
        self.F = torch.nn.functional
        self.rows, self.start = [], time.monotonic()
        self.bf16 = lx.bfloat16_dtype()
        self.pool = cp.get_default_memory_pool()
        self.null = cp.cuda.Stream.null

    # ---- plumbing
    def left(self):
        return self.args.budget - (time.monotonic() - self.start)

    def dtype(self, name):
        if name == "bfloat16":
            if self.bf16 is None:
                raise Skip("ml_dtypes is not installed")
            return self.bf16
        return np.dtype(name)

    def tensor(self, a):
        """A torch view of a CuPy array (no copy), detached: its own leaf."""
        return torch_view(self.torch, a).detach()

    def free(self):
        self.cp.cuda.Device().synchronize()
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()
        self.pool.free_all_blocks()

    def timed(self, fn):
        """(median, min) seconds of args.repeats calls, CUDA events on stream 0."""
        self.torch.cuda.synchronize()
        return event_times(self.cp, fn, self.args.repeats, self.null)

    def normal(self, shape, dtype, scale, seed):
        """Random data made on the device, float32 cast to dtype, 2^26 elements at a
        time (small temporaries, and no generator call above 2^31 elements)."""
        cp = self.cp
        rng = cp.random.default_rng(_seed(seed))
        x = cp.empty(shape, dtype)
        step = max(1, (1 << 26) // shape[1])
        for s in range(0, shape[0], step):
            part = rng.standard_normal((min(step, shape[0] - s), shape[1]), dtype=cp.float32)
            part *= scale
            x[s:s + step] = part if dtype == np.float32 else part.astype(dtype)
        return x

    # ---- correctness against torch float32, chunk by chunk
    def errors(self, outputs, reference, n):
        """{output: rel error} of outputs (torch tensors or None; whole-tensor ones
        have 0 or 1 dims of size != n) against reference(rows slice) -> the float32
        reference outputs of those rows (whole ones: their sum over the rows)."""
        torch = self.torch
        k = len(outputs)
        diff, peak, ranks_bad, whole = [0.0] * k, [0.0] * k, [0] * k, [None] * k
        for s in range(0, n, REF_ROWS):
            sl = slice(s, min(s + REF_ROWS, n))
            want = reference(sl)
            for i, (got, w) in enumerate(zip(outputs, want)):
                if got is None or w is None:
                    continue
                if got.dim() == 0 or got.shape[0] != n:  # summed over rows
                    whole[i] = w.double() if whole[i] is None else whole[i] + w.double()
                    continue
                g = got[sl]
                if not g.is_floating_point():
                    ranks_bad[i] += int((g.long() != w.long()).sum())
                    continue
                g = g.float()
                if not bool(torch.isfinite(g).all()):
                    diff[i] = math.inf
                diff[i] = max(diff[i], float((g - w.float()).abs().max()))
                peak[i] = max(peak[i], float(w.float().abs().max()))
        out = {}
        for i, got in enumerate(outputs):
            if got is None:
                continue
            if whole[i] is not None:
                g = got.double()
                d = float((g - whole[i]).abs().max())
                out[i] = d / max(float(whole[i].abs().max()), 1e-30) if math.isfinite(d) \
                    else math.inf
            elif not got.is_floating_point():
                out[i] = 0.0 if ranks_bad[i] == 0 else math.inf
            else:
                out[i] = diff[i] / max(peak[i], 1e-30)
        return out

    def check(self, row, outputs, reference, n, names):
        torch = self.torch
        outputs = [self.as_torch(o) for o in outputs]
        errs = self.errors(outputs, reference, n)
        worst = 0.0
        row["max_error"] = {}
        for i, e in errs.items():
            o = outputs[i]
            tol = 2e-2 if o.dtype in (torch.bfloat16, torch.float16) else 2e-4
            row["max_error"][names[i]] = e
            worst = max(worst, e / tol if e > 0 else 0.0)
        row["error_over_tolerance"] = worst
        return worst <= 1.0

    def as_torch(self, a):
        if a is None:
            return a
        if type(a).__module__.split(".")[0] == "torch":
            return a.detach()
        if a.dtype == np.bool_:  # DLPack bool export is recent: go through uint8
            a = a.astype(np.uint8)
        return self.tensor(a)

    # ---- one implementation of one case
    def run_impl(self, base, impl, make, reference, n, names, moved=0, flops=0, memory=None):
        """make() -> call; call() -> the outputs in `names` order. Checked against
        reference (None: not checked), then timed; the row is recorded whatever
        happens. memory: "cupy" or "torch", whose allocations the first call counts."""
        row = dict(base, impl=impl)
        self.rows.append(row)
        if self.left() <= 0:
            row.update(status="skipped", detail="time budget")
            return row
        t0 = time.monotonic()
        try:
            call = make()
            if memory == "torch":
                self.torch.cuda.synchronize()
                self.torch.cuda.reset_peak_memory_stats()
                before = self.torch.cuda.memory_allocated()
            elif memory == "cupy":
                self.cp.cuda.Device().synchronize()
                self.pool.free_all_blocks()
                before = self.pool.total_bytes()
            out = call()
            self.cp.cuda.Device().synchronize()
            self.torch.cuda.synchronize()
            if memory == "torch":
                row["extra_bytes"] = self.torch.cuda.max_memory_allocated() - before
            elif memory == "cupy":
                row["extra_bytes"] = self.pool.total_bytes() - before
            row["first_call_s"] = time.monotonic() - t0
            if reference is not None and len(out) != len(names):
                raise ValueError(f"{len(out)} outputs, expected {len(names)} ({names})")
            ok = reference is None or self.check(row, out, reference, n, names)
            if reference is None:
                row["unchecked"] = "not the op's result (a floor to compare with)"
            del out
            if not ok:
                row.update(status="WRONG")
                return row
            row["seconds"], row["min_seconds"] = self.timed(call)
        except Skip as e:
            row.update(status="skipped", detail=str(e))
            return row
        except Exception as e:  # a failing implementation is a result, not a crash
            row.update(status="error", detail=f"{type(e).__name__}: {str(e)[:300]}",
                       traceback=traceback.format_exc(limit=4)[-1500:])
            self.free()
            return row
        row["status"] = "ok"
        if moved:
            row["gbs"] = moved / row["seconds"] / 1e9
            if base.get("copy_gbs"):
                row["copy_fraction"] = row["gbs"] / base["copy_gbs"]
        if flops:
            row["tflops"] = flops / row["seconds"] / 1e12
        return row

    # ---- the logits cases
    def logits_point(self, dtname, V, compiled, ops):
        """The logits ops `ops` at (tokens, V, dtype): eager peers, or (compiled)
        torch.compile only."""
        cp, args = self.cp, self.args
        N, dt = args.tokens, self.dtype(dtname)
        if compiled and "torch.compile" not in self.peers:
            return
        x = self.normal((N, V), dt, 2.0, [N, V, 0])
        t = cp.random.default_rng(_seed([N, V, 1])).integers(0, V, N, dtype=cp.int64)
        q = self.normal((N, V), dt, 2.0, [N, V, 2]) if "kl_divergence" in ops else None
        xt, tt = self.tensor(x), self.tensor(t)
        qt = self.tensor(q) if q is not None else None
        base = dict(tokens=N, V=V, dtype=dtname)
        if not compiled:
            # the same bytes as unsigned integers: a plain copy whatever CuPy does for bf16
            src = x.view({2: np.uint16, 4: np.uint32}[x.itemsize])
            dst = cp.empty_like(src)
            cp.copyto(dst, src)
            copy_s, _ = self.timed(lambda: cp.copyto(dst, src))
            del dst, src
            base["copy_gbs"] = 2 * x.nbytes / copy_s / 1e9
            self.rows.append(dict(base, op="copy", impl="cupy.copyto", status="ok",
                                  seconds=copy_s, gbs=base["copy_gbs"]))
        else:
            base["copy_gbs"] = next((r["copy_gbs"] for r in self.rows if r["op"] == "copy"
                                     and r["V"] == V and r["dtype"] == dtname), None)
        nb = x.nbytes
        for op in ops:
            self.one_op(op, dict(base, op=op), x, t, q, xt, tt, qt, nb, compiled)
            self.save()
        del x, t, q, xt, tt, qt
        self.free()

    def one_op(self, op, base, x, t, q, xt, tt, qt, nb, compiled):
        torch, F, N, peers = self.torch, self.F, self.args.tokens, self.peers
        f32 = lambda sl: xt[sl].float()  # noqa: E731

        def grad_of(body, *inputs):
            """A torch implementation returning (loss, d input 0) from one backward;
            input 0 is a private copy (some peers write over it)."""
            def make():
                args = [inputs[0].detach().clone().requires_grad_(True)] + list(inputs[1:])

                def call():
                    args[0].grad = None
                    loss = body(*args)
                    loss.backward()
                    return loss, args[0].grad
                return call
            return make

        def plain(body, *inputs, private=False):
            def make():
                args = [inputs[0].clone() if private else inputs[0]] + list(inputs[1:])
                return lambda: body(*args)
            return make

        def lmx_inplace(fn):
            """lmxent with inplace=True on a copy of the logits: the checked call
            turns it into the gradient, the timed ones run on their own output."""
            def make():
                buf = x.copy()
                return lambda: fn(buf)
            return make

        impls, torch_impl = {}, None  # torch_impl: (wrapper, body, inputs) for torch(.compile)
        if op == "ce_fwd_bwd":
            names, moved = ("loss", "grad"), 2 * nb

            def reference(sl):
                z = f32(sl)
                g = torch.softmax(z, -1)
                g[torch.arange(g.shape[0], device=g.device), tt[sl]] -= 1.0
                return F.cross_entropy(z, tt[sl], reduction="sum") / N, g / N
            impls["lmxent"] = lambda: lambda: lx.cross_entropy_with_grad(x, t)
            impls["lmxent inplace"] = lmx_inplace(
                lambda buf: lx.cross_entropy_with_grad(buf, t, inplace=True))

            def deferred():  # no host round trip for the class-id check
                previous = lx.set_cuda_validation("deferred")
                try:
                    return lx.cross_entropy_with_grad(x, t)
                finally:
                    lx.set_cuda_validation(previous)
            if hasattr(lx, "set_cuda_validation"):
                impls["lmxent deferred"] = lambda: deferred
            torch_impl = (grad_of, lambda a, b: F.cross_entropy(a, b), (xt, tt))
            if "liger" in peers:
                liger = peers["liger"].LigerCrossEntropyLoss()
                impls["liger"] = grad_of(lambda a, b: liger(a, b), xt, tt)
            if "quack" in peers:
                qk = peers["quack"]
                impls["quack"] = grad_of(lambda a, b: qk.cross_entropy(a, b, reduction="mean"),
                                         xt, tt)
        elif op == "ce_forward":
            names, moved = ("loss",), nb

            def reference(sl):
                return (F.cross_entropy(f32(sl), tt[sl], reduction="sum") / N,)
            impls["lmxent"] = lambda: lambda: (lx.cross_entropy(x, t),)
            torch_impl = (plain, lambda a, b: (F.cross_entropy(a, b),), (xt, tt))
            if "liger" in peers:
                liger = peers["liger"].LigerCrossEntropyLoss()
                impls["liger"] = plain(lambda a, b: (liger(a, b),), xt, tt, private=True)
        elif op == "log_softmax":
            names, moved = ("log_softmax",), 2 * nb

            def reference(sl):
                return (torch.log_softmax(f32(sl), -1),)
            impls["lmxent"] = lambda: lambda: (lx.log_softmax(x),)
            torch_impl = (plain, lambda a: (torch.log_softmax(a, -1),), (xt,))
        elif op == "token_stats":
            names = ("logprob", "lse", "entropy", "correct", "top_prob", "rank")
            moved = nb

            def reference(sl):
                return torch_token_stats(torch, f32(sl), tt[sl])
            impls["lmxent"] = lambda: lambda: tuple(lx.token_stats(x, t))
            torch_impl = (plain, lambda a, b: torch_token_stats(torch, a, b), (xt, tt))
        else:  # kl_divergence, forward direction: KL(teacher || student), batchmean
            names, moved = ("loss", "grad"), 3 * nb

            def reference(sl):
                s, r = torch.log_softmax(f32(sl), -1), torch.log_softmax(qt[sl].float(), -1)
                return (r.exp() * (r - s)).sum() / N, (s.exp() - r.exp()) / N
            impls["lmxent"] = lambda: lambda: lx.kl_divergence(x, q, return_grad=True)
            impls["lmxent inplace"] = lmx_inplace(
                lambda buf: lx.kl_divergence(buf, q, return_grad=True, inplace=True))
            torch_impl = (grad_of, lambda a, b: torch_kl(torch, a, b), (xt, qt))
            if "liger" in peers:
                kl = peers["liger"].LigerKLDIVLoss(reduction="batchmean", log_target=True)
                impls["liger"] = grad_of(
                    lambda a, b: kl(a.log_softmax(-1), b.log_softmax(-1)), xt, qt)
        wrapper, body, inputs = torch_impl
        if compiled:  # compiled per shape (dynamic=False): torch.compile's best case
            impls = {"torch.compile": wrapper(torch.compile(body, dynamic=False), *inputs)}
        else:  # table order: lmxent's rows, torch, the other peers
            ordered = {k: v for k, v in impls.items() if k.startswith("lmxent")}
            if "torch" in peers:
                ordered["torch"] = wrapper(body, *inputs)
            ordered.update((k, v) for k, v in impls.items() if k not in ordered)
            impls = ordered
        for name, make in impls.items():
            row = self.run_impl(base, name, make, reference, N, names, moved=moved)
            if name == "torch.compile" and "first_call_s" in row:
                row["compile_and_first_call_s"] = row.pop("first_call_s")
            self.report(row)
            self.free()  # the next one gets the memory (CuPy's pool and torch's cache)

    # ---- the LM head
    def lm_head(self):
        self.lm_head_cases()
        self.free()  # its inputs and reference are gone: their memory goes back

    def lm_head_cases(self):
        cp, torch, F = self.cp, self.torch, self.F
        N, D, V = self.args.head
        dtname = self.args.head_dtype[0]
        dt = self.dtype(dtname)
        h = self.normal((N, D), dt, 1.0, [N, D, V, 3])
        w = self.normal((V, D), dt, 2.0 / math.sqrt(D), [N, D, V, 4])
        t = cp.random.default_rng(_seed([N, D, V, 1])).integers(0, V, N, dtype=cp.int64)
        ht, wt, tt = self.tensor(h), self.tensor(w), self.tensor(t)
        w32 = wt.float()
        flops = 6 * N * D * V
        base = dict(op="lm_head", tokens=N, hidden=D, V=V, dtype=dtname,
                    input_bytes=h.nbytes + w.nbytes + t.nbytes)
        names = ("loss", "d_hidden", "d_weight")

        cache = {}

        def reference(sl):
            """Computed once for all implementations (seconds in float32); the summed
            outputs (loss, d_weight) are given whole with the first chunk."""
            if not cache:
                cache.update(head_reference())
            first = sl.start == 0
            return (cache["loss"] if first else None, cache["d_hidden"][sl],
                    cache["d_weight"] if first else None)

        def head_reference():
            loss = torch.zeros((), dtype=torch.float64, device=ht.device)
            dh = torch.empty((N, D), dtype=torch.float32, device=ht.device)
            dw = torch.zeros((V, D), dtype=torch.float32, device=ht.device)
            for s in range(0, N, REF_ROWS):
                sl = slice(s, min(s + REF_ROWS, N))
                h32 = ht[sl].float()
                z = h32 @ w32.T
                g = torch.softmax(z, -1)
                g[torch.arange(g.shape[0], device=g.device), tt[sl]] -= 1.0
                g /= N
                loss += F.cross_entropy(z, tt[sl], reduction="sum").double() / N
                dh[sl] = g @ w32
                dw += g.T @ h32
            return dict(loss=loss, d_hidden=dh, d_weight=dw)

        def lmx():
            def call():
                loss, (dh, dw, _) = lx.linear_cross_entropy(h, w, t)
                return loss, dh, dw
            return call

        def gemms_torch():  # the three products in the input dtype (tensor cores)
            def call():
                z = ht @ wt.T
                return None, z @ wt, z.T @ ht
            return call

        def naive_cupy():  # lmxent's math with the logits materialised, in its compute dtype
            ct = cp.float64 if dt == np.float64 else cp.float32

            def call():
                h32, w32c = h.astype(ct), w.astype(ct)
                z = h32 @ w32c.T
                loss, g = lx.cross_entropy_with_grad(z, t, inplace=True)
                return loss, (g @ w32c).astype(dt), (g.T @ h32).astype(dt)
            return call

        def gemms_cupy():  # the floor of the above: its three products alone
            ct = cp.float64 if dt == np.float64 else cp.float32
            h32, w32c = h.astype(ct), w.astype(ct)

            def call():
                z = h32 @ w32c.T
                return None, z @ w32c, z.T @ h32
            return call

        def grads(body):
            def make():
                hh = ht.detach().clone().requires_grad_(True)
                ww = wt.detach().clone().requires_grad_(True)

                def call():
                    hh.grad = ww.grad = None
                    loss = body(hh, ww, tt)
                    loss.backward()
                    return loss, hh.grad, ww.grad
                return call
            return make

        impls = [("lmxent", lmx, "cupy"), ("naive cupy (float32 logits)", naive_cupy, "cupy")]
        if "torch" in self.peers:
            impls += [("3 GEMMs torch", gemms_torch, "torch"),
                      ("torch naive", grads(lambda a, b, c: F.cross_entropy(F.linear(a, b), c)),
                       "torch")]
        if "torch.linear_cross_entropy" in self.peers:
            opts = getattr(torch.nn, "LinearCrossEntropyOptions", None)
            impls.append(("torch F.linear_cross_entropy chunked", grads(
                lambda a, b, c: F.linear_cross_entropy(
                    a, b, c, **({"options": opts()} if opts else {}))), "torch"))
        if "liger" in self.peers:
            flce = self.peers["liger"].LigerFusedLinearCrossEntropyLoss()
            impls.append(("liger", grads(lambda a, b, c: flce(b, a, c)), "torch"))
        if "cce" in self.peers:
            cce = self.peers["cce"]
            impls.append(("cce", grads(lambda a, b, c: cce.linear_cross_entropy(a, b, c)),
                          "torch"))
        impls.append(("3 GEMMs cupy float32", gemms_cupy, None))
        for name, make, memory in impls:
            row = self.run_impl(base, name, make, None if "GEMMs" in name else reference, N,
                                names, flops=flops, memory=memory)
            self.report(row)
            self.save()
            self.free()

    # ---- output
    def report(self, r):
        tag = f"{r['op']:<14}{r.get('dtype', ''):<9}{r['V']:>7}  {r['impl']:<36}"
        if r["status"] != "ok":
            extra = (f"max error {r.get('max_error')}" if r["status"] == "WRONG"
                     else r.get("detail", ""))
            print(f"  {tag}{r['status'].upper()}: {extra}", flush=True)
            return
        rate = (f"{r['gbs']:7.0f} GB/s" + (f" {100 * r['copy_fraction']:4.0f}% of copy"
                                           if "copy_fraction" in r else "")
                if "gbs" in r else f"{r.get('tflops', 0):7.1f} TFLOP/s")
        mem = f"  +{r['extra_bytes'] / 2**30:.2f} GiB" if "extra_bytes" in r else ""
        print(f"  {tag}{r['seconds'] * 1e3:9.3f} ms  {rate}{mem}", flush=True)

    def speedups(self):
        for r in self.rows:
            if r["impl"].startswith("lmxent") or r.get("status") != "ok" or r["op"] == "copy":
                continue
            base = next((b for b in self.rows if b["op"] == r["op"] and b["V"] == r["V"]
                         and b.get("dtype") == r.get("dtype") and b["impl"] == "lmxent"
                         and b.get("status") == "ok"), None)
            if base:
                r["lmxent_speedup"] = r["seconds"] / base["seconds"]

    def save(self):
        self.speedups()
        self.report_obj["rows"] = self.rows
        self.report_obj["elapsed_s"] = time.monotonic() - self.start
        write_json(self.report_obj, self.args.out, "bench_gpu.json")

    def summary(self):
        """One line per op and point: lmxent's time, GB/s (or TFLOP/s) and share of
        the copy, then each peer's time over lmxent's ("x1.30": lmxent 1.3x faster);
        then every row that did not run cleanly."""
        print(f"\n{SUMMARY_MARK}\n{self.report_obj['gpu']}; ms = median; "
              "peer: its time / lmxent's (x1.30 = lmxent 1.3x faster)")
        points = list(dict.fromkeys((r["op"], r.get("dtype"), r["V"]) for r in self.rows
                                    if r.get("impl") != "-"))
        for op, dt, V in points:
            rows = [r for r in self.rows if (r["op"], r.get("dtype"), r["V"]) == (op, dt, V)]
            if op == "copy":
                print(f"{'copy':<14}{dt:>9} V={V:<7} {rows[0]['gbs']:6.0f} GB/s")
                continue
            parts = []
            for r in rows:
                if r["status"] != "ok":
                    continue
                mem = f" +{r['extra_bytes'] / 2**30:.1f}GiB" if "extra_bytes" in r else ""
                if "lmxent_speedup" in r:
                    parts.append(f"{r['impl']} x{r['lmxent_speedup']:.2f}{mem}")
                    continue
                rate = (f"{r['gbs']:.0f} GB/s" + (f" {100 * r['copy_fraction']:.0f}%"
                                                  if "copy_fraction" in r else "")
                        if "gbs" in r else f"{r.get('tflops', 0):.0f} TFLOP/s")
                parts.append(f"{r['impl']} {r['seconds'] * 1e3:.2f}ms {rate}{mem}")
            print(f"{op:<14}{dt or '':>9} V={V:<7} " + " | ".join(parts))
        for r in self.rows:
            if r["status"] != "ok":
                why = r.get("detail") or f"max error {r.get('max_error')}"
                print(f"  {r['status']}: {r['op']} {r.get('dtype', '')} V={r['V']} "
                      f"{r['impl']}: {str(why)[:150]}")


# ------------------------------------------------------------------- plot

def plot(report, path):
    """GB/s against V, a panel per logits op (a line per implementation and dtype,
    the copy dashed), and the LM head's times. False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    rows = [r for r in report["rows"] if r.get("status") == "ok"]
    ops = [op for op in OPS[:-1] if any(r["op"] == op for r in rows)]
    head = [r for r in rows if r["op"] == "lm_head"]
    panels = len(ops) + (1 if head else 0)
    if not panels:
        return False
    cols = min(3, panels)
    nrows = -(-panels // cols)
    fig = Figure(figsize=(5.4 * cols, 4.0 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}
    styles = {"bfloat16": "-", "float32": "--"}
    for ax, op in zip(axes, ops):
        for dt, style in styles.items():
            for impl in [i for i in impls if i != "cupy.copyto"] + ["cupy.copyto"]:
                src = "copy" if impl == "cupy.copyto" else op
                xy = sorted((r["V"], r["gbs"]) for r in rows
                            if r["op"] == src and r["impl"] == impl and r["dtype"] == dt)
                if xy:
                    ax.plot(*zip(*xy), style, marker="o", ms=3,
                            color="gray" if src == "copy" else colors[impl],
                            label=f"{'copy' if src == 'copy' else impl} {dt}")
        ax.set(xscale="log", title=op, xlabel="vocabulary size V", ylabel="GB/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    if head:
        ax = axes[len(ops)]
        ax.barh([r["impl"] for r in head], [r["seconds"] * 1e3 for r in head],
                color=[colors[r["impl"]] for r in head])
        r0 = head[0]
        ax.set(title=f"LM head {r0['tokens']}x{r0['hidden']}x{r0['V']} {r0['dtype']}",
               xlabel="ms (lower is better)")
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.suptitle(f"lmxent {report['versions'].get('lmxent')} on {report['gpu']}", fontsize=10)
    fig.savefig(path, dpi=110)
    return True


# ------------------------------------------------------------------- main

def plan(args):
    lines = [f"logits cases: {args.tokens} tokens x V in {list(args.vocab)}, "
             f"dtypes {list(args.dtypes)}, ops "
             f"{[op for op in args.ops if op != 'lm_head']}"]
    if "lm_head" in args.ops:
        lines.append("LM head: {}x{}x{} {}".format(*args.head, args.head_dtype[0]))
    lines.append(f"repeats {args.repeats}, budget {args.budget:.0f} s, out {args.out}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    print(f"bench_gpu: lmxent {lx.__version__}")
    for line in plan(args):
        print("  " + line)
    if args.dry_run:
        mods = {"torch": "torch", "torch.compile": "triton", "liger": "liger_kernel",
                "cce": "cut_cross_entropy", "quack": "quack",
                "torch.linear_cross_entropy": "torch", "cupy": "cupy",
                "matplotlib": "matplotlib"}
        for name in list(args.peers) + ["cupy", "matplotlib"]:
            print(f"  {name}: {'installed' if installed(mods[name]) else 'not installed'}")
        print("dry run: no GPU touched")
        return 0
    modules = gpu_modules()
    return 2 if modules is None else run(args, *modules)


def gpu_modules():
    """(cupy, torch) when both run on a GPU and lmxent runs on CuPy arrays; else
    None, after saying why."""
    try:
        import cupy as cp
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no GPU")
        cp.zeros(1).sum()
    except Exception as e:
        print(f"bench_gpu: needs CuPy and a GPU: {type(e).__name__}: {e}")
        return None
    try:
        lx.logsumexp(cp.zeros((1, 2), cp.float32))
    except TypeError as e:
        print(f"bench_gpu: this lmxent cannot run on CuPy arrays: {e}")
        return None
    try:
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA")
    except Exception as e:  # the correctness reference needs torch
        print(f"bench_gpu: needs torch with CUDA (the reference): {type(e).__name__}: {e}")
        return None
    return cp, torch


def run(args, cp, torch):
    """Every case, in budget order; returns 1 if an lmxent result is wrong or fails."""
    if hasattr(torch, "_dynamo"):
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
    b = Bench(args, cp, torch)
    b.peers, skipped = load_peers(args.peers, torch)
    machine = machine_info()
    versions = dict(machine["versions"], cupy=cp.__version__, torch=torch.__version__,
                    cuda_runtime=cp.cuda.runtime.runtimeGetVersion(),
                    cuda_driver=cp.cuda.runtime.driverGetVersion())
    b.report_obj = dict(gpu=machine["gpu"], machine=machine, versions=versions,
                        args={k: v for k, v in vars(args).items()},
                        peers=dict({n: "ok" for n in b.peers},
                                   **{n: f"skipped: {why}" for n, why in skipped.items()}),
                        rows=[])
    print(f"GPU {machine['gpu']}; CuPy {cp.__version__}, torch {torch.__version__}, "
          f"CUDA runtime {versions['cuda_runtime']}, driver {versions['cuda_driver']}")
    print("peers: " + ", ".join(b.peers) + "".join(
        f"\n  skipped {n}: {why}" for n, why in skipped.items()))
    points = [(dt, V) for dt in args.dtypes for V in args.vocab]
    logits_ops = [op for op in OPS[:-1] if op in args.ops]
    try:
        if logits_ops:
            for dt, V in points:
                guarded(b, f"{dt} V={V}", b.logits_point, dt, V, False, logits_ops)
        if "lm_head" in args.ops:
            guarded(b, "lm_head", b.lm_head)
        if "torch.compile" in b.peers:  # the fused loss first: the target
            for op in logits_ops:
                for dt, V in points:
                    guarded(b, f"{op} {dt} V={V} torch.compile", b.logits_point, dt, V, True,
                            [op])
    finally:
        b.save()
        b.summary()
        png = os.path.join(args.out, "bench_gpu.png")
        try:
            print(f"wrote {os.path.join(args.out, 'bench_gpu.json')}"
                  + (f" and {png}" if plot(b.report_obj, png) else " (no matplotlib: no PNG)"))
        except Exception as e:  # a plot failure must not lose the JSON
            print(f"plot failed: {type(e).__name__}: {e}")
    wrong = [r for r in b.rows if r["impl"].startswith("lmxent") and r["status"] in
             ("WRONG", "error")]
    return 1 if wrong else 0


def guarded(b, label, fn, *args):
    """Run a block of cases, fn(*args); an exception outside the per-implementation guards
    (making the data, out of memory) is recorded and the run goes on."""
    if b.left() <= 0:
        b.rows.append(dict(op=label, V=0, impl="-", status="skipped", detail="time budget"))
        return
    try:
        fn(*args)
    except Skip as e:
        b.rows.append(dict(op=label, V=0, impl="-", status="skipped", detail=str(e)))
    except Exception as e:
        b.rows.append(dict(op=label, V=0, impl="-", status="error",
                           detail=f"{type(e).__name__}: {str(e)[:300]}"))
        print(f"  {label}: {type(e).__name__}: {e}", flush=True)
        b.free()
    b.save()


if __name__ == "__main__":
    sys.exit(main())
