"""``keras-margin convert --check``: checked before converting, runs without a caffemodel (on the model's own
initial weights), turns OpenCV failures into one line, writes only a model whose check passed, and never
leaves a partial .keras at the output path."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters.caffe import cli, write_caffemodel
from tests.caffe_nets import AMSOFTMAX_DIR, SHARED_MISSING, face_resnet20_prototxt, write_net

SMALL = dict(widths=(8, 8, 16, 16), embedding=16, input_hw=(28, 24))
REPO = Path(__file__).resolve().parents[1]


def _run(*argv):
    parser = argparse.ArgumentParser(prog="keras-margin convert")
    cli.add_arguments(parser)
    return cli.run(parser.parse_args([str(arg) for arg in argv]))


def _one_error_line(err: str, out: str = "") -> str:
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("keras-margin convert: error: ")
    return lines[0]


@pytest.fixture
def train_prototxt(tmp_path):
    prototxt, _ = write_net(tmp_path, face_resnet20_prototxt("train", **SMALL, num_classes=10), name="face_train")
    return prototxt


SCALE_NET = ('input: "data" input_dim: 1 input_dim: 3 input_dim: 6 input_dim: 6\n'
             'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"\n'
             '  convolution_param { num_output: 2 kernel_size: 3 } }\n'
             'layer { name: "scale" type: "Scale" bottom: "conv" top: "scale" scale_param { bias_term: true } }\n')


def test_check_opencv_without_a_caffemodel_runs_on_the_models_own_initial_weights(train_prototxt, tmp_path, capsys):
    output = tmp_path / "train.keras"
    code = _run(train_prototxt, "-o", output, "--phase", "TRAIN", "--input-shape", "3,28,24", "--check", "opencv",
                "--quiet")
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "own initial weights" in out and "all within tolerance" in out
    assert "drawn in Caffe layout" in out
    assert output.exists() and not [p for p in tmp_path.iterdir() if ".partial" in p.name]

    # The .keras holds exactly the weights that were checked: the prototxt fillers' draws (seed 0).
    import keras

    import converters.caffe.layers  # noqa: F401
    from converters.caffe.planner import plan_net
    from converters.caffe.reader import read_prototxt
    from converters.caffe.writer import filler_blobs

    plan = plan_net(read_prototxt(train_prototxt), None, "TRAIN", (3, 28, 24))
    blobs = filler_blobs(plan, seed=0)
    model = keras.saving.load_model(output)
    kernel, bias = model.get_layer("conv1_1").get_weights()
    np.testing.assert_array_equal(kernel, blobs["conv1_1"][0].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(bias, blobs["conv1_1"][1])
    assert np.all(blobs["fc6_margin_scale"][0] == 30.0)  # the fused Scale's constant filler feeds OpenCV too
    assert model.layers[-1].__class__.__name__ == "AMSoftmaxHead"


@pytest.mark.parametrize("check, message", [
    ("{tmp}/missing.npz", "missing.npz: no such reference .npz file"),
    ("opencvv", "--check 'opencvv': expected 'opencv' or the path of an .npz"),
])
def test_bad_check_values_fail_before_anything_is_converted_or_written(train_prototxt, tmp_path, capsys, check,
                                                                         message):
    output = tmp_path / "m.keras"
    check = check.replace("{tmp}", str(tmp_path))
    code = _run(train_prototxt, "-o", output, "--input-shape", "3,28,24", "--check", check)
    out, err = capsys.readouterr()
    assert code == 2
    assert message in _one_error_line(err, out)
    assert "converting [" not in err  # refused before the conversion started
    assert not output.exists() and not [p for p in tmp_path.iterdir() if p.suffix == ".keras"]


def test_check_opencv_without_cv2_fails_before_converting(train_prototxt, tmp_path):
    blocker = tmp_path / "no_cv2"
    blocker.mkdir()
    (blocker / "cv2.py").write_text('raise ImportError("cv2 is blocked for this test")\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO), os.environ.get("PYTHONPATH", "")]))
    output = tmp_path / "m.keras"
    result = subprocess.run([sys.executable, "-m", "keras_margin_cli", "convert", str(train_prototxt), "-o",
                             str(output), "--input-shape", "3,28,24", "--check", "opencv"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "the OpenCV reference needs opencv-python-headless" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "converting [" not in result.stderr
    assert not output.exists()


def test_an_opencv_error_during_the_check_is_one_line_naming_the_layer(tmp_path, capsys):
    prototxt, _ = write_net(tmp_path, SCALE_NET)
    caffemodel = tmp_path / "no_scale.caffemodel"  # conv's blobs only: OpenCV's Scale layer then has none
    write_caffemodel(caffemodel, [("conv", "Convolution", [np.ones((2, 3, 3, 3), np.float32), np.zeros(2)])])
    output = tmp_path / "m.keras"
    code = _run(prototxt, caffemodel, "-o", output, "--check", "opencv", "--quiet")
    out, err = capsys.readouterr()
    assert code == 2
    line = _one_error_line(err, out)
    assert "scale_layer.cpp" in line and "no blobs for layer(s) 'scale'" in line
    assert "check without the caffemodel" in line
    assert not output.exists() and not list(tmp_path.glob("*.keras"))

    # The fix the message gives: without the caffemodel the check runs (on the initial weights) and passes.
    assert _run(prototxt, "-o", output, "--check", "opencv", "--quiet") == 0, capsys.readouterr()
    assert output.exists()


def test_a_failed_check_writes_nothing_and_says_so(train_prototxt, tmp_path, capsys):
    rng = np.random.default_rng(0)
    reference = tmp_path / "ref.npz"
    np.savez(reference, data=((rng.uniform(0, 255, (2, 3, 28, 24)) - 128) / 128).astype(np.float32),
             fc5=np.zeros((2, 16), np.float32))
    output = tmp_path / "m.keras"
    code = _run(train_prototxt, "-o", output, "--input-shape", "3,28,24", "--check", reference, "--quiet")
    out, _ = capsys.readouterr()
    assert code == 1
    assert not output.exists()
    assert f"NOT WRITTEN  {output}: the parity check FAILED (exit 1)" in out


def test_an_interrupted_save_leaves_no_partial_file(train_prototxt, tmp_path, monkeypatch, capsys):
    import keras

    output = tmp_path / "m.keras"
    output.write_bytes(b"the previous model")

    def interrupted_save(self, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"half a zip")  # what a save cut short leaves behind
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        _run(train_prototxt, "-o", output, "--input-shape", "3,28,24", "--quiet")
    assert output.read_bytes() == b"the previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["face_train.prototxt", "m.keras"]


def test_the_package_lists_its_lazy_api():
    import converters.caffe

    names = dir(converters.caffe)
    assert names == sorted(names)
    for name in converters.caffe.__all__:
        assert name in names
    assert "ConversionError" in names and "__all__" in names


@pytest.mark.skipif(not (AMSOFTMAX_DIR / "face_train_test.prototxt").exists(), reason=SHARED_MISSING)
def test_the_readme_train_command_on_the_released_prototxt_without_a_caffemodel(tmp_path, capsys):
    """README: ``keras-margin convert face_train_test.prototxt [face_model.caffemodel] -o face_train.keras
    --phase TRAIN --check opencv`` needs ``--input-shape 3,112,96`` (the ImageData layer has no size)."""
    prototxt = AMSOFTMAX_DIR / "face_train_test.prototxt"
    output = tmp_path / "face_train.keras"
    code = _run(prototxt, "-o", output, "--phase", "TRAIN", "--check", "opencv", "--quiet")
    out, err = capsys.readouterr()
    assert code == 2 and "--input-shape" in _one_error_line(err, out)
    code = _run(prototxt, "-o", output, "--phase", "TRAIN", "--input-shape", "3,112,96", "--check", "opencv",
                "--quiet")
    out, err = capsys.readouterr()
    assert code == 0, out + err
    for expected in ("(phase TRAIN)", "AMSoftmaxHead 'fc6_l2' (num_classes=10516, s=30, m=0.35, margin_rule=caffe)",
                     "own initial weights", "all within tolerance"):
        assert expected in out, expected
    assert output.exists()
