"""X2-Softmax (Xu et al. 2023, arXiv 2312.05281, Eq. 8): a quadratic, angle-adaptive target logit.

The objective's one definition: target function, default hyper-parameters (the authors' released training
command: s = 64, a = -0.9, h = 0, k = 0.65) and their checks, used by ``X2SoftmaxHead``, ``X2SoftmaxLoss``
and ``x2softmax_loss``.
"""

from __future__ import annotations

import math

from keras import ops

from keras_margin import _validation
from keras_margin.margins._clamp import angle_from_cos

DEFAULT_S = 64.0
DEFAULT_A = -0.9
DEFAULT_H = 0.0
DEFAULT_K = 0.65
DEFAULT_STRAIGHT_THROUGH = False


def x2softmax_target(cos_theta_y, a: float, h: float, k: float, straight_through: bool = False):
    """Quadratic target ``z_y / s = a * (theta_y - h)^2 + k`` with ``theta_y = arccos(cos_theta_y)``.

    With ``straight_through=True`` the value is the same but the gradient w.r.t. ``cos_theta_y`` is the
    identity, as in the authors' PyTorch code (margin computed under ``no_grad``). The default is the
    analytic gradient ``2a(theta_y - h) * (-1 / sin(theta_y))``, finite thanks to the cosine clamp. The angle
    is arccos' value computed as ``atan2(sqrt((1 - cos)(1 + cos)), cos)``: autodiff of arccos divides by
    ``sqrt(1 - cos^2)``, which in float32 puts a 2.5e-5 relative error in the loss gradient within 1e-3 of
    ``cos = +-1``; this form keeps it at float32 rounding.

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> c = np.array([1.0, 0.0, -1.0], "float32")  # theta = 0 (clamped: 4.9e-4), pi/2, pi
    >>> np.round(ops.convert_to_numpy(x2softmax_target(c, -0.9, 0.0, 0.65)), 4)
    array([ 0.65  , -1.5707, -8.2299], dtype=float32)
    """
    theta = angle_from_cos(cos_theta_y)
    target = a * ops.square(theta - h) + k
    if straight_through:
        return cos_theta_y + ops.stop_gradient(target - cos_theta_y)
    return target


def check_x2softmax_parameters(owner: str, s=DEFAULT_S, a=DEFAULT_A, h=DEFAULT_H, k=DEFAULT_K,
                               straight_through=DEFAULT_STRAIGHT_THROUGH) -> dict:
    """X2-Softmax's hyper-parameters, checked: s > 0, a < 0 (a downward parabola), h in [0, pi), k in [-1, 1].

    Example:
    >>> check_x2softmax_parameters("X2SoftmaxLoss", 64, -0.9, 0, 0.65, False)
    {'s': 64.0, 'a': -0.9, 'h': 0.0, 'k': 0.65, 'straight_through': False}
    """
    params = {"s": _validation.check_scale(owner, s),
              "a": _validation.check_number(owner, "a", a, high=0.0, high_open=True),
              "h": _validation.check_number(owner, "h", h, low=0.0, high=math.pi, high_open=True),
              "k": _validation.check_number(owner, "k", k, low=-1.0, high=1.0)}
    params["straight_through"] = _validation.check_bool(owner, "straight_through", straight_through)
    return params
