"""Loading a ``.keras`` file for the ``export`` and ``verify`` subcommands: registers the package's layers (heads,
and the plug-ins' layers, e.g. the Caffe converter's) first, and turns every failure into one clear ``ValueError``;
and loading real inputs (``.npy`` or a folder of images) for the export parity check.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import keras

__all__ = ["IMAGE_SUFFIXES", "load_inputs", "load_model"]


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
        raise ValueError(f"{path}: Keras cannot load the model: {load_error_reason(error)}") from None


#: A reason longer than this keeps its start and its end (where Keras puts the inner exception).
_REASON_LIMIT = 1500


def load_error_reason(error: BaseException) -> str:
    """The reason of a Keras load failure, in one line: the innermost ``Exception encountered:`` part (Keras
    wraps a layer's error in its model's, each with a dump of the config), without the config dumps, and not
    cut short (a safe_mode refusal ends in the option that lifts it); only a reason still longer than 1,500
    characters loses its middle.

    Example:
    >>> load_error_reason(TypeError("<class 'Sequential'> could not be deserialized properly. config={'a': 1}."
    ...                             "\\n\\nException encountered: Could not locate class 'Foo'. Full object config: "
    ...                             "{'class_name': 'Foo'}"))
    "Could not locate class 'Foo'. (in <class 'Sequential'>)"
    """
    text = str(error)
    outer = text.split(" could not be deserialized properly", 1)[0] if "could not be deserialized" in text else ""
    if "Exception encountered:" in text:
        text = text.rsplit("Exception encountered:", 1)[1]
    text = text.split(" Full object config:", 1)[0]
    reason = " ".join(text.split()) or type(error).__name__
    if outer and len(outer) < 200:
        reason = f"{reason} (in {' '.join(outer.split())})"
    if len(reason) > _REASON_LIMIT:
        half = _REASON_LIMIT // 2
        reason = f"{reason[:half]} ... {reason[-half:]}"
    return reason


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def load_inputs(model: "keras.Model", path: str | os.PathLike, limit: int | None = None):
    """Real inputs for the parity check of ``model``: a ``.npy`` file or a folder of images.

    - ``file.npy``: an array (N, H, W, C) already in model input form (used as it is).
    - a folder: its image files (JPEG, PNG, BMP, GIF; searched recursively, in name order), resized to the
      model's input size and prepared per the model's ``InputContract`` (``resolve_preprocessing``): raw
      pixels in the recorded channel order, or normalized as recorded. A model that does not record its
      normalization needs a ``.npy`` instead.

    Args:
        model: the model (one image input) the inputs are for.
        path: the ``.npy`` file or the images folder.
        limit: use at most this many samples (the first ones). Defaults to None (all).

    Returns:
        (the array (N, H, W, C) float32, a one-line description of it).

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: not a ``.npy`` or a folder with images, or the images cannot be made model input.

    Example:
    >>> import tempfile, os, numpy as np, keras
    >>> model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten()])
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     np.save(os.path.join(tmp, "x.npy"), np.zeros((5, 4, 4, 3), np.float32))
    ...     x, what = load_inputs(model, os.path.join(tmp, "x.npy"), limit=3)
    >>> x.shape
    (3, 4, 4, 3)
    """
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (give a folder of images or a .npy file)")
    if path.is_file():
        if path.suffix != ".npy":
            raise ValueError(f"{path}: expected a .npy file of model inputs (N, H, W, C) or a folder of images")
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: cannot read the .npy file: {error}") from None
        if array.ndim < 1 or len(array) == 0:
            raise ValueError(f"{path}: the array has shape {array.shape}; expected (N, ...) with N >= 1")
        total = len(array)
        array = array[:limit] if limit else array
        used = f"the first {len(array)} of " if len(array) < total else ""
        return np.ascontiguousarray(array, np.float32), f"{used}{total} inputs from {path}"
    from keras_margin.evaluation.contract import resolve_preprocessing
    from keras_margin.evaluation.images import Preprocessing, load_images
    from keras_margin.input_contract import find_input_contract

    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4 or model.inputs[0].shape[-1] != 3:
        shapes = [tuple(t.shape) for t in model.inputs]
        raise ValueError(f"{path}: a folder of images is for a model with one (batch, H, W, 3) input; this one takes "
                         f"{shapes}: give a .npy file of model inputs instead")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    contract = find_input_contract(model)
    if contract is None or contract.pixels == "unknown":
        what = "records no InputContract" if contract is None else "records pixels='unknown'"
        raise ValueError(f"{path}: the model {what}, so it is not known how images become its input; give a .npy "
                         "file of model-ready inputs (N, H, W, C) instead, or record the normalization in the model "
                         "(keras_margin.InputContract; Caffe: convert with input_contract=)")
    height, width = model.inputs[0].shape[1:3]
    size = (int(height), int(width)) if height is not None and width is not None else None
    resolved = resolve_preprocessing(contract, Preprocessing(size=size))
    chosen = files[:limit] if limit else files
    used = f"the first {len(chosen)} of " if len(chosen) < len(files) else ""
    x = load_images(chosen, resolved.preprocessing)
    return x, f"{used}{len(files)} images from {path} ({resolved.description})"
