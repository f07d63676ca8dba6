"""The happynear fork's layers of the AM-Softmax repository's nets: ChannelScale and GlobalLSEMargin.

Semantics from happynear/caffe-windows (branch ms): ``channel_scale_layer.cpp`` / ``.cu`` and
``global_lse_margin_layer.cpp`` / ``.cu`` (the latter has no CPU forward: the GPU code is the reference).
"""

from __future__ import annotations

import math

import keras
import numpy as np

from converters.caffe.handlers.common import filler_initializer, to_caffe_order
from converters.caffe.layers import ChannelScale, GlobalLSEMargin
from converters.caffe.registry import Built, Handler, register
from converters.caffe.stand_ins import StandIn, python_layer

__all__ = ["ChannelScaleHandler", "GlobalLSEMarginHandler", "ChannelScaleStandIn", "GlobalLSEMarginStandIn",
           "FLT_MAX"]

#: ``std::numeric_limits<float>::max()``: GlobalLSEMargin's scale ceiling when ``scale_param.max_value`` is unset.
FLT_MAX = float(np.finfo(np.float32).max)


def _per_sample(shape) -> int:
    return math.prod(int(d) for d in shape[1:])


# ----------------------------------------------------------------------------------------------------
# ChannelScale
# ----------------------------------------------------------------------------------------------------


class ChannelScaleStandIn(StandIn):
    """ChannelScale at TEST: ``y[n, c, p] = s[n, p] x[n, c, p]``; global_scale: ``y = blob x`` (second top: the
    blob); do_forward false: ``y = x``."""

    def getMemoryShapes(self, inputs):  # noqa: N802 (OpenCV's name)
        return [inputs[0], [1]] if self.config.get("scale_top") else [inputs[0]]

    def forward(self, inputs):
        x, s = inputs[0].astype(np.float64), inputs[1].astype(np.float64)
        outputs = []
        if not self.config["do_forward"]:
            y = x
        elif self.config["global"]:
            y = x * float(self.blobs[0].reshape(-1)[0])
        else:
            y = x * s.reshape(x.shape[0], 1, *x.shape[2:])
        outputs.append(y.astype(np.float32))
        if self.config.get("scale_top"):
            outputs.append(self.blobs[0].reshape(1).astype(np.float32))
        return outputs


@register("ChannelScale")
class ChannelScaleHandler(Handler):
    """happynear's ChannelScale on ``[x, s]``: every channel of ``x`` times ``s`` at the same sample and
    position (``s`` holds count(x) / C values per sample, e.g. Normalize's norm); ``global_scale``: one stored
    scalar (a (1,) blob, a running mean of |s| in training), optional second top = that scalar."""

    def opencv_layer(self, layer, copy):
        p = layer.channel_scale_param
        return python_layer(copy, ChannelScaleStandIn, {"do_forward": p.do_forward, "global": p.global_scale,
                                                        "scale_top": p.global_scale and len(layer.top) > 1})

    def output_shapes(self, layer):
        p = layer.param.channel_scale_param
        if len(layer.bottoms) != 2:
            raise layer.error(f"ChannelScale takes 2 bottoms (the blob and its scale); got {len(layer.bottoms)}")
        shape, scale_shape = layer.input_shapes
        if not 2 <= len(shape) <= 4:
            raise layer.error(f"ChannelScale reads its first bottom as N x C x H x W: it needs 2 to 4 axes; "
                              f"got {shape}")
        if any(d is None for d in shape[1:]) or any(d is None for d in scale_shape[1:]):
            raise layer.error(f"needs known bottom sizes; got {shape} and {scale_shape}")
        positions = _per_sample(shape) // int(shape[1])
        if _per_sample(scale_shape) != positions:
            raise layer.error(
                f"its second bottom {tuple(scale_shape)} holds {_per_sample(scale_shape)} values per sample; the fork "
                f"needs one per position of the first bottom {tuple(shape)}: count / channels = {positions}")
        if len(layer.tops) > 2 or (len(layer.tops) == 2 and not p.global_scale):
            raise layer.error("ChannelScale has a second top (the scale) only with global_scale: true")
        return [tuple(shape)] + ([(1,)] if len(layer.tops) == 2 else [])

    def weight_shapes(self, layer):
        return [(1,)] if layer.param.channel_scale_param.global_scale else []

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.channel_scale_param
        shape, scale_shape = layer.input_shapes
        rank = len(shape)
        # s's Keras broadcast shape (no batch): one value per position, shared by the channels
        broadcast = (1,) if rank == 2 else (1, shape[2]) if rank == 3 else (shape[2], shape[3], 1)
        s = inputs[1]
        if len(scale_shape) == 4 and scale_shape[1] > 1 and scale_shape[2] * scale_shape[3] > 1:
            s = to_caffe_order(ctx, layer, s, 4, "scale_to_nchw")  # the fork indexes s in Caffe memory order
        keras_layer = ChannelScale(broadcast, global_scale=p.global_scale, do_forward=p.do_forward,
                                   backward_feature=p.do_backward_feature, backward_scale=p.do_backward_scale,
                                   min_global_scale=p.min_global_scale, max_global_scale=p.max_global_scale,
                                   return_scale=len(layer.tops) == 2, name=ctx.name(layer))
        outputs = keras_layer([inputs[0], s])
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        notes, assign = [], []
        if p.global_scale:
            notes.append(f"layer '{layer.name}': global_scale follows the fork's GPU code (training: a running mean "
                         "of |scale| clamped to [min_global_scale, max_global_scale]; inference: the stored value); "
                         "its CPU code instead clamps the stored value and never updates it")
            if weights is not None:
                assign.append((keras_layer, [np.asarray(weights[0], np.float32).reshape(1)]))
        if not (p.do_backward_feature and p.do_backward_scale):
            notes.append(f"layer '{layer.name}': gradients follow the fork's backward (do_backward_feature="
                         f"{p.do_backward_feature}, do_backward_scale={p.do_backward_scale})")
        return Built(outputs, weights=assign, notes=notes)


# ----------------------------------------------------------------------------------------------------
# GlobalLSEMargin
# ----------------------------------------------------------------------------------------------------


def _numpy_mean_shift(values: np.ndarray, mu: float, loops: int) -> float:
    near = np.abs(values - mu) < 0.1
    if not near.any():
        mu = float(values.mean())
    last = mu
    for _ in range(loops):
        near = np.abs(values - mu) < 0.1
        if not near.any():
            break
        mu = float(values[near].mean())
        if abs(last - mu) < 0.001:
            break
        last = mu
    return mu


class GlobalLSEMarginStandIn(StandIn):
    """GlobalLSEMargin's forward (``global_lse_margin_layer.cu``) from the stored blobs (scale, margin); the
    updated margin is used for the output, as in the fork (OpenCV keeps no state between forwards)."""

    def getMemoryShapes(self, inputs):  # noqa: N802 (OpenCV's name)
        return [inputs[0], [5]] if self.config.get("statistics") else [inputs[0]]

    def forward(self, inputs):
        x = inputs[0].astype(np.float64).reshape(inputs[0].shape[0], -1)
        labels = inputs[1].reshape(-1).astype(np.int64)
        s = min(max(float(self.blobs[0].reshape(-1)[0]), self.config["min"]), self.config["max"])
        stored = float(self.blobs[1].reshape(-1)[0])
        scale = inputs[2].astype(np.float64).reshape(-1, 1) if len(inputs) > 2 else np.full((len(x), 1), s)
        rows = np.arange(len(x))
        target = x[rows, labels]
        others = x.copy()
        others[rows, labels] = -np.inf
        max_negative = np.maximum(others.max(axis=1), -1.0)
        shifted = np.exp(scale * (x - max_negative[:, None]))
        shifted[rows, labels] = 0.0
        lse = np.log(shifted.sum(axis=1)) / scale[:, 0] + max_negative
        margins = target - lse
        if stored == 0:
            batch = _numpy_mean_shift(margins, float(margins.mean()), 20)
            margin = stored if math.isnan(batch) else batch
        else:
            batch = _numpy_mean_shift(margins, stored, 1)
            margin = stored if math.isnan(batch) else 0.9 * stored + 0.1 * batch
        top = x.copy()
        if margin > 0:
            top[rows, labels] -= margin
        top = (top * scale).reshape(inputs[0].shape)
        outputs = [top.astype(np.float32)]
        if self.config.get("statistics"):
            first = float(scale.mean()) if len(inputs) > 2 else s
            outputs.append(np.asarray([first, target.mean(), lse.mean(), max_negative.mean(), margin], np.float32))
        return outputs


@register("GlobalLSEMargin")
class GlobalLSEMarginHandler(Handler):
    """happynear's GlobalLSEMargin on ``[cos logits, label (, per-sample scale)]``: the target logit minus a
    margin estimated from the batch (mean-shift mode of target - LSE of the others, kept as a running value),
    then times the scale (blob 0, default 30) or the third bottom. Same forward in TRAIN and TEST: the label
    is a model input in both. Second top: the (5,) statistics [scale, mean target, mean LSE, mean max
    negative, margin]."""

    blob_note = "GlobalLSEMargin holds 2 blobs of shape (1,): the scale s and the running margin m"

    def opencv_layer(self, layer, copy):
        p = layer.scale_param
        return python_layer(copy, GlobalLSEMarginStandIn, {
            "min": float(p.min_value) if p.HasField("min_value") else 0.0,
            "max": float(p.max_value) if p.HasField("max_value") else FLT_MAX,
            "statistics": len(layer.top) > 1})

    def output_shapes(self, layer):
        if len(layer.bottoms) not in (2, 3):
            raise layer.error(f"GlobalLSEMargin takes 2 bottoms (logits, label) or 3 (and a per-sample scale); got "
                              f"{len(layer.bottoms)}")
        logits = layer.input_shapes[0]
        if len(logits) != 2 or logits[1] is None:
            raise layer.error(f"expects (N, classes) logits; got {logits}")
        for index, shape in enumerate(layer.input_shapes[1:], start=1):
            if any(d is None for d in shape[1:]) or _per_sample(shape) != 1:
                what = "label" if index == 1 else "per-sample scale"
                raise layer.error(f"bottom {index} (the {what}) must hold one value per sample; got {shape}")
        if len(layer.tops) > 2:
            raise layer.error(f"GlobalLSEMargin has at most 2 tops (logits, statistics); got {len(layer.tops)}")
        return [tuple(logits)] + ([(5,)] if len(layer.tops) == 2 else [])

    def weight_shapes(self, layer):
        return [(1,), (1,)]

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.scale_param
        min_scale = float(p.min_value) if p.HasField("min_value") else 0.0
        max_scale = float(p.max_value) if p.HasField("max_value") else FLT_MAX
        per_sample = len(layer.bottoms) == 3
        specs = layer.param.param
        lr_mult = specs[0].lr_mult if len(specs) else (0.0 if per_sample else 1.0)  # LayerSetUp's default
        if weights is not None:
            initial = float(weights[0].reshape(-1)[0])
        elif p.HasField("filler"):
            initial = float(np.asarray(filler_initializer(p.filler, keras.initializers.Constant(30.0))((1,)))[0])
        else:
            initial = 30.0
        keras_layer = GlobalLSEMargin(initial_scale=initial, min_scale=min_scale, max_scale=max_scale,
                                      scale_trainable=lr_mult != 0, per_sample_scale=per_sample,
                                      return_statistics=len(layer.tops) == 2, update_in_inference=True,
                                      name=ctx.name(layer))
        outputs = keras_layer(list(inputs))
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        assign = []
        if weights is not None:
            scale = np.clip(np.asarray(weights[0], np.float32).reshape(1), min_scale, max_scale)  # clamped in place
            assign.append((keras_layer, [scale, np.asarray(weights[1], np.float32).reshape(1)]))
        notes = [f"layer '{layer.name}': GlobalLSEMargin needs the label as a model input; its margin is a "
                 "non-trainable variable updated on every call (inference too), as the fork's forward does"]
        return Built(outputs, weights=assign, notes=notes)
