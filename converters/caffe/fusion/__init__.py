"""Plan stage, part 3: fusion of Caffe layer patterns into keras_margin heads, run after shape inference.

Like tf2onnx's ``rewriter/`` modules, each pattern is one function in a module of its family
(``margin_heads``: normalised InnerProduct chains and SphereFace's MarginInnerProduct; ``agents``: NormFace's
agent layers), registered in order with ``@fusion_pattern``. A pattern looks at one planned layer and its
consumers and returns a ``Fused`` (the new layer, described by a typed ``HeadSpec``, and the member layers it
replaces) or None. Members are removed by identity, never by name, so an unrelated layer sharing a member's
name stays. One generic handler (``handlers.face.HeadHandler``) builds any ``HeadSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["HeadSpec", "Fused", "FusionContext", "fusion_pattern", "fuse", "HEAD_TYPE", "f32"]

#: The planned-layer type of every fused head (built by ``handlers.face.HeadHandler``).
HEAD_TYPE = "keras_margin.Head"


def f32(value: float) -> float:
    """A float32 proto value as the decimal it was written as (0.35, not 0.3499999940395355)."""
    return float(str(np.float32(value)))


@dataclass(frozen=True)
class HeadSpec:
    """A keras_margin head that stands for a chain of Caffe layers.

    Attributes:
        head_class: the class in ``keras_margin.layers`` ("AMSoftmaxHead", "NormFaceHead", "CosineDense"...).
        layer: the Caffe layer whose weights are the head's kernel (and whose name the head takes).
        num_classes: the kernel's number of rows in Caffe (classes or agents).
        options: the head's constructor arguments besides ``num_classes`` (e.g. ``{"s": 30.0, "m": 0.35}``).
        state: values for the head's other variables, by variable name (``{"iteration": 0, "margin": 0.0}``);
            the kernel comes from the caffemodel.
        row_eps: the epsilon the Caffe layer normalises the weight rows with (0 for SphereFace's layer).
        transpose: the Caffe blob is stored (K, N) (InnerProduct ``transpose: true``).
        loss: how to train it: "head.loss" (compile with ``loss=head.loss``), "add_loss" (the head adds
            its own term), or the name of a ``keras_margin.losses`` class with ``loss_options``.
        loss_options: constructor arguments of that loss class.
        members: the Caffe layers it replaces, first the kernel's layer.
        reference: how the parity check compares it (``{"layer", "top", "kind"}``).
    """

    head_class: str
    layer: str
    num_classes: int
    options: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    row_eps: float = 1e-6
    transpose: bool = False
    loss: str = "head.loss"
    loss_options: dict = field(default_factory=dict)
    members: tuple = ()
    reference: dict = field(default_factory=dict)
    #: options shown by ``str()`` (all of them when None)
    shown: tuple | None = None

    def __str__(self) -> str:
        """E.g. "AMSoftmaxHead 'fc6_l2' (num_classes=10516, s=30, m=0.35, margin_rule=caffe)"."""
        keys = self.shown if self.shown is not None else tuple(self.options)
        values = [("num_classes", self.num_classes)] + [(key, self.options[key]) for key in keys
                                                        if key in self.options]
        text = ", ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                         for key, value in values)
        return f"{self.head_class} '{self.layer}' ({text})"

    def compile_hint(self, keras_name: str) -> str:
        """How to compile a model ending in this head (a line of the conversion summary)."""
        if self.loss == "head.loss":
            how = f"compile with loss=model.get_layer('{keras_name}').loss"
        elif self.loss == "add_loss":
            how = f"'{keras_name}' adds its training term itself (add_loss)"
        else:
            options = ", ".join(f"{key}={value!r}" for key, value in self.loss_options.items())
            how = f"compile with loss=keras_margin.losses.{self.loss}({options})"
        return f"{how} (or conversion.training_loss()); '{keras_name}' outputs cos(theta)"

    def training_loss(self, head):
        """The Keras loss the Caffe net trains this head with (None when the head adds its own)."""
        if self.loss == "head.loss":
            return head.loss
        if self.loss == "add_loss":
            return None
        from keras_margin import losses

        return getattr(losses, self.loss)(**self.loss_options)


@dataclass
class Fused:
    """What a pattern returns: the planned layer of the head and the planned layers it replaces."""

    layer: object  # planner.PlannedLayer
    members: list


@dataclass
class FusionContext:
    """The graph around a layer: who reads each blob, who writes it, the caffemodel, the plan (for warnings)."""

    consumers: dict
    producers: dict
    caffemodel: object
    plan: object

    def users_of(self, layer) -> list | None:
        """The layers reading ``layer``'s single top ([] when none), or None for a multi-top layer."""
        return self.consumers.get(layer.tops[0], []) if len(layer.tops) == 1 else None

    def warn(self, message: str) -> None:
        self.plan.warnings.append(message)


Pattern = Callable[[object, FusionContext], "Fused | None"]
_PATTERNS: list[Pattern] = []


def fusion_pattern(fn: Pattern) -> Pattern:
    """Register ``fn(layer, ctx) -> Fused | None``; patterns run in registration order, first match wins."""
    _PATTERNS.append(fn)
    return fn


def head_layer(base, spec: HeadSpec, members: list, weight_layers: list | None = None):
    """The planned layer of ``spec``: it reads ``base``'s bottoms and outputs cos(theta) as ``base``'s top."""
    from converters.caffe.planner import PlannedLayer

    return PlannedLayer(
        name=base.name, type=HEAD_TYPE, param=base.param, bottoms=list(base.bottoms[:1]), tops=[base.tops[0]],
        top_names=[base.top_names[0]], input_shapes=list(base.input_shapes[:1]),
        output_shapes=[(None, spec.num_classes)], weight_shapes=list(base.weight_shapes),
        weight_layers=list(weight_layers or [base.name]), weights_found=base.weights_found,
        members=[m.name for m in members], attrs={"reference": spec.reference}, index=base.index, head=spec,
        phase=base.phase,
    )


def fuse(planned: list, caffemodel, plan) -> list:
    """Run every pattern over ``planned``; return the layers with each match replaced by its head."""
    from converters.caffe.fusion import agents, margin_heads  # noqa: F401  (registers the patterns)

    ctx = FusionContext({}, {}, caffemodel, plan)
    for layer in planned:
        for bottom in layer.bottoms:
            ctx.consumers.setdefault(bottom, []).append(layer)
        for top in layer.tops:
            ctx.producers[top] = layer
    replaced: dict[int, object] = {}
    removed: set[int] = set()
    for layer in planned:
        if id(layer) in removed:
            continue
        for pattern in _PATTERNS:
            fused = pattern(layer, ctx)
            if fused is not None:
                replaced[id(fused.members[0])] = fused.layer
                for top, shape in zip(fused.layer.tops, fused.layer.output_shapes):
                    plan.blob_shapes.setdefault(top, shape)  # e.g. a head that outputs its loss
                removed.update(id(member) for member in fused.members)
                break
    result = []
    for layer in planned:
        if id(layer) in replaced:
            result.append(replaced[id(layer)])
        elif id(layer) not in removed:
            result.append(layer)
    return result
