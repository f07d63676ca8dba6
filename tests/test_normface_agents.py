"""NormFace's agent objectives (C-contrastive, C-triplet with and without the center pull) against a NumPy
transcription of the paper's Eqs. 10-11 and the Caffe layers' gradients, written with explicit loops here.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_margin import NormFaceHead
from keras_margin.losses import CContrastiveLoss, CTripletLoss
from keras_margin.margins.normface_agents import c_contrastive, c_triplet
from tests.numpy_reference import central_difference
from tests.test_losses_reference import as_numpy, gradient_wrt_cos

pytestmark = pytest.mark.backend_agnostic


# ----------------------------------------------------------------------------------------------------------
# The reference: loops over samples and agents, float64.
# ----------------------------------------------------------------------------------------------------------
def reference_c_contrastive(cos, labels, margin):
    out = np.zeros(len(labels))
    for i, y in enumerate(labels):
        for j in range(cos.shape[1]):
            distance = 2.0 - 2.0 * cos[i, j]
            out[i] += distance if j == y else max(0.0, margin - distance)
    return out


def reference_c_contrastive_grad(cos, labels, margin):
    """d sum_i L_i / d cos: -2 on the target, +2 on each negative whose hinge is active."""
    grad = np.zeros_like(cos)
    for i, y in enumerate(labels):
        for j in range(cos.shape[1]):
            distance = 2.0 - 2.0 * cos[i, j]
            grad[i, j] = -2.0 if j == y else (2.0 if margin - distance > 0 else 0.0)
    return grad


def _nearest_negative(cos, i, y):
    best, best_j = np.inf, None
    for j in range(cos.shape[1]):
        if j != y and 2.0 - 2.0 * cos[i, j] < best:
            best, best_j = 2.0 - 2.0 * cos[i, j], j
    return best, best_j


def reference_c_triplet(cos, labels, margin):
    out = np.zeros(len(labels))
    for i, y in enumerate(labels):
        negative, _ = _nearest_negative(cos, i, y)
        out[i] = max(0.0, margin + (2.0 - 2.0 * cos[i, y]) - negative)
    return out


def reference_c_triplet_grad(cos, labels, margin, center):
    """The Caffe layer's gradient w.r.t. cos: the hinge's, plus the always-on pull with add_center_loss."""
    grad = np.zeros_like(cos)
    for i, y in enumerate(labels):
        negative, k = _nearest_negative(cos, i, y)
        active = margin + (2.0 - 2.0 * cos[i, y]) - negative > 0
        if active or center:
            grad[i, y] = -2.0
        if active:
            grad[i, k] = 2.0
    return grad


def _inputs(seed=0, batch=6, classes=7):
    """Negatives' cosines in [-0.95, 0.3], targets' from -0.5 to 0.95: hinges on both sides of their kinks."""
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-0.95, 0.3, size=(batch, classes))
    labels = rng.integers(0, classes, size=batch)
    # Spread: some samples near their agent (inactive hinges), some far.
    cos[np.arange(batch), labels] = np.linspace(-0.5, 0.9, batch)
    return cos.astype(np.float32).astype(np.float64), labels.astype(np.int32)


def _away_from_kinks(cos, labels, margin, kind, gap=1e-3):
    """Check that no hinge sits within ``gap`` of its kink, so finite differences are valid."""
    distances = 2.0 - 2.0 * cos
    if kind == "contrastive":
        mask = np.ones_like(cos, bool)
        mask[np.arange(len(labels)), labels] = False
        return np.all(np.abs(margin - distances[mask]) > gap)
    values = [margin + distances[i, y] - _nearest_negative(cos, i, y)[0] for i, y in enumerate(labels)]
    return np.all(np.abs(values) > gap)


@pytest.mark.parametrize("margin", [0.0, 0.5, 1.0, 2.5])
def test_c_contrastive_value(margin):
    cos, labels = _inputs()
    got = as_numpy(c_contrastive(cos.astype("float32"), labels, margin))
    np.testing.assert_allclose(got, reference_c_contrastive(cos, labels, margin), rtol=1e-5, atol=1e-5)


def test_c_contrastive_margin_zero_is_the_normalized_center_pull():
    cos, labels = _inputs(seed=3)
    got = as_numpy(c_contrastive(cos.astype("float32"), labels, 0.0))
    np.testing.assert_allclose(got, 2.0 - 2.0 * cos[np.arange(len(labels)), labels], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("margin", [0.5, 1.0, 2.5])
def test_c_contrastive_gradient_is_exact(margin):
    cos, labels = _inputs(seed=1)
    assert _away_from_kinks(cos, labels, margin, "contrastive")
    got = gradient_wrt_cos(lambda y, c: ops.sum(c_contrastive(c, y, margin)), labels, cos)
    np.testing.assert_allclose(got, reference_c_contrastive_grad(cos, labels, margin), atol=1e-6)
    numeric = central_difference(lambda c: reference_c_contrastive(c, labels, margin).sum(), cos)
    np.testing.assert_allclose(got, numeric, atol=1e-5)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("margin", [0.2, 0.8, 1.2])
def test_c_triplet_value_is_the_hinge_in_both_modes(margin, center):
    cos, labels = _inputs(seed=2)
    got = as_numpy(c_triplet(cos.astype("float32"), labels, margin, center))
    np.testing.assert_allclose(got, reference_c_triplet(cos, labels, margin), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("margin", [0.2, 0.8, 1.2])
def test_c_triplet_gradient_matches_the_caffe_layer(margin, center):
    cos, labels = _inputs(seed=2)
    assert _away_from_kinks(cos, labels, margin, "triplet")
    reference = reference_c_triplet_grad(cos, labels, margin, center)
    active = reference_c_triplet(cos, labels, margin) > 0
    assert active.any() and (~active).any(), "the inputs must have active and inactive hinges"
    got = gradient_wrt_cos(lambda y, c: ops.sum(c_triplet(c, y, margin, center)), labels, cos)
    np.testing.assert_allclose(got, reference, atol=1e-6)
    if not center:  # the plain hinge: its gradient is the derivative of the value
        numeric = central_difference(lambda c: reference_c_triplet(c, labels, margin).sum(), cos)
        np.testing.assert_allclose(got, numeric, atol=1e-5)


def test_c_triplet_center_pulls_samples_whose_hinge_is_inactive():
    # One sample at its agent (D_y = 0), negatives far: the hinge is 0, the center pull still acts.
    cos = np.array([[1.0, -0.5, -0.2]], np.float32)
    labels = np.array([0], np.int32)
    with_center = gradient_wrt_cos(lambda y, c: ops.sum(c_triplet(c, y, 0.8, True)), labels, cos)
    without = gradient_wrt_cos(lambda y, c: ops.sum(c_triplet(c, y, 0.8, False)), labels, cos)
    np.testing.assert_allclose(with_center, [[-2.0, 0.0, 0.0]])
    np.testing.assert_allclose(without, [[0.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------------------------------------
# The loss classes: what model.compile takes.
# ----------------------------------------------------------------------------------------------------------
LOSSES = {
    "c_contrastive": (lambda: CContrastiveLoss(margin=1.0), lambda c, y: reference_c_contrastive(c, y, 1.0)),
    "c_triplet": (lambda: CTripletLoss(margin=0.8), lambda c, y: reference_c_triplet(c, y, 0.8)),
    "c_triplet_plain": (lambda: CTripletLoss(margin=0.8, center=False), lambda c, y: reference_c_triplet(c, y, 0.8)),
}


@pytest.mark.parametrize("name", LOSSES)
def test_loss_class_mean_matches_reference_for_sparse_and_one_hot_labels(name):
    make, reference = LOSSES[name]
    cos, labels = _inputs(seed=4)
    want = reference(cos, labels).mean()
    sparse = float(make()(labels, cos.astype("float32")))
    one_hot = float(make()(np.eye(cos.shape[1], dtype="float32")[labels], cos.astype("float32")))
    np.testing.assert_allclose([sparse, one_hot], [want, want], rtol=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_loss_class_config_round_trip(name):
    loss = LOSSES[name][0]()
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss) and restored.get_config() == loss.get_config()


def test_out_of_range_ids_are_refused_eagerly():
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 3\)"):
        CContrastiveLoss()(np.array([3]), np.zeros((1, 3), "float32"))


@pytest.mark.parametrize("bad", [dict(margin=-0.1), dict(margin=5.0), dict(center=1)])
def test_bad_hyper_parameters_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        CTripletLoss(**bad)


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("name", LOSSES)
def test_training_on_a_separable_problem_converges_under_xla(name, precision, tmp_path):
    keras.mixed_precision.set_global_policy(precision)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)) * 3
    y = rng.integers(0, 4, size=256)
    x = (centers[y] + rng.normal(size=(256, 8)) * 0.3).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8), NormFaceHead(4)])
    model.compile(keras.optimizers.Adam(0.05), loss=LOSSES[name][0](), metrics=["sparse_categorical_accuracy"],
                  jit_compile=True)
    first = model.evaluate(x, y, verbose=0)[0]
    history = model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["loss"][-1] < first
    assert history.history["sparse_categorical_accuracy"][-1] > 0.95  # argmax cosine = nearest agent
    path = tmp_path / "agents.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored.loss) is type(model.loss) and restored.loss.get_config() == model.loss.get_config()
