"""Input and data layers: model inputs, the data transform, the input contract."""

from __future__ import annotations

import keras

from converters.caffe import shapes
from converters.caffe.fusion import HEAD_TYPE
from converters.caffe.handlers.common import MAX_BLOB_ELEMENTS
from converters.caffe.handlers.face import FlipHandler, LabelSpecificAddHandler, MarginInnerProductHandler
from converters.caffe.handlers.plumbing import ConcatHandler, _concat_axis
from converters.caffe.planner import PlannedLayer
from converters.caffe.registry import Built, Handler, register
from converters.caffe.registry import lookup as registry_lookup
from converters.caffe.shapes import keras_shape

# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------

DATA_LAYER_TYPES = ("Data", "ImageData", "MemoryData", "HDF5Data", "DummyData", "WindowData")


#: Data layers that decode images (so their data are pixels 0..255 before the transform).
_DECODING_DATA_TYPES = ("Data", "ImageData", "WindowData", "MemoryData")


def _caffe_channel_order(shape) -> str:
    """Caffe reads colour images with OpenCV, so a 3-channel image input is BGR; others have no order."""
    return "bgr" if len(shape) == 4 and shape[1] == 3 else "rgb"


def mirror_in_model(plan, blob_id: str) -> bool:
    """Whether the net adds the mirror image itself: a Flip layer (width only) of ``blob_id`` whose output is
    concatenated with ``blob_id`` along the batch axis (the AM-Softmax deploy net's Flip + Concat axis 0).

    Read from the graph (layer handlers and blob ids), not from layer names.
    """
    mirrors = set()
    for layer in plan.layers:
        if isinstance(registry_lookup(layer.type), FlipHandler) and layer.bottoms == [blob_id]:
            p = layer.param.flip_param
            if p.flip_width and not p.flip_height and len(layer.input_shapes[0]) == 4:
                mirrors.update(layer.tops)
    if not mirrors:
        return False
    for layer in plan.layers:
        if isinstance(registry_lookup(layer.type), ConcatHandler) and blob_id in layer.bottoms \
                and mirrors.intersection(layer.bottoms) and _concat_axis(layer) == 0:
            return True
    return False


def _add_input_contract(ctx, layer: PlannedLayer, index: int, tensor, recorded: dict, notes: list):
    """``tensor`` (a model input) through an ``InputContract`` layer: what the prototxt says (``recorded``),
    completed or overridden by the caller's ``input_contract=`` where the prototxt says nothing, and
    ``flip_in_model`` read from the graph. Appends the contract to ``notes``."""
    from keras_margin.input_contract import InputContract

    top = layer.top_names[index]
    contract = dict(recorded, flip_in_model=mirror_in_model(ctx.plan, layer.tops[index]))
    given = getattr(ctx, "input_contract", None)
    if given is not None:
        given = dict(given)
        if "flip_in_model" in given and bool(given["flip_in_model"]) != contract["flip_in_model"]:
            raise layer.error(
                f"input_contract= says flip_in_model={given['flip_in_model']} but the net "
                f"{'does' if contract['flip_in_model'] else 'does not'} concatenate input '{top}' with its Flip "
                "along the batch axis; drop flip_in_model from input_contract= (the converter reads it from the graph)")
        if recorded["pixels"] != "unknown":
            keys = ("pixels", "channel_order", "mean", "scale")
            differs = [key for key in keys if key in given and _as_tuple(given[key]) != _as_tuple(recorded[key])]
            if differs:
                raise layer.error(
                    f"input_contract= gives {', '.join(f'{key}={given[key]!r}' for key in differs)} but the "
                    f"prototxt's data layer already records {', '.join(f'{key}={recorded[key]!r}' for key in differs)} "
                    f"for input '{top}'; drop input_contract= (it is for nets whose prototxt does not say)")
        else:
            given.setdefault("pixels", "normalized")
            given.setdefault("source", "input_contract= given to the Caffe converter")
            contract.update({key: value for key, value in given.items() if key != "flip_in_model"})
    try:
        contract_layer = InputContract(**contract, name=ctx.name(layer, f"{top}_contract" if index else "contract"))
    except (TypeError, ValueError) as error:
        raise layer.error(f"input_contract= is invalid: {error}") from None
    notes.append(f"input '{top}': {contract_layer.describe()}")
    if isinstance(getattr(ctx, "contracts", None), list):
        ctx.contracts.append(contract_layer)
    return contract_layer(tensor)


def _as_tuple(value):
    if isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value) if len(value) != 1 else (float(value[0]),)
    return (float(value),) if isinstance(value, (int, float)) and not isinstance(value, bool) else (value,)


def reads_labels(plan, blob_id: str) -> bool:
    """Whether blob ``blob_id`` is read, and only read, as the label bottom (the second) of layers that take
    class ids (LabelSpecificAdd, MarginInnerProduct in TRAIN): then its model input is int32."""
    readers = [(layer, index) for layer in plan.layers for index, bottom in enumerate(layer.bottoms)
               if bottom == blob_id]
    label_handlers = (LabelSpecificAddHandler, MarginInnerProductHandler)
    return bool(readers) and all(index == 1 and layer.type != HEAD_TYPE
                                 and isinstance(registry_lookup(layer.type), label_handlers)
                                 for layer, index in readers)


def _input_tensor(ctx, layer: PlannedLayer, index: int, shape):
    name = ctx.name_for_blob(layer.top_names[index])
    plan = getattr(ctx, "plan", None)
    if len(shape) <= 2 and plan is not None and reads_labels(plan, layer.tops[index]):
        return keras.Input(shape=keras_shape(shape)[1:], name=name, dtype="int32")  # class ids
    return keras.Input(shape=keras_shape(shape)[1:], name=name)


def _validate_input_shape(layer: PlannedLayer, shape, source: str):
    shape = tuple(shape)
    if not shape:
        raise layer.error(f"{source} gives an empty shape")
    if any(int(dim) < 1 for dim in shape[1:]):
        raise layer.error(f"{source} gives shape {shape}; dimensions must be >= 1")
    if shapes.count(shape[1:]) > MAX_BLOB_ELEMENTS:
        raise layer.error(f"{source} claims {shapes.count(shape[1:])} values per sample; refusing so absurd a size")
    return (None, *(int(dim) for dim in shape[1:]))


@register("Input")
class InputHandler(Handler):
    is_input = True

    def output_shapes(self, layer):
        override = layer.attrs.get("input_shapes", {})
        declared = list(layer.param.input_param.shape)
        if declared and len(declared) not in (1, len(layer.tops)):
            raise layer.error(f"{len(declared)} shapes for {len(layer.tops)} tops; give 1 or one per top")
        out = []
        for index, top in enumerate(layer.top_names):
            if top in override:
                out.append(_validate_input_shape(layer, (None, *override[top]), "input_shape"))
            elif declared:
                dims = declared[0 if len(declared) == 1 else index].dim
                out.append(_validate_input_shape(layer, tuple(dims), f"the shape of input '{top}'"))
            else:
                raise layer.error(
                    f"input '{top}' has no shape in the prototxt; pass input_shape=(C, H, W) "
                    "(CLI: --input-shape C,H,W)"
                )
        return out

    def build(self, ctx, layer, inputs, weights):
        outputs, created, notes = [], [], []
        for index, (top, shape) in enumerate(zip(layer.tops, layer.output_shapes)):
            tensor = _input_tensor(ctx, layer, index, shape) if ctx.needed(top) else None
            if tensor is not None:
                created.append(tensor)
                if len(shape) == 4:  # an image: record what it must be (nothing in the prototxt says)
                    contract = {"pixels": "unknown", "channel_order": _caffe_channel_order(shape),
                                "source": f"Caffe input '{layer.top_names[index]}', which has no data layer"}
                    tensor = _add_input_contract(ctx, layer, index, tensor, contract, notes)
            outputs.append(tensor)
        return Built(outputs, model_inputs=created, notes=notes)


@register(*DATA_LAYER_TYPES)
class DataHandler(Handler):
    """Data layers become model inputs; their transform (mean, scale) becomes a Rescaling step."""

    is_input = True

    def _image_shape(self, layer):
        param, transform = layer.param, layer.param.transform_param
        override = layer.attrs.get("input_shapes", {})
        top = layer.top_names[0]
        if top in override:
            return _validate_input_shape(layer, (None, *override[top]), "input_shape")
        channels = height = width = None
        if param.type == "ImageData":
            channels = 3 if param.image_data_param.is_color else 1
            if param.image_data_param.new_height and param.image_data_param.new_width:
                height, width = param.image_data_param.new_height, param.image_data_param.new_width
        elif param.type == "MemoryData":
            mem = param.memory_data_param
            channels, height, width = mem.channels or None, mem.height or None, mem.width or None
        elif param.type == "DummyData":
            dummy = param.dummy_data_param
            if len(dummy.shape):
                return _validate_input_shape(layer, tuple(dummy.shape[0].dim), "dummy_data_param.shape")
            if len(dummy.channels):
                channels, height, width = dummy.channels[0], dummy.height[0], dummy.width[0]
        if transform.force_gray:
            channels = 1
        elif transform.force_color:
            channels = 3
        elif channels is None and len(transform.mean_value) > 1:
            channels = len(transform.mean_value)
        if transform.crop_size:
            height = width = transform.crop_size
        elif transform.crop_h and transform.crop_w:
            height, width = transform.crop_h, transform.crop_w
        if None in (channels, height, width):
            raise layer.error(
                "the prototxt does not say the input image size (no crop_size or new_height/new_width); "
                "pass input_shape=(C, H, W), e.g. input_shape=(3, 112, 96) (CLI: --input-shape 3,112,96)"
            )
        return _validate_input_shape(layer, (None, channels, height, width), "the data layer")

    def output_shapes(self, layer):
        image = self._image_shape(layer)
        return [image] + [(None,)] * (len(layer.tops) - 1)

    def build(self, ctx, layer, inputs, weights):
        transform, shape = layer.param.transform_param, layer.output_shapes[0]
        raw = _input_tensor(ctx, layer, 0, shape)
        notes = []
        channels = shape[1] if len(shape) == 4 else None
        means = list(transform.mean_value)
        if len(means) not in (0, 1) and len(means) != channels:
            raise layer.error(f"{len(means)} mean_value entries for {channels} channels; give 1 or one per channel")
        scale = float(transform.scale)
        transformed = bool(means) or scale != 1.0
        top = layer.top_names[0]
        if len(shape) == 4:
            source = f"Caffe {layer.type} layer '{layer.name}'" + (" transform_param" if transformed else "")
            contract = {"pixels": "raw", "channel_order": _caffe_channel_order(shape),
                        "mean": means or 0.0, "scale": scale, "source": source}
            if transform.mean_file:  # the model cannot say what the caller must subtract
                contract.update(pixels="unknown", source=f"{source}: mean_file '{transform.mean_file}' is not "
                                                         "applied by the model")
            elif not transformed and layer.type not in _DECODING_DATA_TYPES:
                contract.update(pixels="unknown", source=f"Caffe {layer.type} layer '{layer.name}' (it does not "
                                                         "decode images, so nothing says what its data are)")
            tensor = _add_input_contract(ctx, layer, 0, raw, contract, notes)
        else:
            tensor = raw
        if transformed:
            offset = [-m * scale for m in means] if len(means) > 1 else -(means[0] if means else 0.0) * scale
            tensor = keras.layers.Rescaling(scale=scale, offset=offset, name=ctx.name(layer, "preprocess"))(tensor)
            mean_text = f"{means if len(means) > 1 else means[0] if means else 0}"
            notes.append(f"input '{top}' takes raw pixels; the model applies (x - {mean_text}) * {scale:g}")
        if channels == 3:
            notes.append(f"input '{top}': channels in BGR order (Caffe reads images with OpenCV)")
        if transform.mean_file:
            notes.append(f"layer '{layer.name}': mean_file '{transform.mean_file}' is not applied; "
                         "subtract it yourself")
        if transform.crop_size:
            notes.append(f"input '{layer.top_names[0]}': centre-crop images to {transform.crop_size} before calling")
        outputs = [tensor]
        created = [raw]
        for index in range(1, len(layer.tops)):
            if ctx.needed(layer.tops[index]):
                label = _input_tensor(ctx, layer, index, layer.output_shapes[index])
                created.append(label)
                outputs.append(label)
            else:
                outputs.append(None)
        return Built(outputs, model_inputs=created, notes=notes)
