"""Class-sharded margin heads on ``keras.distribution`` (JAX backend): each head's kernel split along the
class axis of a ``DeviceMesh``. Owns the layout of the head kernels and the sharded copy of a model.

Keras places a variable when it is created, so the layout must exist before the model's weights do:
``head_layout_map`` gives the ``LayoutMap`` for a model's heads (for building the model yourself inside
``ModelParallel(layout_map=...).scope()``), and ``shard_heads`` rebuilds a Functional or Sequential model
under that distribution, with the same layer names and weights.

Example (4 devices, all on the class axis):
```python
mesh = keras.distribution.DeviceMesh((1, 4), ("batch", "model"), keras.distribution.list_devices())
sharded = shard_heads(model, mesh)      # also sets the ModelParallel distribution globally
sharded.compile("sgd", loss=sharded.layers[-1].loss)
sharded.fit(x, y)                       # each device holds (embedding_dim, num_classes / 4) of the kernel
```
Under ``ModelParallel`` XLA partitions the cosine matrix product along the classes and reduces the
log-sum-exp across devices itself; the heads need no code of their own for it.
"""

from __future__ import annotations

import re

import keras

from keras_margin import _keras_private
from keras_margin.layers import MarginHead


def margin_heads(model) -> list[MarginHead]:
    """Every ``MarginHead`` in ``model`` (nested models included), in layer order."""
    return [layer for layer in _keras_private.flatten_layers(model, include_self=True) if isinstance(layer, MarginHead)]


def head_layout_map(model, mesh, *, class_axis: str = "model", layout_map=None):
    """``LayoutMap`` that shards the kernel of every margin head in ``model`` along its class axis.

    Formula:
    ```
    layout_map[head.kernel.path] = (None, class_axis)    kernel (embedding_dim, num_classes)
    layout_map[head.kernel.path] = (class_axis, None)    class-major kernel (kernel_layout="classes_first")
    ```

    Args:
        model: a built model containing at least one margin head.
        mesh: the ``keras.distribution.DeviceMesh``; ``class_axis`` must be one of its axis names.
        class_axis: mesh axis to split the classes over (default "model").
        layout_map: an existing ``LayoutMap`` on the same mesh to add the entries to (default: a new one).

    Raises ValueError when the model has no built margin head, when ``class_axis`` is not a mesh axis,
    or when a head's class count is not a multiple of that axis' size.
    """
    if class_axis not in mesh.axis_names:
        raise ValueError(
            f"head_layout_map: `class_axis` {class_axis!r} is not an axis of the mesh; its axes are "
            f"{list(mesh.axis_names)}."
        )
    shards = mesh.shape[list(mesh.axis_names).index(class_axis)]
    heads = margin_heads(model)
    if not heads or not all(head.built for head in heads):
        raise ValueError(
            f"head_layout_map: model {model.name!r} has no built margin head (found {len(heads)}); build the "
            "model (e.g. with keras.Input) before asking for its layout."
        )
    layout_map = keras.distribution.LayoutMap(mesh) if layout_map is None else layout_map
    for head in heads:
        if head.num_classes % shards:
            raise ValueError(
                f"head_layout_map: {head.name} has {head.num_classes} classes, not a multiple of the "
                f"{shards} devices on mesh axis {class_axis!r}; pad the class count or change the mesh."
            )
        layout_map[re.escape(head.kernel.path)] = (class_axis, None) if head.classes_first else (None, class_axis)
    return layout_map


def shard_heads(model, mesh, *, class_axis: str = "model", batch_axis: str = "batch", layout_map=None):
    """A copy of ``model`` whose margin-head kernels are sharded over ``mesh`` along the class axis.

    Sets ``keras.distribution.ModelParallel(layout_map=head_layout_map(...), batch_dim_name=batch_axis)``
    as the global distribution (``keras.distribution.distribution()`` returns it), clones the model
    inside it (same layer names, hence the same variable paths as the layout keys) and copies the
    weights and the layers' random-generator states (so a Partial FC head samples as the original
    would). The other variables are replicated unless ``layout_map`` says otherwise; the batch is split
    over ``batch_axis``. JAX backend only (``keras.distribution`` is not implemented for TensorFlow;
    there, ``tf.distribute.MirroredStrategy`` gives data parallelism).

    Args:
        model: a built Functional or Sequential model (for a subclassed model, build it yourself inside
            ``ModelParallel(layout_map=head_layout_map(model, mesh)).scope()`` with the same names).
        mesh: ``keras.distribution.DeviceMesh`` with axes ``batch_axis`` and ``class_axis``.
        class_axis, batch_axis: mesh axis names (defaults "model", "batch").
        layout_map: optional ``LayoutMap`` with further entries (e.g. for the backbone).

    Returns:
        The sharded model, uncompiled.
    """
    if keras.config.backend() != "jax":
        raise ValueError(
            f"shard_heads: keras.distribution's ModelParallel needs the JAX backend; the backend is "
            f"{keras.config.backend()!r}. Set KERAS_BACKEND=jax before importing keras."
        )
    if batch_axis not in mesh.axis_names:
        raise ValueError(
            f"shard_heads: `batch_axis` {batch_axis!r} is not an axis of the mesh; its axes are "
            f"{list(mesh.axis_names)}."
        )
    layout_map = head_layout_map(model, mesh, class_axis=class_axis, layout_map=layout_map)
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name=batch_axis)
    keras.distribution.set_distribution(distribution)
    sharded = keras.models.clone_model(model)
    sharded.set_weights(model.get_weights())
    # The random streams too (Partial FC's class sampling): not weights, but the copy continues them.
    for source, copy in zip(_seed_generators(model), _seed_generators(sharded)):
        copy.state.assign(source.state.value)
    return sharded


def _seed_generators(model) -> list:
    """The ``keras.random.SeedGenerator`` of every layer of ``model`` with one, in layer order."""
    from keras_margin._keras_private import flatten_layers

    found = []
    for layer in flatten_layers(model):
        found += [v for v in vars(layer).values() if isinstance(v, keras.random.SeedGenerator)]
    return found
