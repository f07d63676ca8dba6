"""Build stage, part 3: the loop over the plan that asks each layer's handler for Keras layers and weights.

It owns the Keras naming of layers, the check and assignment of converted weights, and the public entry
points ``convert`` (everything the conversion learned) and ``load_caffe_model`` (just the Keras model).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import keras
import numpy as np

from converters.caffe import registry
from converters.caffe.errors import CaffeWarning, ConversionError
from converters.caffe.planner import Plan, PlannedLayer, plan_net
from converters.caffe.reader import Caffemodel, CaffeNet, read_caffemodel, read_prototxt
from converters.caffe.shapes import keras_shape

__all__ = ["BuildContext", "Conversion", "build_model", "convert", "load_caffe_model", "graph_depth",
           "recursion_limit_for", "MAX_GRAPH_DEPTH", "KERAS_DEFAULT_DEPTH"]

ProgressFn = Callable[[int, int, str], None]


class BuildContext:
    """What handlers get besides their layer: unique Keras names and which blobs the model needs."""

    def __init__(self, plan: Plan, input_contract: dict | None = None):
        self.plan = plan
        #: the caller's ``input_contract=`` (keyword arguments of ``InputContract``), or None
        self.input_contract = input_contract
        self.contracts: list = []  # the InputContract layers handlers added after the model's image inputs
        self._taken: set[str] = set()
        self.created: dict[str, list[str]] = {}  # Caffe layer name -> Keras layer names given to it

    def _unique(self, base: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.\-]", "_", base) or "layer"
        name, index = base, 1
        while name in self._taken:
            name, index = f"{base}_{index}", index + 1
        self._taken.add(name)
        return name

    def name(self, layer: PlannedLayer, suffix: str = "") -> str:
        """A unique Keras layer name: the Caffe layer name (sanitised), plus ``_suffix`` for helper layers."""
        name = self._unique(f"{layer.name}_{suffix}" if suffix else layer.name)
        self.created.setdefault(layer.name, []).append(name)
        return name

    def name_for_blob(self, blob_name: str) -> str:
        """A unique Keras name for a model input named after a Caffe blob."""
        return self._unique(blob_name)

    def needed(self, blob_id: str) -> bool:
        """Whether some layer or the model's outputs use blob ``blob_id``."""
        return blob_id in self.plan.needed


@dataclass
class Conversion:
    """The result of ``convert``: the Keras model and what the conversion learned on the way."""

    model: keras.Model
    plan: Plan
    tensors: dict  # blob id -> Keras tensor of the model's graph (for layer-by-layer parity probes)
    heads: list = field(default_factory=list)  # fusion.HeadSpec of each fused head, in order
    notes: list[str] = field(default_factory=list)
    #: Caffe layer name of each head -> its Keras layer in ``model``
    head_layers: dict = field(default_factory=dict)

    def training_loss(self):
        """The loss to compile ``model`` with so it trains as the Caffe net does: the head's own objective
        (``HeadSpec.loss``) for a single-output model, else {output name: loss} for the outputs that are heads.
        None when no head needs a compiled loss (e.g. a head that adds its own with ``add_loss``)."""
        losses = {}
        for spec in self.heads:
            head = self.head_layers[spec.layer]
            loss = spec.training_loss(head)
            if loss is not None:
                losses[head.name] = loss
        if not losses:
            return None
        outputs = [tensor._keras_history[0].name for tensor in self.model.outputs]
        if len(outputs) == 1 and list(losses) == outputs:
            return losses[outputs[0]]
        return {name: loss for name, loss in losses.items() if name in outputs}

    @property
    def warnings(self) -> list[str]:
        """Caveats worth a user's attention (unknown fields, missing weights, layers converted literally)."""
        plan, found = self.plan, []
        if plan.unknown_fields:
            shown = "; ".join(str(f) for f in plan.unknown_fields[:6])
            more = f" (+{len(plan.unknown_fields) - 6} more)" if len(plan.unknown_fields) > 6 else ""
            found.append(f"{len(plan.unknown_fields)} prototxt field(s) unknown to the schema were skipped: "
                         f"{shown}{more}")
        if plan.missing_weights:
            found.append(f"the caffemodel has no weights for {plan.missing_weights}; they are initialised from "
                         "the prototxt fillers, as Caffe would")
        found.extend(plan.warnings)
        return found


def _assign(layer: PlannedLayer, keras_layer, arrays) -> None:
    expected = [tuple(weight.shape) for weight in keras_layer.weights]
    given = [tuple(np.shape(array)) for array in arrays]
    if expected != given:
        raise layer.error(
            f"converted weights have shapes {given} but Keras layer '{keras_layer.name}' holds {expected}; "
            "the handler's weight transform is wrong"
        )
    keras_layer.set_weights([np.asarray(array) for array in arrays])


def _frozen(layer: PlannedLayer) -> bool:
    """Caffe never updates a layer whose every blob has lr_mult 0 (BatchNorm's statistics are not gradients:
    its handler follows use_global_stats instead)."""
    specs = layer.param.param
    return (not _statistics(layer) and bool(layer.weight_shapes) and len(specs) >= len(layer.weight_shapes)
            and all(spec.lr_mult == 0 for spec in specs[: len(layer.weight_shapes)]))


def _statistics(layer: PlannedLayer) -> bool:
    handler = registry.lookup(layer.type)
    return bool(getattr(handler, "statistics_blobs", False))


def _frozen_blobs(layer: PlannedLayer) -> list[int]:
    """Indices of the blobs whose ParamSpec says ``lr_mult: 0`` (Caffe never updates them)."""
    if _statistics(layer) or layer.head is not None:
        return []
    specs = layer.param.param
    return [index for index in range(min(len(specs), len(layer.weight_shapes))) if specs[index].lr_mult == 0]


def _freeze_blobs(layer: PlannedLayer, keras_layers: list, notes: list) -> list[str]:
    """Freeze the Keras variables of a layer's ``lr_mult: 0`` blobs when others train (e.g. a frozen bias).

    Blob i is the i-th variable of the one Keras layer holding as many variables as the Caffe layer has blobs
    (Convolution, InnerProduct, Scale, PReLU: kernel then bias). Returns the frozen variables' paths.
    """
    frozen = _frozen_blobs(layer)
    if not frozen:
        return []
    holders = [keras_layer for keras_layer in keras_layers if keras_layer.weights]
    if len(holders) != 1 or len(holders[0].weights) != len(layer.weight_shapes):
        notes.append(f"layer '{layer.name}': blob(s) {frozen} have lr_mult 0 but map to no single Keras variable; "
                     "they stay trainable")
        return []
    names = []
    for index in frozen:
        variable = holders[0].weights[index]
        variable.trainable = False
        names.append(variable.path)
    return names


def freeze_caffe_blobs(model, prototxt, phase: str = "TEST", **plan_options) -> list[str]:
    """Freeze, in a loaded converted ``model``, the variables of every ``lr_mult: 0`` blob of ``prototxt``
    (a ``.keras`` file does not save ``Variable.trainable``). Returns the frozen variable paths."""
    net = prototxt if isinstance(prototxt, CaffeNet) else read_prototxt(prototxt)
    plan = plan_net(net, None, phase, **plan_options)
    layers_by_name = {keras_layer.name: keras_layer for keras_layer in model.layers}
    frozen = []
    for layer in plan.layers:
        keras_layer = layers_by_name.get(re.sub(r"[^A-Za-z0-9_.\-]", "_", layer.name))
        if keras_layer is None or _frozen(layer) or len(keras_layer.weights) != len(layer.weight_shapes):
            continue
        for index in _frozen_blobs(layer):
            keras_layer.weights[index].trainable = False
            frozen.append(keras_layer.weights[index].path)
    return frozen


def _load_weights(layer: PlannedLayer, caffemodel: Caffemodel) -> list[np.ndarray]:
    arrays = []
    for name in layer.weight_layers:
        arrays.extend(caffemodel.blobs(name))
    arrays = arrays[: len(layer.weight_shapes)]
    return [array.reshape(shape) for array, shape in zip(arrays, layer.weight_shapes)]


def _contract_arguments(input_contract) -> dict | None:
    """``input_contract=`` (an ``InputContract`` layer or a mapping of its arguments) as a dict of arguments."""
    if input_contract is None:
        return None
    from keras_margin.input_contract import InputContract

    keys = ("pixels", "channel_order", "mean", "scale", "flip_in_model", "source")
    if isinstance(input_contract, InputContract):
        config = input_contract.get_config()
        given = {key: config[key] for key in keys if key != "flip_in_model"}
        if not given["source"]:
            given.pop("source")
        return given
    if not isinstance(input_contract, Mapping):
        raise ConversionError(f"input_contract= must be a dict of InputContract arguments (e.g. "
                              f"{{'pixels': 'normalized', 'mean': 128, 'scale': 0.0078125}}) or an InputContract; "
                              f"got {type(input_contract).__name__}")
    unknown = sorted(set(input_contract) - set(keys))
    if unknown:
        raise ConversionError(f"input_contract= has unknown keys {unknown}; allowed: {list(keys)}")
    given = dict(input_contract)
    try:  # the values are checked here, before any layer is built
        InputContract(**{"pixels": "normalized", **given})
    except (TypeError, ValueError) as error:
        raise ConversionError(f"input_contract= is invalid: {error}") from None
    return given


#: Deepest Keras graph (layers on the longest input -> output path) ``build_model`` builds.
MAX_GRAPH_DEPTH = 10_000
#: Depth up to which Keras builds and loads a functional model under Python's default recursion limit (1000):
#: ``keras.Model`` and ``keras.saving.load_model`` recurse once per layer of depth (measured: 900 ok, 990 not).
KERAS_DEFAULT_DEPTH = 900


def recursion_limit_for(depth: int) -> int:
    """A recursion limit under which Keras builds / loads a functional graph ``depth`` layers deep."""
    return max(1000, 2 * depth + 1000)


@contextlib.contextmanager
def _recursion_room(depth: int):
    """Raise Python's recursion limit while Keras builds a ``depth``-deep functional graph (its graph walk recurses
    once per layer; Python >= 3.11 keeps such pure-Python recursion off the C stack); restore it after."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, recursion_limit_for(depth)))
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


def graph_depth(outputs) -> int:
    """Layers on the longest path from an input to one of ``outputs`` (Keras tensors), found without recursion."""
    depth: dict[int, int] = {}
    for output in outputs:
        stack = [(output, False)]
        while stack:
            tensor, expanded = stack.pop()
            key = id(tensor)
            if key in depth:
                continue
            history = getattr(tensor, "_keras_history", None)
            node = None
            if history is not None:
                operation, node_index, _ = history
                node = operation._inbound_nodes[node_index]
            parents = list(node.input_tensors) if node is not None else []
            if not parents:
                depth[key] = 0
            elif expanded:
                depth[key] = 1 + max(depth[id(parent)] for parent in parents)
            else:
                stack.append((tensor, True))
                stack.extend((parent, False) for parent in parents if id(parent) not in depth)
    return max((depth[id(output)] for output in outputs), default=0)


def build_model(plan: Plan, caffemodel: Caffemodel | None = None, progress: ProgressFn | None = None,
                input_contract: Mapping | None = None) -> Conversion:
    """Build the Keras model of ``plan`` (weights from ``caffemodel`` where the plan found them).

    ``input_contract`` (a mapping of ``InputContract`` arguments, or one) is what the caller knows about the
    image input when the prototxt does not say (see ``load_caffe_model``).
    """
    given = _contract_arguments(input_contract)
    ctx = BuildContext(plan, given)
    tensors: dict = {}
    model_inputs, notes, heads = [], [], []
    head_names: dict[str, str] = {}
    total = len(plan.layers)
    for done, layer in enumerate(plan.layers, start=1):
        handler = registry.lookup(layer.type)
        inputs = [tensors[bottom] for bottom in layer.bottoms]
        weights = _load_weights(layer, caffemodel) if (layer.weights_found and caffemodel is not None) else None
        try:
            built = handler.build(ctx, layer, inputs, weights)
        except ConversionError:
            raise
        except (ValueError, TypeError, NotImplementedError) as error:
            raise layer.error(f"Keras could not build it: {error}") from None
        del weights  # the Caffe-layout blobs: free them before Keras copies the converted ones
        if len(built.outputs) != len(layer.tops):
            raise layer.error(f"its handler returned {len(built.outputs)} outputs for {len(layer.tops)} tops")
        for top, tensor, shape in zip(layer.tops, built.outputs, layer.output_shapes):
            if tensor is None:
                continue
            planned = keras_shape(shape)[1:]
            if tuple(tensor.shape[1:]) != tuple(planned):
                raise layer.error(f"Keras produced shape {tuple(tensor.shape)} for top '{top}', the plan says "
                                  f"{(None, *planned)} (Keras order)")
            tensors[top] = tensor
        for keras_layer, arrays in built.weights:
            _assign(layer, keras_layer, arrays)
        model_inputs.extend(built.model_inputs)
        notes.extend(built.notes)
        if layer.head is not None:
            heads.append(layer.head)
            head_names[layer.head.layer] = ctx.created[layer.name][0]
        if progress is not None:
            progress(done, total, layer.name)
    if given is not None and not ctx.contracts:
        raise ConversionError("input_contract= was given but the net has no image (N, C, H, W) input to record it for")
    missing = [top for top in plan.outputs if top not in tensors]
    if missing:
        raise ConversionError(f"outputs {missing} were not built")
    outputs = [tensors[top] for top in plan.outputs]
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", plan.name or "caffe_model")
    depth = graph_depth(outputs)
    if depth > MAX_GRAPH_DEPTH:
        raise ConversionError(f"the converted graph is {depth:,} Keras layers deep, more than the {MAX_GRAPH_DEPTH:,} "
                              "this converter builds (Keras walks a functional graph recursively, one Python frame "
                              "per layer of depth); convert the net in parts (a net fragment: "
                              "--input-shape BLOB=C,H,W)")
    with _recursion_room(depth):
        model = keras.Model(model_inputs if len(model_inputs) > 1 else model_inputs[0],
                            outputs if len(outputs) > 1 else outputs[0], name=name)
    if depth > KERAS_DEFAULT_DEPTH:
        plan.warnings.append(
            f"the Keras graph is {depth:,} layers deep: Keras rebuilds a functional model recursively, and Python's "
            f"default recursion limit allows about {KERAS_DEFAULT_DEPTH}; before keras.saving.load_model of the "
            f"saved .keras call sys.setrecursionlimit({recursion_limit_for(depth)})")
    model_layers = {keras_layer.name: keras_layer for keras_layer in model.layers}
    frozen_paths: list[str] = []
    for layer in plan.layers:
        if _frozen(layer):
            for keras_name in ctx.created.get(layer.name, []):
                if keras_name in model_layers:
                    model_layers[keras_name].trainable = False
            notes.append(f"layer '{layer.name}': every param has lr_mult 0 in the prototxt; its Keras layers are "
                         "frozen (trainable=False)")
        else:
            frozen_paths.extend(_freeze_blobs(layer, [model_layers[name] for name in ctx.created.get(layer.name, [])
                                                      if name in model_layers], notes))
    if frozen_paths:
        shown = ", ".join(frozen_paths[:4]) + (f" (+{len(frozen_paths) - 4} more)" if len(frozen_paths) > 4 else "")
        notes.append(f"{len(frozen_paths)} blob(s) with lr_mult 0 are frozen (Variable.trainable=False): {shown}; "
                     "a .keras file does not save this, so after keras.saving.load_model re-apply it with "
                     "converters.caffe.builder.freeze_caffe_blobs(model, prototxt)")
    head_layers = {caffe_name: model_layers[keras_name] for caffe_name, keras_name in head_names.items()
                   if keras_name in model_layers}
    return Conversion(model=model, plan=plan, tensors=tensors, heads=heads, notes=notes, head_layers=head_layers)


def convert(prototxt: str | os.PathLike | CaffeNet, caffemodel: str | os.PathLike | Caffemodel | None = None,
            phase: str = "TEST", *, input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
            progress: ProgressFn | None = None, input_contract: Mapping | None = None,
            stage: Sequence[str] | str | None = None) -> Conversion:
    """Convert a Caffe net and return the model with its plan, heads, notes and warnings.

    Args: as ``load_caffe_model``, plus ``progress(done, total, layer_name)`` called after each layer.
    The image input's ``InputContract`` is in ``conversion.notes`` (``"input 'data': ..."``).

    Example:
    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     proto = os.path.join(tmp, "net.prototxt")
    ...     _ = open(proto, "w").write('input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8 '
    ...         'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
    ...         '        convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 } }')
    ...     conversion = convert(proto)
    >>> conversion.model.output_shape, conversion.plan.parameter_count
    ((None, 4, 4, 4), 112)
    """
    net = prototxt if isinstance(prototxt, CaffeNet) else read_prototxt(prototxt)
    weights = caffemodel if (caffemodel is None or isinstance(caffemodel, Caffemodel)) else read_caffemodel(caffemodel)
    plan = plan_net(net, weights, phase, input_shape, stage=stage)
    return build_model(plan, weights, progress, input_contract=input_contract)


def load_caffe_model(prototxt: str | os.PathLike, caffemodel: str | os.PathLike | None = None,
                     phase: str = "TEST", *,
                     input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
                     input_contract: Mapping | None = None,
                     stage: Sequence[str] | str | None = None) -> keras.Model:
    """Convert a Caffe .prototxt (+ .caffemodel) into a Keras model computing what Caffe computes.

    Args:
        prototxt: the network description (current or V1 format; legacy input declarations allowed).
        caffemodel: the weights (current or V1 format); None initialises them from the prototxt's fillers
            (Keras defaults where none is given).
        phase: "TEST" (default: the deploy net) or "TRAIN" (keeps TRAIN-only layers, e.g. to rebuild a
            training head). A normalised InnerProduct -> LabelSpecificAdd -> Scale chain becomes an
            ``AMSoftmaxHead``, MarginInnerProduct a ``SphereFaceHead``; heads output cos(theta) and are
            compiled with ``loss=head.loss``.
        input_shape: (C, H, W) of the input, or {blob name: (C, H, W)}, when the prototxt's data layer does
            not give the image size (e.g. ImageData without new_height/new_width); a name no layer produces
            (a net fragment's first bottom) becomes a model input. Defaults to None.
        stage: NetState stage name(s) for include/exclude rules that name stages. Defaults to None.
        input_contract: what the caller applies to images before the model, for a net whose prototxt does not
            say (a deploy net with an ``Input`` layer or ``input_dim``): a dict of ``InputContract`` arguments,
            e.g. ``{"mean": 128, "scale": 0.0078125}`` (``pixels`` defaults to "normalized", ``channel_order``
            to "bgr" for a 3-channel input), or an ``InputContract``. Defaults to None: such a net's contract
            says ``pixels="unknown"``. A TRAIN/TEST data layer's transform_param is recorded from the
            prototxt (``pixels="raw"``: the model normalizes itself); an ``input_contract`` contradicting it is
            an error. ``flip_in_model`` is always read from the graph (a Flip concatenated with the input
            along the batch axis).

    Every image input is followed by an ``keras_margin.InputContract`` layer recording this (read it with
    ``keras_margin.find_input_contract(model)``); ``keras-margin verify`` and ``export`` use it.
    Tensors are NHWC: a Caffe blob (N, C, H, W) is (N, H, W, C) in Keras. Raises ``ConversionError``;
    emits ``CaffeWarning`` for unknown prototxt fields, missing weights and layers converted literally.

    Example:
    >>> import tempfile, os, numpy as np
    >>> from converters.caffe.writer import write_caffemodel
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     proto, weights = os.path.join(tmp, "net.prototxt"), os.path.join(tmp, "net.caffemodel")
    ...     _ = open(proto, "w").write('input: "data" input_dim: 1 input_dim: 4 input_dim: 1 input_dim: 1 '
    ...         'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
    ...         '        inner_product_param { num_output: 2 } }')
    ...     _ = write_caffemodel(weights, [("fc", "InnerProduct", [np.eye(2, 4), np.zeros(2)])])
    ...     model = load_caffe_model(proto, weights)
    >>> model(np.arange(4, dtype="float32").reshape(1, 1, 1, 4)).numpy().tolist()
    [[0.0, 1.0]]
    """
    conversion = convert(prototxt, caffemodel, phase, input_shape=input_shape, input_contract=input_contract,
                         stage=stage)
    for message in conversion.warnings:
        warnings.warn(message, CaffeWarning, stacklevel=2)
    return conversion.model
