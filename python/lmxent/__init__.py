"""lmxent: the loss layer of language-model training and evaluation.

Stable log-softmax, online log-sum-exp cross-entropy with the gradient fused into
the same pass, for NumPy (compiled C++ kernels, vectorised and threaded) and, with
the CUDA build, CuPy. `lmxent.reference` is the float64 oracle every kernel is
checked against."""
# Each module lists its public names in its own __all__, and the package exports
# every module's list: a new op's module is found here without an edit. Skipped:
# tools, internals and modules with optional dependencies (imported by name).
# (plot imports matplotlib only when a plot is drawn.)
import importlib as _importlib
import pkgutil as _pkgutil

from . import _settings, plot, reference

# the one place of the version: pyproject.toml reads it from here (scikit-build-core)
__version__ = "0.1.0"

_NOT_EXPORTED = {"__main__", "_cli", "_options", "_philox", "_registry", "bench", "demo",
                 "distributed", "plot", "reference", "torch"}
_MODULES = sorted(m.name for m in _pkgutil.iter_modules(__path__)
                  if m.name not in _NOT_EXPORTED and not m.name.startswith(("_cpu", "_cuda")))
__all__ = ["reference", "plot"]
for _m in _MODULES:
    _mod = _importlib.import_module(f"{__name__}.{_m}")
    globals().update({_name: getattr(_mod, _name) for _name in _mod.__all__})
    __all__ += _mod.__all__
del _m, _mod

_settings.threads_from_env()
