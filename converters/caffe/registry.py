"""Build stage, part 1: the handler registry, keyed by Caffe layer type, and what a handler is given.

A ``Handler`` knows one Caffe type: the blob shapes it expects, the shapes it produces (Caffe order), and how
to build Keras layers with transformed weights. ``@register("Type")`` adds one; the planner and builder
never name a layer type themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from converters.caffe.errors import ConversionError

__all__ = ["PlannedLayer", "Built", "Handler", "register", "lookup", "registered_types", "unregister"]

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

    @property
    def in_place(self) -> bool:
        return any(top.split("#")[0] in {bottom.split("#")[0] for bottom in self.bottoms} for top in self.tops)

    def error(self, message: str) -> ConversionError:
        """A ``ConversionError`` naming this layer."""
        return ConversionError(message, layer=self.name, layer_type=self.param.type or self.type)


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


_REGISTRY: dict[str, Handler] = {}


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
