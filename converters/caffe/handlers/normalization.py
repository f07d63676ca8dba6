"""Normalisation and affine layers: BatchNorm (BVLC and happynear), Scale, Bias, Normalize (with its norm)."""

from __future__ import annotations

import keras
import numpy as np

from converters.caffe.errors import ConversionError
from converters.caffe.fork import FORK_EPS
from converters.caffe.handlers.common import filler_initializer
from converters.caffe.layers import (
    CaffeBatchNorm,
    CaffeNormalize,
    CaffeScale,
)
from converters.caffe.registry import Built, Handler, register
from converters.caffe.shapes import canonical_axis, keras_axis
from converters.caffe.stand_ins import StandIn, python_layer

# ----------------------------------------------------------------------------------------------------
# Normalisation and affine layers
# ----------------------------------------------------------------------------------------------------


#: Layer types only the happynear fork (caffe-windows) defines: a net using one was written for that fork.
HAPPYNEAR_LAYER_TYPES = frozenset({
    "ChannelScale", "GlobalLSEMargin", "LabelSpecificAdd", "LabelSpecificAffine", "LabelSpecificMargin",
    "LabelSpecificRescale", "LabelSpecificHardMargin", "LabelSpecificStatistics", "Flip", "Normalize",
    "InnerDistance", "EltwiseAffine", "Insanity", "GeneralContrastiveLoss", "GeneralTripletLoss",
})
#: ``BatchNormParameter.moving_average_fraction``'s default: BVLC's .proto says 0.999, happynear's 0.99.
BVLC_MOVING_AVERAGE_FRACTION = 0.999
HAPPYNEAR_MOVING_AVERAGE_FRACTION = 0.99


def is_happynear(plan) -> bool:
    """Whether the net was written for the happynear fork: the reader's ``dialect`` when the plan (or its net)
    records one, else detected from the layer types (any fork-only type)."""
    for holder in (plan, getattr(plan, "net", None)):
        dialect = getattr(holder, "dialect", None) if holder is not None else None
        if dialect is not None:
            text = str(getattr(dialect, "value", dialect)).lower()
            return "happynear" in text or text in ("hn", "hn-ms", "hn_ms")
    return any(layer.type in HAPPYNEAR_LAYER_TYPES for layer in getattr(plan, "caffe_layers", []) or [])


def moving_average_fraction(ctx, layer) -> float:
    """The layer's ``moving_average_fraction``, or its dialect's default when the prototxt leaves it unset."""
    p = layer.param.batch_norm_param
    if p.HasField("moving_average_fraction"):
        return float(p.moving_average_fraction)
    return HAPPYNEAR_MOVING_AVERAGE_FRACTION if is_happynear(ctx.plan) else BVLC_MOVING_AVERAGE_FRACTION


class CaffeBatchNormStandIn(StandIn):
    """happynear's BatchNorm with the stored statistics (TEST): ``x - sum/factor`` unless ``disable_mean``,
    divided by ``sqrt(var_sum/factor + eps)`` unless ``disable_variance`` (OpenCV ignores both flags)."""

    def forward(self, inputs):
        x = inputs[0].astype(np.float64)
        shape = [1] * x.ndim
        if x.ndim > 1:
            shape[1] = -1
        factor = float(self.blobs[2].reshape(-1)[0]) if len(self.blobs) > 2 else 0.0
        inverse = 0.0 if factor == 0 else 1.0 / factor
        if not self.config["disable_mean"]:
            x = x - (self.blobs[0].astype(np.float64) * inverse).reshape(shape)
        if not self.config["disable_variance"]:
            x = x / np.sqrt((self.blobs[1].astype(np.float64) * inverse).reshape(shape) + self.config["eps"])
        return [x.astype(np.float32)]


@register("BatchNorm")
class BatchNormHandler(Handler):
    """Caffe's BatchNorm (blobs: mean sum, variance sum, factor). Plain: a Keras BatchNormalization with the
    statistics divided by the factor. happynear's ``disable_mean`` / ``disable_variance`` (which act with the
    stored statistics too, in ``batch_norm_layer.cpp``): a ``CaffeBatchNorm`` holding the blobs as they are.
    An unset ``moving_average_fraction`` takes the dialect's default (0.99 happynear, 0.999 BVLC)."""

    statistics_blobs = True  # running statistics, not gradients: lr_mult does not freeze them

    def opencv_layer(self, layer, copy):
        p = layer.batch_norm_param
        if not (p.disable_mean or p.disable_variance):
            return None
        return python_layer(copy, CaffeBatchNormStandIn, {"disable_mean": p.disable_mean,
                                                          "disable_variance": p.disable_variance, "eps": p.eps})

    def weight_shapes(self, layer):
        shape = layer.input_shapes[0]
        c = 1 if len(shape) == 1 else shape[1]
        if c is None:
            raise layer.error(f"needs a known channel count; got bottom shape {shape}")
        return [(c,), (c,), (1,)]

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.batch_norm_param
        rank = len(layer.input_shapes[0])
        momentum = moving_average_fraction(ctx, layer)
        notes = []
        if not p.HasField("moving_average_fraction") and momentum == HAPPYNEAR_MOVING_AVERAGE_FRACTION:
            notes.append(f"layer '{layer.name}': moving_average_fraction unset; the happynear fork's default "
                         f"{momentum:g} (BVLC: {BVLC_MOVING_AVERAGE_FRACTION:g}) is the Keras momentum")
        if p.disable_mean or p.disable_variance:
            return self._build_fork(ctx, layer, inputs, weights, momentum, notes)
        if rank == 1:
            raise layer.error("a 1-D bottom (one channel, the batch axis) does not convert")
        if p.HasField("use_global_stats") and not p.use_global_stats:
            notes.append(f"layer '{layer.name}': use_global_stats is false; the model uses the stored statistics "
                         "at inference (Keras BatchNormalization, training=False)")
        bn = keras.layers.BatchNormalization(
            axis=keras_axis(1, rank), epsilon=p.eps, momentum=momentum,
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

    def _build_fork(self, ctx, layer, inputs, weights, momentum, notes):
        p = layer.param.batch_norm_param
        rank = len(layer.input_shapes[0])
        if rank == 1:
            raise layer.error("a 1-D bottom (one channel, the batch axis) does not convert")
        use_global = bool(p.use_global_stats) if p.HasField("use_global_stats") else None
        bn = CaffeBatchNorm(axis=keras_axis(1, rank), epsilon=p.eps, moving_average_fraction=momentum,
                            disable_mean=p.disable_mean, disable_variance=p.disable_variance,
                            use_global_stats=use_global, name=ctx.name(layer))
        y = bn(inputs[0])
        flags = " and ".join(flag for flag in ("disable_mean", "disable_variance") if getattr(p, flag))
        notes.append(f"layer '{layer.name}': {flags} set; a CaffeBatchNorm (the fork's arithmetic on the Caffe "
                     "blobs) replaces Keras BatchNormalization")
        assign = []
        if weights is not None:
            assign.append((bn, [np.asarray(weights[0], np.float32).reshape(-1),
                                np.asarray(weights[1], np.float32).reshape(-1),
                                np.asarray(weights[2], np.float32).reshape(1)]))
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
    """The fork's Normalize (CPU code, ``normalize_layer.cpp``): over channels, ``norm = sqrt(sum x^2 + 1e-6)``
    (L2) or ``sum |x| + 1e-6`` (L1), ``y = x / norm``; the second top, when there is one, is ``norm``."""

    def getMemoryShapes(self, inputs):  # noqa: N802 (OpenCV's name)
        if not self.config.get("norm_top"):
            return [inputs[0]]
        norm = list(inputs[0])
        norm[1] = 1
        return [inputs[0], norm]

    def forward(self, inputs):
        x = inputs[0].astype(np.float64)
        if self.config.get("type", "L2") == "L2":
            norm = np.sqrt(np.sum(x * x, axis=1, keepdims=True) + FORK_EPS)
        else:
            norm = np.sum(np.abs(x), axis=1, keepdims=True) + FORK_EPS
        outputs = [(x / norm).astype(np.float32)]
        if self.config.get("norm_top"):
            outputs.append(norm.astype(np.float32))
        return outputs


@register("Normalize")
class NormalizeHandler(Handler):
    """happynear's Normalize over the channel axis; a second top is the norm (N x 1 x H x W; N x 1 for a 2-D
    bottom), whose gradient reaches the bottom only with ``bp_norm: true``."""

    def check_fields(self, layer, unknown_fields):
        if any(field.layer == layer.name and ".norm_param" in field.path for field in unknown_fields):
            raise ConversionError(
                "has norm_param: this is SSD's NormalizeBBox, not happynear's L2 Normalize; register a handler "
                "for it with @register('Normalize', replace=True)", layer=layer.name, layer_type=layer.type,
            )

    def opencv_layer(self, layer, copy):
        return python_layer(copy, NormalizeStandIn, {"type": layer.normalize_param.normalize_type,
                                                     "norm_top": len(layer.top) > 1})

    blob_note = ("happynear's L2 Normalize has no blobs; a Normalize with a scale blob is SSD's NormalizeBBox "
                 "(norm_param): register a handler for it with @register('Normalize', replace=True)")

    def output_shapes(self, layer):
        shape = layer.input_shapes[0]
        if len(layer.tops) > 2:
            raise layer.error(f"Normalize has at most 2 tops (the normalised blob and the norm); got {len(layer.tops)}")
        if not 2 <= len(shape) <= 4:
            raise layer.error(f"Normalize reads its bottom as N x C x H x W: it needs 2 to 4 axes; got {shape}")
        if len(layer.tops) == 1:
            return [shape]
        return [shape, (shape[0], 1, *shape[2:])]

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.normalize_param
        kind = p.normalize_type
        if kind not in ("L1", "L2"):
            raise layer.error(f"normalize_type {kind!r} does not convert (L1 or L2)")
        axis = keras_axis(1, len(layer.input_shapes[0]))
        if len(layer.tops) == 1:
            return Built([CaffeNormalize(axis=axis, norm=kind, name=ctx.name(layer))(inputs[0])])
        y, norm = CaffeNormalize(axis=axis, norm=kind, return_norm=True, norm_gradient=p.bp_norm,
                                 name=ctx.name(layer))(inputs[0])
        return Built([y, norm])
