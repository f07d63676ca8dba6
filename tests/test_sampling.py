"""Sampled classes (Partial FC): positives always kept, uniform negatives, rate 1 exact, rate 0.1 converges."""

import doctest

import keras
import numpy as np
import pytest
from keras import ops

import keras_margin as km
import keras_margin.sampling
from keras_margin.chunked import margin_loss
from keras_margin.sampling import num_sampled_classes, sample_classes

pytestmark = pytest.mark.backend_agnostic


def test_num_sampled_classes_is_rate_times_classes_at_least_the_batch():
    assert num_sampled_classes(1000, 0.1) == 100
    assert num_sampled_classes(1000, 0.1, batch_size=256) == 256  # every positive must fit
    assert num_sampled_classes(1001, 0.1) == 101  # rounded up
    assert num_sampled_classes(10, 0.5, batch_size=64) == 10  # never more than C
    assert num_sampled_classes(10, 1.0) == 10


def test_sampled_classes_keep_every_positive_and_relabel_into_the_sample():
    labels = np.array([5, 17, 5, 99, 0, 42], dtype="int32")
    sampled, sampled_ids = sample_classes(labels, num_classes=100, num_sampled=20, seed=3)
    sampled, sampled_ids = ops.convert_to_numpy(sampled), ops.convert_to_numpy(sampled_ids)
    assert sampled.shape == (20,) and len(set(sampled.tolist())) == 20
    assert set(labels.tolist()) <= set(sampled.tolist())
    np.testing.assert_array_equal(sampled[sampled_ids], labels)


def test_negatives_are_drawn_uniformly():
    labels = np.array([0, 1, 1], dtype="int32")
    num_classes, num_sampled, draws = 20, 6, 400
    seed = keras.random.SeedGenerator(7)
    counts = np.zeros(num_classes)
    for _ in range(draws):
        sampled, _ = sample_classes(labels, num_classes, num_sampled, seed)
        counts[ops.convert_to_numpy(sampled)] += 1
    assert counts[0] == counts[1] == draws
    # Each of the 18 negatives fills one of the 4 free slots with probability 4/18 (std ~0.021 here).
    np.testing.assert_allclose(counts[2:] / draws, 4 / 18, atol=0.09)


def test_a_label_missing_from_the_sample_gives_nan_not_a_wrong_class():
    labels = np.array([1, 2, 3, 4], dtype="int32")  # four distinct classes, only two slots
    sampled, sampled_ids = sample_classes(labels, num_classes=10, num_sampled=2, seed=0)
    sampled_ids = ops.convert_to_numpy(sampled_ids)
    assert np.sum(sampled_ids == -1) == 2
    rng = np.random.default_rng(0)
    x, kernel = rng.normal(size=(4, 5)).astype("float32"), rng.normal(size=(5, 10)).astype("float32")
    loss = ops.convert_to_numpy(margin_loss(x, ops.take(kernel, sampled, axis=1), sampled_ids, lambda c: c, 10.0))
    assert np.sum(np.isnan(loss)) == 2


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_sampling_every_class_equals_the_exact_loss(chunk_size):
    rng = np.random.default_rng(1)
    x, kernel = rng.normal(size=(8, 5)).astype("float32"), rng.normal(size=(5, 11)).astype("float32")
    y = rng.integers(0, 11, size=8).astype("int32")
    target = lambda c: c - 0.35  # noqa: E731
    exact = margin_loss(x, kernel, y, target, 30.0, chunk_size)
    sampled, sampled_ids = sample_classes(y, 11, 11, seed=0)  # K = C: a random permutation of the classes
    assert sorted(ops.convert_to_numpy(sampled).tolist()) == list(range(11))
    permuted = margin_loss(x, ops.take(kernel, sampled, axis=1), sampled_ids, target, 30.0, chunk_size)
    np.testing.assert_allclose(ops.convert_to_numpy(permuted), ops.convert_to_numpy(exact), rtol=1e-5, atol=1e-5)


def test_head_with_rate_one_equals_the_exact_head():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(8, 5)).astype("float32"), rng.integers(0, 12, size=8).astype("int32")
    exact = km.ArcFaceHead(12, fused_loss=True, chunk_size=5)
    full_rate = km.ArcFaceHead(12, fused_loss=True, chunk_size=5, sample_rate=1.0)
    exact(x), full_rate(x)
    full_rate.kernel.assign(exact.kernel)
    np.testing.assert_allclose(ops.convert_to_numpy(full_rate([x, y], training=True)),
                               ops.convert_to_numpy(exact([x, y], training=True)), rtol=1e-6)


def test_only_sampled_kernel_columns_get_a_gradient():
    rng = np.random.default_rng(3)
    num_classes, batch = 200, 8
    x, y = rng.normal(size=(batch, 6)).astype("float32"), rng.integers(0, num_classes, size=batch).astype("int32")
    head = km.AMSoftmaxHead(num_classes, s=10.0, fused_loss=True, sample_rate=0.1)
    embeddings, labels = keras.Input((6,)), keras.Input((), dtype="int32")
    model = keras.Model([embeddings, labels], head([embeddings, labels]))
    model.compile(keras.optimizers.SGD(1.0), loss=None)
    before = ops.convert_to_numpy(head.kernel)
    model.train_on_batch([x, y])
    changed = np.flatnonzero(np.any(ops.convert_to_numpy(head.kernel) != before, axis=0))
    assert set(y.tolist()) <= set(changed.tolist())
    assert len(changed) <= num_sampled_classes(num_classes, 0.1, batch)  # 20 of 200 columns at most


def test_training_with_rate_point_one_converges_on_a_separable_problem():
    num_classes, dim, n_per_class = 200, 12, 4
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(num_classes, dim)) * 3.0
    y = np.repeat(np.arange(num_classes), n_per_class).astype("int32")
    x = (centers[y] + 0.5 * rng.normal(size=(len(y), dim))).astype("float32")
    head = km.AMSoftmaxHead(num_classes, s=16.0, m=0.2, fused_loss=True, sample_rate=0.1)
    embeddings, labels = keras.Input((dim,)), keras.Input((), dtype="int32")
    features = keras.layers.Dense(16)(embeddings)
    model = keras.Model([embeddings, labels], head([features, labels]))
    model.compile(keras.optimizers.Adam(0.02), loss=None, jit_compile=True)
    losses = model.fit([x, y], epochs=12, batch_size=16, verbose=0).history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < 0.3 * losses[0], losses
    # Evaluated on all 200 classes, not only the sampled ones.
    cos = ops.convert_to_numpy(head(keras.Model(embeddings, features).predict(x, verbose=0)))
    assert np.mean(np.argmax(cos, axis=-1) == y) >= 0.9


def test_docstring_examples_run():
    result = doctest.testmod(keras_margin.sampling, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
