"""The part of a model that is exported or evaluated: everything before the first margin head (the embedding,
with any L2 normalization the model has), or the model with the head's cosine output; never a label input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from keras_margin import _keras_private

if TYPE_CHECKING:  # pragma: no cover
    import keras

__all__ = ["find_head", "embedding_model"]


def _head_nodes(model):
    from keras_margin.layers import CosineDense

    by_depth = _keras_private.nodes_by_depth(model)
    if by_depth is None:
        return None
    nodes = []
    for depth, depth_nodes in by_depth.items():
        nodes.extend((depth, node) for node in depth_nodes if isinstance(node.operation, CosineDense))
    return nodes


def _nested_head(model):
    from keras_margin.layers import CosineDense

    for layer in _keras_private.flatten_layers(model, include_self=False, recursive=True):
        if isinstance(layer, CosineDense):
            return layer
    return None


def find_head(model: "keras.Model"):
    """The first layer of ``model`` derived from ``CosineDense`` (a margin head), or None.

    "First" is nearest the inputs. Only heads called in the model's own (top-level) graph count.

    Example:
    >>> import keras
    >>> from keras_margin import AMSoftmaxHead
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), AMSoftmaxHead(3, name="head")])
    >>> find_head(model).name
    'head'
    """
    nodes = _head_nodes(model)
    if not nodes:
        return None
    return max(nodes, key=lambda item: item[0])[1].operation


def _ancestor_inputs(tensor, model_inputs):
    """The model inputs ``tensor`` depends on, in model order."""
    wanted = {id(t): t for t in model_inputs}
    found, seen, stack = set(), set(), [tensor]
    while stack:
        current = stack.pop()
        if id(current) in wanted:
            found.add(id(current))
            continue
        operation, node_index, _ = _keras_private.keras_history(current)
        node = _keras_private.inbound_nodes(operation)[node_index]
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(node.input_tensors)
    return [t for t in model_inputs if id(t) in found]


def embedding_model(model: "keras.Model", include_head: bool = False) -> "keras.Model":
    """The model to export or evaluate: the embedding part, or the embedding part plus the head's cosines.

    - No margin head (``CosineDense`` or a subclass) in the model: the model itself.
    - ``include_head=False`` (default): inputs -> the tensor the first head receives, so an L2-normalization
      layer before the head (``keras.layers.UnitNormalization``, a converter's Normalize) is kept and an
      unnormalized feature stays as the model produces it.
    - ``include_head=True``: the same, followed by the head called on the embedding alone, which outputs
      cos(theta) (batch, num_classes); a model whose only output already is that is returned as it is.

    Label inputs of label-aware heads (``head([x, labels])``) are never part of the result. Layers and weights
    are shared with ``model``, not copied.

    Args:
        model: a Functional or Sequential Keras model (subclassed models only without a head).
        include_head: keep the head's cosine output (default False).

    Raises:
        ValueError: the head sits inside a nested model or a subclassed model, where the embedding cannot
            be cut out.

    Example:
    >>> import keras
    >>> from keras_margin import ArcFaceHead
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.UnitNormalization(),
    ...                           ArcFaceHead(3)])
    >>> embedding_model(model).output_shape, embedding_model(model, include_head=True).output_shape
    ((None, 4), (None, 3))
    """
    import keras

    nodes = _head_nodes(model)
    if nodes is None or not nodes:
        nested = _nested_head(model)
        if nested is not None:
            where = "a subclassed model" if nodes is None else "a nested model"
            raise ValueError(
                f"embedding_model: the margin head '{nested.name}' ({type(nested).__name__}) sits inside {where}, "
                "where the embedding cannot be cut out; build a Functional model whose top level calls the head, "
                "or export keras.Model(inputs, embedding) yourself"
            )
        return model
    _, node = max(nodes, key=lambda item: item[0])
    head = node.operation
    embedding = node.input_tensors[0]
    inputs = _ancestor_inputs(embedding, list(model.inputs))
    if not include_head:
        return keras.Model(inputs if len(inputs) > 1 else inputs[0], embedding, name=f"{model.name}_embedding")
    outputs = list(model.outputs)
    if len(inputs) == len(model.inputs) and len(outputs) == 1 and outputs[0] is node.output_tensors[0]:
        return model
    cos_theta = head(embedding)
    return keras.Model(inputs if len(inputs) > 1 else inputs[0], cos_theta, name=f"{model.name}_cosine")
