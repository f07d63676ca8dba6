"""Target-logit functions, one objective per module: how each objective changes the target cosine.

Everything else (cosines, labels, scale, float32 log-sum-exp) lives once in ``keras_margin.core``;
heads and losses both call these functions, so each formula is written exactly once.
"""

from keras_margin.margins.amsoftmax import amsoftmax_target
from keras_margin.margins.arcface import arcface_target, combined_margin_target
from keras_margin.margins.normface import normface_scale_lower_bound, normface_target
from keras_margin.margins.sphereface import (
    sphereface_lambda,
    sphereface_psi,
    sphereface_target,
)
from keras_margin.margins.x2softmax import x2softmax_target

__all__ = [
    "amsoftmax_target",
    "arcface_target",
    "combined_margin_target",
    "normface_scale_lower_bound",
    "normface_target",
    "sphereface_lambda",
    "sphereface_psi",
    "sphereface_target",
    "x2softmax_target",
]
