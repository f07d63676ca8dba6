"""NormFace's agent layers of the happynear fork: InnerDistance, Parameter, and the softmax + C-contrastive head.

``InnerDistance`` (``inner_distance_layer.cpp``): distances between the bottom rows and the agent rows, from
its own blob (``normalize: true`` renormalises the rows in place before each forward, eps 1e-6 on the CPU)
or from a second bottom. ``Parameter`` (``parameter_layer.hpp``): a learnable blob as a top, converted by the
fusion (``fusion.agents.parameter_agents``) into the blob of the layer that reads it.
"""

from __future__ import annotations

import keras
import numpy as np

from converters.caffe.agent_layers import AGENT_NORM_EPS, ClassIds, InnerDistance, PairwiseInnerDistance
from converters.caffe.fusion.agents import AGENT_HEAD_TYPE
from converters.caffe.handlers.common import _dense_input, _initializer, _keep_filler, _known, _normalize_rows
from converters.caffe.registry import Built, Handler, register
from converters.caffe.shapes import canonical_axis
from converters.caffe.stand_ins import NotRun, StandIn, python_layer


class InnerDistanceStandIn(StandIn):
    """InnerDistance with its own blob (NumPy, float64): optional row renormalisation, squared L2 or L1."""

    def getMemoryShapes(self, inputs):  # noqa: N802
        return [[inputs[0][0], self.config["num_output"]]]

    def forward(self, inputs):
        x = inputs[0].reshape(inputs[0].shape[0], -1).astype(np.float64)
        weight = self.blobs[0].astype(np.float64).reshape(self.config["num_output"], -1)
        if self.config.get("normalize"):
            weight = weight / np.sqrt(np.sum(weight * weight, axis=1, keepdims=True) + AGENT_NORM_EPS)
        diff = x[:, None, :] - weight[None, :, :]
        y = np.sum(diff * diff, axis=2) if self.config.get("distance", "L2") == "L2" else np.sum(np.abs(diff), axis=2)
        return [y.astype(np.float32)]


@register("InnerDistance")
class InnerDistanceHandler(Handler):
    """InnerDistance -> ``agent_layers.InnerDistance`` (own blob) or ``PairwiseInnerDistance`` (second bottom).

    The fork's current code has one blob (no bias, whatever ``bias_term`` says) and reads it as (N, K) rows
    even with ``transpose: true`` (its "TODO: transpose = true"); ``update_center_only`` makes the last bottom
    the label, which inference does not need.
    """

    blob_note = "the fork's InnerDistance has one blob, the (num_output, K) agents (no bias blob)"

    def opencv_layer(self, layer, copy):
        p = layer.inner_distance_param
        if len(layer.bottom) - int(p.update_center_only) != 1:
            return NotRun  # a second-bottom InnerDistance: its agents come from a batch-free Parameter
        return python_layer(copy, InnerDistanceStandIn, {"num_output": p.num_output, "normalize": p.normalize,
                                                          "distance": p.distance_type}, keep_bottoms=1)

    def used_bottoms(self, layer):
        p = layer.param.inner_distance_param
        return len(layer.param.bottom) - 1 if p.update_center_only else None

    def _check(self, layer):
        p = layer.param.inner_distance_param
        if p.distance_type not in ("L2", "L1"):
            raise layer.error(f"distance_type {p.distance_type!r} is not implemented by the fork (L2 or L1)")
        if len(layer.bottoms) not in (1, 2):
            raise layer.error(f"InnerDistance takes the feature and optionally the agents; got {len(layer.bottoms)} "
                              "bottoms")
        if p.update_center_only and len(layer.param.bottom) == 2:
            raise layer.error("update_center_only with two bottoms: the fork then reads the label bottom as the "
                              "agents (bottom[1]); give the agents as the second and the label as the third bottom")
        axis = canonical_axis(p.axis, len(layer.input_shapes[0]))
        if axis == 0:
            raise layer.error("inner_distance_param.axis 0 would mix samples of the batch; it does not convert")
        return p, axis

    def output_shapes(self, layer):
        p, axis = self._check(layer)
        _known(layer, layer.input_shapes[0])
        if len(layer.bottoms) == 2:
            agents = layer.input_shapes[1]
            k = int(np.prod(layer.input_shapes[0][axis:]))
            if len(agents) != 2 or agents[1] != k:
                raise layer.error(f"the agents bottom has shape {agents}; expected (N, {k}) rows of the feature size")
            n = agents[0]
        else:
            if not p.num_output:
                raise layer.error("inner_distance_param.num_output is required with one bottom")
            n = p.num_output
        return [(*layer.input_shapes[0][:axis], n)]

    def weight_shapes(self, layer):
        p, axis = self._check(layer)
        if len(layer.bottoms) == 2:
            return []
        k = int(np.prod(layer.input_shapes[0][axis:]))
        return [(k, p.num_output) if p.transpose else (p.num_output, k)]

    def build(self, ctx, layer, inputs, weights):
        p, axis = self._check(layer)
        bottom = layer.input_shapes[0]
        if len(bottom) - axis > 1 or axis != len(bottom) - 1:
            if not (len(bottom) == 4 and axis == 1):
                raise layer.error(f"inner_distance_param.axis {p.axis} on a {len(bottom)}-D bottom does not convert")
        if len(bottom) == 4:  # the agents' K columns are in Caffe's (C, H, W) order: flatten NCHW
            x = keras.layers.Permute((3, 1, 2), name=ctx.name(layer, "to_nchw"))(inputs[0])
            x = keras.layers.Flatten(name=ctx.name(layer, "flatten"))(x)
        else:
            x = _dense_input(ctx, layer, inputs[0], bottom, axis)
        if len(inputs) == 2:
            return Built([PairwiseInnerDistance(p.distance_type, name=ctx.name(layer))([x, inputs[1]])])
        filler = p.weight_filler if p.HasField("weight_filler") else None
        distance = InnerDistance(p.num_output, p.distance_type, p.normalize, name=ctx.name(layer),
                                 kernel_initializer=_initializer(weights, filler, "random_normal"))
        y = distance(x)
        _keep_filler(distance, "kernel_initializer", filler, "random_normal")
        assign = []
        if weights is not None:  # the blob's memory as (N, K) rows, as the fork's forward reads it
            assign.append((distance, [np.asarray(weights[0], np.float32).reshape(p.num_output, -1).T]))
        notes = []
        if p.normalize:
            notes.append(f"layer '{layer.name}': normalize: true: the agents are renormalised (eps 1e-6) at each "
                         "forward and after each update (UnitColumns), the fork's in-place hard normalisation")
        return Built([y], weights=assign, notes=notes)


@register("Parameter")
class ParameterHandler(Handler):
    """Parameter: its top is its blob (shape ``parameter_param.shape``, no batch axis)."""

    def opencv_layer(self, layer, copy):  # a batch-free blob as a top: OpenCV's graph has no such input
        return NotRun

    def output_shapes(self, layer):
        shape = tuple(int(d) for d in layer.param.parameter_param.shape.dim)
        if not shape or min(shape) < 1:
            raise layer.error(f"parameter_param.shape {shape} must have dimensions >= 1")
        return [shape]

    def weight_shapes(self, layer):
        return self.output_shapes(layer)

    def build(self, ctx, layer, inputs, weights):
        raise layer.error(
            "a Parameter blob converts as the weights of the layer reading it: Parameter [-> Normalize (L2)] -> "
            "second bottom of InnerDistance or InnerProduct, with no other reader; a batch-independent tensor "
            "elsewhere in the graph does not convert")


@register(AGENT_HEAD_TYPE)
class AgentHeadHandler(Handler):
    """``NormFaceContrastiveHead`` (``layer.head``, a ``fusion.HeadSpec``) called on [features, labels] with
    ``fused_loss=True``: it outputs the per-sample loss ``CE(s cos) + agent_weight * C-contrastive`` and adds
    its batch mean; the labels are the plan's label blob or a new model input. Blob 0 (``HeadSpec.layer``)
    is the softmax ``kernel``, blob 1 the ``agents``, both rows normalised with ``HeadSpec.row_eps``."""

    def output_shapes(self, layer):
        return [(None,)]

    def weight_shapes(self, layer):
        return list(layer.weight_shapes)

    def build(self, ctx, layer, inputs, weights):
        from keras_margin import layers as margin_layers

        spec = layer.head
        head = margin_layers.NormFaceContrastiveHead(spec.num_classes, **spec.options, name=ctx.name(layer),
                                                     kernel_initializer=_initializer(weights, None, "random_normal"),
                                                     agent_initializer=_initializer(weights, None, "random_normal"))
        model_inputs = []
        if len(inputs) > 1:  # the net's label blob (float class ids in Caffe)
            labels = ClassIds(name=ctx.name(layer, "class_ids"))(inputs[1])
        else:
            labels = keras.Input((), dtype="int32", name=ctx.name_for_blob(layer.attrs.get("label", "label")))
            model_inputs.append(labels)
        y = head([inputs[0], labels])
        for attribute in ("kernel_initializer", "agent_initializer"):
            _keep_filler(head, attribute, None, "random_normal")
        values = []
        for variable in head.weights:
            key = variable.path.rsplit("/", 1)[-1]
            index = {"kernel": 0, "agents": 1}.get(key)
            if index is not None and weights is not None:
                values.append(_normalize_rows(weights[index], spec.num_classes, spec.row_eps).T)
            elif key in spec.state:
                values.append(np.asarray(spec.state[key], dtype=variable.dtype))
            else:
                values.append(np.asarray(variable))
        return Built([y], weights=[(head, values)], model_inputs=model_inputs, notes=[
            f"layer '{layer.name}': NormFaceContrastiveHead: model inputs [features, labels], output the per-sample "
            "loss (its batch mean is the Caffe net's softmax_loss + agent_weight * contrastive_loss); compile with "
            "loss=None"])
