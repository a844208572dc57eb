"""The prepared GPU check (bench/gpu_check.sh, bench/bench_gpu.py, bench/gpu_checks.py)
without a GPU: the shell script's dry run and argument errors, the Python scripts'
dry runs and argument errors, and bench_gpu.py's whole run (checks, timing, JSON,
PNG, summary) on a NumPy-backed stand-in for CuPy with CPU torch, at toy sizes.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import lmxent as lx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
BENCH = os.path.join(ROOT, "bench", "bench_gpu.py")
CHECKS = os.path.join(ROOT, "bench", "gpu_checks.py")


def _env():
    """This process's lmxent (PYTHONPATH) for the child processes."""
    env = dict(os.environ)
    pkg = os.path.dirname(os.path.dirname(lx.__file__))
    env["PYTHONPATH"] = os.pathsep.join([pkg] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHON"] = sys.executable
    return env


def _run(args, timeout=600):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_env(),
                          cwd="/")


needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


@needs_bash
def test_gpu_check_dry_run(tmp_path):
    """The whole dry run: every step named, each test selection non-empty, the bench
    plan, a summary, exit 0; its transcript is in OUTDIR/gpu_check.log."""
    out = tmp_path / "out"
    r = _run(["bash", SCRIPT, str(out), "--tier", "all", "--dry-run"])
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout
    for expected in ("== environment", "python ", "numpy ", "peer liger-kernel:",
                     "peer cut-cross-entropy:", "peer torch F.linear_cross_entropy:",
                     "CMAKE_CUDA_ARCHITECTURES=", "--no-build-isolation",
                     "== correctness tier", "device tests", "sanitizer subset (memcheck)",
                     "stream tests", "decoding device tests",
                     "gpu_checks: would run repeat, large, decoding", "== bench tier",
                     "LM head: 16384x4096x128256 bfloat16", "dry run: no GPU touched",
                     "==== summary", "RESULT: OK"):
        assert expected in text, expected
    assert "FAIL " not in text and "selection is empty" not in text
    counts = [int(line.split("selects ")[1].split()[0]) for line in text.splitlines()
              if line.startswith("DRY") and "selects" in line and "none is fine" not in line]
    assert len(counts) == 5 and min(counts) > 0, counts  # device, 2 sanitizer, streams, decoding
    assert (out / "gpu_check.log").read_text() == text
    assert not (out / "bench_gpu.json").exists()  # a dry run measures nothing


@needs_bash
def test_gpu_check_dry_run_tiers_and_wheels(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "liger_kernel-0.0.0-py3-none-any.whl").write_bytes(b"")
    r = _run(["bash", SCRIPT, str(tmp_path / "o"), "--tier=bench", "--dry-run",
              "--wheels", str(wheels), "--bench-quick"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "liger_kernel-0.0.0-py3-none-any.whl" in r.stdout
    assert "would install 1 wheel(s)" in r.stdout
    assert "== correctness tier" not in r.stdout and "== bench tier" in r.stdout
    assert "4096 tokens" in r.stdout  # --quick reached bench_gpu.py


@needs_bash
@pytest.mark.parametrize("args, message", [
    ([], "OUTDIR is missing"),
    (["o", "--tier", "fast"], "--tier must be correctness, bench or all, got 'fast'"),
    (["o", "--tier"], "--tier needs a value"),
    (["o", "--budget", "ten"], "--budget must be a whole number of seconds"),
    (["o", "--budget", "5"], "--budget must be a whole number of seconds >= 60"),
    (["o", "--wheels", "/nonexistent-wheels"], "--wheels: '/nonexistent-wheels' is not a"),
    (["o", "--frobnicate"], "unknown option --frobnicate"),
    (["o", "p"], "one OUTDIR only"),
])
def test_gpu_check_argument_errors(tmp_path, args, message):
    args = [str(tmp_path / a) if a in ("o", "p") else a for a in args]
    r = _run(["bash", SCRIPT] + args, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr and "usage: bash bench/gpu_check.sh OUTDIR" in r.stderr


@needs_bash
def test_gpu_check_help():
    r = _run(["bash", SCRIPT, "--help"], timeout=60)
    assert r.returncode == 0 and "--tier correctness" in r.stdout and "--dry-run" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--dtypes", "float16"], "argument --dtypes: unknown dtype 'float16'"),
    (["--vocab", "0"], "argument --vocab: expected V[,V...] positive integers"),
    (["--head", "16x4"], "argument --head: expected NxDxV"),
    (["--ops", "softmax"], "argument --ops: unknown op 'softmax'"),
    (["--peers", "jax"], "argument --peers: unknown peer 'jax'"),
    (["--budget", "0"], "--budget: expected a positive number of seconds"),
    (["--repeats", "0"], "argument --repeats: expected a positive integer"),
])
def test_bench_gpu_argument_errors(args, message):
    r = _run([sys.executable, BENCH, "--dry-run"] + args, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_bench_gpu_dry_run():
    r = _run([sys.executable, BENCH, "--dry-run", "--quick", "--ops", "ce_fwd_bwd,lm_head"],
             timeout=120)
    assert r.returncode == 0, r.stderr
    assert "4096 tokens x V in [32000, 128256]" in r.stdout
    assert "LM head: 4096x1024x32000 bfloat16" in r.stdout
    assert "liger: " in r.stdout and "dry run: no GPU touched" in r.stdout


def test_gpu_checks_dry_run_and_errors():
    r = _run([sys.executable, CHECKS, "--dry-run", "repeat", "large"], timeout=120)
    assert r.returncode == 0 and "would run repeat, large" in r.stdout, r.stderr
    r = _run([sys.executable, CHECKS, "fast"], timeout=120)
    assert r.returncode == 2 and "invalid choice: 'fast'" in r.stderr


def test_gpu_checks_decoding_on_a_cpu_stand_in(capsys):
    """gpu_checks.py decoding with NumPy for CuPy (lmxent then runs its CPU kernel on
    both sides): every check passes, the peers are timed or skipped with a reason."""
    spec = importlib.util.spec_from_file_location("gpu_checks", CHECKS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cp = types.SimpleNamespace(asarray=np.asarray, ascontiguousarray=np.ascontiguousarray,
                               uint8=np.uint8, uint16=np.uint16, uint32=np.uint32,
                               uint64=np.uint64, cuda=types.SimpleNamespace(
                                   runtime=types.SimpleNamespace(deviceSynchronize=lambda: None)))
    c = mod.Checks(cp)
    mod.decoding(cp, c, shape=(8, 3000), calls=1)
    out = capsys.readouterr().out
    assert c.count >= 4 and not c.failures, out
    assert "lmxent sample (5 raw logprobs)" in out and "torch sort pipeline" in out, out
    assert "skipped FlashInfer" in out or "FlashInfer top_k" in out, out


# ------------------------------------------- bench_gpu.py on a CPU stand-in

def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Event:
    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


def _fake_cupy():
    """The part of CuPy bench_gpu.py uses, over NumPy (lmxent then runs its CPU kernels)."""
    noop = lambda *a: None  # noqa: E731
    return types.SimpleNamespace(
        __version__="stand-in", float32=np.float32, float64=np.float64, int64=np.int64,
        uint8=np.uint8, random=types.SimpleNamespace(default_rng=np.random.default_rng),
        empty=np.empty, empty_like=np.empty_like, copyto=np.copyto,
        get_default_memory_pool=lambda: types.SimpleNamespace(free_all_blocks=noop,
                                                              total_bytes=lambda: 0),
        cuda=types.SimpleNamespace(
            Event=_Event, get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3,
            Stream=types.SimpleNamespace(null=None),
            Device=lambda: types.SimpleNamespace(synchronize=noop),
            runtime=types.SimpleNamespace(runtimeGetVersion=lambda: 0,
                                          driverGetVersion=lambda: 0)))


class _CpuTorch:
    """torch with a do-nothing torch.cuda: the peers and the reference on the CPU."""

    def __init__(self, torch):
        self._torch = torch
        noop = lambda *a: None  # noqa: E731
        self.cuda = types.SimpleNamespace(synchronize=noop, empty_cache=noop,
                                          reset_peak_memory_stats=noop,
                                          memory_allocated=lambda: 0,
                                          max_memory_allocated=lambda: 0)

    def __getattr__(self, name):
        return getattr(self._torch, name)


def _bench_on_cpu(tmp_path, extra=()):
    torch = pytest.importorskip("torch")
    bench = _load_bench()
    args = bench.parse_args(["--out", str(tmp_path), "--tokens", "1500", "--vocab", "300,1000",
                             "--dtypes", "float32", "--head", "1500x32x700", "--head-dtype",
                             "float32", "--peers", "torch", "--repeats", "2", *extra])
    rc = bench.run(args, _fake_cupy(), _CpuTorch(torch))
    return rc, json.loads((tmp_path / "bench_gpu.json").read_text())


def test_bench_gpu_runs_end_to_end_on_a_cpu_stand_in(tmp_path, capsys):
    """Every case is checked against torch (float32, in row chunks: 1500 rows are two
    chunks), timed, and reported; lmxent and torch agree everywhere."""
    rc, report = _bench_on_cpu(tmp_path)
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = report["rows"]
    bad = [r for r in rows if r["status"] != "ok"]
    assert not bad, bad
    ops = ("ce_fwd_bwd", "ce_forward", "log_softmax", "token_stats", "kl_divergence")
    for V in (300, 1000):
        assert any(r["op"] == "copy" and r["V"] == V for r in rows)
        for op in ops:
            got = {r["impl"] for r in rows if r["op"] == op and r["V"] == V}
            assert {"lmxent", "torch"} <= got, (op, V, got)
    head = {r["impl"]: r for r in rows if r["op"] == "lm_head"}
    assert {"lmxent", "naive cupy (float32 logits)", "3 GEMMs torch", "torch naive",
            "3 GEMMs cupy float32"} <= set(head)
    assert head["3 GEMMs torch"]["unchecked"] and "max_error" not in head["3 GEMMs torch"]
    assert head["lmxent"]["max_error"]["d_weight"] < 1e-4 and "extra_bytes" in head["lmxent"]
    ce = next(r for r in rows if r["op"] == "ce_fwd_bwd" and r["impl"] == "torch")
    assert ce["lmxent_speedup"] > 0 and 0 < ce["copy_fraction"]
    assert report["peers"] == {"torch": "ok"}
    assert (tmp_path / "bench_gpu.png").exists()
    assert "==== bench_gpu summary ====" in out and "ce_fwd_bwd" in out.split("summary")[-1]


def test_bench_gpu_reports_a_wrong_lmxent_result(tmp_path, monkeypatch, capsys):
    """A result off by 1% is WRONG, not timed, and makes the exit status 1; the other
    cases still run."""
    real = lx.log_softmax
    monkeypatch.setattr(lx, "log_softmax", lambda x, *a, **k: real(x, *a, **k) * 1.01)
    rc, report = _bench_on_cpu(tmp_path, ["--ops", "log_softmax,ce_forward"])
    assert rc == 1
    rows = {(r["op"], r["impl"], r["V"]): r for r in report["rows"]}
    wrong = rows[("log_softmax", "lmxent", 300)]
    assert wrong["status"] == "WRONG" and "seconds" not in wrong
    assert wrong["error_over_tolerance"] > 1
    assert rows[("log_softmax", "torch", 300)]["status"] == "ok"
    assert rows[("ce_forward", "lmxent", 1000)]["status"] == "ok"
    assert "WRONG: log_softmax" in capsys.readouterr().out
