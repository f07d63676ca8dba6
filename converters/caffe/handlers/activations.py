"""Activations and element-wise maps: ReLU, PReLU, ELU, Power, Softmax, Dropout, Split."""

from __future__ import annotations

import keras
import numpy as np

from converters.caffe.handlers.common import _spatial_input, filler_initializer
from converters.caffe.layers import (
    CaffeLRN,
    CaffePower,
)
from converters.caffe.registry import Built, Handler, register
from converters.caffe.shapes import keras_axis

# ----------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------


@register("ReLU")
class ReLUHandler(Handler):
    def build(self, ctx, layer, inputs, weights):
        slope = layer.param.relu_param.negative_slope
        return Built([keras.layers.ReLU(negative_slope=slope, name=ctx.name(layer))(inputs[0])])


@register("PReLU")
class PReLUHandler(Handler):
    def weight_shapes(self, layer):
        shape = layer.input_shapes[0]
        if len(shape) < 2:
            raise layer.error(f"PReLU needs at least 2 axes; got {shape}")
        return [()] if layer.param.prelu_param.channel_shared else [(shape[1],)]

    def build(self, ctx, layer, inputs, weights):
        p, shape = layer.param.prelu_param, layer.input_shapes[0]
        rank = len(shape)
        channel = keras_axis(1, rank)
        shared = [axis for axis in range(1, rank) if p.channel_shared or axis != channel]
        filler = p.filler if p.HasField("filler") else None
        init = filler_initializer(filler, keras.initializers.Constant(0.25))
        prelu = keras.layers.PReLU(alpha_initializer=init, shared_axes=shared or None, name=ctx.name(layer))
        y = prelu(inputs[0])
        assign = []
        if weights is not None:
            alpha_shape = tuple(prelu.alpha.shape)
            assign.append((prelu, [np.asarray(weights[0], np.float32).reshape(alpha_shape)]))
        return Built([y], weights=assign)


def _activation(name):
    class _Activation(Handler):
        def build(self, ctx, layer, inputs, weights):
            return Built([keras.layers.Activation(name, name=ctx.name(layer))(inputs[0])])

    return _Activation


register("Sigmoid")(_activation("sigmoid"))
register("TanH")(_activation("tanh"))
register("BNLL")(_activation("softplus"))


@register("ELU")
class ELUHandler(Handler):
    def build(self, ctx, layer, inputs, weights):
        return Built([keras.layers.ELU(alpha=layer.param.elu_param.alpha, name=ctx.name(layer))(inputs[0])])


@register("Power")
class PowerHandler(Handler):
    def build(self, ctx, layer, inputs, weights):
        p = layer.param.power_param
        return Built([CaffePower(p.power, p.scale, p.shift, name=ctx.name(layer))(inputs[0])])


@register("Softmax")
class SoftmaxHandler(Handler):
    def build(self, ctx, layer, inputs, weights):
        rank = len(layer.input_shapes[0])
        axis = keras_axis(layer.param.softmax_param.axis, rank)
        return Built([keras.layers.Softmax(axis=axis, name=ctx.name(layer))(inputs[0])])


@register("Dropout")
class DropoutHandler(Handler):
    def opencv_layer(self, layer, copy):  # the fork's sqrt_scale only changes TRAIN
        copy.dropout_param.ClearField("sqrt_scale")
        return None

    def build(self, ctx, layer, inputs, weights):
        ratio = layer.param.dropout_param.dropout_ratio
        return Built([keras.layers.Dropout(ratio, name=ctx.name(layer))(inputs[0])])


@register("Split")
class SplitHandler(Handler):
    def build(self, ctx, layer, inputs, weights):
        return Built([inputs[0]] * len(layer.tops))


@register("LRN")
class LRNHandler(Handler):
    def build(self, ctx, layer, inputs, weights):
        p = layer.param.lrn_param
        _spatial_input(layer)
        if p.local_size % 2 == 0:
            raise layer.error(f"local_size {p.local_size} must be odd (Caffe requires it)")
        region = "across" if p.norm_region == 0 else "within"
        y = CaffeLRN(p.local_size, p.alpha, p.beta, p.k, region, name=ctx.name(layer))(inputs[0])
        return Built([y])
