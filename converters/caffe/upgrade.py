"""Read stage, part 3: bring a parsed net to the current format, as Caffe's ``upgrade_proto.cpp`` does.

V1 ``layers`` entries become ``layer`` entries (enum type -> type string, V1 field numbers -> V2 fields),
data-layer transform fields move to ``transform_param``, and net-level ``input`` declarations become an
``Input`` layer named "input" at the front.
"""

from __future__ import annotations

from google.protobuf.message import Message

from converters.caffe import schema
from converters.caffe.errors import ConversionError

__all__ = ["upgrade_net", "upgrade_v1_layer"]

_DATA_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def upgrade_v1_layer(v1: Message, path: str = "<net>") -> Message:
    """One V1LayerParameter as a current LayerParameter (BVLC ``UpgradeV1LayerParameter``)."""
    layer = schema.LayerParameter(name=v1.name)
    if not v1.HasField("type") or v1.type == 0:
        raise ConversionError(f"{path}: V1 layer has no type", layer=v1.name or "?")
    layer_type = schema.V1_LAYER_TYPES.get(v1.type)
    if layer_type is None:
        enum_name = v1.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number[v1.type].name
        raise ConversionError(
            f"{path}: V1 layer type {enum_name} ({v1.type}) has no current-format equivalent "
            "(Caffe's own upgrader has none either)", layer=v1.name
        )
    layer.type = layer_type
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    layer.loss_weight.extend(v1.loss_weight)
    layer.blobs.extend(v1.blobs)
    for index in range(max(len(v1.param), len(v1.blobs_lr), len(v1.weight_decay))):
        spec = layer.param.add()
        if index < len(v1.param):
            spec.name = v1.param[index]
        if index < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[index]
        if index < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[index]
    for field_descriptor, value in v1.ListFields():
        if field_descriptor.name.endswith("_param"):
            getattr(layer, field_descriptor.name).CopyFrom(value)
    return layer


def _upgrade_data_transform(layer) -> None:
    """Old data layers kept scale/mean_file/crop_size/mirror in their own param (``UpgradeNetDataTransformation``)."""
    for param_name in ("data_param", "image_data_param"):
        if not layer.HasField(param_name):
            continue
        param = getattr(layer, param_name)
        for name in _DATA_TRANSFORM_FIELDS:
            if param.HasField(name):
                setattr(layer.transform_param, name, getattr(param, name))
                param.ClearField(name)


def upgrade_net(net: Message, path: str = "<net>") -> Message:
    """Return a current-format copy of NetParameter ``net`` (V1 layers and legacy inputs upgraded).

    Example:
    >>> from google.protobuf import text_format
    >>> v1 = text_format.Parse('input: "x" input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 3 '
    ...                        'layers { name: "r" type: RELU bottom: "x" top: "x" }', schema.NetParameter())
    >>> [(l.name, l.type) for l in upgrade_net(v1).layer]
    [('input', 'Input'), ('r', 'ReLU')]
    """
    if len(net.layer) and len(net.layers):
        raise ConversionError(
            f"{path}: the net has both current 'layer' and V1 'layers' entries, which Caffe refuses; use one format"
        )
    upgraded = schema.NetParameter()
    upgraded.CopyFrom(net)
    upgraded.ClearField("layers")
    upgraded.ClearField("input")
    upgraded.ClearField("input_dim")
    upgraded.ClearField("input_shape")
    if len(net.layers):
        upgraded.ClearField("layer")
        for v1 in net.layers:
            upgraded.layer.append(upgrade_v1_layer(v1, path))
    for layer in upgraded.layer:
        _upgrade_data_transform(layer)

    if len(net.input):
        has_shape, has_dim = len(net.input_shape) > 0, len(net.input_dim) > 0
        if has_shape and len(net.input_shape) != len(net.input):
            raise ConversionError(
                f"{path}: {len(net.input)} net inputs but {len(net.input_shape)} input_shape entries; "
                "give one per input"
            )
        if has_dim and len(net.input_dim) != 4 * len(net.input):
            raise ConversionError(
                f"{path}: {len(net.input)} net inputs need {4 * len(net.input)} input_dim values (N, C, H, W each); "
                f"found {len(net.input_dim)}"
            )
        input_layer = schema.LayerParameter(name="input", type="Input")
        for index, name in enumerate(net.input):
            input_layer.top.append(name)
            if has_shape:
                input_layer.input_param.shape.add().CopyFrom(net.input_shape[index])
            elif has_dim:
                input_layer.input_param.shape.add().dim.extend(net.input_dim[4 * index: 4 * index + 4])
        layers = [input_layer, *upgraded.layer]
        upgraded.ClearField("layer")
        upgraded.layer.extend(layers)
    elif len(net.input_dim) or len(net.input_shape):
        raise ConversionError(f"{path}: input_dim/input_shape given without 'input' names")
    return upgraded
