"""Writing binary .caffemodel files through the schema: for tests, benchmarks and round trips.

It streams one layer at a time (a layer's blobs are encoded straight from NumPy), in the current ``layer``
or legacy V1 ``layers`` format, with packed, unpacked or double-precision blob data and N-D or legacy dims.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from converters.caffe import schema

__all__ = ["encode_blob", "write_caffemodel"]

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
