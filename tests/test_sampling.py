"""Sampled classes (Partial FC): positives always kept, uniform negatives, rate 1 exact, rate 0.1 converges."""

import doctest

import keras
import numpy as np
import pytest
from keras import ops

import keras_margin as km
from keras_margin import sampling
from keras_margin.chunked import margin_loss
from keras_margin.sampling import num_sampled_classes, sample_classes
from tests import numpy_reference as ref

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
    assert sampled.shape == (20,) and np.all(np.diff(sampled) > 0)  # distinct, in increasing order
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
    result = doctest.testmod(sampling, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------------------------------
# Optimizer state of unsampled columns: which InsightFace Partial FC version the Keras optimizers match.
# PartialFC (v1, recognition/arcface_torch/partial_fc.py): the sampled rows and their momentum are copied
# into a separate Parameter (sample(): `Parameter(self.weight[index])`, `self.weight_mom[index]`), torch SGD
# steps that copy (coupled weight decay: d = g + wd * w; buf = mu * buf + d; w -= lr * buf) and update()
# writes both back: unsampled classes get no momentum and no weight-decay step.
# PartialFC_V2 (partial_fc_v2.py): `self.weight` (all classes) is the Parameter, `self.weight[index]` its
# gather, so the gradient is zero outside the sample but torch SGD (train_v2.py: momentum 0.9,
# weight_decay=cfg.weight_decay) still moves every class by its momentum and decay.
# Keras' SGD decays decoupled (w -= lr * wd * w, before the update, outside the momentum).

_C, _D, _B, _RATE, _S, _M, _LR, _MU = 30, 4, 4, 0.2, 10.0, 0.2, 0.5, 0.9


def _amsoftmax_kernel_gradient(x, kernel, y, sampled):
    """NumPy d mean(loss) / d kernel (d, C) of AM-Softmax over the sampled columns only (zero elsewhere)."""
    sub = kernel[:, sampled].astype(np.float64)
    ids = np.array([int(np.flatnonzero(sampled == label)[0]) for label in y])
    cos = ref.cosine(x, sub)
    d_cos = ref.margin_loss_gradient(cos, ids, _S, lambda c: ref.amsoftmax_target(c, _S, _M),
                                     lambda c: np.full_like(c, _S)) / len(y)
    x_unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    norms = np.linalg.norm(sub, axis=0, keepdims=True)
    unit = sub / norms
    d_unit = x_unit.T @ d_cos
    gradient = np.zeros(kernel.shape)
    gradient[:, sampled] = (d_unit - unit * np.sum(unit * d_unit, axis=0, keepdims=True)) / norms
    return gradient


def _keras_sgd(w, m, g, wd, sampled):
    """keras.optimizers.SGD(lr, momentum=mu, weight_decay=wd), as written in Keras: decay first, decoupled."""
    w = w - _LR * wd * w
    m = _MU * m - _LR * g
    return w + m, m


def _pfc_v2(w, m, g, wd, sampled):
    """PartialFC_V2 + torch SGD: the whole weight is the parameter (coupled decay), m = -lr * buf."""
    m = _MU * m - _LR * (g + wd * w)
    return w + m, m


def _pfc_v1(w, m, g, wd, sampled):
    """PartialFC (v1) + torch SGD on the sampled copy only; the rest keep weight and momentum."""
    w, m = w.copy(), m.copy()
    m[:, sampled] = _MU * m[:, sampled] - _LR * (g[:, sampled] + wd * w[:, sampled])
    w[:, sampled] += m[:, sampled]
    return w, m


_TWO_STEPS = ([0, 1, 2, 0], [3, 4, 5, 3])
_THREE_STEPS = _TWO_STEPS + ([0, 1, 6, 0],)  # classes 0 and 1 again: their stored momentum resumes (v1)


def _kernel_dc(head):
    """The head's kernel as (d, C) float64, whatever its layout."""
    kernel = ops.convert_to_numpy(head.kernel).astype(np.float64)
    return kernel.T if head.kernel_layout == "classes_first" else kernel


def _two_sampled_sgd_steps(weight_decay=None, kernel_regularizer=None, optimizer=None, sample_update="all",
                           batches=_TWO_STEPS, jit_compile="auto", dtype=None, update="sparse",
                           kernel_layout="classes_last"):
    """train_on_batch steps of a sampled head; returns kernels (d, C) before/after each step and each step's sample.

    With ``sample_update="sampled"`` the optimizer is wrapped in PartialFCOptimizer(update=...) and each step's record in
    ``head.sampled_columns`` is checked against the replayed sample.
    """
    rng = np.random.default_rng(11)
    head = km.AMSoftmaxHead(_C, s=_S, m=_M, fused_loss=True, sample_rate=_RATE, sample_update=sample_update,
                            kernel_regularizer=kernel_regularizer, dtype=dtype, kernel_layout=kernel_layout)
    embeddings, labels = keras.Input((_D,)), keras.Input((), dtype="int32")
    model = keras.Model([embeddings, labels], head([embeddings, labels]))
    optimizer = optimizer or keras.optimizers.SGD(_LR, momentum=_MU, weight_decay=weight_decay)
    if sample_update == "sampled":
        optimizer = km.PartialFCOptimizer(optimizer, update=update)
    model.compile(optimizer, loss=None, jit_compile=jit_compile)
    num_sampled = num_sampled_classes(_C, _RATE, _B)
    kernels, steps = [_kernel_dc(head)], []
    for labels_t in batches:
        x = rng.normal(size=(_B, _D)).astype("float32")
        y = np.array(labels_t, dtype="int32")
        replay = keras.random.SeedGenerator(0)  # the head's generator state, replayed to read the sample
        replay.state.assign(ops.convert_to_numpy(head.seed_generator.state))
        sampled = ops.convert_to_numpy(sample_classes(y, _C, num_sampled, replay)[0]).astype(np.int64)
        loss = model.train_on_batch([x, y])
        assert np.isfinite(loss), loss
        kernels.append(_kernel_dc(head))
        steps.append((x.astype(np.float64), y, sampled))
        if sample_update == "sampled":
            record = np.zeros(_C)
            record[sampled] = 1.0
            np.testing.assert_array_equal(ops.convert_to_numpy(head.sampled_columns), record)
    return kernels, steps


def _replay(rule, kernels, steps, wd):
    w, m = kernels[0], np.zeros_like(kernels[0])
    for x, y, sampled in steps:
        w, m = rule(w, m, _amsoftmax_kernel_gradient(x, w, y, sampled), wd, sampled)
    return w


def test_momentum_moves_columns_sampled_before_as_partial_fc_v2_does():
    kernels, steps = _two_sampled_sgd_steps()
    (_, _, first), (_, _, second) = steps
    only_first = np.setdiff1d(first, second)
    never = np.setdiff1d(np.arange(_C), np.union1d(first, second))
    assert len(only_first) > 0 and len(never) > 0
    ours = kernels[-1]
    v2 = _replay(_pfc_v2, kernels, steps, 0.0)
    v1 = _replay(_pfc_v1, kernels, steps, 0.0)
    np.testing.assert_allclose(ours, v2, rtol=1e-5, atol=1e-6)
    # Step 2 moves the columns sampled only at step 1 by mu * (their step-1 change): v2, not v1.
    np.testing.assert_allclose(ours[:, only_first] - kernels[1][:, only_first],
                               _MU * (kernels[1][:, only_first] - kernels[0][:, only_first]), rtol=1e-5, atol=1e-7)
    assert np.abs(ours[:, only_first] - v1[:, only_first]).max() > 1e-3
    np.testing.assert_array_equal(ours[:, never], kernels[0][:, never])  # never sampled: zero momentum


def test_keras_weight_decay_is_decoupled_on_every_column_neither_v1_nor_v2():
    wd = 0.1
    kernels, steps = _two_sampled_sgd_steps(weight_decay=wd)
    (_, _, first), (_, _, second) = steps
    never = np.setdiff1d(np.arange(_C), np.union1d(first, second))
    ours = kernels[-1]
    np.testing.assert_allclose(ours, _replay(_keras_sgd, kernels, steps, wd), rtol=1e-5, atol=1e-6)
    # Never-sampled columns shrink by (1 - lr * wd) per step; v1 leaves them as they are; v2 decays them
    # too, but through the momentum (coupled), so by a different factor.
    np.testing.assert_allclose(ours[:, never], (1 - _LR * wd) ** 2 * kernels[0][:, never], rtol=1e-6)
    v1, v2 = _replay(_pfc_v1, kernels, steps, wd), _replay(_pfc_v2, kernels, steps, wd)
    np.testing.assert_array_equal(v1[:, never], kernels[0][:, never])
    assert np.abs(ours[:, never] - v2[:, never]).max() > 1e-3


def test_l2_kernel_regularizer_without_weight_decay_matches_partial_fc_v2_exactly():
    wd = 0.1
    kernels, steps = _two_sampled_sgd_steps(kernel_regularizer=keras.regularizers.L2(wd / 2))
    np.testing.assert_allclose(kernels[-1], _replay(_pfc_v2, kernels, steps, wd), rtol=1e-5, atol=1e-6)


# sample_update="sampled" + PartialFCOptimizer: InsightFace's first PartialFC.

def _columns_of(steps):
    first, second, third = (sampled for _, _, sampled in steps)
    return first, second, third


def test_dense_sampled_update_with_l2_regularizer_matches_partial_fc_v1_exactly():
    wd = 0.1
    kernels, steps = _two_sampled_sgd_steps(kernel_regularizer=keras.regularizers.L2(wd / 2),
                                            sample_update="sampled", batches=_THREE_STEPS, update="dense")
    np.testing.assert_allclose(kernels[-1], _replay(_pfc_v1, kernels, steps, wd), rtol=1e-5, atol=1e-6)
    first, second, third = _columns_of(steps)
    # A column left out of a step keeps its value exactly: no momentum step, no decay.
    for step, sampled in enumerate((first, second, third)):
        out = np.setdiff1d(np.arange(_C), sampled)
        np.testing.assert_array_equal(kernels[step + 1][:, out], kernels[step][:, out])
    # Sampled at steps 1 and 3, not 2: step 3 resumes the momentum stored at step 1 (v2 would have spent
    # part of it at step 2), so v1 and v2 disagree there.
    resumed = np.setdiff1d(np.intersect1d(first, third), second)
    assert len(resumed) > 0
    v2 = _replay(_pfc_v2, kernels, steps, wd)
    assert np.abs(kernels[-1][:, resumed] - v2[:, resumed]).max() > 1e-3


@pytest.mark.parametrize("update", ["sparse", "dense"])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_sampled_update_with_coupled_recipe_sgd_matches_partial_fc_v1_exactly(update, jit_compile):
    wd = 0.1
    optimizer = km.recipes.RecipeSGD(_LR, momentum=_MU, weight_decay=wd, momentum_form="pytorch", decay_exclude=())
    kernels, steps = _two_sampled_sgd_steps(optimizer=optimizer, sample_update="sampled", batches=_THREE_STEPS,
                                            update=update, jit_compile=jit_compile)
    np.testing.assert_allclose(kernels[-1], _replay(_pfc_v1, kernels, steps, wd), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("update", ["sparse", "dense"])
def test_class_major_sampled_update_matches_partial_fc_v1_exactly(update):
    # kernel_layout="classes_first": the kernel (C, d), the buffers the sampled rows (K, d); the same v1 update.
    wd = 0.1
    optimizer = km.recipes.RecipeSGD(_LR, momentum=_MU, weight_decay=wd, momentum_form="pytorch", decay_exclude=())
    kernels, steps = _two_sampled_sgd_steps(optimizer=optimizer, sample_update="sampled", batches=_THREE_STEPS,
                                            update=update, jit_compile=True, kernel_layout="classes_first")
    np.testing.assert_allclose(kernels[-1], _replay(_pfc_v1, kernels, steps, wd), rtol=1e-5, atol=1e-6)
    first, second, third = _columns_of(steps)
    for step, sampled in enumerate((first, second, third)):
        out = np.setdiff1d(np.arange(_C), sampled)
        np.testing.assert_array_equal(kernels[step + 1][:, out], kernels[step][:, out])


def test_class_major_sampled_head_matches_partial_fc_v2():
    kernels, steps = _two_sampled_sgd_steps(jit_compile=True, kernel_layout="classes_first")
    np.testing.assert_allclose(kernels[-1], _replay(_pfc_v2, kernels, steps, 0.0), rtol=1e-5, atol=1e-6)


def _keras_adam_on_sampled(w, state, g, sampled, t, lr=0.01, b1=0.9, b2=0.999, eps=1e-7):
    """keras.optimizers.Adam's step (Keras' formula) on the sampled columns; the rest keep w, m, v."""
    m, v = state
    w, m, v = w.copy(), m.copy(), v.copy()
    gs = g[:, sampled]
    m[:, sampled] += (gs - m[:, sampled]) * (1 - b1)
    v[:, sampled] += (gs * gs - v[:, sampled]) * (1 - b2)
    alpha = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    w[:, sampled] -= alpha * m[:, sampled] / (np.sqrt(v[:, sampled]) + eps)
    return w, (m, v)


@pytest.mark.parametrize("update", ["sparse", "dense"])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_sampled_update_keeps_adam_moments_of_unsampled_columns(update, jit_compile):
    kernels, steps = _two_sampled_sgd_steps(optimizer=keras.optimizers.Adam(0.01), sample_update="sampled",
                                            batches=_THREE_STEPS, jit_compile=jit_compile, update=update)
    w, state = kernels[0], (np.zeros_like(kernels[0]), np.zeros_like(kernels[0]))
    for t, (x, y, sampled) in enumerate(steps, start=1):
        w, state = _keras_adam_on_sampled(w, state, _amsoftmax_kernel_gradient(x, w, y, sampled), sampled, t)
    np.testing.assert_allclose(kernels[-1], w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("update", ["sparse", "dense"])
def test_sampled_update_under_mixed_precision_steps_only_the_sample(update):
    kernels, steps = _two_sampled_sgd_steps(sample_update="sampled", dtype="mixed_float16", jit_compile=True,
                                            update=update)
    for step, (_, y, sampled) in enumerate(steps):
        out = np.setdiff1d(np.arange(_C), sampled)
        moved = np.any(kernels[step + 1] != kernels[step], axis=0)
        # Every positive moves; a sampled negative may move by less than a float32 ulp; nothing else moves.
        assert moved[y].all() and set(np.flatnonzero(moved)) <= set(sampled.tolist())
        np.testing.assert_array_equal(kernels[step + 1][:, out], kernels[step][:, out])


def _three_v1_steps(optimizer, update, jit_compile="auto"):  # XLA: the NumPy-checked tests above
    keras.utils.set_random_seed(3)  # the same initial kernel and samples for each update
    kernels, _ = _two_sampled_sgd_steps(optimizer=optimizer, sample_update="sampled", batches=_THREE_STEPS,
                                        jit_compile=jit_compile, update=update)
    return kernels[-1]


@pytest.mark.parametrize("make", [
    lambda: keras.optimizers.SGD(_LR, momentum=_MU, nesterov=True, weight_decay=0.1),
    lambda: keras.optimizers.AdamW(0.01, weight_decay=0.2, amsgrad=True),
    lambda: keras.optimizers.RMSprop(0.01, momentum=0.5, centered=True),
    lambda: keras.optimizers.Adagrad(0.1, initial_accumulator_value=0.3),  # slots starting at 0.3
    lambda: keras.optimizers.Ftrl(0.1, l1_regularization_strength=0.01, l2_shrinkage_regularization_strength=0.01),
    lambda: keras.optimizers.Nadam(0.01),
    lambda: keras.optimizers.Lion(0.01, weight_decay=0.1),
    lambda: keras.optimizers.Adadelta(1.0),
    lambda: keras.optimizers.Adamax(0.01, global_clipnorm=0.05),  # the norm of the sampled columns alone
], ids=["sgd", "adamw", "rmsprop", "adagrad", "ftrl", "nadam", "lion", "adadelta", "adamax"])
def test_sparse_update_steps_the_sampled_columns_as_the_dense_restore_does(make):
    # "dense" steps the whole kernel and restores the unsampled columns: checked against NumPy above for SGD
    # and Adam; "sparse" (gather, step, scatter) must give the same kernel for every elementwise optimizer.
    np.testing.assert_allclose(_three_v1_steps(make(), "sparse"), _three_v1_steps(make(), "dense"),
                               rtol=1e-5, atol=1e-6)


def test_sparse_update_keeps_a_weight_decay_exclusion_of_the_kernel():
    def excluded(by):
        optimizer = keras.optimizers.AdamW(0.01, weight_decay=0.5)
        if by == "name":
            optimizer.exclude_from_weight_decay(var_names=["kernel"])
        return optimizer

    decayed = _three_v1_steps(keras.optimizers.AdamW(0.01, weight_decay=0.5), "sparse")
    by_name = _three_v1_steps(excluded("name"), "sparse")
    assert np.abs(by_name - decayed).max() > 1e-4
    np.testing.assert_allclose(by_name, _three_v1_steps(excluded("name"), "dense"), rtol=1e-5, atol=1e-6)
    # By identity: the head's kernel itself excluded (the buffer stepped in its place inherits that).
    model, head = _sampled_model()
    sparse_inner = keras.optimizers.AdamW(0.01, weight_decay=0.5)
    sparse_inner.exclude_from_weight_decay(var_list=[head.kernel])
    optimizer = km.PartialFCOptimizer(sparse_inner)
    optimizer.build(model.trainable_variables)
    (group,) = optimizer._pfc_groups
    assert not sparse_inner._use_weight_decay(group.buffer) and group.buffer.path == head.kernel.path


def test_sparse_update_refuses_what_it_cannot_step_exactly():
    with pytest.raises(ValueError, match="update` must be one of"):
        km.PartialFCOptimizer(keras.optimizers.SGD(), update="lazy")
    for inner in (keras.optimizers.Lamb(), keras.optimizers.Adafactor()):
        with pytest.raises(ValueError, match=f"got {type(inner).__name__}. Pass update='dense'"):
            km.PartialFCOptimizer(inner)
        km.PartialFCOptimizer(type(inner)(), update="dense")  # the dense restore takes any optimizer
    with pytest.raises(ValueError, match="use_ema=True"):
        km.PartialFCOptimizer(keras.optimizers.SGD(use_ema=True))
    for what, option in (("regularizer", {"kernel_regularizer": "l2"}), ("constraint", {"kernel_constraint": "non_neg"})):
        head = km.AMSoftmaxHead(_C, fused_loss=True, sample_rate=_RATE, sample_update="sampled", **option)
        embeddings, labels = keras.Input((_D,)), keras.Input((), dtype="int32")
        model = keras.Model([embeddings, labels], head([embeddings, labels]))
        with pytest.raises(ValueError, match=f"has a {what}; update='sparse'"):
            km.PartialFCOptimizer(keras.optimizers.SGD()).build(model.trainable_variables)
        km.PartialFCOptimizer(keras.optimizers.SGD(), update="dense").build(model.trainable_variables)


def test_sampled_head_refuses_a_batch_larger_than_its_fixed_sample():
    head = km.AMSoftmaxHead(_C, fused_loss=True, sample_rate=_RATE, sample_update="sampled")
    batch = num_sampled_classes(_C, _RATE) + 1
    with pytest.raises(ValueError, match=f"= {batch - 1} classes per step, fewer than the batch of {batch}"):
        head([np.ones((batch, _D), "float32"), np.arange(batch, dtype="int32")], training=True)
    assert tuple(head.sample_gradient.shape) == (_D, batch - 1)


def test_sampled_update_needs_sampling_and_a_known_value():
    with pytest.raises(ValueError, match="needs class sampling"):
        km.ArcFaceHead(10, fused_loss=True, sample_update="sampled")
    with pytest.raises(ValueError, match="sample_update"):
        km.ArcFaceHead(10, fused_loss=True, sample_rate=0.5, sample_update="v1")
    with pytest.raises(ValueError, match="sample_rate"):  # a head without class sampling refuses both
        km.SubCenterArcFaceHead(10, fused_loss=True, sample_rate=0.5, sample_update="sampled")


def _sampled_model(sample_update="sampled", kernel_layout="classes_last"):
    head = km.AMSoftmaxHead(_C, fused_loss=True, sample_rate=_RATE, sample_update=sample_update,
                            kernel_layout=kernel_layout)
    embeddings, labels = keras.Input((_D,)), keras.Input((), dtype="int32")
    return keras.Model([embeddings, labels], head([embeddings, labels])), head


def test_partial_fc_optimizer_refuses_what_it_cannot_do():
    with pytest.raises(TypeError, match="keras.optimizers.Optimizer"):
        km.PartialFCOptimizer("sgd")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        km.PartialFCOptimizer(keras.optimizers.SGD(gradient_accumulation_steps=2))
    with pytest.raises(ValueError, match="inner optimizer"):
        km.PartialFCOptimizer(keras.optimizers.SGD(), clipnorm=1.0)
    built = keras.optimizers.SGD()
    built.build([keras.Variable(np.zeros((2, 3), "float32"))])
    with pytest.raises(ValueError, match="not built"):
        km.PartialFCOptimizer(built)
    model, _ = _sampled_model(sample_update="all")
    with pytest.raises(ValueError, match="no head with sample_rate < 1 and sample_update='sampled'"):
        km.PartialFCOptimizer(keras.optimizers.SGD()).build(model.trainable_variables)
    model, head = _sampled_model()
    head.kernel.trainable = False
    with pytest.raises(ValueError, match="not among the trainable variables"):
        km.PartialFCOptimizer(keras.optimizers.SGD()).build(model.trainable_variables)


def test_partial_fc_optimizer_needs_the_sample_gradient():
    model, head = _sampled_model()
    optimizer = km.PartialFCOptimizer(keras.optimizers.SGD())
    optimizer.build(model.trainable_variables)
    grads = [ops.zeros(v.shape, v.dtype) for v in model.trainable_variables]
    paths = [v.path for v in model.trainable_variables]
    for weight, what in ((head.sample_gradient, "the sampled columns' gradient"), (head.sampled_columns,
                                                                                  "the step's sample")):
        grads[paths.index(weight.path)] = None
        with pytest.raises(ValueError, match=f"{what} is unknown"):
            optimizer.apply(grads, model.trainable_variables)


def test_sampled_columns_is_overwritten_not_stepped_by_a_plain_optimizer():
    # Without the wrapper the head still trains (PartialFC_V2's update); the record is overwritten, not stepped.
    model, head = _sampled_model()
    model.compile(keras.optimizers.SGD(0.5, momentum=0.9, weight_decay=0.1), loss=None)
    for _ in range(2):
        model.train_on_batch([np.ones((_B, _D), "float32"), np.array([0, 1, 2, 3], "int32")])
    record = ops.convert_to_numpy(head.sampled_columns)
    assert set(np.unique(record)) == {0.0, 1.0} and record.sum() == num_sampled_classes(_C, _RATE, _B)
    assert record[[0, 1, 2, 3]].tolist() == [1.0] * 4


@pytest.mark.parametrize("kernel_layout", ["classes_last", "classes_first"])
def test_partial_fc_optimizer_serializes_and_restores_its_state(tmp_path, kernel_layout):
    model, head = _sampled_model(kernel_layout=kernel_layout)
    model.compile(km.PartialFCOptimizer(keras.optimizers.SGD(0.1, momentum=0.9)), loss=None)
    x, y = np.random.default_rng(0).normal(size=(_B, _D)).astype("float32"), np.array([0, 1, 2, 3], "int32")
    model.train_on_batch([x, y])
    config = model.optimizer.get_config()
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(model.optimizer))
    assert isinstance(clone, km.PartialFCOptimizer) and clone.get_config() == config
    assert clone.inner_optimizer.momentum == 0.9
    path = tmp_path / "pfc.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, km.PartialFCOptimizer)
    assert loaded.layers[-1].sample_update == "sampled" and loaded.layers[-1].kernel_layout == kernel_layout
    assert tuple(loaded.layers[-1].kernel.shape) == tuple(head.kernel.shape)
    saved = [ops.convert_to_numpy(v) for v in model.optimizer.variables]
    restored = [ops.convert_to_numpy(v) for v in loaded.optimizer.variables]
    assert len(saved) == len(restored) and any(np.abs(s).sum() > 0 for s in saved)
    for a, b in zip(saved, restored):
        np.testing.assert_array_equal(a, b)
    # Both continue with the same step.
    model.train_on_batch([x, y])
    loaded.train_on_batch([x, y])


def _value_and_gradients(fn, upstream, jit, *inputs):
    """``(fn(*inputs), *d sum(fn(*inputs) * upstream) / d inputs)`` on the backend, under XLA with ``jit``."""
    if keras.backend.backend() == "jax":
        import jax

        def loss(*args):
            value = fn(*args)
            return ops.sum(value * upstream), value

        def value_and_grad(*args):
            (_, value), grads = jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True)(*args)
            return (value, *grads)
        return (jax.jit(value_and_grad) if jit else value_and_grad)(*inputs)
    import tensorflow as tf

    def value_and_grad(*args):
        with tf.GradientTape() as tape:
            tape.watch(list(args))
            value = fn(*args)
            loss = tf.reduce_sum(value * upstream)
        return (value, *tape.gradient(loss, list(args)))
    run = tf.function(value_and_grad, jit_compile=True) if jit else value_and_grad
    return run(*(tf.constant(a) for a in inputs))


@pytest.mark.parametrize("with_marker", [False, True])
@pytest.mark.parametrize("flat_gather", [True, False])
@pytest.mark.parametrize("jit", [False, True])
def test_take_columns_value_and_gradient_are_the_columns_and_their_scatter(jit, flat_gather, with_marker,
                                                                          monkeypatch):
    if not flat_gather:  # the plain column gather of kernels too large for flat int32 indices
        monkeypatch.setattr(sampling, "_FLAT_INDEX_LIMIT", 0)
    rng = np.random.default_rng(5)
    kernel = rng.normal(size=(3, 9)).astype("float32")
    marker = np.full(9, 0.5, "float32")  # its value takes no part; its gradient is the sample's indicator
    channel = np.full((3, 4), 0.25, "float32")  # likewise; its gradient is the sampled columns' gradient
    sampled = np.array([7, 2, 5, 0], dtype="int32")
    upstream = rng.normal(size=(3, 4)).astype("float32")
    expected_gradient = np.zeros((3, 9), "float32")
    expected_gradient[:, sampled] = upstream  # d sum(upstream * W[:, sampled]) / dW
    expected_marker = np.zeros(9, "float32")
    expected_marker[sampled] = 1.0

    def take(w, m, c):
        return sampling.take_columns(w, sampled, *((m, c) if with_marker else (None, None)))

    columns, gradient, d_marker, d_channel = _value_and_gradients(take, upstream, jit, kernel, marker, channel)
    np.testing.assert_array_equal(ops.convert_to_numpy(columns), kernel[:, sampled])
    np.testing.assert_array_equal(ops.convert_to_numpy(gradient), expected_gradient)
    if with_marker:
        np.testing.assert_array_equal(ops.convert_to_numpy(d_marker), expected_marker)
        np.testing.assert_array_equal(ops.convert_to_numpy(d_channel), upstream)
    else:  # not inputs of the op: no gradient (TensorFlow) or zeros (JAX)
        for d_extra in (d_marker, d_channel):
            assert d_extra is None or not np.any(ops.convert_to_numpy(d_extra))


@pytest.mark.parametrize("jit", [False, True])
def test_class_major_take_columns_value_and_gradient_are_the_rows_and_their_scatter(jit):
    rng = np.random.default_rng(6)
    kernel = rng.normal(size=(9, 3)).astype("float32")  # (C, d)
    sampled = np.array([0, 2, 5, 7], dtype="int32")
    upstream = rng.normal(size=(4, 3)).astype("float32")
    expected_gradient = np.zeros((9, 3), "float32")
    expected_gradient[sampled] = upstream
    expected_marker = np.zeros(9, "float32")
    expected_marker[sampled] = 1.0
    marker, channel = np.full(9, 0.5, "float32"), np.full((4, 3), 0.25, "float32")

    def take(w, m, c):
        return sampling.take_columns(w, sampled, m, c, classes_first=True)

    rows, gradient, d_marker, d_channel = _value_and_gradients(take, upstream, jit, kernel, marker, channel)
    np.testing.assert_array_equal(ops.convert_to_numpy(rows), kernel[sampled])
    np.testing.assert_array_equal(ops.convert_to_numpy(gradient), expected_gradient)
    np.testing.assert_array_equal(ops.convert_to_numpy(d_marker), expected_marker)
    np.testing.assert_array_equal(ops.convert_to_numpy(d_channel), upstream)
    # The inverse: the rows written back.
    new_rows = rng.normal(size=(4, 3)).astype("float32")
    expected = kernel.copy()
    expected[sampled] = new_rows
    np.testing.assert_array_equal(
        ops.convert_to_numpy(sampling.scatter_columns(kernel, sampled, new_rows, classes_first=True)), expected)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(sampling.gather_columns(kernel, sampled, classes_first=True)), kernel[sampled])
    with pytest.raises(ValueError, match=r"`channel` must have shape \(4, 3\)"):
        sampling.take_columns(kernel, sampled, marker, np.zeros((3, 4), "float32"), classes_first=True)


def test_take_columns_refuses_a_marker_or_channel_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"`marker` must have shape \(9,\)"):
        sampling.take_columns(np.zeros((3, 9), "float32"), np.array([1, 2], "int32"), np.zeros(8, "float32"))
    with pytest.raises(ValueError, match=r"`channel` must have shape \(3, 2\)"):
        sampling.take_columns(np.zeros((3, 9), "float32"), np.array([1, 2], "int32"), None, np.zeros((2, 3)))


@pytest.mark.parametrize("form", ["select", "flat scatter", "coordinate scatter"])
def test_sample_indices_and_scatter_columns_invert_the_gather(form, monkeypatch):
    if form == "select" and keras.backend.backend() != "tensorflow":
        pytest.skip("scatter_columns selects on TensorFlow only")
    if form != "select":  # 4 of 11 classes: the select on TensorFlow, unless _SELECT_FROM says to scatter
        monkeypatch.setattr(sampling, "_SELECT_FROM", 0)
    if form == "coordinate scatter":  # the scatter of kernels too large for flat int32 indices
        monkeypatch.setattr(sampling, "_FLAT_INDEX_LIMIT", 0)
    rng = np.random.default_rng(8)
    kernel = rng.normal(size=(3, 11)).astype("float32")
    sampled = np.array([1, 4, 5, 9], "int32")
    indicator = np.zeros(11, "float32")
    indicator[sampled] = 1.0
    indices = ops.convert_to_numpy(sampling.sample_indices(indicator, 4))
    np.testing.assert_array_equal(indices, sampled)
    np.testing.assert_array_equal(ops.convert_to_numpy(sampling.gather_columns(kernel, indices)), kernel[:, sampled])
    columns = rng.normal(size=(3, 4)).astype("float32")
    expected = kernel.copy()
    expected[:, sampled] = columns
    np.testing.assert_array_equal(ops.convert_to_numpy(sampling.scatter_columns(kernel, indices, columns)), expected)


def test_score_hash_is_lowbias32_with_32_bit_wrap_around():
    """The backend's uint32 arithmetic wraps as the hash needs (reference: the hash in Python integers)."""
    def lowbias32(v):
        v ^= v >> 16
        v = (v * 0x7FEB352D) % 2**32
        v ^= v >> 15
        v = (v * 0x846CA68B) % 2**32
        return v ^ (v >> 16)

    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1]
    got = ops.convert_to_numpy(sampling._hash32(ops.convert_to_tensor(np.array(values, dtype="uint32"))))
    assert got.tolist() == [lowbias32(v) for v in values]


def test_pairs_of_negatives_are_sampled_together_as_often_as_uniform_subsets_are():
    labels = np.array([0], dtype="int32")
    num_classes, num_sampled, draws = 12, 4, 600
    seed = keras.random.SeedGenerator(5)
    together = np.zeros((num_classes, num_classes))
    subsets = set()
    for _ in range(draws):
        sampled = ops.convert_to_numpy(sample_classes(labels, num_classes, num_sampled, seed)[0])
        subsets.add(tuple(sorted(sampled.tolist())))
        inside = np.zeros(num_classes, bool)
        inside[sampled] = True
        together += np.outer(inside, inside)
    # 3 free slots among 11 negatives: a given pair is in the subset with probability C(9,1)/C(11,3) = 9/165
    # (std ~0.0093 over 600 draws); all C(11,3) = 165 subsets are reachable and most of them appear.
    pairs = together[1:, 1:][~np.eye(num_classes - 1, dtype=bool)] / draws
    np.testing.assert_allclose(pairs, 9 / 165, atol=0.035)
    assert len(subsets) > 140
