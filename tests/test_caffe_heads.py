"""The fork's margin layers become keras_margin heads with their weights and hyper-parameters loaded.

InnerProduct(normalize) -> LabelSpecificAdd -> Scale is an AMSoftmaxHead (full-size test in
test_caffe_amsoftmax.py), MarginInnerProduct a SphereFaceHead, InnerProduct(normalize) -> Scale a NormFaceHead.
Small Face-ResNet-20 variants keep these fast.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from converters.caffe import convert, parity_report, write_caffemodel
from converters.caffe.reader import parse_prototxt
from tests.caffe_nets import (
    face_resnet20_blobs,
    face_resnet20_prototxt,
    face_resnet20_trunk,
    l2_normalize_rows,
    nhwc,
    write_net,
)

SMALL = dict(widths=(8, 8, 16, 16), embedding=16, input_hw=(28, 24))


def _small_blobs(num_classes=10, seed=3):
    return face_resnet20_blobs(**SMALL, num_classes=num_classes, seed=seed)


def _head_net(head: str) -> str:
    inputs = ('layer { name: "input" type: "Input" top: "data" top: "label"\n'
              '  input_param { shape { dim: 2 dim: 3 dim: 28 dim: 24 } shape { dim: 2 } } }\n')
    return 'name: "head-net"\n' + inputs + face_resnet20_trunk("data", SMALL["widths"], SMALL["embedding"]) + head


SPHEREFACE_HEAD = """
layer { name: "fc6" type: "MarginInnerProduct" bottom: "fc5" bottom: "label" top: "fc6"
  margin_inner_product_param { num_output: 10 type: QUADRUPLE base: 1000 gamma: 0.12 power: 1
                               lambda_min: 5 iteration: 100 weight_filler { type: "xavier" } } }
layer { name: "softmax_loss" type: "SoftmaxWithLoss" bottom: "fc6" bottom: "label" top: "softmax_loss" }
"""

NORMFACE_HEAD = """
layer { name: "norm1" type: "Normalize" bottom: "fc5" top: "norm1" }
layer { name: "cosine" type: "InnerProduct" bottom: "norm1" top: "cosine"
  inner_product_param { num_output: 10 normalize: true bias_term: false } }
layer { name: "cosine_scale" type: "Scale" bottom: "cosine" top: "cosine_scale"
  scale_param { num_axes: 0 min_value: 0.01 filler { type: "constant" value: 1 } } }
layer { name: "softmax_loss" type: "SoftmaxWithLoss" bottom: "cosine_scale" bottom: "label" top: "softmax_loss" }
"""


def _fc5(conversion, x):
    probe = keras.Model(conversion.model.inputs, conversion.tensors["fc5"])
    return np.asarray(probe([nhwc(x)], training=False), np.float64)


def test_margin_inner_product_becomes_a_sphereface_head(tmp_path):
    from keras_margin.layers import SphereFaceHead

    blobs = _small_blobs()
    weight = blobs.pop("fc6_l2")[0]
    blobs.pop("fc6_margin_scale")
    blobs["fc6"] = [weight]
    prototxt, caffemodel = write_net(tmp_path, _head_net(SPHEREFACE_HEAD), blobs)
    conversion = convert(prototxt, caffemodel, phase="TRAIN")
    head = conversion.model.layers[-1]
    assert isinstance(head, SphereFaceHead)
    assert (head.num_classes, head.m, head.base, head.gamma, head.power, head.lambda_min) == (10, 4, 1000.0, 0.12, 1.0, 5.0)
    assert int(head.iteration.numpy()) == 100
    np.testing.assert_allclose(head.kernel.numpy(), l2_normalize_rows(weight, 0.0).T, atol=1e-6)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 28, 24)).astype(np.float32)
    cos = np.asarray(conversion.model(nhwc(x), training=False))
    np.testing.assert_allclose(cos, l2_normalize_rows(_fc5(conversion, x), 0.0) @ l2_normalize_rows(weight, 0.0).T,
                               atol=1e-5)
    # Caffe's layer outputs |x| cos(theta) off the label column; the report compares it as cos.
    report = parity_report(conversion=conversion, caffemodel=caffemodel, reference="opencv")
    assert report.ok, str(report)
    assert report.row("fc6").note.startswith("head cos")


def test_normalized_inner_product_and_scalar_scale_become_a_normface_head(tmp_path):
    from keras_margin.layers import NormFaceHead

    blobs = _small_blobs()
    weight = blobs.pop("fc6_l2")[0]
    blobs.pop("fc6_margin_scale")
    blobs.update(cosine=[weight], cosine_scale=[np.array([12.5], np.float32)])
    prototxt, caffemodel = write_net(tmp_path, _head_net(NORMFACE_HEAD), blobs)
    conversion = convert(prototxt, caffemodel, phase="TRAIN")
    head = conversion.model.layers[-1]
    assert isinstance(head, NormFaceHead) and head.s == 12.5 and head.num_classes == 10
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 28, 24)).astype(np.float32)
    expected = l2_normalize_rows(_fc5(conversion, x), 1e-6) @ l2_normalize_rows(weight, 1e-6).T
    np.testing.assert_allclose(np.asarray(conversion.model(nhwc(x))), expected, atol=1e-5)


def test_converted_training_model_compiles_with_the_head_loss_and_trains(tmp_path):
    prototxt, _ = write_net(tmp_path, face_resnet20_prototxt("train", **SMALL, num_classes=10))
    caffemodel = tmp_path / "train.caffemodel"
    write_caffemodel(caffemodel, parse_prototxt(prototxt.read_text()).net, _small_blobs())
    conversion = convert(prototxt, caffemodel, phase="TRAIN", input_shape=(3, 28, 24))
    model, head = conversion.model, conversion.model.get_layer("fc6_l2")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=head.loss)
    rng = np.random.default_rng(2)
    pixels = rng.uniform(0, 255, (8, 28, 24, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 8)
    before = head.kernel.numpy().copy()
    history = model.fit(pixels, labels, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(before, head.kernel.numpy())


@pytest.mark.parametrize("kind", ["deploy", "train"])
def test_converted_model_round_trips_through_a_keras_file(tmp_path, kind):
    import converters.caffe.layers  # noqa: F401  (registers the Caffe-rule layers for loading)

    text = face_resnet20_prototxt(kind, **SMALL, num_classes=10)
    prototxt, _ = write_net(tmp_path, text)
    caffemodel = tmp_path / "net.caffemodel"
    write_caffemodel(caffemodel, parse_prototxt(text).net, _small_blobs())
    model = convert(prototxt, caffemodel, phase="TRAIN", input_shape=(3, 28, 24)).model
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    x = np.random.default_rng(4).uniform(0, 255, (2, 28, 24, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(reloaded(x)), np.asarray(model(x)), atol=1e-6)


def test_converted_normface_train_net_learns_its_scale_with_the_released_floor(tmp_path):
    # The Scale has no `param { lr_mult: 0 }`, so Caffe learns it (lr_mult defaults to 1), floored at min_value.
    blobs = _small_blobs()
    weight = blobs.pop("fc6_l2")[0]
    blobs.pop("fc6_margin_scale")
    blobs.update(cosine=[weight], cosine_scale=[np.array([12.5], np.float32)])
    prototxt, caffemodel = write_net(tmp_path, _head_net(NORMFACE_HEAD), blobs)
    model = convert(prototxt, caffemodel, phase="TRAIN").model
    head = model.layers[-1]
    assert head.learn_scale and head.scale_min == pytest.approx(0.01)
    assert float(head.scale_weight.numpy()) == 12.5
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=head.loss)  # Sequential-style: the head's own loss
    rng = np.random.default_rng(5)
    model.fit(nhwc(rng.uniform(-1, 1, (4, 3, 28, 24)).astype(np.float32)), rng.integers(0, 10, 4), verbose=0)
    assert float(head.scale_weight.numpy()) != 12.5
    # A Scale with lr_mult 0 stays a fixed s.
    fixed = NORMFACE_HEAD.replace('top: "cosine_scale"\n', 'top: "cosine_scale" param { lr_mult: 0 }\n')
    (tmp_path / "fixed").mkdir()
    prototxt, caffemodel = write_net(tmp_path / "fixed", _head_net(fixed), blobs)
    assert not convert(prototxt, caffemodel, phase="TRAIN").model.layers[-1].learn_scale


ANNEALED_AMSOFTMAX_HEAD = """
layer { name: "norm1" type: "Normalize" bottom: "fc5" top: "norm1" }
layer { name: "fc6" type: "InnerProduct" bottom: "norm1" top: "fc6"
  inner_product_param { num_output: 10 normalize: true bias_term: false } }
layer { name: "margin" type: "LabelSpecificAdd" bottom: "fc6" bottom: "label" top: "fc6_margin"
  label_specific_add_param { iteration: 7 bias_base: 0 bias_gamma: -5e-05 bias_power: 1 bias_min: -0.4 bias_max: 0 } }
layer { name: "scale" type: "Scale" bottom: "fc6_margin" top: "fc6_scaled" param { lr_mult: 0 }
  scale_param { num_axes: 0 filler { type: "constant" value: 30 } } }
layer { name: "softmax_loss" type: "SoftmaxWithLoss" bottom: "fc6_scaled" bottom: "label" top: "softmax_loss" }
"""


def test_annealed_label_specific_add_becomes_a_scheduled_caffe_rule_head(tmp_path):
    blobs = _small_blobs()
    weight = blobs.pop("fc6_l2")[0]
    blobs.pop("fc6_margin_scale")
    blobs.update(fc6=[weight], scale=[np.array([30.0], np.float32)])
    prototxt, caffemodel = write_net(tmp_path, _head_net(ANNEALED_AMSOFTMAX_HEAD), blobs)
    conversion = convert(prototxt, caffemodel, phase="TRAIN")
    head = conversion.model.layers[-1]
    assert head.margin_rule == "caffe" and head.s == 30.0
    assert head.margin_schedule == {"bias_base": 0.0, "bias_gamma": pytest.approx(-5e-05), "bias_power": 1.0,
                                    "bias_min": pytest.approx(-0.4), "bias_max": 0.0}
    assert int(head.iteration.numpy()) == 7  # the prototxt's starting counter
    assert float(head.margin.numpy()) == pytest.approx(7 * 5e-05, rel=1e-4)
    assert any("annealed margin" in w for w in conversion.warnings)
