"""ONNX export through Keras' own exporter (tf2onnx), with a dynamic batch dimension named ``batch``, a named
output, and a parity check in ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from keras_margin.export._files import atomic_output, check_writable
from keras_margin.export._prepare import check_memory, prepare
from keras_margin.export.parity import ParityReport, check_parity, run_onnx

if TYPE_CHECKING:  # pragma: no cover
    import keras

__all__ = ["export_onnx"]


@contextlib.contextmanager
def _quiet_tf2onnx():
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # tf2onnx's np.object probe under NumPy 2
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _tidy(path: Path, input_names: list[str], output_name: str) -> None:
    """Name the batch dimension ``batch`` and the output ``output_name`` (tf2onnx writes ``Identity:0``)."""
    import onnx

    proto = onnx.load(os.fspath(path))
    graph = proto.graph
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    old = graph.output[0].name
    if old != output_name:
        for node in graph.node:
            node.output[:] = [output_name if name == old else name for name in node.output]
            node.input[:] = [output_name if name == old else name for name in node.input]
        graph.output[0].name = output_name
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as error:
        reason = " ".join(str(error).split())[:500]
        raise ValueError(f"the ONNX file tf2onnx wrote is not valid ONNX (try the default --opset): {reason}") from None
    onnx.save(proto, os.fspath(path))


def _opset_range() -> tuple[int, int]:
    """The ONNX opsets tf2onnx converts to: 7 (the oldest ONNX Runtime runs) up to tf2onnx's newest."""
    import tf2onnx.constants

    return 7, max(tf2onnx.constants.OPSET_TO_IR_VERSION)


def export_onnx(model: "keras.Model", path: str | os.PathLike, *, include_head: bool = False,
                opset: int | None = None, inputs: np.ndarray | Sequence[np.ndarray] | None = None,
                batch_size: int = 8, verbose: bool = True) -> ParityReport:
    """Export the embedding part of ``model`` (or, with ``include_head``, its cosine output) to ONNX and check it.

    The part exported is ``embedding_model(model, include_head)``: everything before the first margin head,
    including an L2-normalization layer the model has there. The file takes inputs named after the model's
    inputs (``input`` when Keras named them) with a dynamic ``batch`` dimension and returns ``embedding`` (or
    ``cos_theta``). The file is then run in ONNX Runtime on ``inputs`` (default: a seeded probe batch of
    ``batch_size`` following the model's ``InputContract``, see ``sample_inputs``) and on their first sample
    alone, and compared with Keras. When the Keras outputs barely differ between the probe inputs, the report
    says "not a check" and ``report.passed()`` is False: pass real ``inputs``.

    Args:
        model: a Functional or Sequential model (TensorFlow backend, float32).
        path: the ``.onnx`` file to write.
        include_head: export the head's cos(theta) output too (default False).
        opset: ONNX opset (default: tf2onnx's default).
        inputs: a batch (or one batch per input) of model-ready inputs to check the export on. Defaults to
            None (the probe batch).
        batch_size: size of the generated check batch. Defaults to 8.
        verbose: print the parity line (default True).

    Returns:
        ParityReport: max abs error, minimum cosine and file size.

    Example:
    >>> import tempfile, os, keras
    >>> from keras_margin import AMSoftmaxHead
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8), AMSoftmaxHead(4)])
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     report = export_onnx(model, os.path.join(tmp, "embedding.onnx"), verbose=False)
    >>> report.max_abs_error < 1e-5, report.min_cosine > 0.99999
    (True, True)
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"{path}: the ONNX file name must end in .onnx")
    check_writable(path)
    if opset is not None:
        low, high = _opset_range()
        if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not low <= opset <= high:
            raise ValueError(f"{path}: opset must be an integer in [{low}, {high}] (what tf2onnx converts to); "
                             f"got {opset!r}")
    prepared = prepare(model, include_head, inputs, batch_size)
    check_memory(prepared.model, "ONNX")
    with atomic_output(path) as partial:  # an error or Ctrl-C leaves no half-written or invalid file at path
        try:
            with _quiet_tf2onnx():
                prepared.model.export(os.fspath(partial), format="onnx", verbose=False,
                                      input_signature=prepared.call_signature(), opset_version=opset)
        except Exception as error:  # tf2onnx raises many types; report the reason in one line
            reason = " ".join(str(error).split())[:500] or type(error).__name__
            raise ValueError(f"{path}: tf2onnx could not convert the model: {reason}") from None
        try:
            _tidy(partial, prepared.input_names, prepared.output_name)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    report = check_parity("ONNX", path, None, prepared.model, prepared.inputs, run_onnx,
                          probe=prepared.probe)
    if verbose:
        print(report)
    return report
