"""Margin-softmax losses on cosines: ``loss(y_true, cos_theta)`` for heads that output cos(theta).

Each objective is a plain function ``(y_true, cos_theta, **hyper-parameters)`` plus a thin
``keras.losses.Loss`` class around it (reduction, name, ``get_config``), as in Keras' own losses.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_margin import _validation
from keras_margin.core import margin_softmax_loss
from keras_margin.margins import (
    amsoftmax_target,
    arcface_target,
    combined_margin_target,
    normface_scale_lower_bound,
    normface_target,
    sphereface_target,
    x2softmax_target,
)
from keras_margin.margins.sphereface import SUPPORTED_M
from keras_margin.margins.x2softmax import check_x2softmax_parameters

try:  # Keras' symbolic build (e.g. under tf.distribute) feeds the loss labels it made itself.
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope as _in_keras_symbolic_build
except ImportError:  # pragma: no cover - a Keras without the private module: always check
    def _in_keras_symbolic_build() -> bool:
        return False

__all__ = [
    "MarginLoss",
    "NormFaceLoss",
    "SphereFaceLoss",
    "AMSoftmaxLoss",
    "X2SoftmaxLoss",
    "ArcFaceLoss",
    "CombinedMarginLoss",
    "normface_loss",
    "sphereface_loss",
    "amsoftmax_loss",
    "x2softmax_loss",
    "arcface_loss",
    "combined_margin_loss",
    "normface_scale_lower_bound",
]


# --------------------------------------------------------------------------------------------------
# Functions: per-sample losses, shape (batch,).


def normface_loss(y_true, cos_theta, s: float = 30.0):
    """NormFace: softmax cross-entropy over ``s * cos(theta_j)``."""
    return margin_softmax_loss("normface_loss", y_true, cos_theta, normface_target, s)


def sphereface_loss(y_true, cos_theta, m: int = 4, s: float = 30.0, lambda_: float = 0.0):
    """Feature-normalized A-Softmax: ``z_y = s * (lambda * cos + psi(theta_y)) / (1 + lambda)``."""
    return margin_softmax_loss(
        "sphereface_loss", y_true, cos_theta, lambda c: sphereface_target(c, m, lambda_), s
    )


def amsoftmax_loss(y_true, cos_theta, s: float = 30.0, m: float = 0.35):
    """AM-Softmax / CosFace: ``z_y = s * (cos(theta_y) - m)``."""
    return margin_softmax_loss("amsoftmax_loss", y_true, cos_theta, lambda c: amsoftmax_target(c, m), s)


def x2softmax_loss(y_true, cos_theta, s: float = 64.0, a: float = -0.9, h: float = 0.0, k: float = 0.65,
                   straight_through: bool = False):
    """X2-Softmax: ``z_y = s * (a * (theta_y - h)^2 + k)``."""
    return margin_softmax_loss(
        "x2softmax_loss", y_true, cos_theta, lambda c: x2softmax_target(c, a, h, k, straight_through), s
    )


def arcface_loss(y_true, cos_theta, s: float = 64.0, m: float = 0.5):
    """ArcFace (InsightFace convention): ``z_y = s * cos(theta_y + m)``, ``s * (cos - m sin m)`` past pi."""
    return margin_softmax_loss("arcface_loss", y_true, cos_theta, lambda c: arcface_target(c, m), s)


def combined_margin_loss(y_true, cos_theta, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0):
    """Combined margin: ``z_y = s * (cos(m1 * theta_y + m2) - m3)``."""
    return margin_softmax_loss(
        "combined_margin_loss", y_true, cos_theta, lambda c: combined_margin_target(c, m1, m2, m3), s
    )


# --------------------------------------------------------------------------------------------------
# Classes: what model.compile takes.


class MarginLoss(keras.losses.Loss):
    """Base of the margin losses: checks the labels, then calls the objective's function.

    Subclasses set ``fn`` (the per-sample function above) and pass their hyper-parameters to
    ``__init__``; those hyper-parameters are what ``get_config`` returns.

    Labels: integer class ids of shape (batch,) or (batch, 1), or one-hot (batch, C). Float class ids
    are refused (``ValueError``) rather than silently truncated.
    """

    fn = None

    def __init__(self, *, reduction: str | None = "sum_over_batch_size", name: str | None = None,
                 dtype=None, **hyper_parameters):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.hyper_parameters = hyper_parameters

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Keras casts y_true to the loss dtype before ``call``: check the labels as the user gave them.
        if not hasattr(y_true, "dtype"):
            y_true = ops.convert_to_tensor(y_true)
        num_classes = y_pred.shape[-1] if hasattr(y_pred, "shape") else None
        # Keras' own symbolic build of the compiled loss passes float64 placeholder labels: the user's
        # labels are checked when real data arrives, so only the shape is checked there.
        if num_classes is not None:
            _validation.label_kind(type(self).__name__, y_true, num_classes,
                                   check_dtype=not _in_keras_symbolic_build())
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def call(self, y_true, y_pred):
        num_classes = y_pred.shape[-1]
        if _validation.label_kind(type(self).__name__, y_true, num_classes, check_dtype=False) == "sparse":
            y_true = ops.cast(y_true, "int32")
        return type(self).fn(y_true, y_pred, **self.hyper_parameters)

    def get_config(self):
        return {"name": self.name, "reduction": self.reduction, **self.hyper_parameters}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _scale(owner: str, s) -> float:
    return _validation.check_number(owner, "s", s, low=0.0, low_open=True)


@keras.saving.register_keras_serializable(package="keras_margin")
class NormFaceLoss(MarginLoss):
    """NormFace normalized softmax (Wang et al. 2017, arXiv 1704.06369, Eq. 6 with fixed s).

    Formula:
    ```
    z_j = s * cos(theta_j)                      for all j, no margin
    loss = logsumexp(z) - z_y
    ```

    Args:
        s: scale (default 30.0). ``normface_scale_lower_bound(C, P)`` gives the paper's lower bound.
        reduction, name: as for any ``keras.losses.Loss``.

    Example:
    >>> import numpy as np
    >>> loss = NormFaceLoss(s=30.0)
    >>> cos = np.array([[0.9, 0.1], [0.2, 0.8]], "float32")
    >>> float(loss(np.array([0, 1]), cos)) < 1e-6
    True
    """

    fn = staticmethod(normface_loss)

    def __init__(self, s: float = 30.0, *, reduction="sum_over_batch_size", name="normface_loss", dtype=None):
        super().__init__(s=_scale("NormFaceLoss", s), reduction=reduction, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="keras_margin")
class SphereFaceLoss(MarginLoss):
    """Feature-normalized A-Softmax (SphereFace, Liu et al. 2017, arXiv 1704.08063, Eq. 7 with |x| -> s).

    Formula:
    ```
    psi(theta) = (-1)^k cos(m theta) - 2k,  k = floor(m theta / pi)
    z_y = s * (lambda * cos(theta_y) + psi(theta_y)) / (1 + lambda)
    z_j = s * cos(theta_j)                                  (j != y)
    ```

    How it differs from the original: the Caffe ``MarginInnerProduct`` layer scales by the feature norm
    ``|x|`` (features are not normalized) and anneals ``lambda`` over iterations. A loss that sees only
    cosines cannot do either, so it uses a fixed scale ``s`` and a fixed ``lambda`` (default 0, the
    pytorch-metric-learning convention). For the exact original use ``SphereFaceHead`` in its
    label-aware form ``head([x, labels])``.

    Args:
        m: integer angular margin, 1 to 4 (default 4).
        s: scale replacing |x| (default 30.0).
        lambda_: fixed blend with the plain cosine, >= 0 (default 0.0).

    Example:
    >>> import numpy as np
    >>> loss = SphereFaceLoss(m=4, s=30.0)
    >>> value = loss(np.array([0]), np.array([[0.99, 0.0]], "float32"))
    """

    fn = staticmethod(sphereface_loss)

    def __init__(self, m: int = 4, s: float = 30.0, lambda_: float = 0.0, *, reduction="sum_over_batch_size",
                 name="sphereface_loss", dtype=None):
        if isinstance(m, bool) or m not in SUPPORTED_M:
            raise ValueError(f"SphereFaceLoss: `m` must be an integer in {SUPPORTED_M}; got {m!r}.")
        lambda_ = _validation.check_number("SphereFaceLoss", "lambda_", lambda_, low=0.0)
        super().__init__(m=int(m), s=_scale("SphereFaceLoss", s), lambda_=lambda_, reduction=reduction,
                         name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="keras_margin")
class AMSoftmaxLoss(MarginLoss):
    """AM-Softmax (Wang et al. 2018, arXiv 1801.05599, Eq. 4) = CosFace's LMCL (arXiv 1801.09414, Eq. 4).

    Formula:
    ```
    z_y = s * (cos(theta_y) - m),  z_j = s * cos(theta_j)  (j != y)
    loss = logsumexp(z) - z_y
    ```

    Args:
        s: scale (default 30.0, the released AM-Softmax model).
        m: additive cosine margin in [0, 1] (default 0.35).

    Example:
    >>> import numpy as np
    >>> loss = AMSoftmaxLoss(s=30.0, m=0.35)
    >>> value = loss(np.array([1, 0]), np.array([[0.1, 0.9], [0.7, 0.2]], "float32"))
    """

    fn = staticmethod(amsoftmax_loss)

    def __init__(self, s: float = 30.0, m: float = 0.35, *, reduction="sum_over_batch_size",
                 name="amsoftmax_loss", dtype=None):
        m = _validation.check_number("AMSoftmaxLoss", "m", m, low=0.0, high=1.0)
        super().__init__(s=_scale("AMSoftmaxLoss", s), m=m, reduction=reduction, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="keras_margin")
class X2SoftmaxLoss(MarginLoss):
    """X2-Softmax (Xu et al. 2023, arXiv 2312.05281, Eq. 8): quadratic, angle-adaptive target logit.

    Formula:
    ```
    theta_y = arccos(clip(cos_theta_y, -1 + 1e-7, 1 - 1e-7))
    z_y = s * (a * (theta_y - h)^2 + k),  z_j = s * cos(theta_j)  (j != y)
    ```

    Args:
        s: scale (default 64.0), a: curvature, < 0 (default -0.9), h: vertex angle in [0, pi)
            (default 0.0), k: vertex value in [-1, 1] (default 0.65): the authors' released defaults.
        straight_through: when True the gradient through the margin is the identity w.r.t. cos(theta_y),
            as in the authors' code (margin under ``no_grad``); default False: the analytic gradient
            ``s * 2a (theta_y - h) * (-1 / sin(theta_y))``, finite thanks to the clamp.

    Example:
    >>> import numpy as np
    >>> loss = X2SoftmaxLoss()
    >>> value = loss(np.array([0]), np.array([[0.5, -0.2]], "float32"))
    """

    fn = staticmethod(x2softmax_loss)

    def __init__(self, s: float = 64.0, a: float = -0.9, h: float = 0.0, k: float = 0.65,
                 straight_through: bool = False, *, reduction="sum_over_batch_size", name="x2softmax_loss",
                 dtype=None):
        a, h, k, straight_through = check_x2softmax_parameters("X2SoftmaxLoss", a, h, k, straight_through)
        super().__init__(s=_scale("X2SoftmaxLoss", s), a=a, h=h, k=k, straight_through=straight_through,
                         reduction=reduction, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="keras_margin")
class ArcFaceLoss(MarginLoss):
    """ArcFace additive angular margin (Deng et al. 2019, arXiv 1801.07698, Eq. 3), InsightFace convention.

    Formula:
    ```
    z_y = s * cos(theta_y + m)            while theta_y + m <= pi
    z_y = s * (cos(theta_y) - m sin(m))   otherwise (monotone fallback)
    z_j = s * cos(theta_j)                (j != y)
    ```

    Args:
        s: scale (default 64.0). m: angular margin in radians, [0, pi) (default 0.5).

    Example:
    >>> import numpy as np
    >>> loss = ArcFaceLoss(s=64.0, m=0.5)
    >>> value = loss(np.array([0]), np.array([[0.8, 0.1]], "float32"))
    """

    fn = staticmethod(arcface_loss)

    def __init__(self, s: float = 64.0, m: float = 0.5, *, reduction="sum_over_batch_size", name="arcface_loss",
                 dtype=None):
        m = _validation.check_number("ArcFaceLoss", "m", m, low=0.0, high=math.pi, high_open=True)
        super().__init__(s=_scale("ArcFaceLoss", s), m=m, reduction=reduction, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="keras_margin")
class CombinedMarginLoss(MarginLoss):
    """InsightFace's combined margin (ArcFace paper, arXiv 1801.07698, Eq. 4).

    Formula:
    ```
    z_y = s * (cos(m1 * theta_y + m2) - m3),  z_j = s * cos(theta_j)  (j != y)
    ```
    (1, 0, 0) is NormFace, (1, 0, 0.35) AM-Softmax, (1, 0.5, 0) ArcFace while theta_y + 0.5 <= pi (this
    loss applies the plain formula everywhere; ``ArcFaceLoss`` adds InsightFace's monotone fallback).

    Args:
        s: scale (default 64.0). m1: multiplicative angular margin, > 0 (default 1.0).
        m2: additive angular margin, [0, pi) (default 0.5). m3: additive cosine margin, [0, 1] (default 0.0).

    Example:
    >>> import numpy as np
    >>> loss = CombinedMarginLoss(s=64.0, m1=1.0, m2=0.3, m3=0.2)
    >>> value = loss(np.array([0]), np.array([[0.8, 0.1]], "float32"))
    """

    fn = staticmethod(combined_margin_loss)

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0, *,
                 reduction="sum_over_batch_size", name="combined_margin_loss", dtype=None):
        owner = "CombinedMarginLoss"
        m1 = _validation.check_number(owner, "m1", m1, low=0.0, low_open=True)
        m2 = _validation.check_number(owner, "m2", m2, low=0.0, high=math.pi, high_open=True)
        m3 = _validation.check_number(owner, "m3", m3, low=0.0, high=1.0)
        super().__init__(s=_scale(owner, s), m1=m1, m2=m2, m3=m3, reduction=reduction, name=name, dtype=dtype)
