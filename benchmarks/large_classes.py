"""Very large class counts: step time and peak memory of the dense head path against the chunked (and,
on request, the class-sampled) fused loss, for AM-Softmax at batch 256, embedding 512.

One step is what the head costs inside a training step: the head's fused loss (``AMSoftmaxHead(C,
fused_loss=True, chunk_size=..., sample_rate=...)`` through ``head.stateless_call``), its gradient
w.r.t. the kernel and the embeddings (which a backbone would need), and an SGD update of the kernel,
compiled by XLA (JAX: ``jax.jit`` with the kernel donated; TensorFlow: ``tf.function(jit_compile=True)``).
The dense path is the same head with ``chunk_size=None``: cosines, margin logits and cross-entropy on
the full (batch, C) matrix. The chunked paths are ``keras_margin.chunked``: "rows R" (``chunk_by="rows"``,
R rows of the batch per chunk, each against every class, gradient formed in the forward pass: three matrix
products) and "classes N" (``chunk_by="classes"``, N classes per chunk, running log-sum-exp and a recomputing
backward pass: four products, least memory).

Each configuration runs in a fresh interpreter; the step time is the median of ``--reps`` steps after
one warm-up step. Memory, two ways:
- "XLA temp": the compiled step's temporary buffers from XLA's memory analysis
  (``jax.jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes``; JAX only, n/a on
  TensorFlow, whose CPU build exposes no buffer assignment; on a GPU TensorFlow reports the device's
  peak from ``tf.config.experimental.get_memory_info`` instead).
- "RSS peak": the process's peak resident set growth (VmHWM in /proc/self/status) during the timed
  steps, over its RSS once the weights, inputs and compiled step exist and one warm-up step has run
  (freed heap trimmed with malloc_trim and the peak reset through /proc/self/clear_refs first).
"Extra" is either figure minus the kernel gradient, (d x C) float32, which every path must hold: the
issue's targets are chunked extra <= 10% of dense extra, chunked time <= 1.05x dense at 85,742
classes and below dense at 1,000,000.

The update is ``w -= 0.1 g`` by default; ``--optimizer momentum`` makes it Keras' ``SGD(0.1, momentum=0.9)``
(``stateless_apply`` / ``apply``) for every path. "sampled-v1" is Partial FC with ``sample_update="sampled"``
and the optimizer wrapped in ``keras_margin.PartialFCOptimizer`` (InsightFace's first version: only the
sampled columns and their momentum stepped), its default sparse update (the sampled columns gathered, stepped
and scattered back); "sampled-v1-dense" the same with ``update="dense"`` (the whole kernel stepped, the
columns outside the sample and their momentum restored). A path name with "-class-major" appended runs the
same with ``kernel_layout="classes_first"`` (the kernel (C, d), one row per class; e.g. "sampled-v1-class-major").

Usage:
    KERAS_BACKEND=jax python benchmarks/large_classes.py                 # 10,516 and 85,742 classes
    KERAS_BACKEND=tensorflow python benchmarks/large_classes.py --million  # also 1,000,000 classes
    python benchmarks/large_classes.py --backend jax --classes 85742 --reps 5 --chunk-rows 32,64
    python benchmarks/large_classes.py --backend tensorflow --jit off   # TF without XLA (its CPU default)
    python benchmarks/large_classes.py --paths dense,rows,classes,sampled  # both chunkings, Partial FC (0.1)
    python benchmarks/large_classes.py --paths dense,sampled,sampled-v1,sampled-v1-dense --optimizer momentum
    python benchmarks/large_classes.py --paths dense,sampled-v1,sampled-v1-class-major --optimizer momentum
    python benchmarks/large_classes.py --quick                          # small sizes: a smoke test
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Sequence

DEFAULT_CHUNK_ROWS = 64  # rows per chunk; on CPU 64 beat 32 (each chunk rewrites the whole kernel gradient)
DEFAULT_CHUNK_CLASSES = 8192  # classes per chunk
SAMPLE_RATE = 0.1
V1_UPDATES = {"sampled-v1": "sparse", "sampled-v1-dense": "dense"}  # PartialFCOptimizer(update=...) of each path
CLASS_MAJOR = "-class-major"  # path suffix: the head's kernel_layout="classes_first"
GIB, MIB = 2.0**30, 2.0**20


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["jax", "tensorflow"], default=os.environ.get("KERAS_BACKEND", "jax"),
                        help="defaults to $KERAS_BACKEND (else jax)")
    parser.add_argument("--classes", default="10516,85742", help="comma-separated class counts")
    parser.add_argument("--million", action="store_true", help="also run 1,000,000 classes")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5, help="timed steps after one warm-up step (median)")
    parser.add_argument("--chunk-rows", default=str(DEFAULT_CHUNK_ROWS),
                        help="comma-separated chunk_size values (rows per chunk) for the 'rows' path")
    parser.add_argument("--chunk-classes", default=str(DEFAULT_CHUNK_CLASSES),
                        help="comma-separated chunk_size values (classes per chunk) for the 'classes' path")
    parser.add_argument("--jit", choices=["on", "off"], default="on",
                        help="TensorFlow only: off runs the step as a plain tf.function (Keras' CPU default)")
    parser.add_argument("--paths", default="dense,rows,classes",
                        help="comma-separated, from dense, rows (chunk_by='rows'), classes (chunk_by='classes'), "
                             "sampled, sampled-v1, sampled-v1-dense")
    parser.add_argument("--optimizer", choices=["plain", "momentum"], default="plain",
                        help="plain: w -= 0.1 g; momentum: keras.optimizers.SGD(0.1, momentum=0.9)")
    parser.add_argument("--headroom", type=float, default=0.85,
                        help="run a configuration only if its estimate is below this share of MemAvailable")
    parser.add_argument("--quick", action="store_true", help="batch 64, dim 64, 20,000 classes, 1 rep")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.dim, args.classes, args.reps = 64, 64, "20000", 1
    if args.million:
        args.classes += ",1000000"
    return args


def path_options(path: str) -> dict:
    """Head options of a path name: "dense", "rows R" (R rows per chunk), "classes N" (N classes per chunk),
    "sampled" (Partial FC); any of them with the "-class-major" suffix."""
    if path.endswith(CLASS_MAJOR):
        return {**path_options(path[:-len(CLASS_MAJOR)]), "kernel_layout": "classes_first"}
    if path == "dense":
        return {}
    if path.startswith(("rows ", "classes ")):
        by, size = path.split()
        return {"chunk_size": int(size), "chunk_by": by}
    if path == "sampled":
        return {"sample_rate": SAMPLE_RATE}
    if path in V1_UPDATES:
        return {"sample_rate": SAMPLE_RATE, "sample_update": "sampled"}
    raise ValueError(f"unknown path {path!r}")


def _optimizer(config: dict, variables):
    """The Keras optimizer of the step, built on ``variables``; None for the plain ``w -= 0.1 g`` update."""
    v1 = config["path"].removesuffix(CLASS_MAJOR) in V1_UPDATES
    if config["optimizer"] == "plain" and not v1:
        return None
    import keras

    import keras_margin as km

    optimizer = keras.optimizers.SGD(0.1, momentum=0.9 if config["optimizer"] == "momentum" else 0.0)
    if v1:
        optimizer = km.PartialFCOptimizer(optimizer, update=V1_UPDATES[config["path"].removesuffix(CLASS_MAJOR)])
    optimizer.build(variables)
    return optimizer


# --------------------------------------------------------------------------------------------------
# Child: one configuration in a fresh interpreter.


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable")


def _reset_peak_rss() -> None:
    """Return freed heap to the OS, then reset VmHWM to the current RSS (Linux >= 4.0)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _head(config: dict):
    import keras_margin as km

    return km.AMSoftmaxHead(config["classes"], s=30.0, m=0.35, fused_loss=True, **path_options(config["path"]))


def _inputs(config: dict):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(config["batch"], config["dim"])).astype("float32")
    y = rng.integers(0, config["classes"], size=config["batch"]).astype("int32")
    return x, y


def _run_jax(config: dict) -> dict:
    import jax
    import jax.numpy as jnp

    head = _head(config)
    x, y = _inputs(config)
    head.build([x.shape, y.shape])
    trainable = [v.value for v in head.trainable_variables]
    non_trainable = [v.value for v in head.non_trainable_variables]
    optimizer = _optimizer(config, head.trainable_variables)
    slots = [] if optimizer is None else [v.value for v in optimizer.variables]
    x, y = jnp.asarray(x), jnp.asarray(y)

    def loss_fn(trainable, x, non_trainable):
        per_sample, non_trainable = head.stateless_call(trainable, non_trainable, [x, y], training=True)
        return jnp.mean(per_sample), non_trainable

    def step(trainable, non_trainable, slots, x):
        (loss, non_trainable), (d_trainable, d_x) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            trainable, x, non_trainable)
        if optimizer is None:
            trainable = [w - 0.1 * g for w, g in zip(trainable, d_trainable)]
        else:
            trainable, slots = optimizer.stateless_apply(slots, d_trainable, trainable)
        return trainable, non_trainable, slots, d_x, loss

    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(trainable, non_trainable, slots, x).compile()
    analysis = compiled.memory_analysis()
    resident = analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
    # Without donation: XLA copies a donated kernel that a while loop reads (one kernel-sized buffer,
    # any loop, also a 10-line fori_loop), so the chunked paths are also shown without it.
    plain = jax.jit(step).lower(trainable, non_trainable, slots, x).compile().memory_analysis()
    result = {"xla_temp": analysis.temp_size_in_bytes, "xla_temp_undonated": plain.temp_size_in_bytes,
              "estimate": resident + analysis.temp_size_in_bytes}
    if result["estimate"] > config["headroom"] * _mem_available():
        return {**result, "skipped": f"estimated {result['estimate'] / GIB:.1f} GiB > {config['headroom']:.0%} "
                                     f"of MemAvailable {_mem_available() / GIB:.1f} GiB"}

    def run_once(state):
        start = time.perf_counter()
        trainable, non_trainable, slots, d_x, loss = compiled(*state, x)
        jax.block_until_ready((trainable, slots, d_x, loss))
        return (trainable, non_trainable, slots), time.perf_counter() - start, float(loss)

    return {**result, **_measure(run_once, (trainable, non_trainable, slots), config)}


def _run_tensorflow(config: dict) -> dict:
    import tensorflow as tf

    # No XLA memory analysis here: estimate the dense path from the JAX figures (weights, gradient and
    # about five (batch, C) float32 buffers) and skip it when it cannot fit.
    if config["path"] == "dense":
        estimate = 4 * config["classes"] * (2 * config["dim"] + 5 * config["batch"])
        if estimate > config["headroom"] * _mem_available():
            return {"estimate": estimate, "skipped": f"estimated {estimate / GIB:.1f} GiB > "
                                                     f"{config['headroom']:.0%} of MemAvailable "
                                                     f"{_mem_available() / GIB:.1f} GiB"}
    head = _head(config)
    x, y = _inputs(config)
    head.build([x.shape, y.shape])
    x, y = tf.constant(x), tf.constant(y)
    variables = [v.value for v in head.trainable_variables]  # the tf.Variables
    optimizer = _optimizer(config, head.trainable_variables)

    @tf.function(jit_compile=config.get("jit", "on") == "on")
    def step(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_mean(head([x, y], training=True))
        *d_variables, d_x = tape.gradient(loss, variables + [x])
        if optimizer is not None:
            optimizer.apply(d_variables, head.trainable_variables)
        else:
            for variable, gradient in zip(variables, d_variables):
                variable.assign_sub(0.1 * tf.convert_to_tensor(gradient))
        return loss, d_x

    step.get_concrete_function(x, y)  # trace; XLA compiles on the first call (the warm-up, before the reset)

    def run_once(state):
        start = time.perf_counter()
        loss, d_x = step(x, y)
        _ = d_x.numpy()
        return state, time.perf_counter() - start, float(loss)

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        tf.config.experimental.reset_memory_stats("GPU:0")
    result = _measure(run_once, None, config)
    if gpus:  # device peak over the resident weights and inputs: the closest to XLA temp TF exposes
        info = tf.config.experimental.get_memory_info("GPU:0")
        result["xla_temp"] = info["peak"] - info["current"]
    return result


def _measure(run_once, state, config: dict) -> dict:
    import gc

    state, first, loss = run_once(state)  # warm-up (TensorFlow: includes XLA compilation)
    gc.collect()
    _reset_peak_rss()
    baseline = _status_bytes("VmRSS")
    times = []
    for _ in range(config["reps"]):
        state, seconds, loss = run_once(state)
        times.append(seconds)
    return {"rss_peak": _status_bytes("VmHWM") - baseline, "step_s": statistics.median(times),
            "first_step_s": first, "loss": loss}


def _child(config: dict) -> None:
    os.environ["KERAS_BACKEND"] = config["backend"]
    import keras

    keras.utils.set_random_seed(0)
    result = _run_jax(config) if config["backend"] == "jax" else _run_tensorflow(config)
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------
# Driver.


def _run_child(config: dict) -> dict:
    env = {**os.environ, "KERAS_BACKEND": config["backend"], "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True,
                          text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"skipped": f"failed (exit {proc.returncode}): {' | '.join(tail)}"}


def _fmt_bytes(value) -> str:
    return "n/a" if value is None else f"{value / MIB:,.0f} MiB"


def _ratio(value, dense) -> str:
    if value is None or not dense:
        return "-"
    return f"{value / dense:.3f}"


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return []
    paths = []
    for name in (p.strip() for p in args.paths.split(",")):
        if name == "rows":
            paths += [f"rows {int(rows)}" for rows in args.chunk_rows.split(",")]
        elif name.removesuffix(CLASS_MAJOR) == "classes":
            paths += [f"classes {int(size)}{name[len('classes'):]}" for size in args.chunk_classes.split(",")]
        elif name.removesuffix(CLASS_MAJOR) in ("dense", "sampled", *V1_UPDATES):
            paths.append(name)
        else:
            raise SystemExit(f"unknown --paths {name!r}; choose from dense, rows, classes, sampled, "
                             f"{', '.join(V1_UPDATES)} (each but rows also with {CLASS_MAJOR!r})")
    jit = "XLA" if args.backend == "jax" or args.jit == "on" else "no XLA"
    print(f"backend {args.backend} ({jit}), batch {args.batch}, embedding {args.dim}, AM-Softmax (s=30, m=0.35), "
          f"update {args.optimizer}, {os.cpu_count()} CPUs, MemAvailable {_mem_available() / GIB:.1f} GiB; "
          f"median of {args.reps} steps")
    results = []
    for classes in [int(c) for c in args.classes.split(",")]:
        gradient = args.dim * classes * 4
        print(f"\n{classes:,} classes: weights {gradient / GIB:.2f} GiB, kernel gradient {gradient / GIB:.2f} GiB "
              f"(subtracted in the 'extra' columns)")
        header = (f"{'path':<26} {'step s':>8} {'x dense':>8} {'XLA temp':>11} {'extra':>11} {'x dense':>8} "
                  f"{'RSS peak':>11} {'extra':>11} {'x dense':>8} {'extra undon':>11} {'x dense':>8}")
        print(header)
        dense = {}
        for path in paths:
            config = {"backend": args.backend, "classes": classes, "batch": args.batch, "dim": args.dim,
                      "reps": args.reps, "path": path, "headroom": args.headroom, "jit": args.jit,
                      "optimizer": args.optimizer}
            result = {**config, **_run_child(config)}
            for key in ("xla_temp", "xla_temp_undonated", "rss_peak"):
                if result.get(key) is not None:
                    result[key + "_extra"] = max(result[key] - gradient, 0)
            if path == "dense":
                dense = result
            results.append(result)
            if "skipped" in result and "step_s" not in result:
                print(f"{path:<26} not run: {result['skipped']} (XLA temp {_fmt_bytes(result.get('xla_temp'))})")
                continue
            print(f"{path:<26} {result['step_s']:8.3f} {_ratio(result['step_s'], dense.get('step_s')):>8} "
                  f"{_fmt_bytes(result.get('xla_temp')):>11} {_fmt_bytes(result.get('xla_temp_extra')):>11} "
                  f"{_ratio(result.get('xla_temp_extra'), dense.get('xla_temp_extra')):>8} "
                  f"{_fmt_bytes(result['rss_peak']):>11} {_fmt_bytes(result['rss_peak_extra']):>11} "
                  f"{_ratio(result['rss_peak_extra'], dense.get('rss_peak_extra')):>8} "
                  f"{_fmt_bytes(result.get('xla_temp_undonated_extra')):>11} "
                  f"{_ratio(result.get('xla_temp_undonated_extra'), dense.get('xla_temp_undonated_extra')):>8}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
