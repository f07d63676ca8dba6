"""All five heads train in a Sequential model under XLA, in float32 and both mixed-precision policies."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_margin as km

pytestmark = pytest.mark.backend_agnostic

NUM_CLASSES = 5


def _separable_problem(n_per_class=40, dim=10, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(NUM_CLASSES, dim)) * 3.0
    x = np.concatenate([c + rng.normal(size=(n_per_class, dim)) for c in centers]).astype("float32")
    y = np.repeat(np.arange(NUM_CLASSES), n_per_class).astype("int32")
    order = rng.permutation(len(y))
    return x[order], y[order]


# Scales sized for a 5-class toy problem; the margins are the objectives' own defaults or close to them.
HEADS = {
    "normface": lambda: km.NormFaceHead(NUM_CLASSES, s=10.0),
    "sphereface": lambda: km.SphereFaceHead(NUM_CLASSES, m=4, s=10.0),
    "amsoftmax": lambda: km.AMSoftmaxHead(NUM_CLASSES, s=10.0, m=0.35),
    "x2softmax": lambda: km.X2SoftmaxHead(NUM_CLASSES, s=10.0),
    "arcface": lambda: km.ArcFaceHead(NUM_CLASSES, s=10.0, m=0.5),
}


def _train(head_factory, policy):
    keras.mixed_precision.set_global_policy(policy)
    x, y = _separable_problem()
    head = head_factory()
    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(8)])
    model.add(head)
    model.compile(keras.optimizers.Adam(0.01), loss=head.loss, metrics=["sparse_categorical_accuracy"],
                  jit_compile=True)
    before = model.evaluate(x, y, verbose=0, return_dict=True)
    history = model.fit(x, y, epochs=12, batch_size=40, verbose=0)
    after = model.evaluate(x, y, verbose=0, return_dict=True)
    return model, history, before, after


# Convergence under XLA in float32 and float16 (the half type with the narrower range); bfloat16 training steps
# of every head and call form are tests/harness.py's (test_head_harness).
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
@pytest.mark.parametrize("name", list(HEADS))
def test_head_trains_in_sequential_under_xla(name, policy):
    model, history, before, after = _train(HEADS[name], policy)
    losses = history.history["loss"]
    assert all(np.isfinite(losses)), losses
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    assert after["sparse_categorical_accuracy"] >= 0.9, after
    assert after["sparse_categorical_accuracy"] > before["sparse_categorical_accuracy"]
    # Margins and cosines stay float32 under mixed precision.
    x, _ = _separable_problem(n_per_class=2)
    out = model(x)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert np.all(np.isfinite(ops.convert_to_numpy(out)))


@pytest.mark.parametrize("name", ["sphereface", "arcface"])
def test_label_aware_head_trains_in_functional_model_under_xla(name):
    x, y = _separable_problem()
    embeddings_in = keras.Input((x.shape[1],))
    labels_in = keras.Input((), dtype="int32")
    features = keras.layers.Dense(8)(keras.layers.Dense(16, activation="relu")(embeddings_in))
    head = {"sphereface": lambda: km.SphereFaceHead(NUM_CLASSES),
            "arcface": lambda: km.ArcFaceHead(NUM_CLASSES, s=10.0)}[name]()
    logits = head([features, labels_in])
    model = keras.Model([embeddings_in, labels_in], logits)
    model.compile(keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    history = model.fit([x, y], y, epochs=12, batch_size=40, verbose=0)
    losses = history.history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses
    extractor = keras.Model(embeddings_in, features)
    accuracy = np.mean(np.argmax(ops.convert_to_numpy(head(extractor(x))), axis=1) == y)
    assert accuracy >= 0.9
    if name == "sphereface":
        assert int(ops.convert_to_numpy(head.iteration)) == 12 * (len(y) // 40)



@pytest.mark.parametrize("name", ["amsoftmax", "sphereface"])
def test_head_trains_without_xla_with_the_class_id_checks_and_the_nan_callback(name):
    """Without XLA (TensorFlow: a tf.function graph holding the class-id assertion; JAX: un-jitted steps) valid
    labels train as before, and NaNLossDiagnosis stays silent."""
    x, y = _separable_problem()
    head = HEADS[name]()
    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(8), head])
    model.compile(keras.optimizers.Adam(0.01), loss=head.loss, jit_compile=False)
    history = model.fit(x, y[:, None], epochs=6, batch_size=40, verbose=0,
                        callbacks=[km.callbacks.NaNLossDiagnosis()])
    losses = history.history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
