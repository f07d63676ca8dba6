"""Caffe's shape arithmetic and the NCHW <-> NHWC axis map, as pure functions (no Keras, no protobuf).

Shapes are Caffe-ordered tuples whose first entry (the batch) is ``None``; a 4-D blob is held in Keras
as NHWC, every other rank in Caffe's own order (see ``keras_axis``).
"""

from __future__ import annotations

from typing import Sequence

__all__ = [
    "Shape",
    "canonical_axis",
    "keras_axis",
    "keras_shape",
    "count",
    "conv_output_size",
    "deconv_output_size",
    "pool_output_size",
    "ave_pool_divisors",
]

Shape = tuple  # tuple[int | None, ...]; entry 0 is the batch (None)

# Caffe axis -> Keras axis for a 4-D blob (N, C, H, W) held as (N, H, W, C).
_NCHW_TO_NHWC = {0: 0, 1: 3, 2: 1, 3: 2}


def canonical_axis(axis: int, rank: int) -> int:
    """Caffe's ``Blob::CanonicalAxisIndex``: a negative axis counts from the end; out of range raises."""
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is out of range for a {rank}-D blob")
    return axis + rank if axis < 0 else axis


def keras_axis(axis: int, rank: int) -> int:
    """The Keras axis holding Caffe axis ``axis`` of a ``rank``-D blob (4-D blobs are NHWC in Keras)."""
    axis = canonical_axis(axis, rank)
    return _NCHW_TO_NHWC[axis] if rank == 4 else axis


def keras_shape(shape: Sequence) -> tuple:
    """The Keras shape of a Caffe-ordered shape: (N, C, H, W) -> (N, H, W, C); other ranks unchanged."""
    shape = tuple(shape)
    return (shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else shape


def count(shape: Sequence) -> int:
    """Number of elements of ``shape`` (Python int, no overflow); ``None`` entries are not allowed."""
    total = 1
    for dim in shape:
        total *= int(dim)
    return total


def conv_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    """Convolution output length: ``(size + 2 pad - (dilation (kernel - 1) + 1)) // stride + 1`` (floor)."""
    extent = dilation * (kernel - 1) + 1
    return (size + 2 * pad - extent) // stride + 1


def deconv_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    """Deconvolution output length: ``stride (size - 1) + dilation (kernel - 1) + 1 - 2 pad``."""
    return stride * (size - 1) + dilation * (kernel - 1) + 1 - 2 * pad


def pool_output_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool = True,
                     any_pad: bool | None = None) -> int:
    """Pooling output length, Caffe's rule (``pooling_layer.cpp`` Reshape).

    ``ceil((size + 2 pad - kernel) / stride) + 1`` (floor when ``ceil_mode`` is False); then, when the layer
    has any padding (``pad_h || pad_w``, given as ``any_pad``; defaults to ``pad > 0``), the last window is
    dropped if it would start at or beyond ``size + pad``.
    """
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if any_pad is None:
        any_pad = pad > 0
    if any_pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def ave_pool_divisors(size: int, kernel: int, stride: int, pad: int, out: int) -> list[int]:
    """Per-output window lengths that Caffe's AVE pooling divides by along one axis.

    ``hstart = i stride - pad``, ``hend = min(hstart + kernel, size + pad)``; the divisor is
    ``hend - hstart``, taken before clipping the window to the image: the left/top zero padding counts,
    the part of a ceil-mode window beyond ``size + pad`` does not. The 2-D divisor is the outer product.
    """
    divisors = []
    for index in range(out):
        start = index * stride - pad
        end = min(start + kernel, size + pad)
        divisors.append(end - start)
    return divisors

