"""python -m lmxent bench and demo: their quick forms run, write what they promise,
catch wrong implementations, and refuse bad arguments with a clear message."""
import importlib.util
import io
import json
import math
from collections import Counter

import numpy as np
import pytest

import lmxent as lx
from lmxent import __main__ as cli
from lmxent import _cli, bench, demo
from lmxent import reference as R

SHAPE = "64x1000"  # one small shape: 32 checked rows out of 64 (first 16, last 16)


def run_bench(tmp_path, *extra, extra_impls=None, ops=None):
    argv = ["--quick", "--shapes", SHAPE, "--out", str(tmp_path), "--no-progress", *extra]
    if ops:
        argv += ["--ops", ops]
    code = bench.main(argv, extra_impls=extra_impls)
    with open(tmp_path / "bench.json") as f:
        return code, json.load(f)


def rows_of(report):
    (res,) = report["results"]
    return {(r["op"], r["impl"]): r for r in res["results"]}


# ---------------------------------------------------------------------- bench

def test_bench_quick_checks_times_and_writes_json_and_png(tmp_path, capsys):
    code, report = run_bench(tmp_path)
    assert code == 0
    assert (tmp_path / "bench.png").stat().st_size > 0
    m = report["machine"]
    assert m["cores"] >= 1 and m["cpu"] and m["lmxent_cpu"] == lx.cpu_info()
    assert m["versions"]["lmxent"] == lx.__version__ and m["versions"]["numpy"] == np.__version__
    assert report["device"] == "cpu" and report["quick"]
    # every peer is either run or skipped with a reason; the GPU-only ones are skipped here
    assert set(report["peers"]) == set(bench.PEERS)
    for gpu_only in ("liger", "cce", "quack"):
        assert report["peers"][gpu_only].startswith("skipped: GPU only")
    (res,) = report["results"]
    assert res["shape"] == [64, 1000] and res["dtype"] == "float32" and res["copy_gbs"] > 0
    rows = rows_of(report)
    ops, missing = bench.select_ops(bench.Device("cpu"))
    assert not missing  # this build has every op family the bench knows
    assert {op for op, _ in rows} == {op.name for op in ops} == {op.name for op in bench.OPS}
    torch_ok = report["peers"]["torch"] == "ok"
    for op in ops:  # lmxent, the NumPy peer and torch (if installed) run every op, correctly
        for impl in ("lmxent", "numpy") + (("torch",) if torch_ok else ()):
            r = rows[op.name, impl]
            assert r["status"] == "ok", r
            assert r["seconds"] > 0 and r["error_over_tolerance"] <= 1
            assert ("gflops" in r) == (op.name == "linear_cross_entropy")
            assert ("copy_fraction" in r) != (op.name == "linear_cross_entropy")
        assert rows[op.name, "numpy"]["lmxent_speedup"] == pytest.approx(
            rows[op.name, "numpy"]["seconds"] / rows[op.name, "lmxent"]["seconds"])
    out = capsys.readouterr().out
    assert "64 x 1000 float32" in out and "lmxent speedup" in out and "WRONG" not in out


def _wrong_logsumexp(p, _):
    return lambda: lx.logsumexp(p.x) * np.float32(1.001)


def _wrong_mean_loss(p, _):  # the gradient is right; only the mean loss is off
    return lambda: (lambda loss, g: (loss * 1.001, g))(*lx.cross_entropy_with_grad(p.x, p.t))


def _wrong_last_row(p, _):  # only the last row's gradient is off
    def run():
        loss, g = lx.cross_entropy_with_grad(p.x, p.t)
        g[-1] *= 1.01
        return loss, g
    return run


def _wrong_rank(p, _):  # integers are compared exactly: one rank off by one
    def run():
        s = lx.token_stats(p.x, p.t)
        rank = s.rank.copy()
        rank[0] += 1
        return s._replace(rank=rank)
    return run


def _failing(p, _):
    raise RuntimeError("this peer is broken")


def test_bench_reports_wrong_results_as_wrong_and_does_not_time_them(tmp_path, capsys):
    extra = {"logsumexp": {"wrong lse": _wrong_logsumexp, "broken": _failing},
             "cross_entropy_with_grad": {"wrong mean": _wrong_mean_loss,
                                         "wrong last row": _wrong_last_row},
             "token_stats": {"wrong rank": _wrong_rank}}
    code, report = run_bench(tmp_path, "--peers", "numpy", extra_impls=extra,
                             ops="logsumexp,cross_entropy_with_grad,token_stats")
    assert code == 0  # lmxent itself is right
    rows = rows_of(report)
    for key, where in [(("logsumexp", "wrong lse"), "logsumexp"),
                       (("cross_entropy_with_grad", "wrong mean"), "loss"),
                       (("cross_entropy_with_grad", "wrong last row"), "d_logits"),
                       (("token_stats", "wrong rank"), "rank")]:
        r = rows[key]
        assert r["status"] == "WRONG" and r["worst_output"] == where, r
        assert r["error_over_tolerance"] > 1 and "seconds" not in r
        assert "lmxent_speedup" not in r
    assert rows["logsumexp", "broken"]["status"] == "error"
    assert "RuntimeError: this peer is broken" in rows["logsumexp", "broken"]["detail"]
    assert rows["logsumexp", "lmxent"]["status"] == "ok"
    out = capsys.readouterr().out
    assert out.count("WRONG") == 4 and "not timed" in out


def test_bench_fails_when_lmxent_is_wrong(tmp_path, monkeypatch, capsys):
    real = lx.softmax
    monkeypatch.setattr(lx, "softmax", lambda x, **kw: real(x, **kw) * np.float32(1.001))
    code, report = run_bench(tmp_path, "--peers", "numpy", ops="softmax")
    assert code == 1
    assert rows_of(report)["softmax", "lmxent"]["status"] == "WRONG"
    assert rows_of(report)["softmax", "numpy"]["status"] == "ok"
    assert "lmxent FAILED: 64x1000 float32 softmax lmxent: WRONG" in capsys.readouterr().out


def test_bench_lists_peers_that_cannot_run_as_skipped(tmp_path, monkeypatch):
    def missing(dev, args):
        raise bench.Skip("not installed (No module named 'nothere')")
    monkeypatch.setitem(bench.PEERS, "nothere", missing)
    code, report = run_bench(tmp_path, ops="logsumexp")
    assert code == 0
    assert report["peers"]["nothere"] == "skipped: not installed (No module named 'nothere')"
    assert report["peers"]["numpy"] == "ok"


@pytest.mark.parametrize("argv, message", [
    (["bench", "--shapes", "64"], "expected NxV"),
    (["bench", "--shapes", "0x100"], "positive integers"),
    (["bench", "--shapes", "8xabc"], "expected NxV"),
    (["bench", "--dtypes", "int8"], "unknown dtype 'int8'"),
    (["bench", "--ops", "logsumexp,nope"], "unknown op 'nope'"),
    (["bench", "--peers", "tensorflow"], "unknown peer 'tensorflow'"),
    (["bench", "--hidden", "-3"], "expected a positive integer"),
    (["bench", "--repeats", "0"], "expected a positive integer"),
    (["bench", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["demo", "--steps", "0"], "expected a positive integer"),
    (["demo", "--batch", "x"], "expected a positive integer"),
    (["demo", "--lr", "-1"], "--lr must be a positive number"),
    (["demo", "--data", "/nonexistent/file.txt"], "--data: cannot read /nonexistent/file.txt"),
])
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_without_cupy_is_a_clear_error(capsys):
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed")
    for sub in ("bench", "demo"):
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--device", "cuda"])
        assert e.value.code == 2
        assert "--device cuda needs CuPy" in capsys.readouterr().err


def test_tolerance_is_looser_for_16_bit_data():
    f32 = bench.tolerance(np.float32, np.float32)
    assert f32 == 64 * 2.0**-23 + 2 * 2.0**-23
    assert bench.tolerance(np.float64, np.float64) == 66 * 2.0**-52
    bf16 = lx.bfloat16_dtype()
    if bf16 is not None:  # 2 units of the bfloat16 output, 4 of the bfloat16 input
        assert bench.tolerance(bf16, bf16) == 64 * 2.0**-23 + 6 * 2.0**-8


# ----------------------------------------------------------------------- demo

def run_demo(tmp_path, *argv):
    code = demo.main(["--max-bytes", "60000", "--out", str(tmp_path), "--no-progress", *argv])
    with open(tmp_path / "demo.json") as f:
        return code, json.load(f)


def test_demo_short_run_loss_falls_and_writes_files(tmp_path, capsys):
    code, s = run_demo(tmp_path, "--steps", "40")
    assert code == 0
    assert (tmp_path / "demo.png").stat().st_size > 0
    losses = s["training"]["loss_nats"]
    assert len(losses) == 40 and all(map(math.isfinite, losses))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0  # nats: it learns
    d = s["data"]
    assert d["bytes"] == 60000 and d["train_bytes"] == 54000 and d["held_out_bytes"] == 6000
    for name in ("mlp", "unigram", "bigram", "trigram"):  # against the float64 reference
        r = s["held_out"][name]
        assert r["bits_per_byte"] == pytest.approx(R.bits_per_byte(r["nll_sum"], 6000))
        assert r["perplexity"] == pytest.approx(R.perplexity(r["nll_sum"], 6000))
        assert 0 <= r["accuracy"] <= 1
    out = capsys.readouterr().out
    assert "held-out: 6,000 bytes" in out and "bigram, alpha" in out and "bits/byte" in out


def test_demo_is_reproducible(tmp_path):
    _, a = run_demo(tmp_path / "a", "--steps", "5", "--seed", "3")
    _, b = run_demo(tmp_path / "b", "--steps", "5", "--seed", "3")
    _, c = run_demo(tmp_path / "c", "--steps", "5", "--seed", "4")
    assert a["training"]["loss_nats"] == b["training"]["loss_nats"]
    assert a["held_out"] == b["held_out"] and a["sample"] == b["sample"]
    assert a["training"]["loss_nats"] != c["training"]["loss_nats"]


def test_ngram_baselines_match_the_counting_formula(rng):
    """Scored through lx.token_stats on tables of logits log(count + alpha), the
    n-gram baselines equal -sum log((count(ctx, b) + alpha) / (count(ctx) + 256 alpha))
    computed directly; the best alpha per order is kept."""
    data = rng.integers(0, 6, 3000).astype(np.uint8)  # a small alphabet: real contexts
    split = 2400
    got = demo.baselines(data, split)
    train = data[:split]
    for order, name in ((1, "unigram"), (2, "bigram"), (3, "trigram")):
        grams = [tuple(train[i:i + order]) for i in range(len(train) - order + 1)]
        full, ctx_count = Counter(grams), Counter(g[:-1] for g in grams)
        best = np.inf
        for alpha in demo.ALPHAS:
            nll = 0.0
            for pos in range(split, len(data)):
                ctx = tuple(data[pos - order + 1:pos])
                nll -= math.log((full[ctx + (data[pos],)] + alpha) / (ctx_count[ctx] + 256 * alpha))
            best = min(best, nll)
        assert got[name]["nll_sum"] == pytest.approx(best, rel=1e-5), name


def test_demo_refuses_too_little_text(tmp_path, capsys):
    path = tmp_path / "tiny.txt"
    path.write_bytes(b"print('hello')\n" * 10)
    with pytest.raises(SystemExit):
        cli.main(["demo", "--data", str(path)])
    assert "has 150 bytes; the demo needs at least" in capsys.readouterr().err


def test_demo_trains_on_a_given_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 200)
    code, s = run_demo(tmp_path / "out", "--data", str(path), "--steps", "30")
    assert code == 0 and s["data"]["source"] == str(path) and s["data"]["bytes"] == 9000
    losses = s["training"]["loss_nats"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0


# ----------------------------------------------------------------- dispatch, bar

def test_no_subcommand_and_check_run_the_self_check(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "self_check", lambda: calls.append(1) or 7)
    assert cli.main([]) == 7 and cli.main(["check"]) == 7 and len(calls) == 2


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    bar = _cli.Progress(4)
    bar.update(3, "step 3")
    assert "[" + "#" * 18 + "-" * 6 + "] 3/4" in term.getvalue() and "step 3" in term.getvalue()
    bar.write("a line")
    bar.close()
    assert capsys.readouterr().out == "a line\n"
    assert term.getvalue().endswith("\r\033[K")
    quiet = _Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    _cli.Progress(4, enabled=False).update(1)  # --no-progress
    assert quiet.getvalue() == ""
