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

    Args:
        size: (height, width) to resize to (bilinear), or None to keep the files' size (default None).
        channel_order: "rgb" (default) or "bgr" (Caffe models, e.g. the AM-Softmax release).
        mean: subtracted from every pixel (default 0.0; AM-Softmax deploy net: 128.0, or 127.5).
        scale: multiplies after the mean (default 1.0; AM-Softmax deploy net: 0.0078125 = 1/128).

    Example:
    >>> Preprocessing(size=(112, 96), channel_order="bgr", mean=128.0, scale=0.0078125).channel_order
    'bgr'
    """

    size: tuple[int, int] | None = None
    channel_order: str = "rgb"
    mean: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        if self.channel_order not in ("rgb", "bgr"):
            raise ValueError(f"Preprocessing: channel_order must be 'rgb' or 'bgr'; got {self.channel_order!r}")
        if self.size is not None:
            size = tuple(self.size)
            if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                                     for v in size):
                raise ValueError(f"Preprocessing: size must be (height, width) positive integers; got {self.size!r}")
            object.__setattr__(self, "size", (int(size[0]), int(size[1])))

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Channel order, mean and scale on pixels (..., H, W, 3) already at the right size; float32."""
        x = np.asarray(pixels, np.float32)
        if self.channel_order == "bgr":
            x = x[..., ::-1]
        if self.mean:
            x = x - np.float32(self.mean)
        if self.scale != 1.0:
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


def load_images(paths: Sequence[str | os.PathLike], preprocessing: Preprocessing = Preprocessing()) -> np.ndarray:
    """Decode, resize and normalize image files into one batch (N, H, W, 3) float32.

    Without ``preprocessing.size`` every image must have the size of the first one.

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
