"""python -m lmxent: the self-check passes here and fails loudly on a wrong kernel."""
import subprocess
import sys

import numpy as np

import lmxent
from lmxent import __main__ as cli


def test_self_check_passes_in_a_subprocess():
    r = subprocess.run([sys.executable, "-m", "lmxent"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
    assert lmxent.cpu_info()["isa"] in r.stdout
    assert r.stdout.count(" pass\n") == len(cli._ops())


def test_self_check_fails_on_a_wrong_kernel(monkeypatch, capsys):
    real = lmxent.log_softmax
    monkeypatch.setattr(lmxent, "log_softmax", lambda x, **kw: real(x, **kw) * np.float32(1.001))
    assert cli.main([]) == 1
    out = capsys.readouterr().out
    assert "log_softmax" in out and "FAIL" in out and "1 check(s) FAILED" in out


def test_rel_error_counts_misplaced_nan_and_inf():
    assert cli.rel_error([1.0, np.nan], [1.0, np.nan]) == 0.0
    assert cli.rel_error([1.0, 2.0], [1.0, np.nan]) == float("inf")
    assert cli.rel_error([np.inf, 0.0], [-np.inf, 0.0]) == float("inf")
    assert cli.rel_error([0.0, 1e-9], [0.0, 0.0]) == 1e-9
