"""NormFace (Wang et al. 2017, arXiv 1704.06369): normalized softmax, no margin, and its bound on s.

The objective's one definition: target function, default scale (s = 30 in this package's API) and its
check, used by ``NormFaceHead``, ``NormFaceLoss`` and ``normface_loss``.
"""

from __future__ import annotations

import math

from keras_margin import _validation

DEFAULT_S = 30.0
DEFAULT_LEARN_SCALE = False
DEFAULT_SCALE_MIN = 0.01  # the released config's learned-scale floor (Caffe Scale min_value: 0.01)


def normface_target(cos_theta_y):
    """Target cosine of NormFace: unchanged, ``z_y = s * cos(theta_y)``."""
    return cos_theta_y


def check_normface_parameters(owner: str, s=DEFAULT_S) -> dict:
    """NormFace's hyper-parameter, checked: s > 0; returned as ``{"s": s}``.

    Example:
    >>> check_normface_parameters("NormFaceLoss", 30)
    {'s': 30.0}
    """
    return {"s": _validation.check_scale(owner, s)}


def check_scale_min(owner: str, scale_min, s: float | None) -> float | None:
    """The floor of a learned scale, checked: ``None`` (no floor) or a number in (0, s] (``s=None``: > 0).

    Example:
    >>> check_scale_min("NormFaceHead", 0.01, 10.0)
    0.01
    """
    if scale_min is None:
        return None
    return _validation.check_number(owner, "scale_min", scale_min, low=0.0, high=s, low_open=True)


def normface_scale_lower_bound(num_classes: int, probability: float) -> float:
    """Smallest scale s with which every class can reach softmax probability P (NormFace, Sec. 3.3).

    Formula:
    ```
    s >= (C - 1) / C * log((C - 1) * P / (1 - P))
    ```

    Args:
        num_classes: C, the number of classes (>= 2).
        probability: P, the target probability of the true class, in (0, 1).

    Example:
    >>> round(normface_scale_lower_bound(10516, 0.9), 2)
    11.46
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2; got {num_classes!r}.")
    if not 0.0 < float(probability) < 1.0:
        raise ValueError(f"`probability` must be in (0, 1); got {probability!r}.")
    c, p = num_classes, float(probability)
    return (c - 1) / c * math.log((c - 1) * p / (1 - p))
