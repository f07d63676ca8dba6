"""Forward+backward time and peak memory of each margin head + loss, as a ratio to the bare matmul floor.

The floor is the three matrix products a linear classifier cannot avoid: forward ``Z = X @ W``
(B, d) x (d, C), backward ``dX = dZ @ W^T`` and ``dW = X^T @ dZ``, timed in the same run, on the same
backend, with the same jit setting. The head side is the package's own code, written in ``keras.ops``:
``head.stateless_call`` (cosines) followed by ``head.loss`` (margin + float32 cross-entropy), and its
gradient w.r.t. the embeddings and the kernel; for the heads whose ``loss`` raises (CurricularFace, AdaCos,
AdaFace, MagFace, L-Softmax: see ``HEADS``), the training call on ``[x, labels]`` and a cross-entropy of its logits.
Only this timing harness is backend-specific:
TensorFlow ``tf.function(jit_compile=True/False)`` + ``GradientTape``; JAX ``jax.value_and_grad``
under ``jax.jit`` or op by op.

Each configuration (objective, batch, classes, jit) runs in a fresh child process, forked from a driver
that has imported Keras but never run an op (``--isolation spawn`` starts a new interpreter instead).
In a head's child the floor is compiled too, and floor and head calls alternate: the ratio is the median
over those (floor, head) pairs, so both sides of each ratio see the same machine load.
Memory is measured (not estimated): the child's peak RSS growth (/proc/self/status VmHWM) during one
step over its RSS after the warm-up calls (inputs, compiled code and runtime resident): what the step
allocates (outputs, gradients, temporaries), compilation excluded (the peak is reset through
/proc/self/clear_refs after malloc_trim). Under jax.jit the table adds XLA's compiled memory analysis
(temporaries + outputs) and its cost analysis (bytes accessed, relative to the floor's): both
deterministic, unlike times on a shared machine.

Usage:
    python benchmarks/heads.py                      # full run, backend from KERAS_BACKEND (default tensorflow)
    python benchmarks/heads.py --backend jax
    python benchmarks/heads.py --quick              # one small size, 2 repetitions: a smoke test
    python benchmarks/heads.py --batch 512 --classes 85742 --jit on --reps 5 --heads amsoftmax,arcface
    python benchmarks/heads.py --breakdown          # where the time goes inside the head (see --help)
    python benchmarks/heads.py --form fused          # the fused_loss=True training path of every head
    python benchmarks/heads.py --kernel-layout classes_first   # the heads with a class-major (C, d) kernel

With ``--kernel-layout classes_first`` the heads hold their kernel as (C, d) (``kernel_layout="classes_first"``);
the floor stays the three products of the (d, C) kernel above, so the ratios compare with the default layout's.
The floor's ``dW = X^T @ dZ`` is compiled as written, the transpose folded into the product; on TensorFlow the
default-layout heads form that product from a written-out ``X^T`` (``core.batch_product``), 25-40 % faster on
the CPU, so they can beat this part of the floor (as the class-major products do: 0.94x the floor's).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Sequence

import numpy as np

FLOOR = "matmul floor"
CLASSES_LAST_ONLY = ("subcenter_arcface", "lsoftmax")  # heads without kernel_layout="classes_first"
# Face-recognition defaults of each head (what a real training run uses): the benchmark times those.
HEADS = {
    "normface": ("NormFaceHead", {}),
    "sphereface": ("SphereFaceHead", {}),
    "amsoftmax": ("AMSoftmaxHead", {}),
    "x2softmax": ("X2SoftmaxHead", {}),
    "arcface": ("ArcFaceHead", {}),
    "subcenter_arcface": ("SubCenterArcFaceHead", {}),
    "curricularface": ("CurricularFaceHead", {}),
    "adacos": ("AdaCosHead", {}),
    "adaface": ("AdaFaceHead", {}),
    "magface": ("MagFaceHead", {}),
    "lsoftmax": ("LSoftmaxHead", {}),
}
# How each head's step is timed: "cosine" is stateless_call (cosines) + head.loss; "logits" (the heads whose
# `loss` raises: their objective needs the labels or |x| in the forward pass) is the training call
# stateless_call([x, labels], training=True) + Keras' sparse cross-entropy of its logits + the losses the call
# adds (MagFace's lambda_g * mean(g)). The variables the call updates (t, s, the norm statistics, L-Softmax's
# counter) are returned by stateless_call and dropped: every timed call starts from the same state.
# Stages of the head path timed by --breakdown, each a prefix of the full computation.
STAGES = {
    "cos": "cosine_matrix only (loss = sum(cos)): x normalization, (d, C) column norms, matmul",
    "cos+ce": "cosines, then plain float32 cross-entropy s*cos (gather of the target logit, logsumexp)",
    "cos+loss": "cosines, then the package's normface_loss (core.margin_cross_entropy)",
    "head": "the full AMSoftmaxHead + AMSoftmaxLoss (stateless_call + head.loss), as in the main table",
}
HEADLESS_STAGES = tuple(stage for stage in STAGES if stage != "head")  # timed on core functions, no head


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Forward+backward time of each margin head + loss relative to the bare matmul floor.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Breakdown stages (--breakdown):\n" + "\n".join(f"  {k:<9} {v}" for k, v in STAGES.items()),
    )
    parser.add_argument("--backend", choices=["tensorflow", "jax"],
                        default=os.environ.get("KERAS_BACKEND", "tensorflow"),
                        help="Keras backend (default: $KERAS_BACKEND or tensorflow)")
    parser.add_argument("--batch", default="256,512", help="comma-separated batch sizes (default 256,512)")
    parser.add_argument("--classes", default="10516,85742",
                        help="comma-separated class counts (default 10516,85742: CASIA-WebFace minus LFW overlap, "
                             "MS1M-ArcFace)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512)")
    parser.add_argument("--heads", default=",".join(HEADS), help=f"comma-separated subset of {','.join(HEADS)}")
    parser.add_argument("--jit", choices=["both", "on", "off"], default="both",
                        help="with XLA (tf.function(jit_compile=True) / jax.jit), without, or both (default)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed (floor, head) call pairs per configuration (default: 5 when C <= 20k, 2 above, "
                             "to keep a full run near 10 min on 2 cores); medians are reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing, the first compiles")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: batch 256, classes 10516, 2 repetitions (overrides --batch/--classes/--reps)")
    parser.add_argument("--breakdown", action="store_true",
                        help="time the stages of the head path (see below) instead of the five heads")
    parser.add_argument("--isolation", choices=["fork", "spawn"], default="fork",
                        help="fresh child per configuration: fork the driver (fast) or start a new interpreter")
    parser.add_argument("--json", default=None, help="also write all measurements to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--form", choices=["default", "fused"], default="default",
                        help="default: each head's form below (cosines + head.loss, or its logits); fused: "
                             "fused_loss=True, the head's own float32 loss, stateless_call([x, labels], "
                             "training=True), as a training model for many classes runs it")
    parser.add_argument("--kernel-layout", choices=["classes_last", "classes_first"], default="classes_last",
                        help="the heads' kernel_layout (default classes_last: (d, C); the floor is always (d, C))")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one configuration as JSON
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.classes, args.reps = "256", "10516", 2
    args.batch = _int_list(parser, "--batch", args.batch)
    args.classes = _int_list(parser, "--classes", args.classes)
    args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = [h for h in args.heads if h not in HEADS]
    if unknown:
        parser.error(f"--heads: unknown {unknown}; choose from {list(HEADS)}")
    if args.kernel_layout == "classes_first":  # these two keep the (d, C) kernel (their constructors refuse)
        args.heads = [h for h in args.heads if h not in CLASSES_LAST_ONLY]
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be >= 1")
    return args


def _int_list(parser, flag, text):
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        parser.error(f"{flag}: expected comma-separated integers; got {text!r}")
    if not values or min(values) < 1:
        parser.error(f"{flag}: expected positive integers; got {text!r}")
    return values


# --------------------------------------------------------------------------------------------------
# Memory helpers (Linux /proc)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Give freed heap back to the OS, then reset VmHWM to the current RSS (Linux >= 4.0)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# One configuration (runs in the child)


def _loss_fn(config):
    """``(x, kernel, labels) -> scalar loss``, written with keras.ops / the package only (and Keras' own sparse
    cross-entropy for the heads timed on their logits)."""
    import keras
    from keras import ops

    from keras_margin import core, losses

    objective, batch, dim = config["objective"], config["batch"], config["dim"]
    num_classes = config["classes"]
    if config.get("stage") in HEADLESS_STAGES:
        stage = config["stage"]
        classes_first = config.get("kernel_layout") == "classes_first"

        def stage_loss(x, kernel, labels):
            cos = core.cosine_matrix(x, kernel, classes_first=classes_first)
            if stage == "cos":
                return ops.sum(cos)
            if stage == "cos+ce":
                logits = 30.0 * cos
                target = ops.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
                return ops.mean(ops.logsumexp(logits, axis=-1) - target)
            return ops.mean(losses.normface_loss(labels, cos, s=30.0))

        return stage_loss

    head = make_head(objective, num_classes, batch, dim, fused_loss=config.get("form") == "fused",
                     kernel_layout=config.get("kernel_layout", "classes_last"))
    non_trainable = [v.value for v in head.non_trainable_variables]
    if config.get("form") == "fused":

        def head_fused_loss(x, kernel, labels):
            _, _, added = head.stateless_call([kernel], non_trainable, [x, labels], training=True,
                                              return_losses=True)
            return sum(added, 0.0)  # what Keras trains with: the per-sample loss's mean (+ MagFace's term)

        return head_fused_loss
    if head_form(head) == "cosine":
        loss_object = head.loss

        def head_loss(x, kernel, labels):
            cos, _ = head.stateless_call([kernel], non_trainable, x)
            return loss_object(labels, cos)

        return head_loss

    def head_logits_loss(x, kernel, labels):
        logits, _, added = head.stateless_call([kernel], non_trainable, [x, labels], training=True,
                                               return_losses=True)
        # What a model compiled with SparseCategoricalCrossentropy(from_logits=True) computes.
        per_sample = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        return ops.mean(per_sample) + sum(added, 0.0)

    return head_logits_loss


def make_head(objective: str, num_classes: int, batch: int, dim: int, fused_loss: bool = False,
              kernel_layout: str = "classes_last"):
    """The built head of ``objective`` at its defaults (``HEADS``), with ``fused_loss`` for ``--form fused``."""
    import keras_margin as km

    class_name, kwargs = HEADS[objective]
    options = {**kwargs, **({"fused_loss": True} if fused_loss else {})}
    if kernel_layout != "classes_last":
        options["kernel_layout"] = kernel_layout
    head = getattr(km, class_name)(num_classes, **options)
    head.build((batch, dim))
    return head


def head_form(head) -> str:
    """"cosine" when ``head.loss`` exists, "logits" when it raises (see ``HEADS``)."""
    try:
        head.loss
    except ValueError:
        return "logits"
    return "cosine"


def _make_arrays(config) -> dict:
    """The step's inputs as NumPy arrays: embeddings, kernel, class ids and (for the floor) dZ."""
    batch, dim, num_classes = config["batch"], config["dim"], config["classes"]
    rng = np.random.default_rng(config["seed"])
    return {
        "x": rng.standard_normal((batch, dim), dtype=np.float32),
        "kernel": rng.standard_normal((dim, num_classes), dtype=np.float32) / np.float32(np.sqrt(dim)),
        "labels": rng.integers(0, num_classes, size=(batch,), dtype=np.int32),
        "dz": rng.standard_normal((batch, num_classes), dtype=np.float32),  # upstream gradient for the floor
    }


def _build_step(config, objective: str, arrays: dict, device_arrays: dict):
    """(step function, its inputs, sync function, XLA memory analysis function or None)."""
    backend, jit = config["backend"], config["jit"]
    is_floor = objective == FLOOR
    names = ("x", "kernel", "dz") if is_floor else ("x", "kernel", "labels")
    if not is_floor:
        loss_fn = _loss_fn(config)
        if config.get("stage") in HEADLESS_STAGES:  # no head: the kernel shape of the layout asked for
            shape = arrays["kernel"].shape[::-1 if config.get("kernel_layout") == "classes_first" else 1]
        else:
            shape = tuple(make_head(objective, config["classes"], config["batch"], config["dim"],
                                    kernel_layout=config.get("kernel_layout", "classes_last")).kernel.shape)
        if shape == arrays["kernel"].shape[::-1]:  # class-major (C, d): the floor's kernel transposed
            arrays["head_kernel"] = np.ascontiguousarray(arrays["kernel"].T)
            names = ("x", "head_kernel", "labels")
        elif shape != arrays["kernel"].shape:  # Sub-center ArcFace: (d, k * C); the floor keeps (d, C)
            rng = np.random.default_rng(config["seed"] + 1)
            arrays["head_kernel"] = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[0]))
            names = ("x", "head_kernel", "labels")

    if backend == "tensorflow":
        import tensorflow as tf

        for name in names:
            if name not in device_arrays:
                device_arrays[name] = tf.constant(arrays[name])
        inputs = [device_arrays[name] for name in names]
        if is_floor:
            def step(x, w, dz):
                return (tf.matmul(x, w), tf.matmul(dz, w, transpose_b=True), tf.matmul(x, dz, transpose_a=True))
        else:
            def step(x, w, labels):
                with tf.GradientTape() as tape:
                    tape.watch([x, w])
                    loss = loss_fn(x, w, labels)
                dx, dw = tape.gradient(loss, [x, w])
                return loss, dx, dw
        fn = tf.function(step, jit_compile=jit)
        # TensorFlow's CPU executor is synchronous: the call returns once the step has run.
        return fn, inputs, lambda outs: outs, None

    import jax
    from jax import lax

    for name in names:
        if name not in device_arrays:
            device_arrays[name] = jax.device_put(arrays[name])
    inputs = [device_arrays[name] for name in names]
    if is_floor:
        forward = (((1,), (0,)), ((), ()))    # X (B, d) . W (d, C) over d -> (B, C)
        contract_c = (((1,), (1,)), ((), ()))  # dZ (B, C) . W (d, C) over C -> (B, d)
        contract_b = (((0,), (0,)), ((), ()))  # X (B, d) . dZ (B, C) over B -> (d, C)

        def step(x, w, dz):
            return (lax.dot_general(x, w, forward), lax.dot_general(dz, w, contract_c),
                    lax.dot_general(x, dz, contract_b))
    else:
        step = jax.value_and_grad(loss_fn, argnums=(0, 1))
    fn = jax.jit(step) if jit else step

    def memory_analysis():
        compiled = fn.lower(*inputs).compile()
        analysis, cost = compiled.memory_analysis(), compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list in older jax versions
        return {
            "xla_temp_plus_output_mib": None if analysis is None
            else (analysis.temp_size_in_bytes + analysis.output_size_in_bytes) / 2**20,
            "xla_bytes_accessed": (cost or {}).get("bytes accessed"),
        }

    return fn, inputs, jax.block_until_ready, memory_analysis if jit else None


def _timed_call(step, cpu_times: list | None = None) -> float:
    """Wall time of one call; appends the process CPU time (all threads) of the call to ``cpu_times``."""
    fn, inputs, sync, _ = step
    cpu_start, start = time.process_time(), time.perf_counter()
    outs = sync(fn(*inputs))
    elapsed = time.perf_counter() - start
    if cpu_times is not None:
        cpu_times.append(time.process_time() - cpu_start)
    del outs  # free the outputs before the next call, so they don't count in its peak
    return elapsed


def run_config(config) -> dict:
    """Time one configuration and measure its memory; called in a fresh child process.

    Memory phase: warm-up (compiles), reset the RSS peak, one timed call; its peak RSS growth is the step's.
    Timing phase (heads only): the floor is compiled in the same process, then floor and head calls
    alternate, so both see the same machine load; the ratio is median(head) / median(floor).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rss_start = _status_kib("VmRSS")
    arrays, device_arrays = _make_arrays(config), {}
    measured = _build_step(config, config["objective"], arrays, device_arrays)
    floor = None if config["objective"] == FLOOR else _build_step(config, FLOOR, arrays, device_arrays)
    rss_inputs = _status_kib("VmRSS")

    first_call_s = _timed_call(measured)
    for _ in range(config["warmup"] - 1):
        _timed_call(measured)
    compile_peak_kib = _status_kib("VmHWM") - rss_inputs
    peak_was_reset = _reset_peak_rss()
    rss_idle = _status_kib("VmRSS")  # inputs + what compilation and the runtime keep (code, thread pools)
    memory_call_s = _timed_call(measured)  # not in the statistics: it re-faults the pages the trim gave back
    peak_kib = _status_kib("VmHWM") - (rss_idle if peak_was_reset else rss_inputs)

    times, floor_times, cpu, floor_cpu = [], [], [], []
    if floor is not None:
        for _ in range(config["warmup"]):
            _timed_call(floor)
    for _ in range(config["reps"]):
        if floor is not None:
            floor_times.append(_timed_call(floor, floor_cpu))
        times.append(_timed_call(measured, cpu))
    pair_ratios = [t / f for t, f in zip(times, floor_times)]

    result = {
        **config,
        "median_s": statistics.median(times),
        "times_s": times,
        "min_s": min(times),
        "floor_median_s": statistics.median(floor_times) if floor_times else None,
        "floor_times_s": floor_times,
        # Each head call right after a floor call: their ratio sees the same machine load.
        "ratio": statistics.median(pair_ratios) if pair_ratios else 1.0,
        "ratio_of_mins": min(times) / min(floor_times) if floor_times else 1.0,
        "cpu_s": cpu,
        "floor_cpu_s": floor_cpu,
        "cpu_ratio": statistics.median(cpu) / statistics.median(floor_cpu) if floor_cpu else 1.0,
        "first_call_s": first_call_s,
        "memory_call_s": memory_call_s,
        "peak_rss_growth_mib": peak_kib / 1024,
        "peak_includes_compile": not peak_was_reset,
        "peak_with_compile_mib": compile_peak_kib / 1024,
        "retained_after_warmup_mib": (rss_idle - rss_inputs) / 1024,
        "inputs_rss_mib": (rss_inputs - rss_start) / 1024,
        "xla_temp_plus_output_mib": None,
    }
    if measured[3] is not None:
        try:
            result.update(measured[3]())
            if floor is not None:
                result["floor_xla_bytes_accessed"] = floor[3]()["xla_bytes_accessed"]
        except Exception as error:  # not every jax version exposes them on CPU
            result["xla_analysis_error"] = repr(error)
    return result


# --------------------------------------------------------------------------------------------------
# Driver


def _run_isolated(config, isolation: str) -> dict:
    if isolation == "spawn":
        env = {**os.environ, "KERAS_BACKEND": config["backend"], "TF_CPP_MIN_LOG_LEVEL": "2"}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(config)],
                              capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            return {**config, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        return json.loads(lines[-1])

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: run, report through the pipe, exit without running the driver's cleanup
        os.close(read_fd)
        code = 0
        try:
            payload = json.dumps(run_config(config))
        except BaseException as error:  # report, don't hang the driver
            payload, code = json.dumps({**config, "error": f"{type(error).__name__}: {error}"}), 1
        with os.fdopen(write_fd, "w") as pipe:
            pipe.write(payload)
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    if not payload:
        return {**config, "error": f"child exited with status {status} and no result (out of memory?)"}
    return json.loads(payload)


def _configs(args) -> list[dict]:
    jits = {"both": [True, False], "on": [True], "off": [False]}[args.jit]
    objectives = [(FLOOR, None)]
    if args.breakdown:
        objectives += [("amsoftmax" if stage == "head" else stage, stage) for stage in STAGES]
    else:
        objectives += [(h, None) for h in args.heads]
    configs = []
    for jit in jits:
        for batch in args.batch:
            for num_classes in args.classes:
                reps = args.reps if args.reps is not None else (5 if num_classes <= 20000 else 2)
                for objective, stage in objectives:
                    configs.append({"backend": args.backend, "jit": jit, "batch": batch, "classes": num_classes,
                                    "dim": args.dim, "objective": objective, "stage": stage, "reps": reps,
                                    "warmup": args.warmup, "seed": args.seed, "form": args.form,
                                    "kernel_layout": args.kernel_layout})
    return configs


def _label(r) -> str:
    if r.get("stage") and r["stage"] != "head":
        return r["stage"]
    if r.get("stage") == "head":
        return "head (amsoftmax)"
    return r["objective"]


def print_tables(results: list[dict], args, wall_s: float, load: tuple[float, float]) -> None:
    backend = args.backend
    print(f"\n### Heads vs. matmul floor: {backend} backend ({_versions(backend)}), {os.cpu_count()} CPU cores")
    reps = "/".join(str(r) for r in sorted({r["reps"] for r in results}))
    print(f"d={args.dim}, float32, one training step: forward + backward w.r.t. embeddings and kernel. Median of "
          f"{reps} timed calls per configuration, after {args.warmup} compiling warm-up call(s) and the call that "
          "measures memory" + (" (default repetitions, reduced to fit ~10 min per backend on 2 cores)"
                               if args.reps is None else "")
          + ". Heads at their face defaults: normface s=30; sphereface m=4, "
          "lambda=5, s=30 (cosine path); amsoftmax s=30 m=0.35; x2softmax s=64 a=-0.9 h=0 k=0.65; arcface s=64 m=0.5; "
          "subcenter_arcface k=3 s=64 m=0.5 (kernel (d, 3C): its floor is the (d, C) one, so the ratio includes the "
          "3x larger matmuls); curricularface s=64 m=0.5; adacos adaptive s; adaface s=64 m=0.4 h=0.333; magface "
          "s=64 l_a=10 u_a=110 l_m=0.45 u_m=0.8 lambda_g=35; lsoftmax m=4 (un-normalized, annealed lambda). "
          + ("Timed form (--form fused): each head with fused_loss=True, the training call "
             "stateless_call([x, labels], training=True) and the losses it adds (the per-sample loss's mean, "
             "magface's regularizer)." if args.form == "fused" else
             "Timed form: stateless_call (cosines) + head.loss, except curricularface, adacos, adaface, magface and "
             "lsoftmax, whose loss needs the labels or |x| in the forward pass: the training call "
             "stateless_call([x, labels], training=True) + Keras' sparse cross-entropy (from_logits) + its added "
             "losses (magface's regularizer)."))
    print("floor ms: X@W (B,d)x(d,C), dZ@W^T, X^T@dZ, timed in the same child process as the head, its calls "
          "alternating with the head's; ratio = median over the (floor, head) call pairs of head time / floor "
          "time (target under XLA: <= 1.3x).")
    print("peak MiB: peak RSS growth during one step, in a fresh child process (/proc/self/status VmHWM, reset "
          "after the compiling warm-up call, over the RSS with inputs and compiled code resident)"
          + ("; XLA MiB: jax.jit's compiled memory analysis, temporaries + outputs; XLA bytes vs floor: bytes "
             "accessed by the compiled step (XLA cost analysis) over the floor's." if backend == "jax" else "."))
    print(f"Load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f}: other processes share the cores "
          "when it exceeds the core count; the alternating floor keeps the ratio meaningful.")
    show_xla = backend == "jax" and any(r.get("xla_temp_plus_output_mib") for r in results)
    header = ("| jit | B | C | objective | ms | floor ms | ratio | peak MiB |"
              + (" XLA MiB | XLA bytes vs floor |" if show_xla else ""))
    print()
    print(header)
    print("|" + "|".join("---" for _ in header.split("|")[1:-1]) + "|")
    for r in results:
        jit = "XLA" if r["jit"] else "no"
        if "error" in r:
            print(f"| {jit} | {r['batch']} | {r['classes']} | {_label(r)} | error: {r['error']} | | | |"
                  + (" | |" if show_xla else ""))
            continue
        floor_s = r["median_s"] if r["objective"] == FLOOR else r["floor_median_s"]
        cells = [jit, str(r["batch"]), str(r["classes"]), _label(r), f"{r['median_s'] * 1e3:.1f}",
                 f"{floor_s * 1e3:.1f}", f"{r['ratio']:.2f}x",
                 f"{r['peak_rss_growth_mib']:.0f}" + ("*" if r["peak_includes_compile"] else "")]
        if show_xla:
            xla, accessed = r.get("xla_temp_plus_output_mib"), r.get("xla_bytes_accessed")
            floor_accessed = accessed if r["objective"] == FLOOR else r.get("floor_xla_bytes_accessed")
            cells.append("" if xla is None else f"{xla:.0f}")
            cells.append(f"{accessed / floor_accessed:.2f}x" if accessed and floor_accessed else "")
        print("| " + " | ".join(cells) + " |")
    if any(r.get("peak_includes_compile") for r in results):
        print("\n* /proc/self/clear_refs was not writable: this peak includes compilation.")
    print(f"\nWall time of this run: {wall_s / 60:.1f} min ({len(results)} configurations, one child process each).")


def _versions(backend: str) -> str:
    from importlib import metadata

    names = ["keras", "tensorflow"] if backend == "tensorflow" else ["keras", "jax", "jaxlib"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker is not None:  # --isolation spawn: this interpreter is the child
        print(json.dumps(run_config(json.loads(args.worker))))
        return []
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.isolation == "fork":
        # Import (but never run) the backend in the driver, so each forked child starts from this state.
        if "keras" in sys.modules and sys.modules["keras"].backend.backend() != args.backend:
            raise SystemExit(f"--backend {args.backend}: Keras is already loaded with another backend in this "
                             "process; use --isolation spawn or set KERAS_BACKEND.")
        import keras  # noqa: F401

        import keras_margin  # noqa: F401
        if args.backend == "tensorflow":
            import tensorflow  # noqa: F401
        else:
            import jax  # noqa: F401
    configs = _configs(args)
    print(f"{len(configs)} configurations on {args.backend} "
          f"({'stage breakdown' if args.breakdown else 'floor + ' + ','.join(args.heads)}), one child process each.",
          flush=True)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    results = []
    for config in configs:
        result = _run_isolated(config, args.isolation)
        results.append(result)
        if "error" in result:
            print(f"  {config['objective']:<13} B={config['batch']} C={config['classes']} jit={config['jit']}: "
                  f"ERROR {result['error']}", flush=True)
        else:
            floor = result["floor_median_s"]
            print(f"  {_label(result):<16} B={config['batch']:<4} C={config['classes']:<6} "
                  f"{'XLA' if config['jit'] else 'no-jit':<6}: {result['median_s'] * 1e3:8.1f} ms"
                  + (f" (floor {floor * 1e3:.1f} ms: {result['ratio']:.2f}x)" if floor else "")
                  + f", first call {result['first_call_s']:.1f} s, peak +{result['peak_rss_growth_mib']:.0f} MiB",
                  flush=True)
    print_tables(results, args, time.perf_counter() - start, (load_start, os.getloadavg()[0]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
