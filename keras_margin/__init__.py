"""keras-margin: margin-based softmax heads and losses for face recognition and metric learning in Keras 3.

``keras_margin.layers`` holds the heads (also importable from here), ``keras_margin.losses`` the losses;
``keras_margin.export``, ``.evaluation``, ``.distribution`` and the other subpackages load on first use.
Importing the package registers every layer keras-margin writes into ``.keras`` files, the plug-ins' included.
"""

import importlib as _importlib

from keras_margin import layers, losses
from keras_margin.input_contract import InputContract, find_input_contract
from keras_margin.layers import (
    AdaCosHead,
    AdaFaceHead,
    AMSoftmaxHead,
    ArcFaceHead,
    CombinedMarginHead,
    CosineDense,
    CurricularFaceHead,
    LSoftmaxHead,
    MagFaceHead,
    MarginHead,
    NormFaceContrastiveHead,
    NormFaceHead,
    SphereFaceHead,
    SubCenterArcFaceHead,
    X2SoftmaxHead,
)
from keras_margin.losses import normface_scale_lower_bound
from keras_margin.partial_fc import PartialFCOptimizer
from keras_margin.version import __version__
from keras_margin_cli import plugins as _plugins


def _register_plugin_layers() -> None:
    """Import every ``keras_margin.custom_objects`` entry point (e.g. the Caffe converter's layers), so that
    ``import keras_margin`` is enough for ``keras.saving.load_model`` on any file keras-margin wrote."""
    import warnings

    for point in _plugins.entry_points(_plugins.CUSTOM_OBJECTS):
        try:
            _plugins.load(point)
        except ImportError as error:  # a broken plug-in must not break the heads: say so and go on
            warnings.warn(f"keras_margin: the layers of plug-in '{point.name}' are not registered: {error}",
                          stacklevel=2)


_register_plugin_layers()

__all__ = [
    "AdaCosHead",
    "AdaFaceHead",
    "AMSoftmaxHead",
    "ArcFaceHead",
    "CombinedMarginHead",
    "CosineDense",
    "CurricularFaceHead",
    "InputContract",
    "LSoftmaxHead",
    "MagFaceHead",
    "MarginHead",
    "NormFaceContrastiveHead",
    "NormFaceHead",
    "PartialFCOptimizer",
    "SphereFaceHead",
    "SubCenterArcFaceHead",
    "X2SoftmaxHead",
    "find_input_contract",
    "layers",
    "losses",
    "normface_scale_lower_bound",
    "__version__",
]

# Subpackages reached as attributes (``keras_margin.export.export_onnx``) are imported on first use.
_SUBMODULES = ("callbacks", "chunked", "core", "data", "distribution", "evaluation", "export", "input_contract",
               "margins", "models", "recipes", "sampling")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return _importlib.import_module(f"keras_margin.{name}")
    raise AttributeError(f"module 'keras_margin' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))
