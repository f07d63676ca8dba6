"""ArcFace (Deng et al. 2019, arXiv 1801.07698, Eq. 3) and InsightFace's combined margin."""

from __future__ import annotations

import math

from keras import ops

from keras_margin.margins._clamp import clamp_cos


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
