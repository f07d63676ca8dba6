"""Parity of an exported file with Keras: run it in its own runtime (ONNX Runtime, the LiteRT interpreter) on a
batch of inputs and report max abs error, minimum cosine similarity per sample and file size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import keras

__all__ = [
    "ParityReport",
    "TOLERANCES",
    "sample_inputs",
    "compare",
    "run_onnx",
    "run_tflite",
]

# Default acceptance per precision: (max abs error relative to max(1, max |Keras output|), min cosine).
TOLERANCES: dict[str | None, tuple[float | None, float]] = {
    None: (1e-5, 0.99999),
    "float16": (None, 0.9999),
    "dynamic": (None, 0.999),
}


@dataclass
class ParityReport:
    """How an exported file's outputs compare with the Keras model's on the same inputs.

    ``max_abs_error`` is over every output element; ``min_cosine`` is the lowest cosine similarity between a
    sample's exported and Keras outputs (flattened); both cover every batch size in ``batch_sizes``.
    """

    format: str
    path: Path
    quantize: str | None
    file_size: int
    batch_sizes: tuple[int, ...]
    max_abs_error: float
    min_cosine: float
    max_abs_reference: float

    @property
    def precision(self) -> str:
        return {None: "float32", "float16": "float16 weights", "dynamic": "int8 weights (dynamic range)"}.get(
            self.quantize, str(self.quantize))

    def passed(self, max_abs_error: float | None = None, min_cosine: float | None = None) -> bool:
        """Whether the figures meet the tolerances (defaults: ``TOLERANCES`` of this precision).

        The default float32 bound on the max abs error scales with the outputs: 1e-5 * max(1, max |Keras|).
        """
        default_abs, default_cos = TOLERANCES.get(self.quantize, (None, 0.999))
        if max_abs_error is None and default_abs is not None:
            max_abs_error = default_abs * max(1.0, self.max_abs_reference)
        ok = self.min_cosine >= (default_cos if min_cosine is None else min_cosine)
        return ok and (max_abs_error is None or self.max_abs_error <= max_abs_error)

    def __str__(self) -> str:
        sizes = "+".join(str(size) for size in self.batch_sizes)
        return (f"{self.format:<6} {self.precision:<28} {_megabytes(self.file_size):>9}  batch {sizes}: "
                f"max abs error {self.max_abs_error:.2e}, min cosine {self.min_cosine:.6f}  {self.path}")


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def sample_inputs(model: "keras.Model", batch_size: int = 8, seed: int = 0) -> list[np.ndarray]:
    """A seeded batch for each model input: standard normal floats (integers 0..9 for integer inputs).

    Example:
    >>> import keras
    >>> [x.shape for x in sample_inputs(keras.Sequential([keras.Input((4, 3)), keras.layers.Dense(2)]), 5)]
    [(5, 4, 3)]
    """
    rng = np.random.default_rng(seed)
    batches = []
    for tensor in model.inputs:
        dims = tuple(tensor.shape[1:])
        if any(dim is None for dim in dims):
            raise ValueError(f"input '{tensor.name}' has shape {tuple(tensor.shape)} with unknown dimensions besides "
                             "the batch; pass inputs= with a batch of real inputs to check the export on")
        dtype = np.dtype(str(tensor.dtype))
        if np.issubdtype(dtype, np.integer):
            batches.append(rng.integers(0, 10, (batch_size, *dims)).astype(dtype))
        else:
            batches.append(rng.standard_normal((batch_size, *dims)).astype(dtype))
    return batches


def compare(reference: np.ndarray, output: np.ndarray) -> tuple[float, float]:
    """(max abs error, minimum per-sample cosine similarity) of ``output`` against ``reference``.

    A sample whose two outputs are both zero counts as cosine 1; one zero and one not as 0.

    Example:
    >>> max_abs, min_cos = compare(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[1.0, 0.1], [0.0, 2.0]]))
    >>> round(max_abs, 6), round(min_cos, 6)
    (0.1, 0.995037)
    """
    reference = np.asarray(reference, np.float64).reshape(len(reference), -1)
    output = np.asarray(output, np.float64).reshape(len(output), -1)
    if reference.shape != output.shape:
        raise ValueError(f"the exported model returned shape {output.shape}, Keras {reference.shape}")
    if not np.all(np.isfinite(output)) and np.all(np.isfinite(reference)):
        return math.inf, -1.0
    max_abs = float(np.max(np.abs(reference - output))) if reference.size else 0.0
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(output, axis=1)
    dots = np.sum(reference * output, axis=1)
    both_zero = (np.linalg.norm(reference, axis=1) == 0) & (np.linalg.norm(output, axis=1) == 0)
    cosines = np.where(both_zero, 1.0, dots / np.where(norms > 0, norms, np.inf))
    return max_abs, float(np.min(cosines)) if cosines.size else 1.0


def run_onnx(path: str | os.PathLike, inputs: Sequence[np.ndarray]) -> np.ndarray:
    """Run an ONNX file in ONNX Runtime (CPU) on ``inputs`` (one array per model input); the first output.

    Example:
    >>> y = run_onnx("embedding.onnx", [np.zeros((2, 112, 96, 3), np.float32)])   # doctest: +SKIP
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    names = [item.name for item in session.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"{path}: the ONNX model takes {len(names)} inputs {names}; got {len(inputs)}")
    return session.run(None, dict(zip(names, inputs)))[0]


def run_tflite(path: str | os.PathLike, inputs: Sequence[np.ndarray], num_threads: int | None = None) -> np.ndarray:
    """Run a ``.tflite`` file in the LiteRT interpreter (``ai_edge_litert``) on ``inputs``; the first output.

    Inputs are matched to the file's ``serving_default`` signature in order; the batch size may differ from
    the one the file was converted with.

    Example:
    >>> y = run_tflite("embedding.tflite", [np.zeros((2, 112, 96, 3), np.float32)])   # doctest: +SKIP
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=os.fspath(path), num_threads=num_threads)
    signatures = interpreter.get_signature_list()
    if signatures:
        key = "serving_default" if "serving_default" in signatures else next(iter(signatures))
        runner = interpreter.get_signature_runner(key)
        names = signatures[key]["inputs"]
        if len(names) != len(inputs):
            raise ValueError(f"{path}: the TFLite model takes {len(names)} inputs {names}; got {len(inputs)}")
        outputs = runner(**dict(zip(names, inputs)))
        return outputs[signatures[key]["outputs"][0]]
    details = interpreter.get_input_details()
    for detail, value in zip(details, inputs):
        interpreter.resize_tensor_input(detail["index"], value.shape, strict=True)
    interpreter.allocate_tensors()
    for detail, value in zip(details, inputs):
        interpreter.set_tensor(detail["index"], value)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def check_parity(fmt: str, path: Path, quantize: str | None, model: "keras.Model", inputs: list[np.ndarray],
                 runner) -> ParityReport:
    """Run ``runner(path, inputs)`` on the batch and on its first sample alone; compare with ``model``."""
    import keras

    batches = [inputs]
    if len(inputs[0]) > 1:
        batches.append([x[:1] for x in inputs])
    worst_abs, worst_cos, largest = 0.0, 1.0, 0.0
    for batch in batches:
        expected = keras.ops.convert_to_numpy(model(batch if len(batch) > 1 else batch[0], training=False))
        got = runner(path, batch)
        max_abs, min_cos = compare(expected, got)
        worst_abs, worst_cos = max(worst_abs, max_abs), min(worst_cos, min_cos)
        largest = max(largest, float(np.max(np.abs(expected))) if expected.size else 0.0)
    return ParityReport(format=fmt, path=Path(path), quantize=quantize, file_size=Path(path).stat().st_size,
                        batch_sizes=tuple(len(batch[0]) for batch in batches), max_abs_error=worst_abs,
                        min_cosine=worst_cos, max_abs_reference=largest)
