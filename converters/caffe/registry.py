"""Build stage, part 1: the handler registry, keyed by Caffe layer type, and what a handler is given.

A ``Handler`` knows one Caffe type: the blob shapes it expects, the shapes it produces (Caffe order), and how
to build Keras layers with transformed weights. ``@register("Type")`` adds one; the planner and builder
never name a layer type themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the planner imports this module
    from converters.caffe.planner import PlannedLayer

__all__ = ["TRAINING_ONLY_TYPES", "training_only", "Built", "Handler", "register", "lookup", "registered_types",
           "unregister"]

Shape = tuple  # Caffe order, batch first (None)


@dataclass
class Built:
    """What a handler's ``build`` returns.

    Attributes:
        outputs: one Keras tensor per top (None for a top nothing uses).
        weights: (Keras layer, arrays) pairs, in the layer's ``get_weights()`` order and shapes; the builder
            checks and assigns them.
        model_inputs: ``keras.Input`` tensors this layer created (data and Input layers).
        notes: lines for the conversion summary (e.g. preprocessing the model includes).
    """

    outputs: list
    weights: list = field(default_factory=list)
    model_inputs: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Handler:
    """Converts one Caffe layer type. Subclass it and decorate with ``@register("MyType")``.

    Override ``output_shapes`` when the layer changes shapes, ``weight_shapes`` when it has blobs, and
    ``build``. ``weights`` passed to ``build`` are the caffemodel blobs reshaped to ``weight_shapes`` (Caffe
    layout), or None when the caffemodel does not have them (initialise from the prototxt's fillers then).

    Example:
    >>> import keras
    >>> @register("Swish", replace=True)
    ... class SwishHandler(Handler):
    ...     def build(self, ctx, layer, inputs, weights):
    ...         beta = layer.param.swish_param.beta
    ...         return Built([keras.layers.Activation(lambda x: x * keras.ops.sigmoid(beta * x),
    ...                                               name=ctx.name(layer))(inputs[0])])
    >>> lookup("Swish").__class__.__name__
    'SwishHandler'
    >>> unregister("Swish")
    """

    #: True for layers that create model inputs (Input, Data, ImageData...).
    is_input: bool = False
    #: Extra hint appended to blob-count/shape errors for this type.
    blob_note: str = ""
    #: True when the blobs are statistics, not learned by gradient (BatchNorm): lr_mult does not freeze them.
    statistics_blobs: bool = False

    def used_bottoms(self, layer: PlannedLayer) -> int | None:
        """How many leading bottoms inference needs (e.g. 1 for layers whose second bottom is the label)."""
        return None

    def output_shapes(self, layer: PlannedLayer) -> list[Shape]:
        """Caffe-ordered top shapes; the default keeps the first bottom's shape for every top."""
        return [layer.input_shapes[0]] * len(layer.tops)

    def weight_shapes(self, layer: PlannedLayer) -> list[Shape]:
        """Caffe-ordered shapes of the blobs this layer expects in the caffemodel (none by default)."""
        return []

    def build(self, ctx, layer: PlannedLayer, inputs: list, weights: list | None) -> Built:
        raise NotImplementedError(f"{type(self).__name__}.build")

    def check_fields(self, layer, unknown_fields: list) -> None:
        """Refuse a layer whose unknown prototxt fields (``reader.UnknownField``s of this layer) show that it is
        another fork's layer of the same type name; the default accepts it."""

    def opencv_layer(self, layer, copy) -> type | None:
        """Prepare ``copy`` (Caffe ``layer`` as OpenCV's importer will read it) for the parity run.

        Return a ``stand_ins.StandIn`` class after ``stand_ins.python_layer(copy, ...)`` when OpenCV lacks the
        type, ``stand_ins.NotRun`` when OpenCV cannot run it at all, else None; the default leaves the copy as it
        is (OpenCV runs the type natively).
        """
        return None


_REGISTRY: dict[str, Handler] = {}

#: Layer types that only matter for training (besides every type ending in "Loss"): the planner drops them.
TRAINING_ONLY_TYPES = frozenset({"Accuracy", "Silence", "HDF5Output"})


def training_only(caffe_type: str) -> bool:
    """Whether a layer type only matters for training (losses, Accuracy, Silence, HDF5Output): not converted."""
    return caffe_type.endswith("Loss") or caffe_type in TRAINING_ONLY_TYPES


def register(*caffe_types: str, replace: bool = False) -> Callable[[type], type]:
    """Class decorator: instantiate the ``Handler`` subclass and register it for ``caffe_types``.

    Registering a type that already has a handler raises ``ValueError`` unless ``replace=True`` (to override a
    built-in, e.g. a fork's different ``Normalize``).
    """
    if not caffe_types:
        raise ValueError("register() needs at least one Caffe layer type")

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Handler)):
            raise TypeError(f"@register({caffe_types[0]!r}) decorates a Handler subclass; got {cls!r}")
        handler = cls()
        for caffe_type in caffe_types:
            if caffe_type in _REGISTRY and not replace:
                raise ValueError(
                    f"Caffe type {caffe_type!r} already has a handler ({type(_REGISTRY[caffe_type]).__name__}); "
                    "pass replace=True to override it"
                )
            _REGISTRY[caffe_type] = handler
        return cls

    return decorate


def unregister(caffe_type: str) -> None:
    """Remove the handler of ``caffe_type`` (no error when there is none)."""
    _REGISTRY.pop(caffe_type, None)


def lookup(caffe_type: str) -> Handler | None:
    """The handler registered for ``caffe_type``, or None."""
    _ensure_builtin_handlers()
    return _REGISTRY.get(caffe_type)


def registered_types() -> list[str]:
    _ensure_builtin_handlers()
    return sorted(_REGISTRY)


def _ensure_builtin_handlers() -> None:
    # The built-in handlers import Keras; load them on first use, not when the registry is imported.
    from converters.caffe import handlers  # noqa: F401
