"""The op registry (lmxent._registry): every public function of lmxent has a row,
its reference exists with the same options, and the self-check and the benchmark
read their rows from it."""
import inspect

import numpy as np
import pytest

import lmxent as lx
from lmxent import __main__ as cli
from lmxent import bench
from lmxent import reference as R
from lmxent._registry import REGISTRY, ROWS

# Public names that are not ops: modules, result types, settings and queries
EXEMPT = {
    "reference": "the float64 oracle itself",
    "plot": "a module of plots (matplotlib)",
    "TokenStats": "token_stats's result type",
    "Samples": "sample's result type", "Beams": "beam_search's result type",
    "cpu_info": "a setting", "set_cpu_isa": "a setting", "set_num_threads": "a setting",
    "get_num_threads": "a setting", "bfloat16_dtype": "a dtype lookup",
    "set_cuda_validation": "a setting", "check_cuda_errors": "reads the deferred errors",
    "set_output_cache": "a setting", "output_cache_info": "a setting",
}
OPS = [name for name in lx.__all__ if name not in EXEMPT]


def test_exemptions_are_public_names():
    assert set(EXEMPT) <= set(lx.__all__)


def test_all_lists_every_public_function_of_the_package():
    """lmxent.__all__ is built from the modules' own lists: none is left out."""
    public = {name for name, v in vars(lx).items() if not name.startswith("_") and callable(v)
              and getattr(v, "__module__", "").startswith("lmxent")}
    assert public == set(lx.__all__) - {"reference", "plot"}


@pytest.mark.parametrize("name", OPS)
def test_every_public_function_has_a_row(name):
    assert name in ROWS, f"lmxent.{name} has no row in lmxent._registry.REGISTRY"


@pytest.mark.parametrize("row", REGISTRY, ids=lambda r: r.name)
def test_row_names_a_public_function_and_its_reference(row):
    assert row.name in lx.__all__ and row.name in R.__all__
    # the reference takes every option it has by the same name as lmxent (lmxent
    # has more: out=, inplace=, chunk sizes)
    mine = inspect.signature(getattr(lx, row.name)).parameters
    theirs = inspect.signature(getattr(R, row.name)).parameters
    assert set(theirs) <= set(mine), set(theirs) - set(mine)


def test_reference_exports_every_op_and_nothing_else():
    assert sorted(R.__all__) == sorted(ROWS)


def test_self_check_and_bench_read_the_registry():
    assert list(cli._ops()) == [label for row in REGISTRY for label in row.checks]
    assert [op.name for op in bench.OPS] == [row.name for row in REGISTRY if row.bench]
    for row in REGISTRY:  # a benchmarked op runs lmxent itself
        assert row.bench is None or "lmxent" in row.bench.impls


def test_tolerance_by_dtype():
    c = ROWS["softmax"].checks["softmax"]
    assert c.tolerance(np.float64, "float64") == 18 * 2.0**-52
    assert c.tolerance(np.float32, "float32") == 18 * 2.0**-23
    assert c.tolerance(np.float16, "float16") == 16 * 2.0**-23 + 2 * 2.0**-11
    assert ROWS["kl_divergence"].checks["kl_divergence (js, with grad)"].ulps == 256
