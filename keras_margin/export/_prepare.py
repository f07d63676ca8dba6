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


#: Peak memory an export needs beyond the process' own, as a multiple of the exported weights' bytes, measured
#: (resource.getrusage in a fresh process, Keras 3.15 / TF 2.21 / tf2onnx 1.17; benchmarks/export_memory.py):
#: Dense(4096 -> 7000), 115 MB: ONNX 4.8 GB (44x: the frozen graph, tf2onnx's copies and the serialized proto),
#: TFLite 0.63 GB (5.7x); the converted AM-Softmax Face-ResNet-20, 86.5 MiB: ONNX 5.9 GiB (69.5x; where tf2onnx spends
#: it on a convolutional net was not traced), TFLite 0.71 GiB (8.4x).
#: The larger of the two, rounded up, plus a fixed allowance for tf2onnx and the TFLite converter themselves.
EXPORT_MEMORY_FACTOR = {"ONNX": 72.0, "TFLite": 9.0}
EXPORT_MEMORY_BASE = 512 * 2 ** 20

#: The parity-check batch is built in memory: at most this many bytes of inputs.
MAX_PROBE_BYTES = 256 * 2 ** 20


def weight_bytes(model) -> int:
    """Bytes of the model's weights (each variable once)."""
    seen, total = set(), 0
    for variable in model.weights:
        if id(variable) in seen:
            continue
        seen.add(id(variable))
        total += int(np.prod(variable.shape, dtype=np.int64)) * np.dtype(str(variable.dtype)).itemsize
    return total


def available_memory() -> int | None:
    """Bytes this process may still allocate: the least of the system's available memory, the cgroup's
    remaining limit and the address-space limit (``ulimit -v``) left; None when nothing can be read."""
    import resource

    found = []
    try:
        with open("/proc/meminfo") as handle:
            info = {line.split(":")[0]: line.split()[1] for line in handle}
        found.append(int(info["MemAvailable"]) * 1024)
    except (OSError, KeyError, ValueError, IndexError):
        pass
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        try:
            with open(limit) as a, open(usage) as b:
                text = a.read().strip()
                if text != "max" and int(text) < 2 ** 60:
                    found.append(int(text) - int(b.read().strip()))
        except (OSError, ValueError):
            pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as handle:
                size = int(handle.read().split()[0]) * resource.getpagesize()
            found.append(soft - size)
        except (OSError, ValueError):
            pass
    return max(0, min(found)) if found else None


def check_memory(model, fmt: str, available: int | None = None) -> None:
    """Refuse, before anything is converted, an export whose measured memory need exceeds what is available.

    Formula:
    ```
    needed = EXPORT_MEMORY_BASE + EXPORT_MEMORY_FACTOR[fmt] * weight_bytes(model)
    ```
    (ONNX 72x, TFLite 9x the weights: see ``EXPORT_MEMORY_FACTOR``.) An export that runs out of memory is
    killed by the system with no message, or dies with SIGSEGV under an address-space limit.

    Raises:
        MemoryError: needed > available, with both figures.
    """
    available = available_memory() if available is None else available
    if available is None:
        return
    weights = weight_bytes(model)
    needed = EXPORT_MEMORY_BASE + EXPORT_MEMORY_FACTOR[fmt] * weights
    if needed > available:
        tflite = EXPORT_MEMORY_FACTOR["TFLite"]
        other = f" (a TFLite export needs about {tflite:g}x the weights)" if fmt == "ONNX" else ""
        raise MemoryError(
            f"{fmt} export of '{model.name}' ({weights / 1e6:.0f} MB of weights) needs about {needed / 2 ** 30:.1f} "
            f"GiB ({EXPORT_MEMORY_FACTOR[fmt]:g}x the weights, measured, plus {EXPORT_MEMORY_BASE / 2 ** 30:.1f} "
            f"GiB) but only {available / 2 ** 30:.1f} GiB are available; free memory or export on a larger "
            f"machine{other}")


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
        sample_bytes = sum(int(np.prod([d or 1 for d in spec.shape[1:]], dtype=np.int64)) * spec.dtype.size
                           for spec in specs)
        if batch_size * sample_bytes > MAX_PROBE_BYTES:
            raise ValueError(f"export: batch_size {batch_size} makes a parity-check batch of "
                             f"{batch_size * sample_bytes / 2 ** 20:,.0f} MiB ({sample_bytes:,} bytes a sample); "
                             f"at most {MAX_PROBE_BYTES // 2 ** 20} MiB, i.e. batch_size <= "
                             f"{max(1, MAX_PROBE_BYTES // sample_bytes)}")
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
