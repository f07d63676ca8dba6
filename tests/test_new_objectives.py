"""The objectives of issue 16 against NumPy (float64) transcriptions of their papers, written here.

Sub-center ArcFace (Deng et al., ECCV 2020, Sec. 3.1-3.2): cos(theta_j) = max over class j's k sub-centers,
ArcFace's target on it; the dominant sub-center of a class is the one most of its samples are closest to.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_margin as km
from tests import numpy_reference as ref

pytestmark = pytest.mark.backend_agnostic

B, D, C, K = 6, 4, 3, 2
S, M = 8.0, 0.4


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(B, D)) * 2.0).astype("float32")
    kernel = rng.normal(size=(D, C * K)).astype("float32")
    y = np.array([0, 1, 2, 1, 0, 2], "int32")
    return x, kernel, y


def _np_subcenter_cos(x, kernel, k=K):
    """max_c cos(x, W[:, j*k + c]), float64."""
    cos = ref.cosine(x, kernel)
    return cos.reshape(cos.shape[0], -1, k).max(axis=-1)


def _np_loss(x, kernel, y):
    cos = _np_subcenter_cos(x, kernel)
    return ref.margin_loss(cos, y, S, lambda c: ref.arcface_target(c, S, M))


def _head(x, kernel, **kwargs):
    head = km.SubCenterArcFaceHead(C, k=K, s=S, m=M, **kwargs)
    head(x)
    head.kernel.assign(kernel)
    return head


def _value_and_grad(fn, arg):
    if keras.config.backend() == "jax":
        import jax

        value, grad = jax.value_and_grad(fn)(arg)
        return float(value), np.asarray(grad)
    import tensorflow as tf

    arg = tf.convert_to_tensor(arg)
    with tf.GradientTape() as tape:
        tape.watch(arg)
        value = fn(arg)
    return float(value), tape.gradient(value, arg).numpy()


def test_subcenter_cosines_and_logits_match_the_reference():
    x, kernel, y = _data()
    head = _head(x, kernel)
    cos = _np_subcenter_cos(x, kernel)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(head(x)), cos, atol=1e-5)
    expected = ref.margin_logits(cos, y, S, lambda c: ref.arcface_target(c, S, M))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(head([x, y], training=True)), expected, atol=2e-4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(head([x, y], training=False)), S * cos, atol=2e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_subcenter_loss_and_kernel_gradient_match_finite_differences(fused):
    x, kernel, y = _data(1)
    head = _head(x, kernel, fused_loss=fused)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss(w):
        out, _ = head.stateless_call([w], [], [x, y], training=True)
        return keras.ops.mean(out) if fused else ce(y, out)

    value, grad = _value_and_grad(loss, kernel)
    np.testing.assert_allclose(value, _np_loss(x, kernel, y), rtol=1e-4)
    expected = ref.central_difference(lambda w: _np_loss(x, w, y), kernel)
    np.testing.assert_allclose(grad, expected, atol=2e-4)


def test_subcenter_cosine_form_loss_is_arcface_loss_on_the_pooled_cosines():
    x, kernel, y = _data(2)
    head = _head(x, kernel)
    np.testing.assert_allclose(float(head.loss(y, head(x))), _np_loss(x, kernel, y), rtol=1e-4)


def test_subcenter_trains_under_xla_fused_and_mixed_precision():
    x, kernel, y = _data(3)
    for policy in ("float32", "mixed_bfloat16"):
        keras.config.set_dtype_policy(policy)
        try:
            emb, labels = keras.Input((D,)), keras.Input((), dtype="int32")
            head = km.SubCenterArcFaceHead(C, k=K, s=S, m=M, fused_loss=True)
            model = keras.Model([emb, labels], head([emb, labels]))
            model.compile("sgd", loss=None, jit_compile=True)
            before = keras.ops.convert_to_numpy(head.kernel).copy()
            history = model.fit([x, y], epochs=1, batch_size=B, verbose=0)
        finally:
            keras.config.set_dtype_policy("float32")
        assert np.isfinite(history.history["loss"][0])
        assert head.kernel.dtype == "float32"
        assert not np.allclose(keras.ops.convert_to_numpy(head.kernel), before)


def test_dominant_kernel_keeps_each_class_majority_subcenter():
    x, kernel, y = _data(4)
    head = _head(x, kernel)
    cos = ref.cosine(x, kernel).reshape(B, C, K)
    votes = np.zeros((C, K), int)
    for i, label in enumerate(y):
        votes[label, int(np.argmax(cos[i, label]))] += 1
    expected = np.stack([kernel[:, j * K + int(np.argmax(votes[j]))] for j in range(C)], axis=1)
    np.testing.assert_array_equal(head.dominant_kernel(x, y), expected)
    arcface = head.to_arcface_head(x, y)
    assert isinstance(arcface, km.ArcFaceHead) and (arcface.s, arcface.m) == (S, M)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(arcface(x)), ref.cosine(x, expected), atol=1e-5)


@pytest.mark.parametrize("option", [{"chunk_size": 2}, {"sample_rate": 0.5}])
def test_subcenter_refuses_chunked_and_sampled_fused_losses(option):
    with pytest.raises(ValueError, match="sub-centers"):
        km.SubCenterArcFaceHead(C, fused_loss=True, **option)


def test_subcenter_rejects_bad_k_and_bad_labels():
    with pytest.raises(ValueError, match="k"):
        km.SubCenterArcFaceHead(C, k=0)
    x, kernel, _ = _data()
    with pytest.raises(ValueError, match="labels"):
        _head(x, kernel).dominant_kernel(x, np.full((B,), C))


# --------------------------------------------------------------------------------------------------
# CurricularFace (Huang et al., CVPR 2020), AdaCos (Zhang et al., CVPR 2019) and AdaFace (Kim et al., CVPR 2022):
# objectives with a batch statistic, against ``tests/numpy_reference.py``'s transcriptions of the released code
# (``curricularface_forward``, ``adacos_forward``, ``adaface_forward``) over consecutive training steps, and
# against finite differences.

SC, MC = 10.0, 0.5  # CurricularFace's s, m (a small s keeps the float32 loss well away from 0)
C5 = 5
STEPS = 3


def _steps_data(seed=10, classes=C5):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(D, classes)).astype("float32")
    ys = [rng.integers(0, classes, size=B).astype("int32") for _ in range(STEPS)]
    # Four samples near their class's weight (target angles below pi/4, where AdaCos' median matters), two
    # random ones (CurricularFace's hard negatives).
    pull = np.array([3.0, 3.0, 3.0, 3.0, 0.0, 0.0])[:, None]
    xs = [(pull * kernel[:, y].T / np.linalg.norm(kernel[:, y], axis=0)[:, None] + rng.normal(size=(B, D)))
          .astype("float32") for y in ys]
    return kernel, xs, ys


def _built(head, x, kernel):
    head(x)
    head.kernel.assign(kernel)
    return head


def _state_value(variable):
    return float(keras.ops.convert_to_numpy(variable))


@pytest.mark.parametrize("fused", [False, True])
def test_curricularface_three_training_steps_match_the_authors_code(fused):
    kernel, xs, ys = _steps_data()
    head = _built(km.CurricularFaceHead(C5, s=SC, m=MC, fused_loss=fused), xs[0], kernel)
    t = 0.0
    for x, y in zip(xs, ys):
        expected_logits, t = ref.curricularface_forward(ref.cosine(x, kernel), y, t, s=SC, m=MC)
        out = keras.ops.convert_to_numpy(head([x, y], training=True))
        if fused:
            np.testing.assert_allclose(out, ref.softmax_cross_entropy(expected_logits, y), rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_allclose(out, expected_logits, atol=1e-4)
        np.testing.assert_allclose(_state_value(head.t), t, rtol=1e-5, atol=1e-8)
    assert t != 0.0
    # An inference call leaves t as it is and gives s * cos.
    out = head([xs[0], ys[0]], training=False)
    np.testing.assert_allclose(_state_value(head.t), t, rtol=1e-5)
    if not fused:
        np.testing.assert_allclose(keras.ops.convert_to_numpy(out), SC * ref.cosine(xs[0], kernel), atol=1e-4)


@pytest.mark.parametrize("median", ["lower", "midpoint"])
@pytest.mark.parametrize("fused", [False, True])
def test_adacos_three_training_steps_match_the_reference_code(median, fused):
    kernel, xs, ys = _steps_data(11)
    head = _built(km.AdaCosHead(C5, median=median, fused_loss=fused), xs[0], kernel)
    s = ref.adacos_initial_scale(C5)
    np.testing.assert_allclose(_state_value(head.adaptive_scale), s, rtol=1e-6)
    for x, y in zip(xs, ys):  # B = 6, even: the two medians differ
        expected_logits, s = ref.adacos_forward(ref.cosine(x, kernel), y, s, median=median)
        out = keras.ops.convert_to_numpy(head([x, y], training=True))
        if fused:
            np.testing.assert_allclose(out, ref.softmax_cross_entropy(expected_logits, y), rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_allclose(out, expected_logits, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(_state_value(head.adaptive_scale), s, rtol=1e-5)


def test_adacos_medians_differ_on_an_even_batch():
    kernel, xs, ys = _steps_data(11)
    cos = ref.cosine(xs[0], kernel)
    lower = ref.adacos_forward(cos, ys[0], ref.adacos_initial_scale(C5), median="lower")[1]
    midpoint = ref.adacos_forward(cos, ys[0], ref.adacos_initial_scale(C5), median="midpoint")[1]
    assert abs(lower - midpoint) > 1e-3


AF_ALPHA = 0.5  # AdaFace's t_alpha in these tests: the statistics move visibly in each step


def _stateful_case(name, fused):
    """(head, its statistic's variable names, their values to start from, reference(x, w, y)): the reference
    returns the loss as a function of (embeddings, kernel) with the statistic (and AdaFace's norms) held at the
    values one training call from the start values takes, as the code's ``no_grad`` update does."""
    if name == "curricularface":
        head = km.CurricularFaceHead(C5, s=SC, m=MC, fused_loss=fused)
        t0 = 0.3  # a non-zero statistic, so the hard negatives' factor (t + cos) is exercised

        def reference(x, w, y):
            t = ref.curricularface_forward(ref.cosine(x, w), y, t0, s=SC, m=MC)[1]
            return lambda xx, ww: ref.softmax_cross_entropy(
                ref.curricularface_forward(ref.cosine(xx, ww), y, t, s=SC, m=MC, update=False)[0], y).mean()
        return head, ("t",), (t0,), reference
    if name == "adaface":
        head = km.AdaFaceHead(C5, s=SC, t_alpha=AF_ALPHA, fused_loss=fused)
        start = (4.0, 1.5)

        def reference(x, w, y):
            _, mean, std = ref.adaface_forward(x, ref.cosine(x, w), y, *start, s=SC, t_alpha=AF_ALPHA)
            return lambda xx, ww: ref.softmax_cross_entropy(ref.adaface_forward(
                x, ref.cosine(xx, ww), y, mean, std, s=SC, t_alpha=AF_ALPHA, update=False)[0], y).mean()
        return head, ("batch_mean", "batch_std"), start, reference
    head = km.AdaCosHead(C5, fused_loss=fused)
    s0 = ref.adacos_initial_scale(C5)

    def reference(x, w, y):
        s = ref.adacos_forward(ref.cosine(x, w), y, s0, median="midpoint")[1]
        return lambda xx, ww: ref.softmax_cross_entropy(
            ref.adacos_forward(ref.cosine(xx, ww), y, s, update=False)[0], y).mean()
    return head, ("adaptive_scale",), (s0,), reference


def _states(head, names):
    return [_state_value(getattr(head, name)) for name in names]


NAMES = ["curricularface", "adacos", "adaface"]


@pytest.mark.parametrize("fused", [False, True])
def test_adaface_three_training_steps_match_the_authors_code(fused):
    kernel, xs, ys = _steps_data(17)
    head = _built(km.AdaFaceHead(C5, s=SC, t_alpha=AF_ALPHA, fused_loss=fused), xs[0], kernel)
    mean, std = 20.0, 100.0
    assert _states(head, ("batch_mean", "batch_std")) == [mean, std]
    for x, y in zip(xs, ys):
        expected_logits, mean, std = ref.adaface_forward(x, ref.cosine(x, kernel), y, mean, std, s=SC,
                                                         t_alpha=AF_ALPHA)
        out = keras.ops.convert_to_numpy(head([x, y], training=True))
        if fused:
            np.testing.assert_allclose(out, ref.softmax_cross_entropy(expected_logits, y), rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_allclose(out, expected_logits, atol=1e-4)
        np.testing.assert_allclose(_states(head, ("batch_mean", "batch_std")), [mean, std], rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_stateful_loss_gradients_match_finite_differences(name, fused):
    """The statistic's update carries no gradient (the code's no_grad): the reference holds it constant."""
    kernel, xs, ys = _steps_data(12)
    x, y = xs[0], ys[0]
    head, names, start, reference = _stateful_case(name, fused)
    _built(head, x, kernel)
    for variable_name, value in zip(names, start):
        getattr(head, variable_name).assign(value)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    fixed = reference(x.astype("float64"), kernel.astype("float64"), y)

    def loss(w, xx):
        out, _ = head.stateless_call([w], list(start), [xx, y], training=True)
        return keras.ops.mean(out) if fused else ce(y, out)

    value, grad_w = _value_and_grad(lambda w: loss(w, x), kernel)
    _, grad_x = _value_and_grad(lambda xx: loss(kernel, xx), x)
    np.testing.assert_allclose(value, fixed(x, kernel), rtol=1e-4)
    np.testing.assert_allclose(grad_w, ref.central_difference(lambda w: fixed(x, w), kernel), atol=2e-4)
    np.testing.assert_allclose(grad_x, ref.central_difference(lambda xx: fixed(xx, kernel), x), atol=2e-4)


@pytest.mark.parametrize("name", NAMES)
def test_stateful_heads_save_and_restore_their_statistic(name, tmp_path):
    kernel, xs, ys = _steps_data(13)
    head, names, _, _ = _stateful_case(name, fused=False)
    emb, labels = keras.Input((D,)), keras.Input((), dtype="int32")
    model = keras.Model([emb, labels], head([emb, labels], training=True))
    head.kernel.assign(kernel)
    for x, y in zip(xs[:2], ys[:2]):
        model([x, y])
    state = _states(head, names)
    path = str(tmp_path / "head.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    loaded_head = loaded.layers[-1]
    assert type(loaded_head) is type(head)
    assert _states(loaded_head, names) == state
    # The third step continues from the saved statistic.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded([xs[2], ys[2]])),
                               keras.ops.convert_to_numpy(model([xs[2], ys[2]])), atol=1e-5)
    assert _states(loaded_head, names) == _states(head, names) != state


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
@pytest.mark.parametrize("name", NAMES)
def test_stateful_heads_train_under_xla(name, policy, fused):
    """One fit step under XLA (fused loss, or dense logits with a sparse cross-entropy): the statistic after it is
    the reference's first update (taken before the kernel moves)."""
    kernel, xs, ys = _steps_data(14)
    keras.config.set_dtype_policy(policy)
    try:
        head, names, _, _ = _stateful_case(name, fused=fused)
        emb, labels = keras.Input((D,)), keras.Input((), dtype="int32")
        model = keras.Model([emb, labels], head([emb, labels]))
        # No loss scaling: its first step (scale 2^15) overflows float16 and is skipped, leaving the kernel as is.
        loss = None if fused else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile("sgd", loss=loss, jit_compile=True, auto_scale_loss=False)
        head.kernel.assign(kernel)
        history = model.fit([xs[0], ys[0]], None if fused else ys[0], epochs=1, batch_size=B, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    assert np.isfinite(history.history["loss"][0])
    assert head.kernel.dtype == "float32" and all(getattr(head, n).dtype == "float32" for n in names)
    assert not np.allclose(keras.ops.convert_to_numpy(head.kernel), kernel)
    cos = ref.cosine(xs[0], kernel)
    if name == "curricularface":
        expected = [ref.curricularface_forward(cos, ys[0], 0.0, s=SC, m=MC)[1]]
    elif name == "adaface":
        expected = list(ref.adaface_forward(xs[0], cos, ys[0], 20.0, 100.0, s=SC, t_alpha=AF_ALPHA)[1:])
    else:
        expected = [ref.adacos_forward(cos, ys[0], ref.adacos_initial_scale(C5), median="midpoint")[1]]
    tol = 1e-5 if policy == "float32" else 2e-3
    np.testing.assert_allclose(_states(head, names), expected, rtol=tol, atol=tol * 1e-2)


def test_curricularface_class_sampled_loss_updates_t_from_the_targets():
    kernel, xs, ys = _steps_data(15, classes=10)
    head = _built(km.CurricularFaceHead(10, s=SC, m=MC, fused_loss=True, sample_rate=0.5), xs[0], kernel)
    out = keras.ops.convert_to_numpy(head([xs[0], ys[0]], training=True))
    assert out.shape == (B,) and np.all(np.isfinite(out))
    expected_t = ref.curricularface_forward(ref.cosine(xs[0], kernel), ys[0], 0.0, s=SC, m=MC)[1]
    np.testing.assert_allclose(_state_value(head.t), expected_t, rtol=1e-5)


def test_fixed_adacos_is_normface_with_the_fixed_scale():
    kernel, xs, ys = _steps_data(16)
    head = _built(km.AdaCosHead(C5, adaptive=False), xs[0], kernel)
    s = ref.adacos_initial_scale(C5)
    assert not head.non_trainable_weights
    cos = ref.cosine(xs[0], kernel)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(head([xs[0], ys[0]], training=True)), s * cos, atol=1e-5)
    np.testing.assert_allclose(float(head.loss(ys[0], head(xs[0]))),
                               ref.softmax_cross_entropy(s * cos, ys[0]).mean(), rtol=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda: km.CurricularFaceHead(C5, fused_loss=True, chunk_size=2), "chunk_size"),
    (lambda: km.AdaCosHead(C5, fused_loss=True, chunk_size=2), "chunk_size"),
    (lambda: km.AdaCosHead(C5, fused_loss=True, sample_rate=0.5), "sample_rate"),
    (lambda: km.AdaCosHead(2), "num_classes"),
    (lambda: km.AdaCosHead(C5, median="mean"), "median"),
    (lambda: km.AdaCosHead(C5, s=0.0), "s"),
    (lambda: km.CurricularFaceHead(C5, momentum=0.0), "momentum"),
    (lambda: km.CurricularFaceHead(C5, m=4.0), "m"),
    (lambda: km.CurricularFaceHead(C5).loss, "compile"),
    (lambda: km.AdaCosHead(C5).loss, "compile"),
    (lambda: km.AdaFaceHead(C5).loss, "compile"),
    (lambda: km.AdaFaceHead(C5, fused_loss=True, chunk_size=2), "chunk_size"),
    (lambda: km.AdaFaceHead(C5, h=0.0), "h"),
    (lambda: km.AdaFaceHead(C5, t_alpha=1.5), "t_alpha"),
    (lambda: km.AdaFaceHead(C5)([np.ones((1, D), "float32"), np.zeros((1,), "int32")], training=True), "batch"),
])
def test_stateful_heads_reject_what_they_cannot_do(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# --------------------------------------------------------------------------------------------------
# MagFace (Meng et al., CVPR 2021) and L-Softmax (Liu et al., ICML 2016): against ``tests/numpy_reference.py``'s
# transcriptions of the authors' code (``magface_forward``: MagLinear + MagLoss; ``lsoftmax_caffe_forward``: the
# Caffe layer's Forward_cpu with its sign blobs) and against finite differences.

MAG = {"s": 10.0, "l_a": 1.5, "u_a": 6.0, "l_m": 0.3, "u_m": 0.7, "lambda_g": 3.0}  # test norms fall inside [l_a, u_a]


def _mag_data(seed=20, classes=C5):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(D, classes)).astype("float32")
    y = rng.integers(0, classes, size=B).astype("int32")
    x = rng.normal(size=(B, D))
    x = x / np.linalg.norm(x, axis=1, keepdims=True) * np.array([1.0, 2.0, 3.0, 4.0, 5.0, 7.0])[:, None]
    x[0] = -kernel[:, y[0]] / np.linalg.norm(kernel[:, y[0]]) * 2.5  # theta_y = pi: the easy margin / fallback
    return x.astype("float32"), kernel, y


def _mag_loss_reference(y, easy_margin=True):
    def loss(x, w):
        logits, g = ref.magface_forward(x, w, y, MAG["s"], MAG["l_a"], MAG["u_a"], MAG["l_m"], MAG["u_m"],
                                        easy_margin=easy_margin)
        return ref.softmax_cross_entropy(logits, y).mean() + MAG["lambda_g"] * g.mean()
    return loss


@pytest.mark.parametrize("easy_margin", [True, False])
def test_magface_logits_and_regularizer_match_the_authors_code(easy_margin):
    x, kernel, y = _mag_data()
    head = _built(km.MagFaceHead(C5, easy_margin=easy_margin, **MAG), x, kernel)
    logits, g = ref.magface_forward(x, kernel, y, MAG["s"], MAG["l_a"], MAG["u_a"], MAG["l_m"], MAG["u_m"],
                                    easy_margin=easy_margin)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(head([x, y], training=True)), logits, atol=2e-4)
    assert len(head.losses) == 1
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(head.losses[0])), MAG["lambda_g"] * g.mean(),
                               rtol=1e-5)
    out = head([x, y], training=False)
    assert not head.losses
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), MAG["s"] * ref.cosine(x, kernel), atol=2e-4)


@pytest.mark.parametrize("option", [{}, {"chunk_size": 4}])
def test_magface_fused_loss_is_cross_entropy_plus_regularizer_per_sample(option):
    x, kernel, y = _mag_data(21)
    head = _built(km.MagFaceHead(C5, fused_loss=True, **option, **MAG), x, kernel)
    logits, g = ref.magface_forward(x, kernel, y, MAG["s"], MAG["l_a"], MAG["u_a"], MAG["l_m"], MAG["u_m"])
    expected = ref.softmax_cross_entropy(logits, y) + MAG["lambda_g"] * g
    np.testing.assert_allclose(keras.ops.convert_to_numpy(head([x, y], training=True)), expected, rtol=1e-4)
    evaluation = ref.softmax_cross_entropy(MAG["s"] * ref.cosine(x, kernel), y)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(head([x, y], training=False)), evaluation, rtol=1e-4)


@pytest.mark.parametrize("form", ["dense", "fused", "chunked"])
@pytest.mark.parametrize("easy_margin", [True, False])
def test_magface_gradients_match_finite_differences(form, easy_margin):
    """The margin depends on |x| with its gradient (the code's x_norm is not detached): checked w.r.t. x too."""
    x, kernel, y = _mag_data(22)
    option = {"dense": {}, "fused": {"fused_loss": True}, "chunked": {"fused_loss": True, "chunk_size": 4}}[form]
    head = _built(km.MagFaceHead(C5, easy_margin=easy_margin, **option, **MAG), x, kernel)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss(w, xx):
        if form != "dense":
            out, _ = head.stateless_call([w], [], [xx, y], training=True)
            return keras.ops.mean(out)
        out, _, added = head.stateless_call([w], [], [xx, y], training=True, return_losses=True)
        return ce(y, out) + added[0]

    fixed = _mag_loss_reference(y, easy_margin)
    value, grad_w = _value_and_grad(lambda w: loss(w, x), kernel)
    _, grad_x = _value_and_grad(lambda xx: loss(kernel, xx), x)
    np.testing.assert_allclose(value, fixed(x, kernel), rtol=1e-4)
    np.testing.assert_allclose(grad_w, ref.central_difference(lambda w: fixed(x, w), kernel), atol=2e-4)
    np.testing.assert_allclose(grad_x, ref.central_difference(lambda xx: fixed(xx, kernel), x), atol=2e-4)


def test_magface_class_sampled_loss_keeps_the_regularizer():
    x, kernel, y = _mag_data(23, classes=10)
    head = _built(km.MagFaceHead(10, fused_loss=True, sample_rate=0.5, **MAG), x, kernel)
    out = keras.ops.convert_to_numpy(head([x, y], training=True))
    g = ref.magface_forward(x, kernel, y, MAG["s"], MAG["l_a"], MAG["u_a"], MAG["l_m"], MAG["u_m"])[1]
    full = ref.magface_forward(x, kernel, y, MAG["s"], MAG["l_a"], MAG["u_a"], MAG["l_m"], MAG["u_m"])[0]
    # Fewer negatives: each sampled loss lies between the regularizer alone and the full-softmax loss.
    assert np.all(out > MAG["lambda_g"] * g) and np.all(out <= ref.softmax_cross_entropy(full, y)
                                                        + MAG["lambda_g"] * g + 1e-4)


def _lsoftmax_data(seed=30):
    rng = np.random.default_rng(seed)
    kernel = (rng.normal(size=(D, C5)) * rng.uniform(0.5, 2.0, size=C5)).astype("float32")  # unequal |W_j|
    xs = [(rng.normal(size=(B, D)) * 1.5).astype("float32") for _ in range(STEPS)]
    ys = [rng.integers(0, C5, size=B).astype("int32") for _ in range(STEPS)]
    return kernel, xs, ys


LS = {"base": 10.0, "gamma": 0.5, "power": 2.0, "lambda_min": 1.0}  # lambda 4.44, 2.5, 1.6: the schedule moves


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_lsoftmax_three_training_steps_match_the_caffe_layer(m, fused):
    kernel, xs, ys = _lsoftmax_data()
    head = _built(km.LSoftmaxHead(C5, m=m, fused_loss=fused, **LS), xs[0], kernel)
    for step, (x, y) in enumerate(zip(xs, ys), start=1):
        expected = ref.lsoftmax_caffe_forward(x, kernel, y, m, ref.lsoftmax_lambda(step, **LS))
        out = keras.ops.convert_to_numpy(head([x, y], training=True))
        if fused:
            np.testing.assert_allclose(out, ref.softmax_cross_entropy(expected, y), rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
        assert int(keras.ops.convert_to_numpy(head.iteration)) == step
    out = head([xs[0], ys[0]], training=False)  # the test nets' SINGLE layer: x . W; the counter stays
    assert int(keras.ops.convert_to_numpy(head.iteration)) == STEPS
    if not fused:
        np.testing.assert_allclose(keras.ops.convert_to_numpy(out), xs[0].astype("float64") @ kernel, rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("m", [2, 3, 4])
def test_lsoftmax_gradients_match_finite_differences(m, fused):
    kernel, xs, ys = _lsoftmax_data(31)
    x, y = xs[0], ys[0]
    head = _built(km.LSoftmaxHead(C5, m=m, fused_loss=fused, **LS), x, kernel)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    lam = ref.lsoftmax_lambda(1, **LS)  # the call advances the counter from 0 to 1 first

    def loss(w, xx):
        out, _ = head.stateless_call([w], [np.int32(0)], [xx, y], training=True)
        return keras.ops.mean(out) if fused else ce(y, out)

    def fixed(xx, w):
        return ref.softmax_cross_entropy(ref.lsoftmax_caffe_forward(xx, w, y, m, lam), y).mean()

    value, grad_w = _value_and_grad(lambda w: loss(w, x), kernel)
    _, grad_x = _value_and_grad(lambda xx: loss(kernel, xx), x)
    np.testing.assert_allclose(value, fixed(x, kernel), rtol=1e-4)
    np.testing.assert_allclose(grad_w, ref.central_difference(lambda w: fixed(x, w), kernel), rtol=1e-3, atol=5e-4)
    np.testing.assert_allclose(grad_x, ref.central_difference(lambda xx: fixed(xx, kernel), x), rtol=1e-3, atol=5e-4)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
@pytest.mark.parametrize("name", ["magface", "lsoftmax"])
def test_magface_and_lsoftmax_train_under_xla(name, policy, fused):
    x, kernel, y = _mag_data(24)
    keras.config.set_dtype_policy(policy)
    try:
        head = (km.MagFaceHead(C5, fused_loss=fused, **MAG) if name == "magface"
                else km.LSoftmaxHead(C5, fused_loss=fused, **LS))
        emb, labels = keras.Input((D,)), keras.Input((), dtype="int32")
        model = keras.Model([emb, labels], head([emb, labels]))
        loss = None if fused else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile("sgd", loss=loss, jit_compile=True, auto_scale_loss=False)
        head.kernel.assign(kernel)
        history = model.fit([x, y], None if fused else y, epochs=1, batch_size=B, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    assert np.isfinite(history.history["loss"][0])
    assert head.kernel.dtype == "float32"
    assert not np.allclose(keras.ops.convert_to_numpy(head.kernel), kernel)
    if name == "magface":  # the reported loss is the code's loss at the starting kernel (one step, one batch)
        tol = 1e-4 if policy == "float32" else 2e-2
        np.testing.assert_allclose(history.history["loss"][0], _mag_loss_reference(y)(x, kernel), rtol=tol)
    else:
        assert int(keras.ops.convert_to_numpy(head.iteration)) == 1


@pytest.mark.parametrize("make, message", [
    (lambda: km.MagFaceHead(C5).loss, "compile"),
    (lambda: km.MagFaceHead(C5, l_a=10.0, u_a=5.0), "u_a"),
    (lambda: km.MagFaceHead(C5, l_m=0.5, u_m=0.4), "u_m"),
    (lambda: km.MagFaceHead(C5, lambda_g=-1.0), "lambda_g"),
    (lambda: km.MagFaceHead(C5, easy_margin=1), "easy_margin"),
    (lambda: km.LSoftmaxHead(C5).loss, "compile"),
    (lambda: km.LSoftmaxHead(C5, fused_loss=True, chunk_size=2), "chunk_size"),
    (lambda: km.LSoftmaxHead(C5, fused_loss=True, sample_rate=0.5), "sample_rate"),
    (lambda: km.LSoftmaxHead(C5, m=5), "m"),
    (lambda: km.LSoftmaxHead(C5, s=30.0), "s"),
    (lambda: km.LSoftmaxHead(C5, base=0.0), "base"),
])
def test_magface_and_lsoftmax_reject_what_they_cannot_do(make, message):
    with pytest.raises(ValueError, match=message):
        make()
