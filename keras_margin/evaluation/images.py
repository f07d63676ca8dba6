"""Image files to model input: decoding (JPEG, PNG, BMP, GIF through TensorFlow's own decoders, no Pillow),
optional resizing, channel order and the ``(pixel - mean) * scale`` normalization of face models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Preprocessing", "load_image", "load_images"]


@dataclass(frozen=True)
class Preprocessing:
    """How decoded pixels (0..255, RGB) become model input.

    Formula:
    ```
    x = (resize(pixels, size) [channels reversed when channel_order == "bgr"] - mean) * scale
    ```
    A field left at None is "not given": ``apply`` uses RGB, mean 0 and scale 1 for it, while
    ``evaluate_lfw``, ``compute_embeddings`` and ``keras-margin verify`` take it from the model's
    ``InputContract`` (see ``keras_margin.evaluation.resolve_preprocessing``).

    Args:
        size: (height, width) to resize to (bilinear), or None to keep the files' size. Defaults to None.
        channel_order: "rgb" or "bgr" (Caffe models, e.g. the AM-Softmax release), or None (not given).
            Defaults to None.
        mean: subtracted from every pixel: one number or one per channel, in the model's channel order
            (AM-Softmax deploy net: 128.0, or 127.5), or None (not given). Defaults to None.
        scale: multiplies after the mean (AM-Softmax deploy net: 0.0078125 = 1/128), or None (not given).
            Defaults to None.

    Example:
    >>> p = Preprocessing(size=(112, 96), channel_order="bgr", mean=128.0, scale=0.0078125)
    >>> p.channel_order, float(p.apply(np.full((1, 1, 3), 192.0))[0, 0, 0])
    ('bgr', 0.5)
    >>> Preprocessing().given()
    {}
    """

    size: tuple[int, int] | None = None
    channel_order: str | None = None
    mean: float | tuple[float, ...] | None = None
    scale: float | None = None

    def __post_init__(self):
        if self.channel_order not in (None, "rgb", "bgr"):
            raise ValueError(f"Preprocessing: channel_order must be 'rgb' or 'bgr'; got {self.channel_order!r}")
        if self.size is not None:
            size = tuple(self.size)
            if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                                     for v in size):
                raise ValueError(f"Preprocessing: size must be (height, width) positive integers; got {self.size!r}")
            object.__setattr__(self, "size", (int(size[0]), int(size[1])))
        if self.mean is not None:
            values = tuple(self.mean) if isinstance(self.mean, (list, tuple, np.ndarray)) else (self.mean,)
            if not values or any(isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v)
                                 for v in values):
                raise ValueError(f"Preprocessing: mean must be a finite number or one per channel; got {self.mean!r}")
            values = tuple(float(v) for v in values)
            object.__setattr__(self, "mean", values[0] if len(values) == 1 else values)
        if self.scale is not None:
            if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float, np.number)) \
                    or not np.isfinite(self.scale) or self.scale <= 0:
                raise ValueError(f"Preprocessing: scale must be a finite number > 0; got {self.scale!r}")
            object.__setattr__(self, "scale", float(self.scale))

    def given(self) -> dict:
        """The normalization fields that are set (not None): a subset of channel_order, mean, scale."""
        return {key: getattr(self, key) for key in ("channel_order", "mean", "scale") if getattr(self, key) is not None}

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Channel order, mean and scale on pixels (..., H, W, 3) already at the right size; float32."""
        x = np.asarray(pixels, np.float32)
        if self.channel_order == "bgr":
            x = x[..., ::-1]
        mean = np.asarray(0.0 if self.mean is None else self.mean, np.float32)
        if np.any(mean):
            if mean.ndim and mean.shape[0] != x.shape[-1]:
                raise ValueError(f"Preprocessing: {mean.shape[0]} mean values for {x.shape[-1]} channels")
            x = x - mean
        if self.scale is not None and self.scale != 1.0:
            x = x * np.float32(self.scale)
        return np.ascontiguousarray(x, np.float32)


def load_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file to RGB pixels (H, W, 3) float32 in 0..255, resized (bilinear) to ``size`` if given.

    Example:
    >>> import tempfile, os, numpy as np, tensorflow as tf
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "face.png")
    ...     tf.io.write_file(path, tf.io.encode_png(np.full((4, 6, 3), 200, np.uint8)))
    ...     image = load_image(path, size=(2, 3))
    >>> image.shape, float(image.max())
    ((2, 3, 3), 200.0)
    """
    import tensorflow as tf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: cannot decode the image (JPEG, PNG, BMP or GIF expected): {message}") from None
    if size is not None and tuple(image.shape[:2]) != tuple(size):
        image = tf.image.resize(image, size, method="bilinear")
    return np.asarray(image, np.float32)


def load_images(paths: Sequence[str | os.PathLike], preprocessing: Preprocessing | None = None) -> np.ndarray:
    """Decode, resize and normalize image files into one batch (N, H, W, 3) float32.

    Without ``preprocessing.size`` every image must have the size of the first one. ``preprocessing`` is
    applied as given (None: RGB pixels 0..255); no model contract is read here.

    Args:
        paths: the image files.
        preprocessing: size, channel order, mean and scale. Defaults to None (the decoded pixels).

    Example:
    >>> import tempfile, os, numpy as np, tensorflow as tf
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     paths = [os.path.join(tmp, f"{i}.png") for i in range(2)]
    ...     for path in paths:
    ...         tf.io.write_file(path, tf.io.encode_png(np.full((4, 4, 3), 128, np.uint8)))
    ...     batch = load_images(paths, Preprocessing(mean=128.0, scale=1 / 128))
    >>> batch.shape, float(abs(batch).max())
    ((2, 4, 4, 3), 0.0)
    """
    preprocessing = Preprocessing() if preprocessing is None else preprocessing
    images = []
    for path in paths:
        image = load_image(path, preprocessing.size)
        if images and image.shape != images[0].shape:
            raise ValueError(
                f"{os.fspath(path)}: image size {image.shape[:2]} differs from {images[0].shape[:2]} "
                f"(of {os.fspath(paths[0])}); pass a size to resize every image to"
            )
        images.append(image)
    if not images:
        raise ValueError("load_images: no image paths given")
    return preprocessing.apply(np.stack(images))
