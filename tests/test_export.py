"""Export of plain Keras models to ONNX and TFLite: the files run in ONNX Runtime and the LiteRT interpreter
(called directly here, at a batch size the export never saw) and agree with Keras; the part exported; the CLI.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
from ai_edge_litert.interpreter import Interpreter

from keras_margin import AMSoftmaxHead, NormFaceHead, SphereFaceHead
from keras_margin.export import ParityReport, embedding_model, export_onnx, export_tflite
from keras_margin_cli import export as cli

RNG = np.random.default_rng(42)


def ort_run(path, *inputs):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {item.name: value for item, value in zip(session.get_inputs(), inputs)})[0]


def litert_run(path, *inputs):
    interpreter = Interpreter(model_path=str(path))
    details = interpreter.get_input_details()
    for detail, value in zip(details, inputs):
        interpreter.resize_tensor_input(detail["index"], value.shape, strict=True)
    interpreter.allocate_tensors()
    for detail, value in zip(details, inputs):
        interpreter.set_tensor(detail["index"], value)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def conv_net() -> keras.Model:
    """A small functional CNN with batch norm, pooling and an L2-normalized 32-d output."""
    images = keras.Input((16, 12, 3), name="images")
    x = keras.layers.Conv2D(8, 3, padding="same")(images)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.PReLU(shared_axes=[1, 2])(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(32)(x)
    model = keras.Model(images, keras.layers.UnitNormalization()(x))
    bn = model.layers[2]
    bn.set_weights([RNG.uniform(0.5, 1.5, 8), RNG.normal(0, 0.1, 8), RNG.normal(0, 0.1, 8), RNG.uniform(0.5, 2, 8)])
    return model


@pytest.fixture(scope="module")
def cnn():
    return conv_net()


@pytest.fixture(scope="module")
def exported(cnn, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cnn")
    reports = {"onnx": export_onnx(cnn, folder / "cnn.onnx", verbose=False)}
    for quantize in (None, "float16", "dynamic"):
        reports[quantize or "float32"] = export_tflite(cnn, folder / f"cnn_{quantize}.tflite", quantize=quantize,
                                                      verbose=False)
    return reports


def test_onnx_file_matches_keras_in_onnx_runtime(cnn, exported):
    x = RNG.normal(size=(5, 16, 12, 3)).astype(np.float32)
    got = ort_run(exported["onnx"].path, x)
    assert np.abs(got - cnn.predict(x, verbose=0)).max() <= 1e-5


def test_tflite_file_matches_keras_in_litert(cnn, exported):
    x = RNG.normal(size=(5, 16, 12, 3)).astype(np.float32)
    got = litert_run(exported["float32"].path, x)
    assert np.abs(got - cnn.predict(x, verbose=0)).max() <= 1e-5


def test_files_have_a_dynamic_batch_and_named_tensors(exported):
    graph = onnx.load(str(exported["onnx"].path)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["embedding"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [16, 12, 3]
    interpreter = Interpreter(model_path=str(exported["float32"].path))
    assert interpreter.get_signature_list() == {"serving_default": {"inputs": ["images"], "outputs": ["embedding"]}}
    assert interpreter.get_input_details()[0]["shape_signature"].tolist() == [-1, 16, 12, 3]
    for batch in (1, 3, 17):  # the signature runner resizes the batch
        out = interpreter.get_signature_runner()(images=np.zeros((batch, 16, 12, 3), np.float32))
        assert out["embedding"].shape == (batch, 32)


def test_report_figures_are_the_runtime_errors(cnn, tmp_path):
    x = RNG.normal(size=(4, 16, 12, 3)).astype(np.float32)
    report = export_onnx(cnn, tmp_path / "m.onnx", inputs=x, verbose=False)
    reference = cnn.predict(x, verbose=0).astype(np.float64)
    outputs = [ort_run(report.path, x).astype(np.float64), ort_run(report.path, x[:1]).astype(np.float64)]
    expected_abs = max(np.abs(outputs[0] - reference).max(), np.abs(outputs[1] - reference[:1]).max())
    cosines = np.sum(outputs[0] * reference, 1) / np.linalg.norm(outputs[0], axis=1) / np.linalg.norm(reference, axis=1)
    assert report.max_abs_error == pytest.approx(expected_abs, abs=1e-12)
    assert report.min_cosine == pytest.approx(min(cosines.min(), 1.0), abs=1e-9)
    assert report.batch_sizes == (4, 1) and report.file_size == report.path.stat().st_size


def test_quantized_exports_report_cosine_and_file_size(exported, capsys):
    float32, float16, dynamic = exported["float32"], exported["float16"], exported["dynamic"]
    assert float32.max_abs_error <= 1e-5 and float32.passed()
    assert float16.min_cosine >= 0.9999 and float16.passed()
    assert dynamic.min_cosine >= 0.999 and dynamic.passed()
    print(float16)
    line = capsys.readouterr().out
    assert "float16 weights" in line and "min cosine" in line and "kB" in line


def test_quantization_shrinks_large_weights(tmp_path):
    model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(512, activation="relu"),
                              keras.layers.Dense(128)])
    sizes = {q: export_tflite(model, tmp_path / f"{q}.tflite", quantize=q, verbose=False).file_size
             for q in (None, "float16", "dynamic")}
    weight_bytes = 4 * model.count_params()
    assert 0.95 * weight_bytes < sizes[None] < 1.05 * weight_bytes
    assert sizes["float16"] < 0.55 * sizes[None]
    assert sizes["dynamic"] < 0.3 * sizes[None]


# ---------------------------------------------------------------------------------------------------------
# which part is exported
# ---------------------------------------------------------------------------------------------------------


def test_default_export_is_the_embedding_before_the_head_without_added_normalization(tmp_path):
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(6, name="feature"), AMSoftmaxHead(4)])
    x = RNG.normal(size=(3, 10)).astype(np.float32)
    kernel, bias = model.get_layer("feature").get_weights()
    report = export_onnx(model, tmp_path / "e.onnx", verbose=False)
    got = ort_run(report.path, x)
    np.testing.assert_allclose(got, x @ kernel + bias, atol=1e-5)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_explicit_normalization_before_the_head_is_kept(tmp_path):
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(6), keras.layers.UnitNormalization(),
                              NormFaceHead(4)])
    got = litert_run(export_tflite(model, tmp_path / "e.tflite", verbose=False).path,
                     RNG.normal(size=(3, 10)).astype(np.float32))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_include_head_exports_the_cosines(tmp_path):
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(6, name="feature"), AMSoftmaxHead(4)])
    x = RNG.normal(size=(3, 10)).astype(np.float32)
    kernel, bias = (w.astype(np.float64) for w in model.get_layer("feature").get_weights())
    weights = model.layers[-1].kernel.numpy().astype(np.float64)
    feature = x @ kernel + bias
    expected = (feature / np.linalg.norm(feature, axis=1, keepdims=True)) @ (weights / np.linalg.norm(weights, axis=0))
    onnx_report = export_onnx(model, tmp_path / "c.onnx", include_head=True, verbose=False)
    tflite_report = export_tflite(model, tmp_path / "c.tflite", include_head=True, verbose=False)
    np.testing.assert_allclose(ort_run(onnx_report.path, x), expected, atol=1e-5)
    np.testing.assert_allclose(litert_run(tflite_report.path, x), expected, atol=1e-5)
    assert onnx.load(str(onnx_report.path)).graph.output[0].name == "cos_theta"


def test_label_aware_model_exports_without_the_label_input(tmp_path):
    images, labels = keras.Input((10,), name="images"), keras.Input((), dtype="int32", name="labels")
    logits = SphereFaceHead(4)([keras.layers.Dense(6)(images), labels])
    model = keras.Model([images, labels], logits)
    for include_head, width in ((False, 6), (True, 4)):
        report = export_onnx(model, tmp_path / f"{include_head}.onnx", include_head=include_head, verbose=False)
        graph = onnx.load(str(report.path)).graph
        assert [i.name for i in graph.input] == ["images"]
        assert ort_run(report.path, np.ones((2, 10), np.float32)).shape == (2, width)
        assert report.passed()


def test_model_without_a_head_is_exported_whole(tmp_path):
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    assert embedding_model(model) is model
    assert export_tflite(model, tmp_path / "m.tflite", verbose=False).max_abs_error <= 1e-6


def test_two_input_model_exports_both_inputs_by_name(tmp_path):
    a, b = keras.Input((4,), name="left"), keras.Input((3,), name="right")
    model = keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Concatenate()([a, b])))
    onnx_report = export_onnx(model, tmp_path / "two.onnx", verbose=False)
    tflite_report = export_tflite(model, tmp_path / "two.tflite", verbose=False)
    assert [i.name for i in onnx.load(str(onnx_report.path)).graph.input] == ["left", "right"]
    assert onnx_report.max_abs_error <= 1e-6 and tflite_report.max_abs_error <= 1e-6


@pytest.mark.parametrize("call, message", [
    (lambda m, d: export_onnx(m, d / "m.tflite"), "must end in .onnx"),
    (lambda m, d: export_tflite(m, d / "m.onnx"), "must end in .tflite"),
    (lambda m, d: export_tflite(m, d / "absent" / "m.tflite"), "does not exist"),
    (lambda m, d: export_tflite(m, d / "m.tflite", quantize="int4"), "quantize must be one of"),
    (lambda m, d: export_onnx(m, d / "m.onnx", inputs=np.zeros((2, 7), np.float32)), "has shape (2, 7)"),
])
def test_bad_arguments_are_clear_errors(tmp_path, call, message):
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        call(model, tmp_path)
    assert message in str(error.value)


def test_head_inside_a_nested_model_is_a_clear_error(tmp_path):
    inner = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3), AMSoftmaxHead(2, name="inner_head")])
    outer = keras.Sequential([keras.Input((5,)), inner])
    with pytest.raises(ValueError, match="'inner_head' .* sits inside a nested model"):
        export_onnx(outer, tmp_path / "m.onnx")


def test_parity_report_tolerances():
    def report(quantize, max_abs, cosine, largest=1.0):
        return ParityReport("TFLite", None, quantize, 1, (8, 1), max_abs, cosine, largest)

    assert report(None, 9e-6, 1.0).passed() and not report(None, 2e-5, 1.0).passed()
    assert report(None, 2e-4, 1.0, largest=50.0).passed()  # float32 bound scales with the outputs
    assert report("float16", 1e-2, 0.99995).passed() and not report("float16", 0.0, 0.9998).passed()
    assert report("dynamic", 1e-1, 0.9995).passed() and not report("dynamic", 0.0, 0.998).passed()


# ---------------------------------------------------------------------------------------------------------
# keras-margin export
# ---------------------------------------------------------------------------------------------------------


def _export(*argv):
    parser = argparse.ArgumentParser(prog="keras-margin export")
    cli.add_arguments(parser)
    return cli.run(parser.parse_args([str(arg) for arg in argv]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "face.keras"
    keras.Sequential([keras.Input((12,)), keras.layers.Dense(64), keras.layers.UnitNormalization(),
                      AMSoftmaxHead(5)]).save(path)
    return path


def test_export_cli_writes_both_files_and_prints_parity(saved, tmp_path, capsys):
    onnx_path, tflite_path = tmp_path / "face.onnx", tmp_path / "face.tflite"
    code = _export(saved, "--onnx", onnx_path, "--tflite", tflite_path, "--quantize", "dynamic")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert onnx_path.exists() and tflite_path.exists()
    assert "exporting the embedding part (inputs -> the input of AMSoftmaxHead" in out
    assert "ONNX   float32" in out and "TFLite int8 weights (dynamic range)" in out
    assert "parity: all exports within tolerance" in out
    assert ort_run(onnx_path, np.ones((2, 12), np.float32)).shape == (2, 64)


def test_export_cli_include_head(saved, tmp_path, capsys):
    assert _export(saved, "--onnx", tmp_path / "c.onnx", "--include-head") == 0
    assert "the whole model with the head's cos(theta) output, output shape (None, 5)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["{model}"], "nothing to do: give --onnx"),
    (["{model}", "--onnx", "m.onnx", "--quantize", "float16"], "--quantize float16 applies to the TFLite file"),
    (["{model}", "--tflite", "m.onnx"], "--tflite m.onnx: the file name must end in .tflite"),
    (["{model}", "--onnx", "nowhere/m.onnx"], "the folder nowhere does not exist"),
    (["absent.keras", "--onnx", "m.onnx"], "absent.keras: no such model file"),
    (["{text}", "--onnx", "m.onnx"], "expected a .keras model file"),
])
def test_export_cli_errors_are_one_line_with_exit_code_2(saved, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a model")
    code = _export(*[arg.replace("{model}", str(saved)).replace("{text}", "notes.txt") for arg in argv])
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keras-margin export: error: ") and message in lines[0], err
    assert "Traceback" not in out + err


def test_installed_export_command(saved, tmp_path):
    result = subprocess.run([sys.executable, "-m", "keras_margin_cli", "export", str(saved), "--tflite",
                             str(tmp_path / "f.tflite"), "--quantize", "float16"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "TFLite float16 weights" in result.stdout and "Traceback" not in result.stderr
