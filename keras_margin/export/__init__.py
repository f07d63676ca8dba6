"""Export of trained or converted models to ONNX (tf2onnx) and TFLite (float32, float16, dynamic int8), each file
checked in its own runtime against Keras. No module here imports TensorFlow or Keras until it is used.

Example:
>>> from keras_margin.export import export_onnx, export_tflite          # doctest: +SKIP
>>> print(export_tflite(model, "face.tflite", quantize="float16"))       # doctest: +SKIP
"""

from keras_margin.export.embedding import embedding_model, find_head
from keras_margin.export.loading import load_inputs, load_model
from keras_margin.export.onnx_export import export_onnx
from keras_margin.export.parity import (
    SPREAD_FACTOR,
    TOLERANCES,
    ParityReport,
    compare,
    probe_inputs,
    run_onnx,
    run_tflite,
    sample_inputs,
    spread,
)
from keras_margin.export.tflite_export import QUANTIZE_OPTIONS, export_tflite

__all__ = [
    "ParityReport",
    "SPREAD_FACTOR",
    "QUANTIZE_OPTIONS",
    "TOLERANCES",
    "compare",
    "embedding_model",
    "export_onnx",
    "export_tflite",
    "find_head",
    "load_inputs",
    "load_model",
    "probe_inputs",
    "run_onnx",
    "run_tflite",
    "sample_inputs",
    "spread",
]
