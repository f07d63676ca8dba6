"""The offline open-set benchmark (examples/open_set_verification.py), run briefly in-process: its table's
numbers are recomputed here from the returned embeddings with brute-force NumPy, its test identities are
checked to be unseen, and its ROC plot to be written."""

import contextlib
import importlib.util
import io
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "open_set_verification.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("open_set_verification", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    demo = _load_example()
    out = tmp_path_factory.mktemp("open_set")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = demo.main(["--quick", "--objectives", "softmax,amsoftmax", "--out", str(out)])
    return demo, results, out, printed.getvalue()


def _brute_force_kfold_accuracy(same, scores, folds):
    """LFW protocol, by enumeration: per fold, try every candidate threshold (midpoints of the other folds'
    distinct scores, one below, one above), keep the middle of the best ones, score the held-out fold."""
    accuracies = []
    for fold in np.unique(folds):
        train = folds != fold
        distinct = sorted(set(scores[train].tolist()))
        candidates = [distinct[0] - 1.0] + [(a + b) / 2 for a, b in zip(distinct, distinct[1:])] + [distinct[-1] + 1]
        accuracy = [sum((s >= t) == g for s, g in zip(scores[train], same[train])) for t in candidates]
        best = [t for t, a in zip(candidates, accuracy) if a == max(accuracy)]
        threshold = best[(len(best) - 1) // 2]
        held_out = [(s >= threshold) == g for s, g in zip(scores[~train], same[~train])]
        accuracies.append(sum(held_out) / len(held_out))
    return float(np.mean(accuracies)), float(np.std(accuracies))


def _brute_force_tar_at_far(same, scores, target):
    """max TAR over thresholds t (every score, and +inf) whose FAR = #{impostor >= t} / #impostor <= target."""
    genuine, impostor = scores[same], scores[~same]
    best = 0.0
    for t in list(scores) + [math.inf]:
        if np.mean(impostor >= t) <= target:
            best = max(best, float(np.mean(genuine >= t)))
    return best


def _brute_force_angles(embeddings, labels):
    intra, inter = [], []
    for i, j in itertools.combinations(range(len(labels)), 2):
        a, b = embeddings[i].astype(np.float64), embeddings[j].astype(np.float64)
        angle = math.degrees(math.acos(max(-1.0, min(1.0, a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))))
        (intra if labels[i] == labels[j] else inter).append(angle)
    return np.mean(intra), np.mean(inter)


def test_table_numbers_match_a_brute_force_recomputation(quick_run):
    _, results, _, _ = quick_run
    assert set(results) == {"softmax", "amsoftmax"}
    for name, r in results.items():
        first, second, same, folds = r["pairs"]
        e = r["embeddings"].astype(np.float64)
        cosines = np.sum(e[first] * e[second], axis=1) / (np.linalg.norm(e[first], axis=1)
                                                           * np.linalg.norm(e[second], axis=1))
        np.testing.assert_allclose(r["scores"], cosines, rtol=0, atol=1e-9, err_msg=name)
        accuracy, std = _brute_force_kfold_accuracy(same, r["scores"], folds)
        assert r["accuracy"] == pytest.approx(accuracy, abs=1e-12), name
        assert r["accuracy_std"] == pytest.approx(std, abs=1e-12), name
        for far in (1e-2, 1e-3):
            assert r[f"tar_at_far_{far:g}"] == pytest.approx(_brute_force_tar_at_far(same, r["scores"], far),
                                                             abs=1e-12), (name, far)
        intra, inter = _brute_force_angles(r["embeddings"], r["test_labels"])
        assert r["intra_angle_deg"] == pytest.approx(intra, abs=1e-6), name
        assert r["inter_angle_deg"] == pytest.approx(inter, abs=1e-6), name


def test_pairs_are_lfw_style_on_unseen_identities(quick_run):
    demo, results, _, _ = quick_run
    r = results["softmax"]
    train_ids, test_ids, labels = r["train_identities"], r["test_identities"], r["test_labels"]
    assert not set(train_ids.tolist()) & set(test_ids.tolist())
    # Unseen in appearance too, not only in name: every test identity's reference image differs from every
    # training identity's.
    rng = np.random.default_rng(0)
    reference = {int(i): demo.render(demo.make_identity(0, int(i)), 1, rng, (16, 16), canonical=True)[0]
                 for i in np.concatenate([train_ids, test_ids])}
    gaps = [np.abs(reference[int(a)] - reference[int(b)]).mean() for a in train_ids for b in test_ids]
    assert min(gaps) > 0.02
    first, second, same, folds = r["pairs"]
    assert set(np.unique(folds).tolist()) == set(range(10))
    for fold in range(10):
        in_fold = folds == fold
        assert same[in_fold].sum() == (~same[in_fold]).sum() > 0  # balanced per fold
        fold_identities = set(labels[first[in_fold]].tolist()) | set(labels[second[in_fold]].tolist())
        other = set(labels[first[~in_fold]].tolist()) | set(labels[second[~in_fold]].tolist())
        assert not fold_identities & other, fold  # identity-disjoint folds
    np.testing.assert_array_equal(labels[first] == labels[second], same)
    assert len(set(zip(first.tolist(), second.tolist()))) == len(first) and np.all(first != second)


def test_roc_png_and_markdown_table_are_written(quick_run):
    _, results, out, printed = quick_run
    png = out / "roc.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert all(r["roc_png"] == str(png) for r in results.values())
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in printed.splitlines() if line.startswith("| ") and "objective" not in line}
    assert set(rows) == {"softmax", "amsoftmax"}
    assert rows["amsoftmax"][0] == "s=30, m=0.35" and rows["softmax"][0] == "-"  # AM-Softmax's published s, m
    for name, r in results.items():
        assert rows[name][1] == f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}"
        assert rows[name][3] == f"{100 * r['tar_at_far_0.001']:.1f}"
        assert rows[name][4] == f"{r['intra_angle_deg']:.1f}"


def test_renderings_are_deterministic_and_vary_within_an_identity():
    demo = _load_example()
    identity = demo.make_identity(3, 7)
    a = demo.render(identity, 2, np.random.default_rng(1), (16, 16))
    b = demo.render(demo.make_identity(3, 7), 2, np.random.default_rng(1), (16, 16))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 16, 16, 3) and a.min() >= -1.0 and a.max() <= 1.0
    assert np.abs(a[0] - a[1]).mean() > 0.02  # pose, lighting and noise differ per image
