"""Keras layers for the fork layers that read the label, converted literally in a TRAIN conversion.

``LabelSpecificAdd`` (happynear/caffe-windows ``label_specific_add.cpp``) and SphereFace's ``MarginInnerProduct``
(wy1iu/sphereface ``margin_inner_product_layer.cpp``) when no margin head is fused around them. Both take
``[values, labels]``, apply the layer's TRAIN forward in a training call and keep their counters as
non-trainable variables saved with the model; serializable (package "keras_margin_caffe"), so importing this
module is enough to reload a ``.keras`` file holding them.

``training_forward()`` makes them run their training forward inside an inference call (the TRAIN parity check
runs everything else, BatchNorm and Dropout included, as OpenCV does: at inference).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import keras
from keras import ops

__all__ = ["LabelSpecificAdd", "MarginInnerProduct", "training_forward"]

_serializable = keras.saving.register_keras_serializable(package="keras_margin_caffe")

#: None, or {"advance": bool} while ``training_forward`` is active.
_FORCED: contextvars.ContextVar = contextvars.ContextVar("keras_margin_caffe_training_forward", default=None)


@contextlib.contextmanager
def training_forward(advance: bool = False) -> Iterator[None]:
    """Within it, the label layers apply their training forward whatever ``training`` says; with
    ``advance=False`` they compute the step their counters are at without moving them (the fork's next
    forward pass, state untouched)."""
    token = _FORCED.set({"advance": bool(advance)})
    try:
        yield
    finally:
        _FORCED.reset(token)


def _mode(training) -> tuple[bool, bool]:
    """(apply the training forward, advance the counter)."""
    forced = _FORCED.get()
    if forced is not None:
        return True, forced["advance"]
    return bool(training), bool(training)


def _class_ids(labels):
    """Caffe's ``static_cast<int>(label[i])`` (a float label truncates toward zero); (batch,) or (batch, 1)."""
    return ops.cast(ops.reshape(labels, (-1,)), "int32")


def _target_mask(ids, num_classes: int):
    """(batch, C) boolean: column ``ids[i]`` of row i (no column for an id outside [0, C))."""
    return ops.equal(ops.expand_dims(ids, -1), ops.expand_dims(ops.arange(num_classes, dtype="int32"), 0))


_SCHEDULE_KEYS = ("bias_base", "bias_gamma", "bias_power", "bias_min", "bias_max")


@_serializable
class LabelSpecificAdd(keras.layers.Layer):
    """happynear's LabelSpecificAdd on ``[logits (batch, D), labels]``: the target logit moves by ``bias``.

    Formula (training call; the layer's ``Forward_cpu`` in TRAIN):
    ```
    annealed (schedule set): bias = clip(bias_base + (1 + bias_gamma * iteration)^bias_power - 1,
                                         bias_min, bias_max); then iteration += 1
    y = x;  y[i, label_i] = x[i, label_i] + bias   where x[i, label_i] > -bias
    ```
    An inference call returns ``x`` (the fork returns early in TEST). The backward pass is the identity, as
    the layer's. ``iteration`` (int32) and ``bias`` (the bias last used, float32) are non-trainable
    variables saved with the model. With ``return_bias`` it also outputs the bias of the call, one value per
    sample (the layer's second top; at inference the last one used).

    Example:
    >>> import numpy as np
    >>> layer = LabelSpecificAdd(bias=-0.35)
    >>> x = np.array([[0.9, 0.1], [0.2, 0.8]], "float32")
    >>> np.round(layer([x, np.array([0, 0])], training=True).numpy().astype("float64"), 2).tolist()
    [[0.55, 0.1], [0.2, 0.8]]
    """

    def __init__(self, bias: float = 0.0, schedule: dict | None = None, iteration: int = 0,
                 return_bias: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.initial_bias = float(bias)
        if schedule is not None:
            unknown = sorted(set(schedule) - set(_SCHEDULE_KEYS))
            if unknown:
                raise ValueError(f"LabelSpecificAdd: unknown schedule keys {unknown}; allowed: {list(_SCHEDULE_KEYS)}")
            schedule = {**dict(zip(_SCHEDULE_KEYS, (0.0, 0.0, 1.0, 0.0, 0.0))),
                        **{key: float(value) for key, value in schedule.items()}}
        self.schedule = schedule
        if int(iteration) < 0:
            raise ValueError(f"LabelSpecificAdd: iteration must be >= 0; got {iteration}")
        self.initial_iteration = int(iteration)
        self.return_bias = bool(return_bias)

    def build(self, input_shape):
        self.iteration = self.add_weight(name="iteration", shape=(), dtype="int32", trainable=False,
                                         initializer=keras.initializers.Constant(self.initial_iteration))
        self.bias = self.add_weight(name="bias", shape=(), dtype="float32", trainable=False,
                                    initializer=keras.initializers.Constant(self.initial_bias))
        super().build(input_shape)

    def scheduled_bias(self, iteration):
        """The annealed bias at counter value ``iteration`` (float32, as the layer's ``Dtype``)."""
        s = self.schedule
        value = s["bias_base"] + ops.power(1.0 + s["bias_gamma"] * ops.cast(iteration, "float32"),
                                           s["bias_power"]) - 1.0
        return ops.minimum(ops.maximum(value, s["bias_min"]), s["bias_max"])

    def call(self, inputs, training=None):
        logits, labels = inputs
        apply, advance = _mode(training)
        bias = ops.convert_to_tensor(self.bias)
        if apply:
            if self.schedule is not None:
                bias = self.scheduled_bias(self.iteration)
                if advance:
                    self.bias.assign(bias)
                    self.iteration.assign_add(1)
            logits = ops.cast(logits, "float32")
            target = ops.logical_and(_target_mask(_class_ids(labels), logits.shape[-1]), logits > -bias)
            logits = ops.where(target, logits + bias, logits)
        if not self.return_bias:
            return logits
        return [logits, ops.zeros_like(ops.cast(logits[:, 0], "float32")) + bias]

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape[0])
        return [shape, shape[:1]] if self.return_bias else shape

    def get_config(self):
        return {**super().get_config(), "bias": self.initial_bias, "schedule": self.schedule,
                "iteration": self.initial_iteration, "return_bias": self.return_bias}


@_serializable
class MarginInnerProduct(keras.layers.Layer):
    """SphereFace's MarginInnerProduct on ``[x (batch, K), labels]``: logits with the A-Softmax margin.

    Formula (training call; ``Forward_cpu``, the counter advanced FIRST):
    ```
    iteration += 1;  lambda = max(base * (1 + gamma * iteration)^(-power), lambda_min)
    w_hat_j = w_j / |w_j|        z_j = x . w_hat_j                                (j != y)
    z_y = |x| * (lambda * cos(theta_y) + psi(theta_y)) / (1 + lambda)             (m >= 2; m = 1: z_y = x . w_hat_y)
    psi(theta) = (-1)^k cos(m theta) - 2k,  k = floor(m theta / pi)
    ```
    An inference call gives the label-free ``x . w_hat``. ``kernel`` is (K, num_output) (rows normalised in
    every call, without eps, as the layer does in place); ``iteration`` (int32) is a non-trainable variable
    saved with the model. With ``return_lambda`` the layer also outputs the lambda of the call (its second
    top; at inference the last one used), one value per sample. The gradient is autodiff's, not the
    layer's hand-written ``Backward_cpu`` (which normalises its coefficients).
    """

    def __init__(self, num_output: int, m: int = 4, base: float = 1.0, gamma: float = 0.0, power: float = 1.0,
                 lambda_min: float = 0.0, iteration: int = 0, return_lambda: bool = False,
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        from keras_margin.margins.sphereface import check_sphereface_m

        self.num_output = int(num_output)
        if self.num_output < 1:
            raise ValueError(f"MarginInnerProduct: num_output must be >= 1; got {num_output}")
        self.m = check_sphereface_m("MarginInnerProduct", m)
        self.base, self.gamma, self.power, self.lambda_min = float(base), float(gamma), float(power), float(lambda_min)
        self.initial_iteration = int(iteration)
        self.return_lambda = bool(return_lambda)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        dim = int(input_shape[0][-1])
        self.kernel = self.add_weight(name="kernel", shape=(dim, self.num_output), initializer=self.kernel_initializer)
        self.iteration = self.add_weight(name="iteration", shape=(), dtype="int32", trainable=False,
                                         initializer=keras.initializers.Constant(self.initial_iteration))
        super().build(input_shape)

    def lambda_at(self, iteration):
        """``max(base * (1 + gamma * iteration)^(-power), lambda_min)`` in float32."""
        from keras_margin.margins.sphereface import sphereface_lambda

        return sphereface_lambda(iteration, self.base, self.gamma, self.power, self.lambda_min)

    def call(self, inputs, training=None):
        from keras_margin.margins.sphereface import sphereface_target

        x, labels = inputs
        x = ops.cast(x, "float32")
        kernel = ops.cast(self.kernel, "float32")
        w_hat = kernel / ops.sqrt(ops.sum(ops.square(kernel), axis=0, keepdims=True))
        z = ops.matmul(x, w_hat)
        apply, advance = _mode(training)
        if apply:
            step = self.iteration + 1
            if advance:
                self.iteration.assign(step)
            lambda_ = self.lambda_at(step)
        else:
            lambda_ = self.lambda_at(self.iteration)
        if apply and self.m > 1:
            x_norm = ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True))
            cos = z / ops.maximum(x_norm, 1e-30)
            target = _target_mask(_class_ids(labels), self.num_output)
            cos_y = ops.sum(ops.where(target, cos, 0.0), axis=-1, keepdims=True)
            z_y = x_norm * sphereface_target(cos_y, self.m, lambda_)
            z = ops.where(target, z_y, z)
        if not self.return_lambda:
            return z
        return [z, ops.zeros_like(z[:, 0]) + lambda_]

    def compute_output_shape(self, input_shape):
        shape = (*tuple(input_shape[0])[:-1], self.num_output)
        return [shape, shape[:1]] if self.return_lambda else shape

    def get_config(self):
        return {**super().get_config(), "num_output": self.num_output, "m": self.m, "base": self.base,
                "gamma": self.gamma, "power": self.power, "lambda_min": self.lambda_min,
                "iteration": self.initial_iteration, "return_lambda": self.return_lambda,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}
