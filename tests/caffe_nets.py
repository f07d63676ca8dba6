"""Test fixtures for the Caffe importer: programmatic prototxts, seeded caffemodel weights, NumPy references.

The Face-ResNet-20 generator writes the AM-Softmax network (happynear/AMSoftmax ``face_deploy_mirror_normalize``
and ``face_train_test``) with the same layer names and shapes, so the suite never needs the shared folder (the
published prototxts, at ``$KERAS_MARGIN_SHARED``, default ``shared/`` beside the repository); the NumPy
functions restate Caffe's C++ semantics (pooling_layer.cpp, conv_layer.cpp) independently of the converter.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: The environment variable that points the tests at the shared folder (published Caffe prototxts).
SHARED_ENV = "KERAS_MARGIN_SHARED"
HOW_TO_PROVIDE_SHARED = f"set {SHARED_ENV}=/path/to/shared or put shared/ beside the repository"


def shared_dir() -> Path:
    """``$KERAS_MARGIN_SHARED`` if set, else ``shared/`` beside the repository (../shared from its root)."""
    configured = os.environ.get(SHARED_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    return Path(__file__).resolve().parents[1].parent / "shared"


def shared_missing(path: Path, what: str) -> str:
    """The skip reason of a test whose ``what`` is not at ``path``."""
    return f"{what} not found at {path}: {HOW_TO_PROVIDE_SHARED}"


SHARED = shared_dir()
AMSOFTMAX_DIR = SHARED / "caffe" / "amsoftmax"
SHARED_MISSING = shared_missing(AMSOFTMAX_DIR, "the published AM-Softmax prototxts")

# (stage, channels of the stage, residual units): conv{s}_1 (stride 2) then 2 convs per unit.
FACE_RESNET20_STAGES = ((1, 1), (2, 2), (3, 4), (4, 1))


def _conv(name, bottom, num_output, stride, bias_lr=0):
    return f"""layer {{
  name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"
  param {{ lr_mult: 1 decay_mult: 1 }}
  param {{ lr_mult: {bias_lr} decay_mult: 0 }}
  convolution_param {{
    num_output: {num_output} kernel_size: 3 stride: {stride} pad: 1
    weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" value: 0 }}
  }}
}}
layer {{ name: "relu{name[4:]}" type: "PReLU" bottom: "{name}" top: "{name}" }}
"""


def face_resnet20_trunk(bottom: str = "data", widths=(64, 128, 256, 512), embedding: int = 512) -> str:
    """The 20 convolutions, 20 PReLUs, 8 residual Eltwise (``operation: 1``) and fc5 of Face-ResNet-20."""
    parts, previous = [], bottom
    for (stage, units), width in zip(FACE_RESNET20_STAGES, widths):
        first = f"conv{stage}_1"
        parts.append(_conv(first, previous, width, 2, bias_lr=2))
        shortcut, conv_index = first, 1
        for _ in range(units):
            a, b = f"conv{stage}_{conv_index + 1}", f"conv{stage}_{conv_index + 2}"
            parts.append(_conv(a, shortcut, width, 1))
            parts.append(_conv(b, a, width, 1))
            res = f"res{stage}_{conv_index + 2}"
            parts.append(f'layer {{ name: "{res}" type: "Eltwise" bottom: "{shortcut}" bottom: "{b}" top: "{res}"\n'
                         f"  eltwise_param {{ operation: 1 }} }}\n")
            shortcut, conv_index = res, conv_index + 2
        previous = shortcut
    parts.append(f"""layer {{
  name: "fc5" type: "InnerProduct" bottom: "{previous}" top: "fc5"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  inner_product_param {{ num_output: {embedding} weight_filler {{ type: "xavier" }}
                         bias_filler {{ type: "constant" value: 0 }} }}
}}
""")
    return "".join(parts)


def face_resnet20_prototxt(kind: str = "deploy", widths=(64, 128, 256, 512), embedding: int = 512,
                           num_classes: int = 10516, input_hw=(112, 96), batch: int = 100) -> str:
    """Prototxt text of the AM-Softmax Face-ResNet-20: "deploy" (mirror + normalize), "train" or "trunk"."""
    h, w = input_hw
    if kind == "trunk":
        return (f'name: "Face-ResNet-trunk"\ninput: "data"\ninput_dim: {batch}\ninput_dim: 3\ninput_dim: {h}\n'
                f"input_dim: {w}\n" + face_resnet20_trunk("data", widths, embedding))
    if kind == "deploy":
        return (f'input: "data"\ninput_dim: {batch}\ninput_dim: 3\ninput_dim: {h}\ninput_dim: {w}\n'
                'layer { name: "flip_data" type: "Flip" bottom: "data" top: "flip_data" }\n'
                'layer { name: "concat_data" type: "Concat" bottom: "data" bottom: "flip_data" top: "concat_data"\n'
                '  concat_param { axis: 0 } }\n'
                + face_resnet20_trunk("concat_data", widths, embedding)
                + 'layer { name: "slice_fc5" type: "Slice" bottom: "fc5" top: "fc5_orig" top: "fc5_mirror"\n'
                  '  slice_param { axis: 0 } }\n'
                  'layer { name: "eltmax_fc5" type: "Eltwise" bottom: "fc5_orig" bottom: "fc5_mirror"\n'
                  '  top: "eltmax_fc5" eltwise_param { operation: SUM } }\n'
                  'layer { name: "normalize1" type: "Normalize" bottom: "eltmax_fc5" top: "norm1"\n'
                  '  normalize_param { normalize_type: "L2" } }\n')
    if kind == "train":
        data = "".join(
            f"""layer {{
  name: "data" type: "ImageData" top: "data" top: "label"
  include {{ phase: {phase} }}
  transform_param {{ mean_value: 128 scale: 0.0078125 mirror: true }}
  image_data_param {{ source: "list_{phase.lower()}.txt" batch_size: {size} shuffle: true }}
}}
"""
            for phase, size in (("TRAIN", 256), ("TEST", 32))
        )
        head = f"""layer {{ name: "norm1" type: "Normalize" bottom: "fc5" top: "norm1" }}
layer {{
  name: "fc6_l2" type: "InnerProduct" bottom: "norm1" top: "fc6"
  param {{ lr_mult: 1 }}
  inner_product_param {{ num_output: {num_classes} normalize: true weight_filler {{ type: "xavier" }}
                         bias_term: false }}
}}
layer {{
  name: "label_specific_margin" type: "LabelSpecificAdd" bottom: "fc6" bottom: "label" top: "fc6_margin"
  label_specific_add_param {{ bias: -0.35 }}
}}
layer {{
  name: "fc6_margin_scale" type: "Scale" bottom: "fc6_margin" top: "fc6_margin_scale"
  param {{ lr_mult: 0 decay_mult: 0 }}
  scale_param {{ filler {{ type: "constant" value: 30 }} }}
}}
layer {{ name: "softmax_loss" type: "SoftmaxWithLoss" bottom: "fc6_margin_scale" bottom: "label"
        top: "softmax_loss" loss_weight: 1 }}
layer {{ name: "Accuracy" type: "Accuracy" bottom: "fc6" bottom: "label" top: "accuracy"
        include {{ phase: TEST }} }}
"""
        return 'name: "Face-ResNet"\n' + data + face_resnet20_trunk("data", widths, embedding) + head
    raise ValueError(f"kind must be 'deploy', 'train' or 'trunk'; got {kind!r}")


def face_resnet20_blobs(widths=(64, 128, 256, 512), embedding: int = 512, num_classes: int | None = 10516,
                        input_hw=(112, 96), seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Seeded weights for every Face-ResNet-20 layer with blobs, in Caffe layout (O, I, kh, kw) / (N, K).

    Scaled so activations stay O(1) through the 20 layers for inputs of unit scale: He-like convolutions,
    the second conv of each residual unit damped, PReLU slopes near 0.25.
    """
    rng = np.random.default_rng(seed)
    blobs: dict[str, list[np.ndarray]] = {}
    channels, (h, w) = 3, input_hw
    for (stage, units), width in zip(FACE_RESNET20_STAGES, widths):
        for index in range(1, 2 * units + 2):
            name = f"conv{stage}_{index}"
            fan_in = channels * 9
            gain = np.sqrt(2.0 / fan_in) * (0.5 if index > 1 and index % 2 == 1 else 1.0)
            blobs[name] = [
                (rng.standard_normal((width, channels, 3, 3)) * gain).astype(np.float32),
                (rng.standard_normal(width) * 0.05).astype(np.float32),
            ]
            blobs[f"relu{stage}_{index}"] = [rng.uniform(0.15, 0.35, width).astype(np.float32)]
            channels = width
        h, w = (h + 1) // 2, (w + 1) // 2
    k = channels * h * w
    blobs["fc5"] = [(rng.standard_normal((embedding, k)) * np.sqrt(1.0 / k)).astype(np.float32),
                    (rng.standard_normal(embedding) * 0.05).astype(np.float32)]
    if num_classes:
        blobs["fc6_l2"] = [(rng.standard_normal((num_classes, embedding)) * 0.05).astype(np.float32)]
        blobs["fc6_margin_scale"] = [np.full(num_classes, 30.0, np.float32)]
    return blobs


# ----------------------------------------------------------------------------------------------------
# NumPy references of Caffe's semantics (written from the C++ sources, not from the converter)
# ----------------------------------------------------------------------------------------------------


def caffe_pool(x: np.ndarray, method: str, kernel, stride, pad, ceil_mode: bool = True) -> np.ndarray:
    """pooling_layer.cpp Forward_cpu, literally: NCHW in, NCHW out."""
    n, c, height, width = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad

    def out_size(size, k, s, p):
        span = size + 2 * p - k
        out = (int(np.ceil(span / s)) if ceil_mode else span // s) + 1
        if (ph or pw) and (out - 1) * s >= size + p:
            out -= 1
        return out

    oh, ow = out_size(height, kh, sh, ph), out_size(width, kw, sw, pw)
    y = np.empty((n, c, oh, ow), np.float64)
    for i in range(oh):
        for j in range(ow):
            hstart, wstart = i * sh - ph, j * sw - pw
            if method == "max":
                hend, wend = min(hstart + kh, height), min(wstart + kw, width)
                hstart, wstart = max(hstart, 0), max(wstart, 0)
                y[:, :, i, j] = x[:, :, hstart:hend, wstart:wend].max(axis=(2, 3))
            else:
                hend, wend = min(hstart + kh, height + ph), min(wstart + kw, width + pw)
                pool_size = (hend - hstart) * (wend - wstart)
                hstart, wstart = max(hstart, 0), max(wstart, 0)
                hend, wend = min(hend, height), min(wend, width)
                y[:, :, i, j] = x[:, :, hstart:hend, wstart:wend].sum(axis=(2, 3)) / pool_size
    return y


def caffe_conv(x: np.ndarray, weight: np.ndarray, bias, stride=(1, 1), pad=(0, 0), dilation=(1, 1),
               group: int = 1) -> np.ndarray:
    """conv_layer.cpp: symmetric zero padding, floor output size, cross-correlation, contiguous groups."""
    n, c, height, width = x.shape
    out_c, in_per_group, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    padded = np.zeros((n, c, height + 2 * ph, width + 2 * pw), np.float64)
    padded[:, :, ph:ph + height, pw:pw + width] = x
    oh = (height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    y = np.zeros((n, out_c, oh, ow), np.float64)
    out_per_group = out_c // group
    for g in range(group):
        xs = padded[:, g * in_per_group:(g + 1) * in_per_group]
        ws = weight[g * out_per_group:(g + 1) * out_per_group].astype(np.float64)
        for a in range(kh):
            for b in range(kw):
                patch = xs[:, :, a * dh: a * dh + sh * (oh - 1) + 1: sh, b * dw: b * dw + sw * (ow - 1) + 1: sw]
                y[:, g * out_per_group:(g + 1) * out_per_group] += np.einsum("nchw,oc->nohw", patch, ws[:, :, a, b])
    if bias is not None:
        y += np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
    return y


def l2_normalize_rows(matrix: np.ndarray, eps: float) -> np.ndarray:
    matrix = np.asarray(matrix, np.float64)
    return matrix / np.sqrt(np.sum(matrix * matrix, axis=-1, keepdims=True) + eps)


def nchw(x: np.ndarray) -> np.ndarray:
    """Keras NHWC -> Caffe NCHW (other ranks unchanged)."""
    x = np.asarray(x)
    return x.transpose(0, 3, 1, 2) if x.ndim == 4 else x


def nhwc(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def opencv_forward(prototxt: str | Path, caffemodel: str | Path, feeds: dict, outputs: list[str]) -> list[np.ndarray]:
    """OpenCV's own Caffe importer on the files (an independent reference), fusion off, CPU backend."""
    import cv2

    net = (cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel)) if caffemodel
           else cv2.dnn.readNetFromCaffe(str(prototxt)))
    net.enableFusion(False)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    for name, value in feeds.items():
        net.setInput(np.ascontiguousarray(value, np.float32), name)
    result = net.forward(outputs)
    return [np.asarray(value) for value in result]


def write_net(directory: Path, text: str, blobs: dict | None = None, name: str = "net", **writer_options):
    """Write ``text`` as <name>.prototxt and ``blobs`` (layer name -> arrays) as <name>.caffemodel."""
    from converters.caffe.writer import write_caffemodel

    prototxt = Path(directory) / f"{name}.prototxt"
    prototxt.write_text(text)
    caffemodel = None
    if blobs:
        caffemodel = Path(directory) / f"{name}.caffemodel"
        write_caffemodel(caffemodel, [(layer, "", arrays) for layer, arrays in blobs.items()], **writer_options)
    return prototxt, caffemodel


def keras_outputs(conversion, feeds: dict) -> dict:
    """Run a ``converters.caffe.convert`` result on NCHW ``feeds``; return {Caffe blob name: NCHW output}."""
    model = conversion.model
    arrays = [nhwc(feeds[tensor.name]) for tensor in model.inputs]
    values = model(arrays if len(arrays) > 1 else arrays[0], training=False)
    values = values if isinstance(values, (list, tuple)) else [values]
    return {blob_id.split("#")[0]: nchw(np.asarray(value)) for blob_id, value in zip(conversion.plan.outputs, values)}
