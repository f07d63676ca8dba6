"""Build stage, part 2: the built-in handlers, one per Caffe layer type, registered with ``@register``.

Each states Caffe's shape rules for its type, the blobs it expects, and builds Keras layers with the blobs
transformed from Caffe layout (NCHW, (out, in) matrices) to Keras layout (NHWC, (in, out)). One module per
layer family: ``inputs``, ``convolution`` (and pooling, inner product), ``activations``, ``normalization``,
``plumbing`` (blob plumbing), ``face`` (the face-model forks' layers and the fused heads); ``common`` holds
what they share. Importing the package registers them all.
"""

from __future__ import annotations

from converters.caffe.handlers import (  # noqa: F401  (importing registers the handlers)
    activations,
    agents,
    convolution,
    face,
    fork_amsoftmax,
    inputs,
    normalization,
    plumbing,
)
from converters.caffe.handlers.common import (
    MAX_BLOB_ELEMENTS,
    ROW_NORM_EPS,
    dense_kernel,
    filler_initializer,
    from_caffe_order,
    to_caffe_order,
)
from converters.caffe.handlers.inputs import DATA_LAYER_TYPES, mirror_in_model

__all__ = ["filler_initializer", "to_caffe_order", "from_caffe_order", "dense_kernel", "mirror_in_model",
           "DATA_LAYER_TYPES", "ROW_NORM_EPS", "MAX_BLOB_ELEMENTS"]
