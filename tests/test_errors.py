"""Bad input gets a ValueError that names the problem, never a backend stack trace or a wrong answer."""

import math

import keras
import numpy as np
import pytest
from keras import ops

import keras_margin as km
from keras_margin import losses

pytestmark = pytest.mark.backend_agnostic

C = 5
X = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
COS = np.random.default_rng(1).uniform(-1, 1, size=(4, C)).astype("float32")


@pytest.fixture
def head():
    h = km.AMSoftmaxHead(C)
    h(X)
    return h


@pytest.mark.parametrize("labels", [np.zeros((4, 2, 1), "int32"), np.zeros((4, 3), "int32"),
                                    np.zeros((), "int32")])
def test_labels_of_wrong_shape(head, labels):
    with pytest.raises(ValueError, match=r"labels must be integer class ids of shape \(batch,\)"):
        head([X, labels], training=True)
    with pytest.raises(ValueError, match="labels must be"):
        losses.AMSoftmaxLoss()(labels, COS)


def test_float_labels_are_refused(head):
    labels = np.array([0.0, 1.0, 2.0, 3.0], "float32")
    with pytest.raises(ValueError, match="sparse labels must be integer class ids; got float32"):
        head([X, labels], training=True)
    with pytest.raises(ValueError, match="must be integer class ids; got float32"):
        losses.AMSoftmaxLoss()(labels, COS)


@pytest.mark.parametrize("bad_id", [C, C + 10, -1])
def test_class_id_out_of_range(head, bad_id):
    labels = np.array([0, 1, bad_id, 2], "int32")
    with pytest.raises(ValueError, match=rf"class ids must be in \[0, {C}\); got \[{bad_id}\]"):
        head([X, labels], training=True)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 5\)"):
        losses.ArcFaceLoss()(labels, COS)


def test_out_of_range_class_id_under_xla_gives_nan_not_a_plausible_loss():
    model = keras.Sequential([keras.Input((8,)), km.AMSoftmaxHead(C)])
    model.compile("sgd", loss=model.layers[-1].loss, jit_compile=True)
    value = model.evaluate(X, np.array([0, 1, 7, 2], "int32"), verbose=0)
    assert math.isnan(value)


@pytest.mark.parametrize("shape", [(4,), (4, 2, 4)])
def test_embeddings_of_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"embeddings must have shape \(batch, embedding_dim\)"):
        km.ArcFaceHead(C)(np.zeros(shape, "float32"))


def test_cosines_of_wrong_rank_in_loss():
    with pytest.raises(ValueError, match=r"y_pred must be the cosines of shape \(batch, num_classes\)"):
        losses.NormFaceLoss()(np.array([0]), np.zeros((1, 2, 3), "float32"))


def test_nan_embeddings(head):
    x = X.copy()
    x[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"embeddings contain NaN or inf \(rows \[2\]\)"):
        head(x)


def test_nan_cosines_in_loss():
    cos = COS.copy()
    cos[0, 0] = np.inf
    with pytest.raises(ValueError, match="contains NaN or inf"):
        losses.AMSoftmaxLoss()(np.array([0, 1, 2, 3]), cos)


@pytest.mark.parametrize(
    "factory, argument",
    [
        (lambda: km.AMSoftmaxHead(C, m=-0.1), "`m`"),
        (lambda: km.AMSoftmaxHead(C, m=1.5), "`m`"),
        (lambda: km.AMSoftmaxHead(C, s=0.0), "`s`"),
        (lambda: km.ArcFaceHead(C, s=-1.0), "`s`"),
        (lambda: km.ArcFaceHead(C, m=4.0), "`m`"),
        (lambda: km.SphereFaceHead(C, m=5), "`m`"),
        (lambda: km.SphereFaceHead(C, m=2.5), "`m`"),
        (lambda: km.SphereFaceHead(C, lambda_min=-1.0), "`lambda_min`"),
        (lambda: km.SphereFaceHead(C, base=0.0), "`base`"),
        (lambda: km.X2SoftmaxHead(C, a=0.5), "`a`"),
        (lambda: km.X2SoftmaxHead(C, h=4.0), "`h`"),
        (lambda: km.X2SoftmaxHead(C, k=1.5), "`k`"),
        (lambda: km.NormFaceHead(C, s=float("nan")), "`s`"),
        (lambda: km.NormFaceHead(1), "`num_classes`"),
        (lambda: km.NormFaceHead(2.5), "`num_classes`"),
        (lambda: km.CosineDense(0), "`units`"),
        (lambda: losses.AMSoftmaxLoss(m=2.0), "`m`"),
        (lambda: losses.SphereFaceLoss(m=0), "`m`"),
        (lambda: losses.SphereFaceLoss(lambda_=-2.0), "`lambda_`"),
        (lambda: losses.CombinedMarginLoss(m1=0.0), "`m1`"),
        (lambda: losses.X2SoftmaxLoss(s="64"), "`s`"),
        (lambda: km.normface_scale_lower_bound(10, 1.0), "`probability`"),
        # Finite in float64, inf in float32 (the computation's dtype).
        (lambda: km.AMSoftmaxHead(C, s=1e39), "`s`"),
        (lambda: losses.ArcFaceLoss(s=1e39), "`s`"),
        (lambda: losses.SphereFaceLoss(lambda_=1e308), "`lambda_`"),
        (lambda: km.SphereFaceHead(C, lambda_min=1e308), "`lambda_min`"),
    ],
)
def test_hyper_parameters_out_of_range(factory, argument):
    with pytest.raises(ValueError, match=argument):
        factory()


def test_wrong_number_of_inputs(head):
    with pytest.raises(ValueError, match=r"expected embeddings or \[embeddings, labels\]; got 3 inputs"):
        head([X, np.zeros(4, "int32"), np.zeros(4, "int32")])


def test_one_hot_labels_accepted_by_loss():
    y = np.array([0, 1, 2, 3])
    sparse = ops.convert_to_numpy(losses.AMSoftmaxLoss()(y, COS))
    one_hot = ops.convert_to_numpy(losses.AMSoftmaxLoss()(np.eye(C, dtype="float32")[y], COS))
    assert sparse == pytest.approx(one_hot, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Out-of-range class ids in model.fit: eager and graph mode (no XLA) raise the named error; under XLA the
# loss is NaN and NaNLossDiagnosis names the batch.

BAD_LABELS = np.array([0, 1, 2, 3, 4, 0, 7, 1], "int32")  # 7 is not one of the 5 classes: batch 1 of 2
X8 = np.random.default_rng(3).normal(size=(8, 8)).astype("float32")
ONE_BAD_ID = r"class ids must be in \[0, 5\); got\]? \[7\]"  # eager: "got [7] (...)"; TF graph: "got] [7]"


def _sequential(compile_kwargs):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8), km.AMSoftmaxHead(C)])
    model.compile("sgd", loss=model.layers[-1].loss, **compile_kwargs)
    return model


def _label_aware(fused, compile_kwargs):
    x_in, y_in = keras.Input((8,)), keras.Input((), dtype="int32")
    head = km.ArcFaceHead(C, s=10.0, fused_loss=fused)
    out = head([keras.layers.Dense(8)(x_in), y_in])
    model = keras.Model([x_in, y_in], out)
    if fused:
        model.compile("sgd", loss=None, **compile_kwargs)
    else:
        model.compile("sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), **compile_kwargs)
    return model


def _fit(model, fused_or_label_aware=None, **kwargs):
    if fused_or_label_aware is None:
        return model.fit(X8, BAD_LABELS, batch_size=4, epochs=1, verbose=0, shuffle=False, **kwargs)
    if fused_or_label_aware == "fused":
        return model.fit([X8, BAD_LABELS], batch_size=4, epochs=1, verbose=0, shuffle=False, **kwargs)
    return model.fit([X8, BAD_LABELS], BAD_LABELS, batch_size=4, epochs=1, verbose=0, shuffle=False, **kwargs)


MODELS = {
    "sequential_loss": (lambda kw: _sequential(kw), None),
    "label_aware": (lambda kw: _label_aware(False, kw), "label_aware"),
    "fused": (lambda kw: _label_aware(True, kw), "fused"),
}


@pytest.mark.parametrize("form", list(MODELS))
def test_out_of_range_class_id_raises_in_eager_fit(form):
    factory, kind = MODELS[form]
    with pytest.raises(ValueError, match=ONE_BAD_ID):
        _fit(factory({"run_eagerly": True}), kind)


@pytest.mark.parametrize("form", list(MODELS))
def test_out_of_range_class_id_raises_in_compiled_fit_without_xla(form):
    """TensorFlow: a tf.function graph, where a tf.debugging.Assert raises (InvalidArgumentError, same text);
    JAX: jit_compile=False runs the step on concrete arrays, where the ValueError is raised."""
    factory, kind = MODELS[form]
    model = factory({"jit_compile": False})
    kernels = [ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
    with pytest.raises(Exception, match=ONE_BAD_ID) as error:
        _fit(model, kind)
    if keras.backend.backend() == "jax":
        assert isinstance(error.value, ValueError)
    # Raised before any update from the bad batch; the first (good) batch did train.
    assert any(not np.array_equal(ops.convert_to_numpy(w), k) for w, k in zip(model.trainable_weights, kernels))
    if keras.backend.backend() == "tensorflow":
        assert "(1 of 4 labels)" in str(error.value).replace("count:] [1] [of] [4] [labels)", "(1 of 4 labels)")


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow graph mode")
def test_tensorflow_graph_mode_stops_before_the_bad_batch_updates_the_weights():
    model = _sequential({"jit_compile": False})
    before = [ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
    with pytest.raises(Exception, match=ONE_BAD_ID):
        model.fit(X8[4:], BAD_LABELS[4:], batch_size=4, epochs=1, verbose=0)  # only the bad batch
    for w, b in zip(model.trainable_weights, before):
        np.testing.assert_array_equal(ops.convert_to_numpy(w), b)


@pytest.mark.parametrize("form", list(MODELS))
def test_out_of_range_class_id_under_xla_gives_nan_and_the_callback_names_the_batch(form):
    factory, kind = MODELS[form]
    if form == "label_aware" and keras.backend.backend() == "jax":
        pytest.skip("the head's NaN logits reach Keras' SparseCategoricalCrossentropy, which under jax.jit gives 0 "
                    "for a label outside [0, C) whatever the logits (XLA folds one_hot * log_softmax into a select); "
                    "head.loss and the fused form see the ids themselves")
    model = factory({"jit_compile": True})
    history = _fit(model, kind)
    assert math.isfinite(history.history["loss"][0]) is False
    diagnosis = km.callbacks.NaNLossDiagnosis()
    with pytest.raises(km.callbacks.NaNLossError, match=r"at epoch 1, batch 1 ") as error:
        _fit(factory({"jit_compile": True}), kind, callbacks=[diagnosis])
    message = str(error.value)
    assert "class ids outside [0, 5)" in message and "NaN or inf embeddings" in message
    assert "run_eagerly=True" in message
    assert (diagnosis.epoch, diagnosis.batch) == (1, 1)
    assert isinstance(error.value, ValueError)


def test_callback_counts_epochs_and_lets_finite_losses_through():
    x, y = X8, np.array([0, 1, 2, 3, 4, 0, 1, 2], "int32")
    model = _sequential({"jit_compile": True})
    diagnosis = km.callbacks.NaNLossDiagnosis()
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[diagnosis])
    assert len(history.history["loss"]) == 2 and diagnosis.batch is None
    y_bad = y.copy()
    y_bad[1] = -3
    with pytest.raises(km.callbacks.NaNLossError, match=r"at epoch 2, batch 0 "):
        # epoch 1 on good labels, then the bad ones: a second fit counts its epochs from initial_epoch
        model.fit(x, y_bad, batch_size=4, epochs=2, initial_epoch=1, verbose=0, shuffle=False,
                  callbacks=[diagnosis])
    assert model.stop_training


def test_callback_without_raising_only_stops(capsys):
    model = _sequential({"jit_compile": True})
    history = model.fit(X8, BAD_LABELS, batch_size=4, epochs=3, verbose=0, shuffle=False,
                        callbacks=[km.callbacks.NaNLossDiagnosis(raise_error=False)])
    assert len(history.history["loss"]) == 1  # stopped after the first epoch
    assert "at epoch 1, batch 1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="`raise_error` must be a bool"):
        km.callbacks.NaNLossDiagnosis(raise_error=1)
