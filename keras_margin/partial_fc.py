"""Partial FC's first version: an optimizer wrapper that steps only the kernel columns a step sampled.

InsightFace shipped two Partial FC versions, which differ in what the optimizer does to the classes a step
did not sample (their gradient is zero either way):

- ``PartialFC_V2`` (``partial_fc_v2.py``): the whole weight is the parameter; SGD's momentum and weight
  decay move every class, sampled or not. A head's default, ``sample_update="all"``, with any optimizer.
- ``PartialFC`` (v1, ``partial_fc.py``): the sampled rows and their momentum are copied out, stepped, and
  written back; the other classes keep their weight and momentum. A head with ``sample_update="sampled"``
  and its optimizer wrapped in :class:`PartialFCOptimizer`.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_margin import sampling

__all__ = ["PartialFCOptimizer"]


@keras.saving.register_keras_serializable(package="keras_margin")
class PartialFCOptimizer(keras.optimizers.Optimizer):
    """Wraps an optimizer so that the columns a Partial FC step did not sample, and their state, stay as they are.

    For every head built with ``sample_rate < 1`` and ``sample_update="sampled"``, the wrapped optimizer
    steps the kernel as usual and the columns outside the step's sample then get back their weight and
    every optimizer slot made from the kernel (momentum, Adam's moments, an EMA): no momentum, no weight
    decay (decoupled or from a regularizer), no constraint for a class until it is sampled again, when its
    momentum resumes where it stopped. That is InsightFace's first ``PartialFC``; its ``PartialFC_V2``
    semantics are the head's default (``sample_update="all"``) with any optimizer unwrapped. Every other
    variable is stepped by the inner optimizer unchanged.

    Formula (one step, kernel W (d, C), the step's sample S, inner optimizer state Q made from W):
    ```
    W', Q' = inner.step(W, Q, dL/dW)
    W[:, j], Q[:, j] = W'[:, j], Q'[:, j]      for j in S
    W[:, j], Q[:, j] unchanged                 for j not in S
    ```
    The sample comes from the gradient of the head's ``sampled_columns`` weight (1 on the sampled
    classes), so it reaches the optimizer on TensorFlow and JAX, under XLA, and through the
    ``LossScaleOptimizer`` that mixed precision adds; ``sampled_columns`` then holds the last step's sample
    (1.0 for a sampled class, 0.0 otherwise).
    InsightFace's v1 used SGD with coupled (L2) weight decay: ``keras_margin.recipes.RecipeSGD(
    momentum_form="pytorch")``, or ``keras.optimizers.SGD(momentum=...)`` with
    ``kernel_regularizer=keras.regularizers.L2(wd / 2)`` on the head, reproduces its update exactly.

    Args:
        inner_optimizer: the ``keras.optimizers.Optimizer`` to wrap, not yet built. Its own arguments
            (learning rate, weight decay, clipping) apply as usual; ``gradient_accumulation_steps`` is
            refused (a step's sample would not be the accumulated gradient's).
        name: name of the wrapper. Defaults to ``"partial_fc_optimizer"``.

    Raises:
        ValueError: when built on variables without a ``sample_update="sampled"`` head's kernel, or on
            a TensorFlow distribution strategy with more than one replica (not supported).

    Example:
    >>> import numpy as np, keras
    >>> from keras_margin import AMSoftmaxHead, PartialFCOptimizer
    >>> head = AMSoftmaxHead(100, fused_loss=True, sample_rate=0.1, sample_update="sampled")
    >>> embeddings, labels = keras.Input((8,)), keras.Input((), dtype="int32")
    >>> model = keras.Model([embeddings, labels], head([embeddings, labels]))
    >>> model.compile(PartialFCOptimizer(keras.optimizers.SGD(0.1, momentum=0.9)), loss=None)
    >>> before = keras.ops.convert_to_numpy(head.kernel)
    >>> _ = model.train_on_batch([np.random.rand(4, 8).astype("float32"), np.array([0, 1, 2, 3])])
    >>> moved = np.any(keras.ops.convert_to_numpy(head.kernel) != before, axis=0)
    >>> sampled = keras.ops.convert_to_numpy(head.sampled_columns) == 1.0    # this step's 10 classes
    >>> int(sampled.sum()), int(moved[~sampled].sum()), bool(moved[:4].all())  # unsampled: none moved
    (10, 0, True)
    """

    def __init__(self, inner_optimizer: keras.optimizers.Optimizer, name: str | None = None, **kwargs: Any) -> None:
        owner = type(self).__name__
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"{owner}: `inner_optimizer` must be a keras.optimizers.Optimizer instance; "
                            f"got {type(inner_optimizer).__name__}.")
        if kwargs:
            raise ValueError(f"{owner}: set optimizer arguments on the inner optimizer; got {sorted(kwargs)}.")
        if inner_optimizer.built:
            raise ValueError(f"{owner}: wrap an optimizer that is not built yet (its slots are matched to the "
                             "kernels as it builds them).")
        if inner_optimizer.gradient_accumulation_steps:
            raise ValueError(f"{owner}: the inner optimizer's `gradient_accumulation_steps` is not supported: "
                             "an accumulated gradient spans several samples, the step's sample only one.")
        super().__init__(learning_rate=0.0, name=name or "partial_fc_optimizer")
        self.inner_optimizer = inner_optimizer

    def build(self, var_list) -> None:
        if self.built:
            return
        owner = type(self).__name__
        _check_no_tf_replicas(owner)
        var_list = list(var_list)
        keys = [id(v) for v in var_list]
        markers = {}  # position of a marker in var_list -> position of its kernel in var_list
        for i, variable in enumerate(var_list):
            kernel = sampling.sampled_kernel(variable)
            if kernel is None:
                continue
            if id(kernel) not in keys:
                raise ValueError(f"{owner}: the kernel {kernel.path} of a sample_update='sampled' head is not among "
                                 "the trainable variables (frozen?); nothing to step.")
            markers[i] = keys.index(id(kernel))
        if not markers:
            raise ValueError(f"{owner}: no head with sample_rate < 1 and sample_update='sampled' among the "
                             f"{len(var_list)} trainable variables; build the head that way, or use the inner "
                             "optimizer alone (PartialFC_V2's update).")
        model_variables = [v for i, v in enumerate(var_list) if i not in markers]
        slots = _build_recording_slots(self.inner_optimizer, model_variables)
        inner_variables = self.inner_optimizer.variables
        # Kept as integer positions: the optimizer tracks any Variable assigned to it as its own.
        self._pfc_groups = []  # (marker position in var_list, kernel position in var_list, slot positions)
        owned = {id(s) for group in slots.values() for s in group}
        for marker_index, kernel_index in sorted(markers.items()):
            kernel = var_list[kernel_index]
            own = slots.get(id(kernel), [])
            for v in inner_variables:
                if tuple(v.shape) == tuple(kernel.shape) and id(v) not in owned:
                    raise ValueError(
                        f"{owner}: {type(self.inner_optimizer).__name__} made the variable {v.path} of the kernel's "
                        "shape without add_variable_from_reference, so it cannot be told apart from the kernel's "
                        "own state; wrap an optimizer whose slots come from add_variable_from_reference.")
            positions = [next(k for k, v in enumerate(inner_variables) if v is s) for s in own]
            self._pfc_groups.append((marker_index, kernel_index, positions))
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads, trainable_variables=None) -> None:
        if trainable_variables is None:
            if not self.built:
                raise ValueError(f"{type(self).__name__}: build the optimizer before applying gradients without "
                                 "variables.")
            trainable_variables = self._trainable_variables
        else:
            trainable_variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
                self.built = True
        grads = list(grads)
        position = [self._get_variable_index(v) for v in trainable_variables]
        at = dict(zip(position, range(len(position))))
        restores = []
        for marker_index, kernel_index, slot_positions in self._pfc_groups:
            marker_gradient = grads[at[marker_index]] if marker_index in at else None
            if marker_gradient is None:
                raise ValueError(
                    f"{type(self).__name__}: no gradient reached {self._trainable_variables[marker_index].path}, so "
                    "the step's sample is unknown; train the head through its fused loss, "
                    "head([embeddings, labels], training=True) with sample_rate < 1.")
            sampled = ops.convert_to_tensor(marker_gradient) > 0
            targets = [self._trainable_variables[kernel_index]]
            targets += [self.inner_optimizer.variables[k] for k in slot_positions]
            marker = self._trainable_variables[marker_index]
            # A copy read now: a TensorFlow variable's value (and its convert_to_tensor) is the variable itself.
            restores.append((sampled, marker, [(t, ops.copy(t)) for t in targets]))
        markers = {group[0] for group in self._pfc_groups}
        keep = [i for i, p in enumerate(position) if p not in markers]
        self.inner_optimizer.apply([grads[i] for i in keep], [trainable_variables[i] for i in keep])
        for sampled, marker, saved in restores:
            for variable, before in saved:
                variable.assign(ops.where(sampled, variable.value, before))
            marker.assign(ops.cast(sampled, marker.dtype))  # the head's record of the step's sample

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list) -> None:
        self.inner_optimizer.finalize_variable_values(
            [v for v in var_list if sampling.sampled_kernel(v) is None])

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name,
                "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)


def _build_recording_slots(optimizer, variables) -> dict[int, list]:
    """Build ``optimizer`` on ``variables``; return {id(model variable): the slots made from it}."""
    slots: dict[int, list] = {}
    original = optimizer.add_variable_from_reference

    def recording(reference_variable, *args, **kwargs):
        slot = original(reference_variable, *args, **kwargs)
        slots.setdefault(id(reference_variable), []).append(slot)
        return slot

    optimizer.add_variable_from_reference = recording
    try:
        optimizer.build(variables)
    finally:
        del optimizer.add_variable_from_reference
    return slots


def _check_no_tf_replicas(owner: str) -> None:
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    if tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1:
        raise ValueError(f"{owner}: TensorFlow distribution strategies with several replicas are not supported "
                         "(the columns are restored per replica); train on one replica or on the JAX backend.")
