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


def test_out_of_range_class_id_in_compiled_step_gives_nan_not_a_plausible_loss():
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
