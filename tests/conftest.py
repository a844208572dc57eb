"""Fixtures of the kernel tests (the shared helpers are in helpers.py).

- ``rng``: a seeded NumPy Generator per test.
- ``isa``: runs a test once per CPU instruction set this processor offers
  (``lmxent.cpu_info()["available"]``) and restores the original afterwards.
"""
import zlib

import numpy as np
import pytest

from helpers import ISAS, cpu_isa


@pytest.fixture
def rng(request):
    # deterministic, but different for every test (so tests do not share data)
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture(params=ISAS)
def isa(request):
    """Select each available CPU instruction set in turn; restore afterwards."""
    with cpu_isa(request.param):
        yield request.param
