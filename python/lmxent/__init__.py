"""lmxent: the loss layer of language-model training and evaluation.

Stable log-softmax, online log-sum-exp cross-entropy with the gradient fused into
the same pass, for NumPy (compiled C++ kernels, vectorised and threaded) and, with
the CUDA build, CuPy. `lmxent.reference` is the float64 oracle every kernel is
checked against."""
# Each module lists its public names in its own __all__; this package exports them
# all (adding an op touches its module, not this file). The `from . import x as _x`
# lines keep the modules at hand: the star imports rebind names such as `softmax`.
# (plot imports matplotlib only when a plot is drawn.)
from . import _arrays, _settings, plot, reference
from . import cross_entropy as _cross_entropy
from . import evaluation as _evaluation
from . import kl_divergence as _kl_divergence
from . import linear_cross_entropy as _linear_cross_entropy
from . import softmax as _softmax
from . import token_stats as _token_stats
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

_MODULES = (_softmax, _cross_entropy, _linear_cross_entropy, _token_stats, _kl_divergence,
            _evaluation, _settings, _arrays)
__all__ = ["reference", "plot"] + [name for m in _MODULES for name in m.__all__]

_settings.threads_from_env()
