"""Image list -> ``tf.data`` pipeline with Caffe's data transform, usable on every Keras backend (JAX and PyTorch
take ``tf.data`` datasets in ``fit``; ``dataset.as_numpy_iterator()`` yields NumPy arrays).

Per image, as the fork's ``ReadImageToCVMat`` (``util/io.cpp``) and ``DataTransformer::Transform(cv::Mat)``
(``data_transformer.cpp``) do:
```
pixels = decode(file)                       # uint8, RGB from TensorFlow; Caffe's cv::imread gives BGR
pixels = round(bilinear(pixels, resize_to)) # new_height / new_width: cv::resize INTER_LINEAR on 8-bit pixels
pixels = crop(pixels, image_size)           # crop_size / crop_h, crop_w: offsets (H - h) // 2, (W - w) // 2,
                                            # random in [0, H - h] x [0, W - w] for a training random crop
x[h, w, c] = (pixels[h, w, c] - mean[c]) * scale   # c in BGR order when bgr (Caffe's mean_value order)
x = x[:, ::-1] with probability 1/2         # mirror (training only here; Caffe mirrors in TEST as well)
```
The order, the crops and the flips are functions of (seed, epoch, image) only (stateless random ops): the same
seed gives the same batches whatever the global seeds, each new pass over the dataset (each Keras epoch)
reshuffles, and ``start_epoch`` resumes a run where it stopped.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from keras_margin.data.check import FITS
from keras_margin.data.check import check as check_images
from keras_margin.data.lists import ImageList, read_image_folder, read_image_list

__all__ = ["image_dataset"]


def _pair(value, name: str) -> tuple[int, int] | None:
    """A (height, width) of positive integers, or None."""
    if value is None:
        return None
    size = tuple(value) if isinstance(value, (list, tuple)) else None
    if size is None or len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                                             for v in size):
        raise ValueError(f"image_dataset: {name} must be (height, width) positive integers; got {value!r}")
    return int(size[0]), int(size[1])


def _means(mean, channels: int) -> np.ndarray:
    """One mean per channel (a single value is repeated, as Caffe replicates one mean_value)."""
    values = np.atleast_1d(np.asarray(mean, np.float64))
    if values.ndim != 1 or values.size not in (1, channels) or not np.all(np.isfinite(values)):
        raise ValueError(f"image_dataset: mean must be one finite number or {channels} (one per channel, in the "
                         f"output channel order); got {mean!r}")
    return np.broadcast_to(values, (channels,)).astype(np.float32)


def image_dataset(list_file: str | os.PathLike | None = None, root: str | os.PathLike | None = None, *,
                  images: ImageList | None = None, num_classes: int | None = None, label_offset: int = 0,
                  image_size: Sequence[int] | None = (112, 96), fit: str = "resize",
                  resize_to: Sequence[int] | None = None, mean: float | Sequence[float] = 127.5,
                  scale: float = 1 / 128, mirror: bool = True, bgr: bool = True, channels: int = 3,
                  batch_size: int = 64, training: bool = True, shuffle: bool | None = None, seed: int = 0,
                  drop_remainder: bool | None = None, start_epoch: int = 0, labels_as_input: bool = False,
                  check: bool = True, prefetch: bool = True, dtype: str = "float32"):
    """A ``tf.data.Dataset`` of (images (B, H, W, C), labels (B,) int32) batches from an image list.

    The images come from ``images``, else the Caffe list file ``list_file`` (paths relative to ``root``,
    default the list's folder), else the class-per-folder tree ``root``. Before the dataset is built, ``check``
    reads every image's header and refuses bad input (``DataError`` naming the file and line).

    Formula (per image; see the module docstring for Caffe's code it follows):
    ```
    x = mirror?((crop_or_resize(pixels)[..., ::-1 if bgr] - mean) * scale)
    ```

    Args:
        list_file: a Caffe ``ImageData`` list (``relative/path.jpg label`` lines). Defaults to None.
        root: the folder the list's paths are relative to, or the class-per-folder tree. Defaults to None.
        images: an ``ImageList`` already read. Defaults to None.
        num_classes, label_offset: for ``read_image_list``. Default to None and 0.
        image_size: output (height, width); None only with ``fit="none"``. Defaults to (112, 96).
        fit: "resize" (bilinear, rounded to 8 bits as cv::resize), "center_crop", "random_crop" (random in
            training, centred otherwise: Caffe's crop_size) or "none" (sizes must already match).
            Defaults to "resize".
        resize_to: (height, width) to resize to before the crop (Caffe's new_height / new_width). Defaults to None.
        mean: subtracted, one value or one per channel in the output order (BGR when ``bgr``). Defaults to 127.5.
        scale: multiplies after the mean. Defaults to 1/128.
        mirror: flip horizontally with probability 1/2 when ``training``. Defaults to True.
        bgr: reverse the channels to Caffe's (OpenCV's) BGR order. Defaults to True.
        channels: 3 (colour) or 1 (Caffe's is_color: false). Defaults to 3.
        batch_size: images per batch. Defaults to 64.
        training: random crops and flips, shuffling and drop_remainder by default. Defaults to True.
        shuffle: reshuffle on every pass. Defaults to ``training``.
        seed: the order, crops and flips depend on (seed, epoch) only. Defaults to 0.
        drop_remainder: leave out the last, smaller batch. Defaults to ``training``.
        start_epoch: the first pass's epoch number (to resume). Defaults to 0.
        labels_as_input: yield ((images, labels), labels), for models whose margin head takes the labels as
            an input. Defaults to False.
        check: run ``check`` first. Defaults to True.
        prefetch: prefetch batches (``tf.data.AUTOTUNE``). Defaults to True.
        dtype: of the images. Defaults to "float32".

    Returns:
        tf.data.Dataset with a known cardinality (batches per pass).

    Example:
    >>> import tempfile, os, numpy as np, tensorflow as tf
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     for i in range(4):
    ...         tf.io.write_file(os.path.join(tmp, f"{i}.png"), tf.io.encode_png(np.full((6, 5, 3), 64 * i, np.uint8)))
    ...     with open(os.path.join(tmp, "list.txt"), "w") as handle:
    ...         _ = handle.write("".join(f"{i}.png {i % 2}\\n" for i in range(4)))
    ...     dataset = image_dataset(os.path.join(tmp, "list.txt"), image_size=(4, 4), fit="center_crop",
    ...                             batch_size=2, training=False)
    ...     batches = list(dataset.as_numpy_iterator())
    >>> len(batches), batches[0][0].shape, batches[0][1].tolist(), float(batches[1][0][0, 0, 0, 0])
    (2, (2, 4, 4, 3), [0, 1], 0.00390625)
    """
    import tensorflow as tf

    if fit not in FITS:
        raise ValueError(f"image_dataset: fit must be one of {FITS}; got {fit!r}")
    size = _pair(image_size, "image_size")
    if size is None and fit != "none":
        raise ValueError(f"image_dataset: image_size is needed with fit={fit!r} (None only with fit='none')")
    resize = _pair(resize_to, "resize_to")
    if channels not in (1, 3):
        raise ValueError(f"image_dataset: channels must be 1 or 3; got {channels!r}")
    means = _means(mean, channels)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.number)) or not math.isfinite(scale):
        raise ValueError(f"image_dataset: scale must be a finite number; got {scale!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"image_dataset: batch_size must be a positive integer; got {batch_size!r}")
    for name, value in (("seed", seed), ("start_epoch", start_epoch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2 ** 62:
            raise ValueError(f"image_dataset: {name} must be an integer >= 0; got {value!r}")
    shuffle = training if shuffle is None else bool(shuffle)
    drop_remainder = training if drop_remainder is None else bool(drop_remainder)

    if images is None:
        if list_file is not None:
            images = read_image_list(list_file, root, num_classes=num_classes, label_offset=label_offset)
        elif root is not None:
            images = read_image_folder(root)
        else:
            raise ValueError("image_dataset: give list_file (with root), root (a class-per-folder tree) or images")
    if check:
        check_images(images, image_size=size, fit=fit, resize_to=resize, channels=channels)
    count = len(images)
    batches = count // batch_size if drop_remainder else math.ceil(count / batch_size)
    if batches == 0:
        raise ValueError(f"image_dataset: {count} images make no full batch of {batch_size} "
                         f"(lower batch_size or pass drop_remainder=False)")

    paths = tf.constant([images.full_path(i) for i in range(count)])
    labels = tf.constant(images.labels, tf.int32)
    means_t = tf.constant(means)
    scale_t = tf.constant(float(scale), tf.float32)
    seed_t = tf.constant(int(seed), tf.int64)
    random_crop = fit == "random_crop" and training
    flip = bool(mirror) and training
    epoch_counter = tf.Variable(int(start_epoch), dtype=tf.int64, trainable=False, name="image_dataset_epoch")

    def next_epoch(_):
        return epoch_counter.assign_add(1) - 1

    def one_pass(epoch):
        order = tf.range(count, dtype=tf.int64)
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(order, seed=tf.stack([seed_t, epoch]))
        return tf.data.Dataset.from_tensor_slices(order).map(lambda index: (epoch, index))

    def resized(pixels, target):
        out = tf.image.resize(pixels, target, method="bilinear", antialias=False)
        return tf.clip_by_value(tf.round(out), 0.0, 255.0)

    def load(epoch, index):
        data = tf.io.read_file(tf.gather(paths, index))
        pixels = tf.io.decode_image(data, channels=channels, expand_animations=False)
        pixels = tf.cast(pixels, tf.float32)
        pixels.set_shape([None, None, channels])
        if resize is not None:
            pixels = resized(pixels, resize)
        key = tf.random.experimental.stateless_fold_in(tf.stack([seed_t, epoch]), index)
        draws = tf.random.stateless_uniform([3], seed=key)
        if fit == "resize":
            pixels = resized(pixels, size)
        elif fit in ("center_crop", "random_crop"):
            height, width = tf.shape(pixels)[0], tf.shape(pixels)[1]
            spare_h, spare_w = height - size[0], width - size[1]
            if random_crop:  # Caffe: Rand(H - h + 1), Rand(W - w + 1)
                top = tf.minimum(tf.cast(draws[1] * tf.cast(spare_h + 1, tf.float32), tf.int32), spare_h)
                left = tf.minimum(tf.cast(draws[2] * tf.cast(spare_w + 1, tf.float32), tf.int32), spare_w)
            else:  # Caffe: (H - h) / 2, integer division
                top, left = spare_h // 2, spare_w // 2
            pixels = pixels[top:top + size[0], left:left + size[1]]
        if size is not None:
            pixels = tf.ensure_shape(pixels, [size[0], size[1], channels])
        if bgr and channels == 3:
            pixels = pixels[..., ::-1]
        x = (pixels - means_t) * scale_t
        if flip:
            x = tf.cond(draws[0] < 0.5, lambda: x[:, ::-1], lambda: x)
        return tf.cast(x, dtype), tf.gather(labels, index)

    dataset = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).map(next_epoch).flat_map(one_pass)
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches))
    if labels_as_input:
        dataset = dataset.map(lambda x, y: ((x, y), y))
    if prefetch:
        dataset = dataset.prefetch(tf.data.AUTOTUNE)
    return dataset
