"""Helpers every handler family shares: fillers, NCHW/NHWC conversion, geometry checks, dense kernels."""

from __future__ import annotations

import math

import keras
import numpy as np

from converters.caffe.fork import FORK_EPS
from converters.caffe.planner import PlannedLayer

#: Caffe's epsilon in the happynear fork's CPU weight-row normalisation (InnerProduct ``normalize: true``).
ROW_NORM_EPS = FORK_EPS
#: Per-sample element limit for any blob: beyond it the prototxt claims an absurd size.
MAX_BLOB_ELEMENTS = 2**31


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def filler_initializer(filler, default) -> keras.initializers.Initializer:
    """The Keras initializer matching a Caffe ``FillerParameter`` (``default`` when the filler is unset)."""
    if filler is None or not filler.ListFields():
        return keras.initializers.get(default)
    kind = filler.type
    fan_mode = {0: "fan_in", 1: "fan_out", 2: "fan_avg"}[filler.variance_norm]
    if kind == "constant":
        return keras.initializers.Constant(filler.value)
    if kind == "gaussian":
        return keras.initializers.RandomNormal(mean=filler.mean, stddev=filler.std)
    if kind == "uniform":
        return keras.initializers.RandomUniform(minval=filler.min, maxval=filler.max)
    if kind == "xavier":  # uniform in +-sqrt(3 / n)
        return keras.initializers.VarianceScaling(1.0, mode=fan_mode, distribution="uniform")
    if kind == "msra":  # gaussian with std sqrt(2 / n)
        return keras.initializers.VarianceScaling(2.0, mode=fan_mode, distribution="untruncated_normal")
    return keras.initializers.get(default)


def _initializer(weights, filler, default):
    """Zeros when the caffemodel supplies the values (drawing random numbers to overwrite them costs memory
    and time on large layers), else the Keras initializer of the prototxt's filler."""
    return "zeros" if weights is not None else filler_initializer(filler, default)


def _keep_filler(keras_layer, attribute: str, filler, default) -> None:
    """Record the prototxt's filler as the layer's initializer (its config), whatever initialised it."""
    setattr(keras_layer, attribute, filler_initializer(filler, default))


def to_caffe_order(ctx, layer: PlannedLayer, tensor, rank: int, suffix: str = "to_nchw") -> keras.KerasTensor:
    """A 4-D NHWC tensor permuted to Caffe's NCHW memory order (other ranks are already in Caffe order)."""
    if rank != 4:
        return tensor
    return keras.layers.Permute((3, 1, 2), name=ctx.name(layer, suffix))(tensor)


def from_caffe_order(ctx, layer: PlannedLayer, tensor, rank: int, suffix: str = "to_nhwc") -> keras.KerasTensor:
    """The inverse of ``to_caffe_order``."""
    if rank != 4:
        return tensor
    return keras.layers.Permute((2, 3, 1), name=ctx.name(layer, suffix))(tensor)


def _known(layer: PlannedLayer, shape, what: str = "input"):
    if any(dim is None for dim in shape[1:]):
        raise layer.error(
            f"needs a known {what} size but got {shape}; pass input_shape=(C, H, W) (CLI: --input-shape C,H,W)"
        )
    return shape


def _pair(layer: PlannedLayer, values, single_h, single_w, name: str, default=None):
    """Caffe's ``kernel_size``/``kernel_h``+``kernel_w`` style parameters as an (h, w) pair."""
    param_h, param_w = single_h, single_w
    if param_h is not None or param_w is not None:
        if param_h is None or param_w is None:
            raise layer.error(f"{name}_h and {name}_w must be given together")
        if len(values):
            raise layer.error(f"give either {name} or {name}_h/{name}_w, not both")
        return int(param_h), int(param_w)
    values = list(values)
    if not values:
        if default is None:
            raise layer.error(f"{name} is required")
        return default
    if len(values) == 1:
        return int(values[0]), int(values[0])
    if len(values) == 2:
        return int(values[0]), int(values[1])
    raise layer.error(f"{len(values)} {name} values: only 2-D layers convert (1 or 2 values)")


def _opt(message, field_name):
    return getattr(message, field_name) if message.HasField(field_name) else None


def _conv_geometry(layer: PlannedLayer, p):
    kernel = _pair(layer, p.kernel_size, _opt(p, "kernel_h"), _opt(p, "kernel_w"), "kernel_size")
    stride = _pair(layer, p.stride, _opt(p, "stride_h"), _opt(p, "stride_w"), "stride", (1, 1))
    pad = _pair(layer, p.pad, _opt(p, "pad_h"), _opt(p, "pad_w"), "pad", (0, 0))
    dilation = _pair(layer, p.dilation, None, None, "dilation", (1, 1))
    if min(kernel) < 1 or min(stride) < 1 or min(dilation) < 1:
        raise layer.error(f"kernel {kernel}, stride {stride} and dilation {dilation} must be >= 1")
    return kernel, stride, pad, dilation


def _spatial_input(layer: PlannedLayer):
    shape = layer.input_shapes[0]
    if len(shape) != 4:
        raise layer.error(f"expects a 4-D (N, C, H, W) bottom; got shape {shape}. Only 2-D layers convert")
    return _known(layer, shape)


def _check_positive(layer: PlannedLayer, shape, what: str):
    if any(dim is not None and dim < 1 for dim in shape):
        raise layer.error(f"{what} would have shape {shape}; every dimension must be >= 1")
    return shape


def _normalize_rows(matrix: np.ndarray, rows: int, eps: float) -> np.ndarray:
    """The stored blob viewed as ``rows`` rows (as the fork's code does, even with transpose), each unit-normed.

    Norms are accumulated in float64; the result is one float32 copy (a 10,516-class head is 21 MB).
    """
    flat = np.asarray(matrix, np.float32).reshape(rows, -1)
    squares = np.einsum("ij,ij->i", flat, flat, dtype=np.float64)
    scale = (1.0 / np.sqrt(squares + eps)).astype(np.float32)
    return (flat * scale[:, None]).reshape(matrix.shape)


def dense_kernel(weight: np.ndarray, bottom_shape, axis: int, transpose: bool) -> np.ndarray:
    """Caffe InnerProduct weight -> Keras Dense kernel (K, N) for the tensor ``build`` feeds to the Dense.

    For a 4-D bottom with axis 1, Keras flattens NHWC in (H, W, C) order, so the K columns (C, H, W order in
    Caffe) are permuted to (H, W, C). One copy at most (fc5 of Face-ResNet-20 is 44 MB).
    """
    if len(bottom_shape) == 4 and axis == 1:
        _, c, h, w = bottom_shape
        if c > 1 and h * w > 1:
            if transpose:  # stored (K, N) = (C, H, W, N)
                return weight.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)
            return weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
    return weight if transpose else weight.T


def _dense_input(ctx, layer, tensor, bottom_shape, axis):
    """The Keras tensor a Dense layer multiplies for a Caffe InnerProduct over axes [axis, end)."""
    rank = len(bottom_shape)
    if rank == 2 and axis == 1:
        return tensor
    if rank == 4 and axis == 1:
        return keras.layers.Flatten(name=ctx.name(layer, "flatten"))(tensor)
    if axis == rank - 1 and rank != 4:
        return tensor
    tensor = to_caffe_order(ctx, layer, tensor, rank)
    lead = bottom_shape[1:axis]
    return keras.layers.Reshape((*lead, math.prod(bottom_shape[axis:])), name=ctx.name(layer, "reshape"))(tensor)
