"""What a model's image input must be, recorded in the model itself: the ``InputContract`` layer.

A face model is only usable with the preprocessing it was trained with (channel order, pixel mean and scale,
whether it adds the mirror image's feature itself). ``InputContract`` is an identity layer placed right after
the image input that records this in the model's config, so it travels in the ``.keras`` file;
``keras-margin convert`` writes one into every converted image model, and ``export`` / ``verify`` read it
(``find_input_contract(model)``) to apply what is missing and to warn when a step would be applied twice.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import keras

__all__ = ["InputContract", "PIXELS", "find_input_contract"]

# "raw": the model takes decoded pixels 0..255 and normalizes them itself ((x - mean) * scale inside the model).
# "normalized": the caller applies (x - mean) * scale before calling the model.
# "unknown": nothing says (e.g. a Caffe deploy prototxt without a data layer): the caller must know.
PIXELS = ("raw", "normalized", "unknown")


@keras.saving.register_keras_serializable(package="keras_margin")
class InputContract(keras.layers.Layer):
    """Identity layer recording the preprocessing a model's image input expects.

    Formula (what the caller feeds, from decoded RGB pixels p in 0..255):
    ```
    pixels == "raw":        x = p[..., ::-1] if channel_order == "bgr" else p     (the model normalizes)
    pixels == "normalized": x = (that - mean) * scale
    pixels == "unknown":    not recorded: ask the model's author
    ```

    Args:
        pixels: "raw", "normalized" or "unknown" (see above). Defaults to "unknown".
        channel_order: "rgb" or "bgr" (Caffe models read images with OpenCV: BGR). Defaults to "rgb".
        mean: the pixel mean, one number or one per channel (in the model's channel order). Defaults to 0.0.
        scale: the factor applied after the mean. Defaults to 1.0.
        flip_in_model: True when the model adds the mirror image's feature itself (the AM-Softmax deploy
            net's Flip + Concat), so no ``--flip`` must be applied outside. Defaults to False.
        source: where the contract comes from, for messages (e.g. "Caffe layer 'data' transform_param").
            Defaults to "".

    Input shape:
        Any; typically (batch, height, width, channels).

    Output shape:
        The input's shape: the layer returns its input unchanged.

    Example:
    >>> import numpy as np, keras
    >>> images = keras.Input((112, 96, 3))
    >>> recorded = InputContract("normalized", "bgr", mean=127.5, scale=1 / 128)(images)
    >>> model = keras.Model(images, keras.layers.GlobalAveragePooling2D()(recorded))
    >>> contract = find_input_contract(model)
    >>> contract.pixels, contract.channel_order, contract.mean, contract.scale
    ('normalized', 'bgr', (127.5,), 0.0078125)
    """

    def __init__(self, pixels: str = "unknown", channel_order: str = "rgb", mean: float | Sequence[float] = 0.0,
                 scale: float = 1.0, flip_in_model: bool = False, source: str = "", **kwargs):
        super().__init__(**kwargs)
        owner = "InputContract"
        if pixels not in PIXELS:
            raise ValueError(f"{owner}: `pixels` must be one of {PIXELS}; got {pixels!r}.")
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"{owner}: `channel_order` must be 'rgb' or 'bgr'; got {channel_order!r}.")
        means = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,)
        if not means or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                            for v in means):
            raise ValueError(f"{owner}: `mean` must be a finite number or a list of them; got {mean!r}.")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"{owner}: `scale` must be a finite number > 0; got {scale!r}.")
        if not isinstance(flip_in_model, bool):
            raise ValueError(f"{owner}: `flip_in_model` must be a bool; got {flip_in_model!r}.")
        self.pixels = pixels
        self.channel_order = channel_order
        self.mean = tuple(float(v) for v in means)
        self.scale = float(scale)
        self.flip_in_model = flip_in_model
        self.source = str(source)

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def describe(self) -> str:
        """One line for messages, e.g. ``normalized BGR input, (x - 127.5) * 0.0078125, flip in model``."""
        mean = self.mean[0] if len(self.mean) == 1 else list(self.mean)
        what = {"raw": f"raw {self.channel_order.upper()} pixels 0..255 (the model applies (x - {mean}) * "
                       f"{self.scale:g} itself)",
                "normalized": f"{self.channel_order.upper()} input normalized as (x - {mean}) * {self.scale:g}",
                "unknown": f"{self.channel_order.upper()} input, normalization not recorded"}[self.pixels]
        flip = "; the model adds the mirror image's feature itself" if self.flip_in_model else ""
        source = f" (from {self.source})" if self.source else ""
        return what + flip + source

    def get_config(self):
        return {**super().get_config(), "pixels": self.pixels, "channel_order": self.channel_order,
                "mean": list(self.mean), "scale": self.scale, "flip_in_model": self.flip_in_model,
                "source": self.source}


def find_input_contract(model: keras.Model) -> InputContract | None:
    """The model's ``InputContract`` layer (searched through nested models), or None when it records none.

    Raises:
        ValueError: the model holds more than one contract with different values.
    """
    found: list[InputContract] = []
    stack = [model]
    while stack:
        layer = stack.pop()
        if isinstance(layer, InputContract):
            found.append(layer)
        stack.extend(getattr(layer, "layers", ()))
    distinct = {json.dumps({k: v for k, v in c.get_config().items() if k not in ("name", "trainable", "dtype")},
                           sort_keys=True, default=str) for c in found}
    if len(distinct) > 1:
        raise ValueError(f"model '{model.name}' records {len(found)} different input contracts: "
                         + "; ".join(c.describe() for c in found))
    return found[0] if found else None
