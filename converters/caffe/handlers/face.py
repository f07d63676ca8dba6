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


#: The extra top a TRAIN MarginInnerProduct stand-in adds: its label-free logits ``x . w_hat`` (the parity
#: check's reference for the head's cosines, while the layer's own top carries the margin).
LABEL_FREE_SUFFIX = "__label_free"


def layer_phase(layer) -> str:
    """The phase a Caffe layer runs in: its own ``phase`` field when the prototxt sets it (Caffe's
    ``Net::Init`` keeps it), else the plan's (``PlannedLayer.phase`` or ``attrs["phase"]`` when the planner
    records it), else "TEST". ``layer`` is a planned layer or a ``LayerParameter``."""
    param = layer.param if hasattr(layer, "attrs") else layer  # a PlannedLayer, or a LayerParameter
    if param.HasField("phase"):
        return "TRAIN" if param.phase == 0 else "TEST"
    attrs = getattr(layer, "attrs", None) or {}
    phase = getattr(layer, "phase", None) or attrs.get("phase") or "TEST"
    return str(phase).upper()


def _label_blob_shapes(layer) -> None:
    """A label bottom must hold one class id per sample: (N,) or (N, 1, ...)."""
    labels = layer.input_shapes[1]
    if len(labels) > 1 and any(dim not in (None, 1) for dim in labels[1:]):
        raise layer.error(f"its label bottom has shape {labels}; it must hold one class id per sample")


def _scheduled_bias(config: dict) -> np.float32:
    """The bias of the layer's next forward (``label_specific_add.cpp``), in float32 as ``Dtype``."""
    schedule = config.get("schedule")
    if schedule is None:
        return np.float32(config["bias"])
    f = np.float32
    value = f(schedule["bias_base"]) + np.power(f(1.0) + f(schedule["bias_gamma"]) * f(config["iteration"]),
                                                f(schedule["bias_power"])) - f(1.0)
    return f(min(max(value, f(schedule["bias_min"])), f(schedule["bias_max"])))


class LabelSpecificAddStandIn(StandIn):
    """LabelSpecificAdd's TRAIN forward on [logits, label]: ``y[i, gt] += bias`` where ``y[i, gt] > -bias``
    (gt = int(label[i]), rows flattened), the bias of the counter as configured (read before the advance);
    the bias as the second top when the layer declares one."""

    def getMemoryShapes(self, inputs):  # noqa: N802  (1, 1): OpenCV mis-sizes reused 1-D blobs
        return [inputs[0]] + ([[1, 1]] if self.config.get("bias_top") else [])

    def forward(self, inputs):
        x, label = inputs[0], inputs[1]
        y = np.array(x, np.float32, copy=True)
        rows = y.reshape(y.shape[0], -1)
        bias = _scheduled_bias(self.config)
        for i, gt in enumerate(np.asarray(label, np.float32).reshape(-1)[: rows.shape[0]]):
            gt = int(gt)
            if 0 <= gt < rows.shape[1] and rows[i, gt] > -bias:
                rows[i, gt] += bias
        return [rows.reshape(y.shape)] + ([np.full((1, 1), bias, np.float32)] if self.config.get("bias_top") else [])


@register("LabelSpecificAdd")
class LabelSpecificAddHandler(Handler):
    """TEST: the identity (the fork returns early in TEST), without the label. TRAIN: its TRAIN forward
    (``label_specific_add.cpp`` Forward_cpu) as ``label_layers.LabelSpecificAdd`` on [logits, labels], when no
    AMSoftmaxHead pattern is fused around it."""

    def used_bottoms(self, layer):
        return None if layer_phase(layer) == "TRAIN" else 1

    def output_shapes(self, layer):
        shapes = [layer.input_shapes[0]] * len(layer.tops)
        if len(layer.bottoms) >= 2 and len(layer.tops) > 1:  # TRAIN: the second top is the bias, shape (1,)
            shapes[1] = (1,)
        return shapes

    @staticmethod
    def label_classes(param, shapes_by_name: dict) -> int | None:
        """How many classes the label indexes: the logits' values per sample."""
        shape = shapes_by_name.get(param.bottom[0]) if len(param.bottom) else None
        return int(math.prod(shape[1:])) if shape and None not in shape[1:] else None

    def opencv_layer(self, layer, copy, phase: str = "TEST"):
        """``phase`` "TRAIN" (the layer runs its TRAIN forward, as the parity check decides from the plan): a
        stand-in of the C++ on [logits, label]; else a Split (the identity)."""
        if phase == "TRAIN" and len(layer.bottom) >= 2:
            p = layer.label_specific_add_param
            schedule = ({key: float(getattr(p, key)) for key in ("bias_base", "bias_gamma", "bias_power", "bias_min",
                                                                  "bias_max")} if p.HasField("bias_base") else None)
            return python_layer(copy, LabelSpecificAddStandIn,
                                {"bias": float(p.bias), "schedule": schedule, "iteration": int(p.iteration),
                                 "bias_top": len(layer.top) > 1}, keep_bottoms=2, keep_tops=2)
        copy.ClearField("label_specific_add_param")  # identity at inference: a Split of the logits
        copy.type = "Split"
        del copy.bottom[1:]
        return None

    def build(self, ctx, layer, inputs, weights):
        if len(inputs) < 2:
            return Built([inputs[0]] * len(layer.tops),
                         notes=[f"layer '{layer.name}': LabelSpecificAdd is the identity at inference; its margin "
                                "is not in the model (no AMSoftmaxHead pattern was found around it)"])
        from converters.caffe.label_layers import LabelSpecificAdd

        _label_blob_shapes(layer)
        if len(layer.input_shapes[0]) != 2:
            raise layer.error(f"converts in TRAIN for 2-D logits (N, D) only; got bottom shape {layer.input_shapes[0]}")
        p = layer.param.label_specific_add_param
        schedule = ({key: float(getattr(p, key)) for key in ("bias_base", "bias_gamma", "bias_power", "bias_min",
                                                              "bias_max")} if p.HasField("bias_base") else None)
        keras_layer = LabelSpecificAdd(bias=float(p.bias), schedule=schedule, iteration=int(p.iteration),
                                       return_bias=len(layer.tops) > 1, name=ctx.name(layer))
        y = keras_layer([inputs[0], inputs[1]])
        how = "an annealed bias" if schedule is not None else f"bias {p.bias:g}"
        return Built(list(y) if len(layer.tops) > 1 else [y], notes=[
            f"layer '{layer.name}': LabelSpecificAdd with {how} from iteration {p.iteration}: a training call adds "
            "it to the target logit where that logit > -bias (the fork's TRAIN forward); identity at inference; "
            "the model takes the labels as an input"])


def sphereface_forward(x: np.ndarray, weight: np.ndarray, label: np.ndarray, margin_type: int,
                       lambda_: float) -> np.ndarray:
    """``margin_inner_product_layer.cpp`` Forward_cpu in float32: rows of ``weight`` normalised (no eps),
    cos = x.w_hat / |x|, the label column |x| psi_m(cos) then ``(top + lambda x.w_hat) / (1 + lambda)``
    (margin_type 0 = SINGLE: plain x.w_hat)."""
    f = np.float32
    x = np.asarray(x, f).reshape(x.shape[0], -1)
    w = np.asarray(weight, f).reshape(weight.shape[0], -1)
    w = w * (f(1.0) / np.sqrt(np.sum(w * w, axis=1, keepdims=True, dtype=f)))
    xw = (x @ w.T).astype(f)
    if margin_type == 0:
        return xw
    x_norm = np.sqrt(np.sum(x * x, axis=1, dtype=f)).astype(f)
    cos = (xw / x_norm[:, None]).astype(f)
    top = xw.copy()
    for i, gt in enumerate(np.asarray(label, f).reshape(-1)[: x.shape[0]]):
        gt = int(gt)
        if not 0 <= gt < w.shape[0]:
            continue
        c = cos[i, gt]
        s0 = np.sign(c)
        if margin_type == 1:
            psi = f(2.0) * s0 * c * c - f(1.0)
        elif margin_type == 2:
            s1 = np.sign(abs(c) - f(0.5))
            s2 = s0 * (f(1.0) + s1) - f(2.0)
            psi = s1 * (f(4.0) * c ** 3 - f(3.0) * c) + s2
        else:
            s3 = s0 * np.sign(f(2.0) * c * c - f(1.0))
            s4 = f(2.0) * s0 + s3 - f(3.0)
            psi = s3 * (f(8.0) * c ** 4 - f(8.0) * c * c + f(1.0)) + s4
        top[i, gt] = x_norm[i] * psi
    top = top + f(lambda_) * xw
    return (top * (f(1.0) / (f(1.0) + f(lambda_)))).astype(f)


def sphereface_lambda(config: dict, iteration: int) -> np.float32:
    """``lambda = max(base (1 + gamma iteration)^(-power), lambda_min)`` in float32."""
    f = np.float32
    value = f(config["base"]) * np.power(f(1.0) + f(config["gamma"]) * f(iteration), -f(config["power"]))
    return f(max(value, f(config["lambda_min"])))


class MarginInnerProductStandIn(StandIn):
    """MarginInnerProduct's forward on [x, label] at lambda(iteration + 1) (the counter advances first):
    outputs the margin logits, then lambda when the layer declares it, then the label-free x.w_hat."""

    def getMemoryShapes(self, inputs):  # noqa: N802
        logits = list(inputs[0][:1]) + [self.config["num_output"]]
        return [logits] + ([[1, 1]] if self.config["lambda_top"] else []) + [logits]

    def forward(self, inputs):
        x, label = inputs[0], inputs[1]
        lambda_ = sphereface_lambda(self.config, self.config["iteration"] + 1)
        weight = self.blobs[0].reshape(self.config["num_output"], -1)
        top = sphereface_forward(x, weight, label, self.config["type"], lambda_)
        plain = sphereface_forward(x, weight, label, 0, lambda_)
        return [top] + ([np.full((1, 1), lambda_, np.float32)] if self.config["lambda_top"] else []) + [plain]


@register("MarginInnerProduct")
class MarginInnerProductHandler(Handler):
    """SphereFace's layer when it feeds other layers (else it fuses into a ``SphereFaceHead``). TEST: its
    label-free logits ``x . w_hat`` (Caffe's non-label columns) as a Dense layer. TRAIN: its forward
    (``margin_inner_product_layer.cpp``) as ``label_layers.MarginInnerProduct`` on [x, labels]."""

    def used_bottoms(self, layer):
        return None if layer_phase(layer) == "TRAIN" else 1

    @staticmethod
    def label_classes(param, shapes_by_name: dict) -> int | None:
        """How many classes the label indexes: num_output."""
        return int(param.margin_inner_product_param.num_output) or None

    def opencv_layer(self, layer, copy, phase: str = "TEST"):
        """``phase`` "TRAIN": a stand-in of the C++ forward on [x, label] (plus the label-free top
        ``<top>__label_free``); else the label-free x.w_hat."""
        p = layer.margin_inner_product_param
        if phase == "TRAIN" and len(layer.bottom) >= 2:
            config = {"num_output": p.num_output, "axis": p.axis, "type": int(p.type), "base": float(p.base),
                      "gamma": float(p.gamma), "power": float(p.power), "lambda_min": float(p.lambda_min),
                      "iteration": int(p.iteration), "lambda_top": len(layer.top) > 1}
            python_layer(copy, MarginInnerProductStandIn, config, keep_bottoms=2, keep_tops=2)
            copy.top.append(f"{layer.top[0]}{LABEL_FREE_SUFFIX}")
            return MarginInnerProductStandIn
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
        train = len(inputs) >= 2
        if len(layer.tops) > 1 and not train:
            raise layer.error("MarginInnerProduct's second top (lambda) does not convert")
        bottom = layer.input_shapes[0]
        axis = canonical_axis(p.axis, len(bottom))
        if axis != len(bottom) - 1 and not (len(bottom) == 4 and axis == 1):
            raise layer.error(f"margin_inner_product_param.axis {p.axis} does not convert")
        if train and axis != 1:
            raise layer.error(f"converts in TRAIN with axis 1 only (one row per sample); got axis {p.axis}")
        x = _dense_input(ctx, layer, inputs[0], bottom, axis)
        if train:
            return self._build_train(ctx, layer, x, inputs[1], weights, bottom, axis)
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

    def _build_train(self, ctx, layer, x, labels, weights, bottom, axis):
        from converters.caffe.label_layers import MarginInnerProduct

        _label_blob_shapes(layer)
        p = layer.param.margin_inner_product_param
        filler = p.weight_filler if p.HasField("weight_filler") else None
        keras_layer = MarginInnerProduct(p.num_output, m=int(p.type) + 1, base=p.base, gamma=p.gamma,
                                         power=p.power, lambda_min=p.lambda_min, iteration=int(p.iteration),
                                         return_lambda=len(layer.tops) > 1, name=ctx.name(layer),
                                         kernel_initializer=_initializer(weights, filler, "glorot_uniform"))
        out = keras_layer([x, labels])
        outputs = list(out) if len(layer.tops) > 1 else [out]
        _keep_filler(keras_layer, "kernel_initializer", filler, "glorot_uniform")
        assign = []
        if weights is not None:
            weight = _normalize_rows(weights[0], p.num_output, 0.0)
            assign.append((keras_layer, [dense_kernel(weight, bottom, axis, False), np.asarray(p.iteration, np.int32)]))
        return Built(outputs, weights=assign, notes=[
            f"layer '{layer.name}': MarginInnerProduct (m={int(p.type) + 1}, lambda schedule from iteration "
            f"{p.iteration}) takes the labels: a training call advances its counter and applies the margin "
            "(the fork's forward); inference gives the label-free x.w_hat"])


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
