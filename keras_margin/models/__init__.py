"""Face-recognition backbones, channels-last and built from stock Keras layers (any backend, ``.keras``-saveable).

``face_resnet`` (SphereFace / AM-Softmax Face-ResNet; the Caffe importer loads Caffe weights into it),
``iresnet`` (InsightFace's IResNet) and ``mobilefacenet`` (Chen et al. 2018).
"""

from keras_margin.models.face_resnet import FACE_RESNET_UNITS, face_resnet
from keras_margin.models.iresnet import IRESNET_LAYERS, IRESNET_PARAMETERS, iresnet
from keras_margin.models.mobilefacenet import (
    MOBILEFACENET_BOTTLENECKS,
    MOBILEFACENET_COUNTS,
    MOBILEFACENET_PUBLISHED_PARAMETERS,
    mobilefacenet,
)

__all__ = [
    "FACE_RESNET_UNITS",
    "IRESNET_LAYERS",
    "IRESNET_PARAMETERS",
    "MOBILEFACENET_BOTTLENECKS",
    "MOBILEFACENET_COUNTS",
    "MOBILEFACENET_PUBLISHED_PARAMETERS",
    "face_resnet",
    "iresnet",
    "mobilefacenet",
]
