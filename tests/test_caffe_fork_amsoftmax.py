"""The happynear fork's layers of the AM-Softmax repository's nets convert to what the fork's C++ computes.

Normalize with its second top (the norm), ChannelScale, GlobalLSEMargin, BatchNorm's ``disable_mean`` /
``disable_variance`` and default ``moving_average_fraction``, and BVLC's Reduction. The references are NumPy
transcriptions, written here from happynear/caffe-windows (branch ms) ``normalize_layer.cpp``,
``channel_scale_layer.cpp``/``.cu``, ``global_lse_margin_layer.cu`` (the layer has no CPU forward),
``batch_norm_layer.cpp`` and BVLC's ``reduction_layer.cpp``, loop for loop; OpenCV runs the same nets through
the handlers' stand-ins (``parity_report``). The published GNAP, ``face_train_test_wo_fn`` and
``face_train_test_auto`` prototxts convert in TEST and TRAIN (skipped without the shared folder).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from converters.caffe import ConversionError, convert, parity_report
from converters.caffe.layers import ChannelScale, GlobalLSEMargin
from tests.caffe_nets import SHARED, keras_outputs, nchw, nhwc, shared_missing, write_net

REAL = SHARED / "caffe" / "real"
REAL_MISSING = shared_missing(REAL, "the published prototxts (caffe/real)")
FLT_MAX = float(np.finfo(np.float32).max)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _input_layer(**shapes) -> str:
    tops = "".join(f' top: "{name}"' for name in shapes)
    dims = "".join(" shape {" + "".join(f" dim: {d}" for d in shape) + " }" for shape in shapes.values())
    return f'layer {{ name: "input" type: "Input"{tops} input_param {{{dims} }} }}\n'


def _weightless(tmp_path, text: str, layer: str):
    """(prototxt, caffemodel) for a net without blobs: the caffemodel lists ``layer`` with none (the parity check
    needs a caffemodel file, and an empty one is not a caffemodel)."""
    return write_net(tmp_path, text, {layer: []})


def _run(conversion, feeds: dict, names: list[str], training: bool = False) -> dict:
    """{Caffe blob name: NCHW value} of the named blobs (their last version), fed NCHW ``feeds``."""
    model, final = conversion.model, conversion.plan.final_blob_ids()
    probe = keras.Model(model.inputs, [conversion.tensors[final[name]] for name in names])
    arrays = [nhwc(feeds[tensor.name]) for tensor in model.inputs]
    values = probe(arrays, training=training)
    values = values if isinstance(values, (list, tuple)) else [values]
    return {name: nchw(np.asarray(value)) for name, value in zip(names, values)}


# ----------------------------------------------------------------------------------------------------
# NumPy transcriptions of the fork's C++ (independent of the converter)
# ----------------------------------------------------------------------------------------------------


def np_normalize(x: np.ndarray, kind: str = "L2"):
    """normalize_layer.cpp Forward_cpu: (top, norm) with norm N x 1 x H x W (spatial_dim = H W)."""
    num, channels = x.shape[:2]
    spatial = int(np.prod(x.shape[2:], dtype=np.int64))
    data = x.astype(np.float64).reshape(num, channels, spatial)
    top, norm = np.empty_like(data), np.empty((num, spatial))
    for n in range(num):
        for s in range(spatial):
            if kind == "L2":
                norm[n, s] = math.sqrt(sum(data[n, c, s] ** 2 for c in range(channels)) + 1e-6)
            else:
                norm[n, s] = sum(abs(data[n, c, s]) for c in range(channels)) + 1e-6
            top[n, :, s] = data[n, :, s] / norm[n, s]
    return top.reshape(x.shape), norm.reshape(num, 1, *x.shape[2:])


def np_normalize_backward(x, top_diff, norm_diff, kind: str, bp_norm: bool):
    """normalize_layer.cpp Backward_cpu (L2: (dy - y a) / norm, L1: (dy - sign(x) a) / norm; bp_norm adds
    dnorm * y (L2) or dnorm * sign(x) (L1))."""
    top, norm = np_normalize(x, kind)
    num, channels = x.shape[:2]
    spatial = int(np.prod(x.shape[2:], dtype=np.int64))
    y, dy = top.reshape(num, channels, spatial), top_diff.astype(np.float64).reshape(num, channels, spatial)
    xs, nrm = x.astype(np.float64).reshape(num, channels, spatial), norm.reshape(num, spatial)
    dn = norm_diff.astype(np.float64).reshape(num, spatial)
    dx = np.empty_like(y)
    for n in range(num):
        for s in range(spatial):
            a = float(np.dot(y[n, :, s], dy[n, :, s]))
            other = y[n, :, s] if kind == "L2" else np.sign(xs[n, :, s])
            dx[n, :, s] = (dy[n, :, s] - other * a) / nrm[n, s]
            if bp_norm:
                dx[n, :, s] += dn[n, s] * other
    return dx.reshape(x.shape)


def np_reduction(x: np.ndarray, operation: str, axis: int, coeff: float = 1.0) -> np.ndarray:
    """reduction_layer.cpp: num_ = count(0, axis) outputs, each over dim_ = count(axis) values; MEAN divides
    coeff by dim_ in LayerSetUp."""
    num = int(np.prod(x.shape[:axis], dtype=np.int64))
    data = x.astype(np.float64).reshape(num, -1)
    dim = data.shape[1]
    scale = coeff / dim if operation == "MEAN" else coeff
    out = np.empty(num)
    for i in range(num):
        row = data[i]
        out[i] = {"SUM": row.sum(), "MEAN": row.sum(), "ASUM": np.abs(row).sum(), "SUMSQ": np.dot(row, row)}[operation]
        out[i] *= scale
    return out.reshape(x.shape[:axis])


def np_channel_scale(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """channel_scale_layer.cpp Forward_cpu: top[(n C + c) S + s] = scale[n S + s] * bottom[(n C + c) S + s]."""
    num, channels = x.shape[:2]
    spatial = int(np.prod(x.shape[2:], dtype=np.int64))
    bottom, scale_data = x.astype(np.float64).ravel(), scale.astype(np.float64).ravel()
    top = np.empty_like(bottom)
    for n in range(num):
        for s in range(spatial):
            for c in range(channels):
                top[(n * channels + c) * spatial + s] = scale_data[n * spatial + s] * bottom[(n * channels + c) * spatial + s]
    return top.reshape(x.shape)


def np_channel_scale_backward(x, scale, top_diff, do_backward_feature=True, do_backward_scale=True):
    """channel_scale_layer.cpp Backward_cpu: (bottom_diff, scale_diff)."""
    num, channels = x.shape[:2]
    spatial = int(np.prod(x.shape[2:], dtype=np.int64))
    xs = x.astype(np.float64).reshape(num, channels, spatial)
    ss = scale.astype(np.float64).reshape(num, 1, spatial)
    dy = top_diff.astype(np.float64).reshape(num, channels, spatial)
    bottom_diff = ss * dy if do_backward_feature else dy
    scale_diff = (xs * dy).sum(axis=1) if do_backward_scale else np.zeros((num, spatial))
    return bottom_diff.reshape(x.shape), scale_diff.reshape(scale.shape)


def np_global_scale_train(scale_blob: float, scale_bottom: np.ndarray, lo: float, hi: float) -> float:
    """channel_scale_layer.cu Forward_gpu, global_scale in TRAIN: the blob's running mean of |bottom[1]|."""
    mean_norm = np.abs(scale_bottom.astype(np.float64)).sum() / scale_bottom.size
    value = mean_norm if scale_blob < 0 else scale_blob * 0.99 + mean_norm * 0.01
    return max(min(value, hi), lo)


def np_mean_shift(margins, mu: float, loop: int = 1) -> float:
    """global_lse_margin_layer.cu MeanShift, statement for statement (``while (loop--)``, the re-initialising
    ``loop++; continue``); raises where the C++ would never return."""
    last_mu, restarts = mu, 0
    while loop:
        loop -= 1
        near = [m for m in margins if abs(m - mu) < 0.1]
        if not near:
            restarts += 1
            if restarts > 1:
                raise RuntimeError("the fork's MeanShift loops forever here")
            mu = sum(margins) / len(margins)
            last_mu = mu
            loop += 1
            continue
        restarts = 0
        mu = sum(near) / len(near)
        if abs(last_mu - mu) < 0.001:
            break
        last_mu = mu
    return mu


def np_global_lse_margin(x, labels, scale: float, margin: float, lo: float = 0.0, hi: float = FLT_MAX, norm=None):
    """global_lse_margin_layer.cu Forward_gpu: (top, statistics, new scale blob, new margin blob)."""
    x = x.astype(np.float64)
    num, dim = x.shape
    scale = min(max(scale, lo), hi)
    per_sample = [scale] * num if norm is None else [float(v) for v in np.ravel(norm)]
    target = [x[i, int(labels[i])] for i in range(num)]
    max_negative = []
    for i in range(num):
        gt, value = int(labels[i]), -1.0
        for j in range(dim):
            if j != gt and x[i, j] > value:
                value = x[i, j]
        max_negative.append(value)
    lse = []
    for i in range(num):
        gt = int(labels[i])
        total = sum(0.0 if j == gt else math.exp(per_sample[i] * (x[i, j] - max_negative[i])) for j in range(dim))
        lse.append(math.log(total) / per_sample[i] + max_negative[i])
    margins = [t - v for t, v in zip(target, lse)]
    if margin == 0:
        batch_margin = np_mean_shift(margins, sum(margins) / num, 20)
        if not math.isnan(batch_margin):
            margin = batch_margin
    else:
        batch_margin = np_mean_shift(margins, margin)
        if not math.isnan(batch_margin):
            margin = 0.9 * margin + 0.1 * batch_margin
    top = x.copy()
    for i in range(num):
        if margin > 0:
            top[i, int(labels[i])] = x[i, int(labels[i])] - margin
        top[i] *= per_sample[i]
    first = scale if norm is None else float(np.mean(per_sample))
    statistics = np.array([first, np.mean(target), np.mean(lse), np.mean(max_negative), margin])
    return top, statistics, scale, margin


def np_batch_norm(x, blobs, eps=1e-5, maf=0.999, use_global_stats=True, disable_mean=False,
                  disable_variance=False):
    """batch_norm_layer.cpp Forward_cpu of the fork: (top, updated blobs)."""
    x = x.astype(np.float64)
    channels = x.shape[1]
    axes = tuple(i for i in range(x.ndim) if i != 1)
    shape = [1] * x.ndim
    shape[1] = channels
    mean_sum, var_sum, factor = (np.array(b, np.float64).copy() for b in blobs)
    top = x.copy()
    if use_global_stats:
        scale_factor = 0.0 if factor[0] == 0 else 1.0 / factor[0]
        mean, variance = mean_sum * scale_factor, var_sum * scale_factor
    elif not disable_mean:
        mean = x.mean(axis=axes)
    if not disable_mean:
        top = top - mean.reshape(shape)
    if not use_global_stats:
        if not disable_variance:
            variance = (top * top).mean(axis=axes)
        factor = factor * maf + 1
        if not disable_mean:
            mean_sum = mean + maf * mean_sum
        if not disable_variance:
            m = x.size // channels
            var_sum = (m / (m - 1) if m > 1 else 1) * variance + maf * var_sum
    if not disable_variance:
        top = top / np.sqrt(variance + eps).reshape(shape)
    return top, [mean_sum, var_sum, factor]


def np_ave_global_pool(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64).mean(axis=(2, 3), keepdims=True)


# ----------------------------------------------------------------------------------------------------
# Normalize: the second top
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["L2", "L1"])
def test_normalize_second_top_is_the_channel_norm(tmp_path, kind):
    x = _rng(1).uniform(-1, 1, (2, 5, 3, 4)).astype(np.float32)
    text = (_input_layer(x=x.shape) + 'layer { name: "norm" type: "Normalize" bottom: "x" top: "y" top: "n"\n'
            f'  normalize_param {{ normalize_type: "{kind}" }} }}\n')
    prototxt, _ = write_net(tmp_path, text)
    conversion = convert(prototxt)
    assert conversion.plan.blob_shapes["n"] == (None, 1, 3, 4)
    ours = keras_outputs(conversion, {"x": x})
    top, norm = np_normalize(x, kind)
    np.testing.assert_allclose(ours["y"], top, atol=1e-6)
    np.testing.assert_allclose(ours["n"], norm, rtol=1e-6)


def test_normalize_second_top_of_a_2d_bottom_is_n_by_1_and_opencv_agrees(tmp_path):
    x = _rng(2).uniform(-2, 2, (3, 7)).astype(np.float32)
    text = _input_layer(x=x.shape) + 'layer { name: "norm" type: "Normalize" bottom: "x" top: "y" top: "n" }\n'
    prototxt, caffemodel = _weightless(tmp_path, text, "norm")
    conversion = convert(prototxt, caffemodel)
    assert conversion.plan.blob_shapes["n"] == (None, 1)
    ours = keras_outputs(conversion, {"x": x})
    top, norm = np_normalize(x)
    np.testing.assert_allclose(ours["n"], norm.reshape(3, 1), rtol=1e-6)
    np.testing.assert_allclose(ours["y"], top, atol=1e-6)
    report = parity_report(prototxt, caffemodel, "opencv", inputs={"x": x})
    assert report.ok and [row.blob for row in report.rows] == ["y", "n"], str(report)


@pytest.mark.parametrize("kind,bp_norm", [("L2", True), ("L2", False), ("L1", True)])
def test_normalize_gradients_follow_the_fork_backward_and_bp_norm(tmp_path, kind, bp_norm):
    x = _rng(3).uniform(-1, 1, (2, 4, 2, 3)).astype(np.float32)
    text = (_input_layer(x=x.shape) + 'layer { name: "norm" type: "Normalize" bottom: "x" top: "y" top: "n"\n'
            f'  normalize_param {{ normalize_type: "{kind}" bp_norm: {str(bp_norm).lower()} }} }}\n')
    prototxt, _ = write_net(tmp_path, text)
    model = convert(prototxt).model
    dy = _rng(4).uniform(-1, 1, x.shape).astype(np.float32)
    dn = _rng(5).uniform(-1, 1, (2, 1, 2, 3)).astype(np.float32)
    inputs = tf.constant(nhwc(x))
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        y, n = model(inputs)
        loss = tf.reduce_sum(y * nhwc(dy)) + tf.reduce_sum(n * nhwc(dn))
    grad = nchw(tape.gradient(loss, inputs).numpy())
    np.testing.assert_allclose(grad, np_normalize_backward(x, dy, dn, kind, bp_norm), atol=2e-5)


def test_normalize_with_three_tops_is_refused_naming_the_layer(tmp_path):
    text = _input_layer(x=(2, 4)) + 'layer { name: "norm3" type: "Normalize" bottom: "x" top: "a" top: "b" top: "c" }\n'
    prototxt, _ = write_net(tmp_path, text)
    with pytest.raises(ConversionError, match="norm3"):
        convert(prototxt)


# ----------------------------------------------------------------------------------------------------
# Reduction
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("operation,axis,coeff", [("SUM", 1, 1.0), ("ASUM", 2, 0.5), ("SUMSQ", 3, -2.0),
                                                  ("MEAN", 1, 1.0), ("MEAN", -2, 3.0)])
def test_reduction_reduces_every_axis_from_axis_on_in_caffe_order(tmp_path, operation, axis, coeff):
    x = _rng(6).uniform(-1, 1, (2, 3, 4, 5)).astype(np.float32)
    text = (_input_layer(x=x.shape) + 'layer { name: "red" type: "Reduction" bottom: "x" top: "r"\n'
            f"  reduction_param {{ operation: {operation} axis: {axis} coeff: {coeff} }} }}\n")
    prototxt, caffemodel = _weightless(tmp_path, text, "red")
    conversion = convert(prototxt, caffemodel)
    canonical = axis % 4
    assert conversion.plan.blob_shapes["r"] == (None, 3, 4, 5)[:canonical]
    ours = keras_outputs(conversion, {"x": x})
    np.testing.assert_allclose(ours["r"], np_reduction(x, operation, canonical, coeff), rtol=1e-5, atol=1e-5)
    if canonical != 3:  # cv2 turns a 3-D Python-layer output into a multi-channel 2-D Mat and refuses it
        report = parity_report(prototxt, caffemodel, "opencv", inputs={"x": x})
        assert report.ok, str(report)


def test_reduction_over_the_batch_is_refused_naming_the_layer(tmp_path):
    text = _input_layer(x=(2, 3)) + 'layer { name: "total" type: "Reduction" bottom: "x" top: "r" }\n'
    prototxt, _ = write_net(tmp_path, text)
    with pytest.raises(ConversionError, match="total.*axis 0"):
        convert(prototxt)


# ----------------------------------------------------------------------------------------------------
# ChannelScale
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_shape,s_shape", [((2, 3, 4, 5), (2, 1, 4, 5)), ((3, 6), (3, 1)), ((2, 4, 1, 1), (2,)),
                                             ((2, 3, 2, 2), (2, 2, 2, 1)), ((2, 3, 4), (2, 4))])
def test_channel_scale_multiplies_every_channel_by_the_positions_scale(tmp_path, x_shape, s_shape):
    rng = _rng(7)
    x, s = rng.uniform(-1, 1, x_shape).astype(np.float32), rng.uniform(0.5, 2, s_shape).astype(np.float32)
    text = _input_layer(x=x_shape, s=s_shape) + ('layer { name: "cs" type: "ChannelScale" bottom: "x" bottom: "s" '
                                                 'top: "y" }\n')
    prototxt, caffemodel = _weightless(tmp_path, text, "cs")
    ours = keras_outputs(convert(prototxt, caffemodel), {"x": x, "s": s})
    np.testing.assert_allclose(ours["y"], np_channel_scale(x, s), rtol=1e-6)
    if len(x_shape) != 3:  # cv2 reads a 3-D array as a multi-channel 2-D Mat
        report = parity_report(prototxt, caffemodel, "opencv", inputs={"x": x, "s": s})
        assert report.ok, str(report)


@pytest.mark.parametrize("feature,scale", [(True, True), (False, True), (True, False), (False, False)])
def test_channel_scale_gradients_follow_the_fork_backward(tmp_path, feature, scale):
    rng = _rng(8)
    x, s = rng.uniform(-1, 1, (2, 3, 2, 2)).astype(np.float32), rng.uniform(0.5, 2, (2, 1, 2, 2)).astype(np.float32)
    dy = rng.uniform(-1, 1, x.shape).astype(np.float32)
    text = _input_layer(x=x.shape, s=s.shape) + (
        'layer { name: "cs" type: "ChannelScale" bottom: "x" bottom: "s" top: "y"\n'
        f"  channel_scale_param {{ do_backward_feature: {str(feature).lower()} "
        f"do_backward_scale: {str(scale).lower()} }} }}\n")
    prototxt, _ = write_net(tmp_path, text)
    model = convert(prototxt).model
    xs, ss = tf.constant(nhwc(x)), tf.constant(nhwc(s))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([xs, ss])
        loss = tf.reduce_sum(model([xs, ss]) * nhwc(dy))
    dx, ds = tape.gradient(loss, [xs, ss], unconnected_gradients="zero")
    want_dx, want_ds = np_channel_scale_backward(x, s, dy, feature, scale)
    np.testing.assert_allclose(nchw(dx.numpy()), want_dx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nchw(ds.numpy()), want_ds, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nchw(model([xs, ss]).numpy()), np_channel_scale(x, s), rtol=1e-6)


def test_channel_scale_do_forward_false_is_the_identity(tmp_path):
    x, s = _rng(9).uniform(-1, 1, (2, 5)).astype(np.float32), np.full((2, 1), 3.0, np.float32)
    text = _input_layer(x=x.shape, s=s.shape) + ('layer { name: "cs" type: "ChannelScale" bottom: "x" bottom: "s" '
                                                 'top: "y" channel_scale_param { do_forward: false } }\n')
    prototxt, _ = write_net(tmp_path, text)
    np.testing.assert_array_equal(keras_outputs(convert(prototxt), {"x": x, "s": s})["y"], x)


def test_channel_scale_global_uses_the_stored_scale_and_learns_its_running_mean(tmp_path):
    rng = _rng(10)
    x, s = rng.uniform(-1, 1, (2, 3, 2, 2)).astype(np.float32), rng.uniform(1, 4, (2, 1, 2, 2)).astype(np.float32)
    text = _input_layer(x=x.shape, s=s.shape) + (
        'layer { name: "cs" type: "ChannelScale" bottom: "x" bottom: "s" top: "y" top: "g"\n'
        "  channel_scale_param { global_scale: true min_global_scale: 0.5 max_global_scale: 2.2 } }\n")
    prototxt, caffemodel = write_net(tmp_path, text, {"cs": [np.array([1.5], np.float32)]})
    conversion = convert(prototxt, caffemodel)
    assert conversion.plan.blob_shapes["g"] == (1,) and conversion.plan.layer_weight_shapes["cs"] == [(1,)]
    ours = _run(conversion, {"x": x, "s": s}, ["y", "g"])
    np.testing.assert_allclose(ours["y"], 1.5 * x.astype(np.float64), rtol=1e-6)  # TEST: the stored blob
    np.testing.assert_allclose(ours["g"], [1.5])
    report = parity_report(conversion=conversion, caffemodel=caffemodel, reference="opencv", inputs={"x": x, "s": s})
    assert report.ok, str(report)
    expected = 1.5
    for _ in range(2):  # TRAIN: blob = 0.99 blob + 0.01 mean|s|, clamped to [0.5, 2.2]
        expected = np_global_scale_train(expected, s, 0.5, 2.2)
        trained = _run(conversion, {"x": x, "s": s}, ["y", "g"], training=True)
        np.testing.assert_allclose(trained["y"], expected * x.astype(np.float64), rtol=1e-5)
        np.testing.assert_allclose(trained["g"], [expected], rtol=1e-6)
    fresh = ChannelScale((2, 2, 1), global_scale=True, max_global_scale=2.2)  # blob -1: the first batch sets it
    value = fresh([nhwc(x), nhwc(s)], training=True)
    np.testing.assert_allclose(nchw(np.asarray(value)), np_global_scale_train(-1.0, s, 0.0, 2.2) * x, rtol=1e-5)


@pytest.mark.parametrize("s_shape,tops,message", [((2, 3), 1, "one per position"), ((2, 1), 2, "global_scale")])
def test_channel_scale_bad_bottoms_or_tops_are_refused_naming_the_layer(tmp_path, s_shape, tops, message):
    top_text = "".join(f' top: "t{i}"' for i in range(tops))
    text = _input_layer(x=(2, 4), s=s_shape) + f'layer {{ name: "cs1" type: "ChannelScale" bottom: "x" bottom: "s"{top_text} }}\n'
    prototxt, _ = write_net(tmp_path, text)
    with pytest.raises(ConversionError, match=f"cs1.*{message}"):
        convert(prototxt)


# ----------------------------------------------------------------------------------------------------
# GlobalLSEMargin
# ----------------------------------------------------------------------------------------------------


def _cosines(seed: int, num: int = 8, classes: int = 10, target_range=(0.55, 0.95)):
    """Cosine logits whose target entries are high, so the estimated margin is positive."""
    rng = _rng(seed)
    x = rng.uniform(-0.3, 0.3, (num, classes))
    labels = rng.integers(0, classes, num)
    x[np.arange(num), labels] = rng.uniform(*target_range, num)
    return x.astype(np.float32), labels.astype(np.float32)


def _lse_net(tmp_path, num, classes, scale=30.0, margin=0.0, extra="", norm=False):
    shapes = {"x": (num, classes), "label": (num,)}
    if norm:
        shapes["norm"] = (num, 1)
    text = _input_layer(**shapes) + (
        'layer { name: "margin" type: "GlobalLSEMargin" bottom: "x" bottom: "label"'
        + (' bottom: "norm"' if norm else "") + f' top: "out" top: "statistics" {extra} }}\n')
    return write_net(tmp_path, text, {"margin": [np.array([scale], np.float32), np.array([margin], np.float32)]})


def test_global_lse_margin_first_call_estimates_the_margin_and_later_calls_average_it(tmp_path):
    x, labels = _cosines(11)
    prototxt, caffemodel = _lse_net(tmp_path, *x.shape)
    conversion = convert(prototxt, caffemodel)
    assert conversion.plan.blob_shapes["statistics"] == (5,)
    assert {tensor.name for tensor in conversion.model.inputs} == {"x", "label"}
    layer = conversion.model.get_layer("margin")
    margin = 0.0
    for step in range(3):
        x_step = x if step == 0 else _cosines(11 + step)[0]
        top, statistics, _, margin = np_global_lse_margin(x_step, labels, 30.0, margin)
        ours = keras_outputs(conversion, {"x": x_step, "label": labels})
        np.testing.assert_allclose(ours["out"], top, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ours["statistics"], statistics, rtol=1e-4, atol=1e-5)
        assert float(layer.margin.numpy()[0]) == pytest.approx(margin, abs=1e-5)  # saved state, as blob 1
    assert 0 < margin < 1 and statistics[0] == 30.0


def test_global_lse_margin_is_the_same_in_training_and_uses_the_stored_blobs(tmp_path):
    x, labels = _cosines(12)
    prototxt, caffemodel = _lse_net(tmp_path, *x.shape, scale=50.0, margin=0.3,
                                    extra="scale_param { min_value: 5 max_value: 40 }")
    conversion = convert(prototxt, caffemodel)
    layer = conversion.model.get_layer("margin")
    assert float(layer.scale.numpy()[0]) == 40.0  # the fork clamps blob 0 to [min_value, max_value] in place
    top, statistics, _, margin = np_global_lse_margin(x, labels, 50.0, 0.3, 5.0, 40.0)
    ours = _run(conversion, {"x": x, "label": labels}, ["out", "statistics"], training=True)
    np.testing.assert_allclose(ours["out"], top, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours["statistics"], statistics, rtol=1e-4, atol=1e-5)
    assert statistics[0] == 40.0
    assert margin == pytest.approx(0.9 * 0.3 + 0.1 * np_mean_shift(_margins(x, labels, 40.0), 0.3))


def _margins(x, labels, s):
    """target - LSE of the others per sample (global_lse_margin_layer.cu CalcLSE), for the MeanShift check."""
    x = x.astype(np.float64)
    out = []
    for i, gt in enumerate(labels.astype(int)):
        others = np.delete(x[i], gt)
        peak = max(-1.0, others.max())
        out.append(x[i, gt] - (math.log(np.exp(s * (others - peak)).sum()) / s + peak))
    return out


def test_global_lse_margin_negative_margin_is_not_subtracted_and_a_far_margin_restarts(tmp_path):
    x, labels = _cosines(13, target_range=(-0.2, 0.2))  # targets like the others: the margin is negative
    prototxt, caffemodel = _lse_net(tmp_path, *x.shape, margin=5.0)  # no margin within 0.1: MeanShift restarts
    conversion = convert(prototxt, caffemodel)
    top, statistics, _, margin = np_global_lse_margin(x, labels, 30.0, 5.0)
    ours = keras_outputs(conversion, {"x": x, "label": labels})
    np.testing.assert_allclose(ours["statistics"], statistics, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours["out"], top, rtol=1e-4, atol=1e-4)
    margins = np.asarray(_margins(x, labels, 30.0))
    restart = margins.mean()  # then the one MeanShift step (the restart does not use it up)
    assert margin == pytest.approx(0.9 * 5.0 + 0.1 * margins[np.abs(margins - restart) < 0.1].mean())
    (tmp_path / "fresh").mkdir()
    conversion = convert(*_lse_net(tmp_path / "fresh", *x.shape))
    top, statistics, _, margin = np_global_lse_margin(x, labels, 30.0, 0.0)
    assert margin < 0
    ours = keras_outputs(conversion, {"x": x, "label": labels})
    np.testing.assert_allclose(ours["out"], 30.0 * x.astype(np.float64), rtol=1e-5)  # margin <= 0: none applied
    np.testing.assert_allclose(ours["statistics"], statistics, rtol=1e-4, atol=1e-5)


def test_global_lse_margin_third_bottom_is_a_per_sample_scale(tmp_path):
    x, labels = _cosines(15)
    norm = _rng(15).uniform(5, 20, (x.shape[0], 1)).astype(np.float32)
    prototxt, caffemodel = _lse_net(tmp_path, *x.shape, norm=True)
    conversion = convert(prototxt, caffemodel)
    assert not conversion.model.get_layer("margin").scale.trainable  # LayerSetUp: lr_mult 0 with 3 bottoms
    top, statistics, _, _ = np_global_lse_margin(x, labels, 30.0, 0.0, norm=norm)
    ours = keras_outputs(conversion, {"x": x, "label": labels, "norm": norm})
    np.testing.assert_allclose(ours["out"], top, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours["statistics"], statistics, rtol=1e-4, atol=1e-5)


def test_global_lse_margin_gradients_follow_the_fork_backward():
    x, labels = _cosines(16)
    layer = GlobalLSEMargin(initial_scale=20.0, return_statistics=False)
    dy = _rng(16).uniform(-1, 1, x.shape).astype(np.float32)
    xs = tf.constant(x)
    layer([xs, labels])  # builds it and sets the margin (first call)
    with tf.GradientTape() as tape:
        tape.watch(xs)
        out = layer([xs, labels], training=True)
        loss = tf.reduce_sum(out * dy)
    dx, dscale = tape.gradient(loss, [xs, layer.scale])
    # Backward_gpu: bottom_diff = s * top_diff (the margin is a constant); blob 0 diff = dot(top_diff, top) / s
    np.testing.assert_allclose(dx.numpy(), 20.0 * dy, rtol=1e-6)
    np.testing.assert_allclose(dscale.numpy(), [np.sum(dy * out.numpy()) / 20.0], rtol=1e-5)


def test_global_lse_margin_parity_with_opencv_and_with_numpy_blobs(tmp_path):
    x, labels = _cosines(17)
    prototxt, caffemodel = _lse_net(tmp_path, *x.shape, scale=16.0)
    feeds = {"x": x, "label": labels}
    report = parity_report(prototxt, caffemodel, "opencv", inputs=feeds)
    assert report.ok and [row.blob for row in report.rows] == ["out", "statistics"], str(report)
    top, statistics, _, _ = np_global_lse_margin(x, labels, 16.0, 0.0)
    reference = tmp_path / "blobs.npz"
    np.savez(reference, x=x, label=labels, out=top, statistics=statistics)
    report = parity_report(prototxt, caffemodel, reference=reference)
    assert report.ok and len(report.rows) == 2, str(report)


def test_global_lse_margin_non_2d_logits_or_a_wide_label_are_refused(tmp_path):
    text = _input_layer(x=(2, 4), label=(2, 2)) + ('layer { name: "lse" type: "GlobalLSEMargin" bottom: "x" '
                                                   'bottom: "label" top: "o" }\n')
    prototxt, _ = write_net(tmp_path, text)
    with pytest.raises(ConversionError, match="lse.*one value per sample"):
        convert(prototxt)


# ----------------------------------------------------------------------------------------------------
# BatchNorm: disable_mean / disable_variance, the fork's moving_average_fraction default
# ----------------------------------------------------------------------------------------------------


def _bn_blobs(channels: int, seed: int):
    rng = _rng(seed)
    factor = 2.5
    return [(rng.uniform(-1, 1, channels) * factor).astype(np.float32),
            (rng.uniform(0.5, 2, channels) * factor).astype(np.float32), np.array([factor], np.float32)]


@pytest.mark.parametrize("flags", [dict(disable_mean=True), dict(disable_variance=True),
                                   dict(disable_mean=True, disable_variance=True)])
def test_batch_norm_disable_flags_act_with_the_stored_statistics_and_in_training(tmp_path, flags):
    x = _rng(18).uniform(-2, 2, (4, 3, 2, 2)).astype(np.float32)
    blobs = _bn_blobs(3, 19)
    settings = " ".join(f"{key}: true" for key in flags)
    text = _input_layer(x=x.shape) + f'layer {{ name: "bn" type: "BatchNorm" bottom: "x" top: "x" ' \
                                     f"batch_norm_param {{ {settings} }} }}\n"
    prototxt, caffemodel = write_net(tmp_path, text, {"bn": blobs})
    conversion = convert(prototxt, caffemodel)
    tested = _run(conversion, {"x": x}, ["x"])
    np.testing.assert_allclose(tested["x"], np_batch_norm(x, blobs, **flags)[0], rtol=1e-5, atol=1e-6)
    report = parity_report(conversion=conversion, caffemodel=caffemodel, reference="opencv", inputs={"x": x})
    assert report.ok, str(report)  # OpenCV ignores the flags: the handler's stand-in runs the fork's arithmetic
    layer, state = conversion.model.get_layer("bn"), blobs
    # disable_mean / disable_variance exist only in happynear's fork, so the reader reads the net as happynear's
    # and an unset moving_average_fraction takes that fork's default, 0.99
    assert conversion.plan.dialect == "happynear"
    for _ in range(2):  # TRAIN: batch statistics, Caffe's sums updated
        want, state = np_batch_norm(x, state, maf=0.99, use_global_stats=False, **flags)
        trained = _run(conversion, {"x": x}, ["x"], training=True)
        np.testing.assert_allclose(trained["x"], want, rtol=1e-4, atol=1e-5)
        for variable, value in zip((layer.mean_sum, layer.variance_sum, layer.factor), state):
            np.testing.assert_allclose(variable.numpy(), value, rtol=1e-5, atol=1e-6)


def test_batch_norm_moving_average_fraction_default_is_the_forks_in_a_happynear_net(tmp_path):
    bvlc = _input_layer(x=(2, 3)) + 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" }\n'
    forked = bvlc + 'layer { name: "norm" type: "Normalize" bottom: "x" top: "y" }\n'
    given = forked.replace('top: "x" }', 'top: "x" batch_norm_param { moving_average_fraction: 0.9 } }')
    momenta = []
    for index, text in enumerate((bvlc, forked, given)):
        prototxt, _ = write_net(tmp_path, text, name=f"net{index}")
        momenta.append(convert(prototxt).model.get_layer("bn").momentum)
    assert momenta == pytest.approx([0.999, 0.99, 0.9])
    disabled = forked.replace('top: "x" }', 'top: "x" batch_norm_param { disable_variance: true } }', 1)
    prototxt, _ = write_net(tmp_path, disabled, name="net3")
    layer = convert(prototxt).model.get_layer("bn")
    assert layer.moving_average_fraction == pytest.approx(0.99)
    x = _rng(20).uniform(-1, 1, (5, 3)).astype(np.float32)
    layer(x, training=True)  # CaffeBatchNorm: factor = 0.99 * 0 + 1, mean_sum = mean + 0.99 * 0
    want = np_batch_norm(x, [np.zeros(3), np.zeros(3), np.zeros(1)], maf=0.99, use_global_stats=False,
                         disable_variance=True)[1]
    np.testing.assert_allclose(layer.mean_sum.numpy(), want[0], rtol=1e-5)
    np.testing.assert_allclose(layer.factor.numpy(), want[2])


# ----------------------------------------------------------------------------------------------------
# The Keras layers reload from a .keras file with their state
# ----------------------------------------------------------------------------------------------------


def test_fork_layers_reload_from_a_keras_file_with_their_state(tmp_path):
    x, labels = _cosines(21, num=4, classes=6)
    text = _input_layer(x=(4, 6), label=(4,)) + """
layer { name: "norm" type: "Normalize" bottom: "x" top: "xn" top: "xnorm" }
layer { name: "lse" type: "GlobalLSEMargin" bottom: "xn" bottom: "label" top: "out" top: "statistics" }
layer { name: "cs" type: "ChannelScale" bottom: "out" bottom: "xnorm" top: "cs" }
layer { name: "gs" type: "ChannelScale" bottom: "cs" bottom: "xnorm" top: "gs"
        channel_scale_param { global_scale: true } }
layer { name: "bn" type: "BatchNorm" bottom: "gs" top: "gs" batch_norm_param { disable_mean: true } }
layer { name: "red" type: "Reduction" bottom: "gs" top: "total" reduction_param { operation: ASUM axis: 1 } }
"""
    blobs = {"lse": [np.array([10.0], np.float32), np.array([0.25], np.float32)],
             "gs": [np.array([0.5], np.float32)], "bn": _bn_blobs(6, 22)}
    prototxt, caffemodel = write_net(tmp_path, text, blobs)
    model = convert(prototxt, caffemodel).model
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert float(reloaded.get_layer("lse").margin.numpy()[0]) == pytest.approx(0.25)
    ours = [np.asarray(v) for v in model([x, labels])]
    theirs = [np.asarray(v) for v in reloaded([x, labels])]
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    xn, xnorm = np_normalize(x)
    top, _, _, _ = np_global_lse_margin(xn, labels, 10.0, 0.25)
    gs = np_batch_norm(np_channel_scale(top, xnorm) * 0.5, blobs["bn"], disable_mean=True)[0]
    np.testing.assert_allclose(ours[-1], np_reduction(np.abs(gs), "SUM", 1), rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# The published nets
# ----------------------------------------------------------------------------------------------------


def _real(name: str):
    path = REAL / name
    if not path.is_file():
        pytest.skip(REAL_MISSING)
    return path


GNAP_INPUT = (2, 16, 7, 6)


@pytest.mark.parametrize("phase", ["TEST", "TRAIN"])
def test_published_gnap_matches_a_numpy_forward_in_both_phases(tmp_path, phase):
    """GNAP.prototxt (a head fragment on res4_3): BN -> Normalize (2 tops) -> global AVE pool, Reduction MEAN of
    the norm -> ChannelScale -> BN. TEST: stored statistics; TRAIN: batch statistics (Keras training=True)."""
    text = _real("happynear_AMSoftmax__prototxt__GNAP.prototxt").read_text()
    dims = " ".join(f"input_dim: {d}" for d in GNAP_INPUT)
    blobs = {"res4_3_bn": _bn_blobs(16, 23), "GNAP_bn": _bn_blobs(16, 24)}
    prototxt, caffemodel = write_net(tmp_path, f'input: "res4_3" {dims}\n' + text, blobs)
    conversion = convert(prototxt, caffemodel, phase=phase)
    assert conversion.plan.blob_shapes["featuremap_norm_mean"] == (None,)
    assert conversion.model.get_layer("res4_3_bn").momentum == pytest.approx(0.99)  # the fork's default
    x = _rng(25).uniform(-1, 1, GNAP_INPUT).astype(np.float32)
    train = phase == "TRAIN"
    bn1 = np_batch_norm(x, blobs["res4_3_bn"], use_global_stats=not train)[0]
    normed, norm = np_normalize(bn1)
    gnap = np_channel_scale(np_ave_global_pool(normed), np_reduction(norm, "MEAN", 1))
    out = np_batch_norm(gnap, blobs["GNAP_bn"], use_global_stats=not train)[0]
    names = ["res4_3", "normed_featuremap", "featuremap_norm", "featuremap_norm_mean", "GNAP"]
    ours = _run(conversion, {"res4_3": x}, names, training=train)
    np.testing.assert_allclose(ours["featuremap_norm"], norm, rtol=1e-5)
    np.testing.assert_allclose(ours["featuremap_norm_mean"], np_reduction(norm, "MEAN", 1), rtol=1e-5)
    np.testing.assert_allclose(ours["GNAP"], out, rtol=1e-4, atol=1e-4 if train else 1e-5)
    if not train:
        report = parity_report(conversion=conversion, caffemodel=caffemodel, reference="opencv", inputs={"res4_3": x})
        assert report.ok and report.row("featuremap_norm_mean").ok, str(report)


def _face_feeds(seed: int, labels=(3.0, 10515.0)):
    pixels = _rng(seed).uniform(0, 255, (2, 3, 112, 96)).astype(np.float32)
    return {"data": pixels, "label": np.asarray(labels, np.float32)}


@pytest.mark.parametrize("phase", ["TEST", "TRAIN"])
def test_published_wo_fn_scales_the_logits_by_the_feature_norm(phase):
    """face_train_test_wo_fn: Normalize(norm1, feature_norm) -> fc6_l2 -> LabelSpecificAdd -> ChannelScale by the
    feature norm; no fused head (ChannelScale is not a Scale), so the chain converts literally."""
    path = _real("happynear_AMSoftmax__prototxt__face_train_test_wo_fn.prototxt")
    conversion = convert(path, phase=phase, input_shape=(3, 112, 96))
    assert conversion.heads == []
    assert conversion.plan.blob_shapes["feature_norm"] == (None, 1)
    feeds = {name: value for name, value in _face_feeds(26).items()
             if name in {tensor.name for tensor in conversion.model.inputs}}
    ours = _run(conversion, feeds, ["fc5", "norm1", "feature_norm", "fc6_margin", "fc6_margin_scale"])
    normed, norm = np_normalize(ours["fc5"])
    np.testing.assert_allclose(ours["feature_norm"], norm.reshape(2, 1), rtol=1e-5)
    np.testing.assert_allclose(ours["norm1"], normed, atol=1e-6)
    np.testing.assert_allclose(ours["fc6_margin_scale"], np_channel_scale(ours["fc6_margin"], ours["feature_norm"]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("phase", ["TEST", "TRAIN"])
def test_published_auto_applies_the_global_lse_margin_with_the_label(phase):
    """face_train_test_auto: fc6 (normalised weights) -> GlobalLSEMargin(fc6, label) -> (fc6_margin,
    statistics), in both phases (the fork's forward does not look at the phase)."""
    path = _real("happynear_AMSoftmax__prototxt__auto__face_train_test_auto.prototxt")
    conversion = convert(path, phase=phase, input_shape=(3, 112, 96))
    assert [tensor.name for tensor in conversion.model.inputs] == ["data", "label"]
    assert conversion.plan.outputs == ["fc6_margin", "statistics"]
    layer = conversion.model.get_layer("margin")
    assert float(layer.scale.numpy()[0]) == 30.0 and float(layer.margin.numpy()[0]) == 0.0
    feeds = _face_feeds(27)
    ours = _run(conversion, feeds, ["fc6", "fc6_margin", "statistics"], training=phase == "TRAIN")
    top, statistics, _, margin = np_global_lse_margin(ours["fc6"], feeds["label"], 30.0, 0.0)
    np.testing.assert_allclose(ours["fc6_margin"], top, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours["statistics"], statistics, rtol=1e-4, atol=1e-5)
    assert float(layer.margin.numpy()[0]) == pytest.approx(margin, abs=1e-5)
