"""The converter's error and warning types.

Every failure a user can cause (bad file, shape mismatch, unknown layer type) is a ``ConversionError``
that names the file or layer and the fix; the CLI prints it in one line and exits with code 2.
"""

from __future__ import annotations

__all__ = ["ConversionError", "CaffeWarning"]


class ConversionError(Exception):
    """A Caffe model that cannot be converted, with the layer (when there is one) and what to do.

    Attributes:
        layer: name of the Caffe layer at fault, or None for file-level problems.
        layer_type: its Caffe type, when known.

    Example:
    >>> str(ConversionError("has 3 blobs, expected 2", layer="conv1", layer_type="Convolution"))
    "layer 'conv1' (Convolution): has 3 blobs, expected 2"
    """

    def __init__(self, message: str, layer: str | None = None, layer_type: str | None = None):
        self.layer = layer
        self.layer_type = layer_type
        self.detail = message
        if layer is not None:
            kind = f" ({layer_type})" if layer_type else ""
            message = f"layer '{layer}'{kind}: {message}"
        super().__init__(message)


class CaffeWarning(UserWarning):
    """Something converted with a caveat: unknown prototxt fields, weights missing from the caffemodel."""
