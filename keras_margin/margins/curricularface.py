"""CurricularFace (Huang et al., CVPR 2020, arXiv 2004.00288): ArcFace's target with re-weighted hard negatives.

The objective's one definition: its defaults (the authors' ``head/metrics.py``: s = 64, m = 0.5, t starts at 0,
batch weight 0.01 in t's moving average), the update of the curriculum statistic t, the non-target cosines and
the checks, used by ``CurricularFaceHead``. The target cosine is ``arcface_target`` (the same formula and
fallback as the authors' code: ``cos - sin(pi - m) * m`` = ``cos - m * sin(m)`` where ``cos <= cos(pi - m)``).
"""

from __future__ import annotations

import math

from keras import ops

from keras_margin import _validation
from keras_margin.margins._clamp import clamp_cos, sin_from_cos
from keras_margin.margins.arcface import arcface_target

DEFAULT_S = 64.0
DEFAULT_M = 0.5
DEFAULT_T = 0.0  # ``register_buffer('t', torch.zeros(1))``
DEFAULT_MOMENTUM = 0.01  # ``t = mean(cos_y) * 0.01 + (1 - 0.01) * t``: the batch mean's weight

curricularface_target = arcface_target


def check_curricularface_parameters(owner: str, s=DEFAULT_S, m=DEFAULT_M, momentum=DEFAULT_MOMENTUM) -> dict:
    """CurricularFace's hyper-parameters, checked: s > 0, m in [0, pi) radians, momentum in (0, 1].

    Example:
    >>> check_curricularface_parameters("CurricularFaceHead", 64, 0.5, 0.01)
    {'s': 64.0, 'm': 0.5, 'momentum': 0.01}
    """
    return {"s": _validation.check_scale(owner, s),
            "m": _validation.check_number(owner, "m", m, low=0.0, high=math.pi, high_open=True),
            "momentum": _validation.check_number(owner, "momentum", momentum, low=0.0, high=1.0, low_open=True)}


def curricularface_t(t, cos_theta_y, momentum: float = DEFAULT_MOMENTUM):
    """One step of the curriculum statistic, as the authors' code (under ``torch.no_grad``).

    Formula:
    ```
    t <- momentum * mean_i(clip(cos(theta_{y_i}), -1, 1)) + (1 - momentum) * t
    ```
    No gradient flows through it.

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> round(float(ops.convert_to_numpy(curricularface_t(0.0, np.array([0.5, 0.7], "float32")))), 6)
    0.006
    """
    r = ops.mean(ops.clip(ops.stop_gradient(ops.cast(cos_theta_y, "float32")), -1.0, 1.0))
    return momentum * r + (1.0 - momentum) * t


def curricularface_nontarget(cos_theta, cos_theta_y, t, m: float):
    """The non-target cosines: hard negatives (``cos_j > cos(theta_y + m)``) become ``cos_j * (t + cos_j)``.

    Formula:
    ```
    N(t, cos_j) = cos_j                 if cos(theta_y + m) >= cos_j
                = cos_j * (t + cos_j)   otherwise (a hard negative)
    ```
    ``cos(theta_y + m)`` here is the plain expansion ``cos_y cos(m) - sin_y sin(m)`` without ArcFace's fallback,
    as the authors' mask (``mask = cos_theta > cos_theta_m``, before ``torch.where`` applies the fallback).
    ``cos_theta`` is (batch, C), ``cos_theta_y`` (batch, 1); the mask carries no gradient.

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> cos, cos_y = np.array([[0.9, 0.95, 0.1]], "float32"), np.array([[0.9]], "float32")  # cos(theta_y + m) = 0.58
    >>> np.round(ops.convert_to_numpy(curricularface_nontarget(cos, cos_y, 0.5, 0.5)), 4)
    array([[1.26  , 1.3775, 0.1   ]], dtype=float32)
    """
    cos_y = clamp_cos(ops.cast(cos_theta_y, "float32"))
    cos_y_plus_m = ops.stop_gradient(cos_y * math.cos(m) - sin_from_cos(cos_y) * math.sin(m))
    return ops.where(cos_theta > cos_y_plus_m, cos_theta * (t + cos_theta), cos_theta)
