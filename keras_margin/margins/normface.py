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


_MAX_EXACT_COUNT = 2 ** 53


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
    owner = "normface_scale_lower_bound"
    c = _validation.check_count(owner, "num_classes", num_classes, minimum=2)
    if c > _MAX_EXACT_COUNT:
        raise ValueError(f"{owner}: `num_classes` must be at most 2^53 (float64 counts exactly up to there; no "
                         f"head holds more classes); got {num_classes!r}.")
    p = _validation.check_number(owner, "probability", probability, low=0.0, high=1.0, low_open=True,
                                 high_open=True)
    # In logs: (C - 1) * P as a float would overflow long before C itself does.
    return (c - 1) / c * (math.log(c - 1) + math.log(p) - math.log1p(-p))
