"""OpenCV parity stand-ins: how a handler has OpenCV's Caffe importer run a layer type it lacks.

A handler's ``opencv_layer(layer, copy)`` edits ``copy`` (the layer as OpenCV will read it) and, for a fork
layer OpenCV does not know, turns it into a Python layer with ``python_layer(copy, StandInClass, config)``.
A stand-in class follows OpenCV's ``cv2.dnn_registerLayer`` protocol (``getMemoryShapes``, ``forward``),
computes the fork's C++ semantics in NumPy, and lives with its handler; ``parity`` registers the classes
the net uses under ``stand_in_type(cls)``.

Example:
>>> from converters.caffe import schema
>>> class Twice(StandIn):
...     def forward(self, inputs):
...         return [inputs[0] * 2]
>>> copy = schema.LayerParameter(name="x2", type="Twice", bottom=["a"], top=["b"])
>>> python_layer(copy, Twice, {"factor": 2}) is Twice, copy.type, copy.python_param.param_str
(True, 'KerasMarginTwice', '{"factor": 2}')
"""

from __future__ import annotations

import json

import numpy as np

__all__ = ["StandIn", "NotRun", "python_layer", "stand_in_type"]

class StandIn:
    """Base of the Python layers: ``self.config`` is the JSON config, ``self.blobs`` the layer's blobs."""

    def __init__(self, params, blobs):
        self.config = json.loads(params.get("param_str") or "{}")
        self.blobs = [np.asarray(blob, np.float32) for blob in blobs]

    def getMemoryShapes(self, inputs):  # noqa: N802 (OpenCV's name)
        return [inputs[0]]

    def forward(self, inputs):  # pragma: no cover - every stand-in overrides it
        raise NotImplementedError


class NotRun:
    """What ``opencv_layer`` returns for a layer OpenCV cannot run even with a stand-in (e.g. a batch-free
    Parameter blob feeding a second bottom): the parity check leaves it and every layer depending on it out,
    and lists their blobs as skipped; the tests check such layers against NumPy transcriptions instead."""


def stand_in_type(cls: type) -> str:
    """The layer type a stand-in class is registered with OpenCV as."""
    return f"KerasMargin{cls.__name__}"


def python_layer(copy, cls: type, config: dict, keep_bottoms: int | None = None,
                 keep_tops: int | None = None) -> type:
    """Turn ``copy`` into a Python layer run by ``cls`` with ``config``; keep only the first ``keep_bottoms``
    bottoms / ``keep_tops`` tops when given. Returns ``cls``."""
    for descriptor, _ in copy.ListFields():  # every *_param: OpenCV would parse (or refuse) them
        if descriptor.name.endswith("_param") and descriptor.name != "python_param":
            copy.ClearField(descriptor.name)
    copy.type = stand_in_type(cls)
    copy.python_param.param_str = json.dumps(config)
    if keep_bottoms is not None:
        del copy.bottom[keep_bottoms:]
    if keep_tops is not None:
        del copy.top[keep_tops:]
    return cls
