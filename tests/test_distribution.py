"""Multi-device training: class-sharded heads on JAX (ModelParallel, 4 virtual CPU devices) and
TensorFlow's MirroredStrategy (2 logical CPU devices) give the single-device numbers.

The device count is fixed when JAX / TensorFlow initialize, so every case runs in a fresh subprocess
that compares against a single-device run of the same model in the same process.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The subprocesses pick their own backend; run them once, from the TensorFlow run of the suite.
pytestmark = pytest.mark.skipif(keras.config.backend() != "tensorflow",
                                reason="subprocess tests choose their backend themselves")


def _run(script: str, env: dict, timeout=300) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# Shared by both subprocess scripts: data, the three ways of placing a head, and the comparison.
_MODELS = """
import json
import numpy as np, keras
import keras_margin as km

C, D, N, BATCH, EPOCHS = 16, 8, 32, 16, 3  # 2 steps an epoch
rng = np.random.default_rng(0)
x = rng.normal(size=(N, 10)).astype("float32")
y = rng.integers(0, C, size=N).astype("int32")

def cosine_path():
    head = km.ArcFaceHead(C, s=10.0, name="head")
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(D, name="embedding"), head], name="seq")
    return model, head.loss, (x, y)

def label_aware():
    images, labels = keras.Input((10,)), keras.Input((), dtype="int32")
    head = km.SphereFaceHead(C, name="head")
    model = keras.Model([images, labels], head([keras.layers.Dense(D, name="embedding")(images), labels]),
                        name="label_aware")
    return model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), ([x, y], y)

def fused_chunked():
    images, labels = keras.Input((10,)), keras.Input((), dtype="int32")
    head = km.SphereFaceHead(C, fused_loss=True, chunk_size=3, name="head")
    model = keras.Model([images, labels], head([keras.layers.Dense(D, name="embedding")(images), labels]),
                        name="fused")
    return model, None, ([x, y], None)

def _label_aware(head):
    images, labels = keras.Input((10,)), keras.Input((), dtype="int32")
    model = keras.Model([images, labels], head([keras.layers.Dense(D, name="embedding")(images), labels]))
    return model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), ([x, y], y)

def _fused(head):
    images, labels = keras.Input((10,)), keras.Input((), dtype="int32")
    model = keras.Model([images, labels], head([keras.layers.Dense(D, name="embedding")(images), labels]))
    return model, None, ([x, y], None)

def subcenter_cosine_path():
    head = km.SubCenterArcFaceHead(C, k=2, s=10.0, name="head")
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(D, name="embedding"), head], name="sub")
    return model, head.loss, (x, y)

CASES = {"cosine_path": cosine_path, "label_aware": label_aware, "fused_chunked": fused_chunked,
         # The newer heads: batch statistics (t, the norms' mean and std) over the global batch, a norm-dependent
         # margin with its regularizer, k sub-centers per class.
         "curricularface": lambda: _label_aware(km.CurricularFaceHead(C, s=10.0, name="head")),
         "adaface": lambda: _label_aware(km.AdaFaceHead(C, s=10.0, name="head")),
         "magface_fused": lambda: _fused(km.MagFaceHead(C, s=10.0, fused_loss=True, chunk_size=3, name="head")),
         "subcenter": subcenter_cosine_path,
         # Partial FC v1: the sample (16 of 64 classes: the labels use the first 16) drawn on the global batch,
         # the unsampled columns and their momentum restored.
         "partial_fc_v1": lambda: _fused(km.AMSoftmaxHead(4 * C, s=10.0, fused_loss=True, sample_rate=0.25,
                                                          sample_update="sampled", name="head")),
         # 17 sampled classes: the stepped (d, 17) buffer cannot split over 2 class shards, so it is replicated.
         "partial_fc_v1_uneven": lambda: _fused(km.AMSoftmaxHead(4 * C, s=10.0, fused_loss=True, sample_rate=0.26,
                                                                 sample_update="sampled", name="head")),
         # The class-major kernel (64, 8), sharded along its first axis; the stepped buffer is (16, 8).
         "partial_fc_v1_class_major": lambda: _fused(km.AMSoftmaxHead(
             4 * C, s=10.0, fused_loss=True, sample_rate=0.25, sample_update="sampled",
             kernel_layout="classes_first", name="head"))}

def optimizer_for(model):
    if model.get_layer("head").get_config().get("sample_update") == "sampled":
        return km.PartialFCOptimizer(keras.optimizers.SGD(0.1, momentum=0.9))
    return keras.optimizers.SGD(0.1)

def train(model, loss, data, jit_compile):
    model.compile(optimizer_for(model), loss=loss, jit_compile=jit_compile)
    history = model.fit(data[0], data[1], batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    return history.history["loss"], [np.asarray(w) for w in model.get_weights()]

def differences(single, multi):
    return {"loss": float(np.max(np.abs(np.subtract(single[0], multi[0])))),
            "weights": max(float(np.max(np.abs(a - b))) for a, b in zip(single[1], multi[1])),
            "steps": len(single[0])}
"""


_SHARDED = """
from keras_margin.distribution import shard_heads
devices = keras.distribution.list_devices()
assert len(devices) == 4, devices
report = {}
for name, mesh_shape in PLACEMENTS:
    keras.distribution.set_distribution(None)
    keras.utils.set_random_seed(0)
    model, loss, data = CASES[name]()
    initial = model.get_weights()
    seeds = [(v, np.asarray(v.value)) for v in model.non_trainable_variables if "seed_generator" in v.path]
    single = train(model, loss, data, True)
    model.set_weights(initial)
    for variable, state in seeds:  # the sharded copy then draws Partial FC's samples from the same state
        variable.assign(state)
    mesh = keras.distribution.DeviceMesh(mesh_shape, ("batch", "model"), devices)
    sharded = shard_heads(model, mesh)
    kernel = sharded.get_layer("head").kernel
    spec_before = list(kernel.value.sharding.spec)
    multi = train(sharded, loss, data, True)
    value = kernel.value
    report[name] = {**differences(single, multi), "spec_before": spec_before,
                    "spec_after": list(value.sharding.spec),
                    "shard_shapes": sorted({tuple(s.data.shape) for s in value.addressable_shards}),
                    "devices": len({s.device for s in value.addressable_shards})}
print(json.dumps(report))
"""


def _sharded_report(placements):
    return _run(_MODELS + f"PLACEMENTS = {placements!r}\n" + _SHARDED,
                {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})


def test_class_sharded_heads_on_four_jax_devices_match_one_device():
    report = _sharded_report([("cosine_path", (1, 4)), ("label_aware", (2, 2)), ("fused_chunked", (1, 4))])
    for name, case in report.items():
        assert case["steps"] == 3, (name, case)
        assert case["loss"] <= 1e-5 and case["weights"] <= 1e-5, (name, case)
        # The kernel (D, C) = (8, 16) is split along the class axis, before and after training.
        assert case["spec_before"] == case["spec_after"] == [None, "model"], (name, case)
    assert report["cosine_path"]["shard_shapes"] == [[8, 4]] and report["cosine_path"]["devices"] == 4
    assert report["label_aware"]["shard_shapes"] == [[8, 8]]  # 2 x 2 mesh: two class shards, each on 2 devices


def test_newer_heads_class_sharded_on_four_jax_devices_match_one_device():
    report = _sharded_report([("curricularface", (2, 2)), ("adaface", (2, 2)), ("magface_fused", (1, 4)),
                              ("subcenter", (1, 4))])
    for name, case in report.items():
        assert case["steps"] == 3, (name, case)
        # The weights include the heads' moving statistics (non-trainable weights).
        assert case["loss"] <= 1e-5 and case["weights"] <= 1e-5, (name, case)
        assert case["spec_before"] == case["spec_after"] == [None, "model"], (name, case)
    assert report["subcenter"]["shard_shapes"] == [[8, 8]]  # (8, 16 classes x 2 sub-centers) over 4 devices


def test_partial_fc_v1_class_sharded_on_four_jax_devices_matches_one_device():
    report = _sharded_report([("partial_fc_v1", (2, 2)), ("partial_fc_v1_uneven", (2, 2)),
                              ("partial_fc_v1_class_major", (2, 2))])
    for name in ("partial_fc_v1", "partial_fc_v1_uneven", "partial_fc_v1_class_major"):
        case = report[name]
        assert case["steps"] == 3 and case["loss"] <= 1e-5 and case["weights"] <= 1e-5, (name, case)
        class_major = name.endswith("class_major")
        spec = ["model", None] if class_major else [None, "model"]
        assert case["spec_before"] == case["spec_after"] == spec, (name, case)
        # (8, 64), or (64, 8) class-major, over the 2 class shards
        assert case["shard_shapes"] == ([[32, 8]] if class_major else [[8, 32]]), (name, case)


_MIRRORED = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
""" + _MODELS + """
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
report = {}
for name in NAMES:
    # Keras runs tf.distribute without XLA (jit_compile="auto" resolves to False there): TF's XLA cannot
    # reach the replicas' variables on other devices.
    for jit_compile in (False,):
        keras.utils.set_random_seed(0)
        model, loss, data = CASES[name]()
        initial = model.get_weights()
        single = train(model, loss, data, jit_compile)
        with strategy.scope():
            mirrored, loss, data = CASES[name]()
            mirrored.set_weights(initial)
        report[f"{name}, jit={jit_compile}"] = differences(single, train(mirrored, loss, data, jit_compile))
print(json.dumps(report))
"""


def _mirrored_report(names):
    return _run(f"NAMES = {names!r}\n" + _MIRRORED, {"KERAS_BACKEND": "tensorflow"})


def test_label_aware_and_fused_heads_under_tf_mirrored_strategy_match_one_device():
    report = _mirrored_report(["label_aware", "fused_chunked"])
    assert len(report) == 2
    for name, case in report.items():
        assert case["steps"] == 3, (name, case)
        assert case["loss"] <= 1e-5 and case["weights"] <= 1e-5, (name, case)


def test_cosine_path_loss_under_tf_mirrored_strategy_matches_one_device():
    report = _mirrored_report(["cosine_path"])
    for name, case in report.items():
        assert case["steps"] == 3, (name, case)
        assert case["loss"] <= 1e-5 and case["weights"] <= 1e-5, (name, case)


def test_sharded_head_example_prints_per_device_kernel_slices():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("KERAS_BACKEND", None)
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "sharded_head.py"), "--classes", "1024",
                             "--dim", "16", "--steps", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert "kernel (16, 1024) sharded as P(None, 'model')" in lines[0], lines
    assert all(f"cpu:{i}: kernel slice (16, 256), classes {256 * i}..{256 * i + 255}" in lines[1 + i]
               for i in range(4)), lines


def test_head_layout_map_names_each_head_kernel_and_checks_the_mesh():
    script = """
import json, keras
import keras_margin as km
from keras_margin.distribution import head_layout_map
devices = keras.distribution.list_devices()
mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"), devices)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="embedding"),
                          km.AMSoftmaxHead(6, name="head")], name="net")
layout_map = head_layout_map(model, mesh)
errors = []
for bad in (lambda: head_layout_map(model, mesh, class_axis="classes"),
            lambda: head_layout_map(keras.Sequential([keras.Input((4,)), km.AMSoftmaxHead(7)]), mesh),
            lambda: head_layout_map(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]), mesh)):
    try:
        bad()
    except ValueError as error:
        errors.append(str(error))
print(json.dumps({"kernel": list(layout_map["net/head/kernel"].axes),
                  "dense": layout_map["net/embedding/kernel"] is None, "errors": errors}))
"""
    report = _run(script, {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert report["kernel"] == [None, "model"] and report["dense"]
    assert len(report["errors"]) == 3
    assert "`class_axis` 'classes' is not an axis of the mesh" in report["errors"][0]
    assert "7 classes, not a multiple of the 2 devices" in report["errors"][1]
    assert "has no built margin head" in report["errors"][2]
