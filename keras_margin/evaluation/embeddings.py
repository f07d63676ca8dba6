"""Face embeddings of a batch or a list of image files, batched with a progress bar, with the AM-Softmax deploy
net's flip trick (feature of the image plus feature of its mirror, then L2 normalization) as an option.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Sequence

import numpy as np

from keras_margin.evaluation.images import Preprocessing, load_images

if TYPE_CHECKING:  # pragma: no cover
    import keras

__all__ = ["compute_embeddings", "l2_normalize", "cosine_scores"]


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` divided by their L2 norm (a zero row stays zero), float32.

    Example:
    >>> l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    x = np.asarray(x, np.float64)
    return (x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps)).astype(np.float32)


def cosine_scores(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``first`` with the same row of ``second`` (float64).

    Example:
    >>> cosine_scores(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 2.0], [2.0, 2.0]])).round(6).tolist()
    [0.0, 1.0]
    """
    a = np.asarray(first, np.float64)
    b = np.asarray(second, np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.sum(a * b, axis=-1) / np.where(norms > 0, norms, 1.0)


def compute_embeddings(model: "keras.Model", images: np.ndarray | Sequence[str | os.PathLike], *,
                       batch_size: int = 64, flip: bool | None = None, normalize: bool = True,
                       preprocessing: Preprocessing | None = None, progress: bool = True,
                       ignore_contract: bool = False) -> np.ndarray:
    """Run ``model`` over ``images`` in batches and return one embedding row per image.

    Formula:
    ```
    flip=False:  e = f(x)                  (divided by |f(x)| when normalize=True)
    flip=True:   e = (f(x) + f(mirror(x))) / |f(x) + f(mirror(x))|       mirror: reverse the width axis
    ```
    ``flip=True`` is the feature of the AM-Softmax ``face_deploy_mirror_normalize`` net; a model that flips by
    itself (its ``InputContract`` says ``flip_in_model``, as a model converted from that deploy prototxt) is
    never flipped outside. Image files are prepared per the model's ``InputContract`` completed by
    ``preprocessing`` (``resolve_preprocessing``): a step the model does itself is not applied twice
    (``PreprocessingWarning``), an option contradicting the contract is a ``ValueError``.

    Args:
        model: a Keras model mapping (batch, H, W, C) to (batch, ...) embeddings; use
            ``keras_margin.export.embedding_model`` to drop a margin head first.
        images: model inputs (N, H, W, C) as an array (used as they are), or image file paths (decoded batch
            by batch and prepared with ``preprocessing``).
        batch_size: images per model call; with flip each call holds the images and their mirrors.
            Defaults to 64.
        flip: add the mirror image's feature, then L2-normalize; None: not given (no flip). Never applied to a
            model whose contract says it flips itself. Defaults to None.
        normalize: L2-normalize the embeddings (always on with flip). Defaults to True.
        preprocessing: how image files become model input; its None fields come from the model's
            ``InputContract`` (ignored for arrays). Defaults to None (all from the contract).
        progress: show a ``keras.utils.Progbar``. Defaults to True.
        ignore_contract: use ``preprocessing`` and ``flip`` as given (unset: RGB, mean 0, scale 1, no flip),
            whatever the model records. Defaults to False.

    Example:
    >>> import numpy as np, keras
    >>> model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(8)])
    >>> compute_embeddings(model, np.random.rand(5, 4, 4, 3), batch_size=2, flip=True, progress=False).shape
    (5, 8)
    """
    import keras

    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"compute_embeddings: batch_size must be an integer >= 1; got {batch_size!r}")
    from_files = not isinstance(images, np.ndarray)
    count = len(images)
    if count == 0:
        raise ValueError("compute_embeddings: no images given")
    if not from_files and images.ndim != 4:
        raise ValueError(f"compute_embeddings: images must be (N, H, W, C); got shape {images.shape}")
    from keras_margin.evaluation.contract import PreprocessingWarning, resolve_preprocessing

    if from_files:
        resolved = resolve_preprocessing(model, preprocessing, flip, ignore_contract=ignore_contract)
    else:  # arrays are model input already: only the flip decision depends on the contract
        resolved = resolve_preprocessing(model, Preprocessing(channel_order="rgb", mean=0.0, scale=1.0), flip,
                                         ignore_contract=ignore_contract)
    for message in resolved.warnings:
        warnings.warn(f"compute_embeddings: {message}", PreprocessingWarning, stacklevel=2)
    flip, preprocessing = resolved.flip, resolved.preprocessing
    bar = keras.utils.Progbar(count, unit_name="image", verbose=1 if progress else 0)
    rows = []
    for start in range(0, count, batch_size):
        chunk = images[start:start + batch_size]
        x = load_images(chunk, preprocessing) if from_files else np.asarray(chunk, np.float32)
        if flip:
            both = _features(model, np.concatenate([x, x[:, :, ::-1]], axis=0))
            features = both[: len(x)] + both[len(x):]
        else:
            features = _features(model, x)
        rows.append(features)
        bar.add(len(x))
    embeddings = np.concatenate(rows, axis=0)
    return l2_normalize(embeddings) if (flip or normalize) else embeddings.astype(np.float32)


def _features(model, x: np.ndarray) -> np.ndarray:
    output = model.predict_on_batch(x)
    if isinstance(output, (list, tuple, dict)):
        raise ValueError(
            f"compute_embeddings: the model has {len(output)} outputs; it must have one (the embedding). "
            "Build keras.Model(model.inputs, model.outputs[i]) for the one to use"
        )
    output = np.asarray(output, np.float64)
    return output.reshape(len(x), -1)
