"""Verification metrics against independent references: scikit-learn's ROC and AUC on synthetic score sets,
TAR@FAR read off scikit-learn's curve, and hand-worked EER and 10-fold accuracy cases.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from keras_margin.evaluation import (
    auc,
    best_threshold,
    equal_error_rate,
    kfold_accuracy,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification_report,
)

FARS = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6]


def synthetic_scores(seed: int, genuine: int, impostor: int, decimals: int | None = None):
    """Cosine-like scores: genuine ~ N(0.6, 0.15), impostor ~ N(0.1, 0.15); rounding makes ties."""
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.normal(0.6, 0.15, genuine), rng.normal(0.1, 0.15, impostor)])
    if decimals is not None:
        scores = np.round(scores, decimals)
    labels = np.concatenate([np.ones(genuine, int), np.zeros(impostor, int)])
    order = rng.permutation(labels.size)
    return labels[order], scores[order]


SCORE_SETS = [
    pytest.param(0, 300, 300, None, id="lfw-fold-size"),
    pytest.param(1, 3000, 3000, 2, id="lfw-size-with-ties"),
    pytest.param(2, 50, 5000, None, id="unbalanced"),
    pytest.param(3, 20, 20, 1, id="heavy-ties"),
]


@pytest.mark.parametrize("seed, genuine, impostor, decimals", SCORE_SETS)
def test_roc_curve_equals_sklearn(seed, genuine, impostor, decimals):
    labels, scores = synthetic_scores(seed, genuine, impostor, decimals)
    far, tar, thresholds = roc_curve(labels, scores)
    ref_far, ref_tar, ref_thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_array_equal(far, ref_far)
    np.testing.assert_array_equal(tar, ref_tar)
    np.testing.assert_array_equal(thresholds[1:], ref_thresholds[1:])
    assert np.isinf(thresholds[0]) and ref_thresholds[0] > scores.max()


@pytest.mark.parametrize("seed, genuine, impostor, decimals", SCORE_SETS)
def test_auc_equals_sklearn(seed, genuine, impostor, decimals):
    labels, scores = synthetic_scores(seed, genuine, impostor, decimals)
    expected = skm.roc_auc_score(labels, scores)
    assert roc_auc(labels, scores) == pytest.approx(expected, abs=1e-12)
    ref_far, ref_tar, _ = skm.roc_curve(labels, scores)
    assert auc(ref_far, ref_tar) == pytest.approx(skm.auc(ref_far, ref_tar), abs=1e-12)


def test_auc_is_the_mann_whitney_probability():
    labels, scores = synthetic_scores(4, 40, 60, decimals=1)
    genuine, impostor = scores[labels == 1], scores[labels == 0]
    wins = (genuine[:, None] > impostor[None, :]).sum() + 0.5 * (genuine[:, None] == impostor[None, :]).sum()
    assert roc_auc(labels, scores) == pytest.approx(wins / (genuine.size * impostor.size), abs=1e-12)


@pytest.mark.parametrize("seed, genuine, impostor, decimals", SCORE_SETS)
def test_tar_at_far_equals_sklearn_curve(seed, genuine, impostor, decimals):
    labels, scores = synthetic_scores(seed, genuine, impostor, decimals)
    ref_far, ref_tar, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    for target, (tar, threshold) in zip(FARS, tar_at_far(labels, scores, FARS)):
        assert tar == ref_tar[ref_far <= target].max(), target
        reached_far = np.mean(scores[labels == 0] >= threshold)
        assert reached_far <= target and np.mean(scores[labels == 1] >= threshold) == tar


def test_tar_at_far_below_one_impostor_allows_no_false_accept():
    labels, scores = synthetic_scores(5, 300, 300)
    tar, threshold = tar_at_far(labels, scores, 1e-6)
    highest_impostor = scores[labels == 0].max()
    assert threshold > highest_impostor
    assert tar == np.mean(scores[labels == 1] > highest_impostor)


def test_tar_at_far_hand_worked():
    # genuine 0.9 0.5 0.3, impostor 0.6 0.4 0.2 0.1: at t = 0.5 one impostor of four passes (FAR 0.25), two
    # genuine of three (TAR 2/3); no lower threshold keeps FAR <= 0.25.
    labels, scores = [1, 1, 1, 0, 0, 0, 0], [0.9, 0.5, 0.3, 0.6, 0.4, 0.2, 0.1]
    assert tar_at_far(labels, scores, 0.25) == (2 / 3, 0.5)
    assert tar_at_far(labels, scores, 0.24) == (1 / 3, 0.9)


@pytest.mark.parametrize("genuine, impostor, expected_eer, expected_threshold", [
    # FAR = FRR = 1/4 at the ROC vertex t = 0.6
    ([0.9, 0.8, 0.7, 0.4], [0.6, 0.3, 0.2, 0.1], 0.25, 0.6),
    # a genuine and an impostor tie at 0.5: the ROC segment from (FAR 0, FRR 1/2) to (1/2, 0) crosses at 1/4
    ([0.9, 0.5], [0.5, 0.1], 0.25, 0.5),
    # separable: EER 0
    ([0.9, 0.8], [0.2, 0.1], 0.0, 0.8),
])
def test_equal_error_rate_hand_worked(genuine, impostor, expected_eer, expected_threshold):
    labels = [1] * len(genuine) + [0] * len(impostor)
    eer, threshold = equal_error_rate(labels, genuine + impostor)
    assert eer == pytest.approx(expected_eer, abs=1e-12)
    assert threshold == expected_threshold


def test_equal_error_rate_sits_between_far_and_frr_of_its_threshold():
    labels, scores = synthetic_scores(6, 300, 300)
    eer, threshold = equal_error_rate(labels, scores)
    far_t = np.mean(scores[labels == 0] >= threshold)
    frr_t = np.mean(scores[labels == 1] < threshold)
    step = 1 / 300
    assert abs(far_t - eer) <= step and abs(frr_t - eer) <= step


def test_best_threshold_is_the_brute_force_optimum():
    labels, scores = synthetic_scores(7, 200, 200, decimals=2)
    threshold, accuracy = best_threshold(labels, scores)
    brute = max(np.mean((scores >= t) == labels.astype(bool)) for t in np.unique(scores))
    assert accuracy == pytest.approx(brute, abs=1e-12)
    assert np.mean((scores >= threshold) == labels.astype(bool)) == pytest.approx(accuracy, abs=1e-12)


def test_kfold_accuracy_hand_worked():
    # Fold 0 holds a hard genuine pair (0.1) and an impostor at 0.3; folds 1..9 a genuine at 0.7 and an
    # impostor at 0.2.
    # - testing fold 0, the other folds separate at any t in (0.2, 0.7): midpoint 0.45; fold 0 gets the
    #   impostor right and the genuine pair wrong: 1/2.
    # - testing fold k > 0, the training scores 0.1g 0.2i x8 0.3i 0.7g x8 are best split at (0.3 + 0.7) / 2 =
    #   0.5 (17 of 18 right); fold k gets both right: 1.
    # mean = (0.5 + 9) / 10 = 0.95; population std = sqrt((0.45^2 + 9 * 0.05^2) / 10) = 0.15
    labels = np.array([1, 0] * 10)
    scores = np.array([0.1, 0.3] + [0.7, 0.2] * 9)
    folds = np.repeat(np.arange(10), 2)
    mean, std, per_fold, thresholds = kfold_accuracy(labels, scores, folds)
    assert mean == pytest.approx(0.95, abs=1e-12)
    assert std == pytest.approx(0.15, abs=1e-12)
    np.testing.assert_allclose(per_fold, [0.5] + [1.0] * 9)
    np.testing.assert_allclose(thresholds, [0.45] + [0.5] * 9)


def test_kfold_thresholds_come_from_the_other_folds_only():
    labels, scores = synthetic_scores(8, 300, 300)
    folds = np.arange(600) % 10
    _, _, per_fold, thresholds = kfold_accuracy(labels, scores, folds)
    for fold in range(10):
        train = folds != fold
        expected, _ = best_threshold(labels[train], scores[train])
        assert thresholds[fold] == expected
        test = ~train
        assert per_fold[fold] == np.mean((scores[test] >= expected) == labels[test].astype(bool))


def test_report_collects_the_figures():
    labels, scores = synthetic_scores(9, 300, 300)
    folds = np.arange(600) % 10
    report = verification_report(labels, scores, folds, fars=[1e-1, 1e-2])
    assert report.auc == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert report.accuracy == kfold_accuracy(labels, scores, folds)[0]
    assert list(report.tar_at_far) == [1e-1, 1e-2]
    assert (report.genuine, report.impostor) == (300, 300)
    text = report.summary()
    for expected in ("accuracy", "10-fold", "AUC", "EER", "TAR@FAR=1e-01", "TAR@FAR=1e-02"):
        assert expected in text


@pytest.mark.parametrize("labels, scores, message", [
    ([1, 1], [0.1, 0.2], "both genuine"),
    ([1, 0], [0.1, np.nan], "finite"),
    ([1, 2], [0.1, 0.2], "0/1"),
    ([1, 0, 1], [0.1, 0.2], "same length"),
])
def test_bad_scores_are_clear_errors(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        roc_curve(labels, scores)
