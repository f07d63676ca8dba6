"""Fusion patterns of the margin-softmax chains: the happynear fork's normalised InnerProduct followed by
nothing (CosineDense), by LabelSpecificAdd + Scale (AMSoftmaxHead, the fork's margin rule and schedule) or
by a Scale (NormFaceHead, the scale learned when the prototxt learns it), and SphereFace's
MarginInnerProduct (SphereFaceHead)."""

from __future__ import annotations

import numpy as np

from converters.caffe.fork import FORK_EPS
from converters.caffe.fusion import Fused, FusionContext, HeadSpec, f32, fusion_pattern, head_layer
from converters.caffe.shapes import canonical_axis

#: Eps the happynear fork normalises InnerProduct weight rows with (CPU code).
IP_ROW_EPS = FORK_EPS

#: The AMSoftmaxHead options the conversion summary shows.
_AMSOFTMAX_SHOWN = ("s", "m", "margin_rule")


def constant_scale(layer, caffemodel) -> float | None:
    """The single value of a Scale layer's parameter (after the fork's clamp), or None if not constant."""
    p = layer.param.scale_param
    if p.bias_term or len(layer.bottoms) != 1:
        return None
    if layer.weights_found and caffemodel is not None:
        values = caffemodel.blobs(layer.name)[0].astype(np.float64)
        if p.HasField("min_value") or p.HasField("max_value"):
            values = np.clip(values, p.min_value if p.HasField("min_value") else None,
                             p.max_value if p.HasField("max_value") else None)
        if values.size == 0 or not np.all(values == values.flat[0]):
            return None
        return f32(values.flat[0])
    if not p.HasField("filler"):
        return 1.0
    if p.filler.type != "constant":
        return None
    value = p.filler.value
    if p.HasField("min_value"):
        value = max(value, p.min_value)
    if p.HasField("max_value"):
        value = min(value, p.max_value)
    return f32(value)


def learned_scale(scale_layer, s: float, ctx: FusionContext) -> tuple[bool, float | None]:
    """(learned, floor) of a Scale layer feeding a softmax: Caffe learns its blob unless its ParamSpec says
    ``lr_mult: 0`` (the default lr_mult is 1), and clamps it to ``min_value`` before each forward."""
    sp = scale_layer.param.scale_param
    learned = not (len(scale_layer.param.param) > 0 and scale_layer.param.param[0].lr_mult == 0)
    scale_min = f32(sp.min_value) if learned and sp.HasField("min_value") else None
    if learned and (sp.HasField("max_value") or (scale_min is not None and not 0.0 < scale_min <= s)):
        ctx.warn(f"layer '{scale_layer.name}': a learned scale with max_value or a floor outside (0, s] converts as "
                 f"a fixed s={s:g}")
        return False, None
    return learned, scale_min


def _is_l2_normalized(blob: str, ctx: FusionContext) -> bool:
    source = ctx.producers.get(blob)
    return source is not None and source.type == "Normalize" and source.param.normalize_param.normalize_type == "L2"


def _margin_schedule(lsa_layer, ctx: FusionContext) -> tuple[dict | None, bool]:
    """(schedule, ok): the layer anneals exactly when ``bias_base`` is set (``has_bias_base()``)."""
    lsa = lsa_layer.param.label_specific_add_param
    if not lsa.HasField("bias_base"):
        return None, True
    schedule = {key: f32(getattr(lsa, key)) for key in ("bias_base", "bias_gamma", "bias_power", "bias_min",
                                                         "bias_max")}
    if not -1.0 <= schedule["bias_min"] <= schedule["bias_max"] <= 0.0:
        ctx.warn(f"layer '{lsa_layer.name}': margin schedule bias_min={schedule['bias_min']:g}, "
                 f"bias_max={schedule['bias_max']:g} is not within -1 <= bias_min <= bias_max <= 0 (a margin in "
                 "[0, 1]); no AMSoftmaxHead")
        return None, False
    return schedule, True


@fusion_pattern
def normalized_inner_product(ip, ctx: FusionContext) -> Fused | None:
    """Normalize (L2) -> InnerProduct ``normalize: true`` [-> LabelSpecificAdd -> Scale | -> Scale]."""
    if ip.type != "InnerProduct" or not ip.param.inner_product_param.normalize:
        return None
    p = ip.param.inner_product_param
    shape = ip.input_shapes[0]
    if p.bias_term or len(ip.bottoms) != 1 or len(ip.tops) != 1 or len(shape) != 2 or canonical_axis(p.axis, 2) != 1:
        ctx.warn(f"layer '{ip.name}': InnerProduct normalize with a bias, several tops or a non-2-D bottom stays a "
                 "Dense layer (no margin head)")
        return None
    if not _is_l2_normalized(ip.bottoms[0], ctx):
        ctx.warn(f"layer '{ip.name}': its bottom is not L2-normalised, so its output is not a cosine; it stays a "
                 "Dense layer with row-normalised weights (no margin head)")
        return None
    base = dict(layer=ip.name, num_classes=p.num_output, row_eps=IP_ROW_EPS, transpose=p.transpose,
                reference={"layer": ip.name, "top": ip.top_names[0], "kind": "cosine"})
    users = ctx.users_of(ip)
    if users == []:
        spec = HeadSpec("CosineDense", members=(ip.name,), loss="add_loss", **base)
        ctx.plan.fusions.append(f"{ip.name} (InnerProduct normalize) -> CosineDense({p.num_output})")
        return Fused(head_layer(ip, spec, [ip]), [ip])
    if users is None or len(users) != 1:
        return None
    nxt = users[0]
    if nxt.type == "LabelSpecificAdd":
        return _amsoftmax(ip, nxt, base, ctx)
    if nxt.type == "Scale":
        return _normface(ip, nxt, base, ctx)
    return None


def _amsoftmax(ip, lsa_layer, base: dict, ctx: FusionContext) -> Fused | None:
    scale_users = ctx.users_of(lsa_layer) if len(lsa_layer.tops) == 1 else ctx.consumers.get(lsa_layer.tops[0], [])
    if not scale_users or len(scale_users) != 1 or scale_users[0].type != "Scale":
        ctx.warn(f"layer '{lsa_layer.name}': LabelSpecificAdd not followed by a Scale; no AMSoftmaxHead")
        return None
    scale = scale_users[0]
    if ctx.users_of(scale) != []:
        ctx.warn(f"layer '{scale.name}': its output feeds other layers; no AMSoftmaxHead")
        return None
    s = constant_scale(scale, ctx.caffemodel)
    lsa = lsa_layer.param.label_specific_add_param
    m = -f32(lsa.bias)
    if s is None or s <= 0 or not 0.0 <= m <= 1.0:
        ctx.warn(f"layers '{ip.name}' -> '{lsa_layer.name}' -> '{scale.name}': scale {s} / margin {m} is not a "
                 "constant s > 0 and m in [0, 1]; no AMSoftmaxHead")
        return None
    schedule, ok = _margin_schedule(lsa_layer, ctx)
    if not ok:
        return None
    state = {}
    if schedule is not None:
        from keras_margin.margins.amsoftmax import scheduled_margin  # the head's own schedule

        start = float(np.asarray(scheduled_margin(int(lsa.iteration), **schedule)))
        state = {"iteration": int(lsa.iteration), "margin": start}
        ctx.warn(f"layer '{lsa_layer.name}': annealed margin; the head follows the layer's schedule "
                 f"(margin_schedule={schedule}) from iteration {lsa.iteration}")
    # The released layer's rule (the margin only where cos_y > m), so training matches the fork.
    options = {"s": s, "m": m, "margin_rule": "caffe", "margin_schedule": schedule}
    spec = HeadSpec("AMSoftmaxHead", options=options, state=state, shown=_AMSOFTMAX_SHOWN,
                    members=(ip.name, lsa_layer.name, scale.name), **base)
    ctx.plan.fusions.append(f"{ip.name} + {lsa_layer.name} + {scale.name} -> AMSoftmaxHead({base['num_classes']}, "
                            f"s={s:g}, m={m:g}, margin_rule='caffe'{', margin_schedule=...' if schedule else ''})")
    return Fused(head_layer(ip, spec, [ip, lsa_layer, scale]), [ip, lsa_layer, scale])


def _normface(ip, scale, base: dict, ctx: FusionContext) -> Fused | None:
    if ctx.users_of(scale) != []:
        return None
    s = constant_scale(scale, ctx.caffemodel)
    if s is None or s <= 0:
        return None
    learned, scale_min = learned_scale(scale, s, ctx)
    options = {"s": s, "learn_scale": learned, "scale_min": scale_min}
    spec = HeadSpec("NormFaceHead", options=options, state={"scale": s} if learned else {},
                    shown=("s", "learn_scale"), members=(ip.name, scale.name), **base)
    ctx.plan.fusions.append(f"{ip.name} + {scale.name} -> NormFaceHead({base['num_classes']}, s={s:g}"
                            f"{', learn_scale=True' if learned else ''})")
    return Fused(head_layer(ip, spec, [ip, scale]), [ip, scale])


@fusion_pattern
def margin_inner_product(mip, ctx: FusionContext) -> Fused | None:
    """SphereFace's MarginInnerProduct (its optional second top, lambda, unused) -> SphereFaceHead."""
    if mip.type != "MarginInnerProduct":
        return None
    p = mip.param.margin_inner_product_param
    shape = mip.input_shapes[0]
    if len(mip.tops) > 2 or ctx.consumers.get(mip.tops[0], []) or len(shape) != 2:
        return None
    if len(mip.tops) == 2 and ctx.consumers.get(mip.tops[1], []):
        return None
    m = int(p.type) + 1
    options = {"m": m, "base": f32(p.base), "gamma": f32(p.gamma), "power": f32(p.power),
               "lambda_min": f32(p.lambda_min)}
    spec = HeadSpec("SphereFaceHead", layer=mip.name, num_classes=p.num_output, options=options,
                    state={"iteration": int(p.iteration)}, row_eps=0.0, members=(mip.name,),
                    reference={"layer": mip.name, "top": mip.top_names[0], "kind": "cos_from_logits"})
    ctx.plan.fusions.append(f"{mip.name} (MarginInnerProduct) -> SphereFaceHead({p.num_output}, m={m}, "
                            f"base={p.base:g}, gamma={p.gamma:g}, power={p.power:g}, lambda_min={p.lambda_min:g}, "
                            f"iteration={p.iteration})")
    if len(mip.tops) == 2:
        ctx.plan.fusions.append(f"{mip.name}: its second top '{mip.top_names[1]}' (lambda) is dropped: nothing "
                                "reads it, and the head computes lambda from its saved iteration counter")
    return Fused(head_layer(mip, spec, [mip]), [mip])
