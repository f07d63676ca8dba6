"""Heads: cosine output, label-aware logits against the cosine-path loss and NumPy, SphereFace's schedule."""

import math

import keras
import numpy as np
import pytest
from keras import ops

import keras_margin as km
from tests import numpy_reference as ref  # float64, psi through arccos (not the Chebyshev route)

pytestmark = pytest.mark.backend_agnostic

B, D, C = 12, 6, 7


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, D)).astype("float32") * 3.0
    y = rng.integers(0, C, size=B).astype("int32")
    return x, y


def _built(head):
    x, _ = _data()
    head(x)
    return head


def test_cosine_dense_equals_numpy_cosines():
    x, _ = _data()
    layer = km.CosineDense(C)
    cos = ops.convert_to_numpy(layer(x))
    kernel = ops.convert_to_numpy(layer.kernel)
    expected = ref.cosine(x.astype(np.float64), kernel.astype(np.float64))
    np.testing.assert_allclose(cos, expected, atol=2e-6)
    assert cos.dtype == np.float32


@pytest.mark.parametrize("head_cls", [km.NormFaceHead, km.SphereFaceHead, km.AMSoftmaxHead,
                                      km.X2SoftmaxHead, km.ArcFaceHead])
def test_head_on_embeddings_outputs_cosines(head_cls):
    x, _ = _data()
    head = head_cls(C)
    cos = ops.convert_to_numpy(head(x))
    expected = ref.cosine(x.astype(np.float64), ops.convert_to_numpy(head.kernel).astype(np.float64))
    np.testing.assert_allclose(cos, expected, atol=2e-6)


@pytest.mark.parametrize(
    "head",
    [
        lambda: km.NormFaceHead(C, s=16.0),
        lambda: km.AMSoftmaxHead(C, s=30.0, m=0.35),
        lambda: km.ArcFaceHead(C, s=64.0, m=0.5),
        lambda: km.X2SoftmaxHead(C),
        lambda: km.X2SoftmaxHead(C, s=32.0, a=-0.6, h=0.2, k=0.8),
    ],
    ids=["normface", "amsoftmax", "arcface", "x2softmax", "x2softmax-h"],
)
def test_label_aware_head_matches_its_cosine_path_loss(head):
    head = _built(head())
    x, y = _data()
    logits = head([x, y], training=True)
    from_logits = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(y, logits)
    from_cosines = head.loss.__class__(**head.loss.hyper_parameters, reduction=None)(y, head(x))
    np.testing.assert_allclose(ops.convert_to_numpy(from_logits), ops.convert_to_numpy(from_cosines),
                               rtol=1e-5, atol=1e-4)


def test_label_aware_inference_returns_logits_without_margin():
    head = _built(km.AMSoftmaxHead(C, s=30.0, m=0.35))
    x, y = _data()
    cos = ops.convert_to_numpy(head(x))
    for training in (False, None):
        logits = ops.convert_to_numpy(head([x, y], training=training))
        np.testing.assert_allclose(logits, 30.0 * cos, rtol=1e-6, atol=1e-5)


def test_amsoftmax_label_aware_logits_equal_numpy():
    head = _built(km.AMSoftmaxHead(C, s=30.0, m=0.35))
    x, y = _data()
    logits = ops.convert_to_numpy(head([x, y], training=True))
    cos = ref.cosine(x.astype(np.float64), ops.convert_to_numpy(head.kernel).astype(np.float64))
    expected = 30.0 * cos
    expected[np.arange(B), y] -= 30.0 * 0.35
    np.testing.assert_allclose(logits, expected, atol=5e-5)


def _caffe_lambda(iteration, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0):
    return max(lambda_min, base * (1.0 + gamma * iteration) ** (-power))


def test_sphereface_label_aware_is_the_caffe_layer_and_advances_iteration_first():
    head = _built(km.SphereFaceHead(C, m=4))
    x, y = _data()
    kernel = ops.convert_to_numpy(head.kernel).astype(np.float64)
    assert int(ops.convert_to_numpy(head.iteration)) == 0
    for step in (1, 2, 3):
        logits = ops.convert_to_numpy(head([x, y], training=True))
        assert int(ops.convert_to_numpy(head.iteration)) == step
        expected = ref.sphereface_caffe_logits(x.astype(np.float64), kernel, y, m=4,
                                               lam=_caffe_lambda(step))
        np.testing.assert_allclose(logits, expected, rtol=2e-5, atol=2e-4)
    # The first step used lambda(1) = 1000 / 1.12, as in Caffe.
    assert math.isclose(_caffe_lambda(1), 1000.0 / 1.12)


def test_sphereface_inference_does_not_advance_and_has_no_margin():
    head = _built(km.SphereFaceHead(C))
    x, y = _data()
    logits = ops.convert_to_numpy(head([x, y], training=False))
    assert int(ops.convert_to_numpy(head.iteration)) == 0
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    cos = ref.cosine(x.astype(np.float64), ops.convert_to_numpy(head.kernel).astype(np.float64))
    np.testing.assert_allclose(logits, norms * cos, rtol=1e-5, atol=1e-4)


def test_sphereface_lambda_floor_is_reached():
    head = _built(km.SphereFaceHead(C, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0))
    head.iteration.assign(10_000)
    assert math.isclose(float(ops.convert_to_numpy(head.current_lambda())), 5.0)


def test_sphereface_head_loss_is_feature_normalized_form_with_final_lambda():
    head = km.SphereFaceHead(C, m=3, lambda_min=2.0, s=20.0)
    loss = head.loss
    assert isinstance(loss, km.losses.SphereFaceLoss)
    assert loss.hyper_parameters == {"m": 3, "s": 20.0, "lambda_": 2.0}


def test_normface_learned_scale_is_trainable_and_used():
    head = _built(km.NormFaceHead(C, s=10.0, learn_scale=True))
    x, y = _data()
    assert any("scale" in w.path for w in head.trainable_weights)
    head.scale_weight.assign(7.0)
    cos = ops.convert_to_numpy(head(x))
    logits = ops.convert_to_numpy(head([x, y], training=True))
    np.testing.assert_allclose(logits, 7.0 * cos, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="learn_scale"):
        head.loss


@pytest.mark.parametrize("head_cls", [km.NormFaceHead, km.SphereFaceHead, km.AMSoftmaxHead,
                                      km.X2SoftmaxHead, km.ArcFaceHead])
def test_head_loss_carries_the_head_hyper_parameters(head_cls):
    head = head_cls(C, s=12.5)
    assert head.loss.hyper_parameters["s"] == 12.5
    for name in ("m", "a", "h", "k"):
        if hasattr(head, name) and name in head.loss.hyper_parameters:
            assert head.loss.hyper_parameters[name] == getattr(head, name)


def test_one_hot_labels_equal_sparse_in_label_aware_form():
    head = _built(km.ArcFaceHead(C))
    x, y = _data()
    sparse = ops.convert_to_numpy(head([x, y], training=True))
    one_hot = ops.convert_to_numpy(head([x, np.eye(C, dtype="float32")[y]], training=True))
    column = ops.convert_to_numpy(head([x, y[:, None]], training=True))
    np.testing.assert_array_equal(sparse, one_hot)
    np.testing.assert_array_equal(sparse, column)
