"""Plots of evaluation results. matplotlib is an optional dependency, imported only
when a plot is drawn (importing lmxent never needs it)."""
import numpy as np

from . import _arrays as A

__all__ = ["reliability_diagram"]


def _host(a):
    """A NumPy copy of a NumPy or CuPy array."""
    return a.get() if A._is_cupy(a) else np.asarray(a)


def reliability_diagram(cal, path=None, ax=None, title=None):
    """Draw a Calibration (from lmxent.calibration): per-bin accuracy as bars over the
    confidence bins, the gap to each bin's mean confidence, and the diagonal of perfect
    calibration; empty bins are left blank. Draws into `ax` when given (a matplotlib
    Axes), else into a new figure. Saves a PNG to `path` when given. Returns the figure."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("lmxent.plot.reliability_diagram needs matplotlib "
                          "(pip install matplotlib)") from None
    try:
        edges, counts, acc, conf, ece, mce = (
            _host(getattr(cal, f)) for f in
            ("bin_edges", "counts", "accuracy", "confidence", "ece", "mce"))
    except AttributeError:
        raise TypeError("cal: expected the result of lmxent.calibration, got "
                        f"{type(cal).__name__}") from None
    if ax is None:
        fig = Figure(figsize=(5, 5))  # not pyplot: no global figure state, any backend
        ax = fig.subplots()
    else:
        fig = ax.figure
    lo, width = edges[:-1], np.diff(edges)
    drawn = counts > 0
    ax.bar(lo[drawn], acc[drawn], width=width[drawn], align="edge", color="tab:blue",
           edgecolor="black", label="accuracy")
    ax.bar(lo[drawn], conf[drawn] - acc[drawn], bottom=acc[drawn], width=width[drawn],
           align="edge", color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//",
           label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=title if title is not None else "Reliability diagram")
    ax.legend(loc="upper left", title=f"ECE {float(ece):.4f}, MCE {float(mce):.4f}, "
                                      f"n = {int(counts.sum())}")
    if path is not None:
        fig.savefig(path, format="png")
    return fig
