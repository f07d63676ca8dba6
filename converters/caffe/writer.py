"""Writing binary .caffemodel files through the schema: for tests, benchmarks and round trips.

It streams one layer at a time (a layer's blobs are encoded straight from NumPy), in the current ``layer``
or legacy V1 ``layers`` format, with packed, unpacked or double-precision blob data and N-D or legacy dims.
It also draws a net's initial weights from its prototxt fillers, in Caffe layout (``filler_blobs``), so a
net converted without a caffemodel can still be checked against a reference that needs one.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np

from converters.caffe import schema

if TYPE_CHECKING:  # pragma: no cover
    from converters.caffe.planner import Plan

__all__ = ["encode_blob", "write_caffemodel", "filler_blobs", "write_filler_caffemodel"]

_V1_TYPE_NUMBERS = {name: number for number, name in schema.V1_LAYER_TYPES.items()}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_blob(array: np.ndarray, encoding: str = "packed", legacy_dims: bool = False) -> bytes:
    """Serialized ``BlobProto`` of ``array`` (C order, as Caffe stores blobs).

    Args:
        encoding: "packed" (what Caffe writes), "unpacked" (one tag per float, also valid protobuf) or
            "double" (``double_data``, a net saved with Dtype=double).
        legacy_dims: write num/channels/height/width (right-aligned, up to 4-D) instead of ``shape``.
    """
    array = np.asarray(array)
    blob = schema.BlobProto()
    if legacy_dims:
        if array.ndim > 4:
            raise ValueError("legacy dims hold at most 4 axes")
        dims = (1,) * (4 - array.ndim) + array.shape
        blob.num, blob.channels, blob.height, blob.width = dims
    else:
        blob.shape.dim.extend(array.shape)
    head = blob.SerializeToString()
    if encoding == "packed":
        payload = np.ascontiguousarray(array, dtype="<f4").tobytes()
        return head + _length_delimited(5, payload)
    if encoding == "double":
        payload = np.ascontiguousarray(array, dtype="<f8").tobytes()
        return head + _length_delimited(8, payload)
    if encoding == "unpacked":
        values = np.ascontiguousarray(array, dtype="<f4").reshape(-1).view(np.uint8).reshape(-1, 4)
        tagged = np.empty((values.shape[0], 5), dtype=np.uint8)
        tagged[:, 0] = 5 << 3 | 5  # field 5, wire type fixed32
        tagged[:, 1:] = values
        return head + tagged.tobytes()
    raise ValueError(f"encoding must be 'packed', 'unpacked' or 'double'; got {encoding!r}")


LayerEntry = tuple  # (name, type, blobs) or (LayerParameter / V1LayerParameter message, blobs)


def write_caffemodel(path: str | os.PathLike, layers: Iterable[LayerEntry] | object,
                     blobs: Mapping[str, Sequence[np.ndarray]] | None = None, *, v1: bool = False,
                     encoding: str = "packed", legacy_dims: bool = False, name: str = "") -> int:
    """Write a caffemodel and return its size in bytes.

    ``layers`` is either a ``NetParameter`` (its ``layer`` or, with ``v1``, ``layers`` entries are written
    with the arrays of ``blobs[layer name]``), or an iterable of ``(name, type, [arrays])`` tuples.

    Example:
    >>> import tempfile, os, numpy as np
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     write_caffemodel(os.path.join(tmp, "w.caffemodel"),
    ...                      [("conv1", "Convolution", [np.zeros((4, 3, 3, 3)), np.zeros(4)])]) > 0
    True
    """
    blobs = dict(blobs or {})
    if isinstance(layers, schema.NetParameter):
        name = name or layers.name
        source = layers.layers if v1 else layers.layer
        entries = [(message, blobs.get(message.name, [])) for message in source]
    else:
        entries = []
        for entry in layers:
            layer_name, layer_type, arrays = entry
            if v1:
                if layer_type not in _V1_TYPE_NUMBERS:
                    raise ValueError(f"type {layer_type!r} has no V1 enum value")
                message = schema.V1LayerParameter(name=layer_name, type=_V1_TYPE_NUMBERS[layer_type])
            else:
                message = schema.LayerParameter(name=layer_name, type=layer_type)
            entries.append((message, arrays))
    field_number, blob_field = (2, 6) if v1 else (100, 7)
    written = 0
    with open(path, "wb") as handle:
        if name:
            written += handle.write(_length_delimited(1, name.encode()))
        for message, arrays in entries:
            bare = type(message)()
            bare.CopyFrom(message)
            bare.ClearField("blobs")
            body = [bare.SerializeToString()]
            body.extend(_length_delimited(blob_field, encode_blob(array, encoding, legacy_dims)) for array in arrays)
            payload = b"".join(body)
            written += handle.write(_length_delimited(field_number, payload))
    return written


# ----------------------------------------------------------------------------------------------------
# Initial weights from the prototxt fillers
# ----------------------------------------------------------------------------------------------------

# Where each layer type keeps its blobs' fillers, and what the converter uses when one is unset ("glorot":
# Keras' glorot_uniform, the converter's default weight initializer; a number: that constant).
_FILLERS: dict[str, tuple[str, list[tuple[str, object]]]] = {
    "Convolution": ("convolution_param", [("weight_filler", "glorot"), ("bias_filler", 0.0)]),
    "Deconvolution": ("convolution_param", [("weight_filler", "glorot"), ("bias_filler", 0.0)]),
    "InnerProduct": ("inner_product_param", [("weight_filler", "glorot"), ("bias_filler", 0.0)]),
    "MarginInnerProduct": ("margin_inner_product_param", [("weight_filler", "glorot")]),
    "PReLU": ("prelu_param", [("filler", 0.25)]),
    "Scale": ("scale_param", [("filler", 1.0), ("bias_filler", 0.0)]),
    "Bias": ("bias_param", [("filler", 0.0)]),
    "BatchNorm": ("batch_norm_param", [("", 0.0), ("", 1.0), ("", 1.0)]),  # mean 0, variance 1, factor 1
    # happynear fork layers
    "GlobalLSEMargin": ("scale_param", [("filler", 30.0), ("", 0.0)]),  # LayerSetUp: s = 30 unless filler; m = 0
    "ChannelScale": ("channel_scale_param", [("", -1.0)]),  # the global_scale blob starts at -1
    "InnerDistance": ("inner_distance_param", [("weight_filler", "glorot"), ("bias_filler", 0.0)]),
    "Parameter": ("parameter_param", [("blob_filler", "glorot")]),
}


def _fans(shape: tuple) -> tuple[int, int]:
    """Caffe's fans (filler.hpp): fan_in = count / shape[0], fan_out = count / shape[1]."""
    total = math.prod(shape)
    fan_in = total // shape[0] if shape and shape[0] else total
    fan_out = total // shape[1] if len(shape) > 1 and shape[1] else total
    return max(fan_in, 1), max(fan_out, 1)


def _fill(filler, default, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """One blob drawn as Caffe's ``GetFiller(filler)`` would (filler.hpp), or the converter's default."""
    shape = tuple(int(dim) for dim in shape)
    if filler is None or not filler.ListFields():
        if default == "glorot":
            fan_in, fan_out = _fans(shape)
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            return rng.uniform(-limit, limit, shape).astype(np.float32)
        return np.full(shape, float(default), np.float32)
    kind = filler.type
    if kind == "constant":
        return np.full(shape, filler.value, np.float32)
    if kind == "uniform":
        return rng.uniform(filler.min, filler.max, shape).astype(np.float32)
    if kind == "gaussian":
        return rng.normal(filler.mean, filler.std, shape).astype(np.float32)
    if kind in ("xavier", "msra"):
        fan_in, fan_out = _fans(shape)
        n = {0: fan_in, 1: fan_out}.get(filler.variance_norm, (fan_in + fan_out) / 2.0)
        if kind == "xavier":
            limit = math.sqrt(3.0 / n)
            return rng.uniform(-limit, limit, shape).astype(np.float32)
        return rng.normal(0.0, math.sqrt(2.0 / n), shape).astype(np.float32)
    if kind == "gaussian_unitball":  # happynear's filler: N(0, 1) rows, each scaled to unit L2 norm
        values = rng.normal(0.0, 1.0, shape)
        rows = values.reshape(shape[0] if shape else 1, -1)
        return (rows / np.sqrt((rows * rows).sum(axis=1, keepdims=True))).reshape(shape).astype(np.float32)
    if kind == "positive_unitball":
        values = rng.uniform(0.0, 1.0, shape)
        rows = values.reshape(shape[0] if shape else 1, -1)
        return (rows / rows.sum(axis=1, keepdims=True)).reshape(shape).astype(np.float32)
    if kind == "bilinear" and len(shape) == 4:
        f = math.ceil(shape[3] / 2.0)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        y, x = np.meshgrid(np.arange(shape[2]), np.arange(shape[3]), indexing="ij")
        kernel = (1 - np.abs(x / f - c)) * (1 - np.abs(y / f - c))
        return np.broadcast_to(kernel, shape).astype(np.float32)
    raise ValueError(f"filler type {kind!r} is not one Caffe defines (constant, uniform, gaussian, xavier, msra, "
                     "positive_unitball, bilinear; happynear's gaussian_unitball)")


def filler_blobs(plan: Plan, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Initial weights for every layer of ``plan`` with blobs, drawn from its prototxt fillers in Caffe layout.

    Caffe's filler rules (filler.hpp: fans over ``count / shape[0]`` and ``count / shape[1]``); where the
    prototxt gives no filler, the converter's own defaults (glorot uniform weights, zero biases, PReLU 0.25,
    Scale 1, BatchNorm mean 0 / variance 1 / factor 1). Fused layers (e.g. an AM-Softmax head's Scale) are
    included, so the result describes the whole net. Deterministic for a given ``seed``.

    Raises ``ValueError`` (naming the layer) for a filler type Caffe does not define.
    """
    rng = np.random.default_rng(seed)
    by_name = {layer.name: layer for layer in plan.caffe_layers}
    blobs: dict[str, list[np.ndarray]] = {}
    for name, shapes in plan.layer_weight_shapes.items():
        layer = by_name.get(name)
        field_name, specs = _FILLERS.get(layer.type if layer is not None else "", ("", []))
        param = getattr(layer, field_name) if (layer is not None and field_name and hasattr(layer, field_name)) \
            else None
        arrays = []
        for index, shape in enumerate(shapes):
            attribute, default = specs[index] if index < len(specs) else ("", "glorot" if len(shape) > 1 else 0.0)
            filler = getattr(param, attribute) if (param is not None and attribute and param.HasField(attribute)) \
                else None
            try:
                arrays.append(_fill(filler, default, shape, rng))
            except ValueError as error:
                raise ValueError(f"layer '{name}' ({layer.type if layer is not None else '?'}) blob {index}: "
                                 f"{error}") from None
        blobs[name] = arrays
    return blobs


def write_filler_caffemodel(path: str | os.PathLike, plan: Plan, seed: int = 0) -> int:
    """Write ``filler_blobs(plan, seed)`` as a caffemodel (current format); return its size in bytes.

    Example:
    >>> import tempfile, os
    >>> from converters.caffe.planner import plan_net
    >>> from converters.caffe.reader import parse_prototxt, read_caffemodel
    >>> plan = plan_net(parse_prototxt('input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8 '
    ...     'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
    ...     '        convolution_param { num_output: 4 kernel_size: 3 bias_filler { type: "constant" value: 1 } } }'))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = write_filler_caffemodel(os.path.join(tmp, "init.caffemodel"), plan)
    ...     [blob.shape for blob in read_caffemodel(os.path.join(tmp, "init.caffemodel")).blobs("conv")]
    [(4, 3, 3, 3), (4,)]
    """
    by_name = {layer.name: layer.type for layer in plan.caffe_layers}
    blobs = filler_blobs(plan, seed)
    # every layer, as Caffe saves them (a net without blobs still gives a readable caffemodel)
    entries = [(name, kind, blobs.pop(name, [])) for name, kind in by_name.items()]
    entries += [(name, "", arrays) for name, arrays in blobs.items()]
    return write_caffemodel(path, entries, name=plan.name)
