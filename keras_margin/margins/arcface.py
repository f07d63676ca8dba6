"""ArcFace (Deng et al. 2019, arXiv 1801.07698, Eq. 3) and InsightFace's combined margin (Eq. 4).

The objectives' one definition: target functions, default hyper-parameters (InsightFace's
``arcface_torch`` configs: s = 64, m = 0.5; combined margin (1.0, 0.5, 0.0)) and their checks, used by
``ArcFaceHead``, ``ArcFaceLoss``, ``arcface_loss``, ``CombinedMarginLoss`` and ``combined_margin_loss``.
"""

from __future__ import annotations

import math

from keras import ops

from keras_margin import _validation
from keras_margin.margins._clamp import angle_from_cos, clamp_cos, sin_from_cos

DEFAULT_S = 64.0
DEFAULT_M = 0.5

COMBINED_DEFAULT_S = 64.0
COMBINED_DEFAULT_M1 = 1.0
COMBINED_DEFAULT_M2 = 0.5
COMBINED_DEFAULT_M3 = 0.0

_PI_BELOW_FLOAT32 = 3.1415925025939941  # the largest float32 below pi (sin of it is +1.5e-7)


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
    ``cos(theta + m)`` is expanded as ``cos*cos(m) - sin*sin(m)`` on the clamped cosine, with
    ``sin = sqrt((1 - cos)(1 + cos))`` (not ``sqrt(1 - cos^2)``, which loses ~3e-5 relative near ``cos = 1`` in
    float32), so no arccos is needed and the gradient stays finite and accurate up to ``cos = +-1``.

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> c = np.array([1.0, 0.0, -0.9], "float32")  # -0.9 < cos(pi - 0.5) = -0.8776: the fallback
    >>> # (at cos = 1 the clamp leaves theta = 4.9e-4, hence 0.8773 and not cos(0.5) = 0.8776)
    >>> np.round(ops.convert_to_numpy(arcface_target(c, 0.5)), 4)
    array([ 0.8773, -0.4794, -1.1397], dtype=float32)
    """
    return _cos_angle_plus(cos_theta_y, m, cos_theta_y - m * math.sin(m))


def _cos_angle_plus(cos_theta_y, m: float, fallback):
    """``cos(theta + m)`` (as ``cos*cos(m) - sin*sin(m)``, no arccos) where ``theta + m <= pi``, else ``fallback``:
    the one computation behind ``arcface_target`` and the combined margin with ``m1 == 1``."""
    cos = clamp_cos(cos_theta_y)
    cos_theta_plus_m = cos * math.cos(m) - sin_from_cos(cos) * math.sin(m)
    return ops.where(cos_theta_y >= math.cos(math.pi - m), cos_theta_plus_m, fallback)


def combined_margin_threshold(m1: float, m2: float):
    """The angle ``theta_t = (pi - m2) / m1`` where ``m1 * theta + m2`` reaches pi, or None when ``theta_t >= pi``
    (then the combined margin needs no fallback).

    Example:
    >>> round(combined_margin_threshold(1.0, 0.5), 4), combined_margin_threshold(0.5, 0.5)
    (2.6416, None)
    """
    theta_t = (math.pi - m2) / m1
    return None if theta_t >= math.pi else theta_t


def combined_margin_target(cos_theta_y, m1: float, m2: float, m3: float):
    """InsightFace's combined margin ``z_y / s = cos(m1 * theta_y + m2) - m3``, with a monotone fallback.

    Formula:
    ```
    theta_t = (pi - m2) / m1                            (where m1 * theta + m2 reaches pi)
    z_y / s = cos(m1 * theta_y + m2) - m3               if theta_y <= theta_t
            = cos(theta_y) - m3 - c                     otherwise, with
    c = m2 * sin(m2)                                    if m1 == 1 (InsightFace's ArcFace fallback)
      = 1 + cos(theta_t)                                otherwise  (continuous at theta_t: -1 - m3 both sides)
    ```
    Past ``theta_t`` the plain formula turns back up (its slope w.r.t. ``cos`` is negative there: -0.58 at
    cos = -0.95 for (1, 0.5, 0)), pushing those samples away from their class; the fallback keeps ``z_y``
    non-increasing in ``theta_y`` for every (m1, m2, m3). With ``theta_t >= pi`` it never applies.

    (1, 0, 0) is NormFace, (1, 0, m) AM-Softmax/CosFace (exactly ``cos - m3``, no angle computed, whenever
    m1 == 1 and m2 == 0) and (1, m, 0) ArcFace: the same computation as ``arcface_target(cos, m)`` (no arccos),
    so the two agree bit for bit, fallback included. With m1 != 1 the angle is
    ``atan2(sqrt((1 - cos)(1 + cos)), cos)`` on the clamped cosine (arccos' value, a better-conditioned
    gradient near ``cos = +-1``).

    keras-margin computes the full formula for every (m1, m2, m3). InsightFace's own ``CombinedMarginLoss``
    (``recognition/arcface_torch/losses.py``) handles only m1 == 1 with m3 == 0 (ArcFace: ``cos(theta + m2)``;
    its earlier version with this fallback, its current one computes it under ``no_grad`` with no fallback)
    or m3 > 0 (where it drops m1 and m2 and computes ``cos - m3``), and raises otherwise.

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> c = np.array([1.0, 0.0, -0.9], "float32")
    >>> np.round(ops.convert_to_numpy(combined_margin_target(c, 1.35, 0.2, 0.1)), 4)  # theta_t = 2.1790
    array([ 0.8799, -0.7815, -1.4286], dtype=float32)
    """
    if m1 == 1.0:
        if m2 == 0.0:
            return cos_theta_y - m3
        return _cos_angle_plus(cos_theta_y, m2, cos_theta_y - m2 * math.sin(m2)) - m3
    theta = angle_from_cos(cos_theta_y)
    theta_t = combined_margin_threshold(m1, m2)
    if theta_t is None:
        return ops.cos(m1 * theta + m2) - m3
    # The phase capped just below pi (float32's pi is above it, and sin of it negative): where float32 rounding
    # puts theta a hair past theta_t on this side, the slope is 0 or positive, never negative.
    plain = ops.cos(ops.minimum(m1 * theta + m2, _PI_BELOW_FLOAT32)) - m3
    fallback = cos_theta_y - m3 - (1.0 + math.cos(theta_t))
    return ops.where(cos_theta_y >= math.cos(theta_t), plain, fallback)
