"""The export parity check probes with what the model expects (its ``InputContract``), says "not a check" when
the probe cannot tell a faithful file from one ignoring its input, and takes real inputs (``--inputs``).

The net: Rescaling(1/255) -> Conv (bias 0.5, ReLU) -> Dense(32) whose kernel has an outlier row, so that int8
weights (dynamic range, one scale per output column) lose most of the small ones. On N(0, 1) "pixels" the Rescaling leaves about +-0.004, the
conv outputs are its bias, the embedding is nearly constant and the figures cannot tell anything; on pixels
0..255 the int8 error shows. Files are run in ONNX Runtime and the LiteRT interpreter, nothing is mocked.
"""

from __future__ import annotations

import argparse

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_margin import InputContract
from keras_margin.export import ParityReport, export_onnx, export_tflite, probe_inputs, run_onnx, spread
from keras_margin.export.loading import load_inputs
from keras_margin_cli import export as cli


def pixel_net(contract: str | None = "raw") -> keras.Model:
    images = keras.Input((8, 8, 3), name="images")
    x = InputContract(contract, "bgr", source="test")(images) if contract else images
    if contract == "normalized":  # the caller normalizes: (x - 0) * 1/255 outside, nothing inside
        x = keras.layers.Identity()(x)
    else:
        x = keras.layers.Rescaling(1 / 255)(x)
    conv = keras.layers.Conv2D(8, 3, padding="same", activation="relu")
    dense = keras.layers.Dense(32)
    model = keras.Model(images, dense(keras.layers.Flatten()(conv(x))))
    rng = np.random.default_rng(0)
    conv.set_weights([rng.normal(0, 0.3, conv.kernel.shape), np.full(8, 0.5)])
    kernel = rng.normal(0, 0.02, dense.kernel.shape)
    kernel[0, :] = 2.0  # an outlier per output column sets each column's int8 step (2 / 127) near the other weights
    dense.set_weights([kernel, rng.normal(0, 0.1, 32)])
    return model


def test_standard_normal_probe_of_a_pixel_model_is_reported_as_not_a_check(tmp_path):
    model = pixel_net(contract=None)  # what the check did before contracts
    report = export_tflite(model, tmp_path / "m.tflite", quantize="dynamic", verbose=False)
    assert report.spread < report.spread_threshold() and not report.informative() and not report.passed()
    assert "NOT A CHECK" in str(report) and "standard normal (no input contract)" == report.probe


def test_contract_probe_catches_the_int8_error(tmp_path):
    model = pixel_net("raw")
    batch, probe = probe_inputs(model, 8)
    assert probe.startswith("random pixels 0..255") and batch[0].min() >= 0 and batch[0].max() > 250
    report = export_tflite(model, tmp_path / "m.tflite", quantize="dynamic", verbose=False)
    assert report.informative() and report.spread > 2 * report.spread_threshold()
    assert report.min_cosine < 0.999 and not report.passed()  # real pixels show the int8 error
    float32 = export_onnx(model, tmp_path / "m.onnx", verbose=False)
    assert float32.passed() and float32.informative() and "NOT A CHECK" not in str(float32)


def test_normalized_contract_probe_is_mapped_through_mean_and_scale():
    images = keras.Input((4, 4, 3))
    model = keras.Model(images, InputContract("normalized", "bgr", mean=[104, 117, 123], scale=0.5)(images))
    batch, probe = probe_inputs(model, 64, seed=3)
    raw = np.random.default_rng(3).integers(0, 256, (64, 4, 4, 3)).astype(np.float64)[..., ::-1]
    np.testing.assert_allclose(batch[0], (raw - [104, 117, 123]) * 0.5)
    assert probe.startswith("random pixels, normalized")


def test_spread_counts_identical_inputs_once_and_zero_outputs_as_equal():
    outputs = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert spread(outputs) == pytest.approx(2 / 3)
    assert spread(outputs, [np.array([[0.0], [0.0], [1.0]])]) == pytest.approx(1.0)
    assert spread(np.zeros((4, 3))) == 0.0
    assert spread(np.array([[0.0, 0.0], [1.0, 0.0]])) == 1.0
    report = ParityReport("ONNX", None, "dynamic", 1, (8, 1), 0.0, 1.0, 1.0, "", None)
    assert report.informative() and report.spread_threshold() == pytest.approx(4e-3)


# ---------------------------------------------------------------------------------------------------------
# real inputs: .npy and a folder of images
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_images")
    rng = np.random.default_rng(9)
    pixels = []
    for index in range(5):
        image = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
        tf.io.write_file(str(root / f"{index}.png"), tf.io.encode_png(image))
        pixels.append(image)
    (root / "notes.txt").write_text("not an image")
    return root, np.stack(pixels).astype(np.float32)


def test_image_folder_is_prepared_per_the_contract(images_dir):
    root, pixels = images_dir
    x, what = load_inputs(pixel_net("raw"), root, limit=3)
    np.testing.assert_array_equal(x, pixels[:3, ..., ::-1])  # raw BGR: only the channel order
    assert "the first 3 of 5 images" in what
    with pytest.raises(ValueError, match="records no InputContract, so it is not known how images become"):
        load_inputs(pixel_net(None), root)


def _export(*argv):
    parser = argparse.ArgumentParser(prog="keras-margin export")
    cli.add_arguments(parser)
    return cli.run(parser.parse_args([str(arg) for arg in argv]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved_pixel_nets")
    paths = {}
    for contract in (None, "raw"):
        paths[contract] = folder / f"{contract}.keras"
        pixel_net(contract).save(paths[contract])
    return paths


def test_export_cli_vacuous_probe_exits_1_and_real_inputs_fix_it(saved, images_dir, tmp_path, capsys):
    _, pixels = images_dir
    assert _export(saved[None], "--onnx", tmp_path / "m.onnx") == 1
    out, err = capsys.readouterr()
    assert "parity inputs: standard normal (no input contract)" in out
    assert "PARITY NOT CHECKED: ONNX float32" in out and "--inputs DIR|file.npy" in err
    np.save(tmp_path / "pixels.npy", pixels)
    assert _export(saved[None], "--onnx", tmp_path / "m.onnx", "--inputs", tmp_path / "pixels.npy") == 0
    out, _ = capsys.readouterr()
    assert "parity inputs: 5 inputs from" in out and "parity: all exports within tolerance" in out
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", [pixels]), pixel_net(None).predict(pixels, verbose=0),
                               atol=1e-4)


def test_export_cli_contract_probe_and_image_folder_catch_int8(saved, images_dir, tmp_path, capsys):
    root, _ = images_dir
    for extra in ([], ["--inputs", root]):
        assert _export(saved["raw"], "--tflite", tmp_path / "m.tflite", "--quantize", "dynamic", *extra) == 1
        out, _ = capsys.readouterr()
        assert "PARITY CHECK FAILED: TFLite int8 weights (dynamic range)" in out and "NOT CHECKED" not in out
    assert "parity inputs: 5 images from" in out


def test_export_cli_bad_inputs_are_one_line_errors(saved, images_dir, tmp_path, capsys):
    root, _ = images_dir
    for value, message in ((tmp_path / "absent.npy", "absent.npy: no such file or folder"),
                           (root / "notes.txt", "expected a .npy file")):
        assert _export(saved["raw"], "--onnx", tmp_path / "m.onnx", "--inputs", value) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("keras-margin export: error: --inputs ") and message in err[0]
