"""Heads and losses survive get_config/from_config and a .keras save/load round trip."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_margin as km
from keras_margin import losses

pytestmark = pytest.mark.backend_agnostic

HEADS = [
    lambda: km.CosineDense(6),
    lambda: km.NormFaceHead(6, s=12.0, learn_scale=True),
    lambda: km.SphereFaceHead(6, m=3, base=500.0, gamma=0.1, power=2.0, lambda_min=3.0, s=20.0),
    lambda: km.AMSoftmaxHead(6, s=25.0, m=0.3),
    lambda: km.X2SoftmaxHead(6, s=32.0, a=-0.7, h=0.1, k=0.7, straight_through=True),
    lambda: km.ArcFaceHead(6, s=48.0, m=0.4),
]
LOSSES = [
    lambda: losses.NormFaceLoss(s=12.0),
    lambda: losses.SphereFaceLoss(m=2, s=20.0, lambda_=1.5),
    lambda: losses.AMSoftmaxLoss(s=25.0, m=0.3, reduction="sum"),
    lambda: losses.X2SoftmaxLoss(s=32.0, a=-0.7, h=0.1, k=0.7, straight_through=True),
    lambda: losses.ArcFaceLoss(s=48.0, m=0.4, name="my_arcface"),
    lambda: losses.CombinedMarginLoss(s=40.0, m1=1.0, m2=0.3, m3=0.2),
]


@pytest.mark.parametrize("factory", HEADS)
def test_head_config_round_trip(factory):
    head = factory()
    clone = type(head).from_config(head.get_config())
    assert clone.get_config() == head.get_config()


@pytest.mark.parametrize("factory", LOSSES)
def test_loss_serialization_round_trip(factory):
    loss = factory()
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(clone) is type(loss)
    assert clone.get_config() == loss.get_config()
    rng = np.random.default_rng(0)
    cos = rng.uniform(-1, 1, size=(5, 6)).astype("float32")
    y = rng.integers(0, 6, size=5)
    np.testing.assert_array_equal(ops.convert_to_numpy(loss(y, cos)), ops.convert_to_numpy(clone(y, cos)))


@pytest.mark.parametrize("factory", HEADS[1:])
def test_saved_model_reproduces_outputs_and_loss(factory, tmp_path):
    head = factory()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5)])
    model.add(head)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True) if getattr(head, "learn_scale", False) \
        else head.loss
    if isinstance(head, km.NormFaceHead) and head.learn_scale:
        head.scale_weight.assign(9.5)
    model.compile("sgd", loss=loss)
    x = np.random.default_rng(1).normal(size=(3, 4)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)  # no custom_objects: the classes are registered
    np.testing.assert_array_equal(ops.convert_to_numpy(model(x)), ops.convert_to_numpy(reloaded(x)))
    assert type(reloaded.layers[-1]) is type(head)
    assert reloaded.layers[-1].get_config() == head.get_config()
    assert type(reloaded.loss) is type(loss)
    for original, restored in zip(head.weights, reloaded.layers[-1].weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(original), ops.convert_to_numpy(restored))


def test_sphereface_iteration_survives_save_and_load(tmp_path):
    x_in, y_in = keras.Input((4,)), keras.Input((), dtype="int32")
    head = km.SphereFaceHead(6)
    model = keras.Model([x_in, y_in], head([keras.layers.Dense(5)(x_in), y_in]))
    x = np.random.default_rng(2).normal(size=(3, 4)).astype("float32")
    y = np.array([0, 3, 5])
    for _ in range(7):
        model([x, y], training=True)
    assert int(ops.convert_to_numpy(head.iteration)) == 7
    assert "iteration" in head.iteration.path
    model.save(tmp_path / "sphere.keras")
    reloaded = keras.models.load_model(tmp_path / "sphere.keras")
    restored = [layer for layer in reloaded.layers if isinstance(layer, km.SphereFaceHead)][0]
    assert int(ops.convert_to_numpy(restored.iteration)) == 7
    np.testing.assert_array_equal(ops.convert_to_numpy(model([x, y], training=True)),
                                  ops.convert_to_numpy(reloaded([x, y], training=True)))
    assert int(ops.convert_to_numpy(restored.iteration)) == 8


@pytest.mark.parametrize("factory", LOSSES)
def test_loss_attributes_survive_serialization_and_model_save(factory, tmp_path):
    loss = factory()
    names = list(loss.hyper_parameters)
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert {name: getattr(clone, name) for name in names} == {name: getattr(loss, name) for name in names}
    model = keras.Sequential([keras.Input((4,)), km.CosineDense(6)])
    model.compile("sgd", loss=loss)
    model.save(tmp_path / "m.keras")
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(reloaded.loss) is type(loss)
    assert {name: getattr(reloaded.loss, name) for name in names} == loss.hyper_parameters
    assert reloaded.loss.get_config() == loss.get_config()
