"""Float32 gradients at the edges: every objective's per-sample loss gradient w.r.t. the cosine matrix, with the
target cosine within 1e-3 of +1 and of -1 (but outside the 1e-7 clamp), against float64.

The float64 side is the analytic gradient of tests/numpy_reference.py (``margin_loss_gradient`` with each
objective's ``*_target_derivative``; the agents' ``c_*_gradient``), evaluated at the same float32 input values
(cast to float64); a separate test checks those analytic derivatives against central differences of the
reference targets. The error of a sample is relative to its gradient row:

    rel_i = max_j |g32_ij - g64_ij| / max_j |g64_ij|

and must stay within 5e-6 for every sample.

What the margins cannot fix, so the inputs avoid it: the shared softmax cross-entropy (keras_margin.core) forms
the target entry as ``softmax_y - 1``, which in float32 cancels when the sample is already well classified
(1 - p_y small): its absolute error is ~1e-7, so rel_i ~ 1e-7 / (1 - p_y) (5e-5 at 1 - p_y = 3e-3, unbounded
as p_y -> 1). Each row whose target is near +1 therefore gets a competitor class whose logit is within 2 of
the target's (so 1 - p_y >= 0.1, asserted below); near -1 the target's probability is ~0 and no competitor
is needed.
"""

import math

import numpy as np
import pytest
from keras import ops

from keras_margin import losses as kml
from tests import numpy_reference as ref
from tests.test_losses_reference import gradient_wrt_cos

pytestmark = pytest.mark.backend_agnostic

REL_TOL = 5e-6
C = 8
#: 1 - |cos| of the targets: from 1e-3 down to 3e-7 (float32(1 - 1e-7), the clamp, is 1 - 1.19e-7).
GAPS = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7)


# --------------------------------------------------------------------------------------------------
# The objectives: (id, per-sample loss (y, cos) -> (batch,), s, float64 target z_y(cos), d z_y / d cos)
# --------------------------------------------------------------------------------------------------
def _constant(s):
    return lambda c: np.full(np.shape(c), float(s))


def _softmax_objectives():
    out = []
    for s in (30.0, 64.0, 10.0):
        out.append((f"normface-s{s:g}", lambda y, c, s=s: kml.normface_loss(y, c, s=s), s,
                    lambda c, s=s: ref.normface_target(c, s), _constant(s)))
    for s in (30.0, 10.0):
        for m in (1, 2, 3, 4):
            for lam in (0.0, 5.0):
                out.append((f"sphereface-m{m}-lambda{lam:g}-s{s:g}",
                            lambda y, c, m=m, s=s, lam=lam: kml.sphereface_loss(y, c, m=m, s=s, lambda_=lam), s,
                            lambda c, m=m, s=s, lam=lam: ref.sphereface_target(c, m, s, lam),
                            lambda c, m=m, s=s, lam=lam: ref.sphereface_target_derivative(c, m, s, lam)))
    for s in (30.0, 64.0, 10.0):
        out.append((f"amsoftmax-s{s:g}", lambda y, c, s=s: kml.amsoftmax_loss(y, c, s=s, m=0.35), s,
                    lambda c, s=s: ref.amsoftmax_target(c, s, 0.35), _constant(s)))
    for s in (64.0, 10.0):
        for a, h, k in ((-0.9, 0.0, 0.65), (-0.5, 0.2, 0.8)):
            for straight in (False, True):
                out.append((f"x2softmax-s{s:g}-h{h:g}-straight{straight}",
                            lambda y, c, s=s, a=a, h=h, k=k, st=straight:
                                kml.x2softmax_loss(y, c, s=s, a=a, h=h, k=k, straight_through=st), s,
                            lambda c, s=s, a=a, h=h, k=k: ref.x2_target(c, s, a, h, k),
                            _constant(s) if straight else (lambda c, s=s, a=a, h=h: ref.x2_target_derivative(c, s, a, h))))
    for s, m in ((64.0, 0.5), (64.0, 0.3), (10.0, 0.5)):
        out.append((f"arcface-s{s:g}-m{m:g}", lambda y, c, s=s, m=m: kml.arcface_loss(y, c, s=s, m=m), s,
                    lambda c, s=s, m=m: ref.arcface_target(c, s, m),
                    lambda c, s=s, m=m: ref.arcface_target_derivative(c, s, m)))
    for s in (64.0, 10.0):
        for m1, m2, m3 in ((1.0, 0.5, 0.0), (1.35, 0.2, 0.1), (2.0, 0.3, 0.0), (0.9, 0.4, 0.15), (1.0, 0.3, 0.2),
                           (1.0, 0.0, 0.35), (1.2, 0.0, 0.0)):
            out.append((f"combined-s{s:g}-{m1:g},{m2:g},{m3:g}",
                        lambda y, c, s=s, a=m1, b=m2, d=m3: kml.combined_margin_loss(y, c, s=s, m1=a, m2=b, m3=d), s,
                        lambda c, s=s, a=m1, b=m2, d=m3: ref.combined_target(c, s, a, b, d),
                        lambda c, s=s, a=m1, b=m2, d=m3: ref.combined_target_derivative(c, s, a, b, d)))
    return out


SOFTMAX_OBJECTIVES = _softmax_objectives()


def _ids(objectives):
    return [objective[0] for objective in objectives]


# --------------------------------------------------------------------------------------------------
# Inputs and the error measure
# --------------------------------------------------------------------------------------------------
def edge_inputs(target_logit, s, seed, repeats=16):
    """(cos (16 * repeats, C) float32 values held in float64, labels). Each block of 16 rows has targets at
    1 - GAPS (first 8) and -1 + GAPS (last 8); the other cosines are uniform in (-1, 1), and each +1 row gets
    a competitor whose logit s*cos lies within 2 of the target logit (so 1 - p_y >= 0.1 there)."""
    rng = np.random.default_rng(seed)
    block = np.array([1.0 - g for g in GAPS] + [-1.0 + g for g in GAPS])
    targets = np.tile(block, repeats)
    rows = np.arange(len(targets))
    labels = rng.integers(0, C, len(targets))
    cos = rng.uniform(-1.0, 1.0, (len(targets), C))
    cos[rows, labels] = targets
    cos = cos.astype(np.float32).astype(np.float64)
    plus = rows[targets > 0.0]
    z_y = target_logit(cos[plus, labels[plus]])
    cos[plus, (labels[plus] + 1) % C] = np.clip((z_y + rng.uniform(-2.0, 2.0, len(plus))) / s, -0.999, 0.999)
    cos = cos.astype(np.float32).astype(np.float64)
    lo, hi = ref.clamp_bounds()
    assert np.all(cos[rows, labels] > lo) and np.all(cos[rows, labels] < hi)
    return cos, labels.astype(np.int32)


def row_relative_error(got, want):
    """max_j |got_ij - want_ij| / max_j |want_ij| per row; 0 for a row where both are exactly zero."""
    scale = np.max(np.abs(want), axis=1)
    diff = np.max(np.abs(got - want), axis=1)
    return np.where(scale > 0.0, diff / np.where(scale > 0.0, scale, 1.0), np.where(diff > 0.0, np.inf, 0.0))


def per_sample_gradient(loss_fn, labels, cos):
    """d loss_i / d cos_i for every row i: the gradient of the sum (each loss_i depends on its row only)."""
    return gradient_wrt_cos(lambda y, c: ops.sum(loss_fn(y, c)), labels, cos)


# --------------------------------------------------------------------------------------------------
# Margin-softmax objectives
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", SOFTMAX_OBJECTIVES, ids=_ids(SOFTMAX_OBJECTIVES))
def test_gradient_within_5e_6_relative_at_the_edges(objective):
    _, loss_fn, s, target_logit, target_derivative = objective
    cos, labels = edge_inputs(target_logit, s, seed=0)
    want = ref.margin_loss_gradient(cos, labels, s, target_logit, target_derivative)
    rows = np.arange(len(labels))
    plus = cos[rows, labels] > 0.0
    p_y = ref.softmax(ref.margin_logits(cos, labels, s, target_logit))[rows, labels]
    assert np.all(1.0 - p_y[plus] >= 0.1), np.min(1.0 - p_y[plus])  # the +1 rows are not cancellation-bound
    got = per_sample_gradient(loss_fn, labels, cos)
    errors = row_relative_error(got, want)
    worst = {f"cos {'1 -' if plus[i] else '-1 +'} {1.0 - abs(cos[i, labels[i]]):.1e}": f"{errors[i]:.2e}"
             for i in np.argsort(errors)[::-1][:5]}
    assert np.max(errors) <= REL_TOL, worst


def test_why_the_forms_changed_float32_arithmetic_at_the_edge_inputs():
    """The float32 forms replaced in the margins, against float64 at the same inputs: 1 - c*c (under
    sqrt(1 - c^2) and arccos' autodiff rule) loses 5e-5 relative (at 1 - |c| = 3e-4: c*c's rounding, 3e-8, on
    a difference of 6e-4), (1 - c)(1 + c) stays at rounding;
    the Chebyshev psi 8c^4 - 8c^2 + 1 (m = 4) has a larger absolute error than 1 - 8 c^2 (1 - c)(1 + c)."""
    c64 = np.array([1.0 - g for g in GAPS] + [-1.0 + g for g in GAPS]).astype(np.float32).astype(np.float64)
    c = c64.astype(np.float32)
    one = np.float32(1.0)
    exact = (1.0 - c64) * (1.0 + c64)
    naive = one - c * c
    stable = (one - c) * (one + c)
    assert np.max(np.abs(naive - exact) / exact) > 4e-5
    assert np.max(np.abs(stable - exact) / exact) < 2.5e-7
    psi_exact = 8.0 * c64**4 - 8.0 * c64**2 + 1.0
    chebyshev = np.float32(8.0) * c**4 - np.float32(8.0) * c**2 + one
    sin_form = one - np.float32(8.0) * c**2 * stable
    assert np.max(np.abs(chebyshev - psi_exact)) > 4.0 * np.max(np.abs(sin_form - psi_exact))


# --------------------------------------------------------------------------------------------------
# NormFace's agent objectives: piecewise linear in cos, so their float32 gradients are exact (+-2 or 0)
# --------------------------------------------------------------------------------------------------
AGENT_OBJECTIVES = [
    ("c_contrastive-margin1", lambda y, c: kml.c_contrastive_loss(y, c, margin=1.0),
     lambda c, y: ref.c_contrastive_gradient(c, y, 1.0)),
    ("c_contrastive-margin0.5", lambda y, c: kml.c_contrastive_loss(y, c, margin=0.5),
     lambda c, y: ref.c_contrastive_gradient(c, y, 0.5)),
    ("c_triplet-center", lambda y, c: kml.c_triplet_loss(y, c, margin=0.8, center=True),
     lambda c, y: ref.c_triplet_gradient(c, y, 0.8, True)),
    ("c_triplet-no-center", lambda y, c: kml.c_triplet_loss(y, c, margin=0.8, center=False),
     lambda c, y: ref.c_triplet_gradient(c, y, 0.8, False)),
]


def _agent_inputs(seed, margin_kinks):
    """Edge targets as above; the others uniform in (-1, 1), 1e-3 away from the hinges' kinks."""
    cos, labels = edge_inputs(lambda c: c, 1.0, seed, repeats=2)
    rng = np.random.default_rng(100 + seed)
    rows = np.arange(len(labels))
    for _ in range(100):
        others = np.ones(cos.shape, bool)
        others[rows, labels] = False
        d = 2.0 - 2.0 * cos
        d_y = d[rows, labels][:, None]
        near = np.zeros(cos.shape, bool)
        for margin in margin_kinks:
            near |= others & (np.abs(margin - d) < 2e-3)  # C-contrastive's hinge
            near |= others & (np.abs(margin + d_y - d) < 2e-3)  # C-triplet's hinge
        negatives = np.where(others, d, np.inf)
        ordered = np.sort(negatives, axis=1)
        near |= others & (np.abs(negatives - ordered[:, :1]) < 2e-3) & (negatives != ordered[:, :1])  # ties
        if not near.any():
            return cos.astype(np.float32).astype(np.float64), labels
        cos[near] = rng.uniform(-1.0, 1.0, near.sum())
    raise AssertionError("could not draw inputs away from the kinks")


@pytest.mark.parametrize("objective", AGENT_OBJECTIVES, ids=_ids(AGENT_OBJECTIVES))
def test_agent_gradients_are_exact_at_the_edges(objective):
    _, loss_fn, reference_gradient = objective
    for seed in range(2):
        cos, labels = _agent_inputs(seed, (1.0, 0.5, 0.8))
        got = per_sample_gradient(loss_fn, labels, cos)
        want = reference_gradient(cos, labels)
        assert np.max(row_relative_error(got, want)) == 0.0
        assert np.any(want[np.arange(len(labels)), labels] != 0.0)


# --------------------------------------------------------------------------------------------------
# The float64 reference derivatives themselves, against central differences of the reference targets
# --------------------------------------------------------------------------------------------------
def _central(fn, c, h):
    return (fn(c + h) - fn(c - h)) / (2.0 * h)


@pytest.mark.parametrize("objective", SOFTMAX_OBJECTIVES, ids=_ids(SOFTMAX_OBJECTIVES))
def test_reference_derivatives_match_central_differences(objective):
    """Near the edges the step is 1e-3 of the distance to +-1 (truncation ~1e-6 relative, the clamp never
    crossed); elsewhere 1e-6, 1e-3 away from every kink of the target (SphereFace's branch boundaries, the
    margins' thresholds)."""
    name, _, s, target_logit, target_derivative = objective
    if "straight" in name and "True" in name:
        pytest.skip("the straight-through gradient is not the derivative of the value")
    edges = np.array([1.0 - g for g in GAPS] + [-1.0 + g for g in GAPS]).astype(np.float32).astype(np.float64)
    steps = 1e-3 * (1.0 - np.abs(edges))
    np.testing.assert_allclose(_central(target_logit, edges, steps), target_derivative(edges), rtol=1e-5)
    inner = np.linspace(-0.995, 0.995, 399)
    kinks = [math.cos(j * math.pi / m) for m in (2, 3, 4) for j in range(1, m)]
    kinks += [ref.arcface_threshold(m) for m in (0.3, 0.5)]
    kinks += [math.cos((math.pi - m2) / m1) for m1, m2 in ((1.35, 0.2), (2.0, 0.3), (0.9, 0.4), (1.0, 0.3),
                                                          (1.2, 0.0))]
    inner = inner[np.min(np.abs(inner[:, None] - np.array(kinks)[None, :]), axis=1) > 1e-3]
    want = target_derivative(inner)
    np.testing.assert_allclose(_central(target_logit, inner, 1e-6), want, rtol=1e-6,
                               atol=1e-7 * np.max(np.abs(want)))
