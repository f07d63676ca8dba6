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
    assert (loss.m, loss.s, loss.lambda_) == (3, 20.0, 2.0)


def test_normface_learned_scale_is_trainable_and_used():
    head = _built(km.NormFaceHead(C, s=10.0, learn_scale=True))
    x, y = _data()
    assert any("scale" in w.path for w in head.trainable_weights)
    head.scale_weight.assign(7.0)
    cos = ops.convert_to_numpy(head(x))
    logits = ops.convert_to_numpy(head([x, y], training=True))
    np.testing.assert_allclose(logits, 7.0 * cos, rtol=1e-6, atol=1e-5)
    # The cosine-path loss reads the learned scale: NumPy's softmax cross-entropy of 7 * cos.
    loss = head.loss
    assert isinstance(loss, km.losses.HeadLoss) and loss.get_head() is head
    z = 7.0 * cos.astype("float64")
    expected = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y])
    np.testing.assert_allclose(float(loss(y, head(x))), expected, rtol=1e-5)


@pytest.mark.parametrize("head_cls", [km.NormFaceHead, km.SphereFaceHead, km.AMSoftmaxHead,
                                      km.X2SoftmaxHead, km.ArcFaceHead])
def test_head_loss_carries_the_head_hyper_parameters(head_cls):
    head = head_cls(C, s=12.5)
    assert head.loss.hyper_parameters["s"] == 12.5
    assert head.loss.s == 12.5
    for name in ("m", "a", "h", "k", "straight_through"):
        if hasattr(head, name) and name in head.loss.hyper_parameters:
            assert head.loss.hyper_parameters[name] == getattr(head, name)
            assert getattr(head.loss, name) == getattr(head, name)


def test_one_hot_labels_equal_sparse_in_label_aware_form():
    head = _built(km.ArcFaceHead(C))
    x, y = _data()
    sparse = ops.convert_to_numpy(head([x, y], training=True))
    one_hot = ops.convert_to_numpy(head([x, np.eye(C, dtype="float32")[y]], training=True))
    column = ops.convert_to_numpy(head([x, y[:, None]], training=True))
    np.testing.assert_array_equal(sparse, one_hot)
    np.testing.assert_array_equal(sparse, column)


# --------------------------------------------------------------------------------------------------
# keras_margin._keras_private: the private Keras APIs, each exercised on the installed Keras.


def _nested_model():
    inner = keras.Sequential([keras.Input((D,)), keras.layers.Dense(4), km.AMSoftmaxHead(C, name="inner_head")],
                             name="inner")
    x_in = keras.Input((D,), name="pixels")
    return keras.Model(x_in, inner(keras.layers.Dense(D, name="pre")(x_in)), name="outer"), inner


def test_keras_private_flatten_layers():
    from keras_margin import _keras_private

    outer, inner = _nested_model()
    everything = _keras_private.flatten_layers(outer, include_self=True, recursive=True)
    assert everything[0] is outer and inner in everything
    assert any(layer.name == "inner_head" for layer in everything)
    top = _keras_private.flatten_layers(outer, include_self=False, recursive=False)
    assert outer not in top and inner in top and not any(layer.name == "inner_head" for layer in top)
    assert [h.name for h in km.distribution.margin_heads(outer)] == ["inner_head"]


def test_keras_private_graph_history_and_nodes():
    from keras_margin import _keras_private

    outer, inner = _nested_model()
    by_depth = _keras_private.nodes_by_depth(outer)
    operations = {node.operation.name for nodes in by_depth.values() for node in nodes}
    assert {"pixels", "pre", "inner"} <= operations
    sequential_nodes = _keras_private.nodes_by_depth(inner)  # a Sequential's graph is its _functional
    assert any(node.operation.name == "inner_head" for nodes in sequential_nodes.values() for node in nodes)
    assert max(depth for depth, nodes in sequential_nodes.items()
               if any(n.operation.name == "inner_head" for n in nodes)) == 0  # depth 0: the output nodes

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    assert _keras_private.nodes_by_depth(Subclassed()) is None
    operation, node_index, tensor_index = _keras_private.keras_history(outer.inputs[0])
    assert operation.name == "pixels" and tensor_index == 0
    assert _keras_private.keras_history(outer.outputs[0]).operation is inner
    pre = outer.get_layer("pre")
    history = _keras_private.keras_history(pre.output)
    node = _keras_private.inbound_nodes(history.operation)[history.node_index]
    assert node.operation is pre and node.input_tensors[0] is outer.inputs[0]


def test_keras_private_symbolic_scope_and_version():
    from keras_margin import _keras_private

    assert _keras_private.in_symbolic_scope() is False
    major_minor = tuple(int(v) for v in keras.__version__.split(".")[:2])
    assert tuple(int(v) for v in _keras_private.KERAS_VERSION_CHECKED.split(".")) <= major_minor
    assert _keras_private.KERAS_VERSION_CHECKED in _keras_private.__doc__


def test_private_keras_apis_only_in_keras_private():
    import pathlib

    import keras_margin

    root = pathlib.Path(keras_margin.__file__).parent
    private = ("keras.src", "._flatten_layers", "._nodes_by_depth", "._keras_history", "._inbound_nodes")
    # every module goes through _keras_private.
    offenders = [(str(path.relative_to(root)), name) for path in root.rglob("*.py")
                 if path.name != "_keras_private.py"
                 for name in private if name in path.read_text()]
    assert not offenders, offenders
