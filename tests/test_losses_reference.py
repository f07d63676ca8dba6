"""Every loss against an independent NumPy float64 reference written from the papers (tests/numpy_reference.py).

Values (per sample, mean, sum), label formats, sample weights and gradients w.r.t. the cosines, on cosines
that include +-1 exactly and values within 1e-6 of them.
"""

import math

import keras
import numpy as np
import pytest

from keras_margin import losses as kml
from tests import numpy_reference as ref

pytestmark = pytest.mark.backend_agnostic

B, C = 12, 7

# Loss values: float32 against float64. Logits reach s = 64 (ulp(64) = 7.6e-6), losses reach ~600.
RTOL, ATOL = 1e-5, 1e-5
# Gradients: float32 autodiff against float64 central differences of the reference.
GRAD_RTOL = 1e-3


# --------------------------------------------------------------------------------------------------
# The cases: each loss class with a few hyper-parameter settings, the defaults ({}) first.
# The reference side spells out the fact sheet's defaults itself; nothing is read from the class.
# --------------------------------------------------------------------------------------------------
class Case:
    def __init__(self, loss_cls, kwargs, s, target, kinks=()):
        self.loss_cls = loss_cls
        self.kwargs = kwargs
        self.s = s  # the scale of the non-target logits s * cos_j
        self.target = target  # cos_y -> z_y, float64
        self.kinks = list(kinks)  # cosines where z_y is not smooth (or jumps)

    def loss(self, **extra):
        return self.loss_cls(**self.kwargs, **extra)

    def reference(self, cos, labels, sample_weight=None, reduction="sum_over_batch_size"):
        return ref.margin_loss(cos, labels, self.s, self.target, sample_weight, reduction)

    def __repr__(self):
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items()) or "defaults"
        return f"{self.loss_cls.__name__}({args})"


def _combined_kinks(m1, m2):
    theta_t = ref.combined_threshold(m1, m2)
    return [] if theta_t is None else [math.cos(theta_t)]


def _cases():
    lam_first_step = ref.sphereface_lambda(1)  # 1000 / 1.12, the first Caffe training step
    return [
        # NormFace: s = 30 in this package's API.
        Case(kml.NormFaceLoss, {}, 30.0, lambda c: ref.normface_target(c, 30.0)),
        Case(kml.NormFaceLoss, {"s": 20.0}, 20.0, lambda c: ref.normface_target(c, 20.0)),
        Case(kml.NormFaceLoss, {"s": 64.0}, 64.0, lambda c: ref.normface_target(c, 64.0)),
        # SphereFace, feature-normalized: m = 4, s = 30, lambda = 0.
        Case(kml.SphereFaceLoss, {}, 30.0, lambda c: ref.sphereface_target(c, 4, 30.0, 0.0),
             ref.sphereface_boundaries(4)),
        Case(kml.SphereFaceLoss, {"m": 1, "s": 30.0}, 30.0, lambda c: ref.sphereface_target(c, 1, 30.0, 0.0)),
        Case(kml.SphereFaceLoss, {"m": 2, "s": 16.0}, 16.0, lambda c: ref.sphereface_target(c, 2, 16.0, 0.0),
             ref.sphereface_boundaries(2)),
        Case(kml.SphereFaceLoss, {"m": 3, "s": 30.0, "lambda_": 5.0}, 30.0,
             lambda c: ref.sphereface_target(c, 3, 30.0, 5.0), ref.sphereface_boundaries(3)),
        Case(kml.SphereFaceLoss, {"m": 4, "s": 64.0, "lambda_": lam_first_step}, 64.0,
             lambda c: ref.sphereface_target(c, 4, 64.0, lam_first_step), ref.sphereface_boundaries(4)),
        # AM-Softmax: s = 30, m = 0.35.
        Case(kml.AMSoftmaxLoss, {}, 30.0, lambda c: ref.amsoftmax_target(c, 30.0, 0.35)),
        Case(kml.AMSoftmaxLoss, {"s": 64.0, "m": 0.35}, 64.0, lambda c: ref.amsoftmax_target(c, 64.0, 0.35)),
        Case(kml.AMSoftmaxLoss, {"s": 10.0, "m": 0.2}, 10.0, lambda c: ref.amsoftmax_target(c, 10.0, 0.2)),
        # X2-Softmax: s = 64, a = -0.9, h = 0, k = 0.65 (kinks: the clamp at +-1).
        Case(kml.X2SoftmaxLoss, {}, 64.0, lambda c: ref.x2_target(c, 64.0, -0.9, 0.0, 0.65)),
        Case(kml.X2SoftmaxLoss, {"s": 30.0, "a": -0.5, "h": 0.2, "k": 0.8}, 30.0,
             lambda c: ref.x2_target(c, 30.0, -0.5, 0.2, 0.8)),
        Case(kml.X2SoftmaxLoss, {"straight_through": True}, 64.0, lambda c: ref.x2_target(c, 64.0, -0.9, 0.0, 0.65)),
        # ArcFace: s = 64, m = 0.5, InsightFace fallback below cos(pi - m).
        Case(kml.ArcFaceLoss, {}, 64.0, lambda c: ref.arcface_target(c, 64.0, 0.5), [ref.arcface_threshold(0.5)]),
        Case(kml.ArcFaceLoss, {"s": 30.0, "m": 0.3}, 30.0, lambda c: ref.arcface_target(c, 30.0, 0.3),
             [ref.arcface_threshold(0.3)]),
        Case(kml.ArcFaceLoss, {"s": 64.0, "m": 0.8}, 64.0, lambda c: ref.arcface_target(c, 64.0, 0.8),
             [ref.arcface_threshold(0.8)]),
        # Combined margin: s = 64, (m1, m2, m3) = (1, 0.5, 0), with the monotone fallback past theta_t
        # (kink or, for m1 == 1, ArcFace's jump at cos(theta_t)).
        Case(kml.CombinedMarginLoss, {}, 64.0, lambda c: ref.combined_target(c, 64.0, 1.0, 0.5, 0.0),
             _combined_kinks(1.0, 0.5)),
        Case(kml.CombinedMarginLoss, {"m1": 1.35, "m2": 0.25, "m3": 0.1}, 64.0,
             lambda c: ref.combined_target(c, 64.0, 1.35, 0.25, 0.1), _combined_kinks(1.35, 0.25)),
        Case(kml.CombinedMarginLoss, {"s": 30.0, "m1": 1.0, "m2": 0.3, "m3": 0.2}, 30.0,
             lambda c: ref.combined_target(c, 30.0, 1.0, 0.3, 0.2), _combined_kinks(1.0, 0.3)),
        Case(kml.CombinedMarginLoss, {"s": 64.0, "m1": 0.9, "m2": 0.4, "m3": 0.15}, 64.0,
             lambda c: ref.combined_target(c, 64.0, 0.9, 0.4, 0.15), _combined_kinks(0.9, 0.4)),
    ]


CASES = _cases()
DEFAULT_CASES = [case for case in CASES if not case.kwargs]
# The straight-through gradient is not the derivative of the loss value: tested on its own below.
DERIVATIVE_CASES = [case for case in CASES if not case.kwargs.get("straight_through")]
assert len(DEFAULT_CASES) == 6


def _ids(cases):
    return [repr(case) for case in cases]


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
EDGE_TARGETS = (1.0, -1.0, 1.0 - 1e-6, -1.0 + 1e-6, 1.0 - 1e-4, -1.0 + 1e-4)


def _away_from(values, kinks, gap, rng, low, high):
    """Redraw the values that sit within gap of a kink."""
    values = values.copy()
    for _ in range(100):
        near = np.zeros(values.shape, bool)
        for kink in kinks:
            near |= np.abs(values - kink) < gap
        if not near.any():
            return values
        values[near] = rng.uniform(low, high, near.sum())
    raise AssertionError("could not draw values away from the kinks")


def edge_inputs(case, seed=0):
    """Cosines (float32 values held in float64) with targets at +-1, within 1e-6 and 1e-4 of +-1, and
    spread over (-1, 1); non-target entries at +-1 too. Targets stay 1e-3 away from a jump (ArcFace)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, B)
    cos = rng.uniform(-1.0, 1.0, (B, C))
    spread = _away_from(np.linspace(-0.98, 0.98, B - len(EDGE_TARGETS)), case.kinks, 1e-3, rng, -0.98, 0.98)
    targets = np.concatenate([EDGE_TARGETS, rng.permutation(spread)])
    cos[np.arange(B), labels] = targets
    cos[0, (labels[0] + 1) % C] = 1.0  # a non-target at +1 next to a target at +1
    cos[1, (labels[1] + 2) % C] = -1.0
    cos[6, (labels[6] + 1) % C] = 1.0
    cos[7, (labels[7] + 3) % C] = -1.0
    return cos.astype(np.float32).astype(np.float64), labels


def smooth_inputs(case, seed=1):
    """Cosines in [-0.95, 0.95], targets spread over that range and 0.02 away from every kink."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, B)
    cos = rng.uniform(-0.95, 0.95, (B, C))
    targets = _away_from(np.linspace(-0.93, 0.93, B), case.kinks, 0.02, rng, -0.93, 0.93)
    cos[np.arange(B), labels] = rng.permutation(targets)
    return cos.astype(np.float32).astype(np.float64), labels


def as_numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float64)


def gradient_wrt_cos(loss, y_true, cos):
    """d loss(y_true, cos) / d cos through the backend's autodiff (the one backend-specific helper)."""
    cos32 = np.asarray(cos, dtype=np.float32)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        cos_tensor = tf.constant(cos32)
        with tf.GradientTape() as tape:
            tape.watch(cos_tensor)
            value = loss(y_true, cos_tensor)
        return np.asarray(tape.gradient(value, cos_tensor), dtype=np.float64)
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda c: loss(y_true, c))(cos32), dtype=np.float64)
    pytest.skip(f"no gradient helper for backend {backend!r}")


def assert_values_close(got, want):
    np.testing.assert_allclose(as_numpy(got), want, rtol=RTOL, atol=ATOL)


def assert_gradients_close(got, want):
    # Relative to each entry, with a floor at 1e-4 of the largest entry (non-target entries are s*p_j/B
    # and can be ~1e-20; float32 cannot resolve them relative to the loss).
    np.testing.assert_allclose(got, want, rtol=GRAD_RTOL, atol=1e-4 * np.max(np.abs(want)))


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_per_sample_loss_matches_reference(case):
    cos, labels = edge_inputs(case)
    got = case.loss(reduction=None)(labels, cos.astype(np.float32))
    assert as_numpy(got).shape == (B,)
    assert_values_close(got, case.reference(cos, labels, reduction=None))


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_mean_loss_matches_reference(case):
    cos, labels = edge_inputs(case, seed=2)
    got = case.loss()(labels, cos.astype(np.float32))
    assert as_numpy(got).shape == ()
    assert_values_close(got, case.reference(cos, labels))


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_sparse_column_and_one_hot_labels_agree(case):
    cos, labels = edge_inputs(case, seed=3)
    cos32 = cos.astype(np.float32)
    loss = case.loss(reduction=None)
    sparse = as_numpy(loss(labels.astype(np.int32), cos32))
    column = as_numpy(loss(labels.astype(np.int32).reshape(B, 1), cos32))
    one_hot = as_numpy(loss(np.eye(C, dtype=np.float32)[labels], cos32))
    want = case.reference(cos, labels, reduction=None)
    assert_values_close(sparse, want)
    np.testing.assert_allclose(column, sparse, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(one_hot, sparse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", [None, "sum", "sum_over_batch_size"])
@pytest.mark.parametrize("case", DEFAULT_CASES, ids=_ids(DEFAULT_CASES))
def test_sample_weight_and_reduction(case, reduction):
    cos, labels = edge_inputs(case, seed=4)
    weights = np.random.default_rng(5).uniform(0.0, 2.0, B)
    weights[[2, 9]] = 0.0
    got = case.loss(reduction=reduction)(labels, cos.astype(np.float32), sample_weight=weights.astype(np.float32))
    want = case.reference(cos, labels, sample_weight=weights.astype(np.float32), reduction=reduction)
    assert as_numpy(got).shape == np.shape(want)
    assert_values_close(got, want)


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=_ids(DEFAULT_CASES))
def test_weighted_mean_divides_by_batch_size_not_weight_sum(case):
    cos, labels = edge_inputs(case, seed=6)
    weights = np.zeros(B, np.float32)
    weights[:3] = 1.0
    per_sample = case.reference(cos, labels, reduction=None)
    got = case.loss()(labels, cos.astype(np.float32), sample_weight=weights)
    assert_values_close(got, per_sample[:3].sum() / B)


# --------------------------------------------------------------------------------------------------
# Gradients w.r.t. the cosines
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", DERIVATIVE_CASES, ids=_ids(DERIVATIVE_CASES))
def test_gradient_matches_finite_differences(case):
    cos, labels = smooth_inputs(case)
    got = gradient_wrt_cos(case.loss(), labels, cos)
    want = ref.central_difference(lambda c: case.reference(c, labels), cos)
    assert_gradients_close(got, want)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_gradient_is_finite_at_plus_and_minus_one(case):
    cos, labels = edge_inputs(case, seed=7)
    got = gradient_wrt_cos(case.loss(), labels, cos)
    assert np.all(np.isfinite(got)), got
    # Rows 0 and 1 have targets at exactly +1 and -1.
    assert np.all(np.isfinite(as_numpy(case.loss(reduction=None)(labels, cos.astype(np.float32)))))


# --------------------------------------------------------------------------------------------------
# X2-Softmax: analytic gradient (default) and the authors' straight-through gradient
# --------------------------------------------------------------------------------------------------
X2_SETTINGS = [
    {"s": 64.0, "a": -0.9, "h": 0.0, "k": 0.65},
    {"s": 30.0, "a": -0.5, "h": 0.2, "k": 0.8},
]


def _x2_reference_gradient(cos, labels, s, a, h, k, straight_through):
    """d mean loss / d cos = (softmax(z) - onehot) * dz/dcos / B, with dz_y/dcos_y = s (straight-through)
    or s * 2a(theta - h) * (-1/sin theta) (analytic); dz_j/dcos_j = s elsewhere."""
    logits = ref.margin_logits(cos, labels, s, lambda c: ref.x2_target(c, s, a, h, k))
    dz_dcos = np.full(cos.shape, s)
    rows = np.arange(cos.shape[0])
    if not straight_through:
        dz_dcos[rows, labels] = ref.x2_target_derivative(cos[rows, labels], s, a, h)
    return ref.softmax_cross_entropy_grad(logits, labels) * dz_dcos / cos.shape[0]


@pytest.mark.parametrize("params", X2_SETTINGS, ids=["defaults", "h=0.2"])
def test_x2_straight_through_has_the_same_value(params):
    case = Case(kml.X2SoftmaxLoss, params, params["s"], None)
    cos, labels = edge_inputs(case, seed=8)
    cos32 = cos.astype(np.float32)
    analytic = as_numpy(kml.X2SoftmaxLoss(**params, reduction=None)(labels, cos32))
    straight = as_numpy(kml.X2SoftmaxLoss(**params, straight_through=True, reduction=None)(labels, cos32))
    np.testing.assert_allclose(straight, analytic, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("params", X2_SETTINGS, ids=["defaults", "h=0.2"])
def test_x2_default_gradient_is_the_analytic_derivative(params):
    case = Case(kml.X2SoftmaxLoss, params, params["s"], None)
    cos, labels = smooth_inputs(case, seed=9)
    got = gradient_wrt_cos(kml.X2SoftmaxLoss(**params), labels, cos)
    want = _x2_reference_gradient(cos, labels, straight_through=False, **params)
    assert_gradients_close(got, want)
    # and the analytic formula is the derivative of the reference loss
    s, a, h, k = params["s"], params["a"], params["h"], params["k"]
    numeric = ref.central_difference(
        lambda c: ref.margin_loss(c, labels, s, lambda t: ref.x2_target(t, s, a, h, k)), cos
    )
    np.testing.assert_allclose(want, numeric, rtol=1e-6, atol=1e-7 * max(1.0, np.max(np.abs(want))))


@pytest.mark.parametrize("params", X2_SETTINGS, ids=["defaults", "h=0.2"])
def test_x2_straight_through_gradient_is_identity_through_the_margin(params):
    case = Case(kml.X2SoftmaxLoss, params, params["s"], None)
    cos, labels = smooth_inputs(case, seed=10)
    got = gradient_wrt_cos(kml.X2SoftmaxLoss(**params, straight_through=True), labels, cos)
    want = _x2_reference_gradient(cos, labels, straight_through=True, **params)
    assert_gradients_close(got, want)
    # The target entry differs from the analytic one (else this test would not tell the two apart).
    rows = np.arange(B)
    analytic = _x2_reference_gradient(cos, labels, straight_through=False, **params)
    assert np.max(np.abs(analytic[rows, labels] - want[rows, labels])) > 1e-2 * np.max(np.abs(want))


# --------------------------------------------------------------------------------------------------
# The combined margin contains the other three
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", [30.0, 64.0])
def test_combined_1_0_0_is_normface(s):
    case = Case(kml.NormFaceLoss, {"s": s}, s, lambda c: ref.normface_target(c, s))
    cos, labels = edge_inputs(case, seed=11)
    cos32 = cos.astype(np.float32)
    combined = kml.CombinedMarginLoss(s=s, m1=1.0, m2=0.0, m3=0.0, reduction=None)(labels, cos32)
    normface = kml.NormFaceLoss(s=s, reduction=None)(labels, cos32)
    assert_values_close(combined, as_numpy(normface))
    assert_values_close(combined, case.reference(cos, labels, reduction=None))


@pytest.mark.parametrize("s", [30.0, 64.0])
def test_combined_1_0_035_is_amsoftmax(s):
    case = Case(kml.AMSoftmaxLoss, {"s": s}, s, lambda c: ref.amsoftmax_target(c, s, 0.35))
    cos, labels = edge_inputs(case, seed=12)
    cos32 = cos.astype(np.float32)
    combined = kml.CombinedMarginLoss(s=s, m1=1.0, m2=0.0, m3=0.35, reduction=None)(labels, cos32)
    am = kml.AMSoftmaxLoss(s=s, m=0.35, reduction=None)(labels, cos32)
    assert_values_close(combined, as_numpy(am))
    assert_values_close(combined, case.reference(cos, labels, reduction=None))


@pytest.mark.parametrize("s", [30.0, 64.0])
def test_combined_1_05_0_is_arcface_where_theta_plus_m_within_pi(s):
    case = Case(kml.ArcFaceLoss, {"s": s}, s, lambda c: ref.arcface_target(c, s, 0.5))
    cos, labels = edge_inputs(case, seed=13)
    rows = np.arange(B)
    threshold = ref.arcface_threshold(0.5)  # cos(pi - 0.5): theta + 0.5 <= pi above it
    below = cos[rows, labels] <= threshold + 1e-3
    cos[rows[below], labels[below]] = np.linspace(-0.85, 0.9, below.sum())  # same shape: no recompiles
    cos = cos.astype(np.float32).astype(np.float64)
    assert np.all(cos[rows, labels] > threshold + 1e-3)
    cos32 = cos.astype(np.float32)
    combined = kml.CombinedMarginLoss(s=s, m1=1.0, m2=0.5, m3=0.0, reduction=None)(labels, cos32)
    arcface = kml.ArcFaceLoss(s=s, m=0.5, reduction=None)(labels, cos32)
    assert_values_close(combined, as_numpy(arcface))
    assert_values_close(combined, case.reference(cos, labels, reduction=None))


def test_arcface_uses_the_fallback_below_the_threshold():
    """Below cos(pi - m) ArcFace follows cos - m sin m, and so does the combined margin (1, m, 0) (its monotone
    fallback); the plain formula cos(theta + m) would differ there by more than 1 in the loss."""
    s, m = 64.0, 0.5
    rng = np.random.default_rng(15)
    labels = rng.integers(0, C, B)
    cos = rng.uniform(-0.5, 0.5, (B, C))
    cos[np.arange(B), labels] = np.linspace(-1.0, -0.9, B)  # all below cos(pi - 0.5) = -0.8776
    cos = cos.astype(np.float32).astype(np.float64)
    arcface = as_numpy(kml.ArcFaceLoss(s=s, m=m, reduction=None)(labels, cos.astype(np.float32)))
    combined_loss = kml.CombinedMarginLoss(s=s, m1=1.0, m2=m, m3=0.0, reduction=None)
    combined = as_numpy(combined_loss(labels, cos.astype(np.float32)))
    fallback = ref.margin_loss(cos, labels, s, lambda c: s * (c - m * math.sin(m)), reduction=None)
    assert_values_close(arcface, fallback)
    assert_values_close(combined, fallback)
    plain = ref.margin_loss(cos, labels, s, lambda c: ref.combined_target_plain(c, s, 1.0, m, 0.0), reduction=None)
    assert np.all(np.abs(arcface - plain) > 1.0)


# --------------------------------------------------------------------------------------------------
# NormFace's lower bound on s
# --------------------------------------------------------------------------------------------------
def test_normface_scale_lower_bound_casia_example():
    got = kml.normface_scale_lower_bound(10516, 0.9)
    assert abs(got - 11.46) < 5e-3
    assert got == pytest.approx(ref.normface_scale_lower_bound(10516, 0.9), rel=1e-9)


@pytest.mark.parametrize("num_classes,probability", [(2, 0.9), (10, 0.5), (1000, 0.99), (85742, 0.8)])
def test_normface_scale_lower_bound_matches_formula(num_classes, probability):
    got = kml.normface_scale_lower_bound(num_classes, probability)
    assert got == pytest.approx(ref.normface_scale_lower_bound(num_classes, probability), rel=1e-9)


# --------------------------------------------------------------------------------------------------
# The reference itself, against values the papers state
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_reference_psi_is_continuous_decreasing_and_starts_at_cos(m):
    theta = np.linspace(0.0, np.pi, 20001)
    values = ref.psi(np.cos(theta), m)
    assert values[0] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(-(2 * m - 1))  # (-1)^(m-1) cos(m pi) - 2(m-1) = -1 - 2(m-1)
    assert np.all(np.diff(values) <= 1e-12)
    assert np.max(np.abs(np.diff(values))) < 1e-2  # no jumps at the k boundaries
    if m == 1:
        np.testing.assert_allclose(values, np.cos(theta), atol=1e-12)


def test_reference_lambda_schedule_released_defaults():
    assert ref.sphereface_lambda(0) == pytest.approx(1000.0)
    assert ref.sphereface_lambda(1) == pytest.approx(1000.0 / 1.12)
    assert ref.sphereface_lambda(10**6) == 5.0


def test_reference_caffe_logits_scale_by_the_feature_norm():
    rng = np.random.default_rng(14)
    x = rng.normal(size=(5, 3)) * 4.0
    kernel = rng.normal(size=(3, 4)) * np.array([1.0, 2.0, 0.5, 3.0])  # column norms must not matter
    labels = np.array([0, 1, 2, 3, 1])
    cos = ref.cosine(x, kernel)
    np.testing.assert_allclose(ref.cosine(x, kernel * np.array([7.0, 0.1, 2.0, 1.0])), cos, atol=1e-12)
    assert np.all(np.abs(cos) <= 1.0 + 1e-12)
    lam = 5.0
    logits = ref.sphereface_caffe_logits(x, kernel, labels, 4, lam)
    norms = np.linalg.norm(x, axis=1)
    feature_normalized = ref.margin_logits(cos, labels, 1.0, lambda c: ref.sphereface_target(c, 4, 1.0, lam))
    np.testing.assert_allclose(logits, norms[:, None] * feature_normalized, rtol=1e-12)
