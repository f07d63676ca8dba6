"""AM-Softmax (Wang et al. 2018, arXiv 1801.05599, Eq. 4) = CosFace's large margin cosine loss.

The objective's one definition: its target function, its default hyper-parameters (the released
AM-Softmax model: s = 30, m = 0.35) and their checks, used by ``AMSoftmaxHead``, ``AMSoftmaxLoss`` and
``amsoftmax_loss`` alike.
"""

from __future__ import annotations

from keras_margin import _validation

DEFAULT_S = 30.0
DEFAULT_M = 0.35


def amsoftmax_target(cos_theta_y, m: float):
    """Additive cosine margin: ``z_y / s = cos(theta_y) - m``."""
    return cos_theta_y - m


def check_amsoftmax_parameters(owner: str, s=DEFAULT_S, m=DEFAULT_M) -> dict:
    """AM-Softmax's hyper-parameters, checked: s > 0, m in [0, 1]; returned as ``{"s": s, "m": m}`` floats.

    Example:
    >>> check_amsoftmax_parameters("AMSoftmaxLoss", 30, 0.35)
    {'s': 30.0, 'm': 0.35}
    """
    return {"s": _validation.check_scale(owner, s),
            "m": _validation.check_number(owner, "m", m, low=0.0, high=1.0)}
