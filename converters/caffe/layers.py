"""Keras layers for the Caffe operations that have no exact built-in Keras equivalent.

Caffe-rule pooling (ceil mode, AVE divisors), the happynear fork's Flip, L2 Normalize (with its norm),
ChannelScale, GlobalLSEMargin and BatchNorm with ``disable_mean``/``disable_variance``, slicing, Caffe's
Scale/Bias broadcasting, Reduction, LRN, Power and strided subsampling; all serializable (package
"keras_margin_caffe"), so a converted ``.keras`` file reloads once ``converters.caffe`` is imported.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from converters.caffe.fork import FORK_EPS
from converters.caffe.shapes import ave_pool_divisors, pool_output_size

__all__ = [
    "Flip",
    "CaffeNormalize",
    "CaffePooling2D",
    "CaffeSlice",
    "CaffeScale",
    "CaffeLRN",
    "CaffePower",
    "Subsample2D",
    "CaffeReduction",
    "ChannelScale",
    "GlobalLSEMargin",
    "CaffeBatchNorm",
    "ClipConstraint",
]

_serializable = keras.saving.register_keras_serializable(package="keras_margin_caffe")


@_serializable
class Flip(keras.layers.Layer):
    """Reverse the given axes (happynear's Flip: width = Keras axis 2 of NHWC, height = axis 1).

    Example:
    >>> import numpy as np
    >>> Flip(axes=[2])(np.arange(3, dtype="float32").reshape(1, 1, 3, 1))[0, 0, :, 0].numpy().tolist()
    [2.0, 1.0, 0.0]
    """

    def __init__(self, axes=(2,), **kwargs):
        super().__init__(**kwargs)
        self.axes = [int(axis) for axis in axes]

    def call(self, inputs):
        for axis in self.axes:
            inputs = ops.flip(inputs, axis=axis)
        return inputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "axes": self.axes}


@_serializable
class CaffeNormalize(keras.layers.Layer):
    """happynear's Normalize: per position, divide by the channel norm; optionally also output the norm.

    Formula:
    ```
    L2: norm = sqrt(sum_c x^2 + epsilon)      L1: norm = sum_c |x| + epsilon      y = x / norm
    ```
    ``epsilon`` is 1e-6, the fork's CPU value (its GPU code uses 1e-12). With ``return_norm`` the layer
    returns ``[y, norm]`` (the fork's second top, the channel axis kept with size 1); ``norm_gradient``
    False (the fork's ``bp_norm: false``) stops gradients flowing back through the norm output.
    """

    def __init__(self, axis: int = -1, norm: str = "L2", epsilon: float = FORK_EPS, return_norm: bool = False,
                 norm_gradient: bool = True, **kwargs):
        super().__init__(**kwargs)
        if norm not in ("L1", "L2"):
            raise ValueError(f"CaffeNormalize: norm must be 'L1' or 'L2'; got {norm!r}")
        self.axis, self.norm, self.epsilon = int(axis), norm, float(epsilon)
        self.return_norm, self.norm_gradient = bool(return_norm), bool(norm_gradient)

    def call(self, inputs):
        if self.norm == "L2":
            norm = ops.sqrt(ops.sum(ops.square(inputs), axis=self.axis, keepdims=True) + self.epsilon)
        else:
            norm = ops.sum(ops.abs(inputs), axis=self.axis, keepdims=True) + self.epsilon
        y = inputs / norm
        if not self.return_norm:
            return y
        return [y, norm if self.norm_gradient else ops.stop_gradient(norm)]

    def compute_output_shape(self, input_shape):
        if not self.return_norm:
            return tuple(input_shape)
        norm_shape = list(input_shape)
        norm_shape[self.axis] = 1
        return [tuple(input_shape), tuple(norm_shape)]

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "norm": self.norm, "epsilon": self.epsilon,
                "return_norm": self.return_norm, "norm_gradient": self.norm_gradient}


@_serializable
class CaffePooling2D(keras.layers.Layer):
    """2-D MAX/AVE pooling with Caffe's rules, on NHWC inputs with a known height and width.

    Output size ``ceil((in + 2 pad - k) / stride) + 1`` (floor when ``ceil_mode`` is False), minus one when
    padded and the last window would start beyond ``in + pad``. MAX ignores padding (it pads with the
    lowest float). AVE sums the window's image cells and divides by its extent clipped to ``in + pad``,
    so the top/left zero padding counts and a ceil-mode overhang does not (``pooling_layer.cpp``).

    Example:
    >>> import numpy as np
    >>> x = np.arange(9, dtype="float32").reshape(1, 3, 3, 1)
    >>> CaffePooling2D("max", (2, 2), (2, 2), (0, 0))(x)[0, :, :, 0].numpy().tolist()
    [[4.0, 5.0], [7.0, 8.0]]
    """

    def __init__(self, method: str, pool_size, strides, padding=(0, 0), ceil_mode: bool = True, **kwargs):
        super().__init__(**kwargs)
        if method not in ("max", "ave"):
            raise ValueError(f"CaffePooling2D: method must be 'max' or 'ave'; got {method!r}")
        self.method = method
        self.pool_size = tuple(int(v) for v in pool_size)
        self.strides = tuple(int(v) for v in strides)
        self.padding = tuple(int(v) for v in padding)
        self.ceil_mode = bool(ceil_mode)

    def _geometry(self, height: int, width: int):
        any_pad = any(self.padding)
        outs, extras = [], []
        for size, k, s, p in zip((height, width), self.pool_size, self.strides, self.padding):
            out = pool_output_size(size, k, s, p, self.ceil_mode, any_pad)
            outs.append(out)
            extras.append(max(0, (out - 1) * s + k - p - size))
        return outs, extras

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        if height is None or width is None:
            raise ValueError(f"{self.name}: CaffePooling2D needs a known input height and width")
        (out_h, out_w), _ = self._geometry(height, width)
        return (batch, out_h, out_w, channels)

    def call(self, inputs):
        height, width = inputs.shape[1], inputs.shape[2]
        (out_h, out_w), (extra_h, extra_w) = self._geometry(height, width)
        (pad_h, pad_w), (k_h, k_w) = self.padding, self.pool_size
        pads = [[0, 0], [pad_h, extra_h], [pad_w, extra_w], [0, 0]]
        if self.method == "max":
            lowest = float(np.finfo(keras.backend.standardize_dtype(inputs.dtype)).min)
            padded = ops.pad(inputs, pads, constant_values=lowest) if any(map(any, pads)) else inputs
            pooled = ops.max_pool(padded, self.pool_size, self.strides, padding="valid")
        else:
            padded = ops.pad(inputs, pads) if any(map(any, pads)) else inputs
            pooled = ops.average_pool(padded, self.pool_size, self.strides, padding="valid")
            rows = ave_pool_divisors(height, k_h, self.strides[0], pad_h, out_h)
            cols = ave_pool_divisors(width, k_w, self.strides[1], pad_w, out_w)
            factor = (k_h * k_w) / np.outer(rows, cols)  # mean over k*k -> sum / Caffe's divisor
            if not np.all(factor == 1.0):
                pooled = pooled * ops.convert_to_tensor(factor[None, :, :, None].astype("float32"), pooled.dtype)
        return pooled[:, :out_h, :out_w, :]

    def get_config(self):
        return {**super().get_config(), "method": self.method, "pool_size": self.pool_size,
                "strides": self.strides, "padding": self.padding, "ceil_mode": self.ceil_mode}


@_serializable
class CaffeSlice(keras.layers.Layer):
    """Piece ``index`` of ``x`` split along ``axis``: ``sections`` equal parts, or at the given points.

    Works on the batch axis too (Caffe's mirror trick slices the doubled batch), where equal parts are
    computed at run time.
    """

    def __init__(self, axis: int, sections, index: int, **kwargs):
        super().__init__(**kwargs)
        self.axis = int(axis)
        self.sections = int(sections) if isinstance(sections, (int, np.integer)) else [int(v) for v in sections]
        self.index = int(index)

    def call(self, inputs):
        return ops.split(inputs, self.sections, axis=self.axis)[self.index]

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        size = shape[self.axis]
        if isinstance(self.sections, int):
            shape[self.axis] = None if size is None else size // self.sections
        else:
            bounds = [0, *self.sections, size]
            start, stop = bounds[self.index], bounds[self.index + 1]
            shape[self.axis] = None if stop is None else stop - start
        return tuple(shape)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "sections": self.sections, "index": self.index}


@_serializable
class CaffeScale(keras.layers.Layer):
    """Caffe's Scale / Bias with a learned parameter: ``y = x * scale (+ bias)``, broadcast from ``param_shape``.

    ``param_shape`` is the parameter's Keras broadcast shape without the batch axis (e.g. ``(C,)`` for
    per-channel NHWC, ``(1, 1, C)`` spelled out, or ``()`` for a scalar).
    """

    def __init__(self, param_shape, use_scale: bool = True, use_bias: bool = False,
                 scale_initializer="ones", bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.param_shape = tuple(int(v) for v in param_shape)
        self.use_scale, self.use_bias = bool(use_scale), bool(use_bias)
        self.scale_initializer = keras.initializers.get(scale_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        if self.use_scale:
            self.scale = self.add_weight(name="scale", shape=self.param_shape, initializer=self.scale_initializer)
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=self.param_shape, initializer=self.bias_initializer)

    def call(self, inputs):
        if self.use_scale:
            inputs = inputs * ops.cast(self.scale, inputs.dtype)
        if self.use_bias:
            inputs = inputs + ops.cast(self.bias, inputs.dtype)
        return inputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "param_shape": self.param_shape, "use_scale": self.use_scale,
                "use_bias": self.use_bias,
                "scale_initializer": keras.initializers.serialize(self.scale_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer)}


@_serializable
class CaffeLRN(keras.layers.Layer):
    """Caffe's LRN on NHWC input (``lrn_layer.cpp``).

    Formula:
    ```
    ACROSS_CHANNELS: y = x * (k + alpha / n * sum_{|c' - c| <= n // 2} x_c'^2) ^ -beta
    WITHIN_CHANNEL:  y = x * (1 + alpha / n^2 * sum_{n x n window, zero padded} x^2) ^ -beta
    ```
    """

    def __init__(self, local_size: int = 5, alpha: float = 1.0, beta: float = 0.75, k: float = 1.0,
                 region: str = "across", **kwargs):
        super().__init__(**kwargs)
        if region not in ("across", "within"):
            raise ValueError(f"CaffeLRN: region must be 'across' or 'within'; got {region!r}")
        self.local_size, self.alpha, self.beta, self.k = int(local_size), float(alpha), float(beta), float(k)
        self.region = region

    def call(self, inputs):
        size, half = self.local_size, (self.local_size - 1) // 2
        square = ops.square(inputs)
        if self.region == "across":
            channels = inputs.shape[-1]
            padded = ops.pad(square, [[0, 0]] * (len(inputs.shape) - 1) + [[half, half]])
            total = padded[..., 0:channels]
            for offset in range(1, size):
                total = total + padded[..., offset:offset + channels]
            scale = self.k + (self.alpha / size) * total
        else:
            padded = ops.pad(square, [[0, 0], [half, half], [half, half], [0, 0]])
            mean = ops.average_pool(padded, (size, size), (1, 1), padding="valid")
            scale = 1.0 + self.alpha * mean
        return inputs * ops.power(scale, -self.beta)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "local_size": self.local_size, "alpha": self.alpha, "beta": self.beta,
                "k": self.k, "region": self.region}


@_serializable
class CaffePower(keras.layers.Layer):
    """Caffe's Power layer: ``y = (shift + scale * x) ^ power``."""

    def __init__(self, power: float = 1.0, scale: float = 1.0, shift: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.power, self.scale, self.shift = float(power), float(scale), float(shift)

    def call(self, inputs):
        value = self.shift + self.scale * inputs
        return value if self.power == 1.0 else ops.power(value, self.power)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "power": self.power, "scale": self.scale, "shift": self.shift}


@_serializable
class Subsample2D(keras.layers.Layer):
    """Keep every ``strides``-th row and column of NHWC input (a dilated conv's stride, which Keras refuses)."""

    def __init__(self, strides=(1, 1), **kwargs):
        super().__init__(**kwargs)
        self.strides = tuple(int(v) for v in strides)

    def call(self, inputs):
        return inputs[:, :: self.strides[0], :: self.strides[1], :]

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        sizes = [None if size is None else -(-size // stride) for size, stride in zip((height, width), self.strides)]
        return (batch, *sizes, channels)

    def get_config(self):
        return {**super().get_config(), "strides": self.strides}


_REDUCTIONS = ("SUM", "ASUM", "SUMSQ", "MEAN")


@_serializable
class CaffeReduction(keras.layers.Layer):
    """Caffe's Reduction (``reduction_layer.cpp``): every axis from ``axis`` on is reduced, times ``coeff``.

    Formula:
    ```
    SUM: coeff * sum x    ASUM: coeff * sum |x|    SUMSQ: coeff * sum x^2    MEAN: coeff * sum x / count
    ```
    ``axis`` is a Keras axis of a tensor already in Caffe memory order (the handler permutes 4-D inputs).
    """

    def __init__(self, operation: str = "SUM", axis: int = 1, coeff: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if operation not in _REDUCTIONS:
            raise ValueError(f"CaffeReduction: operation must be one of {_REDUCTIONS}; got {operation!r}")
        if int(axis) < 1:
            raise ValueError(f"CaffeReduction: axis must be >= 1 (the batch is kept); got {axis}")
        self.operation, self.axis, self.coeff = operation, int(axis), float(coeff)

    def call(self, inputs):
        axes = tuple(range(self.axis, len(inputs.shape)))
        if self.operation == "ASUM":
            inputs = ops.abs(inputs)
        elif self.operation == "SUMSQ":
            inputs = ops.square(inputs)
        reduced = ops.mean(inputs, axis=axes) if self.operation == "MEAN" else ops.sum(inputs, axis=axes)
        return reduced if self.coeff == 1.0 else reduced * self.coeff

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[: self.axis])

    def get_config(self):
        return {**super().get_config(), "operation": self.operation, "axis": self.axis, "coeff": self.coeff}


@_serializable
class ChannelScale(keras.layers.Layer):
    """happynear's ChannelScale (``channel_scale_layer.cpp``/``.cu``), called on ``[x, s]``.

    Formula:
    ```
    y[n, c, p] = s[n, p] * x[n, c, p]        (one scale per sample and spatial position p, for every channel c)
    global_scale:  y = g * x                 (g: a stored scalar; s only feeds g's running value in training:
                                              g = mean|s| when g < 0, else 0.99 g + 0.01 mean|s|, clamped to
                                              [min_global_scale, max_global_scale])
    do_forward False: y = x
    gradients (the fork's backward): dL/dx = (s if backward_feature else 1) * dL/dy,
                                     dL/ds[n, p] = sum_c x dL/dy if backward_scale else 0
    ```
    ``scale_shape`` is the Keras broadcast shape of ``s`` without the batch (``(1,)`` for an (N, C) ``x``,
    ``(H, W, 1)`` for NHWC); ``s`` arrives in Caffe memory order with that many values per sample. With
    ``return_scale`` (global only) the layer also returns g as a (1,) tensor, the fork's second top.
    """

    def __init__(self, scale_shape=(1,), global_scale: bool = False, do_forward: bool = True,
                 backward_feature: bool = True, backward_scale: bool = True, min_global_scale: float = 0.0,
                 max_global_scale: float = 1000.0, return_scale: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.scale_shape = tuple(int(v) for v in scale_shape)
        self.global_scale, self.do_forward = bool(global_scale), bool(do_forward)
        self.backward_feature, self.backward_scale = bool(backward_feature), bool(backward_scale)
        self.min_global_scale, self.max_global_scale = float(min_global_scale), float(max_global_scale)
        self.return_scale = bool(return_scale)
        if self.return_scale and not self.global_scale:
            raise ValueError("ChannelScale: return_scale needs global_scale (the fork shapes no second top otherwise)")

    def build(self, input_shape):
        if self.global_scale:  # LayerSetUp: one blob, -1 until the first training forward sets it
            self.scale = self.add_weight(name="global_scale", shape=(1,), trainable=False,
                                         initializer=keras.initializers.Constant(-1.0))

    def call(self, inputs, training=None):
        x, s = inputs[0], inputs[1]
        s = ops.reshape(ops.cast(s, x.dtype), (-1, *self.scale_shape))
        g = None
        if self.global_scale:
            g = ops.cast(self.scale[0], x.dtype)
            if training:
                mean_norm = ops.mean(ops.abs(s))
                g = ops.where(g < 0, mean_norm, g * 0.99 + mean_norm * 0.01)
                g = ops.clip(g, self.min_global_scale, self.max_global_scale)
                self.scale.assign(ops.reshape(ops.cast(g, self.scale.dtype), (1,)))
        if not self.do_forward:
            value = x
        elif self.global_scale:
            value = x * g
        else:
            value = x * s
        plain = self.do_forward and not self.global_scale and self.backward_feature and self.backward_scale
        if not plain:  # the forward value, with the fork's gradients attached
            fixed_x, fixed_s = ops.stop_gradient(x), ops.stop_gradient(s)
            value = ops.stop_gradient(value) + (x - fixed_x) * (fixed_s if self.backward_feature else 1.0)
            if self.backward_scale:
                value = value + (s - fixed_s) * fixed_x
        if self.return_scale:
            return [value, ops.reshape(ops.stop_gradient(g), (1,))]
        return value

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape[0])
        return [shape, (1,)] if self.return_scale else shape

    def get_config(self):
        return {**super().get_config(), "scale_shape": self.scale_shape, "global_scale": self.global_scale,
                "do_forward": self.do_forward, "backward_feature": self.backward_feature,
                "backward_scale": self.backward_scale, "min_global_scale": self.min_global_scale,
                "max_global_scale": self.max_global_scale, "return_scale": self.return_scale}


@_serializable
class ClipConstraint(keras.constraints.Constraint):
    """Clamp a variable to [min_value, max_value] after each update (the fork clamps its blob in place)."""

    def __init__(self, min_value: float | None = None, max_value: float | None = None):
        self.min_value = None if min_value is None else float(min_value)
        self.max_value = None if max_value is None else float(max_value)

    def __call__(self, w):
        if self.min_value is not None:
            w = ops.maximum(w, self.min_value)
        if self.max_value is not None:
            w = ops.minimum(w, self.max_value)
        return w

    def get_config(self):
        return {"min_value": self.min_value, "max_value": self.max_value}


#: MeanShift's iteration count when the margin is (re)initialised from a batch (the .cu's ``MeanShift(..., 20)``).
_MEAN_SHIFT_INIT_LOOPS = 20


def _mean_shift(values, mu, loops):
    """The fork's ``GlobalLSEMarginLayer::MeanShift`` (``global_lse_margin_layer.cu``), unrolled.

    From ``mu``: up to ``loops`` times, mu = the mean of the values within 0.1 of mu, stopping once mu moves
    less than 0.001. When no value is within 0.1 of the start, mu restarts at the mean of all values without
    using up an iteration (this can only happen before the first step). Where the C++ would then loop
    forever (no value within 0.1 of the mean either), mu stays the mean.
    """
    near = ops.abs(values - mu) < 0.1
    mu = ops.where(ops.any(near), mu, ops.mean(values))
    last, done = mu, ops.zeros((), "bool")
    for step in range(_MEAN_SHIFT_INIT_LOOPS):
        near = ops.abs(values - mu) < 0.1
        count = ops.sum(ops.cast(near, values.dtype))
        total = ops.sum(ops.where(near, values, ops.zeros_like(values)))
        active = ops.logical_and(ops.logical_not(done), ops.logical_and(step < loops, count > 0))
        candidate = total / ops.maximum(count, 1.0)
        mu = ops.where(active, candidate, mu)
        converged = ops.abs(last - candidate) < 0.001
        done = ops.logical_or(done, ops.logical_and(active, converged))
        last = ops.where(ops.logical_and(active, ops.logical_not(converged)), candidate, last)
    return mu


@_serializable
class GlobalLSEMargin(keras.layers.Layer):
    """happynear's GlobalLSEMargin (``global_lse_margin_layer.cu``, GPU only in the fork), called on
    ``[logits, labels]`` (or ``[logits, labels, norms]``, the fork's third bottom).

    Formula (every call, training or not, as the fork's forward):
    ```
    s      = clip(scale, min_scale, max_scale)            (per sample: norms[n] with a third input)
    t[n]   = x[n, y_n];   M[n] = max(-1, max_{j != y_n} x[n, j])
    lse[n] = log(sum_{j != y_n} exp(s (x[n, j] - M[n]))) / s + M[n]
    margin = MeanShift(t - lse, from mean(t - lse), 20 steps)   when the stored margin is 0 (first call)
           = 0.9 margin + 0.1 MeanShift(t - lse, from margin, 1 step)   otherwise (NaN keeps the old one)
    out[n, j] = s (x[n, j] - margin [j == y_n and margin > 0])
    statistics = [s (or mean norms), mean t, mean lse, mean M, margin]      (a (5,) tensor, not per sample)
    ```
    ``margin`` is a non-trainable variable saved with the model; it is updated on every call when
    ``update_in_inference`` (the fork's behaviour, default), else only in training. Gradients flow as the
    fork's backward: the margin is a constant; ``scale`` (trainable unless ``scale_trainable=False``) gets
    ``sum(dL/dout * out) / s``.
    """

    def __init__(self, initial_scale: float = 30.0, min_scale: float = 0.0, max_scale: float = 3.4028234663852886e38,
                 scale_trainable: bool = True, per_sample_scale: bool = False, return_statistics: bool = True,
                 update_in_inference: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.initial_scale, self.min_scale, self.max_scale = float(initial_scale), float(min_scale), float(max_scale)
        self.scale_trainable, self.per_sample_scale = bool(scale_trainable), bool(per_sample_scale)
        self.return_statistics, self.update_in_inference = bool(return_statistics), bool(update_in_inference)

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(1,), trainable=self.scale_trainable,
                                     initializer=keras.initializers.Constant(self.initial_scale),
                                     constraint=ClipConstraint(self.min_scale, self.max_scale))
        self.margin = self.add_weight(name="margin", shape=(1,), trainable=False, initializer="zeros")

    def call(self, inputs, training=None):
        x = inputs[0]
        classes = x.shape[-1]
        labels = ops.cast(ops.reshape(inputs[1], (-1,)), "int32")  # static_cast<int>: truncation
        target_mask = ops.one_hot(labels, classes, dtype="bool")
        fixed_x = ops.stop_gradient(x)
        s = ops.clip(ops.cast(self.scale[0], x.dtype), self.min_scale, self.max_scale)
        if self.per_sample_scale:
            per_sample = ops.reshape(ops.cast(inputs[2], x.dtype), (-1, 1))
        else:
            per_sample = s
        fixed_scale = ops.stop_gradient(per_sample)
        target = ops.sum(ops.where(target_mask, fixed_x, ops.zeros_like(fixed_x)), axis=1)
        others = ops.where(target_mask, ops.full_like(fixed_x, -np.inf), fixed_x)
        max_negative = ops.maximum(ops.max(others, axis=1), -1.0)
        shifted = ops.where(target_mask, ops.zeros_like(fixed_x),
                            ops.exp(fixed_scale * (fixed_x - max_negative[:, None])))
        scale_column = ops.reshape(fixed_scale, (-1,)) if self.per_sample_scale else fixed_scale
        lse = ops.log(ops.sum(shifted, axis=1)) / scale_column + max_negative
        margins = target - lse
        stored = ops.cast(self.margin[0], x.dtype)
        first = stored == 0
        start = ops.where(first, ops.mean(margins), stored)
        batch_margin = _mean_shift(margins, start, ops.where(first, _MEAN_SHIFT_INIT_LOOPS, 1))
        updated = ops.where(first, batch_margin, 0.9 * stored + 0.1 * batch_margin)
        margin = ops.where(ops.isnan(batch_margin), stored, updated)
        if training or self.update_in_inference:
            self.margin.assign(ops.reshape(ops.cast(margin, self.margin.dtype), (1,)))
        subtract = ops.where(ops.logical_and(target_mask, margin > 0), margin, ops.zeros_like(x))
        out = (x - subtract) * per_sample
        if not self.return_statistics:
            return out
        first_statistic = ops.mean(fixed_scale) if self.per_sample_scale else s
        statistics = ops.stack([first_statistic, ops.mean(target), ops.mean(lse), ops.mean(max_negative), margin])
        return [out, ops.stop_gradient(statistics)]

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape[0])
        return [shape, (5,)] if self.return_statistics else shape

    def get_config(self):
        return {**super().get_config(), "initial_scale": self.initial_scale, "min_scale": self.min_scale,
                "max_scale": self.max_scale, "scale_trainable": self.scale_trainable,
                "per_sample_scale": self.per_sample_scale, "return_statistics": self.return_statistics,
                "update_in_inference": self.update_in_inference}


@_serializable
class CaffeBatchNorm(keras.layers.Layer):
    """Caffe's BatchNorm as the happynear fork computes it (``batch_norm_layer.cpp``), holding Caffe's own
    blobs: ``mean_sum``, ``variance_sum`` (per channel) and ``factor``. Used for ``disable_mean`` /
    ``disable_variance``; plain BatchNorm converts to Keras BatchNormalization.

    Formula:
    ```
    stored statistics:  mean = mean_sum / factor,  var = variance_sum / factor   (0 when factor is 0)
    y = (x - mean) / sqrt(var + eps)   without "- mean" under disable_mean, without "/ sqrt" under disable_variance
    batch statistics (training, unless use_global_stats): mean = E[x], var = E[(x - mean)^2] (E[x^2] under
    disable_mean), over every axis but the channel axis; then factor = maf factor + 1,
    mean_sum = mean + maf mean_sum (unless disable_mean), variance_sum = m/(m-1) var + maf variance_sum
    (unless disable_variance), m = values per channel in the batch.
    ```
    ``use_global_stats``: None follows Keras' ``training`` flag; True always uses the stored statistics; False
    always the batch's (and updates the sums on every call), as Caffe does.
    """

    def __init__(self, axis: int = -1, epsilon: float = 1e-5, moving_average_fraction: float = 0.999,
                 disable_mean: bool = False, disable_variance: bool = False, use_global_stats: bool | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.axis, self.epsilon = int(axis), float(epsilon)
        self.moving_average_fraction = float(moving_average_fraction)
        self.disable_mean, self.disable_variance = bool(disable_mean), bool(disable_variance)
        self.use_global_stats = None if use_global_stats is None else bool(use_global_stats)

    def build(self, input_shape):
        channels = int(input_shape[self.axis])
        self.mean_sum = self.add_weight(name="mean_sum", shape=(channels,), trainable=False, initializer="zeros")
        self.variance_sum = self.add_weight(name="variance_sum", shape=(channels,), trainable=False,
                                            initializer="zeros")
        self.factor = self.add_weight(name="factor", shape=(1,), trainable=False, initializer="zeros")

    def _broadcast(self, values, rank: int):
        shape = [1] * rank
        shape[self.axis] = -1
        return ops.reshape(values, shape)

    def call(self, inputs, training=None):
        rank = len(inputs.shape)
        axis = self.axis % rank
        reduce_axes = tuple(i for i in range(rank) if i != axis)
        batch = (not self.use_global_stats) if self.use_global_stats is not None else bool(training)
        y = inputs
        if not batch:
            factor = ops.cast(self.factor[0], inputs.dtype)
            inverse = ops.where(factor == 0, ops.zeros_like(factor), 1.0 / ops.where(factor == 0, 1.0, factor))
            if not self.disable_mean:
                y = y - self._broadcast(ops.cast(self.mean_sum, inputs.dtype) * inverse, rank)
            if not self.disable_variance:
                variance = ops.cast(self.variance_sum, inputs.dtype) * inverse
                y = y / ops.sqrt(self._broadcast(variance, rank) + self.epsilon)
            return y
        maf = self.moving_average_fraction
        self.factor.assign(self.factor * maf + 1.0)
        if not self.disable_mean:
            mean = ops.mean(inputs, axis=reduce_axes)
            y = y - self._broadcast(mean, rank)
            self.mean_sum.assign(ops.cast(ops.stop_gradient(mean), self.mean_sum.dtype) + maf * self.mean_sum)
        if not self.disable_variance:
            variance = ops.mean(ops.square(y), axis=reduce_axes)
            per_channel = 1
            for i in reduce_axes:
                per_channel = per_channel * ops.shape(inputs)[i]
            per_channel = ops.cast(per_channel, inputs.dtype)
            correction = ops.where(per_channel > 1, per_channel / ops.maximum(per_channel - 1.0, 1.0), 1.0)
            self.variance_sum.assign(ops.cast(ops.stop_gradient(variance) * correction, self.variance_sum.dtype)
                                     + maf * self.variance_sum)
            y = y / ops.sqrt(self._broadcast(variance, rank) + self.epsilon)
        return y

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "epsilon": self.epsilon,
                "moving_average_fraction": self.moving_average_fraction, "disable_mean": self.disable_mean,
                "disable_variance": self.disable_variance, "use_global_stats": self.use_global_stats}


# The other Caffe-rule layer modules register themselves on import: importing this module (as
# ``keras_margin``'s custom-objects entry point does) makes every converted file loadable.
from converters.caffe import agent_layers, label_layers  # noqa: E402,F401
