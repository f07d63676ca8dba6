"""Fusion patterns of NormFace's agent layers (InnerDistance, Parameter agents, the combined net).

Patterns, in order (each triggers on the InnerDistance / two-bottom InnerProduct, never on the Parameter, so
the fused layer takes the place of a layer whose feature bottom is already built):

- ``agent_head`` (TRAIN): Normalize(feature) -> InnerDistance(L2, unit agents) read by a GeneralContrastiveLoss
  or GeneralTripletLoss becomes a ``CosineDense`` head (it outputs cos; ``D = 2 - 2 cos``) whose ``HeadSpec``
  names ``CContrastiveLoss`` / ``CTripletLoss``; with a sibling InnerProduct(second-bottom unit matrix) ->
  Scale -> SoftmaxWithLoss it becomes a ``NormFaceContrastiveHead`` (``AGENT_HEAD_TYPE``).
- ``parameter_agents`` (both phases): Parameter [-> Normalize (L2)] -> second bottom of InnerDistance /
  InnerProduct becomes that layer with its own blob (the Parameter's), normalised as the Normalize does.
"""

from __future__ import annotations

import copy

from converters.caffe.fusion import Fused, FusionContext, HeadSpec, f32, fusion_pattern, head_layer
from converters.caffe.fusion.margin_heads import _is_l2_normalized, constant_scale, learned_scale

__all__ = ["AGENT_HEAD_TYPE", "agent_head", "parameter_agents", "agent_source"]

#: The planned-layer type of the softmax + C-contrastive head (``handlers.agents.AgentHeadHandler``).
AGENT_HEAD_TYPE = "keras_margin.AgentHead"

#: Eps of the fork's agent normalisations (InnerDistance ``normalize: true`` and the Normalize layer, CPU).
AGENT_ROW_EPS = 1e-6


def _single_user(layer, ctx: FusionContext) -> bool:
    users = ctx.users_of(layer)
    return users is not None and len(users) == 1


def agent_source(layer, ctx: FusionContext) -> dict | None:
    """Where ``layer``'s (InnerDistance / InnerProduct) weight rows come from, or None if not a plain blob.

    Returns {"kernel_layer": planned layer holding the blob, "members": layers replaced besides ``layer``,
    "normalized": whether the rows are L2-normalised (eps 1e-6) before use, "num": rows}.
    """
    if len(layer.bottoms) == 1:
        normalized = layer.type == "InnerDistance" and layer.param.inner_distance_param.normalize
        return {"kernel_layer": layer, "members": [], "normalized": bool(normalized), "num": None}
    if len(layer.bottoms) != 2:
        return None
    source = ctx.producers.get(layer.bottoms[1])
    members, normalized = [], False
    if source is not None and source.type == "Normalize" and _is_l2_normalized(layer.bottoms[1], ctx):
        if not _single_user(source, ctx) or len(source.bottoms) != 1:
            return None
        members.append(source)
        normalized = True
        source = ctx.producers.get(source.bottoms[0])
    if source is None or source.type != "Parameter" or not _single_user(source, ctx):
        return None
    shape = tuple(source.output_shapes[0])
    if len(shape) != 2:
        return None
    members.append(source)
    return {"kernel_layer": source, "members": members, "normalized": normalized, "num": shape[0]}


def _caffe_readers(blob_name: str, ctx: FusionContext, types: tuple) -> list:
    """The phase's Caffe layers (training-only ones included) of ``types`` whose first bottom is ``blob_name``."""
    return [c for c in ctx.plan.caffe_layers if c.type in types and len(c.bottom) and c.bottom[0] == blob_name]


def _loss_weight(loss) -> float:
    return f32(loss.loss_weight[0]) if len(loss.loss_weight) else 1.0


def contrastive_options(loss, ctx: FusionContext) -> dict | None:
    """``CContrastiveLoss`` options of a GeneralContrastiveLoss, or None (with a warning naming the settings
    keras_margin does not implement)."""
    p = loss.general_contrastive_loss_param
    refused = []
    if f32(p.positive_margin) != 0.0:
        refused.append(f"positive_margin {f32(p.positive_margin):g} (keras_margin pulls from 0)")
    for name in ("positive_weight", "negative_weight"):
        if f32(getattr(p, name)) != 1.0:
            refused.append(f"{name} {f32(getattr(p, name)):g}")
    if p.HasField("normalize_negative"):
        refused.append("normalize_negative (gradient rescaling)")
    if f32(p.positive_outlier_thresh) < 4.0:  # D <= 4 for unit vectors: a threshold >= 4 never truncates
        refused.append(f"positive_outlier_thresh {f32(p.positive_outlier_thresh):g} < 4")
    for name in ("max_negative_only", "max_positive_only", "positive_first", "exp_negative_weight", "add_intra_mae"):
        if getattr(p, name):
            refused.append(f"{name}: true")
    if len(loss.bottom) > 2:
        refused.append("a third bottom (distances replacing the first)")
    return _options_unless_refused(loss, ctx, refused, "negative_margin", f32(p.negative_margin), "CContrastiveLoss")


def triplet_options(loss, ctx: FusionContext) -> dict | None:
    """``CTripletLoss`` options of a GeneralTripletLoss, or None (with a warning)."""
    p = loss.general_triplet_loss_param
    refused = []
    if not p.hardest_only:
        refused.append("hardest_only: false (every violating negative summed)")
    if p.positive_first:
        refused.append("positive_first: true")
    for name in ("positive_weight", "negative_weight"):
        if f32(getattr(p, name)) != 1.0:
            refused.append(f"{name} {f32(getattr(p, name)):g}")
    if len(loss.bottom) > 2:
        refused.append("a third bottom (per-sample weights)")
    options = _options_unless_refused(loss, ctx, refused, "margin", f32(p.margin), "CTripletLoss")
    return None if options is None else {**options, "center": bool(p.add_center_loss)}


def _options_unless_refused(loss, ctx: FusionContext, refused: list, margin_field: str, margin: float,
                            loss_class: str) -> dict | None:
    """{"margin": margin}, or None with a warning when the settings (``refused``, and a margin outside the
    range of squared unit distances [0, 4]) are not what keras_margin's ``loss_class`` computes."""
    if not 0.0 <= margin <= 4.0:
        refused.append(f"{margin_field} {margin:g} outside [0, 4]")
    if refused:
        ctx.warn(f"layer '{loss.name}': {loss.type} with {', '.join(refused)} is not keras_margin's {loss_class}; "
                 "its InnerDistance converts literally (distances, no training objective)")
        return None
    return {"margin": margin}


def _softmax_sibling(feature: str, distance_layer, ctx: FusionContext):
    """(ip, ip_source, scale, softmax_loss) of InnerProduct(feature, unit Parameter) -> Scale -> SoftmaxWithLoss
    reading the same normalised feature as ``distance_layer``, or None."""
    for ip in ctx.consumers.get(feature, []):
        if ip is distance_layer or ip.type != "InnerProduct" or len(ip.bottoms) != 2:
            continue
        p = ip.param.inner_product_param
        source = agent_source(ip, ctx)
        if source is None or not source["normalized"] or p.bias_term or p.transpose:
            continue
        users = ctx.users_of(ip)
        if not users or len(users) != 1 or users[0].type != "Scale" or ctx.users_of(users[0]) != []:
            continue
        scale = users[0]
        if scale.param.scale_param.num_axes != 0 or len(scale.bottoms) != 1:
            continue
        losses = _caffe_readers(scale.top_names[0], ctx, ("SoftmaxWithLoss",))
        if len(losses) == 1:
            return ip, source, scale, losses[0]
    return None


@fusion_pattern
def agent_head(layer, ctx: FusionContext) -> Fused | None:
    """TRAIN: Normalize -> InnerDistance (L2, unit agents) -> GeneralContrastiveLoss / GeneralTripletLoss."""
    if layer.type != "InnerDistance" or ctx.plan.phase != "TRAIN":
        return None
    p = layer.param.inner_distance_param
    readers = _caffe_readers(layer.top_names[0], ctx, ("GeneralContrastiveLoss", "GeneralTripletLoss"))
    if not readers:
        return None
    source = agent_source(layer, ctx)
    problem = None
    if len(readers) > 1 or ctx.users_of(layer) != []:
        problem = "its distances feed other layers too"
    elif p.distance_type != "L2":
        problem = f"distance_type {p.distance_type!r} is not the squared L2 distance D = 2 - 2 cos"
    elif not _is_l2_normalized(layer.bottoms[0], ctx):
        problem = "its feature bottom is not L2-normalised (no Normalize), so D is not 2 - 2 cos"
    elif source is None or not source["normalized"]:
        problem = "its agents are not L2-normalised (normalize: true or a Normalize after the Parameter)"
    elif len(layer.bottoms) == 1 and p.transpose:
        problem = "transpose: true"
    if problem is not None:
        ctx.warn(f"layer '{layer.name}': no agent head ({problem}); it converts literally (distances, no "
                 "training objective)")
        return None
    loss = readers[0]
    if loss.type == "GeneralContrastiveLoss":
        options, loss_class = contrastive_options(loss, ctx), "CContrastiveLoss"
    else:
        options, loss_class = triplet_options(loss, ctx), "CTripletLoss"
    if options is None:
        return None
    weight = _loss_weight(loss)
    if loss.type == "GeneralContrastiveLoss":
        sibling = _softmax_sibling(layer.bottoms[0], layer, ctx)
        if sibling is not None:
            return _combined(layer, source, loss, options, weight, sibling, ctx)
    kernel_layer = source["kernel_layer"]
    num = source["num"] or p.num_output
    spec = HeadSpec("CosineDense", layer=kernel_layer.name, num_classes=num, row_eps=AGENT_ROW_EPS,
                    loss=loss_class, loss_options=options,
                    members=tuple(m.name for m in [layer, *source["members"]]),
                    reference={"layer": layer.name, "top": layer.top_names[0], "kind": "distance_from_cosine"})
    members = [layer, *source["members"]]
    fused = head_layer(layer, spec, members, weight_layers=[kernel_layer.name])
    fused.weight_shapes = [(num, int(layer.input_shapes[0][-1]))]
    fused.weights_found = kernel_layer.weights_found
    text = ", ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in options.items())
    ctx.plan.fusions.append(f"{' + '.join(m.name for m in members)} ({loss.name}: {loss.type}) -> CosineDense({num}) "
                            f"with {loss_class}({text}); the model outputs cos (D = 2 - 2 cos)")
    if weight != 1.0:
        ctx.warn(f"layer '{loss.name}': loss_weight {weight:g}; multiply the {loss_class} by it "
                 f"(compile(..., loss_weights=[{weight:g}]))")
    return Fused(fused, members)


def _combined(layer, source, contrastive, options, agent_weight, sibling, ctx: FusionContext) -> Fused | None:
    ip, ip_source, scale, softmax = sibling
    if _loss_weight(softmax) != 1.0 or softmax.loss_param.HasField("ignore_label"):
        ctx.warn(f"layer '{softmax.name}': a softmax loss_weight other than 1 or an ignore_label; no "
                 "NormFaceContrastiveHead (the layers convert literally)")
        return None
    s = constant_scale(scale, ctx.caffemodel)
    if s is None or s <= 0:
        ctx.warn(f"layer '{scale.name}': not one positive scale; no NormFaceContrastiveHead")
        return None
    learned, scale_min = learned_scale(scale, s, ctx)
    num = ip_source["num"]
    if num != source["num"]:
        return None
    options = {"s": s, "learn_scale": learned, "scale_min": scale_min, "margin": options["margin"],
               "agent_weight": agent_weight, "fused_loss": True}
    members = [layer, *source["members"], ip, *ip_source["members"], scale]
    kernel_layer, agents_layer = ip_source["kernel_layer"], source["kernel_layer"]
    spec = HeadSpec("NormFaceContrastiveHead", layer=kernel_layer.name, num_classes=num, options=options,
                    state={"scale": s} if learned else {}, row_eps=AGENT_ROW_EPS, loss="add_loss",
                    members=tuple(m.name for m in members), shown=("s", "learn_scale", "margin", "agent_weight"),
                    reference={"kind": "training_loss", "top": softmax.top[0] if len(softmax.top) else softmax.name,
                               "terms": {softmax.name: 1.0, contrastive.name: agent_weight}})
    fused = head_layer(layer, spec, members, weight_layers=[kernel_layer.name, agents_layer.name])
    label = contrastive.bottom[1] if len(contrastive.bottom) > 1 else "label"
    label_id = next((blob for blob in ctx.producers if blob.split("#")[0] == label), None)
    fused.type = AGENT_HEAD_TYPE
    fused.bottoms = [layer.bottoms[0]] + ([label_id] if label_id is not None else [])
    fused.input_shapes = [layer.input_shapes[0]] + ([ctx.plan.blob_shapes[label_id]] if label_id else [])
    fused.tops, fused.top_names = [f"{spec.reference['top']}"], [spec.reference["top"]]
    fused.output_shapes = [(None,)]
    dim = int(layer.input_shapes[0][-1])
    fused.weight_shapes = [(num, dim), (num, dim)]
    fused.weights_found = kernel_layer.weights_found and agents_layer.weights_found
    fused.attrs["label"] = label
    ctx.plan.fusions.append(
        f"{' + '.join(m.name for m in members)} ({softmax.name} + {agent_weight:g} * {contrastive.name}) -> "
        f"NormFaceContrastiveHead({num}, s={s:g}{', learned' if learned else ''}, margin={options['margin']:g}, "
        f"agent_weight={agent_weight:g}, fused_loss=True): kernel '{kernel_layer.name}', agents "
        f"'{agents_layer.name}'; the model takes [features, labels] and outputs the per-sample loss")
    return Fused(fused, members)


@fusion_pattern
def parameter_agents(layer, ctx: FusionContext) -> Fused | None:
    """Parameter [-> Normalize] -> InnerDistance / InnerProduct (second bottom): the layer with its own blob."""
    if layer.type not in ("InnerDistance", "InnerProduct") or len(layer.bottoms) != 2:
        return None
    source = agent_source(layer, ctx)
    if source is None:
        return None
    param_layer = source["kernel_layer"]
    num, dim = source["num"], int(param_layer.output_shapes[0][1])
    message = copy.deepcopy(layer.param)
    del message.bottom[1:]
    if layer.type == "InnerDistance":
        p = message.inner_distance_param
        p.num_output, p.transpose, p.normalize = num, False, source["normalized"]
        p.update_center_only = False
    else:
        p = message.inner_product_param
        if p.bias_term or p.transpose:
            return None  # the handler explains why these do not convert
        p.num_output, p.normalize = num, source["normalized"]
    fused = copy.copy(layer)
    fused.param, fused.bottoms, fused.input_shapes = message, layer.bottoms[:1], layer.input_shapes[:1]
    fused.weight_shapes, fused.weight_layers = [(num, dim)], [param_layer.name]
    fused.weights_found = param_layer.weights_found
    members = [layer, *source["members"]]
    fused.members = [m.name for m in members]
    fused.attrs = {**layer.attrs, "reference": {"layer": layer.name, "top": layer.top_names[0], "kind": "same"}}
    how = "row-normalised (eps 1e-6) at each forward" if source["normalized"] else "as stored"
    ctx.plan.fusions.append(f"{' + '.join(m.name for m in members)} -> {layer.type} '{layer.name}' owning the "
                            f"({num}, {dim}) blob of Parameter '{param_layer.name}', {how}")
    return Fused(fused, members)
