"""Normalisation and affine layers: LRN, BatchNorm, Scale, Bias, Normalize."""

from __future__ import annotations

import keras
import numpy as np

from converters.caffe.handlers.common import filler_initializer
from converters.caffe.layers import (
    CaffeNormalize,
    CaffeScale,
)
from converters.caffe.registry import Built, Handler, register
from converters.caffe.shapes import canonical_axis, keras_axis
from converters.caffe.stand_ins import StandIn, python_layer

# ----------------------------------------------------------------------------------------------------
# Normalisation and affine layers
# ----------------------------------------------------------------------------------------------------


@register("BatchNorm")
class BatchNormHandler(Handler):
    def weight_shapes(self, layer):
        c = layer.input_shapes[0][1]
        return [(c,), (c,), (1,)]

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.batch_norm_param
        rank = len(layer.input_shapes[0])
        notes = []
        if p.HasField("use_global_stats") and not p.use_global_stats:
            notes.append(f"layer '{layer.name}': use_global_stats is false; the model uses the stored statistics "
                         "at inference (Keras BatchNormalization, training=False)")
        bn = keras.layers.BatchNormalization(
            axis=keras_axis(1, rank), epsilon=p.eps, momentum=p.moving_average_fraction,
            center=False, scale=False, name=ctx.name(layer),
        )
        y = bn(inputs[0])
        if p.HasField("use_global_stats") and p.use_global_stats:
            bn.trainable = False  # Keras then normalises with the stored statistics in training too, as Caffe does
            notes.append(f"layer '{layer.name}': use_global_stats is true; the BatchNormalization layer is frozen")
        assign = []
        if weights is not None:
            factor = float(weights[2].reshape(-1)[0])
            inverse = 0.0 if factor == 0 else 1.0 / factor  # Caffe: a zero factor gives zero statistics
            assign.append((bn, [weights[0] * inverse, weights[1] * inverse]))
        return Built([y], weights=assign, notes=notes)


def _param_span(layer, axis_value, num_axes_value, name):
    shape = layer.input_shapes[0]
    rank = len(shape)
    axis = canonical_axis(axis_value, rank)
    if num_axes_value < -1:
        raise layer.error(f"{name}.num_axes must be >= -1")
    stop = rank if num_axes_value == -1 else axis + num_axes_value
    if stop > rank:
        raise layer.error(f"{name}: axis {axis_value} + num_axes {num_axes_value} exceeds the {rank}-D bottom")
    if num_axes_value == 0:
        return axis, stop, ()
    if axis == 0:
        raise layer.error(f"{name}.axis 0 would give one parameter per sample of the batch; it does not convert")
    return axis, stop, tuple(shape[axis:stop])


def _keras_param(layer, array: np.ndarray, axis: int, stop: int) -> np.ndarray:
    """A Caffe parameter over bottom axes [axis, stop) as a Keras broadcast array (no batch axis)."""
    rank = len(layer.input_shapes[0])
    if stop == axis:  # scalar
        return np.asarray(array, np.float32).reshape(())
    full = [1] * rank
    full[axis:stop] = layer.input_shapes[0][axis:stop]
    array = np.asarray(array, np.float32).reshape(full)
    if rank == 4:
        array = array.transpose(0, 2, 3, 1)
    return array[0]


def _keras_param_shape(layer, axis, stop):
    probe = np.zeros(tuple(layer.input_shapes[0][axis:stop]) or (), np.float32)
    return _keras_param(layer, probe, axis, stop).shape


class ClampedScaleStandIn(StandIn):
    """The fork's Scale with ``min_value`` / ``max_value``: the blob clamped, then Caffe's Scale."""

    def forward(self, inputs):
        x = inputs[0]
        axis, num_axes = self.config["axis"], self.config["num_axes"]
        axis = axis + x.ndim if axis < 0 else axis
        stop = x.ndim if num_axes == -1 else axis + num_axes
        shape = [1] * x.ndim
        shape[axis:stop] = x.shape[axis:stop]
        scale = np.clip(self.blobs[0], self.config.get("min"), self.config.get("max"))
        y = x * scale.reshape(shape if num_axes else [1] * x.ndim)
        if self.config.get("bias_term"):
            y = y + self.blobs[1].reshape(shape if num_axes else [1] * x.ndim)
        return [y.astype(np.float32)]


@register("Scale")
class ScaleHandler(Handler):
    def opencv_layer(self, layer, copy):  # the fork clamps the scale blob to [min_value, max_value]
        p = layer.scale_param
        if not (p.HasField("min_value") or p.HasField("max_value")):
            return None
        return python_layer(copy, ClampedScaleStandIn,
                            {"axis": p.axis, "num_axes": p.num_axes, "bias_term": p.bias_term,
                             "min": p.min_value if p.HasField("min_value") else None,
                             "max": p.max_value if p.HasField("max_value") else None})

    def _span(self, layer):
        if len(layer.bottoms) > 1:
            raise layer.error("Scale with a second bottom (a computed scale) does not convert; "
                              "register a handler for it")
        p = layer.param.scale_param
        return _param_span(layer, p.axis, p.num_axes, "scale_param")

    def weight_shapes(self, layer):
        _, _, param_shape = self._span(layer)
        return [param_shape, param_shape] if layer.param.scale_param.bias_term else [param_shape]

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.scale_param
        axis, stop, _ = self._span(layer)
        default_scale = keras.initializers.Constant(1.0)
        scale_init = filler_initializer(p.filler if p.HasField("filler") else None, default_scale)
        bias_init = filler_initializer(p.bias_filler if p.HasField("bias_filler") else None, "zeros")
        if weights is None and (p.HasField("min_value") or p.HasField("max_value")):
            raise layer.error("scale_param.min_value/max_value need the caffemodel's scale blob to clamp")
        layer_obj = CaffeScale(_keras_param_shape(layer, axis, stop), use_scale=True, use_bias=p.bias_term,
                               scale_initializer=scale_init, bias_initializer=bias_init, name=ctx.name(layer))
        y = layer_obj(inputs[0])
        assign = []
        if weights is not None:
            scale = np.asarray(weights[0], np.float32)
            if p.HasField("min_value") or p.HasField("max_value"):  # happynear clamps the blob before use
                scale = np.clip(scale, p.min_value if p.HasField("min_value") else None,
                                p.max_value if p.HasField("max_value") else None)
            arrays = [_keras_param(layer, scale, axis, stop)]
            if p.bias_term:
                arrays.append(_keras_param(layer, weights[1], axis, stop))
            assign.append((layer_obj, arrays))
        return Built([y], weights=assign)


@register("Bias")
class BiasHandler(Handler):
    def _span(self, layer):
        if len(layer.bottoms) > 1:
            raise layer.error("Bias with a second bottom does not convert; register a handler for it")
        p = layer.param.bias_param
        return _param_span(layer, p.axis, p.num_axes, "bias_param")

    def weight_shapes(self, layer):
        return [self._span(layer)[2]]

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.bias_param
        axis, stop, _ = self._span(layer)
        init = filler_initializer(p.filler if p.HasField("filler") else None, "zeros")
        layer_obj = CaffeScale(_keras_param_shape(layer, axis, stop), use_scale=False, use_bias=True,
                               bias_initializer=init, name=ctx.name(layer))
        y = layer_obj(inputs[0])
        assign = [(layer_obj, [_keras_param(layer, weights[0], axis, stop)])] if weights is not None else []
        return Built([y], weights=assign)


class NormalizeStandIn(StandIn):
    """The fork's Normalize (CPU code): over channels, ``x / sqrt(sum x^2 + 1e-6)`` (L2) or ``x / (sum |x| +
    1e-6)`` (L1)."""

    def forward(self, inputs):
        x = inputs[0].astype(np.float64)
        if self.config.get("type", "L2") == "L2":
            y = x / np.sqrt(np.sum(x * x, axis=1, keepdims=True) + 1e-6)
        else:
            y = x / (np.sum(np.abs(x), axis=1, keepdims=True) + 1e-6)
        return [y.astype(np.float32)]


@register("Normalize")
class NormalizeHandler(Handler):
    def opencv_layer(self, layer, copy):
        return python_layer(copy, NormalizeStandIn, {"type": layer.normalize_param.normalize_type})

    blob_note = ("happynear's L2 Normalize has no blobs; a Normalize with a scale blob is SSD's NormalizeBBox "
                 "(norm_param): register a handler for it with @register('Normalize', replace=True)")

    def output_shapes(self, layer):
        if len(layer.tops) > 1:
            raise layer.error("Normalize's second top (the norm) does not convert")
        if len(layer.input_shapes[0]) < 2:
            raise layer.error(f"Normalize needs at least 2 axes; got {layer.input_shapes[0]}")
        return [layer.input_shapes[0]]

    def build(self, ctx, layer, inputs, weights):
        kind = layer.param.normalize_param.normalize_type
        if kind not in ("L1", "L2"):
            raise layer.error(f"normalize_type {kind!r} does not convert (L1 or L2)")
        axis = keras_axis(1, len(layer.input_shapes[0]))
        return Built([CaffeNormalize(axis=axis, norm=kind, name=ctx.name(layer))(inputs[0])])
