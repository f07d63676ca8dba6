"""What both exporters do first: pick the part of the model to export, name its inputs and output, build the
input signature with a dynamic batch dimension and the batch the parity check runs on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from keras_margin import _keras_private
from keras_margin.export.embedding import embedding_model, find_head
from keras_margin.export.parity import probe_inputs

if TYPE_CHECKING:  # pragma: no cover
    import keras

_AUTO_NAME = re.compile(r"^(input_layer|input|keras_tensor)(_\d+)?$")


@dataclass
class Prepared:
    model: "keras.Model"  # the part that is exported
    input_names: list[str]
    output_name: str
    specs: list = field(default_factory=list)  # tf.TensorSpec per input, batch dimension None
    inputs: list[np.ndarray] = field(default_factory=list)  # the parity-check batch
    probe: str = ""  # what the parity-check batch is

    def call_signature(self) -> list:
        """``input_signature`` for a model called on one tensor, or on a list of them."""
        return [self.specs[0]] if len(self.specs) == 1 else [list(self.specs)]


def _input_names(model) -> list[str]:
    names, taken = [], set()
    for index, tensor in enumerate(model.inputs):
        layer_name = getattr(_keras_private.keras_history(tensor).operation, "name", "") or ""
        name = re.sub(r"[^A-Za-z0-9_]", "_", layer_name)
        if not name or _AUTO_NAME.match(name) or not name[0].isalpha():
            name = "input" if len(model.inputs) == 1 else f"input_{index}"
        while name in taken:
            name = f"{name}_{index}"
        taken.add(name)
        names.append(name)
    return names


def prepare(model: "keras.Model", include_head: bool, inputs: np.ndarray | Sequence[np.ndarray] | None,
            batch_size: int, seed: int = 0) -> Prepared:
    import keras
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"export needs the TensorFlow backend (KERAS_BACKEND=tensorflow); this process runs "
                           f"{keras.backend.backend()!r}")
    if not isinstance(model, keras.Model):
        raise TypeError(f"export: expected a keras.Model; got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"export: batch_size must be an integer >= 1; got {batch_size!r}")
    part = embedding_model(model, include_head=include_head)
    if len(part.outputs) != 1:
        raise ValueError(f"export: the model has {len(part.outputs)} outputs; export a model with one, e.g. "
                         "keras.Model(model.inputs, model.outputs[0])")
    names = _input_names(part)
    specs = []
    for tensor, name in zip(part.inputs, names):
        specs.append(tf.TensorSpec((None, *tensor.shape[1:]), tf.as_dtype(str(tensor.dtype)), name=name))
    if inputs is None:
        batch, probe = probe_inputs(part, batch_size, seed)
    else:
        probe = "the inputs given"
        batch = [inputs] if isinstance(inputs, np.ndarray) or not isinstance(inputs, (list, tuple)) else list(inputs)
        if len(batch) != len(specs):
            raise ValueError(f"export: the model takes {len(specs)} input(s) {names}; inputs= gives {len(batch)}")
        checked = []
        for value, spec, name in zip(batch, specs, names):
            value = np.asarray(value, spec.dtype.as_numpy_dtype)
            if not spec.shape.is_compatible_with(value.shape) or len(value) == 0:
                raise ValueError(f"export: inputs= for '{name}' has shape {value.shape}; the model takes "
                                 f"{tuple(spec.shape)}")
            checked.append(value)
        batch = checked
    output_name = "cos_theta" if (include_head and find_head(model) is not None) else "embedding"
    return Prepared(model=part, input_names=names, output_name=output_name, specs=specs, inputs=batch, probe=probe)
