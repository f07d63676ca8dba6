"""ROC plot of a verification report as a PNG: TAR against FAR on a log axis, with the EER and TAR@FAR points.
matplotlib is imported only here, on use, and its absence is a clear error.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from keras_margin.evaluation.metrics import VerificationReport

__all__ = ["plot_roc"]


def plot_roc(report: VerificationReport, path: str | os.PathLike, label: str | None = None,
             title: str = "ROC (LFW protocol)") -> Path:
    """Write the ROC curve of ``report`` to ``path`` (PNG, or any format matplotlib infers from the suffix).

    Args:
        report: from ``verification_report`` or ``evaluate_lfw``.
        path: the image file to write; its folder must exist.
        label: legend entry of the curve (default: the AUC and accuracy).
        title: the plot title.

    Raises:
        ImportError: matplotlib is not installed (``pip install matplotlib``).

    Example:
    >>> import tempfile, os
    >>> from keras_margin.evaluation.metrics import verification_report
    >>> report = verification_report([1, 0] * 4, [0.9, 0.1, 0.8, 0.5, 0.3, 0.6, 0.6, 0.4], [0, 0, 1, 1] * 2)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     written = plot_roc(report, os.path.join(tmp, "roc.png"))
    ...     written.stat().st_size > 1000
    True
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting the ROC needs matplotlib, which is not installed: pip install matplotlib") from None
    from keras_margin.export._files import atomic_output, check_writable

    path = check_writable(path)
    floor = 1.0 / max(report.impostor, 1)
    far = np.maximum(report.far, floor / 10)  # FAR = 0 cannot sit on a log axis: draw it at a tenth of 1/n
    figure = Figure(figsize=(6.0, 4.5), dpi=120)
    axes = figure.subplots()
    axes.plot(far, report.tar, lw=1.5,
              label=label or f"AUC {report.auc:.4f}, accuracy {100 * report.accuracy:.2f}%")
    axes.plot([report.eer], [1 - report.eer], "o", color="tab:red", label=f"EER {100 * report.eer:.2f}%")
    shown = [(target, tar) for target, (tar, _) in report.tar_at_far.items() if target >= floor]
    if shown:
        axes.plot([t for t, _ in shown], [v for _, v in shown], "s", color="tab:green", ms=4, label="TAR@FAR")
    axes.set_xscale("log")
    axes.set_xlim(floor / 10, 1.0)
    axes.set_ylim(0.0, 1.005)
    axes.set_xlabel(f"FAR (false accept rate; {report.impostor} impostor pairs)")
    axes.set_ylabel(f"TAR (true accept rate; {report.genuine} genuine pairs)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    with atomic_output(path) as partial:  # the format follows the suffix, which the partial file keeps
        figure.savefig(partial)
    return path
