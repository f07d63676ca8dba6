"""keras-margin: margin-based softmax heads and losses for face recognition and metric learning in Keras 3.

``keras_margin.layers`` holds the heads (also importable from here), ``keras_margin.losses`` the losses.
"""

from keras_margin import layers, losses
from keras_margin.layers import (
    AMSoftmaxHead,
    ArcFaceHead,
    CosineDense,
    MarginHead,
    NormFaceHead,
    SphereFaceHead,
    X2SoftmaxHead,
)
from keras_margin.losses import normface_scale_lower_bound
from keras_margin.version import __version__

__all__ = [
    "AMSoftmaxHead",
    "ArcFaceHead",
    "CosineDense",
    "MarginHead",
    "NormFaceHead",
    "SphereFaceHead",
    "X2SoftmaxHead",
    "layers",
    "losses",
    "normface_scale_lower_bound",
    "__version__",
]
