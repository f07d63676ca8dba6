"""NetState stages, head fragments declared through input_shape, and blobs frozen by ``lr_mult: 0``."""

from __future__ import annotations

import numpy as np
import pytest

from converters.caffe import ConversionError, convert
from converters.caffe.cli import _parse_shape
from converters.caffe.reader import parse_prototxt

STAGED = """
name: "staged"
layer { name: "a" type: "Input" top: "x" input_param { shape { dim: 1 dim: 4 } }
        include { phase: TEST stage: "on-test" } }
layer { name: "b" type: "Input" top: "x" input_param { shape { dim: 1 dim: 6 } }
        include { phase: TEST stage: "on-train" } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" inner_product_param { num_output: 3 } }
"""


@pytest.mark.parametrize("stage,width", [("on-test", 4), ("on-train", 6), (["on-train"], 6)])
def test_stage_selects_the_layers_whose_rules_name_it(stage, width):
    conversion = convert(parse_prototxt(STAGED), stage=stage)
    assert conversion.model.input_shape == (None, width)
    assert [layer.name for layer in conversion.plan.caffe_layers] == ["a" if width == 4 else "b", "fc"]


def test_a_bottom_left_out_by_its_stage_names_the_stage_not_the_phase():
    with pytest.raises(ConversionError) as error:
        convert(parse_prototxt(STAGED))
    message = str(error.value)
    assert "stages none excludes" in message and "['on-test', 'on-train']" in message and "--stage" in message
    assert "try the other --phase" not in message


def test_a_bottom_left_out_by_its_phase_still_says_phase():
    text = STAGED.replace('stage: "on-test"', "").replace('phase: TEST stage: "on-train"', "phase: TEST")
    text = text.replace("phase: TEST", "phase: TRAIN")
    with pytest.raises(ConversionError, match="phase TEST excludes; try the other --phase"):
        convert(parse_prototxt(text))


FRAGMENT = """
layer { name: "normalize1" type: "Normalize" bottom: "last_ip_layer" top: "norm1" }
layer { name: "fc" type: "InnerProduct" bottom: "norm1" top: "fc"
        inner_product_param { num_output: 3 bias_term: false } }
"""


def test_an_undeclared_bottom_named_in_input_shape_becomes_a_model_input():
    conversion = convert(parse_prototxt(FRAGMENT), input_shape={"last_ip_layer": (5,)})
    model = conversion.model
    assert model.input_shape == (None, 5) and model.inputs[0].name == "last_ip_layer"
    x = np.random.default_rng(0).normal(size=(2, 5)).astype("float32")
    kernel = model.get_layer("fc").get_weights()[0]
    expected = (x / np.sqrt((x * x).sum(1, keepdims=True) + 1e-6)) @ kernel
    np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-5, atol=1e-6)


def test_an_undeclared_bottom_without_input_shape_says_how_to_declare_it():
    with pytest.raises(ConversionError, match=r"input_shape=\{'last_ip_layer': \(C, H, W\)\}.*last_ip_layer=C,H,W"):
        convert(parse_prototxt(FRAGMENT))


def test_cli_input_shape_takes_named_and_plain_shapes():
    assert _parse_shape(["3,112,96"]) == (3, 112, 96)
    assert _parse_shape(["last_ip_layer=512", "data=3,8,8"]) == {"last_ip_layer": (512,), "data": (3, 8, 8)}
    with pytest.raises(ConversionError, match="name each"):
        _parse_shape(["512", "3,8,8"])


FROZEN_BIAS = """
input: "data" input_dim: 1 input_dim: 3 input_dim: 5 input_dim: 5
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        param { lr_mult: 1 } param { lr_mult: 0 }
        convolution_param { num_output: 2 kernel_size: 3 bias_filler { type: "constant" value: 0.5 } } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 2 } }
"""


def test_a_blob_with_lr_mult_0_stays_frozen_while_the_others_train(tmp_path):
    import keras

    from converters.caffe.builder import freeze_caffe_blobs

    conversion = convert(parse_prototxt(FROZEN_BIAS))
    model = conversion.model
    conv = model.get_layer("conv")
    assert [v.trainable for v in conv.weights] == [True, False]
    before = [np.array(v) for v in conv.weights]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=True)
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(4, 5, 5, 3)), rng.normal(size=(4, 2)), epochs=2, verbose=0)
    kernel, bias = (np.array(v) for v in conv.weights)
    assert not np.allclose(kernel, before[0])  # the kernel trains
    np.testing.assert_array_equal(bias, before[1])  # Caffe never updates an lr_mult 0 blob
    assert any("frozen" in note and "conv/bias" in note for note in conversion.notes)

    path = tmp_path / "net.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert freeze_caffe_blobs(reloaded, parse_prototxt(FROZEN_BIAS)) == ["conv/bias"]
    assert [v.trainable for v in reloaded.get_layer("conv").weights] == [True, False]


def test_training_loss_is_the_fused_heads_objective():
    from tests.caffe_nets import face_resnet20_prototxt

    text = face_resnet20_prototxt("train", widths=(4, 4, 4, 4), embedding=8, num_classes=5)
    conversion = convert(parse_prototxt(text), phase="TRAIN", input_shape=(3, 16, 16))
    head = conversion.head_layers["fc6_l2"]
    loss = conversion.training_loss()
    assert loss.get_config() == head.loss.get_config()
    x = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype("float32")
    labels = np.array([0, 3, 4])
    cosines = np.asarray(conversion.model(x))
    # AM-Softmax at the Caffe margin rule: the margin only where cos_y > m, then s * (.) into softmax
    logits = 30.0 * cosines
    rows = np.arange(3)
    applied = cosines[rows, labels] > 0.35
    logits[rows, labels] -= 30.0 * 0.35 * applied
    expected = np.mean(np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
                       - logits[rows, labels])
    np.testing.assert_allclose(float(loss(labels, cosines)), expected, rtol=1e-5)


@pytest.mark.parametrize("text,message", [
    ('input: "data" input_dim: 1 input_dim: 1 input_dim: 8 input_dim: 8\n'
     'layer { name: "pad" type: "Convolution" bottom: "data" top: "pad"\n'
     '        convolution_param { num_output: 64 kernel_size: 1 pad: 20000 } }',
     r"layer 'pad' \(Convolution\): top 'pad' would have shape .*refusing so absurd a blob"),
    ('layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }\n'
     'layer { name: "orphan" type: "ReLU" top: "r" }',
     r"layer 'orphan' \(ReLU\): has no bottom; a ReLU layer reads at least one blob"),
    ('layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }\n'
     'layer { name: "head" type: "keras_margin.Head" bottom: "data" top: "h" }',
     r"layer 'head' \(keras_margin.Head\): type 'keras_margin.Head' is the converter's internal type"),
], ids=["absurd-intermediate-blob", "no-bottom", "internal-type"])
def test_bad_nets_end_in_a_named_error(text, message):
    with pytest.raises(ConversionError, match=message):
        convert(parse_prototxt(text))
