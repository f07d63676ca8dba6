"""``keras_margin.callbacks.Verification``: the LFW figures written into the epoch logs during ``fit`` (History,
TensorBoard), equal to ``evaluate_lfw`` on the same network and to a NumPy transcription of the protocol; the
best model saved only on improvement; ``every``; the embedding-network options and the errors.
"""

from __future__ import annotations

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_margin import AMSoftmaxHead
from keras_margin.callbacks import Verification
from keras_margin.evaluation import PairsFileError, Preprocessing, evaluate_lfw

SIZE, PEOPLE, IMAGES_EACH, EMBEDDING = 16, 6, 4, 8
SETS, PER_SET = 4, 3
FARS = (1e-2, 1e-3)
PRE = Preprocessing(mean=127.5, scale=1 / 128)
NAMES = [f"Person_{chr(65 + i)}" for i in range(PEOPLE)]


@pytest.fixture(scope="module")
def lfw(tmp_path_factory):
    """6 people x 4 PNG images (16 x 16): each person a colour and a pattern of their own, plus noise; a View 2
    style pairs.txt of 4 sets of 3 same-person then 3 different-person pairs."""
    root = tmp_path_factory.mktemp("lfw")
    images = root / "images"
    rng = np.random.default_rng(0)
    pixels, labels = [], []
    for person, name in enumerate(NAMES):
        (images / name).mkdir(parents=True)
        colour = rng.integers(40, 216, 3)
        pattern = rng.normal(0, 30, (SIZE, SIZE, 1))
        for number in range(1, IMAGES_EACH + 1):
            image = np.clip(colour + pattern + rng.normal(0, 15, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            tf.io.write_file(str(images / name / f"{name}_{number:04d}.png"), tf.io.encode_png(image))
            pixels.append(image)
            labels.append(person)
    lines = [f"{SETS}\t{PER_SET}"]
    for s in range(SETS):
        for k in range(PER_SET):
            lines.append(f"{NAMES[(s + 2 * k) % PEOPLE]}\t{1 + (s + k) % 3}\t{4 - k % 2}")
        for k in range(PER_SET):
            lines.append(f"{NAMES[(s + k) % PEOPLE]}\t{1 + k}\t{NAMES[(s + k + 1 + s % 4) % PEOPLE]}\t{1 + s}")
    pairs = root / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    x = (np.stack(pixels).astype(np.float32) - 127.5) / 128
    return {"root": root, "images": images, "pairs": pairs, "lines": lines, "x": x, "y": np.array(labels)}


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(EMBEDDING, name="embedding"), AMSoftmaxHead(PEOPLE, name="head")])
    model.compile(keras.optimizers.SGD(0.05), loss=model.layers[-1].loss)
    return model


def _verification(lfw, **options):
    options = {"ext": "png", "preprocessing": PRE, "far": FARS, "verbose": 0, "batch_size": 16, **options}
    return Verification(lfw["pairs"], lfw["images"], **options)


class Recorder(keras.callbacks.Callback):
    """Keeps, at each epoch end (after the callbacks before it), a copy of the logs, the weights and, when given
    ``pairs``, ``evaluate_lfw`` of the model run independently."""

    def __init__(self, lfw=None, filepath=None):
        super().__init__()
        self.lfw, self.filepath = lfw, filepath
        self.logs, self.weights, self.reports, self.files = [], [], [], []

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs))
        self.weights.append([np.array(w) for w in self.model.get_weights()])
        if self.lfw is not None:
            self.reports.append(evaluate_lfw(self.model, self.lfw["pairs"], self.lfw["images"], flip=True,
                                             preprocessing=PRE, ext="png", fars=FARS, progress=False))
        if self.filepath is not None:
            stat = os.stat(self.filepath) if os.path.exists(self.filepath) else None
            self.files.append(None if stat is None else (stat.st_ino, stat.st_mtime_ns, stat.st_size))


class Scripted(keras.callbacks.Callback):
    """Writes a given value per epoch into the logs, so the monitored figure's course is known in advance."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def on_epoch_end(self, epoch, logs=None):
        logs["scripted"] = self.values[epoch]


def _numpy_figures(lfw, kernel, bias):
    """The protocol transcribed in NumPy: flip-fused, normalized embeddings x @ W + b, cosine scores, the 10-fold
    accuracy by brute force over midpoint thresholds (the middle one of equally good thresholds), TAR@FAR."""
    order = {f"{NAMES[p]}/{NAMES[p]}_{n:04d}.png": p * IMAGES_EACH + n - 1
             for p in range(PEOPLE) for n in range(1, IMAGES_EACH + 1)}
    x = lfw["x"].astype(np.float64)
    features = x.reshape(len(x), -1) @ kernel + bias + x[:, :, ::-1].reshape(len(x), -1) @ kernel + bias
    embeddings = features / np.linalg.norm(features, axis=1, keepdims=True)
    rows, same, folds = [], [], []
    for index, line in enumerate(lfw["lines"][1:]):
        fields = line.split("\t")
        if len(fields) == 3:
            a, b = f"{fields[0]}/{fields[0]}_{int(fields[1]):04d}.png", f"{fields[0]}/{fields[0]}_{int(fields[2]):04d}.png"
        else:
            a, b = f"{fields[0]}/{fields[0]}_{int(fields[1]):04d}.png", f"{fields[2]}/{fields[2]}_{int(fields[3]):04d}.png"
        rows.append((order[a], order[b]))
        same.append(len(fields) == 3)
        folds.append(index // (2 * PER_SET))
    rows, same, folds = np.array(rows), np.array(same), np.array(folds)
    scores = np.sum(embeddings[rows[:, 0]] * embeddings[rows[:, 1]], axis=1)
    accuracies = []
    for fold in range(SETS):
        train = folds != fold
        distinct = np.unique(scores[train])
        candidates = [distinct[0] - 1] + list((distinct[1:] + distinct[:-1]) / 2) + [distinct[-1] + 1]
        right = [np.mean((scores[train] >= t) == same[train]) for t in candidates]
        best = [t for t, r in zip(candidates, right) if r == max(right)]
        threshold = best[(len(best) - 1) // 2]
        accuracies.append(np.mean((scores[~train] >= threshold) == same[~train]))
    impostor, genuine = scores[~same], scores[same]
    tars = {}
    for far in FARS:  # lowest threshold among the scores (and +inf) whose FAR stays <= far
        ok = [t for t in [np.inf, *scores] if np.mean(impostor >= t) <= far]
        tars[far] = np.mean(genuine >= min(ok))
    return float(np.mean(accuracies)), tars


@pytest.mark.backend_agnostic
def test_logs_hold_the_figures_of_evaluate_lfw_and_of_numpy(lfw):
    model = _model()
    verification, recorder = _verification(lfw), Recorder(lfw)
    history = model.fit(lfw["x"], lfw["y"], batch_size=8, epochs=2, verbose=0, callbacks=[verification, recorder])
    keys = ["val_lfw_accuracy", "val_lfw_accuracy_std", "val_lfw_threshold", "val_lfw_auc", "val_lfw_eer",
            "val_lfw_tar_at_far_1e-02", "val_lfw_tar_at_far_1e-03"]
    for key in keys:
        assert len(history.history[key]) == 2, key
    for epoch, (logs, report) in enumerate(zip(recorder.logs, recorder.reports)):
        assert logs["val_lfw_accuracy"] == report.accuracy
        assert logs["val_lfw_accuracy_std"] == report.accuracy_std
        assert logs["val_lfw_threshold"] == report.best_threshold
        assert logs["val_lfw_auc"] == report.auc
        assert logs["val_lfw_eer"] == report.eer
        assert logs["val_lfw_tar_at_far_1e-02"] == report.tar_at_far[1e-2][0]
        assert logs["val_lfw_tar_at_far_1e-03"] == report.tar_at_far[1e-3][0]
        assert history.history["val_lfw_accuracy"][epoch] == report.accuracy
        kernel, bias = (w.astype(np.float64) for w in recorder.weights[epoch][:2])
        accuracy, tars = _numpy_figures(lfw, kernel, bias)
        assert logs["val_lfw_accuracy"] == pytest.approx(accuracy, abs=1e-12)
        for far in FARS:
            assert logs[f"val_lfw_tar_at_far_{far:.0e}"] == pytest.approx(tars[far], abs=1e-12)
    assert sorted(verification.reports) == [1, 2]


@pytest.mark.backend_agnostic
def test_default_network_equals_embedding_layer_and_embedding_model(lfw):
    model = _model()
    given = keras.Model(model.inputs, model.get_layer("embedding").output)
    callbacks = [_verification(lfw, prefix="head_input"), _verification(lfw, prefix="layer", embedding_layer="embedding"),
                 _verification(lfw, prefix="given", embedding_model=given)]
    history = model.fit(lfw["x"], lfw["y"], batch_size=8, epochs=1, verbose=0, callbacks=callbacks).history
    for figure in ("accuracy", "auc", "threshold", "tar_at_far_1e-03"):
        assert history[f"head_input_{figure}"] == history[f"layer_{figure}"] == history[f"given_{figure}"]


@pytest.mark.backend_agnostic
def test_every_two_evaluates_epochs_two_and_four_only(lfw):
    model = _model()
    verification, recorder = _verification(lfw, every=2), Recorder()
    history = model.fit(lfw["x"], lfw["y"], batch_size=8, epochs=4, verbose=0, callbacks=[verification, recorder])
    assert ["val_lfw_accuracy" in logs for logs in recorder.logs] == [False, True, False, True]
    assert sorted(verification.reports) == [2, 4]
    assert len(history.history["val_lfw_accuracy"]) == 2


@pytest.mark.backend_agnostic
def test_best_model_is_saved_only_when_the_monitor_improves(lfw, tmp_path):
    path = tmp_path / "best.keras"
    model = _model()
    verification = _verification(lfw, filepath=path, monitor="scripted")
    recorder = Recorder(filepath=path)
    model.fit(lfw["x"], lfw["y"], batch_size=8, epochs=4, verbose=0,
              callbacks=[Scripted([0.5, 0.7, 0.6, 0.9]), verification, recorder])
    files = recorder.files
    assert files[0] is not None
    changed = [files[0] is not None] + [files[i] != files[i - 1] for i in range(1, 4)]
    assert changed == [True, True, False, True]
    assert verification.best == 0.9 and verification.best_epoch == 4
    assert sorted(os.listdir(tmp_path)) == ["best.keras"]  # no temporary file left
    reloaded = keras.saving.load_model(path)
    for saved, trained in zip(reloaded.get_weights(), recorder.weights[3]):
        np.testing.assert_array_equal(saved, trained)


@pytest.mark.backend_agnostic
def test_best_model_follows_the_accuracy_by_default(lfw, tmp_path, capsys):
    path = tmp_path / "best.keras"
    model = _model()
    verification, recorder = _verification(lfw, filepath=path, verbose=1), Recorder(filepath=path)
    model.fit(lfw["x"], lfw["y"], batch_size=8, epochs=3, verbose=0, callbacks=[verification, recorder])
    accuracies = [logs["val_lfw_accuracy"] for logs in recorder.logs]
    best_so_far = [max(accuracies[: i + 1]) for i in range(3)]
    assert verification.best == max(accuracies)
    assert verification.best_epoch == 1 + accuracies.index(max(accuracies))
    improved = [True] + [best_so_far[i] > best_so_far[i - 1] for i in range(1, 3)]
    changed = [recorder.files[0] is not None] + [recorder.files[i] != recorder.files[i - 1] for i in range(1, 3)]
    assert changed == improved
    lines = [line for line in capsys.readouterr().out.splitlines() if "val_lfw accuracy" in line]
    assert len(lines) == 3 and lines[0].startswith("Epoch 1: val_lfw accuracy ") and "model saved to" in lines[0]


def test_tensorboard_after_it_records_the_scalar(lfw, tmp_path):
    pytest.importorskip("tensorboard", reason="keras.callbacks.TensorBoard writes scalars through the tensorboard "
                        "package, which is not installed")
    model = _model()
    verification = _verification(lfw)
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path / "logs"), write_graph=False, profile_batch=0)
    history = model.fit(lfw["x"], lfw["y"], batch_size=8, epochs=2, verbose=0, callbacks=[verification, board])
    values = {}
    for event_file in glob.glob(str(tmp_path / "logs" / "validation" / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(event_file):
            for value in event.summary.value:
                if value.tag == "epoch_lfw_accuracy":  # TensorBoard drops the "val_" prefix under validation/
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(values) == [0, 1]
    np.testing.assert_allclose([values[0], values[1]], history.history["val_lfw_accuracy"], rtol=1e-6)


@pytest.mark.backend_agnostic
def test_model_without_head_or_embedding_option_is_refused(lfw):
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Flatten(), keras.layers.Dense(PEOPLE)])
    model.compile("sgd", loss="sparse_categorical_crossentropy")
    recorder = Recorder()
    with pytest.raises(ValueError, match="no keras_margin margin head.*`embedding_model`.*`embedding_layer`"):
        model.fit(lfw["x"], lfw["y"], epochs=1, verbose=0, callbacks=[_verification(lfw), recorder])
    assert recorder.logs == []


def test_unknown_embedding_layer_is_named(lfw):
    model = _model()
    with pytest.raises(ValueError, match="`embedding_layer` 'features' is not a layer"):
        model.fit(lfw["x"], lfw["y"], epochs=1, verbose=0, callbacks=[_verification(lfw, embedding_layer="features")])


def test_bad_pairs_file_is_named_with_its_line_at_construction(lfw, tmp_path):
    bad = tmp_path / "pairs.txt"
    lines = list(lfw["lines"])
    lines[3] = "Person_A\t1"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(PairsFileError, match=r"pairs\.txt:4: expected 'name n1 n2'"):
        Verification(bad, lfw["images"], ext="png")
    missing = tmp_path / "missing.txt"
    missing.write_text("1\t1\nPerson_A\t1\t9\nPerson_A\t1\tPerson_B\t1\n")
    with pytest.raises(PairsFileError, match=r"missing\.txt:2: image 'Person_A/Person_A_0009\.png'"):
        Verification(missing, lfw["images"], ext="png")


def test_pairs_file_with_one_fold_is_refused_at_construction(lfw, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("1\t1\nPerson_A\t1\t2\nPerson_A\t1\tPerson_B\t1\n")  # one set: 10 folds, most without a pair
    with pytest.raises(PairsFileError, match="one.txt"):
        Verification(one, lfw["images"], ext="png")


@pytest.mark.parametrize("options, argument", [
    ({"every": 0}, "`every`"),
    ({"batch_size": 1.5}, "`batch_size`"),
    ({"far": 2.0}, "`far`"),
    ({"far": ()}, "`far`"),
    ({"flip": 1}, "`flip`"),
    ({"filepath": "best.h5"}, "`filepath`"),
    ({"embedding_layer": "embedding", "embedding_model": keras.Sequential([keras.layers.Dense(2)])},
     "`embedding_model` or `embedding_layer`"),
    ({"verbose": 2}, "`verbose`"),
    ({"prefix": ""}, "`prefix`"),
])
def test_bad_arguments_are_named(lfw, options, argument):
    with pytest.raises(ValueError, match=argument):
        Verification(lfw["pairs"], lfw["images"], ext="png", **options)
