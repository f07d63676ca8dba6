"""The pass over an ``ImageList`` before training: every image exists inside the root, is a JPEG / PNG / BMP /
GIF whose header gives a size the pipeline can use, and is not cut short; read from headers and trailers, not
full decodes (``decode=True`` decodes every image as well).
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from keras_margin.data.lists import DataError, ImageList, Problem
from keras_margin.evaluation.images import MAX_PIXELS
from keras_margin.evaluation.images import image_size as _header_size

__all__ = ["FITS", "CheckReport", "check"]

#: How ``image_dataset`` brings an image to ``image_size``: see ``keras_margin.data.image_dataset``.
FITS = ("resize", "center_crop", "random_crop", "none")
_HEADER_BYTES = 1 << 16
_TRAILER_BYTES = 1 << 12


@dataclass(frozen=True)
class CheckReport:
    """What ``check`` found: the number of images and classes, how many images have each (height, width),
    and the problems (empty when all is well)."""

    num_images: int
    num_classes: int
    sizes: dict[tuple[int, int], int]
    problems: tuple[Problem, ...]

    def summary(self) -> str:
        """One line: images, classes, the commonest sizes, problems."""
        common = ", ".join(f"{h}x{w} ({n})" for (h, w), n in Counter(self.sizes).most_common(3))
        return (f"{self.num_images} images, {self.num_classes} classes, sizes {common or '-'}; "
                f"{len(self.problems)} problem(s)")


def _read_header(path: str) -> tuple[bytes, bytes, int]:
    """The first bytes of a file (the whole file for a JPEG whose frame header lies further), its last bytes
    and its size."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(_HEADER_BYTES)
        if head[:2] == b"\xff\xd8" and size > len(head) and _header_size(head) is None:
            head += handle.read()
        if size > len(head):
            handle.seek(max(size - _TRAILER_BYTES, 0))
            tail = handle.read()
        else:
            tail = head[-_TRAILER_BYTES:]
    return head, tail, size


def _truncated(head: bytes, tail: bytes) -> str | None:
    """Why a file looks cut short (a PNG without its IEND chunk, a JPEG without its end-of-image marker)."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail[-64:]:
        return "the PNG is cut short (no IEND chunk at its end)"
    if head[:2] == b"\xff\xd8" and b"\xff\xd9" not in tail:
        return "the JPEG is cut short (no end-of-image marker)"
    return None


def _inspect(images: ImageList, index: int, real_root: str) -> tuple[tuple[int, int] | None, str | None]:
    """(height, width) of one image, or the reason it cannot be used."""
    path = images.full_path(index)
    if not images.allow_outside_root:
        real = os.path.realpath(path)
        if os.path.commonpath([real, real_root]) != real_root:
            return None, f"{images.paths[index]} resolves to {real}, outside the root folder {real_root}"
    if not os.path.isfile(path):
        return None, f"missing image {images.paths[index]} (looked for {path})"
    try:
        head, tail, size = _read_header(path)
    except OSError as error:
        return None, f"cannot read {path}: {error.strerror or error}"
    if size == 0:
        return None, f"{images.paths[index]} is an empty file"
    found = _header_size(head)
    if found is None:
        return None, f"{images.paths[index]} is not a JPEG, PNG, BMP or GIF image, or its header is cut short"
    if found[0] < 1 or found[1] < 1:
        return None, f"{images.paths[index]}: the header gives a size of {found[0]} x {found[1]} pixels"
    if found[0] * found[1] > MAX_PIXELS:
        return None, (f"{images.paths[index]} is {found[0]} x {found[1]} pixels, more than the {MAX_PIXELS:,} "
                      f"decoded at most")
    reason = _truncated(head, tail)
    if reason is not None:
        return None, f"{images.paths[index]}: {reason}"
    return found, None


def _decode(path: str, channels: int) -> str | None:
    """Why TensorFlow cannot decode a file (None when it can)."""
    import tensorflow as tf

    try:
        tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as error:
        text = str(error).strip().splitlines()
        return f"cannot decode {path}: {text[0] if text else type(error).__name__}"
    return None


def check(images: ImageList, *, image_size: tuple[int, int] | None = None, fit: str = "resize",
          resize_to: tuple[int, int] | None = None, decode: bool = False, channels: int = 3,
          workers: int = 8, raise_errors: bool = True) -> CheckReport:
    """Check every image of ``images`` before training, from its header and last bytes.

    Refused, each named by ``list_file:line``: a path resolving (symlinks followed) outside the root; a missing
    or empty file; a file that is not JPEG / PNG / BMP / GIF or whose header is cut short; more than
    ``MAX_PIXELS`` pixels; a PNG or JPEG cut short (no IEND chunk / end-of-image marker); with
    ``fit="center_crop"`` or ``"random_crop"`` an image (after ``resize_to``) smaller than ``image_size``; with
    ``fit="none"`` an image whose size is not ``image_size`` (or, without it, not the first image's size).

    Args:
        images: from ``read_image_list`` or ``read_image_folder``.
        image_size: (height, width) the pipeline produces. Defaults to None.
        fit: as ``image_dataset``'s. Defaults to "resize".
        resize_to: as ``image_dataset``'s (Caffe's new_height / new_width). Defaults to None.
        decode: also decode every image fully (slow; finds corrupt pixel data). Defaults to False.
        channels: for ``decode``. Defaults to 3.
        workers: threads reading files. Defaults to 8.
        raise_errors: raise ``DataError`` when a problem is found. Defaults to True.

    Returns:
        CheckReport.

    Example:
    >>> import tempfile, os, numpy as np, tensorflow as tf
    >>> from keras_margin.data import read_image_list
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     tf.io.write_file(os.path.join(tmp, "a.png"), tf.io.encode_png(np.zeros((8, 6, 3), np.uint8)))
    ...     with open(os.path.join(tmp, "list.txt"), "w") as handle:
    ...         _ = handle.write("a.png 0\\nb.png 0\\n")
    ...     report = check(read_image_list(os.path.join(tmp, "list.txt")), raise_errors=False)
    >>> report.sizes, [p.message for p in report.problems]
    ({(8, 6): 1}, ['missing image b.png (looked for ...b.png)'])
    """
    if fit not in FITS:
        raise ValueError(f"check: fit must be one of {FITS}; got {fit!r}")
    real_root = os.path.realpath(images.root)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = list(pool.map(lambda i: _inspect(images, i, real_root), range(len(images))))
    problems: list[Problem] = []
    sizes: Counter = Counter()
    first: tuple[int, int] | None = None
    for index, (size, reason) in enumerate(found):
        if reason is not None:
            problems.append(Problem(images.where(index), reason))
            continue
        sizes[size] += 1
        after = tuple(resize_to) if resize_to is not None else size
        if fit in ("center_crop", "random_crop") and image_size is not None \
                and (after[0] < image_size[0] or after[1] < image_size[1]):
            problems.append(Problem(images.where(index), f"{images.paths[index]} is {after[0]} x {after[1]} pixels"
                                    f"{' after resize_to' if resize_to is not None else ''}, smaller than the "
                                    f"{image_size[0]} x {image_size[1]} crop"))
        elif fit == "none":
            want = tuple(image_size) if image_size is not None else first
            if want is not None and after != want:
                problems.append(Problem(images.where(index), f"{images.paths[index]} is {after[0]} x {after[1]} "
                                        f"pixels, not {want[0]} x {want[1]} (fit='none' does not resize; use "
                                        f"fit='resize' or 'center_crop')"))
            first = first or after
    if decode:
        bad = {i for i, (_, reason) in enumerate(found) if reason is not None}
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            decoded = list(pool.map(lambda i: None if i in bad else _decode(images.full_path(i), channels),
                                    range(len(images))))
        problems.extend(Problem(images.where(i), reason) for i, reason in enumerate(decoded) if reason is not None)
    report = CheckReport(num_images=len(images), num_classes=images.num_classes, sizes=dict(sizes),
                         problems=tuple(problems))
    if problems and raise_errors:
        raise DataError(problems, f"{images.source}: {len(problems)} of {len(images)} images cannot be used")
    return report
