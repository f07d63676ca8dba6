"""Parity of an exported file with Keras: run it in its own runtime (ONNX Runtime, the LiteRT interpreter) on a
batch of inputs and report max abs error, minimum cosine similarity per sample and file size.

The probe batch follows the model's ``InputContract`` (``sample_inputs``): random pixels for a model that takes
raw pixels, normalized as recorded for one that takes normalized input, standard normal otherwise. A probe on
which the Keras outputs barely differ from one input to the next (``spread``) cannot tell a faithful export from
one that ignores its input; the report then says "not a check" and ``passed()`` is False.
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
    "SPREAD_FACTOR",
    "sample_inputs",
    "probe_inputs",
    "spread",
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

#: A probe is informative when the mean pairwise cosine distance between the Keras outputs of different probe
#: inputs exceeds SPREAD_FACTOR * (1 - min cosine tolerance). Why 4: with cosine distance d = 1 - cos(angle) ~
#: angle**2 / 2, an export returning one constant vector c within distance t of every output y_i puts any two
#: outputs within angle 2 * sqrt(2 t) of each other, i.e. within distance 4 t. So when the outputs are more than
#: 4 t apart on average (hence some pair is), no input-ignoring export can pass; at or below it, one might.
SPREAD_FACTOR = 4.0


@dataclass
class ParityReport:
    """How an exported file's outputs compare with the Keras model's on the same inputs.

    ``max_abs_error`` is over every output element; ``min_cosine`` is the lowest cosine similarity between a
    sample's exported and Keras outputs (flattened); both cover every batch size in ``batch_sizes``.
    ``probe`` says what the inputs were; ``spread`` is the mean pairwise cosine distance between the Keras
    outputs of different probe inputs (None with fewer than 2): see ``informative``.

    Example:
    >>> report = ParityReport("ONNX", Path("m.onnx"), None, 1000, (8, 1), 0.0, 1.0, 1.0, "N(0, 1)", 2e-7)
    >>> report.informative(), report.passed()
    (False, False)
    >>> print(report)                                         # doctest: +ELLIPSIS
    ONNX   float32 ... NOT A CHECK: ... (mean pairwise cosine distance 2.00e-07 <= 4.00e-05); pass real inputs ...
    """

    format: str
    path: Path
    quantize: str | None
    file_size: int
    batch_sizes: tuple[int, ...]
    max_abs_error: float
    min_cosine: float
    max_abs_reference: float
    probe: str = ""
    spread: float | None = None

    @property
    def precision(self) -> str:
        return {None: "float32", "float16": "float16 weights", "dynamic": "int8 weights (dynamic range)"}.get(
            self.quantize, str(self.quantize))

    def _min_cosine(self, min_cosine: float | None) -> float:
        return TOLERANCES.get(self.quantize, (None, 0.999))[1] if min_cosine is None else min_cosine

    def spread_threshold(self, min_cosine: float | None = None) -> float:
        """The ``spread`` a probe must exceed to be a check: ``SPREAD_FACTOR * (1 - min cosine tolerance)``."""
        return SPREAD_FACTOR * (1.0 - self._min_cosine(min_cosine))

    def informative(self, min_cosine: float | None = None) -> bool:
        """Whether the probe could catch an export that ignores its input (``spread`` above the threshold;
        True when ``spread`` is unknown, i.e. fewer than 2 distinct probe inputs)."""
        return self.spread is None or self.spread > self.spread_threshold(min_cosine)

    def within_tolerance(self, max_abs_error: float | None = None, min_cosine: float | None = None) -> bool:
        """Whether the figures meet the tolerances (defaults: ``TOLERANCES`` of this precision).

        The default float32 bound on the max abs error scales with the outputs: 1e-5 * max(1, max |Keras|).
        """
        default_abs, _ = TOLERANCES.get(self.quantize, (None, 0.999))
        if max_abs_error is None and default_abs is not None:
            max_abs_error = default_abs * max(1.0, self.max_abs_reference)
        ok = self.min_cosine >= self._min_cosine(min_cosine)
        return ok and (max_abs_error is None or self.max_abs_error <= max_abs_error)

    def passed(self, max_abs_error: float | None = None, min_cosine: float | None = None) -> bool:
        """Whether the export is checked and within the tolerances: ``within_tolerance`` and ``informative``.

        Args:
            max_abs_error: bound on the max abs error. Defaults to None (``TOLERANCES``; float32 scales it
                with the outputs: 1e-5 * max(1, max |Keras|)).
            min_cosine: bound on the minimum cosine. Defaults to None (``TOLERANCES`` of this precision).
        """
        return self.within_tolerance(max_abs_error, min_cosine) and self.informative(min_cosine)

    def __str__(self) -> str:
        sizes = "+".join(str(size) for size in self.batch_sizes)
        line = (f"{self.format:<6} {self.precision:<28} {_megabytes(self.file_size):>9}  batch {sizes}: "
                f"max abs error {self.max_abs_error:.2e}, min cosine {self.min_cosine:.6f}  {self.path}")
        if not self.informative():
            line += (f"  NOT A CHECK: the Keras outputs barely differ between probe inputs (mean pairwise cosine "
                     f"distance {self.spread:.2e} <= {self.spread_threshold():.2e}); pass real inputs (inputs=, "
                     "CLI --inputs DIR|file.npy)")
        return line


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def _contracts_by_input(model) -> dict[int, object]:
    """{index of a model input: the ``InputContract`` right after it}."""
    from keras_margin.input_contract import find_input_contract

    contract = find_input_contract(model)
    if contract is None:
        return {}
    try:
        source = contract.input
    except (AttributeError, ValueError):
        source = None
    for index, tensor in enumerate(model.inputs):
        if source is tensor:
            return {index: contract}
    images = [index for index, tensor in enumerate(model.inputs) if len(tensor.shape) == 4]
    return {images[0]: contract} if len(images) == 1 else {}


def _pixels(rng, shape, dtype, contract) -> np.ndarray:
    """Uniform random pixels 0..255 (RGB), in the contract's channel order and normalized as it records."""
    x = rng.integers(0, 256, shape).astype(np.float64)
    if contract.channel_order == "bgr" and shape[-1] == 3:
        x = x[..., ::-1]
    if contract.pixels == "normalized":
        x = (x - np.asarray(contract.mean, np.float64)) * contract.scale
    return np.ascontiguousarray(x.astype(dtype))


def probe_inputs(model: "keras.Model", batch_size: int = 8, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """A seeded probe batch per model input, following the model's ``InputContract``, and what it is.

    ```
    pixels == "raw":         uniform random pixels 0..255 in the contract's channel order (the model normalizes)
    pixels == "normalized":  the same pixels mapped through (x - mean) * scale as recorded
    unknown / no contract:   standard normal floats (integers 0..9 for integer inputs)
    ```

    Args:
        model: the model (or the part of it) to probe.
        batch_size: samples per input. Defaults to 8.
        seed: the random seed. Defaults to 0.

    Returns:
        (one array per model input, a one-line description of the probe).

    Example:
    >>> import keras
    >>> from keras_margin.input_contract import InputContract
    >>> images = keras.Input((4, 4, 3))
    >>> model = keras.Model(images, keras.layers.Rescaling(1 / 255)(InputContract("raw")(images)))
    >>> batch, what = probe_inputs(model, 5)
    >>> batch[0].shape, float(batch[0].min()) >= 0, float(batch[0].max()) > 200
    ((5, 4, 4, 3), True, True)
    >>> print(what)
    random pixels 0..255 (input contract: raw RGB pixels 0..255 (the model applies (x - 0.0) * 1 itself))
    """
    rng = np.random.default_rng(seed)
    contracts = _contracts_by_input(model)
    batches, described = [], []
    for index, tensor in enumerate(model.inputs):
        dims = tuple(tensor.shape[1:])
        if any(dim is None for dim in dims):
            raise ValueError(f"input '{tensor.name}' has shape {tuple(tensor.shape)} with unknown dimensions besides "
                             "the batch; pass inputs= with a batch of real inputs to check the export on")
        dtype = np.dtype(str(tensor.dtype))
        contract = contracts.get(index)
        if contract is not None and contract.pixels != "unknown" and not np.issubdtype(dtype, np.integer):
            batches.append(_pixels(rng, (batch_size, *dims), dtype, contract))
            kind = "random pixels 0..255" if contract.pixels == "raw" else "random pixels, normalized"
            described.append(f"{kind} (input contract: {contract.describe()})")
        elif np.issubdtype(dtype, np.integer):
            batches.append(rng.integers(0, 10, (batch_size, *dims)).astype(dtype))
            described.append("random integers 0..9")
        else:
            batches.append(rng.standard_normal((batch_size, *dims)).astype(dtype))
            described.append("standard normal" + (" (input contract: normalization not recorded)"
                                                  if contract is not None else " (no input contract)"))
    unique = list(dict.fromkeys(described))
    return batches, "; ".join(unique)


def sample_inputs(model: "keras.Model", batch_size: int = 8, seed: int = 0) -> list[np.ndarray]:
    """A seeded probe batch for each model input, following its ``InputContract`` (see ``probe_inputs``).

    Args:
        model: the model to probe.
        batch_size: samples per input. Defaults to 8.
        seed: the random seed. Defaults to 0.

    Example:
    >>> import keras
    >>> [x.shape for x in sample_inputs(keras.Sequential([keras.Input((4, 3)), keras.layers.Dense(2)]), 5)]
    [(5, 4, 3)]
    """
    return probe_inputs(model, batch_size, seed)[0]


def spread(outputs: np.ndarray, inputs: Sequence[np.ndarray] | None = None, limit: int = 256) -> float | None:
    """Mean pairwise cosine distance (1 - cosine) between the output rows of different inputs.

    Rows of identical inputs (``inputs``: one array per model input) count once; two all-zero rows are at
    distance 0, a zero and a non-zero row at 1. At most ``limit`` rows are used. None with fewer than 2 rows.

    Example:
    >>> spread(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    0.6666666666666666
    >>> spread(np.array([[1.0, 0.0], [1.0, 0.0]]), [np.array([[1.0], [1.0]])]) is None
    True
    """
    y = np.asarray(outputs, np.float64).reshape(len(outputs), -1)
    rows = list(range(len(y)))
    if inputs is not None:
        seen, rows = set(), []
        for row in range(len(y)):
            key = b"".join(np.ascontiguousarray(np.asarray(x)[row]).tobytes() for x in inputs)
            if key not in seen:
                seen.add(key)
                rows.append(row)
    rows = rows[:limit]
    if len(rows) < 2:
        return None
    y = y[rows]
    norms = np.linalg.norm(y, axis=1)
    unit = y / np.where(norms > 0, norms, 1.0)[:, None]
    distance = 1.0 - unit @ unit.T
    zero = norms == 0
    distance[np.logical_xor.outer(zero, zero)] = 1.0
    distance[np.logical_and.outer(zero, zero)] = 0.0
    upper = np.triu_indices(len(rows), k=1)
    return float(np.mean(np.clip(distance[upper], 0.0, 2.0)))


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
                 runner, probe: str = "") -> ParityReport:
    """Run ``runner(path, inputs)`` on the batch and on its first sample alone; compare with ``model``; measure
    the ``spread`` of the Keras outputs over the batch."""
    import keras

    batches = [inputs]
    if len(inputs[0]) > 1:
        batches.append([x[:1] for x in inputs])
    worst_abs, worst_cos, largest, varied = 0.0, 1.0, 0.0, None
    for batch in batches:
        expected = keras.ops.convert_to_numpy(model(batch if len(batch) > 1 else batch[0], training=False))
        got = runner(path, batch)
        max_abs, min_cos = compare(expected, got)
        worst_abs, worst_cos = max(worst_abs, max_abs), min(worst_cos, min_cos)
        largest = max(largest, float(np.max(np.abs(expected))) if expected.size else 0.0)
        if varied is None:
            varied = spread(expected, batch)
    return ParityReport(format=fmt, path=Path(path), quantize=quantize, file_size=Path(path).stat().st_size,
                        batch_sizes=tuple(len(batch[0]) for batch in batches), max_abs_error=worst_abs,
                        min_cosine=worst_cos, max_abs_reference=largest, probe=probe, spread=varied)
