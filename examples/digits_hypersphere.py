"""Digits on the hypersphere: plain softmax against the five margin heads and NormFace's two agent losses.

Trains the same small network with a 3-D embedding on scikit-learn's bundled 8x8 digits (no download) once
per objective, prints held-out accuracy and angular statistics of the embeddings, and writes one PNG per
objective of the L2-normalized 3-D test features on the unit sphere, coloured by class (cf. AM-Softmax's
FeatureVis).

Run: ``python examples/digits_hypersphere.py [--epochs N] [--seed S] [--out DIR] [--objectives a,b]``.
From code: ``main(["--epochs", "5"])`` returns ``{objective: metrics}``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: keep the output readable

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_margin as km  # noqa: E402

NUM_CLASSES = 10
EMBEDDING_DIM = 3


class Objective(NamedTuple):
    """How to build one objective's classifier and loss; ``head_kwargs`` and ``loss_kwargs`` are its table row."""

    title: str
    head: Callable[..., keras.layers.Layer]  # head(NUM_CLASSES, **head_kwargs, name="classifier")
    head_kwargs: dict
    loss: Callable[..., object] | None = None  # loss(**loss_kwargs); None: the head's own loss, head.loss
    loss_kwargs: dict = {}

    @property
    def hyper_parameters(self) -> dict:
        return {**self.head_kwargs, **self.loss_kwargs}


def _softmax_classifier(num_classes: int, name: str) -> keras.layers.Layer:
    return keras.layers.Dense(num_classes, activation="softmax", name=name)


# One scale for every head, sized for 10 classes on the 2-sphere rather than for 10k face identities:
# NormFace's lower bound for C=10 and target probability 0.99 is s >= 6.1 (km.normface_scale_lower_bound),
# and s=10 clears it. The face defaults (s=30-64) are not needed here; at s=30 (seed 0) NormFace's classes
# spread (intra 13.5 vs 9.0 deg) while AM-Softmax and ArcFace still work. With s shared, the objectives
# differ only by their margins, and those are each objective's own defaults: they fit even though the
# best 10-direction code on the sphere has a minimum pairwise angle of only ~66 degrees (Tammes problem).
# SphereFace runs in its cosine form (Sequential + head.loss): feature-normalized, lambda fixed at
# lambda_min (the end of the head's annealing schedule), no annealing.
# NormFace's agent losses (C-contrastive, C-triplet) train the same network and NormFaceHead, whose class
# weight columns are the agents: the head outputs the cosines and the agent loss replaces head.loss. They
# work on squared distances D = 2 - 2 cos, so no scale applies (the head's s is unused); their margins are
# the paper's and the released configs' defaults. Same optimizer, learning rate and epochs as the others.
# C-contrastive falls short at these settings (78 % at seed 0, 40 epochs) and it is left so, not tuned:
# early in training some agents merge (seed 0: those of 2, 3 and 9 lie within 1 degree of each other at
# epochs 30-40), and a merged pair is a saddle of this loss. While a class-a feature x is within the margin
# of agent b, its loss is D(x,a) + 1 - D(x,b) = 1 + 2 x.(w_b - w_a), linear in x: the pull to w_a and the
# push from w_b cancel as w_b -> w_a, and the agents feel only the (small) difference between the two
# classes' features. The pair separates slowly: seed 0 reaches 97.8 % at 100 epochs; at 40 epochs seeds
# 1-3 give 87.6, 97.1 and 55.1 %, and neither lr 1e-3 (74.7 %) nor 1e-2 (87.6 %) helps. C-triplet (its
# nearest negative only, with the center pull) does not stall here.
OBJECTIVES: dict[str, Objective] = {
    "softmax": Objective("Softmax (Dense + softmax)", _softmax_classifier, {},
                         keras.losses.SparseCategoricalCrossentropy),
    "normface": Objective("NormFace", km.NormFaceHead, {"s": 10.0}),
    "sphereface": Objective("SphereFace (A-Softmax, feature-normalized)", km.SphereFaceHead,
                            {"m": 4, "s": 10.0, "lambda_min": 5.0}),
    "amsoftmax": Objective("AM-Softmax / CosFace", km.AMSoftmaxHead, {"s": 10.0, "m": 0.35}),
    "x2softmax": Objective("X2-Softmax", km.X2SoftmaxHead, {"s": 10.0, "a": -0.9, "h": 0.0, "k": 0.65}),
    "arcface": Objective("ArcFace", km.ArcFaceHead, {"s": 10.0, "m": 0.5}),
    "c_contrastive": Objective("NormFace C-contrastive (agents)", km.NormFaceHead, {},
                               km.losses.CContrastiveLoss, {"margin": 1.0}),
    "c_triplet": Objective("NormFace C-triplet + center (agents)", km.NormFaceHead, {},
                           km.losses.CTripletLoss, {"margin": 0.8, "center": True}),
}
NAME_WIDTH = max(len("objective"), *map(len, OBJECTIVES))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40, help="training epochs per objective (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the shuffling")
    parser.add_argument("--out", type=Path, default=Path("outputs/digits_hypersphere"),
                        help="folder for the PNGs (default outputs/digits_hypersphere/)")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES),
                        help=f"comma-separated subset of {','.join(OBJECTIVES)} (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args(argv)
    args.objectives = [name.strip() for name in args.objectives.split(",") if name.strip()]
    unknown = [name for name in args.objectives if name not in OBJECTIVES]
    if unknown:
        parser.error(f"--objectives: unknown {unknown}; choose from {list(OBJECTIVES)}")
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    return args


def load_data(seed: int):
    """Digits scaled to [0, 1], split 75/25 stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    return train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)


def build_model(objective: str, input_dim: int) -> tuple[keras.Sequential, object]:
    """The shared embedding network plus the objective's classifier; returns (model, loss)."""
    spec = OBJECTIVES[objective]
    model = keras.Sequential([
        keras.Input((input_dim,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(EMBEDDING_DIM, name="embedding"),
    ], name=objective)
    head = spec.head(NUM_CLASSES, **spec.head_kwargs, name="classifier")
    model.add(head)
    loss = head.loss if spec.loss is None else spec.loss(**spec.loss_kwargs)
    return model, loss


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def angle_deg(cos: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def angular_stats(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Angles of the test embeddings, in degrees.

    - class center direction c_k: unit(mean over the test samples of class k of unit(embedding));
    - intra: mean over all test samples of angle(unit(embedding_i), c_{y_i});
    - inter: mean over the 45 pairs k < l of angle(c_k, c_l); min_inter: the smallest of those angles.
    """
    features = unit(embeddings)
    centers = unit(np.stack([features[labels == k].mean(axis=0) for k in range(NUM_CLASSES)]))
    intra = angle_deg(np.sum(features * centers[labels], axis=-1))
    pair_angles = angle_deg(centers @ centers.T)[np.triu_indices(NUM_CLASSES, k=1)]
    return {"intra_angle_deg": float(intra.mean()), "inter_angle_deg": float(pair_angles.mean()),
            "min_inter_angle_deg": float(pair_angles.min())}


def plot_sphere(path: Path, features: np.ndarray, labels: np.ndarray, class_directions: np.ndarray | None,
                title: str) -> None:
    """Scatter of unit 3-D features on a wireframe sphere, coloured by class; class weights as stars."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 6.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(projection="3d")
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 37), np.linspace(0, np.pi, 19))
    ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", linewidth=0.4)
    cmap = matplotlib.colormaps["tab10"]
    for k in range(NUM_CLASSES):
        points = features[labels == k]
        ax.scatter(points[:, 0], points[:, 1], points[:, 2], s=7, color=cmap(k), label=str(k))
    if class_directions is not None:
        w = unit(class_directions) * 1.12
        ax.scatter(w[:, 0], w[:, 1], w[:, 2], marker="*", s=140, c=[cmap(k) for k in range(NUM_CLASSES)],
                   edgecolors="black", linewidths=0.8, depthshade=False)
    ax.set_xlim(-1.1, 1.1)
    ax.set_ylim(-1.1, 1.1)
    ax.set_zlim(-1.1, 1.1)
    ax.set_box_aspect((1, 1, 1), zoom=1.25)
    ax.set_axis_off()
    ax.view_init(elev=20, azim=35)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", ncols=5, fontsize=8, markerscale=2, title="class", title_fontsize=8,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path)


def run_objective(objective: str, data, args: argparse.Namespace) -> dict:
    x_train, x_test, y_train, y_test = data
    keras.utils.set_random_seed(args.seed)  # same backbone initialization and batch order for every objective
    model, loss = build_model(objective, x_train.shape[1])
    model.compile(keras.optimizers.Adam(args.learning_rate), loss=loss, jit_compile=True)
    start = time.perf_counter()
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, verbose=0)
    train_seconds = time.perf_counter() - start

    embedder = keras.Sequential([keras.Input((x_train.shape[1],)), *model.layers[:-1]])
    # 450 test samples: one eager call each (no predict() tracing and compiling).
    embeddings = keras.ops.convert_to_numpy(embedder(x_test, training=False))
    # cosines (agent losses: the largest is the nearest agent), or softmax probabilities
    scores = keras.ops.convert_to_numpy(model(x_test, training=False))
    accuracy = float(np.mean(np.argmax(scores, axis=-1) == y_test))
    stats = angular_stats(embeddings, y_test)
    kernel = keras.ops.convert_to_numpy(model.layers[-1].kernel)  # (3, 10): class weight directions

    path = args.out / f"{objective}.png"
    title = (f"{OBJECTIVES[objective].title}  {_format_params(objective)}\n"
             f"test accuracy {accuracy:.1%}, intra {stats['intra_angle_deg']:.1f} deg, "
             f"inter {stats['inter_angle_deg']:.1f} deg (min {stats['min_inter_angle_deg']:.1f})")
    plot_sphere(path, unit(embeddings), y_test, kernel.T, title)
    return {"accuracy": accuracy, **stats, "hyper_parameters": OBJECTIVES[objective].hyper_parameters,
            "train_seconds": train_seconds, "png": str(path)}


def _format_params(objective: str) -> str:
    params = OBJECTIVES[objective].hyper_parameters
    return ", ".join(f"{k}={v}" if isinstance(v, bool) else f"{k}={v:g}" for k, v in params.items()) \
        if params else "(no hyper-parameters)"


def print_table(results: dict[str, dict], args: argparse.Namespace, n_train: int, n_test: int) -> None:
    print(f"\nDigits (sklearn, {n_train} train / {n_test} test), 3-D embedding, {args.epochs} epochs, "
          f"Adam lr={args.learning_rate:g}, batch {args.batch_size}, seed {args.seed}, "
          f"backend {keras.backend.backend()}, jit_compile=True")
    print("network: 64 pixels -> Dense 128 relu -> Dense 64 relu -> Dense 3 (embedding) -> classifier "
          "(Dense 10 + softmax, or the margin head; agent losses: NormFaceHead's cosines)")
    header = (f"| {'objective':<{NAME_WIDTH}} | {'hyper-parameters':<30} | {'test acc':>8} | {'intra (deg)':>11} | "
              f"{'inter (deg)':>11} | {'min inter':>9} | {'train s':>7} |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for name, r in results.items():
        print(f"| {name:<{NAME_WIDTH}} | {_format_params(name):<30} | {r['accuracy']:>8.1%} | "
              f"{r['intra_angle_deg']:>11.1f} | {r['inter_angle_deg']:>11.1f} | {r['min_inter_angle_deg']:>9.1f} | "
              f"{r['train_seconds']:>7.1f} |")
    print("test acc: argmax of the head's cosines (agent losses: the nearest agent; softmax: argmax of its "
          "probabilities) on the held-out split.")
    print("Angles on the L2-normalized test embeddings; class center c_k = normalized mean of the unit test "
          "embeddings of class k.")
    print("intra: mean angle between each test embedding and its own class center; inter: mean angle over the "
          "45 pairs of class centers; min inter: the closest pair (at best ~66 deg for 10 directions in 3-D).")
    print(f"PNGs: {args.out}/<objective>.png (test features on the unit sphere; stars: class weight directions)")


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_data(args.seed)
    results = {}
    for objective in args.objectives:
        results[objective] = run_objective(objective, data, args)
        r = results[objective]
        print(f"{objective:<{NAME_WIDTH}} acc {r['accuracy']:.1%}  intra {r['intra_angle_deg']:.1f}  "
              f"inter {r['inter_angle_deg']:.1f}  ({r['train_seconds']:.1f} s)", flush=True)
    print_table(results, args, len(data[2]), len(data[3]))
    return results


if __name__ == "__main__":
    main()
