"""The demo of README command 1, run briefly in-process: it trains, reports and draws for every objective."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_hypersphere.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("digits_hypersphere", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_angular_stats_match_hand_worked_directions():
    demo = _load_example()
    # Two samples per class, both exactly on one of the 10 axis-spread directions: intra is 0, inter is
    # the mean pairwise angle of those directions, computed here with arccos on unit vectors.
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(10, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    labels = np.repeat(np.arange(10), 2)
    embeddings = directions[labels] * rng.uniform(0.5, 3.0, size=(20, 1))
    stats = demo.angular_stats(embeddings, labels)
    pairs = [math.degrees(math.acos(np.clip(directions[i] @ directions[j], -1, 1)))
             for i in range(10) for j in range(i + 1, 10)]
    assert stats["intra_angle_deg"] == pytest.approx(0.0, abs=1e-3)
    assert stats["inter_angle_deg"] == pytest.approx(np.mean(pairs), abs=1e-4)
    assert stats["min_inter_angle_deg"] == pytest.approx(min(pairs), abs=1e-4)


def test_demo_trains_every_objective_and_writes_one_png_each(tmp_path, capsys):
    demo = _load_example()
    results = demo.main(["--epochs", "4", "--out", str(tmp_path)])
    assert set(results) == {"softmax", "normface", "sphereface", "amsoftmax", "x2softmax", "arcface",
                            "c_contrastive", "c_triplet"}
    for name, r in results.items():
        assert r["accuracy"] > 0.5, (name, r["accuracy"])  # chance is 0.1; 4 epochs reach well above it
        assert r["intra_angle_deg"] < r["inter_angle_deg"], name
        png = Path(r["png"])
        assert png.parent == tmp_path and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = capsys.readouterr().out
    assert "| objective" in table and "arcface" in table and "| c_triplet " in table
