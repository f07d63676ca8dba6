"""A class-sharded AM-Softmax head on 4 virtual CPU devices (JAX backend, keras.distribution.ModelParallel).

Builds a small embedding network + ``AMSoftmaxHead`` on one device, copies it onto a (batch=1, model=4)
device mesh with ``keras_margin.distribution.shard_heads`` (the head's kernel split along the classes,
everything else replicated), trains a few steps on random identities and prints where each slice of the
kernel lives. The virtual devices come from XLA_FLAGS, which must be set before JAX is imported: this
script sets it (and KERAS_BACKEND=jax) itself, so run it as a fresh process.

Run: ``python examples/sharded_head.py [--classes 8192] [--dim 128] [--steps 5] [--devices 4]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=8192, help="identities (a multiple of --devices)")
    parser.add_argument("--dim", type=int, default=128, help="embedding size")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--devices", type=int, default=4, help="virtual CPU devices, all on the class axis")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parse(argv)
    if "jax" in sys.modules or "keras" in sys.modules:
        raise RuntimeError("sharded_head.py must run in a fresh process: it configures XLA before JAX loads.")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} " \
                              f"--xla_force_host_platform_device_count={args.devices}".strip()
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import keras
    import numpy as np

    import keras_margin as km
    from keras_margin.distribution import shard_heads

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    num_samples = args.batch * args.steps
    images = rng.normal(size=(num_samples, 32)).astype("float32")
    labels = rng.integers(0, args.classes, size=num_samples).astype("int32")

    model = keras.Sequential([
        keras.Input((32,)),
        keras.layers.Dense(args.dim, activation="relu", name="embedding_hidden"),
        keras.layers.Dense(args.dim, name="embedding"),
        km.AMSoftmaxHead(args.classes, name="head"),
    ])
    mesh = keras.distribution.DeviceMesh((1, args.devices), ("batch", "model"), keras.distribution.list_devices())
    sharded = shard_heads(model, mesh)  # sets keras.distribution.ModelParallel globally
    head = sharded.get_layer("head")
    sharded.compile(keras.optimizers.SGD(0.5), loss=head.loss)
    history = sharded.fit(images, labels, batch_size=args.batch, epochs=1, verbose=0)

    kernel = head.kernel.value
    print(f"{args.classes} classes x {args.dim} dims on {args.devices} devices; "
          f"kernel {tuple(kernel.shape)} sharded as {kernel.sharding.spec}")
    shapes = {}
    for shard in sorted(kernel.addressable_shards, key=lambda s: s.device.id):
        shapes[str(shard.device)] = tuple(shard.data.shape)
        print(f"  {shard.device}: kernel slice {tuple(shard.data.shape)}, classes {shard.index[1].start}"
              f"..{shard.index[1].stop - 1}")
    print(f"loss after {args.steps} steps: {history.history['loss'][-1]:.4f}")
    return {"spec": tuple(kernel.sharding.spec), "shapes": shapes, "loss": history.history["loss"][-1]}


if __name__ == "__main__":
    main()
