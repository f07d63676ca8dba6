"""Training data: Caffe ``ImageData`` list files and class-per-folder trees (``read_image_list``,
``read_image_folder``), checked before training (``check``), into a ``tf.data`` pipeline with Caffe's
transform (``image_dataset``); the Caffe importer's ``data.transform_from_prototxt`` reads a Caffe data layer's
settings into its arguments. TensorFlow is
imported only when a dataset is built or images are decoded.

Example:
>>> from keras_margin.data import image_dataset, read_image_list                   # doctest: +SKIP
>>> images = read_image_list("CASIA-WebFace-112X96.txt", root="CASIA-WebFace-112X96")  # doctest: +SKIP
>>> dataset = image_dataset(images=images, image_size=(112, 96), batch_size=256)   # doctest: +SKIP
"""

from keras_margin.data.check import FITS, CheckReport, check
from keras_margin.data.lists import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageList,
    Problem,
    read_image_folder,
    read_image_list,
)
from keras_margin.data.pipeline import image_dataset

__all__ = [
    "FITS",
    "IMAGE_EXTENSIONS",
    "CheckReport",
    "DataError",
    "ImageList",
    "Problem",
    "check",
    "image_dataset",
    "read_image_folder",
    "read_image_list",
]
