"""The cosine clamp used before any angle or ``sin(theta)`` (their derivatives are infinite at +-1), and the
well-conditioned ``sin(theta)`` and ``theta`` built on it that every angular objective shares.

In float32, ``1 - c*c`` loses accuracy as ``|c| -> 1``: ``c*c`` is rounded to the float32 spacing of 6e-8 just
below 1, an absolute error of up to 3e-8 on a difference that is only ``2 (1 - |c|)``: 5e-5 relative at
``1 - |c| = 3e-4``. ``(1 - c) * (1 + c)`` is accurate there: near ``c = 1``, ``1 - c`` is exact (Sterbenz) and
``1 + c`` carries a relative rounding error of 6e-8 at most (symmetrically near -1). The same holds for the
derivative, ``-(1 + c) + (1 - c)``, that autodiff forms from it.
"""

from keras import ops

# Largest float32 gap below 1.0 is 6e-8; 1e-7 keeps 1 - eps strictly inside (-1, 1) in float32.
COS_EPS = 1e-7


def clamp_cos(cos_theta):
    """Clamp cosines to ``[-1 + COS_EPS, 1 - COS_EPS]`` so angle gradients stay finite."""
    return ops.clip(cos_theta, -1.0 + COS_EPS, 1.0 - COS_EPS)


def sin_squared(cos_theta):
    """``sin^2(theta) = (1 - c)(1 + c)``: the same as ``1 - c^2``, without its cancellation near ``|c| = 1``."""
    return (1.0 - cos_theta) * (1.0 + cos_theta)


def sin_from_cos(clamped_cos):
    """``sin(theta) = sqrt((1 - c)(1 + c))`` of a clamped cosine (theta in [0, pi], so sin >= 0)."""
    return ops.sqrt(sin_squared(clamped_cos))


def angle_from_cos(cos_theta):
    """``theta = arccos(clamp(c))``, computed as ``atan2(sqrt((1 - c)(1 + c)), c)``.

    Same value as arccos; the gradient differs in how it is formed: autodiff of ``arccos`` divides by
    ``sqrt(1 - c*c)`` (TensorFlow's and JAX's rule), which in float32 is off by up to 2.5e-5 relative within
    1e-3 of ``|c| = 1``. Through ``atan2`` and ``sqrt`` every term of ``-1 / sin(theta)`` keeps its relative
    accuracy (no subtraction of nearly equal numbers), so the angle's gradient is good to a few float32 ulps
    up to the clamp.
    """
    cos = clamp_cos(cos_theta)
    return ops.arctan2(sin_from_cos(cos), cos)
