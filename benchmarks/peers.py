"""The same training step with a peer library, timed in the same run: pytorch-metric-learning's CosFace / ArcFace
on PyTorch against keras-margin's AM-Softmax / ArcFace heads on TensorFlow with XLA, each as a ratio to its own
framework's matmul floor and to the other.

The step: forward + backward of the loss w.r.t. the embeddings (B, d) and the class weights (d, C), float32,
CPU. keras-margin's side is ``benchmarks/heads.py`` (its floor and head calls alternate in a fresh child
process); the PyTorch side runs here, its floor (``X @ W``, ``dZ @ W^T``, ``X^T @ dZ``) and the peer's loss
alternating the same way, with ``torch.set_num_threads(os.cpu_count())``. The two sides run one after the other,
so the "peer / keras-margin" column compares times taken minutes apart on the same machine: read it with the
load averages printed beside it.

Peers compared: pytorch-metric-learning (``pip install -e .[peers]`` installs it and PyTorch). InsightFace's
arcface_torch and Keras_insightface are not packages on the index, so they are not compared here.

Run by hand:  python benchmarks/peers.py [--batch 256] [--classes 10516,85742] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# keras-margin head (benchmarks/heads.py name) -> the pytorch-metric-learning loss with the same objective and
# keras-margin's defaults (AM-Softmax s=30, m=0.35; ArcFace s=64, m=0.5 rad = 28.65 degrees, pml's unit).
PAIRS = {
    "amsoftmax": ("CosFaceLoss", {"margin": 0.35, "scale": 30.0}),
    "arcface": ("ArcFaceLoss", {"margin": float(np.degrees(0.5)), "scale": 64.0}),
}


def keras_margin_side(args, heads: list[str]) -> dict:
    """{(head, batch, classes): heads.py's result} from one run of benchmarks/heads.py on TF with XLA."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "heads.json"
        command = [sys.executable, str(ROOT / "benchmarks" / "heads.py"), "--backend", "tensorflow", "--jit", "on",
                   "--heads", ",".join(heads), "--batch", ",".join(map(str, args.batch)),
                   "--classes", ",".join(map(str, args.classes)), "--reps", str(args.reps), "--json", str(out)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"})
        results = json.loads(out.read_text())
    return {(r["objective"], r["batch"], r["classes"]): r for r in results if "median_s" in r}


def torch_side(head: str, batch: int, num_classes: int, dim: int, reps: int, seed: int) -> dict:
    """Median times of the PyTorch floor and the peer loss's step, calls alternating."""
    import torch
    from pytorch_metric_learning import losses

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.standard_normal((batch, dim), dtype=np.float32), requires_grad=True)
    labels = torch.tensor(rng.integers(0, num_classes, size=batch))
    class_name, kwargs = PAIRS[head]
    loss_fn = getattr(losses, class_name)(num_classes=num_classes, embedding_size=dim, **kwargs)
    w = torch.tensor((rng.standard_normal((dim, num_classes)) / np.sqrt(dim)).astype(np.float32))
    dz = torch.tensor(rng.standard_normal((batch, num_classes), dtype=np.float32))

    def floor():
        with torch.no_grad():
            return x @ w, dz @ w.T, x.T @ dz

    def peer():
        x.grad = None
        loss_fn.W.grad = None
        loss = loss_fn(x, labels)
        loss.backward()
        return loss

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    for _ in range(2):
        timed(floor), timed(peer)
    floor_times, peer_times = [], []
    for _ in range(reps):
        floor_times.append(timed(floor))
        peer_times.append(timed(peer))
    return {"floor_s": statistics.median(floor_times), "peer_s": statistics.median(peer_times),
            "ratio": statistics.median(p / f for p, f in zip(peer_times, floor_times)),
            "torch": torch.__version__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="256", help="comma-separated batch sizes (default 256)")
    parser.add_argument("--classes", default="10516,85742", help="comma-separated class counts")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--heads", default=",".join(PAIRS), help=f"subset of {','.join(PAIRS)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.batch = [int(v) for v in args.batch.split(",")]
    args.classes = [int(v) for v in args.classes.split(",")]
    heads = [h for h in args.heads.split(",") if h]
    unknown = sorted(set(heads) - set(PAIRS))
    if unknown:
        parser.error(f"--heads: unknown {unknown}; choose from {list(PAIRS)}")
    try:
        import pytorch_metric_learning
        import torch
    except ImportError as error:
        parser.exit(2, f"peers.py: {error.name} is not installed: pip install -e .[peers]\n")
    load_start = os.getloadavg()[0]
    ours = keras_margin_side(args, heads)
    load_middle = os.getloadavg()[0]
    print(f"\n### keras-margin (TensorFlow + XLA) vs pytorch-metric-learning {pytorch_metric_learning.__version__} "
          f"(PyTorch {torch.__version__}), {os.cpu_count()} CPU cores, d={args.dim}, float32, forward + backward")
    print("| objective | B | C | keras-margin ms | / TF floor | peer ms | / torch floor | peer / keras-margin |")
    print("|---|---|---|---|---|---|---|---|")
    for head in heads:
        for batch in args.batch:
            for num_classes in args.classes:
                mine = ours.get((head, batch, num_classes))
                peer = torch_side(head, batch, num_classes, args.dim, args.reps, args.seed)
                label = f"{head} / {PAIRS[head][0]}"
                if mine is None:
                    print(f"| {label} | {batch} | {num_classes} | error | | {peer['peer_s'] * 1e3:.0f} | "
                          f"{peer['ratio']:.2f} | |")
                    continue
                print(f"| {label} | {batch} | {num_classes} | {mine['median_s'] * 1e3:.0f} | {mine['ratio']:.2f} | "
                      f"{peer['peer_s'] * 1e3:.0f} | {peer['ratio']:.2f} | "
                      f"{peer['peer_s'] / mine['median_s']:.2f} |")
    print(f"\nLoad average (1 min): {load_start:.1f} before keras-margin's run, {load_middle:.1f} before PyTorch's, "
          f"{os.getloadavg()[0]:.1f} at the end.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
