"""SphereFace A-Softmax (Liu et al. 2017, arXiv 1704.08063, Eq. 7) with the Caffe layer's lambda annealing.

The objective's one definition: psi and the target function, the default hyper-parameters (m = 4 and the
annealing schedule of the released prototxt: base 1000, gamma 0.12, power 1, lambda_min 5; s = 30 and a
fixed lambda = 0 for the feature-normalized loss) and their checks, used by ``SphereFaceHead``,
``SphereFaceLoss`` and ``sphereface_loss``.
"""

from __future__ import annotations

import math

from keras import ops

from keras_margin import _validation
from keras_margin.margins import _clamp

DEFAULT_M = 4
DEFAULT_S = 30.0
DEFAULT_LAMBDA = 0.0  # the feature-normalized loss' fixed lambda (pytorch-metric-learning's convention)
DEFAULT_BASE = 1000.0
DEFAULT_GAMMA = 0.12
DEFAULT_POWER = 1.0
DEFAULT_LAMBDA_MIN = 5.0

# cos(m * theta) as a polynomial in c = cos(theta) and s2 = sin^2(theta) = (1 - c)(1 + c). These are the
# Chebyshev polynomials of the Caffe layer rewritten with c^2 = 1 - s2 (1: c; 2: 2c^2 - 1 = 1 - 2 s2;
# 3: 4c^3 - 3c = c(1 - 4 s2); 4: 8c^4 - 8c^2 + 1 = 1 - 8 c^2 s2): the same functions of c, but near |c| = 1 they
# add a small term to +-1 instead of cancelling terms of size 8, and s2 keeps its relative accuracy there.
_COS_M_THETA = {
    1: lambda c, s2: c,
    2: lambda c, s2: 1.0 - 2.0 * s2,
    3: lambda c, s2: c * (1.0 - 4.0 * s2),
    4: lambda c, s2: 1.0 - 8.0 * ops.square(c) * s2,
}
SUPPORTED_M = tuple(_COS_M_THETA)


def sphereface_psi(cos_theta_y, m: int):
    """The monotone angular margin function of A-Softmax.

    Formula:
    ```
    psi(theta) = (-1)^k * cos(m * theta) - 2k,   k = floor(m * theta / pi) in [0, m - 1]
    ```
    ``k`` comes from comparing ``cos(theta)`` with ``cos(j * pi / m)``, as in the original Caffe layer: no
    arccos on this path. ``cos(m * theta)`` is the Caffe layer's Chebyshev polynomial of ``c = cos(theta)``
    (m = 4: ``8c^4 - 8c^2 + 1``) written in an equal, better-conditioned form on ``s2 = (1 - c)(1 + c)``
    (``sin^2``, accurate in float32 near ``|c| = 1``): m = 2: ``1 - 2 s2``, m = 3: ``c (1 - 4 s2)``,
    m = 4: ``1 - 8 c^2 s2``. Same function of ``c``; near ``|c| = 1`` the Chebyshev form cancels terms of
    size 8, and in float32 the loss gradient there was off by up to 1e-5 relative to float64; with this form
    it stays within 2.5e-6 (tests/test_edge_precision.py).

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> c = np.array([1.0, 0.5, 0.0, -1.0], "float32")
    >>> np.round(ops.convert_to_numpy(sphereface_psi(c, 4)), 4)  # theta = 0, pi/3, pi/2, pi
    array([ 1. , -1.5, -3. , -7. ], dtype=float32)
    """
    m = check_sphereface_m("sphereface_psi", m)
    cos_m_theta = _COS_M_THETA[m](cos_theta_y, _clamp.sin_squared(cos_theta_y))
    k = ops.zeros_like(cos_theta_y)
    for j in range(1, m):
        k = k + ops.cast(cos_theta_y <= math.cos(j * math.pi / m), cos_theta_y.dtype)
    sign = 1.0 - 2.0 * ops.mod(k, 2.0)
    return sign * cos_m_theta - 2.0 * k


def sphereface_target(cos_theta_y, m: int, lambda_):
    """Annealed target cosine of the Caffe ``MarginInnerProduct`` layer: ``(lambda * cos + psi) / (1 + lambda)``.

    The label-aware head multiplies it by ``|x|``; the feature-normalized loss by a fixed ``s``.
    """
    return (lambda_ * cos_theta_y + sphereface_psi(cos_theta_y, m)) / (1.0 + lambda_)


def sphereface_lambda(iteration, base: float, gamma: float, power: float, lambda_min: float):
    """Annealing schedule ``lambda = max(lambda_min, base * (1 + gamma * iteration)^(-power))``."""
    iteration = ops.cast(iteration, "float32")
    return ops.maximum(lambda_min, base * ops.power(1.0 + gamma * iteration, -power))


def check_sphereface_m(owner: str, m) -> int:
    """SphereFace's margin must be an integer in ``SUPPORTED_M`` (1..4); returned as an int."""
    if isinstance(m, bool) or m not in SUPPORTED_M:
        raise ValueError(f"{owner}: `m` must be an integer in {SUPPORTED_M}; got {m!r}.")
    return int(m)


def check_sphereface_parameters(owner: str, m=DEFAULT_M, s=DEFAULT_S, lambda_=DEFAULT_LAMBDA) -> dict:
    """The feature-normalized loss' hyper-parameters, checked: m in 1..4, s > 0, lambda_ >= 0.

    Example:
    >>> check_sphereface_parameters("SphereFaceLoss", 4, 30, 0)
    {'m': 4, 's': 30.0, 'lambda_': 0.0}
    """
    return {"m": check_sphereface_m(owner, m), "s": _validation.check_scale(owner, s),
            "lambda_": _validation.check_number(owner, "lambda_", lambda_, low=0.0)}


def check_sphereface_schedule(owner: str, base=DEFAULT_BASE, gamma=DEFAULT_GAMMA, power=DEFAULT_POWER,
                              lambda_min=DEFAULT_LAMBDA_MIN) -> dict:
    """The annealing schedule's parameters, checked: base > 0, gamma >= 0, power >= 0, lambda_min >= 0.

    Example:
    >>> check_sphereface_schedule("SphereFaceHead")
    {'base': 1000.0, 'gamma': 0.12, 'power': 1.0, 'lambda_min': 5.0}
    """
    return {"base": _validation.check_number(owner, "base", base, low=0.0, low_open=True),
            "gamma": _validation.check_number(owner, "gamma", gamma, low=0.0),
            "power": _validation.check_number(owner, "power", power, low=0.0),
            "lambda_min": _validation.check_number(owner, "lambda_min", lambda_min, low=0.0)}
