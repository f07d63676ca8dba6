"""Face-model fork layers (Flip, LabelSpecificAdd, MarginInnerProduct) and the fused margin heads."""

from __future__ import annotations

import math

import keras
import numpy as np

from converters.caffe.fusion import HEAD_TYPE
from converters.caffe.handlers.common import (
    _dense_input,
    _initializer,
    _keep_filler,
    _known,
    _normalize_rows,
    dense_kernel,
)
from converters.caffe.handlers.convolution import RowNormalizedInnerProductStandIn
from converters.caffe.layers import (
    Flip,
)
from converters.caffe.registry import Built, Handler, register
from converters.caffe.shapes import canonical_axis
from converters.caffe.stand_ins import StandIn, python_layer

# ----------------------------------------------------------------------------------------------------
# Face-model fork layers and the margin heads
# ----------------------------------------------------------------------------------------------------


class FlipStandIn(StandIn):
    """Flip: reverse W (and H) of an N x C x H x W blob."""

    def forward(self, inputs):
        x = inputs[0]
        if x.ndim == 4 and self.config.get("width", True):
            x = x[..., ::-1]
        if x.ndim == 4 and self.config.get("height", False):
            x = x[..., ::-1, :]
        return [np.ascontiguousarray(x)]


@register("Flip")
class FlipHandler(Handler):
    def opencv_layer(self, layer, copy):
        p = layer.flip_param
        return python_layer(copy, FlipStandIn, {"width": p.flip_width, "height": p.flip_height})

    def build(self, ctx, layer, inputs, weights):
        p, rank = layer.param.flip_param, len(layer.input_shapes[0])
        axes = []
        if rank == 4:  # Flip indexes the blob as N x C x H x W; lower ranks have H = W = 1
            axes = ([2] if p.flip_width else []) + ([1] if p.flip_height else [])
        if not axes:
            return Built([inputs[0]])
        return Built([Flip(axes, name=ctx.name(layer))(inputs[0])])


@register("LabelSpecificAdd")
class LabelSpecificAddHandler(Handler):
    """Identity at inference (the fork returns early in TEST); the label bottom is not needed."""

    def opencv_layer(self, layer, copy):  # identity at inference: a Split of the logits
        copy.ClearField("label_specific_add_param")
        copy.type = "Split"
        del copy.bottom[1:]
        return None

    def used_bottoms(self, layer):
        return 1

    def build(self, ctx, layer, inputs, weights):
        return Built([inputs[0]] * len(layer.tops),
                     notes=[f"layer '{layer.name}': LabelSpecificAdd is the identity at inference; its margin "
                            "is not in the model (no AMSoftmaxHead pattern was found around it)"])


@register("MarginInnerProduct")
class MarginInnerProductHandler(Handler):
    """Label-free logits ``x . w_hat`` (Caffe's non-label columns) as a Dense layer; used when SphereFace's
    layer feeds other layers, so it cannot become a ``SphereFaceHead``."""

    def used_bottoms(self, layer):
        return 1

    def opencv_layer(self, layer, copy):
        p = layer.margin_inner_product_param
        return python_layer(copy, RowNormalizedInnerProductStandIn, {"num_output": p.num_output, "axis": p.axis,
                                                                     "eps": 0.0}, keep_bottoms=1, keep_tops=1)

    def output_shapes(self, layer):
        p = layer.param.margin_inner_product_param
        axis = canonical_axis(p.axis, len(layer.input_shapes[0]))
        _known(layer, layer.input_shapes[0])
        return [(*layer.input_shapes[0][:axis], p.num_output)] + [(1,)] * (len(layer.tops) - 1)

    def weight_shapes(self, layer):
        p = layer.param.margin_inner_product_param
        axis = canonical_axis(p.axis, len(layer.input_shapes[0]))
        return [(p.num_output, math.prod(layer.input_shapes[0][axis:]))]

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.margin_inner_product_param
        if len(layer.tops) > 1:
            raise layer.error("MarginInnerProduct's second top (lambda) does not convert")
        bottom = layer.input_shapes[0]
        axis = canonical_axis(p.axis, len(bottom))
        if axis != len(bottom) - 1 and not (len(bottom) == 4 and axis == 1):
            raise layer.error(f"margin_inner_product_param.axis {p.axis} does not convert")
        x = _dense_input(ctx, layer, inputs[0], bottom, axis)
        dense = keras.layers.Dense(p.num_output, use_bias=False, name=ctx.name(layer),
                                   kernel_initializer=_initializer(weights, None, "glorot_uniform"))
        y = dense(x)
        _keep_filler(dense, "kernel_initializer", None, "glorot_uniform")
        assign = []
        if weights is not None:
            weight = _normalize_rows(weights[0], p.num_output, 0.0)
            assign.append((dense, [dense_kernel(weight, bottom, axis, False)]))
        return Built([y], weights=assign, notes=[
            f"layer '{layer.name}': MarginInnerProduct feeds other layers, so it converts to its label-free "
            "logits x.w_hat (a Dense layer); the SphereFace margin is not in the model"])


@register(HEAD_TYPE)
class HeadHandler(Handler):
    """Any fused head (``layer.head``, a ``fusion.HeadSpec``): called on the embedding alone, it outputs
    cos(theta) (batch, num_classes). The kernel comes from the caffemodel (rows normalised with the Caffe
    layer's eps); the head's other variables take the spec's ``state`` by name."""

    def output_shapes(self, layer):
        return [(None, layer.head.num_classes)]

    def weight_shapes(self, layer):
        return list(layer.weight_shapes[:1])

    def build(self, ctx, layer, inputs, weights):
        from keras_margin import layers as margin_layers  # the core package; imported only when a head is built

        spec = layer.head
        head_class = getattr(margin_layers, spec.head_class, None)
        if head_class is None:
            raise layer.error(f"keras_margin.layers has no head {spec.head_class!r}")
        head = head_class(spec.num_classes, **spec.options, name=ctx.name(layer),
                          kernel_initializer=_initializer(weights, None, "glorot_uniform"))
        y = head(inputs[0])
        _keep_filler(head, "kernel_initializer", None, "glorot_uniform")
        assign = []
        if weights is not None or spec.state:
            values = []
            for variable in head.weights:
                key = variable.path.rsplit("/", 1)[-1]
                if key == "kernel" and weights is not None:
                    weight = _normalize_rows(weights[0], spec.num_classes, spec.row_eps)
                    values.append(weight if spec.transpose else weight.T)  # Keras layout (embedding_dim, classes)
                elif key in spec.state:
                    values.append(np.asarray(spec.state[key], dtype=variable.dtype))
                else:
                    values.append(np.asarray(variable))
            assign.append((head, values))
        return Built([y], weights=assign)
