"""core.cosine_matrix, core.column_sq_norms and core.target_cosines: values and written-out gradients against
float64 NumPy (the formula, and central finite differences of it), on every backend, with and without XLA."""

import keras
import numpy as np
import pytest

import keras_margin as km
from keras_margin import core
from tests import numpy_reference as ref

pytestmark = pytest.mark.backend_agnostic


def _compiled(fn, jit: bool):
    """``fn`` under XLA (``jax.jit`` / ``tf.function(jit_compile=True)``) when ``jit``, else as it is."""
    if not jit:
        return fn
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    import tensorflow as tf

    return tf.function(fn, jit_compile=True)


def _value_and_gradients(fn, upstream, *args, jit=False):
    """``fn(*args)`` and the gradients of ``sum(upstream * fn(*args))`` w.r.t. every argument."""
    if keras.backend.backend() == "jax":
        import jax
        import jax.numpy as jnp

        def loss(*a):
            out = fn(*a)
            return jnp.sum(upstream * out), out

        grad_fn = _compiled(jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True), jit)
        grads, out = grad_fn(*[jnp.asarray(a) for a in args])
        return np.asarray(out), [np.asarray(g) for g in grads]
    import tensorflow as tf

    def value_and_grads(*a):
        with tf.GradientTape() as tape:
            for t in a:
                tape.watch(t)
            out = fn(*a)
            loss = tf.reduce_sum(upstream * out)
        return out, tape.gradient(loss, list(a))

    out, grads = _compiled(value_and_grads, jit)(*[tf.constant(a) for a in args])
    return out.numpy(), [g.numpy() for g in grads]


def _finite_differences(f, args, upstream, step=1e-6):
    """Central differences of ``sum(upstream * f(*args))`` in float64, one gradient per argument."""
    grads = []
    for i, a in enumerate(args):
        grad = np.zeros_like(a)
        for index in np.ndindex(a.shape):
            shifted = [arg.copy() for arg in args]
            shifted[i][index] += step
            up = np.sum(upstream * f(*shifted))
            shifted[i][index] -= 2 * step
            down = np.sum(upstream * f(*shifted))
            grad[index] = (up - down) / (2 * step)
        grads.append(grad)
    return grads


@pytest.mark.parametrize("jit", [False, True])
def test_cosine_matrix_value_and_gradients_match_float64_finite_differences(jit):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 7))
    kernel = rng.normal(size=(7, 9))
    kernel[:, 4] *= 1e-3  # a short column: its norm's derivative is large
    upstream = rng.normal(size=(5, 9)).astype("float32")
    got, (d_x, d_kernel) = _value_and_gradients(core.cosine_matrix, upstream, x.astype("float32"),
                                                kernel.astype("float32"), jit=jit)
    np.testing.assert_allclose(got, ref.cosine(x, kernel), rtol=1e-5, atol=1e-6)
    want_x, want_kernel = _finite_differences(ref.cosine, [x, kernel], upstream.astype(np.float64))
    np.testing.assert_allclose(d_x, want_x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_kernel, want_kernel, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("classes_first", [False, True], ids=["d_by_C", "class_major"])
@pytest.mark.parametrize("dim", [1, 2, 7, 512, 513])
def test_column_sq_norms_of_any_embedding_size_and_their_gradient(dim, classes_first):
    """The pairwise halving carries an odd term: every embedding size sums every entry once, in either layout
    (class-major, TensorFlow halves along the rows' contiguous axis)."""
    rng = np.random.default_rng(dim)
    kernel = rng.normal(size=(dim, 6)).astype("float32")
    upstream = rng.normal(size=(6,)).astype("float32")

    def norms(w):
        return core.column_sq_norms(w, classes_first=classes_first)

    stored = np.ascontiguousarray(kernel.T) if classes_first else kernel
    got, (d_kernel,) = _value_and_gradients(norms, upstream, stored, jit=True)
    np.testing.assert_allclose(got, np.sum(kernel.astype(np.float64) ** 2, axis=0), rtol=1e-6)
    want = 2.0 * kernel * upstream
    np.testing.assert_allclose(d_kernel, want.T if classes_first else want, rtol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's eager custom_gradient")
@pytest.mark.parametrize("options", [{}, {"chunk_size": 3}, {"chunk_size": 2, "chunk_by": "rows"},
                                     {"sample_rate": 0.5}], ids=["dense", "chunked", "rows", "sampled"])
def test_eager_gradients_equal_compiled_ones_for_every_fused_path(options):
    """Custom-gradient ops get the kernel's value, not the variable (read inside, eager TensorFlow took it for
    a variable of the op's own and failed: 'Must return gradient for each variable')."""
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(0).normal(size=(4, 8)).astype("float32"))
    y = tf.constant([0, 1, 2, 3])
    head = km.AMSoftmaxHead(10, fused_loss=True, **options)
    head.build([(4, 8), (4,)])
    state = head.seed_generator.state.numpy() if options.get("sample_rate") else None

    def gradients():
        if state is not None:  # the same sampled classes in both calls
            head.seed_generator.state.assign(state)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(head([x, y], training=True))
        return tape.gradient(loss, [x, head.kernel.value])

    eager = [g.numpy() for g in gradients()]
    compiled = [g.numpy() for g in tf.function(gradients, jit_compile=True)()]
    for got, want in zip(eager, compiled):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_target_cosines_pick_each_rows_class_column_and_route_the_gradient_there(jit):
    """The gather and its written-out gradient against NumPy indexing: ids outside [0, C) (possible under XLA,
    where the label check cannot raise) give 0 and no gradient; a class picked by two rows gets both gradients."""
    rng = np.random.default_rng(3)
    cos = rng.uniform(-1, 1, size=(6, 5)).astype("float32")
    ids = np.array([0, 4, 2, 2, -1, 5], dtype="int32")
    upstream = rng.normal(size=(6,)).astype("float32")
    got, (d_cos,) = _value_and_gradients(lambda c: core.target_cosines(c, ids), upstream, cos, jit=jit)

    valid = (ids >= 0) & (ids < 5)
    want = np.where(valid, cos[np.arange(6), np.clip(ids, 0, 4)], 0.0)
    want_grad = np.zeros_like(cos)
    want_grad[np.arange(6)[valid], ids[valid]] = upstream[valid]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(d_cos, want_grad)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (6, 4, 2), (33, 17, 9)], ids=lambda s: "x".join(map(str, s)))
def test_batch_product_is_x_transposed_times_g(shape, jit):
    """x^T @ g (the (d, C) kernel gradient's product) against NumPy in float64, square and non-square x, a
    batch of one; on TensorFlow through the written-out transpose."""
    batch, dim, classes = shape
    rng = np.random.default_rng(7)
    x = rng.normal(size=(batch, dim)).astype("float32")
    g = rng.normal(size=(batch, classes)).astype("float32")
    fn = _compiled(core.batch_product, jit)
    got = np.asarray(fn(x, g))
    assert got.shape == (dim, classes)
    np.testing.assert_allclose(got, x.astype("float64").T @ g.astype("float64"), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="a batch unknown at trace time: tf.function")
def test_batch_product_with_a_batch_unknown_when_traced():
    """A Keras fit whose last batch is short traces the step with a None batch: the transposed indices come
    from the runtime shape."""
    import tensorflow as tf

    fn = tf.function(core.batch_product, input_signature=[tf.TensorSpec([None, 4]), tf.TensorSpec([None, 3])])
    rng = np.random.default_rng(8)
    for batch in (5, 2):
        x = rng.normal(size=(batch, 4)).astype("float32")
        g = rng.normal(size=(batch, 3)).astype("float32")
        np.testing.assert_allclose(fn(x, g).numpy(), x.T @ g, rtol=1e-5, atol=1e-6)
