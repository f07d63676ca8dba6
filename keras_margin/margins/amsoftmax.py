"""AM-Softmax (Wang et al. 2018, arXiv 1801.05599, Eq. 4) = CosFace's large margin cosine loss."""

from __future__ import annotations


def amsoftmax_target(cos_theta_y, m: float):
    """Additive cosine margin: ``z_y / s = cos(theta_y) - m``."""
    return cos_theta_y - m
