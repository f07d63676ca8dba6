"""Bad input from fuzzing (issues 13 and 17, the losses/heads and evaluation/CLI parts): every input ends in a named
error or a right answer, nothing half-written. Each test feeds the input the fuzzer found and expects its error;
where a right answer is expected it is checked against a NumPy transcription written here."""

from __future__ import annotations

import argparse
import os
import struct
import zlib
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_margin_cli
from converters.caffe import ConversionError, convert, read_caffemodel
from converters.caffe import cli as convert_cli
from converters.caffe.reader import parse_prototxt
from keras_margin import AMSoftmaxHead, NormFaceHead
from keras_margin.evaluation.images import MAX_PIXELS, image_size, load_image
from keras_margin.evaluation.pairs import PairsFileError, image_paths, parse_pairs, read_pairs
from keras_margin.export import export_onnx, export_tflite, load_model
from keras_margin.export._files import atomic_output, check_writable
from keras_margin.export._prepare import EXPORT_MEMORY_BASE, EXPORT_MEMORY_FACTOR, check_memory, weight_bytes
from keras_margin.losses import (
    AMSoftmaxLoss,
    SphereFaceLoss,
    amsoftmax_loss,
    normface_scale_lower_bound,
)
from tests.caffe_nets import face_resnet20_prototxt, write_net


def amsoftmax_reference(ids, cos, s=30.0, m=0.35):
    """NumPy AM-Softmax (Wang et al. 2018, Eq. 4): logsumexp(z) - z_y, z_y = s (cos_y - m), z_j = s cos_j."""
    cos = np.asarray(cos, np.float64)
    z = s * cos.copy()
    rows = np.arange(len(ids))
    z[rows, ids] = s * (cos[rows, ids] - m)
    top = z.max(axis=1, keepdims=True)
    return (top[:, 0] + np.log(np.exp(z - top).sum(axis=1))) - z[rows, ids]


def _cosines(batch, classes, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, classes)).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# Losses and heads


@pytest.mark.parametrize("labels", [np.array([0, 1, 2]), np.eye(5, dtype="float32")[:3]], ids=["ids", "one-hot"])
def test_labels_of_another_batch_name_both_sizes(labels):
    with pytest.raises(ValueError, match=r"labels hold 3 samples but the predictions hold 4"):
        AMSoftmaxLoss()(labels, _cosines(4, 5))
    head = AMSoftmaxHead(5)
    with pytest.raises(ValueError, match=r"labels hold 3 samples but the predictions hold 4"):
        head([np.ones((4, 8), "float32"), labels])


def test_sample_weight_of_the_wrong_length_names_both_sizes():
    with pytest.raises(ValueError, match=r"sample weights hold 3 samples but the predictions hold 4"):
        AMSoftmaxLoss()(np.arange(4), _cosines(4, 5), sample_weight=np.ones(3))
    # The right length still weighs as Keras does: sum(w * loss) / batch.
    cos, w = _cosines(4, 5), np.array([1.0, 0.0, 2.0, 0.5])
    got = float(AMSoftmaxLoss()(np.arange(4), cos, sample_weight=w))
    np.testing.assert_allclose(got, np.sum(w * amsoftmax_reference(np.arange(4), cos)) / 4, rtol=1e-5)


def test_string_labels_name_the_dtype():
    strings = np.array(["ann", "bob", "cy", "dan"])
    for call in (lambda: AMSoftmaxLoss()(strings, _cosines(4, 5)), lambda: amsoftmax_loss(strings, _cosines(4, 5)),
                 lambda: AMSoftmaxHead(5)([np.ones((4, 8), "float32"), tf.constant(strings)])):
        with pytest.raises(ValueError, match=r"labels must be integer class ids .*got (<U3|string) labels"):
            call()


def test_a_head_built_for_8_called_on_9_names_both_sizes():
    head = NormFaceHead(5)
    head.build((None, 8))
    for inputs in (np.ones((2, 9), "float32"), [np.ones((2, 9), "float32"), np.array([0, 1])]):
        with pytest.raises(ValueError, match=r"built for embedding_dim 8 .* embeddings of size 9"):
            head(inputs)
    fused = AMSoftmaxHead(5, fused_loss=True)
    fused.build([(None, 8), (None,)])
    with pytest.raises(ValueError, match=r"built for embedding_dim 8 .* embeddings of size 9"):
        fused([np.ones((2, 9), "float32"), np.array([0, 1])])


@pytest.mark.parametrize("bad", [2 ** 32, 2 ** 32 + 1, 2 ** 31])
def test_an_int64_id_beyond_int32_is_nan_in_a_compiled_step_not_a_wrapped_valid_id(bad):
    cos = _cosines(4, 5)
    ids = np.array([bad, 1, 2, 3], np.int64)

    @tf.function(jit_compile=True)
    def step(y, c):
        return AMSoftmaxLoss(reduction=None)(y, c)

    got = step(tf.constant(ids), tf.constant(cos)).numpy()
    assert np.isnan(got[0])
    np.testing.assert_allclose(got[1:], amsoftmax_reference(np.array([1, 2, 3]), cos[1:]), rtol=1e-5)
    with pytest.raises(ValueError, match=rf"class ids must be in \[0, 5\); got \[{bad}\]"):
        AMSoftmaxLoss()(ids, cos)


@pytest.mark.parametrize("dtype, classes, target, neighbour", [("float16", 3000, 2049, 2048),
                                                               ("bfloat16", 300, 257, 256)])
def test_class_ids_never_pass_through_the_loss_dtype(dtype, classes, target, neighbour):
    # float16 holds integers exactly up to 2048, bfloat16 up to 256: the target id would round to its neighbour.
    cos = np.zeros((1, classes), np.float32)
    cos[0, target], cos[0, neighbour] = 0.9, -0.9
    for compiled in (False, True):
        loss = AMSoftmaxLoss(reduction=None, dtype=dtype)
        fn = tf.function(lambda y, c, loss=loss: loss(y, c), jit_compile=True) if compiled else loss
        got = float(np.asarray(fn(tf.constant([target], tf.int64), tf.constant(cos)), np.float32)[0])
        want = amsoftmax_reference(np.array([target]), cos)[0]
        wrong = amsoftmax_reference(np.array([neighbour]), cos)[0]
        assert abs(got - want) < 0.05 + 0.02 * abs(want) and abs(wrong - want) > 10, (got, want, wrong)


@pytest.mark.parametrize("rows", [np.zeros((2, 5), "float32"), np.full((2, 5), 0.2, "float32"),
                                  np.array([[0.9, 0.025, 0.025, 0.025, 0.025], [0, 1, 0, 0, 0]], "float32"),
                                  np.array([[2, 0, 0, 0, 0], [0, 1, 0, 0, 0]], "float32"),
                                  np.array([[1, -1, 1, 0, 0], [0, 1, 0, 0, 0]], "float32")],
                         ids=["all-zero", "uniform", "label-smoothing", "two", "signed"])
def test_rows_that_are_not_one_hot_are_refused_eagerly_and_nan_when_compiled(rows):
    cos = _cosines(2, 5)
    with pytest.raises(ValueError, match=r"read as one-hot .* soft labels .* not supported.*Rows that are not "
                                         r"one-hot: \[0"):
        AMSoftmaxLoss()(rows, cos)

    @tf.function(jit_compile=True)
    def step(y, c):
        return AMSoftmaxLoss(reduction=None)(y, c)

    got = step(tf.constant(rows), tf.constant(cos)).numpy()
    assert np.isnan(got[0])
    if rows[1].tolist() == [0, 1, 0, 0, 0]:  # a true one-hot row next to the bad one keeps its loss
        np.testing.assert_allclose(got[1], amsoftmax_reference(np.array([1]), cos[1:])[0], rtol=1e-5)


def test_rows_that_are_not_one_hot_stop_a_graph_step():
    model = keras.Sequential([keras.Input((4,)), AMSoftmaxHead(5)])
    model.compile("sgd", loss=AMSoftmaxLoss(), jit_compile=False)
    x = np.random.default_rng(0).normal(size=(4, 4)).astype("float32")
    with pytest.raises(tf.errors.InvalidArgumentError, match="read as one-hot"):
        model.fit(x, np.full((4, 5), 0.2, "float32"), epochs=1, verbose=0)
    history = model.fit(x, np.eye(5, dtype="float32")[:4], epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize("make, name", [(lambda: AMSoftmaxLoss(s=1e39), "s"),
                                        (lambda: SphereFaceLoss(lambda_=1e308), "lambda_"),
                                        (lambda: AMSoftmaxHead(5, s=-1e39), "s")])
def test_hyper_parameters_beyond_float32_name_the_argument(make, name):
    with pytest.raises(ValueError, match=rf"`{name}` must be a finite number .* that float32 can hold"):
        make()


def test_normface_scale_lower_bound_of_a_huge_num_classes_names_the_argument():
    for huge in (10 ** 400, 2 ** 2000, 2 ** 53 + 1):
        with pytest.raises(ValueError, match=r"normface_scale_lower_bound: `num_classes` must be at most 2\^53"):
            normface_scale_lower_bound(huge, 0.9)
    with pytest.raises(ValueError, match=r"`probability` must be a finite number in \(0.0, 1.0\)"):
        normface_scale_lower_bound(10, 1.0)
    c, p = 2 ** 53, 0.9  # the largest accepted: finite, from the paper's formula in logs
    np.testing.assert_allclose(normface_scale_lower_bound(c, p), (c - 1) / c * np.log((c - 1) * p / (1 - p)),
                               rtol=1e-12)
    np.testing.assert_allclose(normface_scale_lower_bound(10516, 0.9), 10515 / 10516 * np.log(10515 * 9), rtol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# Pairs files and images


def test_names_that_leave_the_images_folder_are_refused_naming_the_line():
    for name in ("../outside", "/etc", "..", "a/b", "a\\b", "C:x"):
        with pytest.raises(PairsFileError, match=r"pairs.txt:2: person name .* not a folder name"):
            parse_pairs(["1 1", f"{name} 1 2", "a 1 b 2"])


@pytest.mark.parametrize("lines, line", [(["\u00b2 1", "a 1 2", "a 1 b 2"], 1), (["\u00b2", "a 1 2", "a 1 b 2"], 1),
                                         (["\u0661 \u0661", "a 1 2", "a 1 b 2"], 1),
                                         (["1 1", "a \u0661 2", "a 1 b 2"], 2),
                                         (["1 1", "a 1 2", "a 1 b \u0663"], 3),
                                         (["1 1", "a 1 " + "9" * 5000, "a 1 b 2"], 2)],
                         ids=["superscript", "superscript-alone", "arabic-header", "arabic", "arabic-last", "long"])
def test_digits_must_be_ascii_and_the_error_names_the_line(lines, line):
    with pytest.raises(PairsFileError, match=rf"^pairs.txt:{line}: .*ASCII"):
        parse_pairs(lines)


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_bytes("\ufeff1\t1\nAnn\t1\t2\nAnn\t1\tBob\t3\n".encode("utf-8"))
    pairs = read_pairs(path)
    assert [(p.first, p.second, p.same, p.line) for p in pairs] == [
        ("Ann/Ann_0001.jpg", "Ann/Ann_0002.jpg", True, 2), ("Ann/Ann_0001.jpg", "Bob/Bob_0003.jpg", False, 3)]


def test_a_person_folder_linked_out_of_the_images_folder_is_refused(tmp_path):
    images, outside = tmp_path / "images", tmp_path / "outside"
    images.mkdir()
    outside.mkdir()
    for number in (1, 2):
        (outside / f"Ann_{number:04d}.jpg").write_bytes(b"")
    (images / "Ann").symlink_to(outside, target_is_directory=True)
    (images / "Bob").mkdir()
    (images / "Bob" / "Bob_0001.jpg").write_bytes(b"")
    pairs = parse_pairs(["1 1", "Ann 1 2", "Bob 1 Bob 1"])
    with pytest.raises(PairsFileError, match=r"pairs.txt:2: image 'Ann/Ann_0001.jpg' resolves to .*outside.*, "
                                             r"outside the images folder"):
        image_paths(pairs, images)
    # A link that stays inside the folder is fine.
    (images / "Ann").unlink()
    (images / "Cy").symlink_to(images / "Bob", target_is_directory=True)
    found = image_paths(parse_pairs(["1 1", "Bob 1 1", "Bob 1 Bob 1"]), images)
    assert found == [images / "Bob" / "Bob_0001.jpg"]


def _png_header_only(height: int, width: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_huge_image_is_refused_from_its_header_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(20000, 20000))
    with pytest.raises(ValueError, match=r"huge.png: the image is 20000 x 20000 pixels, more than the 67,108,864"):
        load_image(path)
    assert MAX_PIXELS == 8192 * 8192
    # The header reader agrees with TensorFlow's encoders (height, width), for every format it reads.
    pixels = np.zeros((37, 53, 3), np.uint8)
    assert image_size(tf.io.encode_png(pixels).numpy()) == (37, 53)
    assert image_size(tf.io.encode_jpeg(pixels).numpy()) == (37, 53)
    assert image_size(tf.io.encode_jpeg(pixels, progressive=True).numpy()) == (37, 53)
    bmp = b"BM" + bytes(16) + struct.pack("<ii", 53, -37) + bytes(8)
    assert image_size(bmp) == (37, 53)
    gif = b"GIF89a" + struct.pack("<HH", 53, 37) + bytes(4)
    assert image_size(gif) == (37, 53)
    assert image_size(b"not an image") is None


# ------------------------------------------------------------------------------------------------------------
# Outputs: checked before the work, written whole or not at all


def _small_model(tmp_path) -> Path:
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="embedding_dense"), AMSoftmaxHead(3)])
    path = tmp_path / "m.keras"
    model.save(path)
    return path


def _cli(argv, capsys):
    code = keras_margin_cli.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_unwritable_outputs_fail_before_any_work(tmp_path, capsys):
    folder = tmp_path / "a_folder.tflite"
    folder.mkdir()
    code, _, err = _cli(["export", tmp_path / "absent.keras", "--tflite", folder], capsys)
    assert code == 2 and f"--tflite {folder}: is a folder" in err
    roc = tmp_path / "roc_folder"
    roc.mkdir()
    code, _, err = _cli(["verify", tmp_path / "absent.keras", "--pairs", "p.txt", "--images", ".", "--roc", roc],
                        capsys)
    assert code == 2 and f"--roc {roc}: is a folder" in err
    code, _, err = _cli(["verify", tmp_path / "absent.keras", "--pairs", "p.txt", "--images", ".", "--json",
                         tmp_path / "no" / "f.json"], capsys)
    assert code == 2 and "the folder" in err and "does not exist" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_folder_fails_before_any_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="cannot write in the folder"):
            check_writable(locked / "m.tflite", "--tflite")
    finally:
        locked.chmod(0o700)


def test_an_interrupted_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "model.tflite"
    target.write_bytes(b"the previous file")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as partial:
            partial.write_bytes(b"half a flatbuffer")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tflite"]
    with atomic_output(target) as partial:
        partial.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.tflite"]
    assert (target.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_export_opset_1_is_refused_and_writes_nothing(tmp_path, capsys):
    model = load_model(_small_model(tmp_path))
    with pytest.raises(ValueError, match=r"opset must be an integer in \[7, \d+\]"):
        export_onnx(model, tmp_path / "m.onnx", opset=1, verbose=False)
    code, _, err = _cli(["export", tmp_path / "m.keras", "--onnx", tmp_path / "m.onnx", "--opset", "1"], capsys)
    assert code == 2 and "--opset must be" in err
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob("*.partial*"))


def test_export_of_a_huge_check_batch_is_refused_up_front(tmp_path, capsys):
    model = keras.Sequential([keras.Input((112, 96, 3)), keras.layers.GlobalAveragePooling2D(), AMSoftmaxHead(3)])
    path = tmp_path / "faces.keras"
    model.save(path)
    with pytest.raises(ValueError, match=r"batch_size 1000000 makes a parity-check batch of 123,047 MiB "
                                         r"\(129,024 bytes a sample\); at most 256 MiB, i.e. batch_size <= 2080"):
        export_tflite(model, tmp_path / "m.tflite", batch_size=1_000_000, verbose=False)
    code, _, err = _cli(["export", path, "--onnx", tmp_path / "m.onnx", "--batch-size", "1000000"], capsys)
    assert code == 2 and "batch_size <= 2080" in err
    assert not list(tmp_path.glob("m.*"))


def test_export_that_needs_more_memory_than_available_is_refused_with_the_estimate():
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(100)])
    assert weight_bytes(model) == (64 * 100 + 100) * 4
    check_memory(model, "ONNX", available=EXPORT_MEMORY_BASE + 72 * weight_bytes(model))  # just enough
    needed = EXPORT_MEMORY_BASE + EXPORT_MEMORY_FACTOR["ONNX"] * weight_bytes(model)
    with pytest.raises(MemoryError, match=rf"ONNX export of .* \(0 MB of weights\) needs about "
                                          rf"{needed / 2 ** 30:.1f} GiB \(72x the weights, measured"):
        check_memory(model, "ONNX", available=2 ** 20)
    with pytest.raises(MemoryError, match=r"TFLite export .* needs about 0.5 GiB \(9x"):
        check_memory(model, "TFLite", available=2 ** 20)


def test_keras_load_errors_are_shown_whole(tmp_path, capsys):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda x: x * 2), keras.layers.Dense(3)])
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(ValueError, match=r"Keras cannot load the model: Requested the deserialization of a "
                                         r"`Lambda` layer .*passing `safe_mode=False`"):
        load_model(path)
    code, _, err = _cli(["export", path, "--onnx", tmp_path / "m.onnx"], capsys)
    assert code == 2 and "safe_mode=False" in err and len(err.strip().splitlines()) == 1


def test_convert_check_that_fails_writes_nothing(tmp_path, capsys):
    prototxt, _ = write_net(tmp_path, face_resnet20_prototxt("train", widths=(8, 8, 16, 16), embedding=16,
                                                             input_hw=(28, 24), num_classes=10), name="face_train")
    rng = np.random.default_rng(0)
    reference = tmp_path / "ref.npz"
    np.savez(reference, data=((rng.uniform(0, 255, (2, 3, 28, 24)) - 128) / 128).astype(np.float32),
             fc5=np.zeros((2, 16), np.float32))  # fc5 of zeros: the check fails
    output = tmp_path / "m.keras"
    output.write_bytes(b"the previous model")
    parser = argparse.ArgumentParser()
    convert_cli.add_arguments(parser)
    code = convert_cli.run(parser.parse_args([str(prototxt), "-o", str(output), "--input-shape", "3,28,24",
                                              "--check", str(reference), "--quiet"]))
    out, _ = capsys.readouterr()
    assert code == 1
    assert output.read_bytes() == b"the previous model"
    assert "NOT WRITTEN" in out and "the parity check FAILED" in out and "previous file is unchanged" in out
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


# ------------------------------------------------------------------------------------------------------------
# Model files: caffemodel, prototxt, reference .npz (issues 13 and 17, the model-file part)

_IMAGE_INPUT = 'input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'


def _raw_blob_caffemodel(path: Path, raw: bytes, raw_type: int | None, count: int) -> Path:
    """A caffemodel with one layer 'sc' whose single blob stores ``raw`` as ``raw_data`` (NVIDIA Caffe's form)."""
    from converters.caffe import schema

    net = schema.NetParameter()
    layer = net.layer.add(name="sc", type="Scale")
    blob = layer.blobs.add()
    blob.shape.dim.append(count)
    blob.raw_data = raw
    if raw_type is not None:
        blob.raw_data_type = raw_type
    path.write_bytes(net.SerializeToString())
    return path


@pytest.mark.parametrize("raw_type, dtype", [(0, "<f8"), (1, "<f4"), (2, "<f2")], ids=["DOUBLE", "FLOAT", "FLOAT16"])
def test_raw_data_of_a_float_type_reads_exactly(tmp_path, raw_type, dtype):
    values = np.array([0.5, -1.25, 3.0, 1024.0], dtype)
    model = read_caffemodel(_raw_blob_caffemodel(tmp_path / "w.caffemodel", values.tobytes(), raw_type, 4))
    np.testing.assert_array_equal(model.blobs("sc")[0], values.astype(np.float32))


def test_raw_data_type_outside_the_enum_is_refused_naming_the_blob(tmp_path):
    # proto2 keeps 99 among the unknown fields and the getter answers DOUBLE: 16 bytes would read as 2 doubles.
    path = _raw_blob_caffemodel(tmp_path / "w.caffemodel", np.ones(2, "<f8").tobytes(), 1, 2)
    data = path.read_bytes()
    assert data.count(bytes([10 << 3, 1])) == 1
    path.write_bytes(data.replace(bytes([10 << 3, 1]), bytes([10 << 3, 99])))
    with pytest.raises(ConversionError, match=r"blob 0 of layer 'sc' stores raw_data of raw_data_type 99, which is "
                                              r"not in caffe.proto's BlobProto.Type"):
        read_caffemodel(path).blobs("sc")


def test_raw_data_without_a_type_is_refused_naming_the_blob(tmp_path):
    path = _raw_blob_caffemodel(tmp_path / "w.caffemodel", np.ones(2, "<f8").tobytes(), None, 2)
    with pytest.raises(ConversionError, match=r"blob 0 of layer 'sc' stores raw_data without a raw_data_type"):
        read_caffemodel(path).blobs("sc")
    path = _raw_blob_caffemodel(tmp_path / "i.caffemodel", np.ones(2, "<i4").tobytes(), 3, 2)
    with pytest.raises(ConversionError, match=r"stores raw_data of type 3 \(integer\)"):
        read_caffemodel(path).blobs("sc")


@pytest.mark.parametrize("layer_type, param, field, value", [
    ("Convolution", "convolution_param", "kernel_size", 2 ** 31),
    ("Convolution", "convolution_param", "stride", 2 ** 32 - 1),
    ("Convolution", "convolution_param", "pad", 2 ** 31),
    ("Convolution", "convolution_param", "dilation", 2 ** 31),
    ("Convolution", "convolution_param", "num_output", 2 ** 31),
    ("Convolution", "convolution_param", "group", 2 ** 32 - 1),
    ("Pooling", "pooling_param", "kernel_size", 2 ** 31),
    ("Pooling", "pooling_param", "stride", 2 ** 32 - 1),
    ("Pooling", "pooling_param", "pad", 2 ** 31)])
def test_layer_parameters_beyond_int32_name_the_layer_and_the_field(tmp_path, layer_type, param, field, value):
    given = {"kernel_size": 2, **({"num_output": 4} if layer_type == "Convolution" else {}), field: value}
    if layer_type == "Pooling":
        given = {"pool": "MAX", **given}
    body = " ".join(f"{key}: {item}" for key, item in given.items())
    text = _IMAGE_INPUT + f'layer {{ name: "l" type: "{layer_type}" bottom: "data" top: "l" {param} {{ {body} }} }}'
    prototxt, _ = write_net(tmp_path, text)
    with pytest.raises(ConversionError, match=rf"^layer 'l' \({layer_type}\): {param}.{field}: {value} is beyond the "
                                              r"int32 range Caffe computes with \(at most 2,147,483,647"):
        convert(prototxt)


def test_group_0_and_a_stride_past_the_input_are_named(tmp_path):
    conv = _IMAGE_INPUT + ('layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                           'convolution_param { num_output: 4 kernel_size: 3 group: 0 } }')
    with pytest.raises(ConversionError, match=r"layer 'c' \(Convolution\): convolution_param.group is 0; it must be "
                                              r">= 1"):
        convert(write_net(tmp_path, conv, name="conv")[0])
    pool = _IMAGE_INPUT + ('layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
                           'pooling_param { pool: MAX kernel_size: 2 stride: 2147483647 } }')
    with pytest.raises(ConversionError, match=r"layer 'p' \(Pooling\): stride_h 2147483647 puts the last of the 2 "
                                              r"windows along h at 2147483647, past the input's 8"):
        convert(write_net(tmp_path, pool, name="pool")[0])


def test_a_convolution_needs_one_top_per_bottom(tmp_path):
    two = _IMAGE_INPUT + 'input: "d2" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
    text = two + ('layer { name: "c" type: "Convolution" bottom: "data" bottom: "d2" top: "c" '
                  'convolution_param { num_output: 4 kernel_size: 3 } }')
    with pytest.raises(ConversionError, match=r"layer 'c' \(Convolution\): has 2 bottom\(s\) and 1 top\(s\); Caffe "
                                              r"requires as many tops as bottoms .*give one top per bottom"):
        convert(write_net(tmp_path, text, name="one_top")[0])
    none = 'layer { name: "c" type: "Convolution" top: "c" convolution_param { num_output: 4 kernel_size: 3 } }'
    with pytest.raises(ConversionError, match=r"layer 'c' \(Convolution\): has no bottom; a Convolution layer reads at "
                                              r"least one blob"):
        convert(write_net(tmp_path, none, name="no_bottom")[0])
    relu = 'layer { name: "r" type: "ReLU" top: "r" }'
    with pytest.raises(ConversionError, match=r"layer 'r' \(ReLU\): has no bottom; a ReLU layer reads at least one"):
        convert(write_net(tmp_path, relu, name="relu")[0])


def _conv_reference(x, w, b):
    """NumPy Caffe convolution, stride 1, no pad: y[o, i, j] = b[o] + sum_{c,u,v} w[o, c, u, v] x[c, i+u, j+v]."""
    out, _, k, _ = w.shape
    h, width = x.shape[1] - k + 1, x.shape[2] - k + 1
    y = np.empty((out, h, width))
    for i in range(h):
        for j in range(width):
            y[:, i, j] = np.einsum("ocuv,cuv->o", w, x[:, i:i + k, j:j + k]) + b
    return y


def test_a_convolution_with_two_bottoms_and_two_tops_shares_its_weights(tmp_path):
    two = _IMAGE_INPUT + 'input: "d2" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
    text = two + ('layer { name: "c" type: "Convolution" bottom: "data" bottom: "d2" top: "c" top: "c2" '
                  'convolution_param { num_output: 4 kernel_size: 3 } }')
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, 3, 3, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    prototxt, caffemodel = write_net(tmp_path, text, {"c": [w, b]})
    model = convert(prototxt, caffemodel).model
    x1, x2 = rng.normal(size=(3, 8, 8)).astype(np.float32), rng.normal(size=(3, 8, 8)).astype(np.float32)
    y1, y2 = model([x1.transpose(1, 2, 0)[None], x2.transpose(1, 2, 0)[None]])
    np.testing.assert_allclose(np.asarray(y1)[0].transpose(2, 0, 1), _conv_reference(x1, w, b), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y2)[0].transpose(2, 0, 1), _conv_reference(x2, w, b), rtol=1e-4, atol=1e-5)
    assert len(model.trainable_weights) == 2  # one kernel and one bias for both tops


def _relu_chain(count: int) -> str:
    lines, previous = [_IMAGE_INPUT], "data"
    for index in range(count):
        lines.append(f'layer {{ name: "r{index}" type: "ReLU" bottom: "{previous}" top: "r{index}" }}\n')
        previous = f"r{index}"
    return "".join(lines)


def test_a_chain_of_1000_layers_converts_and_says_how_to_load_it(tmp_path):
    import sys

    from converters.caffe.builder import recursion_limit_for

    limit = sys.getrecursionlimit()
    conversion = convert(write_net(tmp_path, _relu_chain(1000))[0])
    assert sys.getrecursionlimit() == limit  # raised only while Keras builds the graph
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(conversion.model(x)), np.maximum(x, 0))
    assert any("1,001 layers deep" in w and f"sys.setrecursionlimit({recursion_limit_for(1001)})" in w
               for w in conversion.warnings)


def test_a_graph_deeper_than_the_limit_is_refused_naming_it(tmp_path, monkeypatch):
    from converters.caffe import builder

    monkeypatch.setattr(builder, "MAX_GRAPH_DEPTH", 40)
    with pytest.raises(ConversionError, match=r"the converted graph is 51 Keras layers deep, more than the 40"):
        convert(write_net(tmp_path, _relu_chain(50))[0])
    x = builder.keras.Input((3,))
    y = builder.keras.layers.Add()([builder.keras.layers.ReLU()(builder.keras.layers.ReLU()(x)), x])
    assert builder.graph_depth([y]) == 3 and builder.graph_depth([x]) == 0


@pytest.mark.parametrize("where", ["top", "layer"])
def test_nesting_3000_levels_deep_is_refused_naming_the_limit(where):
    from converters.caffe.reader import MAX_PROTOTXT_NESTING

    deep = "fork { " * 3000 + "}" * 3000
    text = _IMAGE_INPUT + (deep if where == "top" else
                           f'layer {{ name: "r" type: "ReLU" bottom: "data" top: "r" {deep} }}')
    with pytest.raises(ConversionError, match=rf"line 2: messages nested more than {MAX_PROTOTXT_NESTING} levels deep"):
        parse_prototxt(text)
    # Braces inside strings and comments do not count, and 99 levels of an unknown field still parse.
    fine = _IMAGE_INPUT + 'name: "{{{{{{" # ' + "{" * 200 + '\nlayer { name: "r" type: "ReLU" bottom: "data" top: "r" '
    net = parse_prototxt(fine + "fork { " * 98 + "}" * 98 + "}")
    assert [u.path for u in net.unknown_fields] == ["layer[0].fork"]


def test_a_flood_of_unknown_fields_is_refused_naming_the_limit():
    from converters.caffe.reader import MAX_UNKNOWN_FIELDS

    text = _IMAGE_INPUT + "fork_value: 1\n" * (MAX_UNKNOWN_FIELDS + 1)
    with pytest.raises(ConversionError, match=rf"more than {MAX_UNKNOWN_FIELDS:,} fields unknown to caffe.proto "
                                              r"\(the first at line 2: fork_value; line 10002: fork_value\)"):
        parse_prototxt(text)
    net = parse_prototxt(_IMAGE_INPUT + "fork_value: 1\n" * 50)
    assert len(net.unknown_fields) == 50


def test_a_net_parameter_field_with_the_wrong_wire_type_says_so(tmp_path):
    from converters.caffe.writer import _varint

    prototxt, caffemodel = write_net(tmp_path, _IMAGE_INPUT + 'layer { name: "sc" type: "Scale" bottom: "data" '
                                                              'top: "sc" }', {"sc": [np.ones(3, np.float32)]})
    layers = caffemodel.read_bytes()
    for number, name in [(1, "name"), (100, "layer"), (3, "input")]:
        caffemodel.write_bytes(_varint(number << 3 | 0) + b"\x05" + layers)
        with pytest.raises(ConversionError, match=rf"NetParameter field {number} \({name}\) has the wrong wire type 0 "
                                                  r"\(varint\); caffe.proto declares "):
            read_caffemodel(caffemodel)
    caffemodel.write_bytes(_varint(55 << 3 | 0) + b"\x05" + layers)
    with pytest.raises(ConversionError, match=r"top-level field 55 is not in caffe.proto's NetParameter"):
        read_caffemodel(caffemodel)


def _convert_cli(argv, capsys):
    parser = argparse.ArgumentParser()
    convert_cli.add_arguments(parser)
    code = convert_cli.run(parser.parse_args([str(arg) for arg in argv]))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _claiming_npz(path: Path, name: str, shape: tuple, megabytes: int) -> Path:
    """An .npz whose member holds ``megabytes`` MiB of float32 zeros (deflate: a few kB on disk)."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
            header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32))
            header["shape"] = shape
            np.lib.format.write_array_header_1_0(member, header)
            chunk = bytes(2 ** 20)
            for _ in range(megabytes):
                member.write(chunk)
    return path


def test_convert_check_refuses_a_reference_claiming_a_huge_size_before_loading(tmp_path, capsys):
    from converters.caffe.cli import MAX_REFERENCE_BATCH

    conv = _IMAGE_INPUT + ('layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                           'convolution_param { num_output: 4 kernel_size: 3 } }')
    prototxt, _ = write_net(tmp_path, conv)
    bomb = _claiming_npz(tmp_path / "bomb.npz", "data", (64 * 2 ** 18 // 192, 3, 8, 8), 64)
    assert bomb.stat().st_size < 2 ** 17
    output = tmp_path / "m.keras"
    code, _, err = _convert_cli([prototxt, "-o", output, "--check", bomb, "--quiet"], capsys)
    limit = (3 * 8 * 8 + 4 * 6 * 6) * 8 * MAX_REFERENCE_BATCH + 2 ** 20  # every blob in float64, 1024 samples
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"the archive's members claim 67,108,992 bytes uncompressed ('data': 67,108,992), more than the {limit:,}" \
           in err and "refusing to load it" in err
    assert not output.exists()


def test_convert_check_names_both_shapes_of_a_wrong_input_blob(tmp_path, capsys):
    conv = _IMAGE_INPUT + ('layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                           'convolution_param { num_output: 4 kernel_size: 3 } }')
    prototxt, _ = write_net(tmp_path, conv)
    reference = tmp_path / "ref.npz"
    np.savez(reference, data=np.zeros((2, 3, 8, 9), np.float32), c=np.zeros((2, 4, 6, 7), np.float32))
    output = tmp_path / "m.keras"
    code, _, err = _convert_cli([prototxt, "-o", output, "--check", reference, "--quiet"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "input blob 'data' has shape (2, 3, 8, 9), but the net expects (N, 3, 8, 8)" in err
    assert not output.exists()


def test_a_caffemodel_of_40000_empty_layers_is_indexed_in_one_pass(tmp_path):
    # Issue 13: indexing was quadratic in the number of layers (tens of seconds for this 0.7 MB file); the index
    # is one pass with a name map now (benchmarks/convert.py times it; here: every layer found, by name).
    from converters.caffe import schema

    net = schema.NetParameter()
    for index in range(40_000):
        net.layer.add(name=f"l{index}", type="ReLU")
    path = tmp_path / "many.caffemodel"
    path.write_bytes(net.SerializeToString())
    model = read_caffemodel(path)
    assert model.names()[:2] == ["l0", "l1"] and len(model.names()) == 40_000
    assert "l39999" in model and model.blobs("l39999") == []
