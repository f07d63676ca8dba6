"""keras_margin.data: list / folder readers, the pre-training check and the tf.data pipeline.

Pixel values are compared with a NumPy transcription of the fork's ``DataTransformer::Transform(cv::Mat)``
(happynear/caffe-windows ``src/caffe/data_transformer.cpp``) applied to what ``cv::imread`` gives (BGR), and the
resize with OpenCV's own ``cv::resize`` (``util/io.cpp`` ``ReadImageToCVMat``) when OpenCV is installed.
Images are generated here (PNG, so the decoded pixels are known exactly).
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from converters.caffe.data import transform_from_prototxt
from keras_margin.data import (
    DataError,
    check,
    image_dataset,
    read_image_folder,
    read_image_list,
)
from tests.caffe_nets import SHARED


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(np.asarray(pixels, np.uint8)).numpy())


def write_list(tmp_path: Path, lines: list[str], name: str = "list.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def random_images(tmp_path: Path, count: int, shape=(9, 8, 3), seed: int = 0) -> tuple[Path, list[np.ndarray]]:
    """``count`` random RGB PNGs ``img/<i>.png`` with label i, and their pixels."""
    rng = np.random.default_rng(seed)
    pixels = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]
    for i, image in enumerate(pixels):
        write_png(tmp_path / "img" / f"{i}.png", image)
    return write_list(tmp_path, [f"img/{i}.png {i}" for i in range(count)]), pixels


def caffe_transform(bgr: np.ndarray, crop_h: int, crop_w: int, h_off: int, w_off: int, mean, scale: float,
                    mirror: bool) -> np.ndarray:
    """data_transformer.cpp, Transform(const cv::Mat&, Blob*) without transpose / mean_file / erase:
    cv_cropped_img = cv_img(Rect(w_off, h_off, crop_w, crop_h)); for h, w, c:
    top_index = (c * height + h) * width + (mirror ? width - 1 - w : w);
    transformed_data[top_index] = (ptr[img_index++] - mean_values_[c]) * scale   (Dtype = float)."""
    img_height, img_width, channels = bgr.shape
    height, width = (crop_h, crop_w) if crop_h or crop_w else (img_height, img_width)
    means = np.broadcast_to(np.asarray(mean, np.float32), (channels,))
    scale = np.float32(scale)
    out = np.zeros(channels * height * width, np.float32)
    for h in range(height):
        ptr = bgr[h_off + h, w_off:w_off + width].reshape(-1)
        img_index = 0
        for w in range(width):
            for c in range(channels):
                top_index = (c * height + h) * width + (width - 1 - w if mirror else w)
                pixel = np.float32(ptr[img_index])
                img_index += 1
                out[top_index] = (pixel - means[c]) * scale
    return out.reshape(channels, height, width)


def batches(dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    return list(dataset.as_numpy_iterator())


# ---- pixels against Caffe ------------------------------------------------------------------------------------

def test_center_crop_mean_scale_bgr_match_caffe_transform(tmp_path):
    list_file, pixels = random_images(tmp_path, 3)
    mean, scale = (104.0, 117.0, 123.0), 0.017
    dataset = image_dataset(list_file, image_size=(6, 5), fit="center_crop", mean=mean, scale=scale,
                            batch_size=3, training=False)
    (x, y), = batches(dataset)
    assert x.shape == (3, 6, 5, 3) and x.dtype == np.float32 and y.tolist() == [0, 1, 2]
    for i, rgb in enumerate(pixels):
        # TEST phase: h_off = (9 - 6) / 2 = 1, w_off = (8 - 5) / 2 = 1; cv::imread gives BGR; no mirror in TEST here
        want = caffe_transform(rgb[..., ::-1], 6, 5, 1, 1, mean, scale, mirror=False)
        np.testing.assert_array_equal(x[i].transpose(2, 0, 1), want)


def test_random_crop_and_mirror_are_caffe_transforms_and_vary(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (8, 7, 3), dtype=np.uint8)
    for i in range(16):
        write_png(tmp_path / f"{i}.png", rgb)
    list_file = write_list(tmp_path, [f"{i}.png 0" for i in range(16)])
    dataset = image_dataset(list_file, image_size=(5, 5), fit="random_crop", mean=127.5, scale=1 / 128,
                            mirror=True, batch_size=16, training=True, seed=3)
    candidates = {(h, w, m): caffe_transform(rgb[..., ::-1], 5, 5, h, w, 127.5, 1 / 128, m)
                  for h in range(4) for w in range(3) for m in (False, True)}
    seen = set()
    for _ in range(2):
        (x, _), = batches(dataset)
        for image in x:
            found = [key for key, want in candidates.items() if np.array_equal(image.transpose(2, 0, 1), want)]
            assert found, "an output is no Caffe crop / mirror of the image"
            seen.update(found)
    assert {m for _, _, m in seen} == {False, True}
    assert len({(h, w) for h, w, _ in seen}) >= 4


def test_no_mirror_when_not_training(tmp_path):
    list_file, pixels = random_images(tmp_path, 4, shape=(4, 6, 3))
    dataset = image_dataset(list_file, image_size=(4, 6), fit="none", mean=0.0, scale=1.0, mirror=True,
                            bgr=False, batch_size=4, training=False)
    (x, _), = batches(dataset)
    np.testing.assert_array_equal(x, np.stack(pixels).astype(np.float32))


def test_resize_matches_opencv_resize(tmp_path):
    cv2 = pytest.importorskip("cv2", reason="OpenCV (the resize Caffe's ReadImageToCVMat uses) is not installed")
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (11, 7, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", rgb)
    list_file = write_list(tmp_path, ["a.png 0"])
    for size in ((6, 5), (16, 13)):  # down and up
        dataset = image_dataset(list_file, image_size=size, fit="resize", mean=0.0, scale=1.0, batch_size=1,
                                training=False)
        (x, _), = batches(dataset)
        bgr = cv2.imread(str(tmp_path / "a.png"), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(bgr, rgb[..., ::-1])
        want = cv2.resize(bgr, (size[1], size[0])).astype(np.float32)  # INTER_LINEAR, 8-bit result
        assert x[0].shape == want.shape
        assert np.abs(x[0] - want).max() <= 1.0  # OpenCV's fixed-point bilinear rounds within one level


def test_resize_to_then_center_crop(tmp_path):
    rgb = np.arange(10 * 10 * 3, dtype=np.uint8).reshape(10, 10, 3)
    write_png(tmp_path / "a.png", rgb)
    list_file = write_list(tmp_path, ["a.png 0"])
    # resize_to = the file's size is the identity; then crop 6 x 4 at ((10 - 6) / 2, (10 - 4) / 2) = (2, 3)
    dataset = image_dataset(list_file, image_size=(6, 4), fit="center_crop", resize_to=(10, 10), mean=10.0,
                            scale=0.5, batch_size=1, training=False)
    (x, _), = batches(dataset)
    np.testing.assert_array_equal(x[0].transpose(2, 0, 1),
                                  caffe_transform(rgb[..., ::-1], 6, 4, 2, 3, 10.0, 0.5, mirror=False))


def test_grayscale_png_reads_as_three_equal_channels(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4, 1) * 20
    write_png(tmp_path / "g.png", gray)
    list_file = write_list(tmp_path, ["g.png 0"])
    (x, _), = batches(image_dataset(list_file, image_size=(3, 4), fit="none", mean=0.0, scale=1.0, batch_size=1,
                                    training=False))
    np.testing.assert_array_equal(x[0], np.repeat(gray, 3, axis=2).astype(np.float32))  # as CV_LOAD_IMAGE_COLOR
    (x, _), = batches(image_dataset(list_file, image_size=(3, 4), fit="none", mean=0.0, scale=1.0, batch_size=1,
                                    training=False, channels=1))
    np.testing.assert_array_equal(x[0], gray.astype(np.float32))


# ---- order: shuffle, seed, epochs, batches ---------------------------------------------------------------------

def label_sequence(dataset, passes: int) -> list[list[int]]:
    return [[int(v) for _, y in dataset.as_numpy_iterator() for v in y] for _ in range(passes)]


def test_shuffle_is_a_function_of_the_seed_and_epoch_only(tmp_path):
    list_file, _ = random_images(tmp_path, 10, shape=(2, 2, 3))

    def build(seed: int, start_epoch: int = 0):
        return image_dataset(list_file, image_size=(2, 2), batch_size=3, seed=seed, start_epoch=start_epoch,
                             drop_remainder=False, check=False)

    keras.utils.set_random_seed(1)
    first = label_sequence(build(5), 3)
    keras.utils.set_random_seed(99)  # global seeds do not matter
    again = label_sequence(build(5), 3)
    assert first == again
    assert all(sorted(p) == list(range(10)) for p in first)  # every image once per pass
    assert first[0] != first[1] != first[2]  # each pass reshuffles
    assert label_sequence(build(6), 1)[0] != first[0]
    assert label_sequence(build(5, start_epoch=1), 2) == first[1:]  # resuming at epoch 1


def test_flips_follow_the_seed(tmp_path):
    rng = np.random.default_rng(4)
    for i in range(8):
        write_png(tmp_path / f"{i}.png", rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
    list_file = write_list(tmp_path, [f"{i}.png {i}" for i in range(8)])
    runs = [batches(image_dataset(list_file, image_size=(3, 4), fit="none", batch_size=8, seed=s, shuffle=False))
            for s in (0, 0, 1)]
    np.testing.assert_array_equal(runs[0][0][0], runs[1][0][0])
    assert not np.array_equal(runs[0][0][0], runs[2][0][0])


def test_no_shuffle_keeps_list_order_and_cardinality(tmp_path):
    list_file, _ = random_images(tmp_path, 7, shape=(2, 2, 3))
    kept = image_dataset(list_file, image_size=(2, 2), batch_size=3, training=False)
    assert int(kept.cardinality()) == 3 and label_sequence(kept, 1) == [list(range(7))]
    dropped = image_dataset(list_file, image_size=(2, 2), batch_size=3, training=True)
    assert int(dropped.cardinality()) == 2 and len(label_sequence(dropped, 1)[0]) == 6
    with pytest.raises(ValueError, match="no full batch of 8"):
        image_dataset(list_file, image_size=(2, 2), batch_size=8, training=True)


def test_labels_as_input(tmp_path):
    list_file, _ = random_images(tmp_path, 2, shape=(2, 2, 3))
    ((x, y_in), y), = batches(image_dataset(list_file, image_size=(2, 2), batch_size=2, training=False,
                                            labels_as_input=True))
    assert x.shape == (2, 2, 2, 3) and y_in.tolist() == y.tolist() == [0, 1] and y.dtype == np.int32


# ---- readers ------------------------------------------------------------------------------------------------------

def test_list_file_paths_with_spaces_windows_separators_and_root(tmp_path):
    (tmp_path / "lists").mkdir()
    list_file = write_list(tmp_path, ["\ufeffa b/1.png 0", "", "c\\2.png  1  ", "d.png 2\r"], name="lists/l.txt")
    images = read_image_list(list_file, root=tmp_path / "faces", num_classes=4)
    assert images.paths == ("a b/1.png", "c/2.png", "d.png")
    assert images.labels == (0, 1, 2) and images.num_classes == 4 and images.lines == (1, 3, 4)
    assert images.samples[0] == (os.path.join(tmp_path / "faces", "a b/1.png"), 0)
    shifted = read_image_list(write_list(tmp_path, ["x.png 1", "y.png 2"]), label_offset=-1)
    assert shifted.labels == (0, 1) and shifted.num_classes == 2 and shifted.root == str(tmp_path)


def test_class_per_folder_tree(tmp_path):
    for name in ("zed/a.png", "amy/x/b.PNG", "amy/a.jpg", "bob/.hidden.png", "bob/notes.txt", "top.png"):
        write_png(tmp_path / name, np.zeros((2, 2, 3))) if name.lower().endswith(".png") else \
            (tmp_path / name).write_bytes(b"")
    images = read_image_folder(tmp_path)
    assert images.class_names == ("amy", "bob", "zed") and images.num_classes == 3
    assert images.paths == ("amy/a.jpg", "amy/x/b.PNG", "zed/a.png") and images.labels == (0, 0, 2)


def test_folder_tree_through_image_dataset(tmp_path):
    write_png(tmp_path / "b" / "1.png", np.full((2, 2, 3), 7))
    write_png(tmp_path / "a" / "1.png", np.full((2, 2, 3), 3))
    (x, y), = batches(image_dataset(root=tmp_path, image_size=(2, 2), mean=0.0, scale=1.0, batch_size=2,
                                    training=False))
    assert y.tolist() == [0, 1] and x[:, 0, 0, 0].tolist() == [3.0, 7.0]


# ---- bad input ----------------------------------------------------------------------------------------------------

def raises(call, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_malformed_lines_are_all_named(tmp_path):
    list_file = write_list(tmp_path, ["a.png 0", "lonely.png", "b.png zero", "c.png 1.5"])
    message = raises(lambda: read_image_list(list_file), "3 malformed line(s)",
                     f"{list_file}:2: expected 'relative/path.jpg label', got 'lonely.png'",
                     f"{list_file}:3: the label 'zero' is not an integer", f"{list_file}:4: the label '1.5'")
    assert f"{list_file}:1" not in message


def test_labels_outside_range_and_negative(tmp_path):
    list_file = write_list(tmp_path, ["a.png 0", "b.png 4", "c.png 5"])
    raises(lambda: read_image_list(list_file, num_classes=5), f"{list_file}:3: label 5 is outside [0, 5)")
    negative = write_list(tmp_path, ["a.png 0", "b.png -1"], name="n.txt")
    raises(lambda: read_image_list(negative), f"{negative}:2: label -1 is negative")


def test_one_based_labels_are_diagnosed(tmp_path):
    list_file = write_list(tmp_path, ["a.png 1", "b.png 2", "c.png 3"])
    raises(lambda: read_image_list(list_file), f"{list_file}:1:", "run 1..3 with none 0", "looks 1-based",
           "label_offset=-1")
    raises(lambda: read_image_list(list_file, num_classes=3), f"{list_file}:3: label 3 is outside [0, 3)",
           "looks 1-based")
    assert read_image_list(list_file, num_classes=4).labels == (1, 2, 3)  # C given: class 0 may be absent
    assert read_image_list(list_file, label_offset=-1).labels == (0, 1, 2)


def test_paths_leaving_the_root(tmp_path):
    list_file = write_list(tmp_path, ["../x.png 0", "/etc/passwd 0", "C:\\faces\\a.jpg 0", "ok/../../y.png 0"])
    raises(lambda: read_image_list(list_file), f"{list_file}:1: the path '../x.png' contains '..'",
           f"{list_file}:2: the path '/etc/passwd' is absolute", f"{list_file}:3: the path 'C:/faces/a.jpg' is "
           "absolute", f"{list_file}:4:")
    outside = tmp_path / "outside"
    write_png(outside / "secret.png", np.zeros((2, 2, 3)))
    (tmp_path / "root").mkdir()
    os.symlink(outside / "secret.png", tmp_path / "root" / "link.png")
    links = read_image_list(write_list(tmp_path, ["link.png 0"], name="l.txt"), root=tmp_path / "root")
    raises(lambda: check(links), f"{tmp_path / 'l.txt'}:1: link.png resolves to", "outside the root folder")


def test_missing_empty_foreign_and_cut_short_images(tmp_path):
    rng = np.random.default_rng(5)
    png = tf.io.encode_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).numpy()
    jpeg = tf.io.encode_jpeg(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).numpy()
    (tmp_path / "good.png").write_bytes(png)
    (tmp_path / "good.jpg").write_bytes(jpeg)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"not an image at all")
    (tmp_path / "half.png").write_bytes(png[:len(png) // 2])
    (tmp_path / "half.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (tmp_path / "stub.png").write_bytes(png[:20])
    names = ["good.png", "good.jpg", "gone.png", "empty.png", "text.jpg", "half.png", "half.jpg", "stub.png"]
    list_file = write_list(tmp_path, [f"{name} 0" for name in names])
    images = read_image_list(list_file)
    message = raises(lambda: check(images), "6 of 8 images cannot be used",
                     f"{list_file}:3: missing image gone.png", f"{list_file}:4: empty.png is an empty file",
                     f"{list_file}:5: text.jpg is not a JPEG, PNG, BMP or GIF image",
                     f"{list_file}:6: half.png: the PNG is cut short", f"{list_file}:7: half.jpg: the JPEG is cut short",
                     f"{list_file}:8: stub.png is not a JPEG, PNG, BMP or GIF image, or its header is cut short")
    assert f"{list_file}:1" not in message and f"{list_file}:2" not in message
    report = check(images, raise_errors=False)
    assert report.sizes == {(16, 16): 2} and len(report.problems) == 6
    raises(lambda: image_dataset(list_file, image_size=(8, 8)), "missing image gone.png")  # checked before building


def test_corrupt_pixel_data_needs_decode(tmp_path):
    png = bytearray(tf.io.encode_png(np.random.default_rng(6).integers(0, 256, (16, 16, 3), dtype=np.uint8)).numpy())
    start = png.index(b"IDAT") + 8
    png[start:start + 40] = bytes(40)  # header and IEND intact, compressed data broken
    (tmp_path / "bad.png").write_bytes(bytes(png))
    images = read_image_list(write_list(tmp_path, ["bad.png 0"]))
    assert check(images).problems == ()  # headers only: looks fine
    raises(lambda: check(images, decode=True), f"{tmp_path / 'list.txt'}:1: cannot decode")


def test_sizes_that_do_not_fit(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((6, 6, 3)))
    write_png(tmp_path / "b.png", np.zeros((4, 6, 3)))
    images = read_image_list(write_list(tmp_path, ["a.png 0", "b.png 0"]))
    list_file = tmp_path / "list.txt"
    raises(lambda: check(images, image_size=(5, 5), fit="center_crop"),
           f"{list_file}:2: b.png is 4 x 6 pixels, smaller than the 5 x 5 crop")
    raises(lambda: check(images, fit="none"), f"{list_file}:2: b.png is 4 x 6 pixels, not 6 x 6")
    assert check(images, image_size=(5, 5), fit="random_crop", resize_to=(8, 8)).problems == ()
    assert check(images, image_size=(5, 5), fit="resize").summary().startswith("2 images, 1 classes")


# ---- Caffe data layers ----------------------------------------------------------------------------------------

def test_transform_from_a_data_layer_with_crop():
    from converters.caffe.reader import parse_prototxt

    net = parse_prototxt('layer { name: "data" type: "ImageData" top: "data" top: "label" include { phase: TEST } '
                         'transform_param { mean_value: 104 mean_value: 117 mean_value: 123 crop_size: 5 } '
                         'image_data_param { source: "val.txt" root_folder: "/data/" batch_size: 8 '
                         'new_height: 6 new_width: 7 is_color: false } }').net
    kwargs = transform_from_prototxt(net.layer[0])
    assert kwargs == {"mean": (104.0, 117.0, 123.0), "scale": 1.0, "mirror": False, "bgr": True, "channels": 1,
                      "list_file": "val.txt", "root": "/data/", "batch_size": 8, "shuffle": False,
                      "image_size": (5, 5), "fit": "random_crop", "resize_to": (6, 7), "training": False}
    with pytest.raises(ValueError, match="mean_file"):
        transform_from_prototxt(parse_prototxt('layer { name: "d" type: "Data" top: "data" '
                                               'transform_param { mean_file: "m.binaryproto" } }').net.layer[0])


def test_transform_from_the_released_amsoftmax_train_net():
    path = SHARED / "caffe" / "real" / "happynear_AMSoftmax__prototxt__face_train_test.prototxt"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared folder of published prototxts)")
    from converters.caffe.reader import read_prototxt

    layers = [layer for layer in read_prototxt(str(path)).net.layer if layer.type == "ImageData"]
    train = transform_from_prototxt(layers[0])
    assert (train["mean"], train["scale"], train["mirror"], train["batch_size"], train["training"]) == \
        (128.0, 0.0078125, True, 256, True)
    assert train["root"] == "C:/datasets/CASIA-maxpy-clean-aligned-96/" and train["fit"] == "none"
    assert transform_from_prototxt(layers[1])["training"] is False
