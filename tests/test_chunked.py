"""Chunked loss, over classes and over rows: equal to the unchunked loss and its gradients for every objective,
fused head, XLA training."""

import doctest
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

import keras_margin as km
import keras_margin.chunked
import keras_margin.row_chunked
from keras_margin.chunked import margin_loss
from tests import numpy_reference

pytestmark = pytest.mark.backend_agnostic

B, D, C = 12, 6, 10
# (chunk_by, chunk_size). Classes: one class per chunk, 3 (three full chunks and a last one moved back to overlap by 2),
# more than C (one chunk). Rows of the batch: one row per chunk, 5 (the last chunk overlapping by 3), more than B.
CHUNKS = [("classes", n) for n in (1, 3, 64)] + [("rows", n) for n in (1, 5, 64)]
CHUNK_IDS = [f"{by}{n}" for by, n in CHUNKS]


class ref:
    """NumPy float64 references written from the papers' formulas."""

    cosine = staticmethod(numpy_reference.cosine)
    psi = staticmethod(numpy_reference.psi)

    @staticmethod
    def loss(cos, y, target_cos, scale):
        logits = scale * cos
        rows = np.arange(len(y))
        logits[rows, y] = scale[:, 0] * target_cos
        top = logits.max(axis=1, keepdims=True)
        return np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0] - logits[rows, y]


def _lambda_after_one_step(head):
    return max(head.lambda_min, head.base * (1.0 + head.gamma * 1.0) ** (-head.power))


# name -> (head factory, NumPy target of the training call, whether the scale is |x|)
OBJECTIVES = {
    "normface": (lambda: km.NormFaceHead(C, s=16.0), lambda h, c: c),
    "sphereface": (lambda: km.SphereFaceHead(C, m=4),
                   lambda h, c: (_lambda_after_one_step(h) * c + ref.psi(c, h.m)) / (1.0 + _lambda_after_one_step(h))),
    "amsoftmax": (lambda: km.AMSoftmaxHead(C, s=30.0, m=0.35), lambda h, c: c - h.m),
    "x2softmax": (lambda: km.X2SoftmaxHead(C), lambda h, c: h.a * (np.arccos(c) - h.h) ** 2 + h.k),
    "x2softmax_straight_through": (lambda: km.X2SoftmaxHead(C, straight_through=True),
                                   lambda h, c: h.a * (np.arccos(c) - h.h) ** 2 + h.k),
    "arcface": (lambda: km.ArcFaceHead(C, s=64.0, m=0.5),
                lambda h, c: np.where(c >= math.cos(math.pi - h.m), np.cos(np.arccos(c) + h.m),
                                      c - h.m * math.sin(h.m))),
}


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(B, D)) * 3.0).astype("float32")
    kernel = rng.normal(size=(D, C)).astype("float32")
    # First and last class, and the classes on both sides of every chunk boundary used above.
    y = np.array([0, 9, 2, 3, 4, 5, 8, 7, 1, 6, 3, 8], dtype="int32")
    return x, kernel, y


def _scale(head, x, s):
    """The head's own scale: |x| for SphereFace, otherwise the differentiable scalar ``s``."""
    return head.scale(x) if isinstance(head, km.SphereFaceHead) else s


def _value_and_grads(fn, *args):
    """``fn(*args)`` (a scalar) and its gradient w.r.t. every argument, by the active backend's autodiff."""
    if keras.config.backend() == "jax":
        import jax

        value, grads = jax.value_and_grad(fn, argnums=tuple(range(len(args))))(*args)
        return float(value), [np.asarray(g) for g in grads]
    import tensorflow as tf

    args = [tf.convert_to_tensor(a) for a in args]
    with tf.GradientTape() as tape:
        tape.watch(args)
        value = fn(*args)
    grads = tape.gradient(value, args)
    return float(value), [np.zeros(a.shape, "float32") if g is None else g.numpy() for g, a in zip(grads, args)]


def _head_with_target(name):
    factory, np_target = OBJECTIVES[name]
    head = factory()
    x, _, _ = _data()
    head(x)  # build
    target = head.training_target()  # SphereFace: advances its schedule to lambda(1), once
    return head, target, np_target


@pytest.mark.parametrize("chunk_by, chunk_size", CHUNKS, ids=CHUNK_IDS)
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_chunked_loss_equals_float64_reference(name, chunk_by, chunk_size):
    head, target, np_target = _head_with_target(name)
    x, kernel, y = _data()
    s = np.float32(head.s)
    loss = ops.convert_to_numpy(margin_loss(x, kernel, y, target, _scale(head, x, s), chunk_size, chunk_by=chunk_by))

    x64, k64 = x.astype(np.float64), kernel.astype(np.float64)
    cos = ref.cosine(x64, k64)
    scale = np.linalg.norm(x64, axis=1, keepdims=True) if name == "sphereface" else np.full((B, 1), float(s))
    expected = ref.loss(cos, y, np_target(head, cos[np.arange(B), y]), scale)
    np.testing.assert_allclose(loss, expected, rtol=2e-5, atol=2e-5)


# By classes the backward pass is one recomputing pass whatever the upstream gradient; by rows a uniform upstream
# (a batch mean) takes the gradient formed in the forward pass and any other one the recomputing pass: both.
GRADIENT_CASES = [(by, n, "weighted") for by, n in CHUNKS] + [(by, n, "mean") for by, n in CHUNKS if by == "rows"]


@pytest.mark.parametrize("chunk_by, chunk_size, upstream", GRADIENT_CASES,
                         ids=[f"{by}{n}-{upstream}" for by, n, upstream in GRADIENT_CASES])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_chunked_loss_and_gradients_equal_unchunked(name, chunk_by, chunk_size, upstream):
    head, target, _ = _head_with_target(name)
    x, kernel, y = _data()
    # "mean": the uniform upstream gradient of a batch mean (by rows: the kernel gradient formed in the
    # forward pass); "weighted": a different upstream gradient per sample (by rows: the recomputing pass).
    weights = (np.full(B, 1.0 / B) if upstream == "mean" else np.linspace(0.5, 2.0, B)).astype("float32")

    def total(chunk):
        def fn(x, kernel, s):
            return ops.sum(weights * margin_loss(x, kernel, y, target, _scale(head, x, s), chunk, chunk_by=chunk_by))
        return fn

    s = np.float32(head.s)
    unchunked_value, unchunked_grads = _value_and_grads(total(None), x, kernel, s)
    chunked_value, chunked_grads = _value_and_grads(total(chunk_size), x, kernel, s)
    np.testing.assert_allclose(chunked_value, unchunked_value, rtol=1e-5)
    for wrt, got, want in zip(["x", "kernel", "s"], chunked_grads, unchunked_grads):
        # 1e-5 relative to the gradient's scale: X2-Softmax's analytic target gradient reaches ~100 here,
        # and float32 sums of such terms carry ~1e-5 absolute rounding in either path.
        atol = 1e-5 * max(1.0, float(np.max(np.abs(want))))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=f"d loss / d {wrt}")


@pytest.mark.parametrize("chunk_by", ["classes", "rows"])
def test_learned_normface_scale_gets_the_unchunked_gradient(chunk_by):
    x, kernel, y = _data()

    def fused_loss(chunk_size):
        head = km.NormFaceHead(C, s=12.0, learn_scale=True, fused_loss=True, chunk_size=chunk_size,
                               **({} if chunk_size is None else {"chunk_by": chunk_by}))
        head(x)
        head.kernel.assign(kernel)
        # One SGD step with learning rate 1 moves every weight by minus its gradient.
        model = keras.Model(*_fused_model_io(head))
        model.compile(keras.optimizers.SGD(1.0), loss=None)
        model.train_on_batch([x, y])
        return ops.convert_to_numpy(head.scale_weight) - 12.0, ops.convert_to_numpy(head.kernel) - kernel

    (ds_dense, dk_dense), (ds_chunked, dk_chunked) = fused_loss(None), fused_loss(3)
    assert abs(ds_dense) > 1e-4
    np.testing.assert_allclose(ds_chunked, ds_dense, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dk_chunked, dk_dense, rtol=1e-5, atol=1e-6)


def _fused_model_io(head, dim=D):
    embeddings, labels = keras.Input((dim,)), keras.Input((), dtype="int32")
    return [embeddings, labels], head([embeddings, labels])


@pytest.mark.parametrize("chunk_by", ["classes", "rows"])
def test_fused_head_returns_per_sample_loss_and_adds_its_mean(chunk_by):
    x, kernel, y = _data()
    head = km.AMSoftmaxHead(C, s=30.0, m=0.35, fused_loss=True, chunk_size=3, chunk_by=chunk_by)
    head(x)
    head.kernel.assign(kernel)
    out = ops.convert_to_numpy(head([x, y], training=True))
    cos = ref.cosine(x.astype(np.float64), kernel.astype(np.float64))
    expected = ref.loss(cos, y, cos[np.arange(B), y] - 0.35, np.full((B, 1), 30.0))
    assert out.shape == (B,)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)
    assert len(head.losses) == 1
    np.testing.assert_allclose(ops.convert_to_numpy(head.losses[0]), expected.mean(), rtol=2e-5)
    # Without training the margin is off: the plain softmax of s * cos.
    plain = ops.convert_to_numpy(head([x, y], training=False))
    np.testing.assert_allclose(plain, ref.loss(cos, y, cos[np.arange(B), y], np.full((B, 1), 30.0)),
                               rtol=2e-5, atol=2e-5)
    # On embeddings alone the head still returns the cosines.
    np.testing.assert_allclose(ops.convert_to_numpy(head(x)), cos, atol=2e-6)


def test_fused_symbolic_output_is_per_sample():
    inputs, output = _fused_model_io(km.ArcFaceHead(C, fused_loss=True, chunk_size=4))
    assert tuple(output.shape) == (None,)


def test_sphereface_chunked_training_call_advances_iteration_once():
    x, _, y = _data()
    head = km.SphereFaceHead(C, fused_loss=True, chunk_size=3)  # four chunks
    head([x, y], training=True)
    head([x, y], training=True)
    head([x, y], training=False)
    assert int(ops.convert_to_numpy(head.iteration)) == 2


def _separable_problem(num_classes=8, n_per_class=12, dim=10, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim)) * 3.0
    y = np.repeat(np.arange(num_classes), n_per_class).astype("int32")
    x = (centers[y] + rng.normal(size=(len(y), dim))).astype("float32")
    order = rng.permutation(len(y))
    return x[order], y[order]


@pytest.mark.parametrize("name, policy, chunk_by", [("amsoftmax", "float32", "classes"),
                                                    ("sphereface", "float32", "rows"),
                                                    ("arcface", "mixed_bfloat16", "classes"),
                                                    ("arcface", "mixed_bfloat16", "rows")])
def test_fused_chunked_head_trains_under_xla(name, policy, chunk_by):
    keras.mixed_precision.set_global_policy(policy)
    x, y = _separable_problem()
    options = {"fused_loss": True, "chunk_size": 3, "chunk_by": chunk_by}
    head = {"amsoftmax": lambda: km.AMSoftmaxHead(8, s=10.0, **options),
            "sphereface": lambda: km.SphereFaceHead(8, **options),
            "arcface": lambda: km.ArcFaceHead(8, s=10.0, **options)}[name]()
    embeddings, labels = keras.Input((x.shape[1],)), keras.Input((), dtype="int32")
    features = keras.layers.Dense(8)(keras.layers.Dense(16, activation="relu")(embeddings))
    model = keras.Model([embeddings, labels], head([features, labels]))
    model.compile(keras.optimizers.Adam(0.01), loss=None, jit_compile=True)
    losses = model.fit([x, y], epochs=10, batch_size=16, verbose=0).history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses
    cos = ops.convert_to_numpy(head(keras.Model(embeddings, features).predict(x, verbose=0)))
    assert np.mean(np.argmax(cos, axis=-1) == y) >= 0.9


def test_fused_chunked_model_saves_and_reloads(tmp_path):
    x, _, y = _data()
    model = keras.Model(*_fused_model_io(km.X2SoftmaxHead(C, fused_loss=True, chunk_size=4, chunk_by="rows")))
    path = tmp_path / "fused.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    head = reloaded.layers[-1]
    assert (head.chunk_size, head.chunk_by, head.sample_rate, head.fused_loss) == (4, "rows", 1.0, True)
    np.testing.assert_allclose(ops.convert_to_numpy(reloaded([x, y])), ops.convert_to_numpy(model([x, y])),
                               rtol=1e-6)


@pytest.mark.parametrize("head_cls", [km.NormFaceHead, km.SphereFaceHead, km.AMSoftmaxHead, km.X2SoftmaxHead,
                                      km.ArcFaceHead])
def test_scale_options_round_trip_through_get_config(head_cls):
    head = head_cls(C, chunk_size=128, sample_rate=0.25, fused_loss=True)
    config = head.get_config()
    assert (config["chunk_size"], config["sample_rate"], config["fused_loss"]) == (128, 0.25, True)
    clone = head_cls.from_config(config)
    assert (clone.chunk_size, clone.sample_rate, clone.fused_loss) == (128, 0.25, True)
    assert head_cls(C).get_config()["chunk_size"] is None and head_cls(C).get_config()["chunk_by"] == "classes"


@pytest.mark.parametrize("kwargs, message", [
    (dict(chunk_size=0, fused_loss=True), "`chunk_size` must be an integer >= 1"),
    (dict(chunk_size=2.5, fused_loss=True), "`chunk_size` must be an integer >= 1"),
    (dict(chunk_size=True, fused_loss=True), "`chunk_size` must be an integer >= 1"),
    (dict(sample_rate=0.0, fused_loss=True), r"`sample_rate` must be a finite number in \(0.0, 1.0\]"),
    (dict(sample_rate=1.5, fused_loss=True), r"`sample_rate` must be a finite number in \(0.0, 1.0\]"),
    (dict(fused_loss="yes"), "`fused_loss` must be a bool"),
    (dict(chunk_size=64), "pass fused_loss=True"),
    (dict(chunk_size=64, fused_loss=True, chunk_by="columns"), r"`chunk_by` must be one of \('classes', 'rows'\)"),
    (dict(fused_loss=True, chunk_by="rows"), "pass chunk_size too"),
    (dict(sample_rate=0.5), "pass fused_loss=True"),
])
def test_bad_scale_options_raise_value_error_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=f"AMSoftmaxHead: .*{message}"):
        km.AMSoftmaxHead(C, **kwargs)


@pytest.mark.parametrize("chunk_by", ["classes", "rows"])
def test_out_of_range_class_id_gives_nan_not_a_number(chunk_by):
    x, kernel, y = _data()
    y = y.copy()
    y[3] = C  # what a compiled step would see; eagerly the head raises first
    loss = ops.convert_to_numpy(margin_loss(x, kernel, y, lambda c: c - 0.35, 30.0, 3, chunk_by=chunk_by))
    assert np.isnan(loss[3]) and np.all(np.isfinite(np.delete(loss, 3)))


_MEMORY_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from keras_margin.chunked import margin_loss
    B, D, C = 256, 32, 16384
    x, w, y = jnp.ones((B, D)), jnp.ones((D, C)), jnp.arange(B, dtype="int32")
    for name, chunk, by in (("dense", None, "classes"), ("classes", 1024, "classes"), ("rows", 16, "rows")):
        loss = lambda x, w: jnp.mean(margin_loss(x, w, y, lambda c: c - 0.35, 30.0, chunk, chunk_by=by))
        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        print(name, step.lower(x, w).compile().memory_analysis().temp_size_in_bytes)
""")


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="runs once, in a JAX subprocess")
def test_chunked_gradient_keeps_chunk_blocks_not_the_logits_under_xla():
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    temp = dict(line.split() for line in result.stdout.strip().splitlines())
    logits_bytes, kernel_gradient = 256 * 16384 * 4, 32 * 16384 * 4
    assert int(temp["dense"]) >= logits_bytes  # the dense path holds (batch, C) buffers
    # By classes: a few (256, 1024) blocks, less than a fifth of a single (batch, C) buffer.
    assert int(temp["classes"]) < 0.2 * logits_bytes, temp
    # By rows: beyond the kernel gradient, 16-row chunks hold at most a tenth of the dense path's extra memory.
    extra = {k: int(v) - kernel_gradient for k, v in temp.items()}
    assert extra["rows"] <= 0.1 * extra["dense"], temp


@pytest.mark.parametrize("module", [keras_margin.chunked, keras_margin.row_chunked], ids=["chunked", "row_chunked"])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
