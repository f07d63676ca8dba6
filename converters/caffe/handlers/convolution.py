"""Convolution, Deconvolution, Pooling and InnerProduct."""

from __future__ import annotations

import math

import keras
import numpy as np

from converters.caffe import shapes
from converters.caffe.agent_layers import SecondBottomInnerProduct
from converters.caffe.handlers.common import (
    ROW_NORM_EPS,
    _check_positive,
    _conv_geometry,
    _dense_input,
    _initializer,
    _keep_filler,
    _known,
    _normalize_rows,
    _opt,
    _pair,
    _spatial_input,
    dense_kernel,
    from_caffe_order,
)
from converters.caffe.layers import (
    CaffePooling2D,
    CaffeSlice,
    Subsample2D,
)
from converters.caffe.registry import Built, Handler, register
from converters.caffe.shapes import canonical_axis
from converters.caffe.stand_ins import NotRun, StandIn, python_layer

# ----------------------------------------------------------------------------------------------------
# Convolution, pooling, inner product
# ----------------------------------------------------------------------------------------------------


def _check_blob_counts(layer, several: bool = True) -> None:
    """Caffe's BaseConvolutionLayer has ``EqualNumBottomTopBlobs``: top k is bottom k convolved with the one set of
    weights, and every bottom has the same shape."""
    bottoms, tops = len(layer.bottoms), len(layer.tops)
    if not bottoms:
        raise layer.error(f"has no bottom; a {layer.type} layer reads at least one blob: name its input blob in "
                          "`bottom`")
    if bottoms != tops:
        raise layer.error(f"has {bottoms} bottom(s) and {tops} top(s); Caffe requires as many tops as bottoms (each "
                          "bottom is convolved into its own top, with the same weights): give one top per bottom, "
                          "or remove the extra bottom")
    if bottoms > 1 and not several:
        raise layer.error(f"{layer.type} with {bottoms} bottoms does not convert; split it into layers of one bottom")
    first = layer.input_shapes[0]
    for index, shape in enumerate(layer.input_shapes[1:], start=1):
        if tuple(shape) != tuple(first):
            raise layer.error(f"bottom {index} has shape {tuple(shape)}, bottom 0 {tuple(first)}; Caffe requires "
                              "every bottom of a convolution to have the same shape")


def _check_group(layer, p, c: int) -> None:
    if p.group < 1:
        raise layer.error("convolution_param.group is 0; it must be >= 1 (1: no grouping, the default)")
    if c % p.group or p.num_output % p.group:
        raise layer.error(f"convolution_param.group {p.group} must divide both the {c} input and {p.num_output} "
                          "output channels")


@register("Convolution")
class ConvolutionHandler(Handler):
    def _geometry(self, layer):
        p = layer.param.convolution_param
        if canonical_axis(p.axis, len(layer.input_shapes[0])) != 1:
            raise layer.error(f"convolution_param.axis {p.axis} is not the channel axis; only axis 1 converts")
        return _conv_geometry(layer, p)

    def output_shapes(self, layer):
        _check_blob_counts(layer)
        n, c, h, w = _spatial_input(layer)
        p = layer.param.convolution_param
        kernel, stride, pad, dilation = self._geometry(layer)
        if not p.num_output:
            raise layer.error("convolution_param.num_output is required")
        _check_group(layer, p, c)
        out = [shapes.conv_output_size(size, k, s, q, d)
               for size, k, s, q, d in zip((h, w), kernel, stride, pad, dilation)]
        return [_check_positive(layer, (n, p.num_output, *out), "the output")] * len(layer.tops)

    def weight_shapes(self, layer):
        p = layer.param.convolution_param
        c = layer.input_shapes[0][1]
        kernel, *_ = self._geometry(layer)
        blobs = [(p.num_output, c // p.group, *kernel)]
        return blobs + [(p.num_output,)] if p.bias_term else blobs

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.convolution_param
        kernel, stride, pad, dilation = self._geometry(layer)
        symmetric_same = stride == (1, 1) and all(2 * q == d * (k - 1) for q, d, k in zip(pad, dilation, kernel))
        padder = None
        if symmetric_same and any(pad):
            padding = "same"  # stride 1: TF's "same" pads (k-1)/2 on both sides, exactly Caffe's symmetric pad
        else:
            padding = "valid"
            if any(pad):
                padder = keras.layers.ZeroPadding2D(pad, name=ctx.name(layer, "pad"))
        subsample = stride if stride != (1, 1) and dilation != (1, 1) else None
        weight_filler = p.weight_filler if p.HasField("weight_filler") else None
        bias_filler = p.bias_filler if p.HasField("bias_filler") else None
        conv = keras.layers.Conv2D(
            p.num_output, kernel, strides=(1, 1) if subsample else stride, padding=padding,
            dilation_rate=dilation, groups=p.group, use_bias=p.bias_term, name=ctx.name(layer),
            kernel_initializer=_initializer(weights, weight_filler, "glorot_uniform"),
            bias_initializer=_initializer(weights, bias_filler, "zeros"),
        )
        sampler = Subsample2D(subsample, name=ctx.name(layer, "stride")) if subsample else None
        outputs = []
        for x in inputs:  # one top per bottom, all through the same layers (Caffe's shared weights)
            y = conv(padder(x) if padder is not None else x)
            if sampler is not None:  # Keras refuses stride > 1 with dilation > 1: dilate at stride 1, then subsample
                y = sampler(y)
            outputs.append(y)
        _keep_filler(conv, "kernel_initializer", weight_filler, "glorot_uniform")
        _keep_filler(conv, "bias_initializer", bias_filler, "zeros")
        assign = []
        if weights is not None:
            arrays = [weights[0].transpose(2, 3, 1, 0)]
            if p.bias_term:
                arrays.append(weights[1])
            assign.append((conv, arrays))
        return Built(outputs, weights=assign)


@register("Deconvolution")
class DeconvolutionHandler(Handler):
    def output_shapes(self, layer):
        _check_blob_counts(layer, several=False)
        n, c, h, w = _spatial_input(layer)
        p = layer.param.convolution_param
        kernel, stride, pad, dilation = _conv_geometry(layer, p)
        if dilation != (1, 1):
            raise layer.error("dilated Deconvolution does not convert")
        _check_group(layer, p, c)
        out = [shapes.deconv_output_size(size, k, s, q) for size, k, s, q in zip((h, w), kernel, stride, pad)]
        return [_check_positive(layer, (n, p.num_output, *out), "the output")] * len(layer.tops)

    def weight_shapes(self, layer):
        p = layer.param.convolution_param
        c = layer.input_shapes[0][1]
        kernel, *_ = _conv_geometry(layer, p)
        blobs = [(c, p.num_output // p.group, *kernel)]
        return blobs + [(p.num_output,)] if p.bias_term else blobs

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.convolution_param
        kernel, stride, pad, _ = _conv_geometry(layer, p)
        c, group = layer.input_shapes[0][1], p.group
        per_in, per_out = c // group, p.num_output // group
        pieces, assign = [], []
        for g in range(group):
            x = inputs[0]
            if group > 1:
                x = CaffeSlice(-1, [per_in * i for i in range(1, group)], g, name=ctx.name(layer, f"group{g}_in"))(x)
            weight_filler = p.weight_filler if p.HasField("weight_filler") else None
            deconv = keras.layers.Conv2DTranspose(
                per_out, kernel, strides=stride, padding="valid", use_bias=p.bias_term,
                name=ctx.name(layer) if group == 1 else ctx.name(layer, f"group{g}"),
                kernel_initializer=_initializer(weights, weight_filler, "glorot_uniform"),
            )
            pieces.append(deconv(x))
            _keep_filler(deconv, "kernel_initializer", weight_filler, "glorot_uniform")
            if weights is not None:
                block = weights[0][g * per_in:(g + 1) * per_in]  # (C_in/g, O/g, kh, kw)
                arrays = [block.transpose(2, 3, 1, 0)]
                if p.bias_term:
                    arrays.append(weights[1][g * per_out:(g + 1) * per_out])
                assign.append((deconv, arrays))
        y = pieces[0] if group == 1 else keras.layers.Concatenate(axis=-1, name=ctx.name(layer, "concat"))(pieces)
        if any(pad):  # Caffe's output drops `pad` rows/columns on each side
            y = keras.layers.Cropping2D(pad, name=ctx.name(layer, "crop"))(y)
        return Built([y] * len(layer.tops), weights=assign)


@register("Pooling")
class PoolingHandler(Handler):
    def opencv_layer(self, layer, copy):  # OpenCV reads ceil_mode, not BVLC's round_mode
        p = copy.pooling_param
        if p.round_mode == 1:
            p.ceil_mode = False
        p.ClearField("round_mode")
        return None

    def _geometry(self, layer):
        p = layer.param.pooling_param
        n, c, h, w = _spatial_input(layer)
        method = {0: "max", 1: "ave"}.get(p.pool)
        if method is None:
            pool_name = p.DESCRIPTOR.fields_by_name["pool"].enum_type.values_by_number[p.pool].name
            raise layer.error(f"pool: {pool_name} does not convert (only MAX and AVE)")
        if p.global_pooling:
            if p.HasField("kernel_size") or p.HasField("kernel_h") or any(
                getattr(p, name) for name in ("pad", "pad_h", "pad_w")
            ):
                raise layer.error("global_pooling cannot be combined with a kernel size or padding")
            return method, (h, w), (1, 1), (0, 0), True, True
        kernel = _pair(layer, [p.kernel_size] if p.HasField("kernel_size") else [],
                       _opt(p, "kernel_h"), _opt(p, "kernel_w"), "kernel_size")
        stride = _pair(layer, [p.stride] if p.HasField("stride") else [],
                       _opt(p, "stride_h"), _opt(p, "stride_w"), "stride", (1, 1))
        pad = _pair(layer, [p.pad] if p.HasField("pad") else [], _opt(p, "pad_h"), _opt(p, "pad_w"), "pad", (0, 0))
        if min(kernel) < 1 or min(stride) < 1:
            raise layer.error(f"kernel {kernel} and stride {stride} must be >= 1")
        if pad[0] >= kernel[0] or pad[1] >= kernel[1]:
            raise layer.error(f"pad {pad} must be smaller than the kernel {kernel}")
        ceil_mode = p.round_mode == 0 and not (p.HasField("ceil_mode") and not p.ceil_mode)
        return method, kernel, stride, pad, ceil_mode, False

    def output_shapes(self, layer):
        n, c, h, w = layer.input_shapes[0]
        method, kernel, stride, pad, ceil_mode, is_global = self._geometry(layer)
        if is_global:
            return [(n, c, 1, 1)] * len(layer.tops)
        any_pad = any(pad)
        out = [shapes.pool_output_size(size, k, s, q, ceil_mode, any_pad)
               for size, k, s, q in zip((h, w), kernel, stride, pad)]
        for axis, size, k, s, q, o in zip("hw", (h, w), kernel, stride, pad, out):
            if o > 1 and (o - 1) * s - q >= size:  # Caffe pools an empty window there (-FLT_MAX / 0)
                raise layer.error(f"stride_{axis} {s} puts the last of the {o} windows along {axis} at "
                                  f"{(o - 1) * s - q}, past the input's {size} (pad {q}): a window over no input; "
                                  f"use a stride of at most {size + q - 1} or global_pooling")
        return [_check_positive(layer, (n, c, *out), "the output")] * len(layer.tops)

    def build(self, ctx, layer, inputs, weights):
        n, c, h, w = layer.input_shapes[0]
        method, kernel, stride, pad, ceil_mode, is_global = self._geometry(layer)
        if is_global:
            cls = keras.layers.GlobalMaxPooling2D if method == "max" else keras.layers.GlobalAveragePooling2D
            y = cls(keepdims=True, name=ctx.name(layer))(inputs[0])
            return Built([y] * len(layer.tops))
        _, _, out_h, out_w = layer.output_shapes[0]
        exact = not any(pad) and (h - kernel[0]) // stride[0] + 1 == out_h and (w - kernel[1]) // stride[1] + 1 == out_w
        if exact:  # no padding, no ceil overhang: every window lies inside the image, Keras pooling is Caffe's
            cls = keras.layers.MaxPooling2D if method == "max" else keras.layers.AveragePooling2D
            y = cls(kernel, stride, padding="valid", name=ctx.name(layer))(inputs[0])
        else:
            y = CaffePooling2D(method, kernel, stride, pad, ceil_mode, name=ctx.name(layer))(inputs[0])
        return Built([y] * len(layer.tops))


class RowNormalizedInnerProductStandIn(StandIn):
    """InnerProduct ``normalize: true`` (rows normalised with eps 1e-6) and MarginInnerProduct's label-free
    ``x . w_hat`` (eps 0)."""

    def _axis(self, shape):
        axis = self.config.get("axis", 1)
        return axis + len(shape) if axis < 0 else axis

    def getMemoryShapes(self, inputs):  # noqa: N802
        return [list(inputs[0][: self._axis(inputs[0])]) + [self.config["num_output"]]]

    def forward(self, inputs):
        x = inputs[0]
        axis = self._axis(x.shape)
        n = self.config["num_output"]
        weight = self.blobs[0].astype(np.float64).reshape(n, -1)
        weight = weight / np.sqrt(np.sum(weight * weight, axis=1, keepdims=True) + self.config.get("eps", 0.0))
        weight = weight.reshape(-1, n) if self.config.get("transpose") else weight.T  # (K, N)
        flat = x.reshape(*x.shape[:axis], -1).astype(np.float64)
        y = flat @ weight
        if self.config.get("bias_term") and len(self.blobs) > 1:
            y = y + self.blobs[1].reshape(-1)
        return [y.astype(np.float32)]


@register("InnerProduct")
class InnerProductHandler(Handler):
    def opencv_layer(self, layer, copy):
        p = layer.inner_product_param
        if len(layer.bottom) > 1:
            return NotRun  # the fork's two-bottom form: its weights come from a batch-free Parameter
        if not p.normalize:
            return None
        return python_layer(copy, RowNormalizedInnerProductStandIn,
                            {"num_output": p.num_output, "axis": p.axis, "transpose": p.transpose,
                             "bias_term": p.bias_term, "eps": ROW_NORM_EPS})

    def _axis(self, layer):
        return canonical_axis(layer.param.inner_product_param.axis, len(layer.input_shapes[0]))

    def _second_bottom(self, layer) -> int:
        """N of the fork's two-bottom form (weights = bottom[1], (N, K) rows), checked."""
        p = layer.param.inner_product_param
        if len(layer.bottoms) != 2:
            raise layer.error(f"InnerProduct with {len(layer.bottoms)} bottoms does not convert (1, or 2: the "
                              "weights as the second bottom)")
        if p.bias_term:
            raise layer.error("a two-bottom InnerProduct with bias_term: true: the fork's forward then reads "
                              "blobs_[1], which it never creates; set bias_term: false")
        if p.transpose:
            raise layer.error("a two-bottom InnerProduct with transpose: true takes N from the second bottom's "
                              "first axis (K); it does not convert")
        k = math.prod(layer.input_shapes[0][self._axis(layer):])
        weight = layer.input_shapes[1]
        if len(weight) != 2 or weight[1] != k:
            raise layer.error(f"the weight bottom has shape {weight}; expected (N, {k})")
        return int(weight[0])

    def output_shapes(self, layer):
        p = layer.param.inner_product_param
        if len(layer.bottoms) > 1:
            axis = self._axis(layer)
            _known(layer, layer.input_shapes[0])
            return [(*layer.input_shapes[0][:axis], self._second_bottom(layer))] * len(layer.tops)
        if not p.num_output:
            raise layer.error("inner_product_param.num_output is required")
        axis = self._axis(layer)
        if axis == 0:
            raise layer.error("inner_product_param.axis 0 would mix samples of the batch; it does not convert")
        _known(layer, layer.input_shapes[0])
        return [(*layer.input_shapes[0][:axis], p.num_output)] * len(layer.tops)

    def weight_shapes(self, layer):
        p = layer.param.inner_product_param
        if len(layer.bottoms) > 1:
            return []
        k = math.prod(layer.input_shapes[0][self._axis(layer):])
        blobs = [(k, p.num_output) if p.transpose else (p.num_output, k)]
        return blobs + [(p.num_output,)] if p.bias_term else blobs

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.inner_product_param
        bottom, axis = layer.input_shapes[0], self._axis(layer)
        if len(inputs) > 1:  # the fork's weights-as-second-bottom form: y = x W^T, W = bottom[1] (N, K)
            self._second_bottom(layer)
            if not (len(bottom) == 2 and axis == 1):
                raise layer.error(f"a two-bottom InnerProduct needs a 2-D (N, K) first bottom; got {bottom}")
            return Built([SecondBottomInnerProduct(name=ctx.name(layer))(inputs)] * len(layer.tops))
        x = _dense_input(ctx, layer, inputs[0], bottom, axis)
        weight_filler = p.weight_filler if p.HasField("weight_filler") else None
        bias_filler = p.bias_filler if p.HasField("bias_filler") else None
        dense = keras.layers.Dense(
            p.num_output, use_bias=p.bias_term, name=ctx.name(layer),
            kernel_initializer=_initializer(weights, weight_filler, "glorot_uniform"),
            bias_initializer=_initializer(weights, bias_filler, "zeros"),
        )
        y = dense(x)
        _keep_filler(dense, "kernel_initializer", weight_filler, "glorot_uniform")
        _keep_filler(dense, "bias_initializer", bias_filler, "zeros")
        out_rank = axis + 1
        if out_rank == 4:
            y = from_caffe_order(ctx, layer, y, 4)
        notes, assign = [], []
        if p.normalize:
            notes.append(f"layer '{layer.name}': InnerProduct normalize: weights row-normalised at conversion; "
                         "the Dense layer does not keep them unit-norm when fine-tuned")
        if weights is not None:
            weight = weights[0]
            if p.normalize:
                weight = _normalize_rows(weight, p.num_output, ROW_NORM_EPS)
            arrays = [dense_kernel(weight, bottom, axis, p.transpose)]
            if p.bias_term:
                arrays.append(weights[1])
            assign.append((dense, arrays))
        return Built([y] * len(layer.tops), weights=assign, notes=notes)
