"""Loading a ``.keras`` file for the ``export`` and ``verify`` subcommands: registers the package's layers (heads,
and the plug-ins' layers, e.g. the Caffe converter's) first, and turns every failure into one clear ``ValueError``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import keras

__all__ = ["load_model"]


def load_model(path: str | os.PathLike) -> "keras.Model":
    """Load a ``.keras`` model saved with keras-margin heads or converted by ``keras-margin convert``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a ``.keras`` file, or Keras cannot load it (the message gives Keras' reason).

    Example:
    >>> import tempfile, os, keras
    >>> from keras_margin import NormFaceHead
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "m.keras")
    ...     keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), NormFaceHead(2)]).save(path)
    ...     type(load_model(path).layers[-1]).__name__
    'NormFaceHead'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    if path.suffix != ".keras":
        raise ValueError(f"{path}: expected a .keras model file (keras.Model.save / keras-margin convert)")
    import keras

    import keras_margin  # noqa: F401  (registers the heads and every plug-in's layers)
    try:
        return keras.models.load_model(path)
    except Exception as error:  # Keras raises many types; the CLI reports them in one line
        reason = " ".join(str(error).split()) or type(error).__name__
        if len(reason) > 300:
            reason = reason[:300] + " ..."
        raise ValueError(f"{path}: Keras cannot load the model: {reason}") from None
