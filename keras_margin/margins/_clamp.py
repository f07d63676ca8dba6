"""The cosine clamp used before any arccos or sqrt(1 - cos^2) (their derivatives are infinite at +-1)."""

from keras import ops

# Largest float32 gap below 1.0 is 6e-8; 1e-7 keeps 1 - eps strictly inside (-1, 1) in float32.
COS_EPS = 1e-7


def clamp_cos(cos_theta):
    """Clamp cosines to ``[-1 + COS_EPS, 1 - COS_EPS]`` so angle gradients stay finite."""
    return ops.clip(cos_theta, -1.0 + COS_EPS, 1.0 - COS_EPS)
