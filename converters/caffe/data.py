"""A Caffe data layer's ``transform_param`` / ``image_data_param`` as ``keras_margin.data.image_dataset`` arguments.

Fields (the fork's ``caffe.proto`` and ``data_transformer.cpp`` / ``image_data_layer.cpp``):
``mean_value`` (one, or one per channel in BGR order) -> mean; ``scale`` -> scale; ``mirror`` -> mirror;
``crop_size`` / ``crop_h`` / ``crop_w`` -> image_size with fit "random_crop" (Caffe crops at random in TRAIN
unless ``center_crop``) or "center_crop"; ``new_height`` / ``new_width`` -> resize_to (or image_size with fit
"resize" when there is no crop); ``is_color`` -> channels; ``source``, ``root_folder``, ``batch_size``,
``shuffle`` -> list_file, root, batch_size, shuffle; the layer's ``include { phase }`` -> training.
Images are always BGR (cv::imread). ``mean_file`` and the fork's augmentations (``erase_ratio``,
``face_transform``, ``balance_class``) are not carried over: a mean_file is refused, the others warned about.
"""

from __future__ import annotations

import warnings

__all__ = ["transform_from_prototxt"]

_PHASES = {0: True, 1: False}  # caffe.Phase: TRAIN = 0, TEST = 1


def _has(message, name: str) -> bool:
    """Whether a field exists in the message's schema and is set."""
    return name in message.DESCRIPTOR.fields_by_name and message.HasField(name)


def transform_from_prototxt(layer) -> dict:
    """``image_dataset`` keyword arguments from a Caffe data layer (a ``LayerParameter`` from the converter's
    reader, e.g. ``read_prototxt(path).net.layer[0]``).

    Returns:
        dict with mean, scale, mirror, bgr, image_size, fit, resize_to, channels and, where the layer says
        them, list_file, root, batch_size, shuffle and training. With neither crop nor new size, image_size is
        None and fit "none" (the files' own size).

    Raises:
        ValueError: for a mean_file, or new_height without new_width.

    Example:
    >>> from converters.caffe.reader import parse_prototxt
    >>> net = parse_prototxt('layer { name: "data" type: "ImageData" top: "data" top: "label" '
    ...                      'include { phase: TRAIN } transform_param { mean_value: 127.5 scale: 0.0078125 '
    ...                      'mirror: true } image_data_param { source: "list.txt" batch_size: 256 shuffle: true '
    ...                      'new_height: 112 new_width: 96 } }').net
    >>> kwargs = transform_from_prototxt(net.layer[0])
    >>> kwargs["mean"], kwargs["scale"], kwargs["image_size"], kwargs["fit"], kwargs["training"]
    (127.5, 0.0078125, (112, 96), 'resize', True)
    """
    name = getattr(layer, "name", "?")
    transform = layer.transform_param
    if _has(transform, "mean_file"):
        raise ValueError(f"data layer '{name}': mean_file ({transform.mean_file}) is not supported; give the mean "
                         f"as mean_value (one, or one per channel in BGR order)")
    means = [float(v) for v in transform.mean_value]
    kwargs: dict = {
        "mean": 0.0 if not means else means[0] if len(means) == 1 else tuple(means),
        "scale": float(transform.scale),
        "mirror": bool(transform.mirror),
        "bgr": True,
    }
    ignored = [field for field in ("erase_ratio",) if _has(transform, field)]
    crop_h = crop_w = int(transform.crop_size) if _has(transform, "crop_size") else 0
    if _has(transform, "crop_h"):
        crop_h = int(transform.crop_h)
    if _has(transform, "crop_w"):
        crop_w = int(transform.crop_w)
    center = bool(_has(transform, "center_crop") and transform.center_crop)
    resize = None
    if layer.HasField("image_data_param"):
        data = layer.image_data_param
        height, width = int(data.new_height), int(data.new_width)
        if (height > 0) != (width > 0):
            raise ValueError(f"data layer '{name}': new_height and new_width must be set together (Caffe: "
                             f"'Current implementation requires new_height and new_width to be set at the same "
                             f"time'); got {height} and {width}")
        resize = (height, width) if height > 0 else None
        kwargs["channels"] = 3 if data.is_color else 1
        if data.source:
            kwargs["list_file"] = data.source
        if data.root_folder:
            kwargs["root"] = data.root_folder
        kwargs["batch_size"] = int(data.batch_size)
        kwargs["shuffle"] = bool(data.shuffle)
        ignored += [field for field in ("face_transform", "balance_class") if _has(data, field)
                    and getattr(data, field)]
    if crop_h or crop_w:
        kwargs.update(image_size=(crop_h, crop_w), fit="center_crop" if center else "random_crop", resize_to=resize)
    elif resize is not None:
        kwargs.update(image_size=resize, fit="resize", resize_to=None)
    else:
        kwargs.update(image_size=None, fit="none", resize_to=None)
    phases = {rule.phase for rule in layer.include if rule.HasField("phase")}
    if len(phases) == 1:
        kwargs["training"] = _PHASES.get(phases.pop(), True)
    if ignored:
        warnings.warn(f"data layer '{name}': {', '.join(ignored)} (fork augmentations) are not carried over",
                      stacklevel=2)
    return kwargs
