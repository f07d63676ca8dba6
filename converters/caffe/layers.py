"""Keras layers for the Caffe operations that have no exact built-in Keras equivalent.

Caffe-rule pooling (ceil mode, AVE divisors), the happynear fork's Flip and L2 Normalize, slicing, Caffe's
Scale/Bias broadcasting, LRN, Power and strided subsampling; all serializable (package "keras_margin_caffe"),
so a converted ``.keras`` file reloads once ``converters.caffe`` is imported.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

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
    """happynear's Normalize: per position, divide by the channel norm.

    Formula:
    ```
    L2: y = x / sqrt(sum_c x^2 + epsilon)      L1: y = x / (sum_c |x| + epsilon)
    ```
    ``epsilon`` is 1e-6, the fork's CPU value (its GPU code uses 1e-12).
    """

    def __init__(self, axis: int = -1, norm: str = "L2", epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        if norm not in ("L1", "L2"):
            raise ValueError(f"CaffeNormalize: norm must be 'L1' or 'L2'; got {norm!r}")
        self.axis, self.norm, self.epsilon = int(axis), norm, float(epsilon)

    def call(self, inputs):
        if self.norm == "L2":
            return inputs / ops.sqrt(ops.sum(ops.square(inputs), axis=self.axis, keepdims=True) + self.epsilon)
        return inputs / (ops.sum(ops.abs(inputs), axis=self.axis, keepdims=True) + self.epsilon)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "norm": self.norm, "epsilon": self.epsilon}


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
