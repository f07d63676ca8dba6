"""MagFace (Meng et al., CVPR 2021, arXiv 2103.06627): an angular margin and a regularizer set by the feature norm.

The objective's one definition: its defaults (the authors' ``run/run.sh`` and ``models/magface.py``: s = 64,
l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, lambda_g = 35, easy margin), the clamped magnitude, the margin
m(a), the target cosine, the regularizer g(a) and the checks, used by ``MagFaceHead``.
"""

from __future__ import annotations

import math

from keras import ops

from keras_margin import _validation
from keras_margin.margins._clamp import clamp_cos, sin_from_cos

DEFAULT_S = 64.0
DEFAULT_L_A = 10.0
DEFAULT_U_A = 110.0
DEFAULT_L_M = 0.45
DEFAULT_U_M = 0.8
DEFAULT_LAMBDA_G = 35.0  # run/run.sh's ``lg=35`` (the paper's; trainer.py's argparse default is 20)
DEFAULT_EASY_MARGIN = True  # ``MagLinear(..., easy_margin=True)``: SoftmaxBuilder does not pass it
_NORM_EPS = 1e-12  # inside the square root: a zero embedding gets a zero (not NaN) gradient through the clamp


def check_magface_parameters(owner: str, s=DEFAULT_S, l_a=DEFAULT_L_A, u_a=DEFAULT_U_A, l_m=DEFAULT_L_M,
                             u_m=DEFAULT_U_M, lambda_g=DEFAULT_LAMBDA_G, easy_margin=DEFAULT_EASY_MARGIN) -> dict:
    """MagFace's hyper-parameters, checked: s > 0, 0 < l_a < u_a, 0 <= l_m <= u_m < pi, lambda_g >= 0.

    Example:
    >>> check_magface_parameters("MagFaceHead")
    {'s': 64.0, 'l_a': 10.0, 'u_a': 110.0, 'l_m': 0.45, 'u_m': 0.8, 'lambda_g': 35.0, 'easy_margin': True}
    """
    l_a = _validation.check_number(owner, "l_a", l_a, low=0.0, low_open=True)
    u_a = _validation.check_number(owner, "u_a", u_a, low=l_a, low_open=True)
    l_m = _validation.check_number(owner, "l_m", l_m, low=0.0, high=math.pi, high_open=True)
    u_m = _validation.check_number(owner, "u_m", u_m, low=l_m, high=math.pi, high_open=True)
    return {"s": _validation.check_scale(owner, s), "l_a": l_a, "u_a": u_a, "l_m": l_m, "u_m": u_m,
            "lambda_g": _validation.check_number(owner, "lambda_g", lambda_g, low=0.0),
            "easy_margin": _validation.check_bool(owner, "easy_margin", easy_margin)}


def magnitude(x, l_a: float = DEFAULT_L_A, u_a: float = DEFAULT_U_A):
    """``a = clamp(|x|, l_a, u_a)`` per row (batch,), float32, with its gradient (the code's ``x_norm``: not detached).

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> ops.convert_to_numpy(magnitude(np.array([[3.0, 4.0], [60.0, 80.0], [0.0, 1.0]], "float32")))
    array([ 10., 100.,  10.], dtype=float32)
    """
    x = ops.cast(x, "float32")
    return ops.clip(ops.sqrt(ops.sum(ops.square(x), axis=-1) + _NORM_EPS), l_a, u_a)


def magface_margin(a, l_a: float = DEFAULT_L_A, u_a: float = DEFAULT_U_A, l_m: float = DEFAULT_L_M,
                   u_m: float = DEFAULT_U_M):
    """The linear margin ``m(a) = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m`` (the code's ``_margin``)."""
    return (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m


def magface_target(cos_theta_y, margin, easy_margin: bool = DEFAULT_EASY_MARGIN):
    """MagFace's target cosine with a per-sample margin (batch,), as ``MagLinear.forward``.

    Formula:
    ```
    easy margin:  cos(theta_y + m)        if cos(theta_y) > 0,            else cos(theta_y)
    otherwise:    cos(theta_y + m)        if cos(theta_y) > cos(pi - m),  else cos(theta_y) - m sin(m)
    ```
    ``cos(theta + m)`` is ``cos*cos(m) - sin*sin(m)`` on the clamped cosine (``sin = sqrt((1 - c)(1 + c))``);
    the code's ``sin(pi - m) * m`` is ``m sin(m)``.

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> c, m = np.array([0.5, -0.5, -0.9], "float32"), np.array([0.5, 0.5, 0.5], "float32")
    >>> np.round(ops.convert_to_numpy(magface_target(c, m)), 4)  # cos(pi/3 + 0.5); the others as they are
    array([ 0.0236, -0.5   , -0.9   ], dtype=float32)
    >>> np.round(ops.convert_to_numpy(magface_target(c, m, easy_margin=False)), 4)
    array([ 0.0236, -0.854 , -1.1397], dtype=float32)
    """
    cos_theta_y = ops.cast(cos_theta_y, "float32")
    cos = clamp_cos(cos_theta_y)
    cos_theta_plus_m = cos * ops.cos(margin) - sin_from_cos(cos) * ops.sin(margin)
    if easy_margin:
        return ops.where(cos_theta_y > 0.0, cos_theta_plus_m, cos_theta_y)
    threshold = ops.cos(math.pi - margin)
    return ops.where(cos_theta_y > threshold, cos_theta_plus_m, cos_theta_y - margin * ops.sin(margin))


def magface_regularizer(a, u_a: float = DEFAULT_U_A):
    """``g(a) = a / u_a^2 + 1 / a`` per sample (the code's ``calc_loss_G`` before its mean).

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> np.round(ops.convert_to_numpy(magface_regularizer(np.array([10.0, 110.0], "float32"))), 5)
    array([0.10083, 0.01818], dtype=float32)
    """
    return a / (u_a * u_a) + 1.0 / a


def min_lambda_g(s: float = DEFAULT_S, l_a: float = DEFAULT_L_A, u_a: float = DEFAULT_U_A, l_m: float = DEFAULT_L_M,
                 u_m: float = DEFAULT_U_M) -> float:
    """The smallest ``lambda_g`` for which the paper's loss has a unique optimal magnitude (trainer.py's check,
    which only prints a warning): ``s * k * u_a^2 * l_a^2 / (u_a^2 - l_a^2)``, ``k = (u_m - l_m) / (u_a - l_a)``.

    Example:
    >>> round(min_lambda_g(), 2)  # the defaults' lambda_g = 35 is above it; trainer.py's default 20 is not
    22.59
    """
    k = (u_m - l_m) / (u_a - l_a)
    return s * k * u_a**2 * l_a**2 / (u_a**2 - l_a**2)
