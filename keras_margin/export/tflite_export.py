"""TFLite export through the TensorFlow Lite converter (float32, float16 weights, or dynamic-range int8 weights),
with a dynamic batch dimension, a ``serving_default`` signature, and a parity check in the LiteRT interpreter.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from keras_margin.export._files import atomic_output, check_writable
from keras_margin.export._prepare import check_memory, prepare
from keras_margin.export.parity import ParityReport, check_parity, run_tflite

if TYPE_CHECKING:  # pragma: no cover
    import keras

__all__ = ["export_tflite", "QUANTIZE_OPTIONS"]

QUANTIZE_OPTIONS = (None, "float16", "dynamic")


def _converter(prepared, saved_model_dir: str, quantize: str | None):
    import tensorflow as tf
    from keras.export import ExportArchive

    model, output_name = prepared.model, prepared.output_name
    archive = ExportArchive()
    archive.track(model)
    if len(prepared.specs) == 1:
        def serve(x):
            return {output_name: model(x, training=False)}
    else:
        def serve(*xs):
            return {output_name: model(list(xs), training=False)}
    archive.add_endpoint("serve", serve, input_signature=prepared.specs)
    archive.write_out(saved_model_dir, verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    # Built-in ops only: the LiteRT interpreter of ai-edge-litert has no TensorFlow (Flex) kernels, so a file
    # that needed them would not run there.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data: dynamic range
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter


def export_tflite(model: "keras.Model", path: str | os.PathLike, quantize: str | None = None, *,
                  include_head: bool = False, inputs: np.ndarray | Sequence[np.ndarray] | None = None,
                  batch_size: int = 8, num_threads: int | None = None, verbose: bool = True) -> ParityReport:
    """Export the embedding part of ``model`` (or, with ``include_head``, its cosine output) to TFLite and check it.

    The part exported is ``embedding_model(model, include_head)`` (see ``export_onnx``). The file has one
    signature, ``serving_default``, whose inputs are named after the model's inputs (``input`` when Keras named
    them) with a dynamic batch dimension and whose output is ``embedding`` (or ``cos_theta``); only TFLite
    built-in ops are used. The file is run in the LiteRT interpreter (``ai_edge_litert``) on ``inputs``
    (default: a seeded probe batch of ``batch_size`` following the model's ``InputContract``, see
    ``sample_inputs``) and on their first sample alone, and compared with Keras; a probe on which the Keras
    outputs barely differ is reported as "not a check" (``report.passed()`` False).

    Args:
        model: a Functional or Sequential model (TensorFlow backend, float32).
        path: the ``.tflite`` file to write.
        quantize: None (float32, default), "float16" (float16 weights) or "dynamic" (int8 weights, activations
            quantized on the fly where kernels support it).
        include_head: export the head's cos(theta) output too (default False).
        inputs: a batch (or one batch per input) of model-ready inputs to check the export on. Defaults to
            None (the probe batch).
        batch_size: size of the generated check batch. Defaults to 8.
        num_threads: interpreter threads for the check (default: LiteRT's).
        verbose: print the parity line (default True).

    Returns:
        ParityReport: max abs error, minimum cosine and file size.

    Example:
    >>> import tempfile, os, keras
    >>> from keras_margin import ArcFaceHead
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8), ArcFaceHead(4)])
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     report = export_tflite(model, os.path.join(tmp, "embedding.tflite"), quantize="float16", verbose=False)
    >>> report.min_cosine > 0.9999
    True
    """
    if quantize not in QUANTIZE_OPTIONS:
        raise ValueError(f"export_tflite: quantize must be one of {QUANTIZE_OPTIONS}; got {quantize!r}")
    path = Path(path)
    if path.suffix != ".tflite":
        raise ValueError(f"{path}: the TFLite file name must end in .tflite")
    check_writable(path)
    prepared = prepare(model, include_head, inputs, batch_size)
    check_memory(prepared.model, "TFLite")
    with tempfile.TemporaryDirectory(prefix="keras_margin_tflite_") as saved_model_dir:
        converter = _converter(prepared, saved_model_dir, quantize)
        try:
            flatbuffer = converter.convert()
        except Exception as error:  # the converter raises ConverterError and others, with MLIR diagnostics
            lines = [line.strip() for line in str(error).splitlines() if "error:" in line]
            reason = "; ".join(dict.fromkeys(lines)) or " ".join(str(error).split())[:500]
            raise ValueError(f"{path}: the TFLite converter failed (built-in ops only): {reason}") from None
    with atomic_output(path) as partial:
        partial.write_bytes(flatbuffer)
    del flatbuffer

    def runner(file, batch):
        return run_tflite(file, batch, num_threads=num_threads)

    report = check_parity("TFLite", path, quantize, prepared.model, prepared.inputs, runner,
                          probe=prepared.probe)
    if verbose:
        print(report)
    return report
