"""The combined margin's monotone fallback, against the NumPy reference (tests/numpy_reference.py), which writes
the rule independently from its formula:

    theta_t = (pi - m2) / m1
    z_y / s = cos(m1 theta + m2) - m3      theta <= theta_t
            = cos(theta) - m3 - c          theta >  theta_t,  c = m2 sin(m2) (m1 == 1) or 1 + cos(theta_t)

Values on both sides of theta_t, a non-negative slope d z_y / d cos on a dense grid of [-1, 1], and
(1, m, 0) equal to ArcFace, fallback region included.
"""

import math

import numpy as np
import pytest
from keras import ops

from keras_margin import losses as kml
from keras_margin.margins.arcface import arcface_target, combined_margin_target
from tests import numpy_reference as ref
from tests.test_losses_reference import as_numpy, gradient_wrt_cos

pytestmark = pytest.mark.backend_agnostic

SETTINGS = [(1.0, 0.5, 0.0), (1.35, 0.2, 0.1), (2.0, 0.3, 0.0), (0.9, 0.4, 0.15), (1.2, 0.0, 0.0),
            (1.0, 0.3, 0.2), (1.0, 0.0, 0.35), (0.5, 0.5, 0.0), (3.0, 0.0, 0.0)]
SETTING_IDS = [f"{m1:g},{m2:g},{m3:g}" for m1, m2, m3 in SETTINGS]


def target_values(cos, m1, m2, m3):
    return as_numpy(combined_margin_target(ops.convert_to_tensor(np.asarray(cos, np.float32)), m1, m2, m3))


def target_slopes(cos, m1, m2, m3):
    """d z_y / d cos (z_y / s, elementwise) through the backend's autodiff."""
    return gradient_wrt_cos(lambda _, c: ops.sum(combined_margin_target(c, m1, m2, m3)), None,
                            np.asarray(cos, np.float64))


# --------------------------------------------------------------------------------------------------
# The reference itself: the rule as stated
# --------------------------------------------------------------------------------------------------
def test_reference_thresholds_and_offsets():
    assert ref.combined_threshold(1.0, 0.5) == pytest.approx(math.pi - 0.5)
    assert ref.combined_threshold(1.35, 0.2) == pytest.approx((math.pi - 0.2) / 1.35)
    assert ref.combined_threshold(2.0, 0.3) == pytest.approx((math.pi - 0.3) / 2.0)
    assert ref.combined_threshold(1.0, 0.0) is None and ref.combined_threshold(0.5, 0.5) is None
    assert ref.combined_fallback_offset(1.0, 0.5) == pytest.approx(0.5 * math.sin(0.5))  # 0.2397
    assert ref.combined_fallback_offset(2.0, 0.3) == pytest.approx(1.0 + math.cos(1.4208), abs=1e-4)
    # (1, 0.5, 0) is the ArcFace reference, fallback included
    cos = np.linspace(-1.0, 1.0, 2001)
    np.testing.assert_allclose(ref.combined_target(cos, 64.0, 1.0, 0.5, 0.0), ref.arcface_target(cos, 64.0, 0.5),
                               rtol=0, atol=1e-12)


def test_the_plain_formula_pushes_away_past_theta_t():
    """The problem being fixed: d/dcos cos(theta + 0.5) = sin(theta + 0.5) / sin(theta) = -0.581 at cos = -0.95."""
    theta = math.acos(-0.95)
    assert math.sin(theta + 0.5) / math.sin(theta) == pytest.approx(-0.5810, abs=1e-4)
    h = 1e-6
    plain = (ref.combined_target_plain(-0.95 + h, 1.0, 1.0, 0.5, 0.0)
             - ref.combined_target_plain(-0.95 - h, 1.0, 1.0, 0.5, 0.0)) / (2 * h)
    assert plain == pytest.approx(-0.5810, abs=1e-4)
    assert target_slopes(np.array([-0.95]), 1.0, 0.5, 0.0)[0] == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# Values on both sides of theta_t
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m1,m2,m3", SETTINGS, ids=SETTING_IDS)
def test_values_on_both_sides_of_theta_t(m1, m2, m3):
    theta_t = ref.combined_threshold(m1, m2)
    offsets = np.array([1e-1, 3e-2, 1e-2, 3e-3, 1e-3])
    if theta_t is None:
        thetas = np.linspace(0.0, math.pi, 41)
    else:
        thetas = np.concatenate([theta_t - offsets, theta_t + offsets, np.linspace(0.0, math.pi, 41)])
        thetas = thetas[(thetas >= 0.0) & (thetas <= math.pi)]
    cos = np.cos(thetas).astype(np.float32).astype(np.float64)
    want = ref.combined_target(cos, 1.0, m1, m2, m3)
    np.testing.assert_allclose(target_values(cos, m1, m2, m3), want, rtol=0, atol=1e-6)
    if theta_t is not None:
        # past theta_t the value is cos - m3 - c, and differs from the plain formula
        past = np.arccos(cos) > theta_t + 1e-4
        c = m2 * math.sin(m2) if m1 == 1.0 else 1.0 + math.cos(theta_t)
        np.testing.assert_allclose(target_values(cos[past], m1, m2, m3), cos[past] - m3 - c, rtol=0, atol=1e-6)
        assert np.max(np.abs(want[past] - ref.combined_target_plain(cos[past], 1.0, m1, m2, m3))) > 5e-3


@pytest.mark.parametrize("m1,m2,m3", [s for s in SETTINGS if s[0] != 1.0], ids=[i for s, i in zip(SETTINGS, SETTING_IDS)
                                                                              if s[0] != 1.0])
def test_fallback_is_continuous_at_theta_t_when_m1_is_not_1(m1, m2, m3):
    theta_t = ref.combined_threshold(m1, m2)
    if theta_t is None:
        pytest.skip("no fallback: theta_t >= pi")
    cos = np.cos(theta_t + np.array([-1e-4, 1e-4])).astype(np.float32)
    left, right = target_values(cos, m1, m2, m3)
    assert left == pytest.approx(-1.0 - m3, abs=1e-6) and right == pytest.approx(-1.0 - m3, abs=2e-4)


@pytest.mark.parametrize("m1,m2,m3,s", [(1.0, 0.5, 0.0, 64.0), (1.35, 0.2, 0.1, 64.0), (2.0, 0.3, 0.0, 30.0),
                                        (0.9, 0.4, 0.15, 64.0)])
def test_loss_on_both_sides_of_theta_t_matches_reference(m1, m2, m3, s):
    theta_t = ref.combined_threshold(m1, m2)
    rng = np.random.default_rng(3)
    batch, classes = 12, 6
    labels = rng.integers(0, classes, batch)
    cos = rng.uniform(-1.0, 1.0, (batch, classes))
    thetas = np.concatenate([np.linspace(0.05, theta_t - 0.02, 6), np.linspace(theta_t + 0.02, math.pi - 0.01, 6)])
    cos[np.arange(batch), labels] = np.cos(thetas)
    cos = cos.astype(np.float32).astype(np.float64)
    got = as_numpy(kml.combined_margin_loss(labels, cos.astype(np.float32), s=s, m1=m1, m2=m2, m3=m3))
    want = ref.margin_loss(cos, labels, s, lambda c: ref.combined_target(c, s, m1, m2, m3), reduction=None)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grad = gradient_wrt_cos(lambda y, c: ops.sum(kml.combined_margin_loss(y, c, s=s, m1=m1, m2=m2, m3=m3)),
                            labels, cos)
    want_grad = ref.margin_loss_gradient(cos, labels, s, lambda c: ref.combined_target(c, s, m1, m2, m3),
                                         lambda c: ref.combined_target_derivative(c, s, m1, m2, m3))
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5 * np.max(np.abs(want_grad)))


# --------------------------------------------------------------------------------------------------
# Monotone: slope >= 0 on a dense grid of [-1, 1]
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m1,m2,m3", SETTINGS, ids=SETTING_IDS)
def test_target_is_non_decreasing_in_cos_on_a_dense_grid(m1, m2, m3):
    cos = np.linspace(-1.0, 1.0, 40001).astype(np.float32)
    slopes = target_slopes(cos, m1, m2, m3)
    assert np.all(np.isfinite(slopes))
    assert np.min(slopes) >= 0.0, cos[np.argmin(slopes)]
    values = target_values(cos, m1, m2, m3)
    assert np.min(np.diff(values)) >= -2.5e-7  # float32 rounding of neighbouring values only
    # and the reference agrees with the slopes where it is smooth (away from theta_t and the clamp)
    theta_t = ref.combined_threshold(m1, m2)
    inner = (np.abs(cos) < 0.999)
    if theta_t is not None:
        inner &= np.abs(np.arccos(cos.astype(np.float64)) - theta_t) > 1e-3
    want = ref.combined_target_derivative(cos[inner].astype(np.float64), 1.0, m1, m2, m3)
    assert np.min(want) >= 0.0
    np.testing.assert_allclose(slopes[inner], want, rtol=1e-4, atol=1e-5)


def test_loss_gradient_pulls_the_target_everywhere():
    """Through the loss: d loss / d cos_y <= 0 for every target cosine in [-1, 1] (the sample is pulled
    toward its class), also past theta_t, for the three settings of the brief."""
    grid = np.linspace(-1.0, 1.0, 2001)
    for m1, m2, m3 in [(1.0, 0.5, 0.0), (1.35, 0.2, 0.1), (2.0, 0.3, 0.0)]:
        cos = np.stack([grid, np.full_like(grid, 0.1), np.full_like(grid, -0.2)], axis=1).astype(np.float32)
        labels = np.zeros(len(grid), np.int32)
        grad = gradient_wrt_cos(lambda y, c: ops.sum(kml.combined_margin_loss(y, c, s=64.0, m1=m1, m2=m2, m3=m3)),
                                labels, cos.astype(np.float64))
        assert np.max(grad[:, 0]) <= 0.0, (m1, m2, m3, grid[np.argmax(grad[:, 0])])


# --------------------------------------------------------------------------------------------------
# (1, m, 0) is ArcFace, fallback included
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [0.5, 0.3, 0.8])
def test_combined_1_m_0_equals_arcface_including_the_fallback(m):
    rng = np.random.default_rng(7)
    batch, classes = 16, 5
    labels = rng.integers(0, classes, batch)
    cos = rng.uniform(-1.0, 1.0, (batch, classes))
    # half the targets below cos(pi - m) (the fallback), half above, plus +-1
    threshold = ref.arcface_threshold(m)
    targets = np.concatenate([np.linspace(-1.0, threshold - 1e-3, 8), np.linspace(threshold + 1e-3, 1.0, 8)])
    cos[np.arange(batch), labels] = targets
    cos32 = cos.astype(np.float32)
    grid = np.linspace(-1.0, 1.0, 4001).astype(np.float32)
    np.testing.assert_array_equal(target_values(grid, 1.0, m, 0.0),
                                  as_numpy(arcface_target(ops.convert_to_tensor(grid), m)))
    combined = as_numpy(kml.combined_margin_loss(labels, cos32, s=64.0, m1=1.0, m2=m, m3=0.0))
    arcface = as_numpy(kml.arcface_loss(labels, cos32, s=64.0, m=m))
    np.testing.assert_array_equal(combined, arcface)
    want = ref.margin_loss(cos32.astype(np.float64), labels, 64.0, lambda c: ref.arcface_target(c, 64.0, m),
                           reduction=None)
    np.testing.assert_allclose(combined, want, rtol=1e-5, atol=1e-5)
    g_combined = gradient_wrt_cos(lambda y, c: ops.sum(kml.combined_margin_loss(y, c, s=64.0, m1=1.0, m2=m, m3=0.0)),
                                  labels, cos32.astype(np.float64))
    g_arcface = gradient_wrt_cos(lambda y, c: ops.sum(kml.arcface_loss(y, c, s=64.0, m=m)), labels,
                                 cos32.astype(np.float64))
    np.testing.assert_array_equal(g_combined, g_arcface)
