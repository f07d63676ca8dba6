"""keras-margin: margin-based softmax heads and losses for face recognition and metric learning in Keras 3.

``keras_margin.layers`` holds the heads (also importable from here), ``keras_margin.losses`` the losses.
"""

from keras_margin import layers, losses
from keras_margin.input_contract import InputContract, find_input_contract
from keras_margin.layers import (
    AMSoftmaxHead,
    ArcFaceHead,
    CosineDense,
    MarginHead,
    NormFaceHead,
    SphereFaceHead,
    X2SoftmaxHead,
)
from keras_margin.losses import normface_scale_lower_bound
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
    "AMSoftmaxHead",
    "ArcFaceHead",
    "CosineDense",
    "InputContract",
    "MarginHead",
    "NormFaceHead",
    "SphereFaceHead",
    "X2SoftmaxHead",
    "find_input_contract",
    "layers",
    "losses",
    "normface_scale_lower_bound",
    "__version__",
]
