"""The GPU decoding kernels' algorithm (cuda/decoding_block.h: one block per row, radix
selects over order-preserving keys, a block-wide inverse-CDF draw) run on the host over an
emulated thread block (tests/emu/), in place of the CPU kernel's decode and top_k: every
test of tests/test_decoding.py again (against the float64 reference), then what only a
block has: block sizes that do not divide the row, the order of the threads between
barriers, ties at a radix select's key. The emulator is built here with CMake (about 10 s,
kept in build/block-emu); cuda/decoding.cu's block primitives (shuffles, shared-memory
atomics) run only on a GPU (bench/gpu_check.sh)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import test_decoding as D
from test_decoding import *  # noqa: F401,F403 -- every test again, on the emulated block
from test_decoding import _semantic_tests_call_lmxent  # noqa: F401 -- autouse
from test_properties import (  # noqa: F401 -- the decoding properties again, on the block
    test_process_logits_and_sample_match_reference,
    test_top_k_matches_reference,
)

import lmxent as lx
from lmxent import _arrays as A
from lmxent import reference as R

from helpers import DTYPES, dtype_id

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build():
    """The emulator module, or (None, why not)."""
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            return None, f"{tool} not found"
    try:
        import pybind11
    except ImportError:
        return None, "pybind11 is not installed"
    build = os.path.join(ROOT, "build", "block-emu")
    if not os.path.exists(os.path.join(build, "build.ninja")):
        subprocess.run(["cmake", "-S", ROOT, "-B", build, "-G", "Ninja", "-DLMXENT_CUDA=OFF",
                        "-DLMXENT_BLOCK_EMULATOR=ON", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                        f"-DPython_EXECUTABLE={sys.executable}"], check=True, capture_output=True)
    done = subprocess.run(["ninja", "-C", build, "lmxent_block_emu"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, build)
    try:
        import lmxent_block_emu
    finally:
        sys.path.remove(build)
    return lmxent_block_emu, None


@pytest.fixture(scope="session")
def emu():
    module, why = _build()
    if module is None:
        pytest.skip(f"cannot build the block emulator: {why}")
    return module


class _OnTheBlock:
    """lmxent._cpu with decode and top_k from the emulated block."""

    def __init__(self, emu, cpu):
        self._emu, self._cpu = emu, cpu

    def __getattr__(self, name):
        return getattr(self._emu if name in ("decode", "top_k") else self._cpu, name)


@pytest.fixture(autouse=True)
def _decode_on_the_block(emu, monkeypatch):
    # 8 threads: each emulated thread is a fiber, and tests of many short rows (40 000
    # draws) pay per barrier and thread; test_block_sizes covers warps and 512
    emu.configure(8, 1)
    monkeypatch.setattr(A, "_cpu", _OnTheBlock(emu, A._cpu))


@pytest.fixture
def isa():
    """The emulated kernel has no instruction sets: each test runs once."""
    yield None


def rows_for_blocks(rng, dtype, V):
    """Rows that stress a block: ties at the k-th value and at top-p's crossing, a flat
    row, NaN and +inf, one survivor, huge values, -0 beside +0."""
    x = 2 * rng.standard_normal((8, V))
    x[1, : V // 3] = 1.5  # ties at the k-th largest
    x[2] = 0.0
    x[3, V // 2] = np.nan
    x[4] = -np.inf
    x[4, V - 1] = 0.25
    x[5] += 1e4  # large logits: log-probabilities relative to the max
    x[6, ::2] = -0.0
    x[6, 1::2] = 0.0
    x[7, ::7] = 4.0  # a tied block of maxima
    return x.astype(dtype)


BLOCK_OPTIONS = [dict(top_k=5), dict(top_k=9, top_p=0.7), dict(top_p=0.9, min_p=0.01),
                 dict(temperature=0.0), dict(temperature=0.7, repetition_penalty=1.3,
                                             frequency_penalty=0.2)]


@pytest.mark.parametrize("threads", [1, 7, 32, 64, 512])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_block_sizes(emu, threads, dtype, rng):
    """Any block size, the row not a multiple of it: the reference's answers."""
    V = 1000 if threads < 512 else 3001
    x = rows_for_blocks(rng, dtype, V)
    emu.configure(threads, 7)
    for o in BLOCK_OPTIONS:
        if "repetition_penalty" in o:
            o = dict(o, prev_tokens=rng.integers(-1, V, (x.shape[0], 9)))
        D.assert_processed(lx.process_logits(x, **o), x, dtype, **o)
        for n, of in ((4, "raw"), (3, "processed")):
            assert D.assert_samples(lx.sample(x, seed=9, num_logprobs=n, logprobs_of=of, **o), x,
                                    seed=9, num_logprobs=n, logprobs_of=of, **o) == 0
    for k in (1, 4, V // 3 + 2, V):
        v, i = lx.top_k(x, k)
        rv, ri = R.top_k(x.astype(np.float64), k)
        np.testing.assert_array_equal(i, ri)
        np.testing.assert_array_equal(v.astype(np.float64), rv)


def test_thread_order_between_barriers_does_not_matter(emu, rng):
    """The same bits whatever order the threads run in between barriers (atomics
    included): the result cannot depend on a race."""
    x = rows_for_blocks(rng, np.float32, 2000)
    o = dict(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2,
             prev_tokens=rng.integers(-1, 2000, (8, 30)))
    runs = []
    for seed in (1, 2, 3):
        emu.configure(64, seed)
        s = lx.sample(x, seed=4, num_logprobs=6, **o)
        runs.append((lx.process_logits(x, **o), *s, *lx.top_k(x, 50)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)


def test_ties_at_the_selected_key(emu):
    """Top-n and top-k where the n-th / k-th value is tied far past n: the lowest
    indices among the ties (the second radix select), as torch.topk and the CPU."""
    V = 4096
    x = np.zeros((3, V), np.float32)
    x[0, [5, 900, 3000]] = 1.0  # three above, then 4093 ties at 0
    x[1, ::3] = -1.0
    x[2] = -np.inf
    x[2, [7, 8]] = np.nan
    emu.configure(32, 5)
    for k in (1, 3, 4, 10, 2000):
        v, i = lx.top_k(x, k)
        rv, ri = R.top_k(x.astype(np.float64), k)
        np.testing.assert_array_equal(i, ri)
        np.testing.assert_array_equal(v.astype(np.float64), rv)
    for o in (dict(top_k=2), dict(top_k=10), dict(top_p=0.5)):
        assert D.assert_samples(lx.sample(x, seed=1, num_logprobs=12, **o), x, seed=1,
                                num_logprobs=12, **o) == 0
        D.assert_processed(lx.process_logits(x, **o), x, np.float32, **o)


def rows_for_narrowing(rng, dtype, V=20000):
    """Rows longer than the candidate list (8192 entries), where a select first narrows
    to the entries above a threshold read off a strided sample: the usual row, the mass
    in a few tokens the sample misses, most of the row masked (a threshold of -inf),
    ties across the threshold, a NaN, a flat row (too many candidates: the row's select)."""
    x = 2 * rng.standard_normal((6, V))
    x[1, 1::1024] = 25.0  # off the sampled entries (0, 19.5, 39.06, ...): top-p's mass
    x[2, :] = -np.inf
    x[2, rng.choice(V, 3000, replace=False)] = rng.standard_normal(3000)
    x[3] = np.round(x[3])  # a few values, each tied thousands of times
    x[4, 17] = np.nan
    x[5] = 0.5
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
def test_candidate_lists_of_long_rows(emu, dtype, rng):
    x = rows_for_narrowing(rng, dtype)
    emu.configure(32, 3)
    for o in (dict(top_k=5), dict(top_k=50, top_p=0.9), dict(top_k=1500), dict(top_k=3000),
              dict(top_p=0.8), dict(top_p=0.999, temperature=0.5), dict(min_p=0.1)):
        D.assert_processed(lx.process_logits(x, **o), x, dtype, **o)
        for n, of in ((5, "raw"), (40, "processed")):
            assert D.assert_samples(lx.sample(x, seed=2, num_logprobs=n, logprobs_of=of, **o), x,
                                    seed=2, num_logprobs=n, logprobs_of=of, **o) == 0
    for k in (1, 30, 1000, 2100, 5000):
        v, i = lx.top_k(x, k)
        rv, ri = R.top_k(x.astype(np.float64), k)
        np.testing.assert_array_equal(i, ri)
        np.testing.assert_array_equal(v.astype(np.float64), rv)


def test_candidate_lists_save_passes_over_the_row(emu, rng):
    """lx.top_k of a long row reads it about once, plus the sample (the select runs on
    the candidates); a flat row, whose candidates would not fit, is read eight times
    and more (a select over the row)."""
    V = 100_000
    x = rng.standard_normal((1, V)).astype(np.float32)
    emu.configure(32, 1)
    lx.top_k(x, 30)
    assert emu.reads() < 1.2 * V
    lx.top_k(np.zeros_like(x), 30)
    assert emu.reads() >= 8 * V
