"""Build stage, part 2: the built-in handlers, one per Caffe layer type, registered with ``@register``.

Each states Caffe's shape rules for its type, the blobs it expects, and builds Keras layers with the
blobs transformed from Caffe layout (NCHW, (out, in) matrices) to Keras layout (NHWC, (in, out)).
"""

from __future__ import annotations

import math

import keras
import numpy as np

from converters.caffe import shapes
from converters.caffe.layers import (
    CaffeLRN,
    CaffeNormalize,
    CaffePooling2D,
    CaffePower,
    CaffeScale,
    CaffeSlice,
    Flip,
    Subsample2D,
)
from converters.caffe.registry import Built, Handler, PlannedLayer, register
from converters.caffe.registry import lookup as registry_lookup
from converters.caffe.shapes import canonical_axis, keras_axis, keras_shape

__all__ = ["filler_initializer", "to_caffe_order", "from_caffe_order", "DATA_LAYER_TYPES"]

#: Caffe's epsilon in the happynear fork's CPU weight-row normalisation (InnerProduct ``normalize: true``).
ROW_NORM_EPS = 1e-6
#: Per-sample element limit for any blob: beyond it the prototxt claims an absurd size.
MAX_BLOB_ELEMENTS = 2**31


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def filler_initializer(filler, default) -> keras.initializers.Initializer:
    """The Keras initializer matching a Caffe ``FillerParameter`` (``default`` when the filler is unset)."""
    if filler is None or not filler.ListFields():
        return keras.initializers.get(default)
    kind = filler.type
    fan_mode = {0: "fan_in", 1: "fan_out", 2: "fan_avg"}[filler.variance_norm]
    if kind == "constant":
        return keras.initializers.Constant(filler.value)
    if kind == "gaussian":
        return keras.initializers.RandomNormal(mean=filler.mean, stddev=filler.std)
    if kind == "uniform":
        return keras.initializers.RandomUniform(minval=filler.min, maxval=filler.max)
    if kind == "xavier":  # uniform in +-sqrt(3 / n)
        return keras.initializers.VarianceScaling(1.0, mode=fan_mode, distribution="uniform")
    if kind == "msra":  # gaussian with std sqrt(2 / n)
        return keras.initializers.VarianceScaling(2.0, mode=fan_mode, distribution="untruncated_normal")
    return keras.initializers.get(default)


def _initializer(weights, filler, default):
    """Zeros when the caffemodel supplies the values (drawing random numbers to overwrite them costs memory
    and time on large layers), else the Keras initializer of the prototxt's filler."""
    return "zeros" if weights is not None else filler_initializer(filler, default)


def _keep_filler(keras_layer, attribute: str, filler, default) -> None:
    """Record the prototxt's filler as the layer's initializer (its config), whatever initialised it."""
    setattr(keras_layer, attribute, filler_initializer(filler, default))


def to_caffe_order(ctx, layer: PlannedLayer, tensor, rank: int, suffix: str = "to_nchw") -> keras.KerasTensor:
    """A 4-D NHWC tensor permuted to Caffe's NCHW memory order (other ranks are already in Caffe order)."""
    if rank != 4:
        return tensor
    return keras.layers.Permute((3, 1, 2), name=ctx.name(layer, suffix))(tensor)


def from_caffe_order(ctx, layer: PlannedLayer, tensor, rank: int, suffix: str = "to_nhwc") -> keras.KerasTensor:
    """The inverse of ``to_caffe_order``."""
    if rank != 4:
        return tensor
    return keras.layers.Permute((2, 3, 1), name=ctx.name(layer, suffix))(tensor)


def _known(layer: PlannedLayer, shape, what: str = "input"):
    if any(dim is None for dim in shape[1:]):
        raise layer.error(
            f"needs a known {what} size but got {shape}; pass input_shape=(C, H, W) (CLI: --input-shape C,H,W)"
        )
    return shape


def _pair(layer: PlannedLayer, values, single_h, single_w, name: str, default=None):
    """Caffe's ``kernel_size``/``kernel_h``+``kernel_w`` style parameters as an (h, w) pair."""
    param_h, param_w = single_h, single_w
    if param_h is not None or param_w is not None:
        if param_h is None or param_w is None:
            raise layer.error(f"{name}_h and {name}_w must be given together")
        if len(values):
            raise layer.error(f"give either {name} or {name}_h/{name}_w, not both")
        return int(param_h), int(param_w)
    values = list(values)
    if not values:
        if default is None:
            raise layer.error(f"{name} is required")
        return default
    if len(values) == 1:
        return int(values[0]), int(values[0])
    if len(values) == 2:
        return int(values[0]), int(values[1])
    raise layer.error(f"{len(values)} {name} values: only 2-D layers convert (1 or 2 values)")


def _opt(message, field_name):
    return getattr(message, field_name) if message.HasField(field_name) else None


def _conv_geometry(layer: PlannedLayer, p):
    kernel = _pair(layer, p.kernel_size, _opt(p, "kernel_h"), _opt(p, "kernel_w"), "kernel_size")
    stride = _pair(layer, p.stride, _opt(p, "stride_h"), _opt(p, "stride_w"), "stride", (1, 1))
    pad = _pair(layer, p.pad, _opt(p, "pad_h"), _opt(p, "pad_w"), "pad", (0, 0))
    dilation = _pair(layer, p.dilation, None, None, "dilation", (1, 1))
    if min(kernel) < 1 or min(stride) < 1 or min(dilation) < 1:
        raise layer.error(f"kernel {kernel}, stride {stride} and dilation {dilation} must be >= 1")
    return kernel, stride, pad, dilation


def _spatial_input(layer: PlannedLayer):
    shape = layer.input_shapes[0]
    if len(shape) != 4:
        raise layer.error(f"expects a 4-D (N, C, H, W) bottom; got shape {shape}. Only 2-D layers convert")
    return _known(layer, shape)


def _check_positive(layer: PlannedLayer, shape, what: str):
    if any(dim is not None and dim < 1 for dim in shape):
        raise layer.error(f"{what} would have shape {shape}; every dimension must be >= 1")
    return shape


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


def _input_tensor(ctx, layer: PlannedLayer, index: int, shape):
    name = ctx.name_for_blob(layer.top_names[index])
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


# ----------------------------------------------------------------------------------------------------
# Convolution, pooling, inner product
# ----------------------------------------------------------------------------------------------------


@register("Convolution")
class ConvolutionHandler(Handler):
    def _geometry(self, layer):
        p = layer.param.convolution_param
        if canonical_axis(p.axis, len(layer.input_shapes[0])) != 1:
            raise layer.error(f"convolution_param.axis {p.axis} is not the channel axis; only axis 1 converts")
        return _conv_geometry(layer, p)

    def output_shapes(self, layer):
        n, c, h, w = _spatial_input(layer)
        p = layer.param.convolution_param
        kernel, stride, pad, dilation = self._geometry(layer)
        if not p.num_output:
            raise layer.error("convolution_param.num_output is required")
        if c % p.group or p.num_output % p.group:
            raise layer.error(f"group {p.group} must divide both the {c} input and {p.num_output} output channels")
        out = [shapes.conv_output_size(size, k, s, q, d)
               for size, k, s, q, d in zip((h, w), kernel, stride, pad, dilation)]
        return [_check_positive(layer, (n, p.num_output, *out), "the output")] * len(layer.tops)

    def weight_shapes(self, layer):
        p = layer.param.convolution_param
        c = layer.input_shapes[0][1]
        kernel, *_ = self._geometry(layer)
        blobs = [(p.num_output, c // p.group, *kernel)]
        return blobs + [(p.num_output,)] if p.bias_term else blobs

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.convolution_param
        kernel, stride, pad, dilation = self._geometry(layer)
        x = inputs[0]
        symmetric_same = stride == (1, 1) and all(2 * q == d * (k - 1) for q, d, k in zip(pad, dilation, kernel))
        if symmetric_same and any(pad):
            padding = "same"  # stride 1: TF's "same" pads (k-1)/2 on both sides, exactly Caffe's symmetric pad
        else:
            padding = "valid"
            if any(pad):
                x = keras.layers.ZeroPadding2D(pad, name=ctx.name(layer, "pad"))(x)
        subsample = stride if stride != (1, 1) and dilation != (1, 1) else None
        weight_filler = p.weight_filler if p.HasField("weight_filler") else None
        bias_filler = p.bias_filler if p.HasField("bias_filler") else None
        conv = keras.layers.Conv2D(
            p.num_output, kernel, strides=(1, 1) if subsample else stride, padding=padding,
            dilation_rate=dilation, groups=p.group, use_bias=p.bias_term, name=ctx.name(layer),
            kernel_initializer=_initializer(weights, weight_filler, "glorot_uniform"),
            bias_initializer=_initializer(weights, bias_filler, "zeros"),
        )
        y = conv(x)
        _keep_filler(conv, "kernel_initializer", weight_filler, "glorot_uniform")
        _keep_filler(conv, "bias_initializer", bias_filler, "zeros")
        if subsample:  # Keras refuses stride > 1 with dilation > 1: dilate at stride 1, then subsample
            y = Subsample2D(subsample, name=ctx.name(layer, "stride"))(y)
        assign = []
        if weights is not None:
            arrays = [weights[0].transpose(2, 3, 1, 0)]
            if p.bias_term:
                arrays.append(weights[1])
            assign.append((conv, arrays))
        return Built([y] * len(layer.tops), weights=assign)


@register("Deconvolution")
class DeconvolutionHandler(Handler):
    def output_shapes(self, layer):
        n, c, h, w = _spatial_input(layer)
        p = layer.param.convolution_param
        kernel, stride, pad, dilation = _conv_geometry(layer, p)
        if dilation != (1, 1):
            raise layer.error("dilated Deconvolution does not convert")
        if c % p.group or p.num_output % p.group:
            raise layer.error(f"group {p.group} must divide both the {c} input and {p.num_output} output channels")
        out = [shapes.deconv_output_size(size, k, s, q) for size, k, s, q in zip((h, w), kernel, stride, pad)]
        return [_check_positive(layer, (n, p.num_output, *out), "the output")] * len(layer.tops)

    def weight_shapes(self, layer):
        p = layer.param.convolution_param
        c = layer.input_shapes[0][1]
        kernel, *_ = _conv_geometry(layer, p)
        blobs = [(c, p.num_output // p.group, *kernel)]
        return blobs + [(p.num_output,)] if p.bias_term else blobs

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.convolution_param
        kernel, stride, pad, _ = _conv_geometry(layer, p)
        c, group = layer.input_shapes[0][1], p.group
        per_in, per_out = c // group, p.num_output // group
        pieces, assign = [], []
        for g in range(group):
            x = inputs[0]
            if group > 1:
                x = CaffeSlice(-1, [per_in * i for i in range(1, group)], g, name=ctx.name(layer, f"group{g}_in"))(x)
            weight_filler = p.weight_filler if p.HasField("weight_filler") else None
            deconv = keras.layers.Conv2DTranspose(
                per_out, kernel, strides=stride, padding="valid", use_bias=p.bias_term,
                name=ctx.name(layer) if group == 1 else ctx.name(layer, f"group{g}"),
                kernel_initializer=_initializer(weights, weight_filler, "glorot_uniform"),
            )
            pieces.append(deconv(x))
            _keep_filler(deconv, "kernel_initializer", weight_filler, "glorot_uniform")
            if weights is not None:
                block = weights[0][g * per_in:(g + 1) * per_in]  # (C_in/g, O/g, kh, kw)
                arrays = [block.transpose(2, 3, 1, 0)]
                if p.bias_term:
                    arrays.append(weights[1][g * per_out:(g + 1) * per_out])
                assign.append((deconv, arrays))
        y = pieces[0] if group == 1 else keras.layers.Concatenate(axis=-1, name=ctx.name(layer, "concat"))(pieces)
        if any(pad):  # Caffe's output drops `pad` rows/columns on each side
            y = keras.layers.Cropping2D(pad, name=ctx.name(layer, "crop"))(y)
        return Built([y] * len(layer.tops), weights=assign)


@register("Pooling")
class PoolingHandler(Handler):
    def _geometry(self, layer):
        p = layer.param.pooling_param
        n, c, h, w = _spatial_input(layer)
        method = {0: "max", 1: "ave"}.get(p.pool)
        if method is None:
            pool_name = p.DESCRIPTOR.fields_by_name["pool"].enum_type.values_by_number[p.pool].name
            raise layer.error(f"pool: {pool_name} does not convert (only MAX and AVE)")
        if p.global_pooling:
            if p.HasField("kernel_size") or p.HasField("kernel_h") or any(
                getattr(p, name) for name in ("pad", "pad_h", "pad_w")
            ):
                raise layer.error("global_pooling cannot be combined with a kernel size or padding")
            return method, (h, w), (1, 1), (0, 0), True, True
        kernel = _pair(layer, [p.kernel_size] if p.HasField("kernel_size") else [],
                       _opt(p, "kernel_h"), _opt(p, "kernel_w"), "kernel_size")
        stride = _pair(layer, [p.stride] if p.HasField("stride") else [],
                       _opt(p, "stride_h"), _opt(p, "stride_w"), "stride", (1, 1))
        pad = _pair(layer, [p.pad] if p.HasField("pad") else [], _opt(p, "pad_h"), _opt(p, "pad_w"), "pad", (0, 0))
        if min(kernel) < 1 or min(stride) < 1:
            raise layer.error(f"kernel {kernel} and stride {stride} must be >= 1")
        if pad[0] >= kernel[0] or pad[1] >= kernel[1]:
            raise layer.error(f"pad {pad} must be smaller than the kernel {kernel}")
        ceil_mode = p.round_mode == 0 and not (p.HasField("ceil_mode") and not p.ceil_mode)
        return method, kernel, stride, pad, ceil_mode, False

    def output_shapes(self, layer):
        n, c, h, w = layer.input_shapes[0]
        method, kernel, stride, pad, ceil_mode, is_global = self._geometry(layer)
        if is_global:
            return [(n, c, 1, 1)] * len(layer.tops)
        any_pad = any(pad)
        out = [shapes.pool_output_size(size, k, s, q, ceil_mode, any_pad)
               for size, k, s, q in zip((h, w), kernel, stride, pad)]
        return [_check_positive(layer, (n, c, *out), "the output")] * len(layer.tops)

    def build(self, ctx, layer, inputs, weights):
        n, c, h, w = layer.input_shapes[0]
        method, kernel, stride, pad, ceil_mode, is_global = self._geometry(layer)
        if is_global:
            cls = keras.layers.GlobalMaxPooling2D if method == "max" else keras.layers.GlobalAveragePooling2D
            y = cls(keepdims=True, name=ctx.name(layer))(inputs[0])
            return Built([y] * len(layer.tops))
        _, _, out_h, out_w = layer.output_shapes[0]
        exact = not any(pad) and (h - kernel[0]) // stride[0] + 1 == out_h and (w - kernel[1]) // stride[1] + 1 == out_w
        if exact:  # no padding, no ceil overhang: every window lies inside the image, Keras pooling is Caffe's
            cls = keras.layers.MaxPooling2D if method == "max" else keras.layers.AveragePooling2D
            y = cls(kernel, stride, padding="valid", name=ctx.name(layer))(inputs[0])
        else:
            y = CaffePooling2D(method, kernel, stride, pad, ceil_mode, name=ctx.name(layer))(inputs[0])
        return Built([y] * len(layer.tops))


def _normalize_rows(matrix: np.ndarray, rows: int, eps: float) -> np.ndarray:
    """The stored blob viewed as ``rows`` rows (as the fork's code does, even with transpose), each unit-normed.

    Norms are accumulated in float64; the result is one float32 copy (a 10,516-class head is 21 MB).
    """
    flat = np.asarray(matrix, np.float32).reshape(rows, -1)
    squares = np.einsum("ij,ij->i", flat, flat, dtype=np.float64)
    scale = (1.0 / np.sqrt(squares + eps)).astype(np.float32)
    return (flat * scale[:, None]).reshape(matrix.shape)


def dense_kernel(weight: np.ndarray, bottom_shape, axis: int, transpose: bool) -> np.ndarray:
    """Caffe InnerProduct weight -> Keras Dense kernel (K, N) for the tensor ``build`` feeds to the Dense.

    For a 4-D bottom with axis 1, Keras flattens NHWC in (H, W, C) order, so the K columns (C, H, W order in
    Caffe) are permuted to (H, W, C). One copy at most (fc5 of Face-ResNet-20 is 44 MB).
    """
    if len(bottom_shape) == 4 and axis == 1:
        _, c, h, w = bottom_shape
        if c > 1 and h * w > 1:
            if transpose:  # stored (K, N) = (C, H, W, N)
                return weight.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)
            return weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
    return weight if transpose else weight.T


def _dense_input(ctx, layer, tensor, bottom_shape, axis):
    """The Keras tensor a Dense layer multiplies for a Caffe InnerProduct over axes [axis, end)."""
    rank = len(bottom_shape)
    if rank == 2 and axis == 1:
        return tensor
    if rank == 4 and axis == 1:
        return keras.layers.Flatten(name=ctx.name(layer, "flatten"))(tensor)
    if axis == rank - 1 and rank != 4:
        return tensor
    tensor = to_caffe_order(ctx, layer, tensor, rank)
    lead = bottom_shape[1:axis]
    return keras.layers.Reshape((*lead, math.prod(bottom_shape[axis:])), name=ctx.name(layer, "reshape"))(tensor)


@register("InnerProduct")
class InnerProductHandler(Handler):
    def _axis(self, layer):
        return canonical_axis(layer.param.inner_product_param.axis, len(layer.input_shapes[0]))

    def output_shapes(self, layer):
        p = layer.param.inner_product_param
        if not p.num_output:
            raise layer.error("inner_product_param.num_output is required")
        axis = self._axis(layer)
        if axis == 0:
            raise layer.error("inner_product_param.axis 0 would mix samples of the batch; it does not convert")
        _known(layer, layer.input_shapes[0])
        return [(*layer.input_shapes[0][:axis], p.num_output)] * len(layer.tops)

    def weight_shapes(self, layer):
        p = layer.param.inner_product_param
        k = math.prod(layer.input_shapes[0][self._axis(layer):])
        blobs = [(k, p.num_output) if p.transpose else (p.num_output, k)]
        return blobs + [(p.num_output,)] if p.bias_term else blobs

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.inner_product_param
        bottom, axis = layer.input_shapes[0], self._axis(layer)
        x = _dense_input(ctx, layer, inputs[0], bottom, axis)
        weight_filler = p.weight_filler if p.HasField("weight_filler") else None
        bias_filler = p.bias_filler if p.HasField("bias_filler") else None
        dense = keras.layers.Dense(
            p.num_output, use_bias=p.bias_term, name=ctx.name(layer),
            kernel_initializer=_initializer(weights, weight_filler, "glorot_uniform"),
            bias_initializer=_initializer(weights, bias_filler, "zeros"),
        )
        y = dense(x)
        _keep_filler(dense, "kernel_initializer", weight_filler, "glorot_uniform")
        _keep_filler(dense, "bias_initializer", bias_filler, "zeros")
        out_rank = axis + 1
        if out_rank == 4:
            y = from_caffe_order(ctx, layer, y, 4)
        notes, assign = [], []
        if p.normalize:
            notes.append(f"layer '{layer.name}': InnerProduct normalize: weights row-normalised at conversion; "
                         "the Dense layer does not keep them unit-norm when fine-tuned")
        if weights is not None:
            weight = weights[0]
            if p.normalize:
                weight = _normalize_rows(weight, p.num_output, ROW_NORM_EPS)
            arrays = [dense_kernel(weight, bottom, axis, p.transpose)]
            if p.bias_term:
                arrays.append(weights[1])
            assign.append((dense, arrays))
        return Built([y] * len(layer.tops), weights=assign, notes=notes)


# ----------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------


@register("ReLU")
class ReLUHandler(Handler):
    def build(self, ctx, layer, inputs, weights):
        slope = layer.param.relu_param.negative_slope
        return Built([keras.layers.ReLU(negative_slope=slope, name=ctx.name(layer))(inputs[0])])


@register("PReLU")
class PReLUHandler(Handler):
    def weight_shapes(self, layer):
        shape = layer.input_shapes[0]
        if len(shape) < 2:
            raise layer.error(f"PReLU needs at least 2 axes; got {shape}")
        return [()] if layer.param.prelu_param.channel_shared else [(shape[1],)]

    def build(self, ctx, layer, inputs, weights):
        p, shape = layer.param.prelu_param, layer.input_shapes[0]
        rank = len(shape)
        channel = keras_axis(1, rank)
        shared = [axis for axis in range(1, rank) if p.channel_shared or axis != channel]
        filler = p.filler if p.HasField("filler") else None
        init = filler_initializer(filler, keras.initializers.Constant(0.25))
        prelu = keras.layers.PReLU(alpha_initializer=init, shared_axes=shared or None, name=ctx.name(layer))
        y = prelu(inputs[0])
        assign = []
        if weights is not None:
            alpha_shape = tuple(prelu.alpha.shape)
            assign.append((prelu, [np.asarray(weights[0], np.float32).reshape(alpha_shape)]))
        return Built([y], weights=assign)


def _activation(name):
    class _Activation(Handler):
        def build(self, ctx, layer, inputs, weights):
            return Built([keras.layers.Activation(name, name=ctx.name(layer))(inputs[0])])

    return _Activation


register("Sigmoid")(_activation("sigmoid"))
register("TanH")(_activation("tanh"))
register("BNLL")(_activation("softplus"))


@register("ELU")
class ELUHandler(Handler):
    def build(self, ctx, layer, inputs, weights):
        return Built([keras.layers.ELU(alpha=layer.param.elu_param.alpha, name=ctx.name(layer))(inputs[0])])


@register("Power")
class PowerHandler(Handler):
    def build(self, ctx, layer, inputs, weights):
        p = layer.param.power_param
        return Built([CaffePower(p.power, p.scale, p.shift, name=ctx.name(layer))(inputs[0])])


@register("Softmax")
class SoftmaxHandler(Handler):
    def build(self, ctx, layer, inputs, weights):
        rank = len(layer.input_shapes[0])
        axis = keras_axis(layer.param.softmax_param.axis, rank)
        return Built([keras.layers.Softmax(axis=axis, name=ctx.name(layer))(inputs[0])])


@register("Dropout")
class DropoutHandler(Handler):
    def build(self, ctx, layer, inputs, weights):
        ratio = layer.param.dropout_param.dropout_ratio
        return Built([keras.layers.Dropout(ratio, name=ctx.name(layer))(inputs[0])])


@register("Split")
class SplitHandler(Handler):
    def build(self, ctx, layer, inputs, weights):
        return Built([inputs[0]] * len(layer.tops))


@register("LRN")
class LRNHandler(Handler):
    def build(self, ctx, layer, inputs, weights):
        p = layer.param.lrn_param
        _spatial_input(layer)
        if p.local_size % 2 == 0:
            raise layer.error(f"local_size {p.local_size} must be odd (Caffe requires it)")
        region = "across" if p.norm_region == 0 else "within"
        y = CaffeLRN(p.local_size, p.alpha, p.beta, p.k, region, name=ctx.name(layer))(inputs[0])
        return Built([y])


# ----------------------------------------------------------------------------------------------------
# Normalisation and affine layers
# ----------------------------------------------------------------------------------------------------


@register("BatchNorm")
class BatchNormHandler(Handler):
    def weight_shapes(self, layer):
        c = layer.input_shapes[0][1]
        return [(c,), (c,), (1,)]

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.batch_norm_param
        rank = len(layer.input_shapes[0])
        notes = []
        if p.HasField("use_global_stats") and not p.use_global_stats:
            notes.append(f"layer '{layer.name}': use_global_stats is false; the model uses the stored statistics "
                         "at inference (Keras BatchNormalization, training=False)")
        bn = keras.layers.BatchNormalization(
            axis=keras_axis(1, rank), epsilon=p.eps, momentum=p.moving_average_fraction,
            center=False, scale=False, name=ctx.name(layer),
        )
        y = bn(inputs[0])
        if p.HasField("use_global_stats") and p.use_global_stats:
            bn.trainable = False  # Keras then normalises with the stored statistics in training too, as Caffe does
            notes.append(f"layer '{layer.name}': use_global_stats is true; the BatchNormalization layer is frozen")
        assign = []
        if weights is not None:
            factor = float(weights[2].reshape(-1)[0])
            inverse = 0.0 if factor == 0 else 1.0 / factor  # Caffe: a zero factor gives zero statistics
            assign.append((bn, [weights[0] * inverse, weights[1] * inverse]))
        return Built([y], weights=assign, notes=notes)


def _param_span(layer, axis_value, num_axes_value, name):
    shape = layer.input_shapes[0]
    rank = len(shape)
    axis = canonical_axis(axis_value, rank)
    if num_axes_value < -1:
        raise layer.error(f"{name}.num_axes must be >= -1")
    stop = rank if num_axes_value == -1 else axis + num_axes_value
    if stop > rank:
        raise layer.error(f"{name}: axis {axis_value} + num_axes {num_axes_value} exceeds the {rank}-D bottom")
    if num_axes_value == 0:
        return axis, stop, ()
    if axis == 0:
        raise layer.error(f"{name}.axis 0 would give one parameter per sample of the batch; it does not convert")
    return axis, stop, tuple(shape[axis:stop])


def _keras_param(layer, array: np.ndarray, axis: int, stop: int) -> np.ndarray:
    """A Caffe parameter over bottom axes [axis, stop) as a Keras broadcast array (no batch axis)."""
    rank = len(layer.input_shapes[0])
    if stop == axis:  # scalar
        return np.asarray(array, np.float32).reshape(())
    full = [1] * rank
    full[axis:stop] = layer.input_shapes[0][axis:stop]
    array = np.asarray(array, np.float32).reshape(full)
    if rank == 4:
        array = array.transpose(0, 2, 3, 1)
    return array[0]


def _keras_param_shape(layer, axis, stop):
    probe = np.zeros(tuple(layer.input_shapes[0][axis:stop]) or (), np.float32)
    return _keras_param(layer, probe, axis, stop).shape


@register("Scale")
class ScaleHandler(Handler):
    def _span(self, layer):
        if len(layer.bottoms) > 1:
            raise layer.error("Scale with a second bottom (a computed scale) does not convert; "
                              "register a handler for it")
        p = layer.param.scale_param
        return _param_span(layer, p.axis, p.num_axes, "scale_param")

    def weight_shapes(self, layer):
        _, _, param_shape = self._span(layer)
        return [param_shape, param_shape] if layer.param.scale_param.bias_term else [param_shape]

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.scale_param
        axis, stop, _ = self._span(layer)
        default_scale = keras.initializers.Constant(1.0)
        scale_init = filler_initializer(p.filler if p.HasField("filler") else None, default_scale)
        bias_init = filler_initializer(p.bias_filler if p.HasField("bias_filler") else None, "zeros")
        if weights is None and (p.HasField("min_value") or p.HasField("max_value")):
            raise layer.error("scale_param.min_value/max_value need the caffemodel's scale blob to clamp")
        layer_obj = CaffeScale(_keras_param_shape(layer, axis, stop), use_scale=True, use_bias=p.bias_term,
                               scale_initializer=scale_init, bias_initializer=bias_init, name=ctx.name(layer))
        y = layer_obj(inputs[0])
        assign = []
        if weights is not None:
            scale = np.asarray(weights[0], np.float32)
            if p.HasField("min_value") or p.HasField("max_value"):  # happynear clamps the blob before use
                scale = np.clip(scale, p.min_value if p.HasField("min_value") else None,
                                p.max_value if p.HasField("max_value") else None)
            arrays = [_keras_param(layer, scale, axis, stop)]
            if p.bias_term:
                arrays.append(_keras_param(layer, weights[1], axis, stop))
            assign.append((layer_obj, arrays))
        return Built([y], weights=assign)


@register("Bias")
class BiasHandler(Handler):
    def _span(self, layer):
        if len(layer.bottoms) > 1:
            raise layer.error("Bias with a second bottom does not convert; register a handler for it")
        p = layer.param.bias_param
        return _param_span(layer, p.axis, p.num_axes, "bias_param")

    def weight_shapes(self, layer):
        return [self._span(layer)[2]]

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.bias_param
        axis, stop, _ = self._span(layer)
        init = filler_initializer(p.filler if p.HasField("filler") else None, "zeros")
        layer_obj = CaffeScale(_keras_param_shape(layer, axis, stop), use_scale=False, use_bias=True,
                               bias_initializer=init, name=ctx.name(layer))
        y = layer_obj(inputs[0])
        assign = [(layer_obj, [_keras_param(layer, weights[0], axis, stop)])] if weights is not None else []
        return Built([y], weights=assign)


@register("Normalize")
class NormalizeHandler(Handler):
    blob_note = ("happynear's L2 Normalize has no blobs; a Normalize with a scale blob is SSD's NormalizeBBox "
                 "(norm_param): register a handler for it with @register('Normalize', replace=True)")

    def output_shapes(self, layer):
        if len(layer.tops) > 1:
            raise layer.error("Normalize's second top (the norm) does not convert")
        if len(layer.input_shapes[0]) < 2:
            raise layer.error(f"Normalize needs at least 2 axes; got {layer.input_shapes[0]}")
        return [layer.input_shapes[0]]

    def build(self, ctx, layer, inputs, weights):
        kind = layer.param.normalize_param.normalize_type
        if kind not in ("L1", "L2"):
            raise layer.error(f"normalize_type {kind!r} does not convert (L1 or L2)")
        axis = keras_axis(1, len(layer.input_shapes[0]))
        return Built([CaffeNormalize(axis=axis, norm=kind, name=ctx.name(layer))(inputs[0])])


@register("Flip")
class FlipHandler(Handler):
    def build(self, ctx, layer, inputs, weights):
        p, rank = layer.param.flip_param, len(layer.input_shapes[0])
        axes = []
        if rank == 4:  # Flip indexes the blob as N x C x H x W; lower ranks have H = W = 1
            axes = ([2] if p.flip_width else []) + ([1] if p.flip_height else [])
        if not axes:
            return Built([inputs[0]])
        return Built([Flip(axes, name=ctx.name(layer))(inputs[0])])


# ----------------------------------------------------------------------------------------------------
# Blob plumbing: Eltwise, Concat, Slice, Flatten, Reshape
# ----------------------------------------------------------------------------------------------------


@register("Eltwise")
class EltwiseHandler(Handler):
    def output_shapes(self, layer):
        first = layer.input_shapes[0]
        if len(layer.bottoms) < 2:
            raise layer.error("Eltwise needs at least 2 bottoms")
        for shape in layer.input_shapes[1:]:
            if tuple(shape) != tuple(first):
                raise layer.error(f"bottoms must have identical shapes (Caffe does not broadcast); got "
                                  f"{[tuple(s) for s in layer.input_shapes]}")
        p = layer.param.eltwise_param
        if len(p.coeff) and (p.operation != 1 or len(p.coeff) != len(layer.bottoms)):
            raise layer.error("coeff is only for SUM, one per bottom")
        return [first]

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.eltwise_param
        if p.operation == 1:
            coeffs = list(p.coeff) or [1.0] * len(inputs)
            terms = [x if c == 1.0 else keras.layers.Rescaling(c, name=ctx.name(layer, f"coeff{i}"))(x)
                     for i, (x, c) in enumerate(zip(inputs, coeffs))]
            return Built([keras.layers.Add(name=ctx.name(layer))(terms)])
        if p.operation == 0:
            return Built([keras.layers.Multiply(name=ctx.name(layer))(inputs)])
        if p.operation == 2:
            return Built([keras.layers.Maximum(name=ctx.name(layer))(inputs)])
        raise layer.error("Eltwise operation SORT (happynear) does not convert")


def _concat_axis(layer):
    p = layer.param.concat_param
    rank = len(layer.input_shapes[0])
    return canonical_axis(p.concat_dim if p.HasField("concat_dim") else p.axis, rank)


@register("Concat")
class ConcatHandler(Handler):
    def output_shapes(self, layer):
        axis = _concat_axis(layer)
        first = list(layer.input_shapes[0])
        for shape in layer.input_shapes[1:]:
            if len(shape) != len(first) or any(a != b for i, (a, b) in enumerate(zip(shape, first)) if i != axis):
                raise layer.error(f"bottoms differ outside axis {axis}: {[tuple(s) for s in layer.input_shapes]}")
        sizes = [shape[axis] for shape in layer.input_shapes]
        first[axis] = None if None in sizes else sum(sizes)
        return [tuple(first)]

    def build(self, ctx, layer, inputs, weights):
        if len(inputs) == 1:
            return Built([inputs[0]])
        axis = keras_axis(_concat_axis(layer), len(layer.input_shapes[0]))
        return Built([keras.layers.Concatenate(axis=axis, name=ctx.name(layer))(inputs)])


@register("Slice")
class SliceHandler(Handler):
    def _axis(self, layer):
        p = layer.param.slice_param
        return canonical_axis(p.slice_dim if p.HasField("slice_dim") else p.axis, len(layer.input_shapes[0]))

    def output_shapes(self, layer):
        shape, axis = list(layer.input_shapes[0]), self._axis(layer)
        points, size, tops = list(layer.param.slice_param.slice_point), shape[axis], len(layer.tops)
        out = []
        if points:
            if len(points) != tops - 1:
                raise layer.error(f"{len(points)} slice_point values for {tops} tops; give one fewer than tops")
            bounds = [0, *points, size]
            if points != sorted(points) or (size is not None and points[-1] >= size) or points[0] <= 0:
                raise layer.error(f"slice_point {points} must increase strictly inside (0, {size})")
            for start, stop in zip(bounds, bounds[1:]):
                shape[axis] = None if stop is None else stop - start
                out.append(tuple(shape))
            return out
        if size is not None and size % tops:
            raise layer.error(f"axis {axis} of size {size} does not split into {tops} equal parts")
        shape[axis] = None if size is None else size // tops
        return [tuple(shape)] * tops

    def build(self, ctx, layer, inputs, weights):
        axis = self._axis(layer)
        points = list(layer.param.slice_param.slice_point)
        sections = points if points else len(layer.tops)
        kaxis = keras_axis(axis, len(layer.input_shapes[0]))
        outputs = [CaffeSlice(kaxis, sections, i, name=ctx.name(layer, str(i) if i else ""))(inputs[0])
                   for i in range(len(layer.tops))]
        return Built(outputs)


def _needs_permute(shape) -> bool:
    """Whether NHWC and NCHW memory orders differ for this 4-D shape (C > 1 and H W > 1)."""
    return len(shape) == 4 and shape[1] > 1 and shape[2] * shape[3] > 1


def _reshape_to(ctx, layer, tensor, bottom, top):
    """Reshape with Caffe's (NCHW) memory order: permute to NCHW if needed, reshape, permute back if 4-D."""
    bottom, top = tuple(bottom), tuple(top)
    if bottom == top:
        return tensor
    _known(layer, bottom)
    if _needs_permute(bottom):
        tensor = to_caffe_order(ctx, layer, tensor, 4)
    target = top[1:]
    if len(top) == 4:
        # Build the NCHW-ordered tensor, then bring it to NHWC (skip the permute where orders agree).
        if _needs_permute(top):
            tensor = keras.layers.Reshape(target, name=ctx.name(layer, "reshape"))(tensor)
            return keras.layers.Permute((2, 3, 1), name=ctx.name(layer))(tensor)
        target = keras_shape(top)[1:]
    return keras.layers.Reshape(target, name=ctx.name(layer))(tensor)


@register("Flatten")
class FlattenHandler(Handler):
    def output_shapes(self, layer):
        shape = layer.input_shapes[0]
        rank = len(shape)
        p = layer.param.flatten_param
        start, end = canonical_axis(p.axis, rank), canonical_axis(p.end_axis, rank)
        if start == 0:
            raise layer.error("Flatten over the batch axis does not convert")
        if end < start:
            raise layer.error(f"flatten_param.end_axis {p.end_axis} is before axis {p.axis}")
        _known(layer, shape)
        return [(*shape[:start], math.prod(shape[start:end + 1]), *shape[end + 1:])]

    def build(self, ctx, layer, inputs, weights):
        return Built([_reshape_to(ctx, layer, inputs[0], layer.input_shapes[0], layer.output_shapes[0])])


@register("Reshape")
class ReshapeHandler(Handler):
    def output_shapes(self, layer):
        bottom = tuple(layer.input_shapes[0])
        p = layer.param.reshape_param
        rank = len(bottom)
        axis = p.axis + rank + 1 if p.axis < 0 else p.axis
        if not 0 <= axis <= rank:
            raise layer.error(f"reshape_param.axis {p.axis} is out of range for a {rank}-D bottom")
        stop = rank if p.num_axes == -1 else axis + p.num_axes
        if p.num_axes < -1 or stop > rank:
            raise layer.error(f"reshape_param.num_axes {p.num_axes} is out of range")
        dims = list(p.shape.dim)
        if dims.count(-1) > 1:
            raise layer.error("at most one reshape dimension may be -1")
        new = []
        for index, dim in enumerate(dims):
            if dim == 0:
                if axis + index >= rank:
                    raise layer.error(f"dim {index} is 0 (copy) but the bottom has no axis {axis + index}")
                new.append(bottom[axis + index])
            elif dim == -1 or dim > 0:
                new.append(dim)
            else:
                raise layer.error(f"reshape dimension {dim} is invalid")
        out = [*bottom[:axis], *new, *bottom[stop:]]
        _known(layer, bottom)
        # The batch axis must survive: copied (0 -> None), untouched (axis > 0), or an inferred -1 at axis 0.
        if out[0] == -1:
            if -1 in out[1:]:
                raise layer.error("-1 at the batch axis and elsewhere: cannot infer both")
            out[0] = None
        elif out[0] is not None:
            raise layer.error(f"the reshape sets the batch axis to {out[0]}; only per-sample reshapes convert")
        per_sample = math.prod(bottom[1:])
        known = math.prod(d for d in out[1:] if d != -1)
        if -1 in out[1:]:
            if known == 0 or per_sample % known:
                raise layer.error(f"cannot infer a dimension: {per_sample} values per sample into {out}")
            out[out.index(-1, 1)] = per_sample // known
        elif known != per_sample:
            raise layer.error(f"{per_sample} values per sample do not fill shape {out} (the batch must not change)")
        return [tuple(out)]

    def build(self, ctx, layer, inputs, weights):
        return Built([_reshape_to(ctx, layer, inputs[0], layer.input_shapes[0], layer.output_shapes[0])])


# ----------------------------------------------------------------------------------------------------
# Face-model fork layers and the margin heads
# ----------------------------------------------------------------------------------------------------


@register("LabelSpecificAdd")
class LabelSpecificAddHandler(Handler):
    """Identity at inference (the fork returns early in TEST); the label bottom is not needed."""

    def used_bottoms(self, layer):
        return 1

    def build(self, ctx, layer, inputs, weights):
        return Built([inputs[0]] * len(layer.tops),
                     notes=[f"layer '{layer.name}': LabelSpecificAdd is the identity at inference; its margin "
                            "is not in the model (no AMSoftmaxHead pattern was found around it)"])


@register("MarginInnerProduct")
class MarginInnerProductHandler(Handler):
    """Label-free logits ``x . w_hat`` (Caffe's non-label columns) as a Dense layer; used when SphereFace's
    layer feeds other layers, so it cannot become a ``SphereFaceHead``."""

    def used_bottoms(self, layer):
        return 1

    def output_shapes(self, layer):
        p = layer.param.margin_inner_product_param
        axis = canonical_axis(p.axis, len(layer.input_shapes[0]))
        _known(layer, layer.input_shapes[0])
        return [(*layer.input_shapes[0][:axis], p.num_output)] + [(1,)] * (len(layer.tops) - 1)

    def weight_shapes(self, layer):
        p = layer.param.margin_inner_product_param
        axis = canonical_axis(p.axis, len(layer.input_shapes[0]))
        return [(p.num_output, math.prod(layer.input_shapes[0][axis:]))]

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.margin_inner_product_param
        if len(layer.tops) > 1:
            raise layer.error("MarginInnerProduct's second top (lambda) does not convert")
        bottom = layer.input_shapes[0]
        axis = canonical_axis(p.axis, len(bottom))
        if axis != len(bottom) - 1 and not (len(bottom) == 4 and axis == 1):
            raise layer.error(f"margin_inner_product_param.axis {p.axis} does not convert")
        x = _dense_input(ctx, layer, inputs[0], bottom, axis)
        dense = keras.layers.Dense(p.num_output, use_bias=False, name=ctx.name(layer),
                                   kernel_initializer=_initializer(weights, None, "glorot_uniform"))
        y = dense(x)
        _keep_filler(dense, "kernel_initializer", None, "glorot_uniform")
        assign = []
        if weights is not None:
            weight = _normalize_rows(weights[0], p.num_output, 0.0)
            assign.append((dense, [dense_kernel(weight, bottom, axis, False)]))
        return Built([y], weights=assign, notes=[
            f"layer '{layer.name}': MarginInnerProduct feeds other layers, so it converts to its label-free "
            "logits x.w_hat (a Dense layer); the SphereFace margin is not in the model"])


class _HeadHandler(Handler):
    """A fused margin head: called on the embedding alone, it outputs cos(theta) (batch, num_classes)."""

    def output_shapes(self, layer):
        return [(None, layer.attrs["num_classes"])]

    def weight_shapes(self, layer):
        return [layer.attrs["weight_shape"]]

    def make_head(self, margin_layers, layer, name, **kwargs):
        raise NotImplementedError

    def head_weights(self, layer, head, kernel):
        return [kernel]

    def build(self, ctx, layer, inputs, weights):
        from keras_margin import layers as margin_layers  # the core package; imported only when a head is built

        head = self.make_head(margin_layers, layer, ctx.name(layer),
                              kernel_initializer=_initializer(weights, None, "glorot_uniform"))
        y = head(inputs[0])
        _keep_filler(head, "kernel_initializer", None, "glorot_uniform")
        assign = []
        if weights is not None:
            num_classes = layer.attrs["num_classes"]
            weight = _normalize_rows(weights[0], num_classes, layer.attrs["row_eps"])
            kernel = weight if layer.attrs.get("transpose") else weight.T  # Keras layout (embedding_dim, classes)
            assign.append((head, self.head_weights(layer, head, kernel)))
        return Built([y], weights=assign)


@register("keras_margin.AMSoftmaxHead")
class AMSoftmaxHeadHandler(_HeadHandler):
    def make_head(self, margin_layers, layer, name, **kwargs):
        a = layer.attrs
        return margin_layers.AMSoftmaxHead(a["num_classes"], s=a["s"], m=a["m"], margin_rule=a["margin_rule"],
                                           margin_schedule=a["margin_schedule"], name=name, **kwargs)

    def head_weights(self, layer, head, kernel):
        a = layer.attrs
        if a["margin_schedule"] is None:
            return [kernel]
        from keras_margin.margins.amsoftmax import scheduled_margin  # the head's own schedule, not a second copy

        start = float(np.asarray(scheduled_margin(a["iteration"], **a["margin_schedule"])))
        return [kernel, np.asarray(a["iteration"], dtype=np.int32), np.asarray(start, dtype=np.float32)]


@register("keras_margin.NormFaceHead")
class NormFaceHeadHandler(_HeadHandler):
    def make_head(self, margin_layers, layer, name, **kwargs):
        a = layer.attrs
        return margin_layers.NormFaceHead(a["num_classes"], s=a["s"], learn_scale=a.get("learn_scale", False),
                                          scale_min=a.get("scale_min"), name=name, **kwargs)

    def head_weights(self, layer, head, kernel):
        if not layer.attrs.get("learn_scale"):
            return [kernel]
        return [kernel, np.asarray(layer.attrs["s"], dtype=np.float32)]


@register("keras_margin.CosineDense")
class CosineDenseHandler(_HeadHandler):
    def make_head(self, margin_layers, layer, name, **kwargs):
        return margin_layers.CosineDense(layer.attrs["num_classes"], name=name, **kwargs)


@register("keras_margin.SphereFaceHead")
class SphereFaceHeadHandler(_HeadHandler):
    def make_head(self, margin_layers, layer, name, **kwargs):
        a = layer.attrs
        return margin_layers.SphereFaceHead(a["num_classes"], m=a["m"], base=a["base"], gamma=a["gamma"],
                                            power=a["power"], lambda_min=a["lambda_min"], name=name, **kwargs)

    def head_weights(self, layer, head, kernel):
        return [kernel, np.asarray(layer.attrs["iteration"], dtype=np.int32)]
