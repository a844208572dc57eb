"""lmxent: the loss layer of language-model training and evaluation.

Stable log-softmax, online log-sum-exp cross-entropy with the gradient fused into
the same pass, for NumPy (compiled C++ kernels, vectorised and threaded) and, with
the CUDA build, CuPy. `lmxent.reference` is the float64 oracle every kernel is
checked against."""
# Each module lists its public names in its own __all__; the package exports them
# all: a new function touches its module only, a new module the two lists below.
# (plot imports matplotlib only when a plot is drawn.)
import importlib as _importlib

from . import _settings, plot, reference
from ._arrays import *  # noqa: F403
from ._settings import *  # noqa: F403
from .cross_entropy import *  # noqa: F403
from .evaluation import *  # noqa: F403
from .kl_divergence import *  # noqa: F403
from .linear_cross_entropy import *  # noqa: F403
from .softmax import *  # noqa: F403
from .token_stats import *  # noqa: F403

# the one place of the version: pyproject.toml reads it from here (scikit-build-core)
__version__ = "0.1.0"

_MODULES = ("softmax", "cross_entropy", "linear_cross_entropy", "token_stats", "kl_divergence",
            "evaluation", "_settings", "_arrays")
__all__ = ["reference", "plot"] + [name for m in _MODULES for name in
                                   _importlib.import_module(f"{__name__}.{m}").__all__]

_settings.threads_from_env()
