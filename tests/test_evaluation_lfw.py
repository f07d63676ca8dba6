"""The LFW protocol end to end on a generated images folder: decoding, preprocessing, embeddings with and
without the flip trick (NumPy reference), the report, the ROC plot and ``keras-margin verify``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from keras_margin import AMSoftmaxHead
from keras_margin.evaluation import (
    Preprocessing,
    PreprocessingWarning,
    compute_embeddings,
    evaluate_lfw,
    kfold_accuracy,
    load_image,
    load_images,
)
from keras_margin_cli import verify as cli

HEIGHT, WIDTH, PEOPLE, IMAGES_EACH, EMBEDDING = 12, 10, 6, 3, 16


def _names():
    return [f"Person_{chr(65 + i)}" for i in range(PEOPLE)]


@pytest.fixture(scope="module")
def lfw(tmp_path_factory):
    """An images folder (PNG, so pixels are exact) and a pairs.txt with 5 sets of 2 + 2 pairs.

    Each person's images are that person's random pattern plus noise, so same-person pairs mostly score higher.
    """
    root = tmp_path_factory.mktemp("lfw")
    images = root / "images"
    rng = np.random.default_rng(0)
    pixels = {}
    for name in _names():
        (images / name).mkdir(parents=True)
        base = rng.integers(0, 256, (HEIGHT, WIDTH, 3))
        for number in range(1, IMAGES_EACH + 1):
            image = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            path = images / name / f"{name}_{number:04d}.png"
            tf.io.write_file(str(path), tf.io.encode_png(image))
            pixels[f"{name}/{name}_{number:04d}.png"] = image
    names = _names()
    lines, expected = ["5\t2"], []
    for s in range(5):
        for k in range(2):
            name = names[(s + k) % PEOPLE]
            lines.append(f"{name}\t{1 + k}\t{2 + k}")
            expected.append((f"{name}/{name}_{1 + k:04d}.png", f"{name}/{name}_{2 + k:04d}.png", True, s))
        for k in range(2):
            a, b = names[(s + k) % PEOPLE], names[(s + k + 1 + s % 3) % PEOPLE]
            lines.append(f"{a}\t{1 + k}\t{b}\t{3 - k}")
            expected.append((f"{a}/{a}_{1 + k:04d}.png", f"{b}/{b}_{3 - k:04d}.png", False, s))
    pairs = root / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    return {"root": root, "images": images, "pairs": pairs, "pixels": pixels, "expected": expected}


@pytest.fixture(scope="module")
def model():
    """Flatten -> Dense(16, no bias) -> AMSoftmaxHead: the embedding is x @ W, easy to recompute in NumPy."""
    net = keras.Sequential([keras.Input((HEIGHT, WIDTH, 3)), keras.layers.Flatten(),
                            keras.layers.Dense(EMBEDDING, use_bias=False), AMSoftmaxHead(4)])
    kernel = np.random.default_rng(1).normal(0, 0.05, (HEIGHT * WIDTH * 3, EMBEDDING)).astype(np.float32)
    net.layers[1].set_weights([kernel])
    return net, kernel


def _numpy_scores(lfw, kernel, flip, preprocess):
    def embed(relative):
        x = preprocess(lfw["pixels"][relative].astype(np.float64))
        feature = x.reshape(-1) @ kernel
        if flip:
            feature = feature + x[:, ::-1].reshape(-1) @ kernel
        return feature / np.linalg.norm(feature)

    expected = lfw["expected"]
    scores = np.array([embed(a) @ embed(b) for a, b, _, _ in expected])
    labels = np.array([same for _, _, same, _ in expected])
    folds = np.array([fold for _, _, _, fold in expected])
    return labels, scores, folds


@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flip"])
def test_evaluate_lfw_scores_equal_numpy(lfw, model, flip):
    net, kernel = model
    preprocessing = Preprocessing(channel_order="bgr", mean=127.5, scale=1 / 127.5)
    labels, scores, folds = _numpy_scores(lfw, kernel, flip, lambda x: (x[..., ::-1] - 127.5) / 127.5)
    report = evaluate_lfw(net, lfw["pairs"], lfw["images"], flip=flip, preprocessing=preprocessing, ext="png",
                          batch_size=4, progress=False)
    assert report.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert report.accuracy == pytest.approx(kfold_accuracy(labels, scores, folds)[0], abs=1e-12)
    assert report.fold_accuracies.size == 5 and (report.genuine, report.impostor) == (10, 10)
    assert report.auc > 0.8  # the generated faces are recognisable: the pipeline is not scoring noise


def test_flip_embedding_is_the_normalised_sum_of_image_and_mirror_features():
    rng = np.random.default_rng(2)
    images = rng.normal(size=(5, 4, 6, 3)).astype(np.float32)
    net = keras.Sequential([keras.Input((4, 6, 3)), keras.layers.Flatten(), keras.layers.Dense(7)])
    kernel, bias = (w.astype(np.float64) for w in net.layers[1].get_weights())
    feature = images.reshape(5, -1) @ kernel + bias + images[:, :, ::-1].reshape(5, -1) @ kernel + bias
    expected = feature / np.linalg.norm(feature, axis=1, keepdims=True)
    got = compute_embeddings(net, images, batch_size=2, flip=True, progress=False)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    raw = compute_embeddings(net, images, normalize=False, progress=False)
    np.testing.assert_allclose(raw, images.reshape(5, -1) @ kernel + bias, atol=1e-5)


def test_embeddings_show_a_progress_bar(capsys):
    net = keras.Sequential([keras.Input((2, 2, 3)), keras.layers.Flatten()])
    compute_embeddings(net, np.ones((5, 2, 2, 3), np.float32), batch_size=2, progress=True)
    assert "5/5" in capsys.readouterr().out


def test_png_pixels_and_preprocessing_are_exact(lfw):
    relative = "Person_A/Person_A_0002.png"
    image = load_image(lfw["images"] / relative)
    np.testing.assert_array_equal(image, lfw["pixels"][relative].astype(np.float32))
    batch = load_images([lfw["images"] / relative], Preprocessing(channel_order="bgr", mean=128.0, scale=0.0078125))
    np.testing.assert_allclose(batch[0], (lfw["pixels"][relative][..., ::-1] - 128.0) * 0.0078125, atol=1e-7)


def test_jpeg_decodes_and_resizes(tmp_path):
    path = tmp_path / "face.jpg"
    tf.io.write_file(str(path), tf.io.encode_jpeg(np.full((20, 16, 3), 90, np.uint8), quality=100))
    image = load_image(path, size=(10, 8))
    assert image.shape == (10, 8, 3)
    np.testing.assert_allclose(image, 90.0, atol=2.0)


def test_undecodable_image_is_named(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.jpg: cannot decode the image"):
        load_image(path)


def test_images_of_different_sizes_need_a_size(tmp_path):
    paths = []
    for index, shape in enumerate([(4, 4, 3), (5, 4, 3)]):
        paths.append(tmp_path / f"{index}.png")
        tf.io.write_file(str(paths[-1]), tf.io.encode_png(np.zeros(shape, np.uint8)))
    with pytest.raises(ValueError, match="1.png: image size"):
        load_images(paths)
    assert load_images(paths, Preprocessing(size=(3, 3))).shape == (2, 3, 3, 3)


def test_roc_plot_is_written(lfw, model, tmp_path):
    net, _ = model
    roc = tmp_path / "roc.png"
    with pytest.warns(PreprocessingWarning, match="records no input contract"):  # and nothing given
        evaluate_lfw(net, lfw["pairs"], lfw["images"], ext="png", roc=roc, progress=False)
    assert roc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and roc.stat().st_size > 5000


# ---------------------------------------------------------------------------------------------------------
# keras-margin verify
# ---------------------------------------------------------------------------------------------------------


def _verify(*argv):
    parser = argparse.ArgumentParser(prog="keras-margin verify")
    cli.add_arguments(parser)
    return cli.run(parser.parse_args([str(arg) for arg in argv]))


@pytest.fixture(scope="module")
def saved_model(model, tmp_path_factory):
    net, _ = model
    path = tmp_path_factory.mktemp("model") / "model.keras"
    net.save(path)
    return path


def test_verify_cli_prints_the_figures_and_writes_plot_and_json(lfw, model, saved_model, tmp_path, capsys):
    net, kernel = model
    roc, figures = tmp_path / "roc.png", tmp_path / "figures.json"
    code = _verify(saved_model, "--pairs", lfw["pairs"], "--images", lfw["images"], "--ext", "png", "--flip",
                   "--roc", roc, "--json", figures, "--quiet", "--mean", "127.5", "--scale", 1 / 127.5)
    out, err = capsys.readouterr()
    assert code == 0, err
    for expected in ("(flip)", "accuracy", "5-fold", "AUC", "EER", "TAR@FAR=1e-01", "best      threshold"):
        assert expected in out
    assert roc.exists()
    labels, scores, folds = _numpy_scores(lfw, kernel, True, lambda x: (x - 127.5) / 127.5)
    data = json.loads(figures.read_text())
    assert data["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert data["accuracy"] == pytest.approx(kfold_accuracy(labels, scores, folds)[0], abs=1e-12)
    assert set(data["tar_at_far"]) == {"0.1", "0.01", "0.001", "0.0001", "1e-05", "1e-06"}


def _one_line_error(capsys):
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keras-margin verify: error: "), err
    assert "Traceback" not in out + err
    return lines[0]


def test_verify_cli_missing_image_names_the_pairs_line(lfw, saved_model, tmp_path, capsys):
    pairs = tmp_path / "pairs.txt"
    lines = lfw["pairs"].read_text().splitlines()
    lines[3] = "Person_A\t1\tPerson_B\t9"  # a mismatched line of set 1 whose second image does not exist
    pairs.write_text("\n".join(lines) + "\n")
    code = _verify(saved_model, "--pairs", pairs, "--images", lfw["images"], "--ext", "png")
    assert code == 2
    assert f"{pairs}:4: image 'Person_B/Person_B_0009.png' is not in" in _one_line_error(capsys)


def test_verify_cli_malformed_line_is_named(lfw, saved_model, tmp_path, capsys):
    pairs = tmp_path / "pairs.txt"
    lines = lfw["pairs"].read_text().splitlines()
    lines[6] = "Person_A 1"
    pairs.write_text("\n".join(lines) + "\n")
    assert _verify(saved_model, "--pairs", pairs, "--images", lfw["images"], "--ext", "png") == 2
    assert f"{pairs}:7: expected 'name n1 n2'" in _one_line_error(capsys)


def test_verify_cli_wrong_image_size_suggests_resizing(lfw, tmp_path, capsys):
    other = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(4)])
    path = tmp_path / "other.keras"
    other.save(path)
    assert _verify(path, "--pairs", lfw["pairs"], "--images", lfw["images"], "--ext", "png") == 2
    assert "the model takes 8x8; pass --size 8,8 to resize" in _one_line_error(capsys)
    assert _verify(path, "--pairs", lfw["pairs"], "--images", lfw["images"], "--ext", "png", "--size", "8,8",
                   "--quiet") == 0


def test_verify_cli_missing_model(lfw, tmp_path, capsys):
    assert _verify(tmp_path / "absent.keras", "--pairs", lfw["pairs"], "--images", lfw["images"], "--ext", "png") == 2
    assert "absent.keras: no such model file" in _one_line_error(capsys)


def test_installed_verify_command_reports_errors_without_a_traceback(lfw, saved_model, tmp_path):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1 1\nPerson_A 1 2\nPerson_A 1 Person_B two\n")
    result = subprocess.run([sys.executable, "-m", "keras_margin_cli", "verify", str(saved_model), "--pairs",
                             str(pairs), "--images", str(lfw["images"]), "--ext", "png"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [f"keras-margin verify: error: {pairs}:3: image number 'two' is not a positive integer"]
