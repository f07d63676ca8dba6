"""Image files to model input: decoding (JPEG, PNG, BMP, GIF through TensorFlow's own decoders, no Pillow),
optional resizing, channel order and the ``(pixel - mean) * scale`` normalization of face models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["MAX_PIXELS", "Preprocessing", "image_size", "load_image", "load_images"]

#: The largest image decoded: 2^26 pixels (8192 x 8192; 0.8 GB as float32 RGB). A PNG of 20,000 x 20,000 pixels
#: compresses to about a megabyte and would need 4.8 GB: its size is read from the header and refused first.
MAX_PIXELS = 2 ** 26


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


def image_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the header of a PNG, JPEG, GIF or BMP file, without decoding it; None when the
    format is not one of these or its header is cut short (the decoder then says what is wrong).

    Example:
    >>> image_size(b"\\x89PNG\\r\\n\\x1a\\n" + b"\\x00\\x00\\x00\\rIHDR" + (20000).to_bytes(4, "big") * 2)
    (20000, 20000)
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[8:10], "little"), int.from_bytes(data[6:8], "little")
    if data[:2] == b"BM" and len(data) >= 26:
        width, height = (int.from_bytes(data[i:i + 4], "little", signed=True) for i in (18, 22))
        return abs(height), abs(width)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's first start-of-frame marker (SOF0..SOF15 but DHT, JPG, DAC)."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers: no length
            at += 2
            continue
        length = int.from_bytes(data[at + 2:at + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if at + 9 > len(data):
                return None
            return int.from_bytes(data[at + 5:at + 7], "big"), int.from_bytes(data[at + 7:at + 9], "big")
        if length < 2:
            return None
        at += 2 + length
    return None


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
    with open(path, "rb") as handle:
        data = handle.read()
    found = image_size(data)
    if found is not None and found[0] * found[1] > MAX_PIXELS:
        raise ValueError(f"{path}: the image is {found[0]} x {found[1]} pixels, more than the {MAX_PIXELS:,} "
                         f"(8192 x 8192) decoded at most; face crops are far smaller: resize it first")
    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
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
