"""The CPU bench scripts (bench/bench_cross_entropy.py, bench_token_stats.py,
bench_linear_cross_entropy.py), entry points over lmxent.bench: each runs on a
small shape, checks and times its rows, and writes its report."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows(path):
    with open(path) as f:
        (res,) = json.load(f)["results"]
    return {(r["op"], r["impl"]): r for r in res["results"]}


def test_bench_cross_entropy_adds_its_rows(tmp_path):
    code = load("bench_cross_entropy").main(["--shapes", "64x1000", "--dtypes", "float32",
                                             "--repeats", "1", "--peers", "numpy,torch",
                                             "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    got = rows(tmp_path / "cross_entropy.json")
    assert {op for op, _ in got} == {"logsumexp", "log_softmax", "cross_entropy",
                                    "cross_entropy_with_grad"}
    wanted = [("log_softmax", "lmxent uncached"), ("log_softmax", "lmxent out="),
              ("cross_entropy_with_grad", "lmxent uncached"),
              ("cross_entropy_with_grad", "lmxent out="),
              ("cross_entropy_with_grad", "lmxent inplace")]
    for key in wanted:
        assert got[key]["status"] == "ok" and got[key]["error_over_tolerance"] <= 1, key
    torch_out = got["log_softmax", "torch out="]
    if importlib.util.find_spec("torch") is None:
        assert torch_out["status"] == "skipped"
    else:
        assert torch_out["status"] == "ok" and torch_out["lmxent_speedup"] > 0


def test_bench_token_stats_compares_with_cross_entropy(tmp_path, capsys):
    code = load("bench_token_stats").main(["--shapes", "64x1000", "--repeats", "1",
                                           "--peers", "numpy", "--out", str(tmp_path),
                                           "--no-progress"])
    assert code == 0
    got = rows(tmp_path / "token_stats.json")
    for op in ("token_stats", "kl_divergence", "cross_entropy"):
        assert got[op, "lmxent"]["status"] == "ok" and got[op, "numpy"]["status"] == "ok"
    assert "64x1000 float32: token_stats takes" in capsys.readouterr().out


def test_bench_linear_cross_entropy_measures_time_and_memory(tmp_path):
    path = tmp_path / "head.json"
    code = load("bench_linear_cross_entropy").main(
        ["--tokens", "64", "--hidden", "128", "--vocab", "300", "--repeats", "1",
         "--skip", "torch", "--json", str(path)])
    assert code == 0
    (res,) = json.loads(path.read_text())["results"]
    assert res["shape"] == [64, 128, 300] and res["chunk_rows"] == 64  # at most every token
    by = {r["impl"]: r for r in res["results"]}
    assert {"lmxent", "naive NumPy", "logits+lx", "3 matmuls"} <= set(by)
    assert by["lmxent"]["status"] == "ok" and by["lmxent"]["seconds"] > 0
    if os.path.exists("/proc/self/clear_refs"):
        assert by["lmxent"]["peak_bytes"] is not None


def test_bench_ce_bandwidth_checks_and_reports(capsys):
    """The interleaved harness checks lmxent against the reference, then prints each
    row with its floor (copy or read) and, without torch, no torch ratio."""
    dtypes = ["float32"] + (["bfloat16"] if importlib.util.find_spec("ml_dtypes") else [])
    code = load("bench_ce_bandwidth").main(["--threads", "2", "--rounds", "2", "--vocab", "1000",
                                            "--elems", "64000", "--no-torch", "--dtypes", *dtypes])
    out = capsys.readouterr().out
    assert code == 0
    for dtype in dtypes:
        assert f"64x1000 {dtype}" in out
    for row, floor in [("fused ", "copy"), ("fused nocache", "copy"), ("forward", "read"),
                       ("log_softmax", "copy")]:
        assert any(line.strip().startswith(row.strip()) and f"of {floor}" in line
                   for line in out.splitlines()), row
    assert "x torch" not in out


@pytest.mark.parametrize("script", ["bench_cross_entropy", "bench_token_stats"])
def test_bench_scripts_refuse_bad_arguments(script, capsys):
    with pytest.raises(SystemExit) as e:
        load(script).main(["--ops", "nope"])
    assert e.value.code == 2 and "unknown op 'nope'" in capsys.readouterr().err
