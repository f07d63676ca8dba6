"""Every private Keras API keras-margin uses, in one place, each behind a function with the semantics its
callers need.

Checked against Keras 3.15 (3.15.1). When a Keras upgrade moves one of these, this module is the one to fix;
``tests/test_heads.py`` exercises each function on the installed Keras.

- ``keras.src.backend.common.symbolic_scope.in_symbolic_scope``: whether Keras is building the compiled loss
  and metrics on placeholder tensors (``in_symbolic_scope``).
- ``Layer._flatten_layers``: a model's layers, nested ones included (``flatten_layers``).
- ``Functional._nodes_by_depth`` and ``Sequential._functional``: a model's graph (``functional_graph``,
  ``nodes_by_depth``).
- ``KerasTensor._keras_history``: the operation that produced a symbolic tensor (``keras_history``).
- ``Operation._inbound_nodes``: the nodes at which an operation was called (``inbound_nodes``).
- ``Optimizer._exclude_from_weight_decay`` (the ids ``exclude_from_weight_decay(var_list=...)`` set),
  ``_var_key`` and ``_exclude_from_weight_decay_cache``: giving a stand-in variable the exclusion of the
  variable it stands for (``share_weight_decay_exclusion``).
"""

from __future__ import annotations

__all__ = [
    "KERAS_VERSION_CHECKED",
    "flatten_layers",
    "functional_graph",
    "in_symbolic_scope",
    "inbound_nodes",
    "keras_history",
    "nodes_by_depth",
    "share_weight_decay_exclusion",
]

#: The Keras release these private APIs were checked against.
KERAS_VERSION_CHECKED = "3.15"

# Nothing here imports Keras at module level: keras_margin.export and .evaluation import this module and must
# stay framework-free until used (``keras-margin --help``).


def in_symbolic_scope() -> bool:
    """Whether Keras is tracing on placeholder tensors (its symbolic build of the compiled loss, e.g. under
    ``tf.distribute``), where the labels are Keras' own float placeholders, not the user's. False when the
    private API is missing (the callers then check everything, as outside the scope)."""
    try:
        from keras.src.backend.common.symbolic_scope import in_symbolic_scope as _in_symbolic_scope
    except ImportError:  # pragma: no cover - a Keras without the private module
        return False
    return bool(_in_symbolic_scope())


def flatten_layers(model, include_self: bool = True, recursive: bool = True) -> list:
    """The layers of ``model`` (``model`` itself first when ``include_self``), nested models' layers too when
    ``recursive``, each once, in tracking order: ``Layer._flatten_layers``."""
    return list(model._flatten_layers(include_self=include_self, recursive=recursive))


def functional_graph(model):
    """The Functional graph of a Functional or Sequential model (a built Sequential keeps it in
    ``_functional``), or None (a subclassed model, or an unbuilt Sequential)."""
    graph = getattr(model, "_functional", None) or model
    return graph if hasattr(graph, "_nodes_by_depth") else None


def nodes_by_depth(model) -> dict | None:
    """``{depth: [Node, ...]}`` of the model's graph (depth 0: the output nodes; larger depths nearer the
    inputs), or None for a model without a Functional graph (see ``functional_graph``). Each node has
    ``node.operation`` (the layer called) and ``node.input_tensors``."""
    graph = functional_graph(model)
    return None if graph is None else graph._nodes_by_depth


def keras_history(tensor):
    """``(operation, node_index, tensor_index)`` of a symbolic ``KerasTensor``: the layer that produced it,
    which of that layer's calls (an index into ``inbound_nodes(operation)``), and which of its outputs. A
    namedtuple: ``.operation`` is the layer (an ``InputLayer`` for a model input)."""
    return tensor._keras_history


def inbound_nodes(operation) -> list:
    """The nodes at which ``operation`` (a layer) was called on symbolic tensors, in call order; ``keras_history``'s
    ``node_index`` indexes this list."""
    return operation._inbound_nodes


def share_weight_decay_exclusion(optimizer, variable, stand_in) -> None:
    """Exclude ``stand_in`` from ``optimizer``'s weight decay when ``variable`` was excluded by identity
    (``exclude_from_weight_decay(var_list=[variable])``); name patterns already treat a stand-in of the same
    name alike. Call before the optimizer is built."""
    excluded = getattr(optimizer, "_exclude_from_weight_decay", None)
    if excluded and optimizer._var_key(variable) in excluded:
        excluded.add(optimizer._var_key(stand_in))
        optimizer._exclude_from_weight_decay_cache = {}
