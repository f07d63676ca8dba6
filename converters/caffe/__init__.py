"""Caffe importer: ``.prototxt`` + ``.caffemodel`` -> Keras 3 model, with a layer-by-layer parity report.

Four stages, one module each: read (``schema``, ``reader``, ``upgrade``), plan (``planner``, ``shapes``),
build (``registry``, ``handlers``, ``layers``, ``builder``) and verify (``parity``); ``cli`` is the
``keras-margin convert`` subcommand.

Example:
>>> from converters.caffe import load_caffe_model            # doctest: +SKIP
>>> model = load_caffe_model("face_deploy.prototxt", "face.caffemodel")   # doctest: +SKIP

Importing this package is cheap: the Keras-dependent parts load on first use, so ``keras-margin --version``
stays fast. Before ``keras.saving.load_model`` on a converted ``.keras`` file, ``import converters.caffe.layers``
so the few Caffe-rule layers it may contain are registered.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from converters.caffe.errors import CaffeWarning, ConversionError

__all__ = [
    "ConversionError",
    "CaffeWarning",
    "load_caffe_model",
    "convert",
    "Conversion",
    "parity_report",
    "ParityReport",
    "Handler",
    "Built",
    "register",
    "read_prototxt",
    "read_caffemodel",
    "write_caffemodel",
]

_LAZY = {
    "load_caffe_model": "converters.caffe.builder",
    "convert": "converters.caffe.builder",
    "Conversion": "converters.caffe.builder",
    "parity_report": "converters.caffe.parity",
    "ParityReport": "converters.caffe.parity",
    "Handler": "converters.caffe.registry",
    "Built": "converters.caffe.registry",
    "register": "converters.caffe.registry",
    "read_prototxt": "converters.caffe.reader",
    "read_caffemodel": "converters.caffe.reader",
    "write_caffemodel": "converters.caffe.writer",
}

if TYPE_CHECKING:  # pragma: no cover
    from converters.caffe.builder import Conversion, convert, load_caffe_model
    from converters.caffe.parity import ParityReport, parity_report
    from converters.caffe.reader import read_caffemodel, read_prototxt
    from converters.caffe.registry import Built, Handler, register
    from converters.caffe.writer import write_caffemodel


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'converters.caffe' has no attribute {name!r}")
    if module == "converters.caffe.builder":
        import_module("converters.caffe.layers")  # register the Keras layers for .keras reloading
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public API (lazy names included, loaded or not) and the module's own globals."""
    return sorted(set(__all__) | set(globals()))
