"""Caffe weights into keras_margin's native backbones (``keras_margin.models.face_resnet``), by layer name.

Here, not in ``keras_margin.models``, because keras_margin never depends on the converter: the one-way rule
of the package. The native model then gives the converted model's ``fc5`` to float32 rounding.

Example:
>>> from keras_margin.models import face_resnet
>>> model = face_resnet(4, input_shape=(13, 11, 3), embedding_dim=8, widths=(4, 4, 4, 4))
>>> load_caffe_weights(model, model)[:2]   # a converted model (or a .caffemodel path) as the source
['conv1_1', 'relu1_1']
"""

from __future__ import annotations

import os

import keras
import numpy as np

__all__ = ["load_caffe_weights"]


def _caffe_arrays(layer: keras.layers.Layer, blobs: list[np.ndarray]) -> list[np.ndarray]:
    """Caffe-layout blobs -> the Keras layer's weights: conv (O, I, kh, kw) -> (kh, kw, I, O); PReLU (C,) ->
    alpha's shape (1, 1, C). (InnerProduct: ``_dense_from_caffe``.)"""
    if isinstance(layer, keras.layers.Conv2D):
        arrays = [np.transpose(blobs[0], (2, 3, 1, 0))] + list(blobs[1:])
    elif isinstance(layer, keras.layers.PReLU):
        arrays = [np.reshape(blobs[0], tuple(layer.weights[0].shape))]
    else:
        raise ValueError(f"layer '{layer.name}' ({type(layer).__name__}) has no Caffe weight rule")
    return arrays


def _dense_from_caffe(weight: np.ndarray, spatial: tuple[int, ...] | None) -> np.ndarray:
    """InnerProduct (N, C*H*W) over a (H, W, C) map -> Dense kernel (H*W*C, N): row (h, w, c) = column (c, h, w)."""
    if spatial is None:
        return weight.T
    h, w, c = spatial
    return weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)


def _spatial_before(model: keras.Model, dense: keras.layers.Layer) -> tuple[int, ...] | None:
    """(H, W, C) of the map a Flatten feeds into ``dense``, else None (a 2-D input needs no permutation)."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.Flatten) and layer.output is dense.input:
            shape = tuple(layer.input.shape[1:])
            return shape if len(shape) == 3 else None
    return None


def load_caffe_weights(model: keras.Model, source, strict: bool = True) -> list[str]:
    """Copy Caffe weights into a native ``model`` (e.g. ``face_resnet``), matching layers by name.

    ``source`` is a ``.caffemodel`` path (read with ``converters.caffe.read_caffemodel``: blobs by layer name,
    Caffe layout, converted here), a model from ``converters.caffe.load_caffe_model`` (or a ``Conversion``
    from ``convert``), whose same-named layers already hold Keras-layout weights and are copied as they are.
    Every native layer with weights must be found (``strict``; else it is skipped) and shapes must agree.
    Returns the names of the layers loaded.
    """
    keras_source = getattr(source, "model", source)
    if isinstance(keras_source, keras.Model):
        found = {layer.name: layer for layer in keras_source.layers if layer.weights}

        def arrays_for(layer):
            return found[layer.name].get_weights() if layer.name in found else None
    elif isinstance(source, (str, os.PathLike)):
        from converters.caffe.reader import read_caffemodel

        caffemodel = read_caffemodel(source)

        def arrays_for(layer):
            if layer.name not in caffemodel:
                return None
            blobs = caffemodel.blobs(layer.name)
            if isinstance(layer, keras.layers.Dense):
                return [_dense_from_caffe(blobs[0], _spatial_before(model, layer))] + blobs[1:]
            return _caffe_arrays(layer, blobs)
    else:
        raise TypeError(f"source must be a .caffemodel path or a converted Keras model; got {type(source).__name__}")
    loaded = []
    for layer in model.layers:
        if not layer.weights:
            continue
        arrays = arrays_for(layer)
        if arrays is None:
            if strict:
                raise ValueError(f"layer '{layer.name}' of {model.name} has no weights in the source")
            continue
        expected = [tuple(weight.shape) for weight in layer.weights]
        given = [tuple(np.shape(array)) for array in arrays]
        if expected != given:
            raise ValueError(f"layer '{layer.name}': the source's weights have shapes {given}; the model holds "
                             f"{expected}")
        layer.set_weights([np.asarray(array) for array in arrays])
        loaded.append(layer.name)
    return loaded
