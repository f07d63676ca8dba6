"""ArcFace (Deng et al. 2019, arXiv 1801.07698, Eq. 3) and InsightFace's combined margin (Eq. 4).

The objectives' one definition: target functions, default hyper-parameters (InsightFace's
``arcface_torch`` configs: s = 64, m = 0.5; combined margin (1.0, 0.5, 0.0)) and their checks, used by
``ArcFaceHead``, ``ArcFaceLoss``, ``arcface_loss``, ``CombinedMarginLoss`` and ``combined_margin_loss``.
"""

from __future__ import annotations

import math

from keras import ops

from keras_margin import _validation
from keras_margin.margins._clamp import clamp_cos

DEFAULT_S = 64.0
DEFAULT_M = 0.5

COMBINED_DEFAULT_S = 64.0
COMBINED_DEFAULT_M1 = 1.0
COMBINED_DEFAULT_M2 = 0.5
COMBINED_DEFAULT_M3 = 0.0


def check_arcface_parameters(owner: str, s=DEFAULT_S, m=DEFAULT_M) -> dict:
    """ArcFace's hyper-parameters, checked: s > 0, m in [0, pi) radians; returned as ``{"s": s, "m": m}``.

    Example:
    >>> check_arcface_parameters("ArcFaceLoss", 64, 0.5)
    {'s': 64.0, 'm': 0.5}
    """
    return {"s": _validation.check_scale(owner, s),
            "m": _validation.check_number(owner, "m", m, low=0.0, high=math.pi, high_open=True)}


def check_combined_margin_parameters(owner: str, s=COMBINED_DEFAULT_S, m1=COMBINED_DEFAULT_M1,
                                     m2=COMBINED_DEFAULT_M2, m3=COMBINED_DEFAULT_M3) -> dict:
    """The combined margin's hyper-parameters, checked: s > 0, m1 > 0, m2 in [0, pi), m3 in [0, 1].

    Example:
    >>> check_combined_margin_parameters("CombinedMarginLoss", 64, 1, 0.3, 0.2)
    {'s': 64.0, 'm1': 1.0, 'm2': 0.3, 'm3': 0.2}
    """
    return {"s": _validation.check_scale(owner, s),
            "m1": _validation.check_number(owner, "m1", m1, low=0.0, low_open=True),
            "m2": _validation.check_number(owner, "m2", m2, low=0.0, high=math.pi, high_open=True),
            "m3": _validation.check_number(owner, "m3", m3, low=0.0, high=1.0)}


def arcface_target(cos_theta_y, m: float):
    """Additive angular margin in the InsightFace convention.

    Formula:
    ```
    z_y / s = cos(theta_y + m)          if theta_y + m <= pi  (cos(theta_y) >= cos(pi - m))
            = cos(theta_y) - m * sin(m) otherwise              (keeps z_y monotone in theta_y)
    ```
    ``cos(theta + m)`` is expanded as ``cos*cos(m) - sin*sin(m)`` with ``sin = sqrt(1 - cos^2)`` on the
    clamped cosine, so no arccos is needed and the gradient stays finite at cos = +-1.
    """
    cos = clamp_cos(cos_theta_y)
    sin = ops.sqrt(1.0 - cos * cos)
    cos_theta_plus_m = cos * math.cos(m) - sin * math.sin(m)
    threshold = math.cos(math.pi - m)
    return ops.where(cos_theta_y >= threshold, cos_theta_plus_m, cos_theta_y - m * math.sin(m))


def combined_margin_target(cos_theta_y, m1: float, m2: float, m3: float):
    """InsightFace's combined margin ``z_y / s = cos(m1 * theta_y + m2) - m3`` (plain formula, no fallback).

    (1, 0, 0) is NormFace, (1, 0, m) AM-Softmax/CosFace, (1, m, 0) ArcFace while theta_y + m <= pi.
    With m1 == 1 and m2 == 0 no angle is computed at all (exactly ``cos - m3``).
    """
    if m1 == 1.0 and m2 == 0.0:
        return cos_theta_y - m3
    theta = ops.arccos(clamp_cos(cos_theta_y))
    return ops.cos(m1 * theta + m2) - m3
