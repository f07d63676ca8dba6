"""Face-ResNet of SphereFace (Liu et al., CVPR 2017) and AM-Softmax (Wang et al., 2018), written natively in Keras.

Stage ``s`` (widths 64, 128, 256, 512) is ``conv{s}_1`` (3x3, stride 2, Caffe pad 1: explicit
``ZeroPadding2D(1)`` + a valid conv, so ``out = floor((in - 1) / 2) + 1`` with the same taps as Caffe) + PReLU,
then ``units`` residual units ``x + PReLU(conv(PReLU(conv(x))))`` without batch normalisation, the sum named
``res{s}_{2k+1}`` as in the prototxts. ``fc5`` is a Dense over the flattened last map (7x6x512 for 112x96).
Residual units per stage come from SphereFace's ``train/code/make_spherenet.py`` (20: [1, 2, 4, 1], 36:
[2, 4, 8, 2], 64: [3, 8, 16, 3]) and the paper's Table 2 (4: [0, 0, 0, 0], 10: [0, 1, 2, 0]).

Flatten order: Keras flattens the NHWC map in (H, W, C) order; Caffe's InnerProduct reads (C, H, W). The native
``fc5`` kernel is the Keras-order one (rows permuted from Caffe's when Caffe weights are loaded, by the Caffe
importer's ``backbones.load_caffe_weights``), so a converted model's ``fc5`` copies over unchanged and the
network stays a plain channels-last Keras model.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

#: Residual units per stage for each SphereFace depth (depth = 4 strided convs + 2 per unit).
FACE_RESNET_UNITS: dict[int, tuple[int, int, int, int]] = {
    4: (0, 0, 0, 0),
    10: (0, 1, 2, 0),
    20: (1, 2, 4, 1),
    36: (2, 4, 8, 2),
    64: (3, 8, 16, 3),
}


def _prelu(name: str) -> keras.layers.PReLU:
    """Caffe PReLU: one slope per channel (shared over H, W), initialised to 0.25 (prelu_layer.cpp's default)."""
    return keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.25), shared_axes=[1, 2], name=name)


def face_resnet(depth: int = 20, input_shape: Sequence[int] = (112, 96, 3), embedding_dim: int = 512,
                widths: Sequence[int] = (64, 128, 256, 512), name: str | None = None) -> keras.Model:
    """The SphereFace / AM-Softmax Face-ResNet (channels-last): image (H, W, 3) -> ``fc5`` embedding.

    Args:
        depth: 4, 10, 20, 36 or 64 (SphereFace's definitions; ``FACE_RESNET_UNITS``).
        input_shape: (H, W, C); (112, 96, 3) as both papers.
        embedding_dim: width of ``fc5`` (512 in the papers).
        widths: channels of the four stages; smaller widths make test-sized nets.
        name: the model's name (default ``face_resnet{depth}``).

    Layer names are the Caffe ones (``conv1_1``, ``relu1_1``, ..., ``res1_3``, ``fc5``; helpers
    ``conv{s}_1_pad`` and ``fc5_flatten``). Initialisers follow the prototxts: xavier (Caffe's uniform
    ``sqrt(3 / fan_in)``) for the strided convs and ``fc5``, N(0, 0.01) for the residual convs, zero biases.
    Under a mixed-precision policy ``fc5`` computes in float32, so the embedding is float32.

    Example:
    >>> model = face_resnet(4, input_shape=(16, 16, 3), embedding_dim=8, widths=(4, 4, 8, 8))
    >>> model.output_shape, [layer.name for layer in model.layers][1:4]
    ((None, 8), ['conv1_1_pad', 'conv1_1', 'relu1_1'])
    """
    if depth not in FACE_RESNET_UNITS:
        raise ValueError(f"face_resnet depth must be one of {sorted(FACE_RESNET_UNITS)}; got {depth!r}")
    if len(widths) != 4:
        raise ValueError(f"widths must give the 4 stages' channels; got {tuple(widths)}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C) (channels-last); got {tuple(input_shape)}")
    xavier = keras.initializers.VarianceScaling(1.0, "fan_in", "uniform")
    inputs = keras.Input(tuple(input_shape), name="data")
    x = inputs
    for stage, (units, width) in enumerate(zip(FACE_RESNET_UNITS[depth], widths), start=1):
        x = keras.layers.ZeroPadding2D(1, name=f"conv{stage}_1_pad")(x)
        x = keras.layers.Conv2D(width, 3, strides=2, padding="valid", kernel_initializer=xavier,
                                name=f"conv{stage}_1")(x)
        x = _prelu(f"relu{stage}_1")(x)
        for unit in range(units):
            first, second = 2 * unit + 2, 2 * unit + 3
            y = x
            for index in (first, second):  # stride 1, pad 1: "same" pads 1 on each side, as Caffe does
                y = keras.layers.Conv2D(width, 3, padding="same",
                                        kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
                                        name=f"conv{stage}_{index}")(y)
                y = _prelu(f"relu{stage}_{index}")(y)
            x = keras.layers.Add(name=f"res{stage}_{second}")([x, y])
    x = keras.layers.Flatten(name="fc5_flatten")(x)
    outputs = keras.layers.Dense(embedding_dim, kernel_initializer=xavier, dtype="float32", name="fc5")(x)
    return keras.Model(inputs, outputs, name=name or f"face_resnet{depth}")
