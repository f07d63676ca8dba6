"""``keras-margin train``: a tiny face_resnet4 trains from a Caffe list file on TensorFlow and JAX, the saved model
reloads and embeds, a stopped and resumed run equals an uninterrupted one, validation and the fused loss work, bad
input is one line with nothing written, and two devices give the one-device loss."""

import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_margin  # noqa: F401  (registers the heads for load_model)
import keras_margin_cli

ROOT = Path(__file__).resolve().parents[1]
CLASSES, PER_CLASS, HEIGHT, WIDTH = 4, 6, 24, 20
TINY = ["--backbone", "face_resnet4", "--input-size", f"{HEIGHT},{WIDTH}", "--embedding-dim", "16", "--quiet",
        "--batch-size", "12", "--lr", "0.01"]


def _png(path: Path, pixels: np.ndarray) -> None:
    import tensorflow as tf

    path.parent.mkdir(parents=True, exist_ok=True)
    tf.io.write_file(str(path), tf.io.encode_png(pixels))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 classes x 6 PNGs of 24x20 (class-coloured noise), a Caffe list file, and an LFW pairs file (2 folds of
    1 same + 1 different pair) over a val/<name>/<name>_<000n>.png tree."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    lines = []
    for label in range(CLASSES):
        base = rng.integers(0, 256, (1, 1, 3))
        for index in range(PER_CLASS):
            pixels = np.clip(base + rng.normal(0, 40, (HEIGHT, WIDTH, 3)), 0, 255).astype("uint8")
            name = f"person{label}/{index}.png"
            _png(root / "images" / name, pixels)
            lines.append(f"{name} {label}\n")
            if index < 2:
                _png(root / "val" / f"P{label}" / f"P{label}_{index + 1:04d}.png", pixels)
    (root / "train.txt").write_text("".join(lines))
    (root / "pairs.txt").write_text("2 1\nP0 1 2\nP0 1 P1 1\nP2 1 2\nP2 2 P3 2\n")
    return root


def _train(data, tmp_path, *extra, name="model.keras"):
    output = tmp_path / name
    argv = ["train", "--list", str(data / "train.txt"), "--images", str(data / "images"), *TINY, *extra,
            "-o", str(output)]
    return keras_margin_cli.main(argv), output


def _summary_value(text: str, key: str) -> str:
    match = re.search(rf"^\s+{re.escape(key)}\s+(\S+)", text, re.MULTILINE)
    assert match, text
    return match.group(1)


@pytest.mark.backend_agnostic
def test_trains_saves_and_the_model_reloads_and_embeds(data, tmp_path, capsys):
    code, output = _train(data, tmp_path, "--steps", "2")
    out = capsys.readouterr().out
    assert code == 0, out
    assert np.isfinite(float(_summary_value(out, "final loss")))
    assert _summary_value(out, "steps") == "2"
    model = keras.saving.load_model(output)
    assert model.output_shape == (None, CLASSES)  # images -> cos(theta)
    embed = keras_margin.export.embedding_model(model)
    features = keras.ops.convert_to_numpy(embed(np.zeros((3, HEIGHT, WIDTH, 3), "float32")))
    assert features.shape == (3, 16) and np.all(np.isfinite(features))
    cosines = keras.ops.convert_to_numpy(model(np.zeros((1, HEIGHT, WIDTH, 3), "float32")))
    assert np.all(np.abs(cosines) <= 1 + 1e-5)
    assert keras_margin.find_input_contract(model).channel_order == "bgr"


@pytest.mark.backend_agnostic
def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(data, tmp_path, capsys):
    code, _ = _train(data, tmp_path, "--epochs", "2", "--checkpoint-dir", str(tmp_path / "resumed"),
                     name="half.keras")
    assert code == 0
    code, resumed = _train(data, tmp_path, "--epochs", "4", "--checkpoint-dir", str(tmp_path / "resumed"),
                           name="resumed.keras")
    out = capsys.readouterr().out
    assert code == 0 and "resuming from" in out and "at epoch 3" in out
    code, whole = _train(data, tmp_path, "--epochs", "4", name="whole.keras")
    assert code == 0
    a = keras.saving.load_model(resumed).get_weights()
    b = keras.saving.load_model(whole).get_weights()
    half = keras.saving.load_model(tmp_path / "half.keras").get_weights()
    assert max(float(np.max(np.abs(x - y))) for x, y in zip(a, half)) > 1e-4  # the rerun trained on
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.backend_agnostic
def test_validation_writes_the_accuracy_into_the_summary(data, tmp_path, capsys):
    code, output = _train(data, tmp_path, "--epochs", "2", "--val-pairs", str(data / "pairs.txt"),
                          "--val-images", str(data / "val"), "--val-ext", "png")
    out = capsys.readouterr().out
    assert code == 0, out
    accuracy = float(_summary_value(out, "val_lfw_accuracy"))
    assert 0.0 <= accuracy <= 1.0
    assert "at epoch" in out
    assert (tmp_path / "model.best.keras").is_file()


@pytest.mark.backend_agnostic
@pytest.mark.parametrize("chunk_by", ["classes", "rows"])
def test_fused_chunked_loss_trains(data, tmp_path, capsys, chunk_by):
    code, output = _train(data, tmp_path, "--steps", "2", "--fused-loss", "--chunk-size", "3", "--chunk-by", chunk_by,
                          "--head", "arcface")
    out = capsys.readouterr().out
    assert code == 0, out
    assert np.isfinite(float(_summary_value(out, "final loss")))
    model = keras.saving.load_model(output)
    assert len(model.inputs) == 2  # [images, labels] -> per-sample loss
    assert model.layers[-1].chunk_by == chunk_by
    assert keras_margin.export.embedding_model(model).output_shape == (None, 16)


@pytest.mark.backend_agnostic
@pytest.mark.parametrize("layout", [[], ["--kernel-layout", "classes_first"]], ids=["classes_last", "classes_first"])
def test_partial_fc_v1_trains_and_leaves_unsampled_classes_alone(data, tmp_path, capsys, layout):
    # 4 classes, batch 2, rate 0.5: a step keeps ceil(0.5 * 4) = 2 classes, the batch's.
    code, output = _train(data, tmp_path, "--steps", "2", "--fused-loss", "--sample-rate", "0.5",
                          "--sample-update", "sampled", "--batch-size", "2", *layout)
    out = capsys.readouterr().out
    assert code == 0, out
    assert np.isfinite(float(_summary_value(out, "final loss")))
    model = keras.saving.load_model(output)
    head = model.layers[-1]
    assert head.sample_update == "sampled" and isinstance(model.optimizer, keras_margin.PartialFCOptimizer)
    assert head.kernel_layout == (layout[-1] if layout else "classes_last")
    assert head.kernel.shape[0 if head.classes_first else 1] == 4
    record = keras.ops.convert_to_numpy(head.sampled_columns)
    assert sorted(np.unique(record).tolist()) == [0.0, 1.0] and record.sum() == 2  # the last step's sample


@pytest.mark.parametrize("extra, expected", [
    (["--sample-update", "sampled"], "needs --sample-rate below 1"),
    (["--sample-rate", "0.5", "--sample-update", "sampled", "--iter-size", "2"], "cannot accumulate"),
    (["--sample-rate", "0.5", "--sample-update", "sampled", "--devices", "2", "--batch-size", "2"],
     "MirroredStrategy's replicas"),
    (["--sample-rate", "0.5", "--sample-update", "sampled"], "fewer than the batch of 12 images"),
    (["--kernel-layout", "classes_first", "--chunk-size", "2", "--chunk-by", "rows"], "chunk by classes"),
    (["--kernel-layout", "classes_first", "--head", "subcenter_arcface"], "sub-centers"),
])
def test_sample_update_refuses_what_it_cannot_do(data, tmp_path, capsys, extra, expected):
    code, output = _train(data, tmp_path, "--steps", "1", "--fused-loss", *extra)
    err = capsys.readouterr().err
    assert code == 2 and expected in err and not output.exists(), err


def _bad_list(data, tmp_path, text):
    listing = tmp_path / "bad.txt"
    listing.write_text(text)
    return ["--list", str(listing), "--images", str(data / "images")]


@pytest.mark.parametrize("case", ["missing image", "1-based labels", "unknown backbone", "unknown head",
                                  "unwritable output"])
def test_bad_input_is_one_line_and_writes_nothing(data, tmp_path, capsys, case):
    output = tmp_path / "out" / "model.keras"
    output.parent.mkdir()
    source = ["--list", str(data / "train.txt"), "--images", str(data / "images")]
    options = []
    expected = ""
    if case == "missing image":
        source = _bad_list(data, tmp_path, "person0/0.png 0\nperson0/absent.png 1\n")
        expected = "bad.txt:2: missing image person0/absent.png"
    elif case == "1-based labels":
        source = _bad_list(data, tmp_path, "person0/0.png 1\nperson1/0.png 2\n")
        expected = "looks 1-based"
    elif case == "unknown backbone":
        options, expected = ["--backbone", "resnet9"], "--backbone 'resnet9' is not one of"
    elif case == "unknown head":
        options, expected = ["--head", "softmax"], "--head 'softmax' is not one of"
    target = output
    if case == "unwritable output":  # a folder that does not exist (a read-only one does not stop root)
        target, expected = output.parent / "absent" / "model.keras", "does not exist"
    argv = ["train", *source, *TINY, *options, "--steps", "1", "-o", str(target)]
    if case == "unknown backbone":
        argv.remove("face_resnet4")
        argv.remove("--backbone")
    code = keras_margin_cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keras-margin train: error: ") and expected in lines[0], lines
    assert "Traceback" not in captured.err
    assert list(output.parent.iterdir()) == []


_DEVICES = """
import os, sys
if os.environ["KERAS_BACKEND"] == "tensorflow":  # 2 logical CPUs, before TensorFlow starts
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras_margin_cli
argv, output = sys.argv[1:-1], sys.argv[-1]
for devices in ("1", "2"):
    code = keras_margin_cli.main([*argv, "--devices", devices, "-o", f"{output}{devices}.keras"])
    print("EXIT", devices, code, flush=True)
"""


@pytest.mark.backend_agnostic
def test_two_devices_give_the_one_device_loss(data, tmp_path):
    # The device count is fixed when TensorFlow / JAX start: a fresh interpreter on this run's backend (2 logical
    # CPUs on TensorFlow, 2 XLA host devices on JAX) trains on 1 device, then on 2 (the JAX run of the suite
    # covers the DeviceMesh, the TensorFlow run MirroredStrategy).
    backend = keras.config.backend()
    argv = ["train", "--list", str(data / "train.txt"), "--images", str(data / "images"), *TINY, "--steps", "2"]
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, "-c", _DEVICES, *argv, str(tmp_path / "model")], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=300)
    out = result.stdout
    assert result.returncode == 0 and "EXIT 1 0" in out and "EXIT 2 0" in out, result.stderr[-3000:]
    first, second = out.split("EXIT 1 0")
    assert "1 device" in first
    assert ("2 JAX devices" if backend == "jax" else "2 devices (MirroredStrategy") in second
    one, two = float(_summary_value(first, "final loss")), float(_summary_value(second, "final loss"))
    assert abs(one - two) <= 1e-4, (one, two)


@pytest.mark.backend_agnostic
def test_a_batch_statistic_head_trains_in_the_logits_form(data, tmp_path, capsys):
    # CurricularFace reads statistics of each batch, so it has no cosine-path loss: [images, labels] -> logits.
    code, output = _train(data, tmp_path, "--steps", "1", "--head", "curricularface")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "CurricularFaceHead (logits form" in out
    assert np.isfinite(float(_summary_value(out, "final loss")))
    assert len(keras.saving.load_model(output).inputs) == 2


def test_help_imports_no_framework():
    from tests.test_cli import _run_in_fresh_python

    code, out, _, loaded = _run_in_fresh_python(["train", "--help"])
    assert code == 0 and loaded == "[]", loaded
    assert "--checkpoint-dir" in out and "--devices" in out
