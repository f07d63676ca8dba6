"""``keras-margin convert``: a .keras file, a one-screen summary, parity figures; errors in one line, exit 2."""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest

from converters.caffe import cli, write_caffemodel
from converters.caffe.reader import parse_prototxt
from tests.caffe_nets import face_resnet20_blobs, face_resnet20_prototxt, write_net

SMALL = dict(widths=(8, 8, 16, 16), embedding=16, input_hw=(28, 24))


def _run(*argv):
    parser = argparse.ArgumentParser(prog="keras-margin convert")
    cli.add_arguments(parser)
    return cli.run(parser.parse_args([str(arg) for arg in argv]))


@pytest.fixture
def train_files(tmp_path):
    text = face_resnet20_prototxt("train", **SMALL, num_classes=10)
    prototxt, _ = write_net(tmp_path, text, name="face_train")
    caffemodel = tmp_path / "face.caffemodel"
    write_caffemodel(caffemodel, parse_prototxt(text).net, face_resnet20_blobs(**SMALL, num_classes=10))
    return prototxt, caffemodel


def test_convert_writes_a_keras_file_and_prints_a_summary_with_parity(train_files, tmp_path, capsys):
    prototxt, caffemodel = train_files
    output = tmp_path / "model.keras"
    code = _run(prototxt, caffemodel, "-o", output, "--phase", "TRAIN", "--input-shape", "3,28,24", "--check", "opencv")
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert output.exists()
    assert "converting [" in err  # the progress bar (a single final line when stderr is not a terminal)
    summary = out.splitlines()
    assert len(summary) < 25
    for expected in ("(phase TRAIN)", "params    ", "input     data: Keras (None, 28, 24, 3)",
                     "head      AMSoftmaxHead 'fc6_l2' (num_classes=10, s=30, m=0.35, margin_rule=caffe)", "BGR",
                     "parity vs OpenCV", "all within tolerance"):
        assert expected in out, expected
    import keras

    import converters.caffe.layers  # noqa: F401

    model = keras.saving.load_model(output)
    assert model.layers[-1].__class__.__name__ == "AMSoftmaxHead"


def test_divergent_reference_exits_1(train_files, tmp_path, capsys):
    prototxt, caffemodel = train_files
    rng = np.random.default_rng(0)
    data = ((rng.uniform(0, 255, (2, 3, 28, 24)) - 128) / 128).astype(np.float32)
    reference = tmp_path / "ref.npz"
    np.savez(reference, data=data, fc5=np.zeros((2, 16), np.float32))
    code = _run(prototxt, caffemodel, "-o", tmp_path / "m.keras", "--input-shape", "3,28,24", "--check", reference,
                "--quiet")
    out, _ = capsys.readouterr()
    assert code == 1
    assert "FIRST DIVERGENCE at blob 'fc5'" in out


@pytest.mark.parametrize("argv, message", [
    (["absent.prototxt"], "absent.prototxt: no such prototxt file"),
    (["{proto}", "-o", "model.h5"], "the output file name must end in .keras"),
    (["{proto}", "--input-shape", "3xbig"], "--input-shape '3xbig': expected C,H,W integers"),
    (["{proto}", "--phase", "TRAIN"], "layer 'data' (ImageData): the prototxt does not say the input image size"),
])
def test_errors_are_one_line_with_exit_code_2(train_files, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    prototxt, _ = train_files
    code = _run(*[arg.replace("{proto}", str(prototxt)) for arg in argv])
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keras-margin convert: error: ") and message in lines[0]
    assert "Traceback" not in err + out


def test_installed_command_reports_errors_without_a_traceback(tmp_path):
    prototxt, _ = write_net(tmp_path, 'input: "data" input_shape { dim: 1 dim: 3 }\n'
                                      'layer { name: "act" type: "Mish" bottom: "data" top: "act" }')
    result = subprocess.run([sys.executable, "-m", "keras_margin_cli", "convert", str(prototxt), "-o",
                             str(tmp_path / "m.keras")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [errors[0]] and "layer 'act' (Mish): no handler for 1 layer(s)" in errors[0]


def test_convert_records_the_deploy_contract_given_on_the_command_line(tmp_path):
    import keras

    from keras_margin import find_input_contract
    from keras_margin_cli import main

    prototxt = tmp_path / "tiny.prototxt"
    prototxt.write_text('input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 6\n'
                        'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
                        'inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }\n')
    output = tmp_path / "tiny.keras"
    assert main(["convert", str(prototxt), "-o", str(output), "--mean", "127.5", "--scale", "0.0078125", "--rgb",
                 "--quiet"]) == 0
    contract = find_input_contract(keras.saving.load_model(output))
    assert (contract.pixels, contract.channel_order, contract.mean, contract.scale) == \
        ("normalized", "rgb", (127.5,), 0.0078125)
