"""Plan stage: from a parsed net (and caffemodel index) to the list of layers to build, with every shape known.

It owns phase filtering (include/exclude rules), dropping training-only layers, in-place blob versions,
Caffe-rule shape inference through each handler, the check of every caffemodel blob against its layer's
expected shape, fusion of the margin-softmax layer chains into keras_margin heads, and the net outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from converters.caffe import fusion, registry, schema
from converters.caffe.errors import ConversionError
from converters.caffe.reader import Caffemodel, CaffeNet, UnknownField, _is_repeated
from converters.caffe.registry import TRAINING_ONLY_TYPES
from converters.caffe.shapes import count

__all__ = ["PlannedLayer", "Plan", "DroppedLayer", "plan_net", "MAX_PARAMETERS", "MAX_BLOB_ELEMENTS",
           "INT32_MAX", "TRAINING_ONLY_TYPES"]

#: A caffemodel is at most 2 GiB (Caffe's read limit), i.e. at most 2**29 float32 values; a prototxt that
#: implies more parameters than that is refused before anything is allocated.
MAX_PARAMETERS = 2**29

#: Per-sample values of any blob the plan infers (2**28 float32 = 1 GiB per sample): beyond it a prototxt's
#: pad / stride / kernel values are absurd, and the first call of the model would need tens of GB.
MAX_BLOB_ELEMENTS = 2**28



Shape = tuple  # Caffe order, batch first (None)


@dataclass
class PlannedLayer:
    """One layer of the plan: a Caffe layer (or several fused into one head) with resolved blobs and shapes.

    ``bottoms``/``tops`` are blob ids: the Caffe blob name, suffixed ``#k`` for the k-th in-place rewrite.
    Shapes are Caffe-ordered (N, C, H, W) tuples with ``None`` for the batch.
    """

    name: str
    type: str
    param: Any  # schema.LayerParameter
    bottoms: list[str]
    tops: list[str]
    top_names: list[str]
    input_shapes: list[Shape] = field(default_factory=list)
    output_shapes: list[Shape] = field(default_factory=list)
    weight_shapes: list[Shape] = field(default_factory=list)
    weight_layers: list[str] = field(default_factory=list)  # caffemodel layers whose blobs feed this layer
    weights_found: bool = False  # the caffemodel holds this layer's blobs
    members: list[str] = field(default_factory=list)  # Caffe layers this one stands for (fusion)
    attrs: dict = field(default_factory=dict)
    index: int = 0  # position in the (phase-filtered) prototxt
    head: Any = None  # fusion.HeadSpec of a fused head
    phase: str = "TEST"  # the plan's phase ("TRAIN" or "TEST"); a layer's own ``phase`` field wins in handlers

    @property
    def in_place(self) -> bool:
        return any(top.split("#")[0] in {bottom.split("#")[0] for bottom in self.bottoms} for top in self.tops)

    def error(self, message: str) -> ConversionError:
        """A ``ConversionError`` naming this layer."""
        return ConversionError(message, layer=self.name, layer_type=self.param.type or self.type)


@dataclass(frozen=True)
class DroppedLayer:
    name: str
    type: str
    reason: str


@dataclass
class Plan:
    """The layers to build, in order, with Caffe-ordered shapes (batch ``None``) for every blob."""

    name: str
    phase: str
    layers: list[PlannedLayer]
    caffe_layers: list  # the phase-filtered, upgraded LayerParameters (before dropping and fusion)
    blob_shapes: dict[str, tuple]
    outputs: list[str]
    needed: set[str]
    dropped: list[DroppedLayer] = field(default_factory=list)
    missing_weights: list[str] = field(default_factory=list)
    unused_weights: list[str] = field(default_factory=list)
    unknown_fields: list[UnknownField] = field(default_factory=list)
    fusions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    parameter_count: int = 0
    source: str = ""
    source_format: str = "V2"
    caffemodel: str | None = None
    #: the Caffe fork the prototxt was written for (``CaffeNet.dialect``: "bvlc", "happynear", "sphereface")
    dialect: str | None = None
    #: Caffe layer name -> the blob shapes the prototxt implies for it, for every layer with blobs, fused
    #: members (e.g. an AM-Softmax head's Scale) included: what a caffemodel for this net holds.
    layer_weight_shapes: dict[str, list[tuple]] = field(default_factory=dict)

    def final_blob_ids(self) -> dict[str, str]:
        """Caffe blob name -> id of its last version (what Caffe's ``net.blobs[name]`` holds after forward)."""
        final = {}
        for layer in self.layers:
            for blob_id, name in zip(layer.tops, layer.top_names):
                final[name] = blob_id
        return final


def _phase_number(phase: str) -> int:
    value = str(phase).upper()
    if value not in ("TRAIN", "TEST"):
        raise ConversionError(f"phase must be 'TEST' (deploy) or 'TRAIN'; got {phase!r}")
    return 0 if value == "TRAIN" else 1


def _rule_matches(state, rule) -> bool:
    """Caffe ``Net::StateMeetsRule``: every field the rule sets must agree with the state."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(stage not in state.stage for stage in rule.stage):
        return False
    if any(stage in state.stage for stage in rule.not_stage):
        return False
    return True


def _included(state, layer) -> bool:
    """Caffe ``Net::FilterNet`` for one layer."""
    if len(layer.include) and len(layer.exclude):
        raise ConversionError("has both include and exclude rules, which Caffe refuses", layer=layer.name,
                              layer_type=layer.type)
    if len(layer.include):
        return any(_rule_matches(state, rule) for rule in layer.include)
    return not any(_rule_matches(state, rule) for rule in layer.exclude)


def _shapes_compatible(stored: tuple, expected: tuple) -> bool:
    """Caffe's ``ShapeEquals`` in spirit: equal, or equal once size-1 axes are dropped (legacy 4-D dims,
    NVIDIA's 1 x C x 1 x 1 BatchNorm blobs)."""
    if tuple(stored) == tuple(expected):
        return True
    if count(stored) != count(expected):
        return False
    return [d for d in stored if d != 1] == [d for d in expected if d != 1]


def _normalize_input_shapes(input_shape, input_layers: list[PlannedLayer]) -> dict[str, tuple]:
    if input_shape is None:
        return {}
    if isinstance(input_shape, Mapping):
        result = {}
        for name, shape in input_shape.items():
            result[str(name)] = tuple(int(v) for v in shape)
        known = {top for layer in input_layers for top in layer.top_names}
        unknown = sorted(set(result) - known)
        if unknown:
            raise ConversionError(f"input_shape names {unknown} are not net inputs; inputs are {sorted(known)}")
        return result
    shape = tuple(int(v) for v in input_shape)
    if not input_layers:
        raise ConversionError("input_shape was given but the net has no input or data layer")
    return {input_layers[0].top_names[0]: shape}


def plan_net(net: CaffeNet, caffemodel: Caffemodel | None = None, phase: str = "TEST",
             input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
             stage: Sequence[str] | str | None = None) -> Plan:
    """Plan the conversion of ``net`` (see the module docstring for what is checked).

    Args:
        net: the parsed prototxt (``reader.read_prototxt``).
        caffemodel: the opened weights (``reader.read_caffemodel``), or None for initialised weights.
        phase: "TEST" (deploy, default) or "TRAIN" (rebuilds a training head), as Caffe's include/exclude
            rules select layers.
        input_shape: (C, H, W) of the first input, or {blob name: (C, H, W)}, for nets whose data layer does
            not state its image size; overrides the prototxt. A name no layer produces (the first bottom of a
            head fragment, e.g. NormFace's ``last_ip_layer``) becomes a model input of that shape.
        stage: NetState stages (a name or a list), added to the prototxt's ``state { stage }``, for the
            include/exclude rules that name stages (as a solver's ``test_state { stage: ... }`` does).

    Example:
    >>> from converters.caffe.reader import parse_prototxt
    >>> plan = plan_net(parse_prototxt(
    ...     'input: "data" input_dim: 1 input_dim: 3 input_dim: 9 input_dim: 9 '
    ...     'layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" '
    ...     '        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }'))
    >>> plan.blob_shapes["pool"]   # ceil((9 - 2) / 2) + 1 = 5
    (None, 3, 5, 5)
    """
    phase_number = _phase_number(phase)
    message = net.net
    state = schema.NetState(phase=phase_number, level=message.state.level)
    state.stage.extend(message.state.stage)
    stages = [stage] if isinstance(stage, str) else list(stage or [])
    state.stage.extend(str(name) for name in stages if name not in state.stage)

    filtered = [layer for layer in message.layer if _included(state, layer)]
    excluded_tops: dict[str, list] = {}
    for layer in message.layer:
        if layer not in filtered:
            for top in layer.top:
                excluded_tops.setdefault(top, []).append(layer)
    filtered = _declare_fragment_inputs(filtered, message, input_shape)
    plan = Plan(name=message.name, phase="TRAIN" if phase_number == 0 else "TEST", layers=[], caffe_layers=filtered,
                blob_shapes={}, outputs=[], needed=set(), unknown_fields=list(net.unknown_fields),
                source=net.path, source_format=net.source_format, dialect=getattr(net, "dialect", None),
                caffemodel=caffemodel.path if caffemodel is not None else None)

    kept = []
    dropped_tops: dict[str, DroppedLayer] = {}
    for layer in filtered:
        if registry.training_only(layer.type):
            dropped = DroppedLayer(layer.name, layer.type, "training only")
            plan.dropped.append(dropped)
            for top in layer.top:
                dropped_tops[top] = dropped
        else:
            kept.append(layer)

    internal = next((layer for layer in kept if layer.type == fusion.HEAD_TYPE), None)
    if internal is not None:
        raise ConversionError(f"type '{internal.type}' is the converter's internal type for fused heads, not a Caffe "
                              "layer type", layer=internal.name, layer_type=internal.type)
    unknown = [layer for layer in kept if registry.lookup(layer.type) is None]
    if unknown:
        listed = ", ".join(f"'{layer.name}' (type '{layer.type}')" for layer in unknown)
        first = unknown[0]
        raise ConversionError(
            f"no handler for {len(unknown)} layer(s): {listed}. Register one before converting: "
            "from converters.caffe import Handler, Built, register; "
            f"@register(\"{first.type}\") class MyHandler(Handler): def build(self, ctx, layer, inputs, weights): ...",
            layer=first.name, layer_type=first.type,
        )

    for layer in kept:
        _check_int32_fields(layer)
        registry.lookup(layer.type).check_fields(layer, net.unknown_fields)
    planned = _resolve_blobs(kept, excluded_tops, dropped_tops, state)
    input_layers = [layer for layer in planned if registry.lookup(layer.type).is_input]
    overrides = _normalize_input_shapes(input_shape, input_layers)
    for layer in input_layers:
        layer.attrs["input_shapes"] = overrides

    _infer_shapes(planned, plan)
    plan.layer_weight_shapes = {layer.name: list(layer.weight_shapes) for layer in planned if layer.weight_shapes}
    _check_weights(planned, caffemodel, plan)
    planned = fusion.fuse(planned, caffemodel, plan)
    plan.layers = planned

    total = 0
    for layer in planned:
        total += sum(count(shape) for shape in layer.weight_shapes)
    if total > MAX_PARAMETERS:
        raise ConversionError(
            f"the prototxt implies {total:,} parameters ({4 * total / 2**30:.1f} GiB), more than any caffemodel "
            f"Caffe can read holds ({MAX_PARAMETERS:,}); refusing to allocate them"
        )
    plan.parameter_count = total

    consumed = {bottom for layer in planned for bottom in layer.bottoms}
    outputs = [top for layer in planned if not registry.lookup(layer.type).is_input
               for top in layer.tops if top not in consumed]
    if not outputs:
        raise ConversionError(f"{net.path}: the {plan.phase} net computes nothing (no layer output is left)")
    plan.outputs = outputs
    plan.needed = consumed | set(outputs)
    return plan


_UINT32 = schema.descriptor_pb2.FieldDescriptorProto.TYPE_UINT32
INT32_MAX = 2**31 - 1


def _check_int32_fields(layer) -> None:
    """Refuse a uint32 field (kernel_size, stride, pad, num_output, group...) above INT32_MAX: caffe.proto
    declares them uint32, but Caffe computes with them as ``int`` (a larger value wraps negative there), and
    Keras / TensorFlow take int32 sizes. One check for every layer type, where the prototxt's values enter."""
    stack = [(layer, "")]
    while stack:
        message, prefix = stack.pop()
        for fdesc, value in message.ListFields():
            if fdesc.name == "blobs":
                continue
            where = f"{prefix}{fdesc.name}"
            values = list(value) if _is_repeated(fdesc) else [value]
            if fdesc.type == _UINT32:
                for item in values:
                    if item > INT32_MAX:
                        raise ConversionError(
                            f"{where}: {item} is beyond the int32 range Caffe computes with (at most {INT32_MAX:,}; "
                            "caffe.proto's uint32 does not make larger values usable); give a sensible value",
                            layer=layer.name, layer_type=layer.type)
            elif fdesc.message_type is not None:
                stack.extend((item, f"{where}.") for item in values)


def _declare_fragment_inputs(filtered: list, message, input_shape) -> list:
    """Prepend an Input layer for each ``input_shape`` name that no layer produces and some layer reads: a net
    fragment (NormFace's heads read ``last_ip_layer``, which their trunk would produce)."""
    if not isinstance(input_shape, Mapping):
        return filtered
    produced, unproduced = set(message.input), []  # blobs read before any layer writes them
    for layer in filtered:
        unproduced.extend(b for b in layer.bottom if b not in produced and b not in unproduced)
        produced.update(layer.top)
    declared = []
    for name, shape in input_shape.items():
        if name not in unproduced:
            continue
        layer = schema.LayerParameter(name=str(name), type="Input", top=[str(name)])
        layer.input_param.shape.add().dim.extend([1, *(int(v) for v in shape)])
        declared.append(layer)
    return declared + filtered


def _stage_names(layer) -> list[str]:
    return sorted({name for rule in (*layer.include, *layer.exclude) for name in (*rule.stage, *rule.not_stage)})


def _exclusion_reason(sources: list, state) -> str:
    """Why the state's rules leave out the layers writing a blob: their phase, or (when the phase matches
    some rule) their stages."""
    phase = "TRAIN" if state.phase == 0 else "TEST"
    other = schema.NetState(phase=1 - state.phase, level=state.level)
    other.stage.extend(state.stage)
    named = ", ".join(f"'{source.name}' ({source.type})" for source in sources)
    stages = sorted({name for source in sources for name in _stage_names(source)})
    if stages and not any(_included(other, source) for source in sources):
        given = list(state.stage) or "none"
        return (f"it comes from layer(s) {named}, which phase {phase} with stages {given} excludes: their rules "
                f"name the stage(s) {stages}; pass stage= (CLI --stage) with the one you want")
    return f"it comes from layer(s) {named}, which phase {phase} excludes; try the other --phase"


def _resolve_blobs(kept, excluded_tops, dropped_tops, state) -> list[PlannedLayer]:
    current: dict[str, str] = {}
    versions: dict[str, int] = {}
    planned: list[PlannedLayer] = []
    for index, layer in enumerate(kept):
        handler = registry.lookup(layer.type)
        item = PlannedLayer(name=layer.name, type=layer.type, param=layer, bottoms=[], tops=[],
                            top_names=list(layer.top), members=[layer.name], weight_layers=[layer.name], index=index,
                            phase="TRAIN" if state.phase == 0 else "TEST")
        used = handler.used_bottoms(item)
        bottoms = list(layer.bottom) if used is None else list(layer.bottom)[:used]
        for bottom in bottoms:
            if bottom in current:
                item.bottoms.append(current[bottom])
                continue
            if bottom in dropped_tops:
                source = dropped_tops[bottom]
                reason = f"it comes from layer '{source.name}' ({source.type}), which is training-only and dropped"
            elif bottom in excluded_tops:
                reason = _exclusion_reason(excluded_tops[bottom], state)
            else:
                reason = ("no layer before it produces it; check the spelling or the layer order, or, if the file "
                          f"is a net fragment, declare it: input_shape={{'{bottom}': (C, H, W)}} "
                          f"(CLI: --input-shape {bottom}=C,H,W)")
            raise ConversionError(f"bottom '{bottom}' is not available: {reason}", layer=layer.name,
                                  layer_type=layer.type)
        if not layer.top and not handler.is_input:
            raise ConversionError("has no top", layer=layer.name, layer_type=layer.type)
        for top in layer.top:
            if top in versions:
                versions[top] += 1
                item.tops.append(f"{top}#{versions[top]}")
            else:
                versions[top] = 0
                item.tops.append(top)
        for top, blob_id in zip(layer.top, item.tops):
            current[top] = blob_id
        planned.append(item)
    return planned


def _infer_shapes(planned: list[PlannedLayer], plan: Plan) -> None:
    for layer in planned:
        handler = registry.lookup(layer.type)
        layer.input_shapes = [plan.blob_shapes[bottom] for bottom in layer.bottoms]
        try:
            outputs = [tuple(shape) for shape in handler.output_shapes(layer)]
            layer.weight_shapes = [tuple(int(d) for d in shape) for shape in handler.weight_shapes(layer)]
        except ConversionError:
            raise
        except (ValueError, IndexError, TypeError, ZeroDivisionError) as error:
            if not layer.bottoms and not handler.is_input:
                raise layer.error(f"has no bottom; a {layer.type} layer reads at least one blob") from None
            raise layer.error(f"{error} (bottom shapes {[tuple(s) for s in layer.input_shapes]})") from None
        if len(outputs) != len(layer.tops):
            raise layer.error(f"its handler gave {len(outputs)} output shapes for {len(layer.tops)} tops")
        for top, shape in zip(layer.top_names, outputs):
            known = [int(d) for d in shape[1:] if d is not None]
            if any(d < 0 for d in known) or count(known) > MAX_BLOB_ELEMENTS:
                raise layer.error(f"top '{top}' would have shape {tuple(shape)} ({count(known):,} values per sample, "
                                  f"limit {MAX_BLOB_ELEMENTS:,}); refusing so absurd a blob (check its pad, stride "
                                  "and kernel parameters)")
        layer.output_shapes = outputs
        for top, shape in zip(layer.tops, outputs):
            plan.blob_shapes[top] = shape


def _check_weights(planned: list[PlannedLayer], caffemodel: Caffemodel | None, plan: Plan) -> None:
    used_names = set()
    for layer in planned:
        handler = registry.lookup(layer.type)
        if caffemodel is None or layer.name not in caffemodel:
            if layer.weight_shapes and caffemodel is not None:
                plan.missing_weights.append(layer.name)
            continue
        used_names.add(layer.name)
        stored = caffemodel.blob_shapes(layer.name)
        expected = layer.weight_shapes
        note = f" {handler.blob_note}" if handler.blob_note else ""
        if len(stored) != len(expected):
            if not stored and not expected:
                continue
            if not stored:  # Caffe keeps the prototxt's fillers for a layer saved without blobs
                plan.missing_weights.append(layer.name)
                continue
            raise layer.error(
                f"the caffemodel has {len(stored)} blobs for it, the prototxt implies {len(expected)} "
                f"(shapes {[tuple(s) for s in expected]}).{note}"
            )
        for index, (have, want) in enumerate(zip(stored, expected)):
            if not _shapes_compatible(have, want):
                raise layer.error(
                    f"blob {index} in the caffemodel has shape {tuple(have)}, but the prototxt implies {tuple(want)} "
                    f"(from the bottom shape {tuple(layer.input_shapes[0][1:]) if layer.input_shapes else ()} "
                    f"and the layer's parameters); the prototxt does not describe this caffemodel.{note}"
                )
        layer.weights_found = bool(expected)
    if caffemodel is not None:
        if caffemodel.duplicate_names:
            plan.warnings.append(f"the caffemodel has several layers named {caffemodel.duplicate_names}; the last "
                                 "of each supplies the weights, as in Caffe's CopyTrainedLayersFrom")
        members = {layer.name for layer in planned}
        for name in caffemodel.names():
            if name not in members and name not in used_names and caffemodel.blob_shapes(name):
                if name not in plan.unused_weights:
                    plan.unused_weights.append(name)
