"""The parity report compares every blob with the reference and names the first one that diverges."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from converters.caffe import ConversionError, convert, parity_report, write_caffemodel
from converters.caffe.parity import load_reference_npz
from converters.caffe.reader import parse_prototxt
from tests.caffe_nets import face_resnet20_blobs, face_resnet20_prototxt, opencv_forward, write_net

SMALL = dict(widths=(8, 8, 16, 16), embedding=16, input_hw=(28, 24))


@pytest.fixture
def small_deploy(tmp_path):
    text = face_resnet20_prototxt("deploy", **SMALL, batch=2)
    prototxt, _ = write_net(tmp_path, text)
    caffemodel = tmp_path / "net.caffemodel"
    write_caffemodel(caffemodel, parse_prototxt(text).net, face_resnet20_blobs(**SMALL, num_classes=None, seed=5))
    return prototxt, caffemodel


def test_opencv_parity_of_the_deploy_net_covers_every_layer(small_deploy):
    prototxt, caffemodel = small_deploy
    report = parity_report(prototxt, caffemodel, "opencv")
    assert report.ok, str(report)
    blobs = [row.blob for row in report.rows]
    assert blobs[:3] == ["flip_data", "concat_data", "conv1_1"] and blobs[-1] == "norm1"
    assert report.row("fc5").max_abs <= 1e-4 and report.row("norm1").cosine > 0.999999
    assert report.first_divergence is None and "all within tolerance" in report.summary()


def test_report_names_the_first_divergent_blob(small_deploy):
    prototxt, caffemodel = small_deploy
    conversion = convert(prototxt, caffemodel)
    layer = conversion.model.get_layer("conv2_2")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel, bias + 0.5])  # a wrong bias: everything from conv2_2 on differs
    report = parity_report(conversion=conversion, caffemodel=caffemodel, reference="opencv")
    first = report.first_divergence
    assert (first.blob, first.layer) == ("conv2_2", "conv2_2")
    assert first.max_abs == pytest.approx(0.5, rel=1e-3)
    assert report.row("conv2_1").ok and not report.ok
    assert "FIRST DIVERGENCE at blob 'conv2_2'" in str(report)


def test_report_against_blobs_dumped_to_npz(tmp_path):
    """An .npz as pycaffe users dump it: {blob name: net.blobs[name].data}, in-place blobs at their last value."""
    text = face_resnet20_prototxt("trunk", **SMALL, batch=2)
    prototxt, _ = write_net(tmp_path, text)
    caffemodel = tmp_path / "net.caffemodel"
    write_caffemodel(caffemodel, parse_prototxt(text).net, face_resnet20_blobs(**SMALL, num_classes=None, seed=6))
    net = parse_prototxt(text).net
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 28, 24)).astype(np.float32)
    layers = [layer for layer in net.layer if layer.type != "Input"]
    values = opencv_forward(prototxt, caffemodel, {"data": x}, [layer.name for layer in layers])
    dumped = {"data": x}
    for layer, value in zip(layers, values):
        dumped[layer.top[0]] = value  # an in-place layer overwrites its blob, as in Caffe
    reference = tmp_path / "blobs.npz"
    np.savez(reference, **dumped)
    report = parity_report(prototxt, caffemodel, reference=reference)
    assert report.ok, str(report)
    assert report.row("fc5").max_abs <= 1e-4
    compared = [row.blob for row in report.rows]
    assert compared.count("conv1_1") == 1  # only the final (post-PReLU) value of an in-place blob is in a dump


def _npy(header: dict, payload: bytes) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + payload


def test_npz_reference_refuses_pickles_and_absurd_sizes(tmp_path):
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, data=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ConversionError, match="holds Python objects"):
        load_reference_npz(pickled)

    absurd = tmp_path / "absurd.npz"
    with zipfile.ZipFile(absurd, "w") as archive:
        archive.writestr("data.npy", _npy({"descr": "<f4", "fortran_order": False, "shape": (10**12,)}, b"\0" * 16))
    with pytest.raises(ConversionError, match=r"claims shape \(1000000000000,\)"):
        load_reference_npz(absurd)

    not_zip = tmp_path / "plain.npz"
    not_zip.write_bytes(b"this is not a zip archive")
    with pytest.raises(ConversionError, match="not an .npz"):
        load_reference_npz(not_zip)


def test_opencv_parity_without_a_caffemodel_runs_on_the_initial_weights(small_deploy):
    from converters.caffe.parity import FILLER_WEIGHTS

    prototxt, _ = small_deploy
    report = parity_report(prototxt, None, "opencv")
    assert report.ok, str(report)
    assert report.weights == FILLER_WEIGHTS and "weights: the converted model's own initial weights" in report.summary()
    assert report.row("norm1").cosine > 0.999999
    # A conversion made without weights cannot be checked by OpenCV: it says what to pass instead.
    with pytest.raises(ConversionError, match="made without a caffemodel: pass the prototxt instead"):
        parity_report(conversion=convert(prototxt), reference="opencv")


def test_an_opencv_failure_is_a_conversion_error_naming_the_layer_without_blobs(tmp_path):
    prototxt, _ = write_net(tmp_path, 'input: "data" input_dim: 1 input_dim: 2 input_dim: 4 input_dim: 4\n'
                                      'layer { name: "scale" type: "Scale" bottom: "data" top: "scale" }\n'
                                      'layer { name: "relu" type: "ReLU" bottom: "scale" top: "relu" }\n')
    caffemodel = tmp_path / "empty.caffemodel"
    write_caffemodel(caffemodel, [("relu", "ReLU", [])])
    with pytest.raises(ConversionError, match=r"OpenCV failed running the net \(.*scale_layer\.cpp.*no blobs for "
                                              r"layer\(s\) 'scale'"):
        parity_report(prototxt, caffemodel, "opencv")
