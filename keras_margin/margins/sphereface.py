"""SphereFace A-Softmax (Liu et al. 2017, arXiv 1704.08063, Eq. 7) with the Caffe layer's lambda annealing."""

from __future__ import annotations

import math

from keras import ops

# cos(m * theta) as a polynomial in cos(theta) (Chebyshev polynomials of the first kind).
_CHEBYSHEV = {
    1: lambda c: c,
    2: lambda c: 2.0 * c**2 - 1.0,
    3: lambda c: 4.0 * c**3 - 3.0 * c,
    4: lambda c: 8.0 * c**4 - 8.0 * c**2 + 1.0,
}
SUPPORTED_M = tuple(_CHEBYSHEV)


def sphereface_psi(cos_theta_y, m: int):
    """The monotone angular margin function of A-Softmax.

    Formula:
    ```
    psi(theta) = (-1)^k * cos(m * theta) - 2k,   k = floor(m * theta / pi) in [0, m - 1]
    ```
    ``cos(m * theta)`` comes from the Chebyshev polynomial of ``cos(theta)`` and ``k`` from comparing
    ``cos(theta)`` with ``cos(j * pi / m)``, as in the original Caffe layer: no arccos on this path.
    """
    if m not in _CHEBYSHEV:
        raise ValueError(f"SphereFace `m` must be one of {SUPPORTED_M}; got {m!r}.")
    cos_m_theta = _CHEBYSHEV[m](cos_theta_y)
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
