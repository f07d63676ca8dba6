"""InsightFace's IResNet (arcface_torch ``backbones/iresnet.py``), written natively in Keras (channels-last).

Stem: conv3x3 (64) - BN - PReLU. Stage widths 64, 128, 256, 512, each starting with stride 2. Block
(``IBasicBlock``): ``BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN`` + shortcut, the shortcut being
``conv1x1(stride) - BN`` in each stage's first block. Head: ``BN - flatten - Dropout - Dense(512) - BN``, the
last BN with its scale fixed at 1 (arcface_torch sets ``features.weight.requires_grad = False``). BN eps 1e-5,
momentum 0.9 (PyTorch's 0.1). Stride-2 3x3 convs use PyTorch's symmetric pad 1 (ZeroPadding2D + valid).

Parameter counts (PyTorch ``sum(p.numel() for p in model.parameters())`` of arcface_torch's iresnet50 /
iresnet100 at 112x112: 43,590,848 and 65,156,160; OpenVINO's model zoo lists 65.132 MParams for the MXNet
LResNet100E-IR it converted): ``IRESNET_PARAMETERS``. The Keras model holds exactly those minus 512 (the
fixed BN scale, which Keras omits: ``scale=False`` computes the same) as trainable weights, plus the BN moving
means and variances (two per BN channel) as non-trainable ones. Flatten is Keras' (H, W, C) order, so PyTorch
``fc`` weights need their columns permuted from (C, H, W) when ported.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

#: Blocks per stage of arcface_torch's iresnet{depth}.
IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}
#: Published PyTorch parameter counts of arcface_torch's iresnet (features.weight included, no BN statistics).
IRESNET_PARAMETERS: dict[int, int] = {50: 43_590_848, 100: 65_156_160}


def _bn(name: str, scale: bool = True, dtype=None) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, scale=scale, name=name, dtype=dtype)


def _conv3x3(x, filters: int, stride: int, name: str, init):
    if stride == 1:
        return keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=init, name=name)(x)
    x = keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
    return keras.layers.Conv2D(filters, 3, strides=stride, padding="valid", use_bias=False, kernel_initializer=init,
                               name=name)(x)


def iresnet(depth: int = 50, input_shape: Sequence[int] = (112, 112, 3), embedding_dim: int = 512,
            dropout: float = 0.0, widths: Sequence[int] = (64, 128, 256, 512), blocks: Sequence[int] | None = None,
            name: str | None = None) -> keras.Model:
    """IResNet-``depth`` (18, 34, 50 or 100): image (H, W, 3) -> ``embedding_dim`` features (the final BN).

    Layer names follow the PyTorch module paths with '_' (``conv1``, ``layer2_0_bn1``,
    ``layer2_0_downsample_0``, ``fc``, ``features``). ``blocks`` overrides the blocks per stage (test-sized
    nets). Convs are initialised N(0, 0.1) as arcface_torch does.
    Under a mixed-precision policy the final BN computes in float32, so the embedding is float32.

    Example:
    >>> model = iresnet(18, input_shape=(32, 32, 3), embedding_dim=8, widths=(4, 4, 8, 8))
    >>> model.output_shape
    (None, 8)
    """
    if depth not in IRESNET_LAYERS:
        raise ValueError(f"iresnet depth must be one of {sorted(IRESNET_LAYERS)}; got {depth!r}")
    blocks = IRESNET_LAYERS[depth] if blocks is None else tuple(blocks)
    if len(widths) != 4 or len(blocks) != 4 or len(input_shape) != 3:
        raise ValueError(f"widths and blocks must have 4 entries and input_shape be (H, W, C); got {widths}, "
                         f"{blocks}, {input_shape}")
    init = keras.initializers.RandomNormal(0.0, 0.1)
    inputs = keras.Input(tuple(input_shape), name="data")
    x = _conv3x3(inputs, widths[0], 1, "conv1", init)
    x = _bn("bn1")(x)
    x = keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.25), shared_axes=[1, 2], name="prelu")(x)
    channels = widths[0]
    for stage, (count, planes) in enumerate(zip(blocks, widths), start=1):
        for block in range(count):
            stride, prefix = (2 if block == 0 else 1), f"layer{stage}_{block}"
            y = _bn(f"{prefix}_bn1")(x)
            y = _conv3x3(y, planes, 1, f"{prefix}_conv1", init)
            y = _bn(f"{prefix}_bn2")(y)
            y = keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.25), shared_axes=[1, 2],
                                   name=f"{prefix}_prelu")(y)
            y = _conv3x3(y, planes, stride, f"{prefix}_conv2", init)
            y = _bn(f"{prefix}_bn3")(y)
            shortcut = x
            if stride != 1 or channels != planes:
                shortcut = keras.layers.Conv2D(planes, 1, strides=stride, use_bias=False, kernel_initializer=init,
                                               name=f"{prefix}_downsample_0")(x)
                shortcut = _bn(f"{prefix}_downsample_1")(shortcut)
            x = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
            channels = planes
    x = _bn("bn2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    x = keras.layers.Dense(embedding_dim, name="fc")(x)
    outputs = _bn("features", scale=False, dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name or f"iresnet{depth}")
