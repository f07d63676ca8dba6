"""Verification metrics of similarity scores: ROC curve, AUC, EER, TAR at FAR (BLUFR-style), the best
threshold and the LFW 10-fold accuracy with the threshold chosen on the other folds. NumPy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = [
    "DEFAULT_FARS",
    "roc_curve",
    "auc",
    "roc_auc",
    "equal_error_rate",
    "tar_at_far",
    "best_threshold",
    "kfold_accuracy",
    "VerificationReport",
    "verification_report",
]

# BLUFR's verification operating points (Liao et al. 2014) go down to 1e-5; 1e-6 is added for large sets.
DEFAULT_FARS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, np.float64)
    if labels.ndim != 1 or scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels and scores must be 1-D of the same length; got shapes {labels.shape} and "
                         f"{scores.shape}")
    if labels.dtype != bool:
        if not np.all(np.isin(labels, (0, 1))):
            raise ValueError("labels must be booleans or 0/1 (1 = same person)")
        labels = labels.astype(bool)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"scores must be finite; {int(np.sum(~np.isfinite(scores)))} are NaN or infinite")
    if labels.all() or not labels.any():
        raise ValueError("the scores need both genuine (same person, label 1) and impostor (label 0) pairs; "
                         f"got {int(labels.sum())} genuine and {int((~labels).sum())} impostor")
    return labels, scores


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve: FAR, TAR and the thresholds, one point per distinct score, highest threshold first.

    Formula:
    ```
    for each threshold t in [+inf, distinct scores descending]:
        FAR(t) = #{impostor score >= t} / #impostor      TAR(t) = #{genuine score >= t} / #genuine
    ```
    The same points as ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``.

    Args:
        labels: 1 (or True) for a genuine (same-person) pair, 0 for an impostor pair.
        scores: similarity scores, higher meaning more alike.

    Example:
    >>> far, tar, thresholds = roc_curve([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1])
    >>> far.tolist(), tar.tolist(), thresholds.tolist()
    ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0], [inf, 0.9, 0.6, 0.4, 0.1])
    """
    labels, scores = _check(labels, scores)
    genuine = np.sort(scores[labels])
    impostor = np.sort(scores[~labels])
    thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
    # count of values >= t in a sorted array: len - searchsorted(t, side="left")
    tar = (genuine.size - np.searchsorted(genuine, thresholds, side="left")) / genuine.size
    far = (impostor.size - np.searchsorted(impostor, thresholds, side="left")) / impostor.size
    return far, tar, thresholds


def auc(far: np.ndarray, tar: np.ndarray) -> float:
    """Area under a ROC curve given by its points (trapezoidal rule).

    Example:
    >>> auc(np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0]))
    1.0
    """
    far, tar = np.asarray(far, np.float64), np.asarray(tar, np.float64)
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2.0))


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve of ``scores`` (= ``sklearn.metrics.roc_auc_score``).

    Equals the probability that a random genuine pair scores higher than a random impostor pair (ties 1/2).

    Example:
    >>> roc_auc([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1])
    0.75
    """
    far, tar, _ = roc_curve(labels, scores)
    return auc(far, tar)


def equal_error_rate(labels, scores) -> tuple[float, float]:
    """Equal error rate (where FAR = 1 - TAR on the ROC polyline, linearly interpolated) and its threshold.

    The threshold returned is that of the ROC point nearest the crossing.

    Example:
    >>> equal_error_rate([1, 1, 1, 1, 0, 0, 0, 0], [0.9, 0.8, 0.7, 0.4, 0.6, 0.3, 0.2, 0.1])
    (0.25, 0.6)
    """
    far, tar, thresholds = roc_curve(labels, scores)
    frr = 1.0 - tar
    index = int(np.argmax(far >= frr))  # far - frr rises from -1 to +1: the first point at or past the crossing
    if index == 0:  # cannot happen (far = 0, frr = 1 at +inf) but keeps the arithmetic below safe
        return float(far[0]), float(thresholds[1])
    d_far, d_frr = far[index] - far[index - 1], frr[index] - frr[index - 1]
    fraction = (frr[index - 1] - far[index - 1]) / (d_far - d_frr)
    eer = far[index - 1] + fraction * d_far
    nearest = index if (fraction >= 0.5 or index == 1) else index - 1
    return float(eer), float(thresholds[nearest])


def tar_at_far(labels, scores, far: float | Sequence[float]) -> tuple:
    """TAR at a target FAR: the ROC point with the highest TAR whose FAR does not exceed the target.

    Formula:
    ```
    t* = min{t : FAR(t) <= far}        TAR@FAR = TAR(t*)       (FAR, TAR and the t as in roc_curve)
    ```
    As in BLUFR (Liao et al. 2014) the figure is read off the empirical ROC, never interpolated, and the FAR
    actually reached never exceeds the target. With n impostor pairs a target below 1/n can only be met with
    no false accept: the threshold is then the lowest score above every impostor score.

    Args:
        labels, scores: as for ``roc_curve``.
        far: a target FAR in [0, 1], or a sequence of them.

    Returns:
        (tar, threshold) for one target; for a sequence, a list of (tar, threshold).

    Example:
    >>> labels, scores = [1, 1, 1, 0, 0, 0, 0], [0.9, 0.5, 0.3, 0.6, 0.4, 0.2, 0.1]
    >>> tar_at_far(labels, scores, 0.25)
    (0.6666666666666666, 0.5)
    >>> tar_at_far(labels, scores, [0.1, 0.5])
    [(0.3333333333333333, 0.9), (1.0, 0.3)]
    """
    curve_far, curve_tar, thresholds = roc_curve(labels, scores)
    targets = [far] if np.isscalar(far) else list(far)
    results = []
    for target in targets:
        target = float(target)
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"tar_at_far: far must be in [0, 1]; got {target!r}")
        index = int(np.searchsorted(curve_far, target, side="right")) - 1  # last point with FAR <= target
        results.append((float(curve_tar[index]), float(thresholds[index])))
    return results[0] if np.isscalar(far) else results


def _accuracy_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate thresholds (below all, midpoints, above all) and the accuracy of ``score >= t`` at each."""
    distinct = np.unique(scores)
    candidates = np.concatenate([[distinct[0] - 1.0], (distinct[1:] + distinct[:-1]) / 2.0, [distinct[-1] + 1.0]])
    genuine = np.sort(scores[labels])
    impostor = np.sort(scores[~labels])
    true_accepts = genuine.size - np.searchsorted(genuine, candidates, side="left")
    true_rejects = np.searchsorted(impostor, candidates, side="left")
    return candidates, (true_accepts + true_rejects) / labels.size


def best_threshold(labels, scores) -> tuple[float, float]:
    """The threshold that classifies the most pairs right (same person when ``score >= threshold``) and its accuracy.

    Candidates are the midpoints between consecutive distinct scores, plus one below and one above all scores;
    among equally good candidates the middle one (the lower middle for an even count) is returned.

    Example:
    >>> best_threshold([1, 1, 0, 0], [0.9, 0.7, 0.3, 0.1])
    (0.5, 1.0)
    """
    labels, scores = _check(labels, scores)
    candidates, accuracy = _accuracy_curve(labels, scores)
    best = np.flatnonzero(accuracy == accuracy.max())
    index = best[(len(best) - 1) // 2]
    return float(candidates[index]), float(accuracy[index])


def kfold_accuracy(labels, scores, folds) -> tuple[float, float, np.ndarray, np.ndarray]:
    """LFW protocol accuracy: each fold is classified with the best threshold of the other folds.

    Formula:
    ```
    for each fold k:  t_k = best_threshold(pairs not in k)    acc_k = mean((score >= t_k) == same) over fold k
    accuracy = mean_k acc_k       std = population standard deviation of acc_k (ddof = 0)
    ```

    Args:
        labels, scores: as for ``roc_curve``.
        folds: the fold id of each pair (LFW View 2: 10 folds of 600 pairs).

    Returns:
        (mean accuracy, std, per-fold accuracies, per-fold thresholds), folds in increasing id order.

    Example:
    >>> labels = [1, 0] * 3
    >>> scores = [0.9, 0.1, 0.8, 0.3, 0.2, 0.4]
    >>> mean, std, per_fold, thresholds = kfold_accuracy(labels, scores, [0, 0, 1, 1, 2, 2])
    >>> round(mean, 4), per_fold.tolist(), thresholds.round(4).tolist()
    (0.6667, [1.0, 0.5, 0.5], [0.6, 0.15, 0.55])
    """
    labels, scores = _check(labels, scores)
    folds = np.asarray(folds)
    if folds.shape != labels.shape:
        raise ValueError(f"folds must give one fold id per pair; got shape {folds.shape} for {labels.size} pairs")
    fold_ids = np.unique(folds)
    if fold_ids.size < 2:
        raise ValueError(f"kfold_accuracy needs at least 2 folds; got {fold_ids.size}")
    accuracies, thresholds = [], []
    for fold in fold_ids:
        test = folds == fold
        train_labels = labels[~test]
        if train_labels.all() or not train_labels.any():
            raise ValueError(f"the folds other than fold {fold} hold only one kind of pair; cannot choose a threshold")
        candidates, accuracy = _accuracy_curve(train_labels, scores[~test])
        best = np.flatnonzero(accuracy == accuracy.max())
        threshold = candidates[best[(len(best) - 1) // 2]]
        accuracies.append(np.mean((scores[test] >= threshold) == labels[test]))
        thresholds.append(threshold)
    accuracies = np.asarray(accuracies, np.float64)
    return float(accuracies.mean()), float(accuracies.std()), accuracies, np.asarray(thresholds, np.float64)


@dataclass
class VerificationReport:
    """Everything ``verification_report`` measures on one set of scored pairs."""

    accuracy: float
    accuracy_std: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray
    auc: float
    eer: float
    eer_threshold: float
    best_threshold: float
    best_accuracy: float
    tar_at_far: dict[float, tuple[float, float]]
    far: np.ndarray = field(repr=False)
    tar: np.ndarray = field(repr=False)
    thresholds: np.ndarray = field(repr=False)
    genuine: int = 0
    impostor: int = 0

    def summary(self) -> str:
        """The report as a few lines of text.

        Example:
        >>> report = verification_report([1, 0] * 4, [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4], [0, 0, 1, 1] * 2)
        >>> print(report.summary().splitlines()[0])
        accuracy  100.00% +- 0.00% (2-fold, threshold chosen on the other folds; 4 genuine / 4 impostor pairs)
        """
        lines = [
            f"accuracy  {100 * self.accuracy:.2f}% +- {100 * self.accuracy_std:.2f}% "
            f"({self.fold_accuracies.size}-fold, "
            f"threshold chosen on the other folds; {self.genuine} genuine / {self.impostor} impostor pairs)",
            f"AUC       {self.auc:.6f}",
            f"EER       {100 * self.eer:.2f}% (threshold {self.eer_threshold:.4f})",
            f"best      threshold {self.best_threshold:.4f}: {100 * self.best_accuracy:.2f}% of all pairs right",
        ]
        floor = 1.0 / self.impostor if self.impostor else math.inf
        for target, (tar, threshold) in self.tar_at_far.items():
            note = f"  (below 1/{self.impostor} impostors: no false accept allowed)" if target < floor else ""
            lines.append(f"TAR@FAR={target:.0e}  {100 * tar:6.2f}% (threshold {threshold:.4f}){note}")
        return "\n".join(lines)


def verification_report(labels, scores, folds, fars: Sequence[float] = DEFAULT_FARS) -> VerificationReport:
    """ROC, AUC, EER, TAR at each FAR in ``fars``, best threshold and k-fold accuracy of scored pairs.

    Example:
    >>> report = verification_report([1, 0] * 4, [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4], [0, 0, 1, 1] * 2)
    >>> report.accuracy, report.auc, report.eer
    (1.0, 1.0, 0.0)
    """
    labels, scores = _check(labels, scores)
    far, tar, thresholds = roc_curve(labels, scores)
    accuracy, std, per_fold, fold_thresholds = kfold_accuracy(labels, scores, folds)
    eer, eer_threshold = equal_error_rate(labels, scores)
    threshold, best = best_threshold(labels, scores)
    at_far = dict(zip((float(f) for f in fars), tar_at_far(labels, scores, list(fars))))
    return VerificationReport(
        accuracy=accuracy, accuracy_std=std, fold_accuracies=per_fold, fold_thresholds=fold_thresholds,
        auc=auc(far, tar), eer=eer, eer_threshold=eer_threshold, best_threshold=threshold, best_accuracy=best,
        tar_at_far=at_far, far=far, tar=tar, thresholds=thresholds,
        genuine=int(labels.sum()), impostor=int((~labels).sum()),
    )
