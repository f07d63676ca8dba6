"""NormFace's agent nets (happynear/NormFace ``prototxt/``) convert in TEST and TRAIN.

TEST: InnerDistance (own normalised blob, or Parameter -> Normalize as second bottom) and the two-bottom
InnerProduct compute what the fork's C++ computes. TRAIN: the agent chains become keras_margin heads whose
``HeadSpec`` names the objective; its value is checked against NumPy transcriptions of the fork's
GeneralContrastiveLoss / GeneralTripletLoss / SoftmaxWithLoss forward, and one XLA training step runs.
The published files are shrunk (10572 classes -> 7, 512 dims -> 8) with their layer structure verbatim.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from converters.caffe import ConversionError, convert, schema
from tests.caffe_nets import SHARED, shared_missing, write_net

_FIELDS = schema.LayerParameter.DESCRIPTOR.fields_by_name
if not all(name in _FIELDS for name in ("inner_distance_param", "general_contrastive_loss_param",
                                        "general_triplet_loss_param")):
    pytest.skip("converters/caffe/schema.py lacks the fork's inner_distance_param / general_contrastive_loss_param "
                "/ general_triplet_loss_param (field numbers 213, 215, 217)", allow_module_level=True)

REAL = SHARED / "caffe" / "real"
CLASSES, DIM, BATCH = 7, 8, 6
EPS = 1e-6  # the fork's CPU eps: Normalize and InnerDistance normalize: true (sum_sq + 1e-6)


def _published(name: str) -> str:
    path = REAL / f"happynear_NormFace__prototxt__{name}.prototxt"
    if not path.exists():
        pytest.skip(shared_missing(path, "the published NormFace prototxts"))
    text = path.read_text().replace("10572", str(CLASSES)).replace("dim: 512", f"dim: {DIM}")
    return ('layer { name: "features" type: "Input" top: "last_ip_layer" '
            f'input_param {{ shape {{ dim: {BATCH} dim: {DIM} }} }} }}\n' + text)


# ---- NumPy transcriptions of the fork's C++ (happynear/caffe-windows, branch ms) -------------------------


def np_normalize(x: np.ndarray) -> np.ndarray:
    """normalize_layer.cpp (CPU, L2): each row / sqrt(sum x^2 + 1e-6)."""
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.sum(x * x, axis=1, keepdims=True) + EPS)


def np_inner_distance(x: np.ndarray, weight: np.ndarray, normalize: bool, kind: str = "L2") -> np.ndarray:
    """inner_distance_layer.cpp Forward_cpu: optional in-place row renormalisation, then the triple loop."""
    weight = np.asarray(weight, np.float64).copy()
    if normalize:
        for n in range(weight.shape[0]):
            weight[n] *= 1.0 / np.sqrt(np.dot(weight[n], weight[n]) + EPS)
    top = np.zeros((x.shape[0], weight.shape[0]))
    for m in range(x.shape[0]):
        for n in range(weight.shape[0]):
            diff = np.asarray(x[m], np.float64) - weight[n]
            top[m, n] = np.sum(diff * diff) if kind == "L2" else np.sum(np.abs(diff))
    return top


def np_general_contrastive(dist: np.ndarray, label: np.ndarray, positive_margin=0.0, negative_margin=1.0,
                           positive_weight=1.0, negative_weight=1.0, positive_outlier_thresh=4.0) -> float:
    """general_constrastive_loss_layer.cpp Forward_cpu (no max_*_only, positive_first, exp or intra_mae)."""
    num, dim = dist.shape
    diff = np.zeros_like(dist)
    for i in range(num):
        for j in range(dim):
            if j == int(label[i]):
                diff[i, j] = min(positive_outlier_thresh, max(0.0, dist[i, j] - positive_margin)) * positive_weight
            elif dist[i, j] < negative_margin:
                diff[i, j] = max(0.0, negative_margin - dist[i, j]) * negative_weight
    return float(np.sum(np.abs(diff)) / num)


def np_general_triplet(dist: np.ndarray, label: np.ndarray, margin=0.8, hardest_only=True,
                       negative_weight=1.0) -> float:
    """general_triplet_loss_layer.cpp Forward_cpu (positive_first off)."""
    num, dim = dist.shape
    diff = np.zeros_like(dist)
    for i in range(num):
        y = int(label[i])
        same = dist[i, y]
        hardest = -1
        for j in range(dim):
            if j != y:
                diff[i, j] = max(0.0, same + margin - dist[i, j]) * negative_weight
                if hardest_only and diff[i, j] > 0 and (hardest < 0 or diff[i, j] > diff[i, hardest]):
                    hardest = j
        if hardest_only and hardest >= 0:
            for j in range(dim):
                if j != y and j != hardest:
                    diff[i, j] = 0.0
    return float(np.sum(np.abs(diff)) / num)


def np_softmax_loss(logits: np.ndarray, label: np.ndarray) -> float:
    """softmax_loss_layer.cpp: mean over the batch of -log softmax(logits)_y (normalization VALID)."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))
    return float(-np.mean(log_p[np.arange(len(label)), label.astype(int)]))


# ---- fixtures -------------------------------------------------------------------------------------------------


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, DIM)).astype(np.float32)
    y = np.arange(BATCH) % CLASSES
    return x, y


def _matrix(seed):
    return np.random.default_rng(seed).normal(size=(CLASSES, DIM)).astype(np.float32) * 1.7


def _convert(tmp_path, text, blobs, phase):
    prototxt, caffemodel = write_net(tmp_path, text, blobs)
    return convert(prototxt, caffemodel, phase=phase)


def _run(model, *inputs):
    out = model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)
    return [np.asarray(o, np.float64) for o in out] if isinstance(out, (list, tuple)) else np.asarray(out, np.float64)


def _one_xla_step(model, loss, inputs, target) -> None:
    before = [np.array(w) for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, jit_compile=True)
    history = model.fit(inputs, target, epochs=1, batch_size=BATCH, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.allclose(b, np.array(w)) for b, w in zip(before, model.trainable_weights))


# ---- TEST phase -----------------------------------------------------------------------------------------------


def test_contrastive_net_test_phase_is_the_fork_inner_distance(tmp_path):
    weight = _matrix(1)
    conversion = _convert(tmp_path, _published("normalized_Euclidean_contrastive"),
                          {"normalized_Euclidean": [weight]}, "TEST")
    x, _ = _data()
    expected = np_inner_distance(np_normalize(x), weight, normalize=True)
    np.testing.assert_allclose(_run(conversion.model, x), expected, atol=2e-5)
    assert conversion.heads == []


def test_triplet_net_test_phase_parameter_normalize_second_bottom(tmp_path):
    agents = _matrix(2)
    conversion = _convert(tmp_path, _published("normalized_Euclidean_triplet"), {"id_weight_l2": [agents]}, "TEST")
    x, _ = _data()
    expected = np_inner_distance(np_normalize(x), np_normalize(agents), normalize=False)
    np.testing.assert_allclose(_run(conversion.model, x), expected, atol=2e-5)
    assert any("Parameter 'id_weight_l2'" in line for line in conversion.plan.fusions)


def test_combined_net_test_phase_distances_and_scaled_cosines(tmp_path):
    agents, weight = _matrix(3), _matrix(4)
    blobs = {"id_weight_l2": [agents], "id_weight_ip": [weight], "cosine_scale": [np.array([3.5], np.float32)]}
    conversion = _convert(tmp_path, _published("combine_softmax_contrastive"), blobs, "TEST")
    x, _ = _data()
    outputs = dict(zip([blob.split("#")[0] for blob in conversion.plan.outputs], _run(conversion.model, x)))
    feature = np_normalize(x)
    np.testing.assert_allclose(outputs["euclidean"], np_inner_distance(feature, np_normalize(agents), False),
                               atol=2e-5)
    np.testing.assert_allclose(outputs["cosine"], 3.5 * feature @ np_normalize(weight).T, atol=2e-5)


# ---- TRAIN phase ----------------------------------------------------------------------------------------------


def _distances_from_cosines(cos):
    return 2.0 - 2.0 * cos  # HeadSpec.reference kind "distance_from_cosine"


def test_contrastive_net_train_phase_is_a_cosine_head_with_c_contrastive(tmp_path):
    weight = _matrix(5)
    conversion = _convert(tmp_path, _published("normalized_Euclidean_contrastive"),
                          {"normalized_Euclidean": [weight]}, "TRAIN")
    (spec,) = conversion.heads
    assert (spec.head_class, spec.loss, spec.loss_options) == ("CosineDense", "CContrastiveLoss", {"margin": 1.0})
    assert spec.reference["kind"] == "distance_from_cosine"
    x, y = _data(1)
    dist = np_inner_distance(np_normalize(x), weight, normalize=True)
    cos = _run(conversion.model, x)
    np.testing.assert_allclose(_distances_from_cosines(cos), dist, atol=2e-5)
    head = conversion.model.layers[-1]
    loss = spec.training_loss(head)
    assert float(loss(y, cos.astype(np.float32))) == pytest.approx(np_general_contrastive(dist, y), abs=2e-5)
    _one_xla_step(conversion.model, loss, x, y)


def test_triplet_net_train_phase_is_a_cosine_head_with_c_triplet(tmp_path):
    agents = _matrix(6)
    conversion = _convert(tmp_path, _published("normalized_Euclidean_triplet"), {"id_weight_l2": [agents]}, "TRAIN")
    (spec,) = conversion.heads
    assert (spec.head_class, spec.layer, spec.loss) == ("CosineDense", "id_weight_l2", "CTripletLoss")
    assert spec.loss_options == {"margin": 0.8, "center": True}
    x, y = _data(2)
    dist = np_inner_distance(np_normalize(x), np_normalize(agents), normalize=False)
    cos = _run(conversion.model, x)
    np.testing.assert_allclose(_distances_from_cosines(cos), dist, atol=2e-5)
    loss = spec.training_loss(conversion.model.layers[-1])
    assert float(loss(y, cos.astype(np.float32))) == pytest.approx(np_general_triplet(dist, y), abs=2e-5)
    _one_xla_step(conversion.model, loss, x, y)


def test_combined_net_train_phase_is_normface_contrastive_head(tmp_path):
    agents, weight = _matrix(7), _matrix(8)
    blobs = {"id_weight_l2": [agents], "id_weight_ip": [weight], "cosine_scale": [np.array([3.5], np.float32)]}
    conversion = _convert(tmp_path, _published("combine_softmax_contrastive"), blobs, "TRAIN")
    (spec,) = conversion.heads
    assert spec.head_class == "NormFaceContrastiveHead" and spec.loss == "add_loss"
    assert {k: spec.options[k] for k in ("s", "learn_scale", "scale_min", "margin", "agent_weight")} == {
        "s": 3.5, "learn_scale": True, "scale_min": None, "margin": 1.0, "agent_weight": pytest.approx(0.01)}
    model = conversion.model
    assert len(model.inputs) == 2  # [features, labels]
    x, y = _data(3)
    per_sample = _run(model, x, y.astype(np.int32))
    feature = np_normalize(x)
    dist = np_inner_distance(feature, np_normalize(agents), normalize=False)
    expected = np_softmax_loss(3.5 * feature @ np_normalize(weight).T, y) + 0.01 * np_general_contrastive(dist, y)
    assert float(np.mean(per_sample)) == pytest.approx(expected, abs=2e-5)
    head = model.layers[-1]
    assert spec.training_loss(head) is None
    scale_before = float(np.asarray(head.scale_weight))
    _one_xla_step(model, None, [x, y.astype(np.int32)], None)
    assert float(np.asarray(head.scale_weight)) != scale_before  # s is learned (Scale filler 4, no lr_mult 0)


# ---- settings keras_margin does not implement, literal layers ---------------------------------------------


def test_unimplemented_loss_settings_warn_and_convert_literally(tmp_path):
    text = _published("normalized_Euclidean_contrastive").replace("exp_negative_weight: false",
                                                                 "max_negative_only: true")
    weight = _matrix(9)
    conversion = _convert(tmp_path, text, {"normalized_Euclidean": [weight]}, "TRAIN")
    assert conversion.heads == []
    assert any("max_negative_only: true" in warning for warning in conversion.warnings)
    x, _ = _data(4)
    np.testing.assert_allclose(_run(conversion.model, x), np_inner_distance(np_normalize(x), weight, True), atol=2e-5)

    text = _published("normalized_Euclidean_triplet").replace("hardest_only: true", "hardest_only: false")
    conversion = _convert(tmp_path, text, {"id_weight_l2": [_matrix(10)]}, "TRAIN")
    assert conversion.heads == [] and any("hardest_only: false" in w for w in conversion.warnings)


def test_inner_distance_l1_transpose_reads_the_blob_as_rows(tmp_path):
    text = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 3 dim: 4 } } }\n'
            'layer { name: "d" type: "InnerDistance" bottom: "x" top: "d" '
            '  inner_distance_param { num_output: 5 distance_type: "L1" transpose: true bias_term: false } }\n')
    blob = np.random.default_rng(11).normal(size=(4, 5)).astype(np.float32)  # stored (K, N)
    conversion = _convert(tmp_path, text, {"d": [blob]}, "TEST")
    x = np.random.default_rng(12).normal(size=(3, 4)).astype(np.float32)
    # the fork's forward ignores transpose (its TODO): the memory is read as (N, K) rows
    expected = np_inner_distance(x, blob.reshape(5, 4), normalize=False, kind="L1")
    np.testing.assert_allclose(_run(conversion.model, x), expected, atol=1e-5)


def test_parameter_read_by_another_layer_is_refused(tmp_path):
    text = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 3 dim: 4 } } }\n'
            'layer { name: "agents" type: "Parameter" top: "agents" parameter_param { shape { dim: 5 dim: 4 } } }\n'
            'layer { name: "d" type: "InnerDistance" bottom: "x" bottom: "agents" top: "d" }\n'
            'layer { name: "e" type: "InnerProduct" bottom: "x" bottom: "agents" top: "e" '
            '  inner_product_param { bias_term: false } }\n')
    with pytest.raises(ConversionError, match="agents"):
        _convert(tmp_path, text, None, "TEST")


def test_converted_agent_model_reloads(tmp_path):
    weight = _matrix(13)
    conversion = _convert(tmp_path, _published("normalized_Euclidean_contrastive"),
                          {"normalized_Euclidean": [weight]}, "TEST")
    path = tmp_path / "agents.keras"
    conversion.model.save(path)
    reloaded = keras.saving.load_model(path)
    x, _ = _data(5)
    np.testing.assert_allclose(_run(reloaded, x), _run(conversion.model, x), atol=1e-6)


def test_literal_inner_distance_trains_with_hard_normalisation(tmp_path):
    """normalize: true: the forward uses unit agents and they stay unit after an update (the fork renormalises
    the blob in place before each forward)."""
    weight = _matrix(14)
    conversion = _convert(tmp_path, _published("normalized_Euclidean_contrastive"),
                          {"normalized_Euclidean": [weight]}, "TEST")
    model = conversion.model
    x, _ = _data(6)
    _one_xla_step(model, "mse", x, np.zeros((BATCH, CLASSES), np.float32))
    kernel = np.asarray(model.layers[-1].kernel, np.float64)
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1.0, atol=1e-5)
    expected = np_inner_distance(np_normalize(x), kernel.T, normalize=True)
    np.testing.assert_allclose(_run(model, x), expected, atol=2e-5)


def test_combined_train_head_reads_the_nets_float_label_blob(tmp_path):
    text = _published("combine_softmax_contrastive").replace(
        f'top: "last_ip_layer" input_param {{ shape {{ dim: {BATCH} dim: {DIM} }} }}',
        f'top: "last_ip_layer" top: "label" input_param {{ shape {{ dim: {BATCH} dim: {DIM} }} shape {{ dim: {BATCH} }} }}')
    agents, weight = _matrix(15), _matrix(16)
    blobs = {"id_weight_l2": [agents], "id_weight_ip": [weight], "cosine_scale": [np.array([4.0], np.float32)]}
    model = _convert(tmp_path, text, blobs, "TRAIN").model
    assert len(model.inputs) == 2
    x, y = _data(7)
    per_sample = _run(model, x, y.astype(np.float32))  # Caffe label blobs hold float class ids
    feature = np_normalize(x)
    dist = np_inner_distance(feature, np_normalize(agents), normalize=False)
    expected = np_softmax_loss(4.0 * feature @ np_normalize(weight).T, y) + 0.01 * np_general_contrastive(dist, y)
    assert float(np.mean(per_sample)) == pytest.approx(expected, abs=2e-5)
