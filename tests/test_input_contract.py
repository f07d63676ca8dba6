"""The input contract end to end: the Caffe converter records it (TRAIN data layer: raw pixels with the transform;
deploy Input: unknown or as the caller says; the mirror trick read from the graph), it survives a .keras file,
and ``evaluate_lfw`` / ``keras-margin verify`` apply what the model does not do itself, never a step twice.

Small generated Caffe nets (12x10 input) and a generated images folder; the expected embeddings are NumPy.
"""

from __future__ import annotations

import argparse
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from converters.caffe import ConversionError, convert
from keras_margin import InputContract, find_input_contract
from keras_margin.evaluation import (
    Preprocessing,
    PreprocessingWarning,
    compute_embeddings,
    evaluate_lfw,
    resolve_preprocessing,
)
from keras_margin.evaluation.contract import CLI_NAMES
from keras_margin_cli import verify as cli
from tests.caffe_nets import write_net

H, W = 12, 10
TRUNK = """
layer { name: "conv" type: "Convolution" bottom: "%s" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "act" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc5" type: "InnerProduct" bottom: "conv" top: "fc5" inner_product_param { num_output: 6 } }
"""
TRAIN = ("""layer { name: "data" type: "ImageData" top: "data" top: "label"
  transform_param { mean_value: 128 scale: 0.0078125 mirror: true }
  image_data_param { source: "list.txt" new_height: %d new_width: %d } }
""" % (H, W)) + TRUNK % "data"
DEPLOY_HEAD = f'input: "data" input_dim: 1 input_dim: 3 input_dim: {H} input_dim: {W}\n'
# The AM-Softmax deploy pattern with names of my own: the mirror is found from the graph, not the names.
DEPLOY = DEPLOY_HEAD + """
layer { name: "m" type: "Flip" bottom: "data" top: "mirrored" }
layer { name: "both" type: "Concat" bottom: "data" bottom: "mirrored" top: "pair" concat_param { axis: 0 } }
""" + TRUNK % "pair" + """
layer { name: "cut" type: "Slice" bottom: "fc5" top: "a" top: "b" slice_param { axis: 0 } }
layer { name: "add" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" eltwise_param { operation: SUM } }
"""


def _convert(tmp_path, text, name, **kwargs):
    prototxt, _ = write_net(tmp_path, text, name=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(prototxt, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# the converter records the contract
# ---------------------------------------------------------------------------------------------------------


def test_train_data_layer_records_raw_pixels_with_its_transform(tmp_path):
    conversion = _convert(tmp_path, TRAIN, "train", phase="TRAIN")
    contract = find_input_contract(conversion.model)
    assert (contract.pixels, contract.channel_order, contract.mean, contract.scale, contract.flip_in_model) == \
        ("raw", "bgr", (128.0,), 0.0078125, False)
    assert conversion.model.layers[1] is contract  # right after the image input
    assert any("raw BGR pixels 0..255" in note and "0.0078125" in note for note in conversion.notes)


def test_deploy_input_records_unknown_normalization_and_the_mirror_from_the_graph(tmp_path):
    conversion = _convert(tmp_path, DEPLOY, "deploy")
    contract = find_input_contract(conversion.model)
    assert (contract.pixels, contract.channel_order, contract.flip_in_model) == ("unknown", "bgr", True)
    assert any("normalization not recorded" in note and "mirror" in note for note in conversion.notes)


@pytest.mark.parametrize("text", [
    DEPLOY_HEAD + TRUNK % "data",  # no Flip at all
    DEPLOY.replace("concat_param { axis: 0 }", "concat_param { axis: 1 }").replace(
        'bottom: "fc5" top: "a" top: "b" slice_param { axis: 0 }', 'bottom: "fc5" top: "a" top: "b" slice_param { axis: 1 }'),
    DEPLOY.replace('type: "Flip" bottom: "data"', 'type: "Flip" flip_param { flip_width: false flip_height: true } '
                                                  'bottom: "data"'),  # an upside-down copy is not a mirror
], ids=["no-flip", "channel-concat", "vertical-flip"])
def test_other_graphs_do_not_claim_the_mirror(tmp_path, text):
    contract = find_input_contract(_convert(tmp_path, text, "net").model)
    assert contract.flip_in_model is False


def test_caller_records_the_normalization_of_a_deploy_net(tmp_path):
    conversion = _convert(tmp_path, DEPLOY, "deploy", input_contract={"mean": 127.5, "scale": 1 / 128})
    contract = find_input_contract(conversion.model)
    assert (contract.pixels, contract.channel_order, contract.mean, contract.scale, contract.flip_in_model) == \
        ("normalized", "bgr", (127.5,), 0.0078125, True)
    assert any("input_contract= given to the Caffe converter" in note for note in conversion.notes)
    path = tmp_path / "deploy.keras"
    conversion.model.save(path)
    reloaded = find_input_contract(keras.saving.load_model(path))
    assert reloaded.get_config() == contract.get_config()


@pytest.mark.parametrize("text, contract, message", [
    (DEPLOY, {"flip_in_model": False}, "the net does concatenate input 'data' with its Flip"),
    (TRAIN, {"mean": 127.5}, "the prototxt's data layer already records mean=[128.0]"),
    (DEPLOY, {"scale": -1}, "input_contract= is invalid: InputContract: `scale` must be a finite number > 0"),
    (DEPLOY, {"shift": 1}, "input_contract= has unknown keys ['shift']"),
])
def test_bad_input_contract_is_a_conversion_error(tmp_path, text, contract, message):
    with pytest.raises(ConversionError) as error:
        _convert(tmp_path, text, "net", phase="TRAIN" if text is TRAIN else "TEST", input_contract=contract)
    assert message in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# resolving the preprocessing
# ---------------------------------------------------------------------------------------------------------

NORMALIZED = InputContract("normalized", "bgr", mean=128, scale=1 / 128, source="test")
RAW = InputContract("raw", "bgr", mean=128, scale=1 / 128, source="test")
UNKNOWN_FLIPS = InputContract("unknown", "bgr", flip_in_model=True, source="test")


@pytest.mark.parametrize("contract, given, flip, expected, expected_flip, warned", [
    (NORMALIZED, None, None, ("bgr", 128.0, 0.0078125), False, []),
    (NORMALIZED, Preprocessing(mean=128.0, channel_order="bgr"), True, ("bgr", 128.0, 0.0078125), True, []),
    (RAW, None, None, ("bgr", 0.0, 1.0), False, []),
    (RAW, Preprocessing(mean=128.0, scale=1 / 128), None, ("bgr", 0.0, 1.0), False, ["normalize twice"]),
    (RAW, Preprocessing(mean=0.0, scale=1.0), None, ("bgr", 0.0, 1.0), False, []),
    (UNKNOWN_FLIPS, None, True, ("bgr", 0.0, 1.0), False, ["not record", "mirror twice"]),
    (UNKNOWN_FLIPS, Preprocessing(mean=127.5, scale=0.5), None, ("bgr", 127.5, 0.5), False, []),
    (None, None, None, ("rgb", 0.0, 1.0), False, ["records no input contract"]),
    (None, Preprocessing(channel_order="bgr"), True, ("bgr", 0.0, 1.0), True, []),
])
def test_resolution_rules(contract, given, flip, expected, expected_flip, warned):
    resolved = resolve_preprocessing(contract, given, flip)
    pre = resolved.preprocessing
    assert (pre.channel_order, pre.mean, pre.scale) == expected and resolved.flip is expected_flip
    assert len(resolved.warnings) == len(warned)
    for text, message in zip(warned, resolved.warnings):
        assert text in message


@pytest.mark.parametrize("contract, given, message", [
    (NORMALIZED, Preprocessing(mean=127.5), "--mean 127.5 contradicts the model's input contract, which records "
                                            "mean 128"),
    (NORMALIZED, Preprocessing(scale=1 / 127.5), "--scale 0.00784314 contradicts"),
    (NORMALIZED, Preprocessing(channel_order="rgb"), "--bgr/--rgb: RGB contradicts"),
    (RAW, Preprocessing(channel_order="rgb"), "--bgr/--rgb: RGB contradicts"),
])
def test_contradictions_are_errors_naming_the_option_and_the_fix(contract, given, message):
    with pytest.raises(ValueError) as error:
        resolve_preprocessing(contract, given, names=CLI_NAMES)
    assert message in str(error.value) and "--ignore-contract" in str(error.value)
    ignored = resolve_preprocessing(contract, given, ignore_contract=True).preprocessing
    assert ignored.given() == {"channel_order": "rgb", "mean": 0.0, "scale": 1.0, **given.given()}


# ---------------------------------------------------------------------------------------------------------
# evaluate_lfw / compute_embeddings / keras-margin verify follow the contract
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lfw(tmp_path_factory):
    """Four people, two PNG images each, and a headerless pairs list (2 genuine, 2 impostor pairs)."""
    root = tmp_path_factory.mktemp("lfw_contract")
    rng = np.random.default_rng(5)
    pixels, names = {}, ["Ann", "Bob", "Cid", "Dee"]
    for name in names:
        (root / "images" / name).mkdir(parents=True)
        base = rng.integers(0, 256, (H, W, 3))
        for number in (1, 2):
            image = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            relative = f"{name}/{name}_{number:04d}.png"
            tf.io.write_file(str(root / "images" / relative), tf.io.encode_png(image))
            pixels[relative] = image.astype(np.float64)
    pairs = root / "pairs.txt"
    pairs.write_text("Ann 1 2\nBob 1 2\nCid 1 Dee 2\nAnn 2 Bob 1\n")
    return {"images": root / "images", "pairs": pairs, "pixels": pixels}


def _embedding(conversion, x_nhwc):
    """The model's embedding of model-ready inputs, L2-normalized (what compute_embeddings returns)."""
    y = np.asarray(conversion.model(x_nhwc.astype(np.float32), training=False), np.float64).reshape(len(x_nhwc), -1)
    return y / np.linalg.norm(y, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    conversion = _convert(tmp_path_factory.mktemp("train"), TRAIN, "train", phase="TRAIN")
    path = tmp_path_factory.mktemp("saved") / "train.keras"
    conversion.model.save(path)
    return conversion, path


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    conversion = _convert(tmp_path_factory.mktemp("deploy"), DEPLOY, "deploy",
                          input_contract={"mean": 128, "scale": 0.0078125})
    path = tmp_path_factory.mktemp("saved") / "deploy.keras"
    conversion.model.save(path)
    return conversion, path


def _verify(*argv):
    parser = argparse.ArgumentParser(prog="keras-margin verify")
    cli.add_arguments(parser)
    return cli.run(parser.parse_args([str(arg) for arg in argv]))


def test_train_model_gets_raw_bgr_pixels_and_a_doubled_mean_is_dropped(lfw, train):
    conversion, _ = train
    files = [lfw["images"] / "Ann/Ann_0001.png", lfw["images"] / "Bob/Bob_0002.png"]
    raw_bgr = np.stack([lfw["pixels"][f"{p.parent.name}/{p.name}"][..., ::-1] for p in files])
    expected = _embedding(conversion, raw_bgr)
    np.testing.assert_allclose(compute_embeddings(conversion.model, files, progress=False), expected, atol=1e-5)
    with pytest.warns(PreprocessingWarning, match="normalize twice"):
        doubled = compute_embeddings(conversion.model, files, preprocessing=Preprocessing(mean=128.0, scale=1 / 128),
                                     progress=False)
    np.testing.assert_allclose(doubled, expected, atol=1e-5)


def test_deploy_model_is_normalized_from_its_contract_and_never_flipped_outside(lfw, deploy):
    conversion, _ = deploy
    files = [lfw["images"] / "Cid/Cid_0001.png"]
    x = (lfw["pixels"]["Cid/Cid_0001.png"][None, ..., ::-1] - 128.0) * 0.0078125
    expected = _embedding(conversion, x)
    with pytest.warns(PreprocessingWarning, match="mirror twice"):
        got = compute_embeddings(conversion.model, files, flip=True, progress=False)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="preprocessing.mean 127.5 contradicts"):
        evaluate_lfw(conversion.model, lfw["pairs"], lfw["images"], ext="png", progress=False,
                     preprocessing=Preprocessing(mean=127.5))


def test_verify_cli_warns_once_per_doubled_step_and_applies_it_once(lfw, train, capsys):
    conversion, path = train
    code = _verify(path, "--pairs", lfw["pairs"], "--images", lfw["images"], "--ext", "png", "--quiet",
                   "--mean", "128", "--scale", "0.0078125", "--bgr")
    out, err = capsys.readouterr()
    assert code == 0, err
    warnings_ = [line for line in err.splitlines() if line.startswith("keras-margin verify: warning:")]
    assert len(warnings_) == 1 and "--mean 128 --scale 0.0078125 ignored" in warnings_[0]
    assert "preprocessing  BGR, pixels 0..255 unchanged; no flip [model's input contract: raw BGR" in out
    plain = _verify(path, "--pairs", lfw["pairs"], "--images", lfw["images"], "--ext", "png", "--quiet")
    out_plain, err_plain = capsys.readouterr()
    assert plain == 0 and "warning" not in err_plain
    assert out_plain.split("accuracy")[1] == out.split("accuracy")[1]  # the same figures: normalized once


def test_verify_cli_contradiction_is_an_error_and_ignore_contract_overrides(lfw, deploy, capsys):
    _, path = deploy
    args = [path, "--pairs", lfw["pairs"], "--images", lfw["images"], "--ext", "png", "--quiet", "--mean", "127.5"]
    assert _verify(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mean 127.5 contradicts the model's input contract" in err[0]
    assert "--ignore-contract" in err[0]
    assert _verify(*args, "--ignore-contract") == 0
    assert "given; the model's input contract is ignored" in capsys.readouterr().out


def test_verify_cli_flip_on_a_model_that_flips_is_dropped(lfw, deploy, capsys):
    _, path = deploy
    assert _verify(path, "--pairs", lfw["pairs"], "--images", lfw["images"], "--ext", "png", "--quiet",
                   "--flip") == 0
    out, err = capsys.readouterr()
    assert "--flip ignored: the model adds the mirror image's feature itself" in err
    assert "(flip)" not in out and "the model adds the mirror image's feature itself" in out


def test_verify_cli_unknown_normalization_without_options_warns(lfw, tmp_path, capsys):
    conversion = _convert(tmp_path, DEPLOY, "deploy")
    path = tmp_path / "unknown.keras"
    conversion.model.save(path)
    assert _verify(path, "--pairs", lfw["pairs"], "--images", lfw["images"], "--ext", "png", "--quiet") == 0
    err = capsys.readouterr().err
    assert "does not record its normalization" in err and "pass --mean/--scale" in err
