"""MobileFaceNet (Chen et al., "MobileFaceNets", CCBR 2018, arXiv:1804.07573, Table 1), natively in Keras.

112x112x3 -> conv3x3/2 (64) -> depthwise conv3x3 (64) -> bottlenecks (expansion t, channels c, repeats n,
stride s) (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1) -> conv1x1 (512) ->
linear GDConv 7x7 (depthwise, 512) -> linear conv1x1 (128). Every conv is followed by BN; the non-linear ones
by PReLU (the paper uses PReLU throughout); the bottleneck's projection and the last two layers are linear.
A bottleneck adds its input when its stride is 1 and its width unchanged (MobileNetV2's rule).

Parameters: the paper (Table 2/3) gives "0.99M" (rounded; no exact figure is published). This network has
``MOBILEFACENET_COUNTS``: 976,000 convolution weights, 7,552 PReLU slopes, 19,584 BN scales and offsets
(1,003,136 trainable in all) and 19,584 BN moving statistics (non-trainable). The paper's 0.99M lies between
the conv weights alone (0.976M) and conv + PReLU + BN (1.003M); the count it used is not stated.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

#: (expansion, channels, repeats, stride) of each bottleneck group, Table 1 of the paper.
MOBILEFACENET_BOTTLENECKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))
#: Exact weight counts of ``mobilefacenet()`` at 112x112 with a 128-d embedding, by kind.
MOBILEFACENET_COUNTS = {"conv": 976_000, "prelu": 7_552, "bn_affine": 19_584, "bn_statistics": 19_584}
#: The figure the paper publishes (rounded to 0.01M).
MOBILEFACENET_PUBLISHED_PARAMETERS = 0.99e6


def _bn(name: str, dtype=None):
    return keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name=name, dtype=dtype)


def _prelu(name: str):
    return keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.25), shared_axes=[1, 2], name=name)


def _padded(x, stride: int, name: str):
    """Symmetric pad 1 before a strided 3x3 (as Caffe / PyTorch pad), else the conv uses "same" itself."""
    return keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x) if stride != 1 else x


def mobilefacenet(input_shape: Sequence[int] = (112, 112, 3), embedding_dim: int = 128,
                  bottlenecks: Sequence[tuple[int, int, int, int]] = MOBILEFACENET_BOTTLENECKS,
                  width: int = 64, name: str = "mobilefacenet") -> keras.Model:
    """MobileFaceNet: image (H, W, 3) -> ``embedding_dim`` embedding (the last linear 1x1 conv + BN, flattened).

    The GDConv kernel covers the whole last map (7x7 for 112x112). Under a mixed-precision policy the final BN
    computes in float32, so the embedding is float32.

    Example:
    >>> mobilefacenet(input_shape=(32, 32, 3), embedding_dim=16).output_shape
    (None, 16)
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C) (channels-last); got {tuple(input_shape)}")
    conv = {"use_bias": False, "kernel_initializer": "he_normal"}
    inputs = keras.Input(tuple(input_shape), name="data")
    x = _padded(inputs, 2, "conv1")
    x = keras.layers.Conv2D(width, 3, strides=2, name="conv1", **conv)(x)
    x = _prelu("conv1_prelu")(_bn("conv1_bn")(x))
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw_conv1", depthwise_initializer="he_normal",
                                     use_bias=False)(x)
    x = _prelu("dw_conv1_prelu")(_bn("dw_conv1_bn")(x))
    channels = width
    for group, (t, c, n, s) in enumerate(bottlenecks, start=1):
        for repeat in range(n):
            stride, prefix = (s if repeat == 0 else 1), f"bottleneck{group}_{repeat}"
            y = keras.layers.Conv2D(channels * t, 1, name=f"{prefix}_expand", **conv)(x)
            y = _prelu(f"{prefix}_expand_prelu")(_bn(f"{prefix}_expand_bn")(y))
            y = _padded(y, stride, f"{prefix}_dw")
            y = keras.layers.DepthwiseConv2D(3, strides=stride, padding="same" if stride == 1 else "valid",
                                             use_bias=False, depthwise_initializer="he_normal",
                                             name=f"{prefix}_dw")(y)
            y = _prelu(f"{prefix}_dw_prelu")(_bn(f"{prefix}_dw_bn")(y))
            y = keras.layers.Conv2D(c, 1, name=f"{prefix}_project", **conv)(y)
            y = _bn(f"{prefix}_project_bn")(y)
            if stride == 1 and channels == c:
                y = keras.layers.Add(name=f"{prefix}_add")([x, y])
            x, channels = y, c
    x = keras.layers.Conv2D(512, 1, name="conv_sep", **conv)(x)
    x = _prelu("conv_sep_prelu")(_bn("conv_sep_bn")(x))
    x = keras.layers.DepthwiseConv2D(tuple(x.shape[1:3]), use_bias=False, depthwise_initializer="he_normal",
                                     name="gdconv")(x)
    x = _bn("gdconv_bn")(x)
    x = keras.layers.Conv2D(embedding_dim, 1, name="linear_conv", **conv)(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = _bn("embedding", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)
