"""TRAIN phase with labels: the label layers' TRAIN forward, literally and in the fused heads' parity rows.

References are NumPy transcriptions written here from the forks' C++, independent of the converter:
``label_specific_add.cpp`` (happynear/caffe-windows, LabelSpecificAddLayer::Forward_cpu: the bias read from
the counter, then the counter + 1; ``y[i, gt] += bias`` where ``y[i, gt] > -bias``; second top = the bias)
and ``margin_inner_product_layer.cpp`` (wy1iu/sphereface, MarginInnerProductLayer::Forward_cpu: ``iter_ += 1``
then lambda; weight rows normalised without eps; the label column ``|x| psi`` with the sign tricks, then
``(top + lambda x.w_hat) / (1 + lambda)``).
"""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest

from converters.caffe import convert, parity_report, write_caffemodel
from converters.caffe.label_layers import LabelSpecificAdd, MarginInnerProduct
from converters.caffe.parity import initial_weights_caffemodel
from converters.caffe.planner import plan_net
from converters.caffe.reader import parse_prototxt, read_caffemodel
from tests.caffe_nets import SHARED, l2_normalize_rows, nhwc, shared_missing, write_net

REAL = SHARED / "caffe" / "real"
FACE_SHAPE = (3, 112, 96)
#: Widths shrunk for speed (the structure kept): conv widths 64/128/256/512 and the embedding -> 8/8/16/16.
SHRINK = {64: 8, 128: 8, 256: 16, 512: 16}


def _real_text(name: str, classes: int) -> str:
    path = REAL / name
    if not path.is_file():
        pytest.skip(shared_missing(path, name))
    text = path.read_text()
    return re.sub(r"num_output: (\d+)",
                  lambda match: f"num_output: {SHRINK.get(int(match.group(1)), classes)}", text)


# ----------------------------------------------------------------------------------------------------
# NumPy transcriptions of the C++
# ----------------------------------------------------------------------------------------------------


def np_label_specific_add(x, label, bias, iteration=0, schedule=None):
    """LabelSpecificAddLayer::Forward_cpu in TRAIN. Returns (top, bias used, iteration after)."""
    top = np.array(x, np.float64, copy=True)
    num = top.shape[0]
    flat = top.reshape(num, -1)
    if schedule is not None:
        bias = schedule["bias_base"] + (1.0 + schedule["bias_gamma"] * iteration) ** schedule["bias_power"] - 1.0
        bias = max(bias, schedule["bias_min"])
        bias = min(bias, schedule["bias_max"])
        iteration += 1
    for i in range(num):
        gt = int(label[i])
        if flat[i, gt] > -bias:
            flat[i, gt] += bias
    return top, bias, iteration


def np_margin_inner_product(x, weight, label, margin_type, iteration, base, gamma, power, lambda_min):
    """MarginInnerProductLayer::Forward_cpu (types SINGLE 0 .. QUADRUPLE 3). Returns (top, lambda, iteration)."""
    iteration += 1
    lambda_ = max(base * (1.0 + gamma * iteration) ** (-power), lambda_min)
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    w = np.asarray(weight, np.float64)
    w = w / np.sqrt(np.sum(w * w, axis=1, keepdims=True))
    x_norm = np.sqrt(np.sum(x * x, axis=1))
    cos = (x @ w.T) / x_norm[:, None]
    sign_0 = np.sign(cos)
    top = x @ w.T
    if margin_type == 0:
        return top, lambda_, iteration
    for i in range(len(x)):
        j = int(label[i])
        c, s0 = cos[i, j], sign_0[i, j]
        if margin_type == 1:
            top[i, j] = x_norm[i] * (2.0 * s0 * c ** 2 - 1.0)
        elif margin_type == 2:
            s1 = np.sign(abs(c) - 0.5)
            s2 = s0 * (1.0 + s1) - 2.0
            top[i, j] = x_norm[i] * (s1 * (4.0 * c ** 3 - 3.0 * c) + s2)
        else:
            s3 = s0 * np.sign(2.0 * c ** 2 - 1.0)
            s4 = 2.0 * s0 + s3 - 3.0
            top[i, j] = x_norm[i] * (s3 * (8.0 * c ** 4 - 8.0 * c ** 2 + 1.0) + s4)
    top = top + lambda_ * (x @ w.T)
    return top / (1.0 + lambda_), lambda_, iteration


SCHEDULE = {"bias_base": 0.0, "bias_gamma": -5e-05, "bias_power": 1.0, "bias_min": -0.4, "bias_max": 0.0}


# ----------------------------------------------------------------------------------------------------
# The Keras layers
# ----------------------------------------------------------------------------------------------------


def test_label_specific_add_layer_is_the_fork_train_forward():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (6, 5)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 0])
    schedule = dict(SCHEDULE, bias_gamma=-0.05)
    layer = LabelSpecificAdd(schedule=schedule, iteration=3, return_bias=True)
    iteration = 3
    for _ in range(3):  # biases -0.15, -0.2, -0.25: the counter is read, then advanced
        expected, bias, iteration = np_label_specific_add(x, labels, 0.0, iteration, schedule)
        out, bias_top = layer([x, labels], training=True)
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
        np.testing.assert_allclose(bias_top.numpy(), np.full(6, bias), atol=1e-7)
        assert int(layer.iteration.numpy()) == iteration and float(layer.bias.numpy()) == pytest.approx(bias)
    changed = expected[np.arange(6), labels] != x[np.arange(6), labels]
    assert changed.any() and not changed.all()  # both sides of the "> -bias" rule occur
    np.testing.assert_array_equal(layer([x, labels])[0].numpy(), x)  # inference: identity (the fork's TEST)
    assert int(layer.iteration.numpy()) == iteration
    fixed = LabelSpecificAdd(bias=-0.35)  # Caffe's static_cast<int>: float labels truncate
    np.testing.assert_allclose(fixed([x, labels + 0.75], training=True).numpy(),
                               np_label_specific_add(x, labels, -0.35)[0], atol=1e-6)


@pytest.mark.parametrize("margin_type", [0, 1, 2, 3])
def test_margin_inner_product_layer_is_the_sphereface_forward(margin_type):
    rng = np.random.default_rng(margin_type)
    x = rng.normal(size=(6, 8)).astype(np.float32) * 3
    weight = rng.normal(size=(5, 8)).astype(np.float32)  # rows not unit: the layer normalises them
    labels = np.array([0, 1, 2, 3, 4, 2])
    options = dict(base=10.0, gamma=0.5, power=1.0, lambda_min=1.0)
    layer = MarginInnerProduct(5, m=margin_type + 1, iteration=2, return_lambda=True, **options)
    layer([x, labels])
    layer.kernel.assign(weight.T)
    out, lambda_top = layer([x, labels], training=True)
    expected, lambda_, iteration = np_margin_inner_product(x, weight, labels, margin_type, 2, **options)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert int(layer.iteration.numpy()) == iteration == 3 and lambda_ == pytest.approx(10.0 / 2.5)
    np.testing.assert_allclose(lambda_top.numpy(), np.full(6, lambda_), rtol=1e-6)
    plain = np_margin_inner_product(x, weight, labels, 0, 0, **options)[0]
    np.testing.assert_allclose(layer([x, labels])[0].numpy(), plain, rtol=1e-5, atol=1e-5)  # inference
    if margin_type:
        assert np.abs(expected - plain).max() > 0.1


# ----------------------------------------------------------------------------------------------------
# Literal TRAIN conversion of label layers that fuse into no head
# ----------------------------------------------------------------------------------------------------

LITERAL = """name: "literal"
layer { name: "input" type: "Input" top: "feat" top: "label"
  input_param { shape { dim: 4 dim: 8 } shape { dim: 4 } } }
layer { name: "fc" type: "InnerProduct" bottom: "feat" top: "fc"
  inner_product_param { num_output: 6 normalize: true bias_term: false } }
layer { name: "margin" type: "LabelSpecificAdd" bottom: "fc" bottom: "label" top: "fc_margin" top: "bias"
  {phase}label_specific_add_param { iteration: 4000 bias_base: 0 bias_gamma: -5e-05 bias_power: 1 bias_min: -0.4
                              bias_max: 0 } }
layer { name: "scaled" type: "Power" bottom: "fc_margin" top: "scaled" power_param { scale: 30 } }
layer { name: "mip" type: "MarginInnerProduct" bottom: "feat" bottom: "label" top: "mip" top: "lambda"
  {phase}margin_inner_product_param { num_output: 6 type: QUADRUPLE base: 10 gamma: 0.5 power: 1 lambda_min: 1
                               iteration: 3 } }
layer { name: "mip_relu" type: "ReLU" bottom: "mip" top: "mip_relu" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "scaled" bottom: "label" top: "loss" }
"""


def _planner_records_phase() -> bool:
    """Whether the planner tells handlers the plan's phase (``used_bottoms`` sees ``layer.attrs["phase"]``)."""
    plan = plan_net(parse_prototxt(LITERAL.replace("{phase}", "")), phase="TRAIN")
    return any(len(layer.bottoms) == 2 for layer in plan.layers if layer.type == "LabelSpecificAdd")


NEEDS_PLANNER_PHASE = pytest.mark.skipif(
    not _planner_records_phase(),
    reason="needs the planner to record the phase on each planned layer (attrs['phase'] in _resolve_blobs)")


def _literal_net(tmp_path, phase_field: bool):
    rng = np.random.default_rng(7)
    feat = rng.normal(size=(4, 8)).astype(np.float32)
    fc_weight = rng.normal(size=(6, 8)).astype(np.float32)
    fc_weight[:2] = feat[:2]  # cos ~ 1 for samples 0, 1 with labels 0, 1: the margin applies there
    blobs = {"fc": [fc_weight], "mip": [rng.normal(size=(6, 8)).astype(np.float32)]}
    text = LITERAL.replace("{phase}", "phase: TRAIN " if phase_field else "")
    prototxt, caffemodel = write_net(tmp_path, text, blobs)
    return prototxt, caffemodel, feat, blobs


def _check_literal(prototxt, caffemodel, feat, blobs, phase):
    conversion = convert(prototxt, caffemodel, phase=phase)
    model = conversion.model
    assert [(tensor.name, tensor.dtype) for tensor in model.inputs] == [("feat", "float32"), ("label", "int32")]
    labels = np.array([0, 1, 5, 2])
    names = ["fc", "fc_margin", "bias", "scaled", "mip", "lambda", "mip_relu"]
    probe = keras.Model(model.inputs, [conversion.tensors[name] for name in names])
    plain = dict(zip(names, (np.asarray(v) for v in probe([feat, labels], training=False))))
    np.testing.assert_array_equal(plain["fc_margin"], plain["fc"])  # inference: identity
    margin_layer = model.get_layer("margin")
    assert int(margin_layer.iteration.numpy()) == 4000 and int(model.get_layer("mip").iteration.numpy()) == 3
    ours = dict(zip(names, (np.asarray(v) for v in probe([feat, labels], training=True))))
    cos = feat @ l2_normalize_rows(blobs["fc"][0], 1e-6).T
    expected, bias, _ = np_label_specific_add(cos, labels, 0.0, 4000, SCHEDULE)  # bias -0.2
    np.testing.assert_allclose(ours["fc_margin"], expected, atol=1e-5)
    np.testing.assert_allclose(ours["scaled"], 30 * expected, atol=1e-4)
    np.testing.assert_allclose(ours["bias"], np.full(4, bias), atol=1e-6)
    assert np.all(expected[[0, 1], [0, 1]] == cos[[0, 1], [0, 1]] - 0.2) or \
        np.allclose(expected[[0, 1], [0, 1]], cos[[0, 1], [0, 1]] - 0.2)
    mip, lambda_, _ = np_margin_inner_product(feat, blobs["mip"][0], labels, 3, 3, 10.0, 0.5, 1.0, 1.0)
    np.testing.assert_allclose(ours["mip"], mip, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours["mip_relu"], np.maximum(mip, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours["lambda"], np.full(4, lambda_), rtol=1e-6)
    assert int(margin_layer.iteration.numpy()) == 4001 and int(model.get_layer("mip").iteration.numpy()) == 4
    return conversion, labels


def test_label_layers_with_a_train_phase_field_convert_literally(tmp_path):
    """A layer's own ``phase: TRAIN`` (Caffe's Net::Init keeps it) makes it run its TRAIN forward."""
    prototxt, caffemodel, feat, blobs = _literal_net(tmp_path, phase_field=True)
    conversion, labels = _check_literal(prototxt, caffemodel, feat, blobs, "TRAIN")
    conversion = convert(prototxt, caffemodel, phase="TRAIN")  # fresh counters for the parity check
    report = parity_report(conversion=conversion, caffemodel=caffemodel, inputs={"feat": feat}, labels=labels)
    assert report.ok, str(report)
    assert [row.blob for row in report.rows] == ["fc", "fc_margin", "bias", "scaled", "mip", "lambda", "mip_relu"]
    assert report.row("mip").max_abs < 1e-4 and report.row("bias").max_abs < 1e-6
    assert int(conversion.model.get_layer("mip").iteration.numpy()) == 3  # the check leaves the state alone
    wrong = parity_report(conversion=conversion, caffemodel=caffemodel, inputs={"feat": feat},
                          labels=np.array([1, 0, 5, 2]))  # another label: still consistent on both sides
    assert wrong.ok and wrong.row("fc_margin").ok


@NEEDS_PLANNER_PHASE
def test_label_layers_convert_literally_in_a_train_conversion(tmp_path):
    prototxt, caffemodel, feat, blobs = _literal_net(tmp_path, phase_field=False)
    _check_literal(prototxt, caffemodel, feat, blobs, "TRAIN")
    (tmp_path / "test").mkdir()
    test_net, _ = write_net(tmp_path / "test", LITERAL.replace("{phase}", "").replace(' top: "lambda"', ""))
    test = convert(test_net, caffemodel, phase="TEST")  # TEST: identity / label-free logits, no label input
    assert [tensor.name for tensor in test.model.inputs] == ["feat"]
    report = parity_report(prototxt, caffemodel, phase="TRAIN", inputs={"feat": feat}, labels=np.array([0, 1, 5, 2]))
    assert report.ok, str(report)


def test_literal_label_layers_reload_from_a_keras_file(tmp_path):
    prototxt, caffemodel, feat, blobs = _literal_net(tmp_path, phase_field=True)
    model = convert(prototxt, caffemodel, phase="TRAIN").model
    labels = np.array([0, 1, 5, 2])
    model([feat, labels], training=True)  # counters advance: 4001 and 4
    path = tmp_path / "literal.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert int(reloaded.get_layer("margin").iteration.numpy()) == 4001
    assert int(reloaded.get_layer("mip").iteration.numpy()) == 4
    for a, b in zip(reloaded([feat, labels], training=True), model([feat, labels], training=True)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@NEEDS_PLANNER_PHASE
def test_published_wo_fn_label_specific_add_takes_the_labels_in_train(tmp_path):
    """face_train_test_wo_fn: LabelSpecificAdd -> ChannelScale (no Scale, so no AMSoftmaxHead) converts
    literally; the counter moved to 4000 (bias -0.2) so the first TRAIN forward has a margin."""
    text = _real_text("happynear_AMSoftmax__prototxt__face_train_test_wo_fn.prototxt", 10)
    text = text.replace("iteration: 0", "iteration: 4000")
    prototxt, _ = write_net(tmp_path, text)
    conversion = convert(prototxt, phase="TRAIN", input_shape=FACE_SHAPE)
    assert conversion.heads == []
    assert [(t.name, t.dtype) for t in conversion.model.inputs] == [("data", "float32"), ("label", "int32")]
    report = parity_report(prototxt, phase="TRAIN", input_shape=FACE_SHAPE, labels=np.array([3, 7]))
    assert report.ok, str(report)
    assert report.row("fc6_margin").ok and report.row("margin").max_abs < 1e-6


# ----------------------------------------------------------------------------------------------------
# Fused heads: the TRAIN parity rows of the margin logits
# ----------------------------------------------------------------------------------------------------


def _embedding(conversion, blob: str, raw: np.ndarray) -> np.ndarray:
    probe = keras.Model(conversion.model.inputs, conversion.tensors[blob])
    return np.asarray(probe([nhwc(raw)], training=False), np.float64)


def test_published_amsoftmax_train_parity_compares_the_margin_logits(tmp_path):
    """face_train_test in TRAIN: fc6_l2 + LabelSpecificAdd + Scale is an AMSoftmaxHead; its margin logits
    match Caffe's: samples with cos_y <= 0.35 unchanged, the others cos_y - 0.35, times 30."""
    text = _real_text("happynear_AMSoftmax__prototxt__face_train_test.prototxt", 10)
    prototxt, _ = write_net(tmp_path, text)
    net = parse_prototxt(text)
    path = initial_weights_caffemodel(net, str(tmp_path / "init.caffemodel"), "TRAIN", FACE_SHAPE, seed=1)
    raw = np.random.default_rng(2).uniform(0, 255, (4, *FACE_SHAPE)).astype(np.float32)
    first = convert(prototxt, path, phase="TRAIN", input_shape=FACE_SHAPE)
    norm1 = _embedding(first, "norm1", raw)
    stored = read_caffemodel(path)
    blobs = {name: stored.blobs(name) for name in stored.names()}
    weight = blobs["fc6_l2"][0].copy()
    weight[0], weight[1] = norm1[0], norm1[1]  # cos ~ 1: samples 0, 1 (labels 0, 1) take the margin
    blobs["fc6_l2"] = [weight]
    caffemodel = tmp_path / "crafted.caffemodel"
    write_caffemodel(caffemodel, net.net, blobs)
    conversion = convert(prototxt, caffemodel, phase="TRAIN", input_shape=FACE_SHAPE)
    assert [spec.head_class for spec in conversion.heads] == ["AMSoftmaxHead"]
    assert [tensor.name for tensor in conversion.model.inputs] == ["data"]  # the head's label is not an input

    cos = norm1 @ l2_normalize_rows(weight, 1e-6).T
    labels = np.array([0, 1, int(np.argmin(cos[2])), int(np.argmin(cos[3]))])
    cos_y = cos[np.arange(4), labels]
    assert np.all(cos_y[:2] > 0.35) and np.all(cos_y[2:] <= 0.35)
    expected = 30.0 * cos
    expected[np.arange(4), labels] = 30.0 * np.where(cos_y > 0.35, cos_y - 0.35, cos_y)
    np.testing.assert_allclose(30.0 * np_label_specific_add(cos, labels, -0.35)[0], expected, atol=1e-9)
    head = conversion.model.get_layer("fc6_l2")
    ours = np.asarray(head([norm1.astype(np.float32), labels], training=True))
    np.testing.assert_allclose(ours, expected, atol=1e-3)

    caffe_data = (raw - 128.0) * 0.0078125
    report = parity_report(conversion=conversion, caffemodel=caffemodel, inputs={"data": caffe_data},
                           labels={"label": labels})
    assert report.ok, str(report)
    logits = report.logits_row("fc6_margin_scale")
    assert logits.ok and logits.max_abs < 2e-3 and logits.layer == "fc6_margin_scale"
    assert report.row("fc6").note.startswith("head vs reference")  # the cosine row is still there
    head.m = 0.0  # without its margin the head's logits no longer match Caffe's TRAIN forward
    try:
        broken = parity_report(conversion=conversion, caffemodel=caffemodel, inputs={"data": caffe_data},
                               labels={"label": labels})
    finally:
        head.m = 0.35
    assert not broken.logits_row("fc6_margin_scale").ok and broken.row("fc6").ok
    assert broken.first_divergence.blob == "fc6_margin_scale"


def test_published_sphereface_converts_in_test(tmp_path):
    text = _real_text("wy1iu_sphereface__train__code__sphereface_model.prototxt", 12)
    prototxt, _ = write_net(tmp_path, text)
    conversion = convert(prototxt, phase="TEST", input_shape=FACE_SHAPE)
    assert [spec.head_class for spec in conversion.heads] == ["SphereFaceHead"]
    assert [tensor.name for tensor in conversion.model.inputs] == ["data"]
    assert any("'lambda'" in line and "dropped" in line for line in conversion.plan.fusions)
    report = parity_report(prototxt, phase="TEST", input_shape=FACE_SHAPE)
    assert report.ok, str(report)
    with pytest.raises(KeyError, match="TRAIN"):
        report.logits_row("fc6")


def test_published_sphereface_train_margin_logits_match_the_caffe_formula(tmp_path):
    text = _real_text("wy1iu_sphereface__train__code__sphereface_model.prototxt", 12)
    prototxt, _ = write_net(tmp_path, text)
    net = parse_prototxt(text)
    caffemodel = initial_weights_caffemodel(net, str(tmp_path / "init.caffemodel"), "TRAIN", FACE_SHAPE, seed=3)
    conversion = convert(prototxt, caffemodel, phase="TRAIN", input_shape=FACE_SHAPE)
    assert [spec.head_class for spec in conversion.heads] == ["SphereFaceHead"]
    head = conversion.model.get_layer("fc6")
    raw = np.random.default_rng(4).uniform(0, 255, (3, *FACE_SHAPE)).astype(np.float32)
    labels = np.array([0, 5, 11])
    fc5 = _embedding(conversion, "fc5", raw)
    weight = read_caffemodel(caffemodel).blobs("fc6")[0]
    expected, lambda_, _ = np_margin_inner_product(fc5, weight, labels, 3, 0, 1000.0, 0.12, 1.0, 5.0)
    assert lambda_ == pytest.approx(1000.0 / 1.12)  # lambda(1): the counter advances before lambda
    plain = np_margin_inner_product(fc5, weight, labels, 0, 0, 1000.0, 0.12, 1.0, 5.0)[0]
    tolerance = 1e-4 + 1e-4 * np.abs(expected).max()
    assert np.abs(expected - plain).max() > 10 * tolerance  # the margin is visible at lambda(1)

    caffe_data = (raw - 127.5) * 0.0078125
    report = parity_report(conversion=conversion, caffemodel=caffemodel, inputs={"data": caffe_data},
                           labels=labels)
    assert report.ok, str(report)
    logits = report.logits_row("fc6")
    assert logits.ok and logits.max_abs <= tolerance
    assert report.row("fc6").note.startswith("head cos")  # the cosine row (the label-free logits / |x|)
    assert int(head.iteration.numpy()) == 0  # the parity check restored the head's counter
    ours = np.asarray(head([fc5.astype(np.float32), labels], training=True))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=tolerance)
    assert int(head.iteration.numpy()) == 1
