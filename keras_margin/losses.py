"""Margin-softmax losses on cosines: ``loss(y_true, cos_theta)`` for heads that output cos(theta).

Each objective is a plain function ``(y_true, cos_theta, **hyper-parameters)`` plus a thin
``keras.losses.Loss`` class around it (reduction, name, ``get_config``), as in Keras' own losses. The
defaults and checks of the hyper-parameters are the objective's own, in ``keras_margin.margins``; the
classes keep them as attributes (``AMSoftmaxLoss().m == 0.35``), as Keras' losses do.
"""

from __future__ import annotations

import threading
import weakref

import keras
from keras import ops

from keras_margin import _keras_private, _validation
from keras_margin.core import agent_loss, margin_softmax_loss
from keras_margin.margins import (
    amsoftmax,
    amsoftmax_target,
    arcface,
    arcface_target,
    combined_margin_target,
    normface,
    normface_agents,
    normface_scale_lower_bound,
    normface_target,
    sphereface,
    sphereface_target,
    x2softmax,
    x2softmax_target,
)

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
    "CContrastiveLoss",
    "CTripletLoss",
    "c_contrastive_loss",
    "c_triplet_loss",
    "normface_scale_lower_bound",
    "HeadLoss",
]

# Shared docstring parts, substituted into each class's and function's docstring (so help() shows them).
_FUNCTION_ARGS = """\
        y_true: Integer class ids of shape `(batch,)` or `(batch, 1)`, or one-hot labels of shape
            `(batch, num_classes)`.
        cos_theta: Cosines of shape `(batch, num_classes)`, the output of a head called on embeddings
            alone (e.g. `AMSoftmaxHead(num_classes)(x)` or `CosineDense`)."""
_FUNCTION_RETURNS = """\
    Returns:
        The per-sample loss, float32 of shape `(batch,)`; NaN for a row whose class id is outside
        `[0, num_classes)` where the ids cannot be checked (under XLA)."""
_LOSS_ARGS = """\
        reduction: Type of reduction to apply to the loss: `"sum_over_batch_size"`, `"sum"`, `"mean"`,
            `"mean_with_sample_weight"` or `None` (the per-sample losses). Defaults to
            `"sum_over_batch_size"`.
        name: Optional name for the loss instance. Defaults to `"{name}"`.
        dtype: The dtype of the loss's output (the computation itself is float32). Defaults to `None`,
            which means using `keras.backend.floatx()`."""
_LOSS_SHAPES = """\
    Call arguments:
        y_true: Integer class ids of shape `(batch,)` or `(batch, 1)`, or one-hot labels of shape
            `(batch, num_classes)`. Float class ids are refused (`ValueError`), not truncated.
        y_pred: The cosines of shape `(batch, num_classes)` from a head called on embeddings alone.
        sample_weight: Optional weights of shape `(batch,)`."""


def _document(obj, **parts):
    """Fill the ``{{part}}`` placeholders of ``obj.__doc__`` with the shared docstring parts."""
    doc = obj.__doc__
    for key, text in parts.items():
        doc = doc.replace("{{" + key + "}}", text)
    obj.__doc__ = doc
    return obj


def _function_doc(fn):
    return _document(fn, function_args=_FUNCTION_ARGS, returns=_FUNCTION_RETURNS)


def _loss_doc(cls):
    name = cls.__init__.__kwdefaults__["name"] or "<head name>_loss"
    return _document(cls, loss_args=_LOSS_ARGS.format(name=name), call_args=_LOSS_SHAPES)


# --------------------------------------------------------------------------------------------------
# Functions: per-sample losses, shape (batch,).


@_function_doc
def normface_loss(y_true, cos_theta, s: float = normface.DEFAULT_S):
    """NormFace: softmax cross-entropy over ``s * cos(theta_j)``, no margin.

    Formula:
    ```
    z_j = s * cos(theta_j)      for all j
    loss = logsumexp(z) - z_y
    ```

    Args:
{{function_args}}
        s: Float, the scale, > 0. Defaults to `30.0`.

{{returns}}

    Example:
    >>> import keras, numpy as np
    >>> loss = normface_loss(np.array([0, 1]), np.array([[0.8, 0.1], [0.3, 0.6]], "float32"), s=10.0)
    >>> np.round(keras.ops.convert_to_numpy(loss), 4)
    array([0.0009, 0.0486], dtype=float32)

    Reference:
        Wang et al., "NormFace: L2 Hypersphere Embedding for Face Verification", ACM MM 2017,
        arXiv:1704.06369 (Eq. 6). Authors' code: https://github.com/happynear/NormFace
    """
    params = normface.check_normface_parameters("normface_loss", s)
    return margin_softmax_loss("normface_loss", y_true, cos_theta, normface_target, params["s"])


@_function_doc
def sphereface_loss(y_true, cos_theta, m: int = sphereface.DEFAULT_M, s: float = sphereface.DEFAULT_S,
                    lambda_: float = sphereface.DEFAULT_LAMBDA):
    """Feature-normalized A-Softmax (SphereFace with ``|x|`` replaced by a fixed ``s``, fixed ``lambda``).

    Formula:
    ```
    psi(theta) = (-1)^k cos(m theta) - 2k,  k = floor(m theta / pi)
    z_y = s * (lambda * cos(theta_y) + psi(theta_y)) / (1 + lambda)
    z_j = s * cos(theta_j)                                  (j != y)
    ```

    Args:
{{function_args}}
        m: Integer angular margin, 1 to 4. Defaults to `4`.
        s: Float, the scale replacing the feature norm, > 0. Defaults to `30.0`.
        lambda_: Float, the fixed blend with the plain cosine, >= 0. Defaults to `0.0`.

{{returns}}

    Example:
    >>> import keras, numpy as np
    >>> loss = sphereface_loss(np.array([0]), np.array([[0.99, 0.0]], "float32"), m=4, s=30.0)
    >>> np.round(keras.ops.convert_to_numpy(loss), 4)
    array([0.], dtype=float32)

    Reference:
        Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017,
        arXiv:1704.08063 (Eq. 7). Authors' code: https://github.com/wy1iu/sphereface
    """
    params = sphereface.check_sphereface_parameters("sphereface_loss", m, s, lambda_)
    return margin_softmax_loss(
        "sphereface_loss", y_true, cos_theta,
        lambda c: sphereface_target(c, params["m"], params["lambda_"]), params["s"],
    )


@_function_doc
def amsoftmax_loss(y_true, cos_theta, s: float = amsoftmax.DEFAULT_S, m: float = amsoftmax.DEFAULT_M,
                   margin_rule: str = amsoftmax.DEFAULT_MARGIN_RULE):
    """AM-Softmax / CosFace: ``z_y = s * (cos(theta_y) - m)``.

    Formula:
    ```
    z_y = s * (cos(theta_y) - m),  z_j = s * cos(theta_j)  (j != y)
    loss = logsumexp(z) - z_y
    margin_rule="caffe": z_y = s * cos(theta_y) where cos(theta_y) <= m (the released Caffe layer)
    ```

    Args:
{{function_args}}
        s: Float, the scale, > 0. Defaults to `30.0`.
        m: Float, the additive cosine margin, in [0, 1]. Defaults to `0.35`.
        margin_rule: `"paper"` (Eq. 4, the margin everywhere) or `"caffe"` (the released
            `LabelSpecificAdd` layer: the margin only where `cos(theta_y) > m`, identity gradient).
            Defaults to `"paper"`.

{{returns}}

    Example:
    >>> import keras, numpy as np
    >>> cos = np.array([[0.8, 0.1], [0.3, 0.6]], "float32")
    >>> np.round(keras.ops.convert_to_numpy(amsoftmax_loss(np.array([0, 1]), cos)), 4)
    array([0.    , 1.7014], dtype=float32)
    >>> np.round(keras.ops.convert_to_numpy(amsoftmax_loss(np.array([1, 1]), cos, margin_rule="caffe")), 4)
    array([21.    ,  1.7014], dtype=float32)

    Reference:
        Wang et al., "Additive Margin Softmax for Face Verification", IEEE SPL 2018, arXiv:1801.05599
        (Eq. 4). Authors' code: https://github.com/happynear/AMSoftmax (the layer:
        `src/caffe/layers/label_specific_add.cpp` of https://github.com/happynear/caffe-windows, branch
        ms). The same loss is CosFace's large margin cosine loss (Wang et al., CVPR 2018,
        arXiv:1801.09414, Eq. 4).
    """
    params = amsoftmax.check_amsoftmax_parameters("amsoftmax_loss", s, m, margin_rule)
    return margin_softmax_loss("amsoftmax_loss", y_true, cos_theta,
                               lambda c: amsoftmax_target(c, params["m"], params["margin_rule"]), params["s"])


@_function_doc
def x2softmax_loss(y_true, cos_theta, s: float = x2softmax.DEFAULT_S, a: float = x2softmax.DEFAULT_A,
                   h: float = x2softmax.DEFAULT_H, k: float = x2softmax.DEFAULT_K,
                   straight_through: bool = x2softmax.DEFAULT_STRAIGHT_THROUGH):
    """X2-Softmax: ``z_y = s * (a * (theta_y - h)^2 + k)``, a quadratic, angle-adaptive target logit.

    Formula:
    ```
    theta_y = arccos(clip(cos_theta_y, -1 + 1e-7, 1 - 1e-7))
    z_y = s * (a * (theta_y - h)^2 + k),  z_j = s * cos(theta_j)  (j != y)
    ```

    Args:
{{function_args}}
        s: Float, the scale, > 0. Defaults to `64.0`.
        a: Float, the curvature of the parabola, < 0. Defaults to `-0.9`.
        h: Float, the vertex angle in radians, in [0, pi). Defaults to `0.0`.
        k: Float, the vertex value, in [-1, 1]. Defaults to `0.65`.
        straight_through: Boolean; when True the gradient through the margin is the identity w.r.t.
            cos(theta_y), as in the authors' code (margin under `no_grad`); when False the analytic
            gradient. Defaults to `False`.

{{returns}}

    Example:
    >>> import keras, numpy as np
    >>> loss = x2softmax_loss(np.array([0, 1]), np.array([[0.8, 0.1], [0.3, 0.6]], "float32"))
    >>> np.round(keras.ops.convert_to_numpy(loss), 4)
    array([ 0.    , 27.1289], dtype=float32)

    Reference:
        Xu et al., "X2-Softmax: Margin Adaptive Loss Function for Face Recognition", arXiv:2312.05281
        (Eq. 8); the defaults are the authors' released training command.
    """
    params = x2softmax.check_x2softmax_parameters("x2softmax_loss", s, a, h, k, straight_through)
    return margin_softmax_loss(
        "x2softmax_loss", y_true, cos_theta,
        lambda c: x2softmax_target(c, params["a"], params["h"], params["k"], params["straight_through"]),
        params["s"],
    )


@_function_doc
def arcface_loss(y_true, cos_theta, s: float = arcface.DEFAULT_S, m: float = arcface.DEFAULT_M):
    """ArcFace (InsightFace convention): ``z_y = s * cos(theta_y + m)``, ``s * (cos - m sin m)`` past pi.

    Formula:
    ```
    z_y = s * cos(theta_y + m)            while theta_y + m <= pi
    z_y = s * (cos(theta_y) - m sin(m))   otherwise (monotone fallback)
    z_j = s * cos(theta_j)                (j != y)
    ```

    Args:
{{function_args}}
        s: Float, the scale, > 0. Defaults to `64.0`.
        m: Float, the additive angular margin in radians, in [0, pi). Defaults to `0.5`.

{{returns}}

    Example:
    >>> import keras, numpy as np
    >>> loss = arcface_loss(np.array([0, 1]), np.array([[0.8, 0.1], [0.3, 0.6]], "float32"))
    >>> np.round(keras.ops.convert_to_numpy(loss), 4)
    array([ 0.    , 10.0475], dtype=float32)

    Reference:
        Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019,
        arXiv:1801.07698 (Eq. 3). Authors' code: https://github.com/deepinsight/insightface
        (`recognition/arcface_torch/losses.py`).
    """
    params = arcface.check_arcface_parameters("arcface_loss", s, m)
    return margin_softmax_loss("arcface_loss", y_true, cos_theta,
                               lambda c: arcface_target(c, params["m"]), params["s"])


@_function_doc
def combined_margin_loss(y_true, cos_theta, s: float = arcface.COMBINED_DEFAULT_S,
                         m1: float = arcface.COMBINED_DEFAULT_M1, m2: float = arcface.COMBINED_DEFAULT_M2,
                         m3: float = arcface.COMBINED_DEFAULT_M3):
    """Combined margin: ``z_y = s * (cos(m1 * theta_y + m2) - m3)``, monotone past ``m1 * theta_y + m2 = pi``.

    Formula:
    ```
    z_y = s * (cos(m1 * theta_y + m2) - m3),  z_j = s * cos(theta_j)  (j != y)
    z_y = s * (cos(theta_y) - m3 - c)          once m1 * theta_y + m2 > pi (see combined_margin_target)
    ```

    Args:
{{function_args}}
        s: Float, the scale, > 0. Defaults to `64.0`.
        m1: Float, the multiplicative angular margin, > 0. Defaults to `1.0`.
        m2: Float, the additive angular margin in radians, in [0, pi). Defaults to `0.5`.
        m3: Float, the additive cosine margin, in [0, 1]. Defaults to `0.0`.

{{returns}}

    Example:
    >>> import keras, numpy as np
    >>> cos = np.array([[0.8, 0.1], [0.3, 0.6]], "float32")
    >>> loss = combined_margin_loss(np.array([0, 1]), cos, m1=1.0, m2=0.3, m3=0.2)
    >>> np.round(keras.ops.convert_to_numpy(loss), 4)
    array([ 0.    , 10.4457], dtype=float32)

    Reference:
        Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019,
        arXiv:1801.07698 (Eq. 4). Authors' code: https://github.com/deepinsight/insightface
        (`recognition/arcface_torch/losses.py`, `CombinedMarginLoss`).
    """
    params = arcface.check_combined_margin_parameters("combined_margin_loss", s, m1, m2, m3)
    return margin_softmax_loss(
        "combined_margin_loss", y_true, cos_theta,
        lambda c: combined_margin_target(c, params["m1"], params["m2"], params["m3"]), params["s"],
    )


# --------------------------------------------------------------------------------------------------
# Classes: what model.compile takes.


#: Per thread, the (loss, labels) of the ``MarginLoss.__call__`` calls in progress.
_LABELS_IN_FLIGHT = threading.local()


def _placeholder_ids(owner: str, y_true, y_pred):
    """Sparse labels that are not integers reach ``call`` only as Keras' float placeholders (its symbolic
    build of the compiled loss; ``__call__`` refuses them otherwise): cast those to int32; anything else
    is returned unchanged, for ``core.sparse_labels`` to check."""
    if (_validation.label_kind(owner, y_true, y_pred.shape[-1], check_dtype=False) == "sparse"
            and not _validation.dtype_name(y_true).startswith(("int", "uint"))):
        return ops.cast(y_true, "int32")
    return y_true


class MarginLoss(keras.losses.Loss):
    """Base of the margin losses: checks the labels, then calls the objective's function.

    Subclasses set ``fn`` (the per-sample function of their objective) and pass their checked
    hyper-parameters to ``__init__`` as keywords; each becomes an attribute of the loss (``loss.m``),
    ``hyper_parameters`` is the dict of them, and ``get_config`` returns them with the name and reduction.
    The function checks the hyper-parameters again at each call, so an attribute set to a bad value later
    is refused then.

    Labels: integer class ids of shape (batch,) or (batch, 1), or one-hot (batch, C). Float class ids
    are refused (``ValueError``) rather than silently truncated.

    Args:
        reduction: Type of reduction to apply to the loss. Defaults to `"sum_over_batch_size"`.
        name: Optional name for the loss instance. Defaults to `None` (the class name in snake case).
        dtype: The dtype of the loss's output. Defaults to `None` (`keras.backend.floatx()`).
        **hyper_parameters: The objective's hyper-parameters, already checked, passed to `fn`.

    Example:
    >>> import numpy as np
    >>> class Margin02Loss(MarginLoss):
    ...     fn = staticmethod(amsoftmax_loss)
    ...     def __init__(self, **kwargs):
    ...         super().__init__(s=10.0, m=0.2, **kwargs)
    >>> loss = Margin02Loss()
    >>> loss.m, loss.hyper_parameters
    (0.2, {'s': 10.0, 'm': 0.2})
    >>> round(float(loss(np.array([0]), np.array([[0.8, 0.1]], "float32"))), 4)
    0.0067
    """

    fn = None

    def __init__(self, *, reduction: str | None = "sum_over_batch_size", name: str | None = None,
                 dtype=None, **hyper_parameters):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._hyper_parameter_names = tuple(hyper_parameters)
        for key, value in hyper_parameters.items():
            setattr(self, key, value)

    @property
    def hyper_parameters(self) -> dict:
        """The objective's hyper-parameters, ``{name: value}``, from the loss' attributes."""
        return {key: getattr(self, key) for key in self._hyper_parameter_names}

    def __call__(self, y_true, y_pred, sample_weight=None):
        """``keras.losses.Loss.__call__`` (masks, ``sample_weight``, reduction), except that ``call`` gets the
        labels in their own dtype: Keras casts them to the loss dtype first, where float32 rounds class ids
        above 2^24 (float16: 2048, bfloat16: 256) and an int64 id >= 2^32 can come back as a valid one.
        Labels and sample weights are checked here, where they enter (``core.sparse_labels`` checks the ids)."""
        owner = type(self).__name__
        if not hasattr(y_true, "dtype"):
            y_true = ops.convert_to_tensor(y_true)
        shape = tuple(y_pred.shape) if hasattr(y_pred, "shape") else None
        num_classes, batch = (shape[-1], shape[0]) if shape and len(shape) >= 2 else (None, None)
        # Keras' own symbolic build of the compiled loss passes float64 placeholder labels: the user's
        # labels are checked when real data arrives, so only the shape is checked there.
        if num_classes is not None:
            _validation.label_kind(owner, y_true, num_classes, check_dtype=not _keras_private.in_symbolic_scope())
        _validation.check_sample_weight(owner, sample_weight, batch)
        # Keras' __call__ hands ``call`` its float copy of the labels; ``call`` takes these instead. Per thread:
        # tf.distribute calls a loss from one thread per replica.
        in_flight = _LABELS_IN_FLIGHT.__dict__.setdefault("stack", [])
        in_flight.append((self, y_true))
        try:
            return super().__call__(y_true, y_pred, sample_weight=sample_weight)
        finally:
            in_flight.pop()

    def _labels(self, y_true, y_pred):
        """The labels ``__call__`` was given (not Keras' cast copy), Keras' float placeholders as int32."""
        in_flight = _LABELS_IN_FLIGHT.__dict__.get("stack")
        if in_flight and in_flight[-1][0] is self:
            y_true = in_flight[-1][1]
        return _placeholder_ids(type(self).__name__, y_true, y_pred)

    def call(self, y_true, y_pred):
        return type(self).fn(self._labels(y_true, y_pred), y_pred, **self.hyper_parameters)

    def get_config(self):
        return {"name": self.name, "reduction": self.reduction, **self.hyper_parameters}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@_loss_doc
@keras.saving.register_keras_serializable(package="keras_margin")
class NormFaceLoss(MarginLoss):
    """NormFace normalized softmax (Wang et al. 2017, arXiv 1704.06369, Eq. 6 with fixed s).

    Formula:
    ```
    z_j = s * cos(theta_j)                      for all j, no margin
    loss = logsumexp(z) - z_y
    ```

    Args:
        s: Float, the scale, > 0; `normface_scale_lower_bound(C, P)` gives the paper's lower bound.
            Defaults to `30.0`.
{{loss_args}}

{{call_args}}

    Example:
    >>> import numpy as np
    >>> loss = NormFaceLoss(s=10.0)
    >>> loss.s
    10.0
    >>> cos = np.array([[0.8, 0.1], [0.3, 0.6]], "float32")
    >>> round(float(loss(np.array([0, 1]), cos)), 4)
    0.0247

    Reference:
        Wang et al., "NormFace: L2 Hypersphere Embedding for Face Verification", ACM MM 2017,
        arXiv:1704.06369 (Eq. 6). Authors' code: https://github.com/happynear/NormFace
    """

    fn = staticmethod(normface_loss)

    def __init__(self, s: float = normface.DEFAULT_S, *, reduction="sum_over_batch_size", name="normface_loss",
                 dtype=None):
        super().__init__(**normface.check_normface_parameters("NormFaceLoss", s), reduction=reduction, name=name,
                         dtype=dtype)


@_loss_doc
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
        m: Integer angular margin, 1 to 4. Defaults to `4`.
        s: Float, the scale replacing |x|, > 0. Defaults to `30.0`.
        lambda_: Float, the fixed blend with the plain cosine, >= 0. Defaults to `0.0`.
{{loss_args}}

{{call_args}}

    Example:
    >>> import numpy as np
    >>> loss = SphereFaceLoss(m=4, s=30.0)
    >>> loss.m, loss.lambda_
    (4, 0.0)
    >>> round(float(loss(np.array([0, 1]), np.array([[0.99, 0.0], [0.3, 0.6]], "float32"))), 4)
    21.852

    Reference:
        Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017,
        arXiv:1704.08063 (Eq. 7). Authors' code: https://github.com/wy1iu/sphereface
    """

    fn = staticmethod(sphereface_loss)

    def __init__(self, m: int = sphereface.DEFAULT_M, s: float = sphereface.DEFAULT_S,
                 lambda_: float = sphereface.DEFAULT_LAMBDA, *, reduction="sum_over_batch_size",
                 name="sphereface_loss", dtype=None):
        super().__init__(**sphereface.check_sphereface_parameters("SphereFaceLoss", m, s, lambda_),
                         reduction=reduction, name=name, dtype=dtype)


@_loss_doc
@keras.saving.register_keras_serializable(package="keras_margin")
class AMSoftmaxLoss(MarginLoss):
    """AM-Softmax (Wang et al. 2018, arXiv 1801.05599, Eq. 4) = CosFace's LMCL (arXiv 1801.09414, Eq. 4).

    Formula:
    ```
    z_y = s * (cos(theta_y) - m),  z_j = s * cos(theta_j)  (j != y)
    loss = logsumexp(z) - z_y
    margin_rule="caffe": z_y = s * cos(theta_y) where cos(theta_y) <= m (the released Caffe layer)
    ```

    Args:
        s: Float, the scale, > 0. Defaults to `30.0` (the released AM-Softmax model).
        m: Float, the additive cosine margin, in [0, 1]. Defaults to `0.35`.
        margin_rule: `"paper"` (Eq. 4, the margin everywhere) or `"caffe"` (the released
            `LabelSpecificAdd` layer: the margin only where `cos(theta_y) > m`, identity gradient).
            Defaults to `"paper"`. The layer's margin schedule needs a counter: see `AMSoftmaxHead`.
{{loss_args}}

{{call_args}}

    Example:
    >>> import numpy as np
    >>> loss = AMSoftmaxLoss()
    >>> loss.s, loss.m, loss.margin_rule
    (30.0, 0.35, 'paper')
    >>> round(float(loss(np.array([0, 1]), np.array([[0.8, 0.1], [0.3, 0.6]], "float32"))), 4)
    0.8507

    Reference:
        Wang et al., "Additive Margin Softmax for Face Verification", IEEE SPL 2018, arXiv:1801.05599
        (Eq. 4). Authors' code: https://github.com/happynear/AMSoftmax. The same loss is CosFace's large
        margin cosine loss (Wang et al., CVPR 2018, arXiv:1801.09414, Eq. 4).
    """

    fn = staticmethod(amsoftmax_loss)

    def __init__(self, s: float = amsoftmax.DEFAULT_S, m: float = amsoftmax.DEFAULT_M,
                 margin_rule: str = amsoftmax.DEFAULT_MARGIN_RULE, *, reduction="sum_over_batch_size",
                 name="amsoftmax_loss", dtype=None):
        super().__init__(**amsoftmax.check_amsoftmax_parameters("AMSoftmaxLoss", s, m, margin_rule),
                         reduction=reduction, name=name, dtype=dtype)


@_loss_doc
@keras.saving.register_keras_serializable(package="keras_margin")
class X2SoftmaxLoss(MarginLoss):
    """X2-Softmax (Xu et al. 2023, arXiv 2312.05281, Eq. 8): quadratic, angle-adaptive target logit.

    Formula:
    ```
    theta_y = arccos(clip(cos_theta_y, -1 + 1e-7, 1 - 1e-7))
    z_y = s * (a * (theta_y - h)^2 + k),  z_j = s * cos(theta_j)  (j != y)
    ```

    Args:
        s: Float, the scale, > 0. Defaults to `64.0`.
        a: Float, the curvature, < 0. Defaults to `-0.9`.
        h: Float, the vertex angle in radians, in [0, pi). Defaults to `0.0`.
        k: Float, the vertex value, in [-1, 1]. Defaults to `0.65`.
        straight_through: Boolean; when True the gradient through the margin is the identity w.r.t.
            cos(theta_y), as in the authors' code (margin under `no_grad`); when False the analytic
            gradient `s * 2a (theta_y - h) * (-1 / sin(theta_y))`, finite thanks to the clamp.
            Defaults to `False`.
{{loss_args}}

{{call_args}}

    Example:
    >>> import numpy as np
    >>> loss = X2SoftmaxLoss()
    >>> loss.a, loss.h, loss.k
    (-0.9, 0.0, 0.65)
    >>> round(float(loss(np.array([0, 1]), np.array([[0.5, -0.2], [0.3, 0.1]], "float32"))), 4)
    55.47

    Reference:
        Xu et al., "X2-Softmax: Margin Adaptive Loss Function for Face Recognition", arXiv:2312.05281
        (Eq. 8); the defaults are the authors' released training command.
    """

    fn = staticmethod(x2softmax_loss)

    def __init__(self, s: float = x2softmax.DEFAULT_S, a: float = x2softmax.DEFAULT_A,
                 h: float = x2softmax.DEFAULT_H, k: float = x2softmax.DEFAULT_K,
                 straight_through: bool = x2softmax.DEFAULT_STRAIGHT_THROUGH, *, reduction="sum_over_batch_size",
                 name="x2softmax_loss", dtype=None):
        super().__init__(**x2softmax.check_x2softmax_parameters("X2SoftmaxLoss", s, a, h, k, straight_through),
                         reduction=reduction, name=name, dtype=dtype)


@_loss_doc
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
        s: Float, the scale, > 0. Defaults to `64.0`.
        m: Float, the additive angular margin in radians, in [0, pi). Defaults to `0.5`.
{{loss_args}}

{{call_args}}

    Example:
    >>> import numpy as np
    >>> loss = ArcFaceLoss()
    >>> loss.s, loss.m
    (64.0, 0.5)
    >>> round(float(loss(np.array([0, 1]), np.array([[0.8, 0.1], [0.3, 0.6]], "float32"))), 4)
    5.0237

    Reference:
        Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019,
        arXiv:1801.07698 (Eq. 3). Authors' code: https://github.com/deepinsight/insightface
        (`recognition/arcface_torch/losses.py`).
    """

    fn = staticmethod(arcface_loss)

    def __init__(self, s: float = arcface.DEFAULT_S, m: float = arcface.DEFAULT_M, *,
                 reduction="sum_over_batch_size", name="arcface_loss", dtype=None):
        super().__init__(**arcface.check_arcface_parameters("ArcFaceLoss", s, m), reduction=reduction, name=name,
                         dtype=dtype)


@_loss_doc
@keras.saving.register_keras_serializable(package="keras_margin")
class CombinedMarginLoss(MarginLoss):
    """InsightFace's combined margin (ArcFace paper, arXiv 1801.07698, Eq. 4).

    Formula:
    ```
    z_y = s * (cos(m1 * theta_y + m2) - m3),  z_j = s * cos(theta_j)  (j != y)
    ```
    (1, 0, 0) is NormFace, (1, 0, 0.35) AM-Softmax, (1, 0.5, 0) ArcFace (exactly ``ArcFaceLoss``, its
    fallback included). Past ``m1 * theta_y + m2 = pi`` the target falls back to a monotone
    ``cos(theta_y) - m3 - c``; ``keras_margin.margins.combined_margin_target`` states ``c``.

    Args:
        s: Float, the scale, > 0. Defaults to `64.0`.
        m1: Float, the multiplicative angular margin, > 0. Defaults to `1.0`.
        m2: Float, the additive angular margin in radians, in [0, pi). Defaults to `0.5`.
        m3: Float, the additive cosine margin, in [0, 1]. Defaults to `0.0`.
{{loss_args}}

{{call_args}}

    Example:
    >>> import numpy as np
    >>> loss = CombinedMarginLoss(s=64.0, m1=1.0, m2=0.3, m3=0.2)
    >>> loss.m1, loss.m2, loss.m3
    (1.0, 0.3, 0.2)
    >>> round(float(loss(np.array([0, 1]), np.array([[0.8, 0.1], [0.3, 0.6]], "float32"))), 4)
    5.2229

    Reference:
        Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019,
        arXiv:1801.07698 (Eq. 4). Authors' code: https://github.com/deepinsight/insightface
        (`recognition/arcface_torch/losses.py`, `CombinedMarginLoss`).
    """

    fn = staticmethod(combined_margin_loss)

    def __init__(self, s: float = arcface.COMBINED_DEFAULT_S, m1: float = arcface.COMBINED_DEFAULT_M1,
                 m2: float = arcface.COMBINED_DEFAULT_M2, m3: float = arcface.COMBINED_DEFAULT_M3, *,
                 reduction="sum_over_batch_size", name="combined_margin_loss", dtype=None):
        super().__init__(**arcface.check_combined_margin_parameters("CombinedMarginLoss", s, m1, m2, m3),
                         reduction=reduction, name=name, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# NormFace's agent objectives: distances to the class weight columns ("agents"), D = 2 - 2 cos.


@_function_doc
def c_contrastive_loss(y_true, cos_theta, margin: float = normface_agents.C_CONTRASTIVE_MARGIN):
    """NormFace's C-contrastive loss: pull the own agent in, push every other one beyond the margin.

    Formula:
    ```
    D_ij = ||x~_i - W~_j||^2 = 2 - 2 cos(theta_ij)
    loss_i = D_{i,y} + sum_{j != y} max(0, margin - D_ij)      (every negative summed, no mining)
    ```
    ``margin=0`` leaves the pull alone: NormFace's normalized "softmax + center" term.

    Args:
{{function_args}}
        margin: Float, the negatives' margin on the squared distance, in [0, 4]. Defaults to `1.0`.

{{returns}}

    Example:
    >>> import keras, numpy as np
    >>> loss = c_contrastive_loss(np.array([0]), np.array([[0.9, 0.8, -0.5]], "float32"))
    >>> np.round(keras.ops.convert_to_numpy(loss), 4)     # D = 0.2 (pull) + max(0, 1 - 0.4) (push)
    array([0.8], dtype=float32)

    Reference:
        Wang et al., "NormFace: L2 Hypersphere Embedding for Face Verification", ACM MM 2017,
        arXiv:1704.06369 (Sec. 4, Eq. 10). Authors' code: https://github.com/happynear/NormFace
        (layer GeneralContrastiveLoss of https://github.com/happynear/caffe-windows, branch ms).
    """
    params = normface_agents.check_c_contrastive_parameters("c_contrastive_loss", margin)
    return agent_loss("c_contrastive_loss", y_true, cos_theta,
                      lambda cos, ids: normface_agents.c_contrastive(cos, ids, params["margin"]))


@_function_doc
def c_triplet_loss(y_true, cos_theta, margin: float = normface_agents.C_TRIPLET_MARGIN,
                   center: bool = normface_agents.C_TRIPLET_CENTER):
    """NormFace's C-triplet loss against the nearest negative agent, with the released config's center pull.

    Formula:
    ```
    D_ij = 2 - 2 cos(theta_ij),  k* = argmin_{j != y} D_ij
    loss_i = max(0, margin + D_{i,y} - D_{i,k*})           the value, with and without center
    gradient (center=True):  that of D_{i,y} - [loss_i > 0] * D_{i,k*}  (Caffe's add_center_loss)
    ```
    The reported value is the hinge alone in both cases, as the Caffe layer reports it; with ``center=True``
    the own-class distance is pulled in also when the hinge is inactive, and counted once when it is active.

    Args:
{{function_args}}
        margin: Float, the triplet margin on the squared distance, in [0, 4]. Defaults to `0.8`.
        center: Bool, add the always-on pull of the own agent (the released config). Defaults to `True`.

{{returns}}

    Example:
    >>> import keras, numpy as np
    >>> loss = c_triplet_loss(np.array([0]), np.array([[0.9, 0.8, -0.5]], "float32"))
    >>> np.round(keras.ops.convert_to_numpy(loss), 4)     # max(0, 0.8 + 0.2 - 0.4)
    array([0.6], dtype=float32)

    Reference:
        Wang et al., "NormFace: L2 Hypersphere Embedding for Face Verification", ACM MM 2017,
        arXiv:1704.06369 (Sec. 4, Eq. 11). Authors' code: https://github.com/happynear/NormFace
        (layer GeneralTripletLoss of https://github.com/happynear/caffe-windows, branch ms).
    """
    params = normface_agents.check_c_triplet_parameters("c_triplet_loss", margin, center)
    return agent_loss("c_triplet_loss", y_true, cos_theta,
                      lambda cos, ids: normface_agents.c_triplet(cos, ids, params["margin"], params["center"]))


@_loss_doc
@keras.saving.register_keras_serializable(package="keras_margin")
class CContrastiveLoss(MarginLoss):
    """NormFace's C-contrastive loss on a head's cosines (the class weight columns are the agents).

    Formula:
    ```
    D_ij = 2 - 2 cos(theta_ij)
    loss_i = D_{i,y} + sum_{j != y} max(0, margin - D_ij)
    ```
    Accuracy metrics keep working on the cosines: the largest cosine is the nearest agent.

    Args:
        margin: Float, the negatives' margin on the squared distance, in [0, 4]. Defaults to `1.0`.
{{loss_args}}

{{call_args}}

    Example:
    >>> import numpy as np
    >>> loss = CContrastiveLoss()
    >>> loss.margin
    1.0
    >>> round(float(loss(np.array([0]), np.array([[0.9, 0.8, -0.5]], "float32"))), 4)
    0.8

    Reference:
        Wang et al., "NormFace: L2 Hypersphere Embedding for Face Verification", ACM MM 2017,
        arXiv:1704.06369 (Sec. 4, Eq. 10). Authors' code: https://github.com/happynear/NormFace
    """

    fn = staticmethod(c_contrastive_loss)

    def __init__(self, margin: float = normface_agents.C_CONTRASTIVE_MARGIN, *, reduction="sum_over_batch_size",
                 name="c_contrastive_loss", dtype=None):
        super().__init__(**normface_agents.check_c_contrastive_parameters("CContrastiveLoss", margin),
                         reduction=reduction, name=name, dtype=dtype)


@_loss_doc
@keras.saving.register_keras_serializable(package="keras_margin")
class CTripletLoss(MarginLoss):
    """NormFace's C-triplet loss on a head's cosines: the nearest negative agent, optionally the center pull.

    Formula:
    ```
    D_ij = 2 - 2 cos(theta_ij),  k* = argmin_{j != y} D_ij
    loss_i = max(0, margin + D_{i,y} - D_{i,k*})
    center=True: gradient of D_{i,y} - [loss_i > 0] * D_{i,k*}; the value reported is the hinge alone
    ```

    Args:
        margin: Float, the triplet margin on the squared distance, in [0, 4]. Defaults to `0.8`.
        center: Bool, add the always-on pull of the own agent (the released config). Defaults to `True`.
{{loss_args}}

{{call_args}}

    Example:
    >>> import numpy as np
    >>> loss = CTripletLoss()
    >>> loss.margin, loss.center
    (0.8, True)
    >>> round(float(loss(np.array([0]), np.array([[0.9, 0.8, -0.5]], "float32"))), 4)
    0.6

    Reference:
        Wang et al., "NormFace: L2 Hypersphere Embedding for Face Verification", ACM MM 2017,
        arXiv:1704.06369 (Sec. 4, Eq. 11). Authors' code: https://github.com/happynear/NormFace
    """

    fn = staticmethod(c_triplet_loss)

    def __init__(self, margin: float = normface_agents.C_TRIPLET_MARGIN,
                 center: bool = normface_agents.C_TRIPLET_CENTER, *, reduction="sum_over_batch_size",
                 name="c_triplet_loss", dtype=None):
        super().__init__(**normface_agents.check_c_triplet_parameters("CTripletLoss", margin, center),
                         reduction=reduction, name=name, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# The loss of a head whose objective has state (a learned scale, a margin schedule).

# Heads alive in this process, by layer name: how a deserialized ``HeadLoss`` finds the head it belongs to
# (Keras rebuilds a saved model's layers before it compiles the model from its saved compile config).
_LIVE_HEADS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def register_head(head) -> None:
    """Record ``head`` under its layer name, for ``HeadLoss.from_config`` (called by every margin head)."""
    _LIVE_HEADS[head.name] = head


@keras.saving.register_keras_serializable(package="keras_margin")
class HeadLoss(MarginLoss):
    """The cosine-path loss of a head with state, computed from the head's own variables.

    A fixed objective's loss sees only (labels, cosines). When the objective depends on a head's variables
    (``NormFaceHead(learn_scale=True)``'s scale, ``AMSoftmaxHead(margin_schedule=...)``'s current margin),
    ``head.loss`` is a ``HeadLoss``: it calls ``head.cosine_loss(y_true, cos_theta)``, which reads those
    variables, so a Sequential model compiled with ``loss=head.loss`` learns the scale (the gradient reaches
    it through the loss) and follows the schedule (the head advances it in its training forward pass).

    Saving: the config names the head's layer; a reloaded model's compile step finds the reloaded head by
    that name. Loading the config alone, with no head of that name alive, raises a ``ValueError``.

    Args:
        head: The head (a layer with a ``cosine_loss(y_true, cos_theta)`` method), or the name of a live one.
{{loss_args}}

{{call_args}}

    Example:
    >>> import numpy as np, keras
    >>> from keras_margin import NormFaceHead
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> head = NormFaceHead(5, s=10.0, learn_scale=True)
    >>> model.add(head)
    >>> model.compile("sgd", loss=head.loss)
    >>> history = model.fit(np.random.rand(8, 4), np.arange(8) % 5, epochs=1, verbose=0)
    >>> bool(float(keras.ops.convert_to_numpy(head.scale_weight)) != 10.0)
    True
    """

    def __init__(self, head, *, reduction="sum_over_batch_size", name: str | None = None, dtype=None):
        if isinstance(head, str):
            found = _LIVE_HEADS.get(head)
            if found is None:
                raise ValueError(f"HeadLoss: no head named {head!r} exists in this process; a HeadLoss computes "
                                 "its head's objective from the head's variables. Load the whole model "
                                 "(keras.saving.load_model), or build the head and use its `loss`.")
            head = found
        if not callable(getattr(head, "cosine_loss", None)):
            raise ValueError(f"HeadLoss: `head` must be a keras_margin head with a `cosine_loss` method; got "
                             f"{head!r}.")
        super().__init__(reduction=reduction, name=name or f"{head.name}_loss", dtype=dtype)
        # A weak reference, not an attribute: Keras' saving walks a loss' attributes, and the head is saved
        # (once) as a layer of its model.
        self._head_ref = weakref.ref(head)
        self.head_name = head.name

    def get_head(self):
        """The head this loss computes the objective of."""
        head = self._head_ref()
        if head is None:
            raise ValueError(f"HeadLoss: its head {self.head_name!r} no longer exists; keep the model (or the "
                             "head) alive while its loss is used.")
        return head

    def call(self, y_true, y_pred):
        return self.get_head().cosine_loss(self._labels(y_true, y_pred), y_pred)

    def get_config(self):
        return {"name": self.name, "reduction": self.reduction, "head": self.head_name}


_loss_doc(HeadLoss)
