"""The converted 20-layer AM-Softmax network (Face-ResNet-20, 112x96 input; seeded random weights, narrower
channels so the suite stays fast) exports to ONNX and TFLite and agrees with Keras in the real runtimes.

Two conversions: the deploy net (mirror + flip-sum + L2 Normalize, converted whole) and the training prototxt
(TEST phase: trunk -> norm1 -> AMSoftmaxHead), whose exported embedding stops at the head's L2-normalized input.
"""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
from ai_edge_litert.interpreter import Interpreter

caffe = pytest.importorskip("converters.caffe", reason="the Caffe converter (converters/caffe) is not installed")
caffe_nets = pytest.importorskip("tests.caffe_nets", reason="the Caffe test fixtures (tests/caffe_nets.py) are missing")

from keras_margin.export import export_onnx, export_tflite  # noqa: E402

NET = dict(widths=(8, 16, 32, 64), embedding=64)  # the real depth and input size, an eighth of the channels
CLASSES = 100
FLOAT32_MAX_ABS, FLOAT16_MIN_COS, DYNAMIC_MIN_COS = 1e-5, 0.9999, 0.999


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The deploy and train prototxts and a caffemodel with every layer's weights, written by the fixtures."""
    from converters.caffe.reader import parse_prototxt

    directory = tmp_path_factory.mktemp("amsoftmax_export")
    train_text = caffe_nets.face_resnet20_prototxt("train", **NET, num_classes=CLASSES)
    caffe_nets.write_net(directory, train_text, name="face_train_test")
    caffe_nets.write_net(directory, caffe_nets.face_resnet20_prototxt("deploy", **NET),
                         name="face_deploy_mirror_normalize")
    caffe.write_caffemodel(directory / "face.caffemodel", parse_prototxt(train_text).net,
                           caffe_nets.face_resnet20_blobs(**NET, num_classes=CLASSES, seed=5))
    return directory


@pytest.fixture(scope="module")
def deploy(folder):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", caffe.CaffeWarning)  # the train caffemodel's data layers are not used
        model = caffe.load_caffe_model(folder / "face_deploy_mirror_normalize.prototxt", folder / "face.caffemodel")
    assert sum(layer.__class__.__name__ == "Conv2D" for layer in model.layers) == 20
    return model


@pytest.fixture(scope="module")
def train_test(folder):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", caffe.CaffeWarning)
        return caffe.load_caffe_model(folder / "face_train_test.prototxt", folder / "face.caffemodel",
                                      input_shape=(3, 112, 96))


@pytest.fixture(scope="module")
def faces():
    """(preprocessed images for the deploy net, raw 0..255 pixels for the train net, which subtracts the mean)."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (3, 112, 96, 3)).astype(np.float32)
    return (pixels - 128.0) * 0.0078125, pixels


def ort_run(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def litert_run(path, x):
    interpreter = Interpreter(model_path=str(path))
    signature = interpreter.get_signature_list()["serving_default"]
    outputs = interpreter.get_signature_runner()(**{signature["inputs"][0]: x})
    return outputs[signature["outputs"][0]]


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_deploy_net_onnx_float32(deploy, faces, tmp_path):
    x, _ = faces
    report = export_onnx(deploy, tmp_path / "face.onnx", inputs=x, verbose=False)
    got, expected = ort_run(report.path, x), deploy.predict(x, verbose=0)
    assert np.abs(got - expected).max() <= FLOAT32_MAX_ABS and report.max_abs_error <= FLOAT32_MAX_ABS
    # the file keeps the deploy net's mirror trick: an image and its mirror get the same unit-norm feature
    np.testing.assert_allclose(ort_run(report.path, x[:, :, ::-1]), got, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("quantize", [None, "float16", "dynamic"])
def test_deploy_net_tflite(deploy, faces, tmp_path, quantize):
    x, _ = faces
    report = export_tflite(deploy, tmp_path / f"face_{quantize}.tflite", quantize=quantize, inputs=x, verbose=False)
    got, expected = litert_run(report.path, x), deploy.predict(x, verbose=0)
    if quantize is None:
        assert np.abs(got - expected).max() <= FLOAT32_MAX_ABS and report.max_abs_error <= FLOAT32_MAX_ABS
    else:
        bound = FLOAT16_MIN_COS if quantize == "float16" else DYNAMIC_MIN_COS
        assert cosines(got, expected).min() >= bound and report.min_cosine >= bound


def test_training_net_exports_the_normalized_embedding_before_the_head(train_test, faces, tmp_path):
    from keras_margin import AMSoftmaxHead

    _, pixels = faces
    assert isinstance(train_test.layers[-1], AMSoftmaxHead)
    onnx_report = export_onnx(train_test, tmp_path / "embedding.onnx", inputs=pixels, verbose=False)
    tflite_report = export_tflite(train_test, tmp_path / "embedding.tflite", inputs=pixels, verbose=False)
    head_input = train_test.layers[-1].input
    import keras

    expected = keras.Model(train_test.inputs, head_input).predict(pixels, verbose=0)
    for got in (ort_run(onnx_report.path, pixels), litert_run(tflite_report.path, pixels)):
        assert got.shape == (3, NET["embedding"])
        assert np.abs(got - expected).max() <= FLOAT32_MAX_ABS
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # norm1 is kept


def test_training_net_with_head_exports_the_cosines(train_test, faces, tmp_path):
    _, pixels = faces
    report = export_onnx(train_test, tmp_path / "cosines.onnx", include_head=True, inputs=pixels, verbose=False)
    got = ort_run(report.path, pixels)
    assert got.shape == (3, CLASSES)
    assert np.abs(got - train_test.predict(pixels, verbose=0)).max() <= FLOAT32_MAX_ABS
