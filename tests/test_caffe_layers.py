"""Each Caffe layer type converts to Keras layers computing what Caffe computes.

References: OpenCV's own Caffe importer run on the same prototxt and caffemodel, and NumPy restatements of
Caffe's C++ (tests/caffe_nets.py) for the rules converters get wrong: pooling's ceil mode and AVE divisors (P2),
the stride-2 padding of convolutions (P1), the NCHW flattening before InnerProduct (P7).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from converters.caffe import convert
from tests.caffe_nets import (
    caffe_conv,
    caffe_pool,
    keras_outputs,
    l2_normalize_rows,
    nchw,
    nhwc,
    opencv_forward,
    write_net,
)

RNG = np.random.default_rng(1234)


def _input(shape, low=-1.0, high=1.0):
    return RNG.uniform(low, high, shape).astype(np.float32)


def _net(input_shape, body):
    dims = " ".join(f"dim: {d}" for d in input_shape)
    return f'name: "t"\ninput: "data"\ninput_shape {{ {dims} }}\n{body}'


def _both(tmp_path, text, blobs, x, outputs):
    """(Keras outputs, OpenCV outputs) for NCHW input ``x``, as {blob: array}."""
    prototxt, caffemodel = write_net(tmp_path, text, blobs)
    conversion = convert(prototxt, caffemodel)
    ours = keras_outputs(conversion, {"data": x})
    theirs = dict(zip(outputs, opencv_forward(prototxt, caffemodel, {"data": x}, outputs)))
    return ours, theirs


# ----------------------------------------------------------------------------------------------------
# Convolution (P1) and deconvolution
# ----------------------------------------------------------------------------------------------------


def test_stride2_pad1_convolution_pads_symmetrically_unlike_tf_same(tmp_path):
    x = _input((2, 3, 8, 6))
    w, b = _input((4, 3, 3, 3)), _input((4,))
    text = _net(x.shape, 'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"\n'
                         '  convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 } }')
    ours, theirs = _both(tmp_path, text, {"conv": [w, b]}, x, ["conv"])
    expected = caffe_conv(x, w, b, stride=(2, 2), pad=(1, 1))
    np.testing.assert_allclose(ours["conv"], expected, atol=1e-5)
    np.testing.assert_allclose(theirs["conv"], expected, atol=1e-5)
    # The pitfall this guards against: Keras "same" gives the same shape but pads bottom/right only.
    tf_same = keras.layers.Conv2D(4, 3, strides=2, padding="same")
    tf_same.build((None, 8, 6, 3))
    tf_same.set_weights([w.transpose(2, 3, 1, 0), b])
    assert np.abs(nchw(tf_same(nhwc(x))) - expected).max() > 1e-2


@pytest.mark.parametrize("params, geometry", [
    ("num_output: 4 kernel_size: 3 group: 2", dict(group=2)),
    ("num_output: 4 kernel_size: 3 dilation: 2 pad: 2", dict(pad=(2, 2), dilation=(2, 2))),
    ("num_output: 4 kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
     dict(stride=(2, 1), pad=(1, 0))),
    ("num_output: 4 kernel_size: 3 stride: 2 dilation: 2 pad: 1", dict(stride=(2, 2), pad=(1, 1), dilation=(2, 2))),
    ("num_output: 4 kernel_size: 2 stride: 3 bias_term: false", dict(stride=(3, 3))),
], ids=["group", "dilation", "asymmetric", "dilation+stride", "no-bias"])
def test_convolution_geometry(tmp_path, params, geometry):
    x = _input((2, 4, 9, 8))
    kernel = (3, 1) if "kernel_h" in params else (2, 2) if "kernel_size: 2" in params else (3, 3)
    group = geometry.get("group", 1)
    w = _input((4, 4 // group, *kernel))
    b = None if "bias_term: false" in params else _input((4,))
    text = _net(x.shape, f'layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"\n'
                         f"  convolution_param {{ {params} }} }}")
    ours, theirs = _both(tmp_path, text, {"conv": [w] if b is None else [w, b]}, x, ["conv"])
    expected = caffe_conv(x, w, b, **geometry)
    np.testing.assert_allclose(ours["conv"], expected, atol=1e-5)
    np.testing.assert_allclose(theirs["conv"], expected, atol=1e-5)


@pytest.mark.parametrize("params", ["num_output: 4 kernel_size: 4 stride: 2 pad: 1",
                                    "num_output: 4 kernel_size: 3 stride: 2 group: 2"])
def test_deconvolution_matches_opencv(tmp_path, params):
    x = _input((2, 4, 5, 4))
    group = 2 if "group" in params else 1
    kernel = 4 if "kernel_size: 4" in params else 3
    w, b = _input((4, 4 // group, kernel, kernel)), _input((4,))
    text = _net(x.shape, f'layer {{ name: "up" type: "Deconvolution" bottom: "data" top: "up"\n'
                         f"  convolution_param {{ {params} }} }}")
    ours, theirs = _both(tmp_path, text, {"up": [w, b]}, x, ["up"])
    assert ours["up"].shape == theirs["up"].shape
    np.testing.assert_allclose(ours["up"], theirs["up"], atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Pooling (P2)
# ----------------------------------------------------------------------------------------------------

POOL_CASES = {
    "max-ceil-overhang": ("MAX", (3, 3), (2, 2), (0, 0), (8, 8)),
    "ave-ceil-overhang": ("AVE", (3, 3), (2, 2), (0, 0), (8, 8)),
    "ave-pad-divisor": ("AVE", (3, 3), (2, 2), (1, 1), (7, 6)),
    "max-pad-negative": ("MAX", (3, 3), (2, 2), (1, 1), (7, 6)),
    "ave-pad-clip-last": ("AVE", (2, 2), (2, 2), (1, 1), (6, 6)),
    "max-asymmetric": ("MAX", (3, 2), (2, 1), (1, 0), (9, 5)),
    "max-2x2-exact": ("MAX", (2, 2), (2, 2), (0, 0), (8, 6)),
}


@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_pooling_follows_caffe_rules(tmp_path, case):
    method, kernel, stride, pad, hw = POOL_CASES[case]
    x = _input((2, 3, *hw), -3.0, -1.0) if "negative" in case else _input((2, 3, *hw))
    params = (f"pool: {method} kernel_h: {kernel[0]} kernel_w: {kernel[1]} stride_h: {stride[0]} "
              f"stride_w: {stride[1]} pad_h: {pad[0]} pad_w: {pad[1]}")
    text = _net(x.shape, f'layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool"\n'
                         f"  pooling_param {{ {params} }} }}")
    ours, theirs = _both(tmp_path, text, {}, x, ["pool"])
    expected = caffe_pool(x, method.lower(), kernel, stride, pad)
    assert ours["pool"].shape == expected.shape
    np.testing.assert_allclose(ours["pool"], expected, atol=1e-6)
    np.testing.assert_allclose(theirs["pool"], expected, atol=1e-6)


def test_pooling_floor_mode(tmp_path):
    x = _input((1, 2, 8, 8))
    expected = caffe_pool(x, "ave", (3, 3), (2, 2), (0, 0), ceil_mode=False)
    for spelling in ("round_mode: FLOOR", "ceil_mode: false"):
        text = _net(x.shape, f'layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool"\n'
                             f"  pooling_param {{ pool: AVE kernel_size: 3 stride: 2 {spelling} }} }}")
        prototxt, _ = write_net(tmp_path, text)
        ours = keras_outputs(convert(prototxt), {"data": x})["pool"]
        assert ours.shape == (1, 2, 3, 3)
        np.testing.assert_allclose(ours, expected, atol=1e-6)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(tmp_path, method):
    x = _input((2, 3, 5, 4))
    text = _net(x.shape, f'layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool"\n'
                         f"  pooling_param {{ pool: {method} global_pooling: true }} }}")
    ours, theirs = _both(tmp_path, text, {}, x, ["pool"])
    expected = x.max(axis=(2, 3), keepdims=True) if method == "MAX" else x.mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(ours["pool"], expected, atol=1e-6)
    np.testing.assert_allclose(theirs["pool"], expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# InnerProduct (P7)
# ----------------------------------------------------------------------------------------------------


def test_inner_product_on_a_spatial_blob_flattens_in_nchw_order(tmp_path):
    x = _input((2, 3, 4, 5))
    w, b = _input((6, 60)), _input((6,))
    text = _net(x.shape, 'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"\n'
                         '  inner_product_param { num_output: 6 } }')
    ours, theirs = _both(tmp_path, text, {"fc": [w, b]}, x, ["fc"])
    expected = x.reshape(2, -1) @ w.T + b
    np.testing.assert_allclose(ours["fc"], expected, atol=1e-5)
    np.testing.assert_allclose(theirs["fc"], expected, atol=1e-5)


def test_inner_product_axis_2_and_transpose(tmp_path):
    x = _input((2, 3, 4, 5))
    w = _input((20, 6))  # transpose: true stores (K, N)
    text = _net(x.shape, 'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"\n'
                         '  inner_product_param { num_output: 6 axis: 2 transpose: true bias_term: false } }')
    prototxt, caffemodel = write_net(tmp_path, text, {"fc": [w]})
    ours = keras_outputs(convert(prototxt, caffemodel), {"data": x})["fc"]
    np.testing.assert_allclose(ours, x.reshape(2, 3, 20) @ w, atol=1e-5)


def test_inner_product_normalize_row_normalises_with_caffe_eps(tmp_path):
    x = _input((3, 5))
    w = _input((4, 5))
    text = _net(x.shape, 'layer { name: "cos" type: "InnerProduct" bottom: "data" top: "cos"\n'
                         '  inner_product_param { num_output: 4 normalize: true bias_term: false } }')
    prototxt, caffemodel = write_net(tmp_path, text, {"cos": [w]})
    ours = keras_outputs(convert(prototxt, caffemodel), {"data": x})["cos"]
    np.testing.assert_allclose(ours, x @ l2_normalize_rows(w, 1e-6).T, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Activations, normalisation, affine layers
# ----------------------------------------------------------------------------------------------------


def test_activations_match_opencv(tmp_path):
    x = _input((2, 4, 3, 3), -2.0, 2.0)
    slopes = RNG.uniform(0.05, 0.5, 4).astype(np.float32)
    body = """
layer { name: "relu" type: "ReLU" bottom: "data" top: "relu" relu_param { negative_slope: 0.1 } }
layer { name: "prelu" type: "PReLU" bottom: "data" top: "prelu" }
layer { name: "prelu_shared" type: "PReLU" bottom: "data" top: "prelu_shared" prelu_param { channel_shared: true } }
layer { name: "sigmoid" type: "Sigmoid" bottom: "data" top: "sigmoid" }
layer { name: "tanh" type: "TanH" bottom: "data" top: "tanh" }
layer { name: "elu" type: "ELU" bottom: "data" top: "elu" elu_param { alpha: 0.7 } }
layer { name: "softmax" type: "Softmax" bottom: "data" top: "softmax" }
layer { name: "drop" type: "Dropout" bottom: "data" top: "drop" dropout_param { dropout_ratio: 0.3 } }
"""
    names = ["relu", "prelu", "prelu_shared", "sigmoid", "tanh", "elu", "softmax", "drop"]
    blobs = {"prelu": [slopes], "prelu_shared": [np.array([0.2], np.float32)]}  # OpenCV cannot read a 0-D blob
    ours, theirs = _both(tmp_path, _net(x.shape, body), blobs, x, names)
    expected = {
        "relu": np.where(x > 0, x, 0.1 * x),
        "prelu": np.where(x > 0, x, slopes.reshape(1, 4, 1, 1) * x),
        "prelu_shared": np.where(x > 0, x, 0.2 * x),
        "sigmoid": 1 / (1 + np.exp(-x)),
        "tanh": np.tanh(x),
        "elu": np.where(x > 0, x, 0.7 * (np.exp(x) - 1)),
        "softmax": np.exp(x) / np.exp(x).sum(axis=1, keepdims=True),
        "drop": x,
    }
    for name in names:
        np.testing.assert_allclose(ours[name], expected[name], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(theirs[name], expected[name], atol=1e-5, err_msg=name)


def test_batchnorm_divides_statistics_by_the_scale_factor_blob(tmp_path):
    x = _input((2, 3, 4, 4))
    mean_sum, var_sum, factor = _input((3,)), RNG.uniform(0.0001, 0.002, 3).astype(np.float32), 4.0
    gamma, beta = _input((3,)), _input((3,))
    body = """
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" }
layer { name: "scale" type: "Scale" bottom: "bn" top: "bn" scale_param { bias_term: true } }
"""
    blobs = {"bn": [mean_sum, var_sum, np.array([factor], np.float32)], "scale": [gamma, beta]}
    ours, theirs = _both(tmp_path, _net(x.shape, body), blobs, x, ["scale"])
    mean, var = mean_sum / factor, var_sum / factor
    expected = (x - mean.reshape(1, 3, 1, 1)) / np.sqrt(var.reshape(1, 3, 1, 1) + 1e-5)
    expected = expected * gamma.reshape(1, 3, 1, 1) + beta.reshape(1, 3, 1, 1)
    np.testing.assert_allclose(ours["bn"], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(theirs["scale"], expected, rtol=1e-4, atol=1e-4)


def test_scale_and_bias_broadcast_over_their_axes(tmp_path):
    x = _input((2, 3, 4, 5))
    chw, scalar, bias_hw = _input((3, 4, 5)), np.array(2.5, np.float32), _input((4, 5))
    body = """
layer { name: "s_chw" type: "Scale" bottom: "data" top: "s_chw" scale_param { axis: 1 num_axes: -1 } }
layer { name: "s_scalar" type: "Scale" bottom: "data" top: "s_scalar" scale_param { num_axes: 0 } }
layer { name: "b_hw" type: "Bias" bottom: "data" top: "b_hw" bias_param { axis: 2 num_axes: 2 } }
"""
    prototxt, caffemodel = write_net(tmp_path, _net(x.shape, body),
                                     {"s_chw": [chw], "s_scalar": [scalar], "b_hw": [bias_hw]})
    ours = keras_outputs(convert(prototxt, caffemodel), {"data": x})
    np.testing.assert_allclose(ours["s_chw"], x * chw[None], atol=1e-6)
    np.testing.assert_allclose(ours["s_scalar"], x * 2.5, atol=1e-6)
    np.testing.assert_allclose(ours["b_hw"], x + bias_hw[None, None], atol=1e-6)


def test_scale_without_caffemodel_uses_its_constant_filler(tmp_path):
    x = _input((2, 4))
    text = _net(x.shape, 'layer { name: "s" type: "Scale" bottom: "data" top: "s"\n'
                         '  scale_param { filler { type: "constant" value: 30 } } }')
    prototxt, _ = write_net(tmp_path, text)
    np.testing.assert_allclose(keras_outputs(convert(prototxt), {"data": x})["s"], 30 * x, rtol=1e-6)


def test_lrn_matches_opencv(tmp_path):
    x = _input((2, 6, 5, 5), 0.0, 3.0)
    body = """
layer { name: "across" type: "LRN" bottom: "data" top: "across" lrn_param { local_size: 5 alpha: 0.1 beta: 0.75 } }
layer { name: "across_k" type: "LRN" bottom: "data" top: "across_k" lrn_param { local_size: 5 alpha: 0.1 beta: 0.75 k: 2 } }
layer { name: "within" type: "LRN" bottom: "data" top: "within"
        lrn_param { local_size: 3 alpha: 0.2 beta: 0.5 norm_region: WITHIN_CHANNEL } }
"""
    ours, theirs = _both(tmp_path, _net(x.shape, body), {}, x, ["across", "within"])
    padded = np.pad(x ** 2, ((0, 0), (2, 2), (0, 0), (0, 0)))
    window_sum = sum(padded[:, i:i + 6] for i in range(5))
    np.testing.assert_allclose(ours["across"], x * (1 + 0.1 / 5 * window_sum) ** -0.75, rtol=1e-5)
    np.testing.assert_allclose(theirs["across"], ours["across"], rtol=1e-5)
    # OpenCV's importer ignores lrn_param.k (it reads a "bias" parameter), so k != 1 is checked against NumPy only.
    np.testing.assert_allclose(ours["across_k"], x * (2 + 0.1 / 5 * window_sum) ** -0.75, rtol=1e-5)
    np.testing.assert_allclose(ours["within"], theirs["within"], rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Blob plumbing
# ----------------------------------------------------------------------------------------------------


def test_eltwise_concat_slice_split_flatten_reshape_match_opencv(tmp_path):
    x = _input((2, 4, 3, 2))
    body = """
layer { name: "split" type: "Split" bottom: "data" top: "a" top: "b" }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" eltwise_param { operation: SUM coeff: 1 coeff: -0.5 } }
layer { name: "prod" type: "Eltwise" bottom: "a" bottom: "b" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "sum" bottom: "prod" top: "max" eltwise_param { operation: MAX } }
layer { name: "cat" type: "Concat" bottom: "max" bottom: "data" top: "cat" }
layer { name: "slice" type: "Slice" bottom: "cat" top: "s1" top: "s2" slice_param { axis: 1 slice_point: 3 } }
layer { name: "flat" type: "Flatten" bottom: "s2" top: "flat" }
layer { name: "reshape" type: "Reshape" bottom: "s1" top: "reshape" reshape_param { shape { dim: 0 dim: 2 dim: -1 dim: 3 } } }
"""
    ours, theirs = _both(tmp_path, _net(x.shape, body), {}, x, ["flat", "reshape"])
    cat = np.concatenate([np.maximum(x - 0.5 * x, x * x), x], axis=1)
    np.testing.assert_allclose(ours["flat"], cat[:, 3:].reshape(2, -1), atol=1e-6)
    np.testing.assert_allclose(ours["reshape"], cat[:, :3].reshape(2, 2, 3, 3), atol=1e-6)
    np.testing.assert_allclose(theirs["flat"], ours["flat"], atol=1e-6)
    np.testing.assert_allclose(theirs["reshape"], ours["reshape"], atol=1e-6)


def test_flip_concat_slice_on_the_batch_axis(tmp_path):
    x = _input((3, 2, 4, 5))
    body = """
layer { name: "flip" type: "Flip" bottom: "data" top: "flip" }
layer { name: "flip_h" type: "Flip" bottom: "data" top: "flip_h" flip_param { flip_width: false flip_height: true } }
layer { name: "cat" type: "Concat" bottom: "data" bottom: "flip" top: "cat" concat_param { axis: 0 } }
layer { name: "slice" type: "Slice" bottom: "cat" top: "orig" top: "mirror" slice_param { axis: 0 } }
layer { name: "norm" type: "Normalize" bottom: "mirror" top: "norm" }
"""
    prototxt, _ = write_net(tmp_path, _net(x.shape, body))
    ours = keras_outputs(convert(prototxt), {"data": x})
    np.testing.assert_array_equal(ours["flip_h"], x[:, :, ::-1, :])
    np.testing.assert_array_equal(ours["orig"], x)
    mirrored = x[..., ::-1]
    np.testing.assert_allclose(ours["norm"], mirrored / np.sqrt((mirrored ** 2).sum(axis=1, keepdims=True) + 1e-6),
                               atol=1e-6)


def test_image_data_transform_becomes_a_rescaling_step(tmp_path):
    text = """
layer { name: "data" type: "ImageData" top: "data" top: "label"
  transform_param { mean_value: 104 mean_value: 117 mean_value: 123 scale: 0.5 crop_size: 6 }
  image_data_param { source: "list.txt" } }
layer { name: "relu" type: "ReLU" bottom: "data" top: "relu" }
"""
    prototxt, _ = write_net(tmp_path, text)
    conversion = convert(prototxt)
    raw = RNG.uniform(0, 255, (2, 3, 6, 6)).astype(np.float32)
    out = keras_outputs(conversion, {"data": raw})["relu"]
    expected = np.maximum((raw - np.array([104, 117, 123]).reshape(1, 3, 1, 1)) * 0.5, 0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    assert any("BGR" in note for note in conversion.notes)
    assert [tensor.name for tensor in conversion.model.inputs] == ["data"]  # the label is not an input


def test_layers_caffe_never_updates_are_frozen(tmp_path):
    body = """
layer { name: "fixed" type: "Convolution" bottom: "data" top: "fixed" param { lr_mult: 0 } param { lr_mult: 0 }
        convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "learned" type: "Convolution" bottom: "fixed" top: "learned" param { lr_mult: 1 } param { lr_mult: 0 }
        convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "bn_frozen" type: "BatchNorm" bottom: "learned" top: "bn_frozen" batch_norm_param { use_global_stats: true } }
layer { name: "bn" type: "BatchNorm" bottom: "bn_frozen" top: "bn" param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 } }
"""
    prototxt, _ = write_net(tmp_path, _net((1, 2, 3, 3), body))
    model = convert(prototxt, phase="TRAIN").model
    trainable = {name: model.get_layer(name).trainable for name in ("fixed", "learned", "bn_frozen", "bn")}
    # A BatchNorm's lr_mult 0 is about its statistics blobs; only use_global_stats freezes it.
    assert trainable == {"fixed": False, "learned": True, "bn_frozen": False, "bn": True}
