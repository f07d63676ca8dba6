"""``keras-margin train``: a backbone + margin head trained on a Caffe ``ImageData`` list file or a class-per-folder
tree, with a paper's recipe (``keras_margin.recipes``), resumable, on one or several devices. Keras, TensorFlow and
JAX are imported inside ``run``, so ``keras-margin train --help`` stays fast.

Before the first step every list line, label and image header is checked (``keras_margin.data``) and the output
folder is tried; a problem is one line on stderr naming the file and line, exit 2, nothing written. The training
model is ``images -> InputContract -> backbone -> head``: the cosine form (``head(x)``, compiled with
``loss=head.loss``) where the head has a cosine-path loss, the logits form (``head([x, labels])`` with
``SparseCategoricalCrossentropy(from_logits=True)``) for heads whose objective reads batch statistics, and the
fused form (``head([x, labels])`` adding its own loss, ``loss=None``) with ``--fused-loss``. The saved ``.keras``
file is that whole model; ``keras_margin.export.embedding_model(model)`` gives the embedding network.

Resuming: after every epoch the weights, the optimizer state and the epoch reached are written to the checkpoint
folder (``keras.callbacks.BackupAndRestore``, kept at the end); rerunning the command continues from there with the
same data order (a function of the seed and the epoch, ``image_dataset``'s ``start_epoch``), so a stopped and
restarted run gives the weights of an uninterrupted one. A larger ``--epochs`` extends a finished run (the
multistep schedules count iterations, as Caffe's solver does; the poly schedule depends on the run's length, so an
insightface run is only resumed with the same length).

Exit codes: 0 trained and saved, 2 bad input or a failed run (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

from keras_margin_cli import fail, image_size

__all__ = ["BACKBONES", "HEADS", "HELP", "add_arguments", "run"]

HELP = "train a backbone + margin head on a Caffe list file or a class-per-folder tree (resumable)"

PROG = "keras-margin train"

#: ``--backbone`` name -> (builder in ``keras_margin.models``, its fixed arguments, default input (H, W)).
BACKBONES: dict[str, tuple[str, dict, tuple[int, int]]] = {
    **{f"face_resnet{depth}": ("face_resnet", {"depth": depth}, (112, 96)) for depth in (4, 10, 20, 36, 64)},
    **{f"iresnet{depth}": ("iresnet", {"depth": depth}, (112, 112)) for depth in (18, 34, 50, 100)},
    "mobilefacenet": ("mobilefacenet", {}, (112, 112)),
}

#: ``--head`` name -> head class name in ``keras_margin.layers`` (a class this keras_margin lacks is refused).
HEADS: dict[str, str] = {
    "amsoftmax": "AMSoftmaxHead",
    "cosface": "AMSoftmaxHead",
    "arcface": "ArcFaceHead",
    "sphereface": "SphereFaceHead",
    "normface": "NormFaceHead",
    "x2softmax": "X2SoftmaxHead",
    "combined": "CombinedMarginHead",
    "subcenter_arcface": "SubCenterArcFaceHead",
    "curricularface": "CurricularFaceHead",
    "adacos": "AdaCosHead",
    "adaface": "AdaFaceHead",
}

#: The preset used when ``--preset`` is not given: the head's paper's recipe.
_DEFAULT_PRESET = {"sphereface": "sphereface", "amsoftmax": "amsoftmax", "cosface": "amsoftmax",
                   "normface": "amsoftmax", "x2softmax": "amsoftmax"}
_PRESETS = ("amsoftmax", "insightface", "sphereface")

#: What the pipeline feeds (``image_dataset``'s Caffe transform defaults), recorded in the model.
_MEAN, _SCALE = 127.5, 1 / 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` subcommand's arguments to ``parser``.

    Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser)
    >>> args = parser.parse_args(["--list", "train.txt", "--backbone", "face_resnet20", "--head", "arcface",
    ...                           "--epochs", "3", "-o", "m.keras"])
    >>> args.list, args.head, args.epochs, args.steps, args.jit, args.devices
    ('train.txt', 'arcface', 3, None, None, 1)
    """
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--list", metavar="LIST.txt", help="Caffe ImageData list file: 'relative/path.jpg label' lines")
    data.add_argument("--folder", metavar="DIR", help="class-per-folder tree DIR/<class>/<image> (sorted names get "
                                                      "labels 0..C-1)")
    parser.add_argument("--images", metavar="DIR", default=None,
                        help="the folder the list's paths are relative to (default: the list file's folder)")
    parser.add_argument("--backbone", default="face_resnet20", help=f"one of {', '.join(BACKBONES)} "
                                                                    "(default face_resnet20)")
    parser.add_argument("--head", default="amsoftmax", help=f"one of {', '.join(HEADS)} (cosface is amsoftmax; "
                                                            "default amsoftmax)")
    parser.add_argument("--classes", type=int, default=None,
                        help="number of classes C (default: max label + 1); labels must lie in [0, C)")
    parser.add_argument("--preset", default=None,
                        help=f"training recipe, one of {', '.join(_PRESETS)} (default: the head's paper's: "
                             "sphereface for sphereface, amsoftmax for amsoftmax/cosface/normface/x2softmax, "
                             "insightface otherwise)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="passes over the data (default: the preset's)")
    length.add_argument("--steps", type=int, default=None,
                        help="optimizer updates (Caffe iterations; default: the preset's max_iter)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per update, over all devices (default: the preset's batch size)")
    parser.add_argument("--iter-size", type=int, default=1,
                        help="micro-batches of batch-size / iter-size images per update (Caffe's iter_size; "
                             "default 1)")
    parser.add_argument("--lr", type=float, default=None, help="base learning rate (default: the preset's)")
    parser.add_argument("--input-size", type=image_size, metavar="H,W", default=None,
                        help="images are resized to H,W (default: the backbone's, 112,96 or 112,112)")
    parser.add_argument("--embedding-dim", type=int, default=None,
                        help="embedding width (default: the backbone's, 512; 128 for mobilefacenet)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and data order (default 0)")
    parser.add_argument("--val-pairs", metavar="PAIRS.txt", default=None,
                        help="LFW-style pairs file: verification accuracy after every --val-every epochs")
    parser.add_argument("--val-images", metavar="DIR", default=None,
                        help="images of --val-pairs: DIR/<name>/<name>_<0001>.<ext>")
    parser.add_argument("--val-ext", default="jpg", help="file extension of --val-images (default jpg)")
    parser.add_argument("--val-every", type=int, default=1, help="epochs between verifications (default 1)")
    parser.add_argument("--fused-loss", action="store_true",
                        help="the head computes its own loss (for very many classes; compiled with loss=None)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="with --fused-loss: exact loss over chunks of N classes, or rows with --chunk-by rows "
                             "(needs XLA for the memory bound)")
    parser.add_argument("--chunk-by", choices=("classes", "rows"), default="classes",
                        help="what --chunk-size counts: classes (least memory) or rows of the batch (three matrix "
                             "products, as the dense path, but more memory; default classes)")
    parser.add_argument("--sample-rate", type=float, default=None,
                        help="with --fused-loss: Partial FC, keep this fraction of the classes per step (0, 1]")
    parser.add_argument("--sample-update", choices=("all", "sampled"), default=None,
                        help="with --sample-rate: what SGD does to the classes a step did not sample: all "
                             "(InsightFace's PartialFC_V2: momentum and decay still move them; default) or "
                             "sampled (its first PartialFC: they keep weight and momentum)")
    parser.add_argument("--kernel-layout", choices=("classes_last", "classes_first"), default=None,
                        help="the head's kernel: classes_last (embedding_dim, classes; default) or classes_first "
                             "(classes, embedding_dim: one row per class, the faster layout for --sample-rate)")
    parser.add_argument("--jit", action=argparse.BooleanOptionalAction, default=None,
                        help="XLA-compile the training step (default: Keras' choice)")
    parser.add_argument("--mixed-precision", action="store_true", help="mixed_float16 policy (float32 head)")
    parser.add_argument("--devices", type=int, default=1,
                        help="N > 1: data parallel over N devices (JAX: a DeviceMesh with the head's classes "
                             "sharded; TensorFlow: MirroredStrategy). Default 1")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL.keras", help="the trained model")
    parser.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                        help="where the resumable state is kept (default: <output without .keras>.checkpoint "
                             "beside it); rerun the same command to resume")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


class _BadInput(ValueError):
    """A problem with the command's input, reported as one line."""


def _check_arguments(args) -> None:
    if args.backbone not in BACKBONES:
        raise _BadInput(f"--backbone {args.backbone!r} is not one of {', '.join(BACKBONES)}")
    if args.head not in HEADS:
        raise _BadInput(f"--head {args.head!r} is not one of {', '.join(HEADS)}")
    if args.preset is not None and args.preset not in _PRESETS:
        raise _BadInput(f"--preset {args.preset!r} is not one of {', '.join(_PRESETS)}")
    for option, value, low in (("--classes", args.classes, 2), ("--epochs", args.epochs, 1),
                               ("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                               ("--iter-size", args.iter_size, 1), ("--embedding-dim", args.embedding_dim, 1),
                               ("--val-every", args.val_every, 1), ("--chunk-size", args.chunk_size, 1),
                               ("--devices", args.devices, 1), ("--seed", args.seed, 0)):
        if value is not None and value < low:
            raise _BadInput(f"{option} must be >= {low}; got {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise _BadInput(f"--lr must be a number > 0; got {args.lr}")
    if (args.chunk_size is not None or args.sample_rate is not None) and not args.fused_loss:
        raise _BadInput("--chunk-size and --sample-rate apply to the loss the head computes itself: add --fused-loss")
    if args.sample_rate is not None and not 0 < args.sample_rate <= 1:
        raise _BadInput(f"--sample-rate must be in (0, 1]; got {args.sample_rate}")
    if args.sample_update is not None and (args.sample_rate is None or args.sample_rate >= 1):
        raise _BadInput("--sample-update says what happens to the classes a step leaves out: it needs "
                        "--sample-rate below 1")
    if args.sample_update == "sampled" and args.iter_size > 1:
        raise _BadInput("--sample-update sampled steps one micro-batch's sample; it cannot accumulate "
                        f"--iter-size {args.iter_size} micro-batches")
    if args.kernel_layout == "classes_first" and args.head == "subcenter_arcface":
        raise _BadInput("--kernel-layout classes_first: subcenter_arcface keeps its k sub-centers as adjacent "
                        "columns of a (embedding_dim, classes x k) kernel; leave --kernel-layout out")
    if args.kernel_layout == "classes_first" and args.chunk_size is not None and args.chunk_by == "rows":
        raise _BadInput("--kernel-layout classes_first with --chunk-by rows: row chunks take the (embedding_dim, "
                        "classes) kernel; chunk by classes")
    if (args.val_pairs is None) != (args.val_images is None):
        raise _BadInput("--val-pairs and --val-images go together (the pairs file and its images folder)")
    if args.images is not None and args.list is None:
        raise _BadInput("--images is the folder of a --list file's paths; with --folder the tree is the folder")
    if Path(args.output).suffix != ".keras":
        raise _BadInput(f"-o {args.output}: the file name must end in .keras")


def _checkpoint_dir(args) -> Path:
    if args.checkpoint_dir is not None:
        return Path(args.checkpoint_dir)
    output = Path(args.output)
    return output.with_name(output.stem + ".checkpoint")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise _BadInput(f"{path}: unreadable ({error}); remove the checkpoint folder to start afresh") from None


def run(args: argparse.Namespace) -> int:
    """Run ``keras-margin train`` with parsed ``args``; returns the exit code.

    Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser)
    >>> run(parser.parse_args(["--list", "absent.txt", "--backbone", "resnet9", "-o", "m.keras"]))
    2
    """
    try:
        _check_arguments(args)
        from keras_margin.export._files import check_writable

        check_writable(args.output, "-o")  # before any work
        checkpoints = _checkpoint_dir(args)
        if checkpoints.exists() and not checkpoints.is_dir():
            raise _BadInput(f"--checkpoint-dir {checkpoints}: is a file, not a folder")
        if not checkpoints.parent.resolve().is_dir():
            raise _BadInput(f"--checkpoint-dir {checkpoints}: the folder {checkpoints.parent} does not exist")
        return _train(args, checkpoints)
    except (_BadInput, FileNotFoundError, ValueError, ImportError, RuntimeError, MemoryError) as error:
        return fail(PROG, str(error) or type(error).__name__)
    except OSError as error:
        return fail(PROG, f"{getattr(error, 'filename', None) or ''}: {error.strerror or error}")


def _read_images(args):
    from keras_margin.data import check, read_image_folder, read_image_list

    if args.list is not None:
        images = read_image_list(args.list, args.images, num_classes=args.classes)
    else:
        images = read_image_folder(args.folder)
        if args.classes is not None and args.classes != images.num_classes:
            if args.classes < images.num_classes:
                raise _BadInput(f"--classes {args.classes}: {args.folder} has {images.num_classes} class folders, "
                                f"so labels run to {images.num_classes - 1}, outside [0, {args.classes})")
            import dataclasses

            images = dataclasses.replace(images, num_classes=args.classes)
    return images, check


def _schedule_and_optimizer(recipe, args, updates: int, micro_per_pass: int):
    """The recipe's optimizer for a run of ``updates`` optimizer updates; a line describing the schedule."""
    import dataclasses

    from keras_margin.recipes import PolyWarmupSchedule, RecipeSGD

    if args.lr is not None:
        recipe = dataclasses.replace(recipe, base_lr=args.lr)
    if recipe.schedule == "multistep":
        optimizer = recipe.optimizer(iter_size=args.iter_size)
        text = (f"lr {recipe.base_lr:g}, x{recipe.gamma:g} at iterations "
                f"{'/'.join(str(b) for b in recipe.boundaries)} (Caffe multistep)")
        return optimizer, text
    # InsightFace: warm-up for the released run's share of it (2 of 25 epochs), then poly decay to the run's end.
    total = updates * args.iter_size  # the schedule counts micro-batches, as arcface_torch's does
    warmup = total * recipe.warmup_epochs // recipe.total_epochs
    schedule = PolyWarmupSchedule(recipe.base_lr, total, warmup, recipe.power, name=f"{recipe.name}_poly")
    optimizer = RecipeSGD(learning_rate=schedule, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                          momentum_form=recipe.momentum_form, decay_exclude=recipe.decay_exclude,
                          lr_multipliers=recipe.lr_multipliers, name=f"{recipe.name}_sgd",
                          gradient_accumulation_steps=args.iter_size if args.iter_size > 1 else None)
    return optimizer, (f"lr {recipe.base_lr:g}, warm-up {warmup} then poly^{recipe.power:g} to 0 at micro-batch "
                       f"{total} (InsightFace)")


def _devices(keras, count: int, jit, sample_update: str | None = None):
    """(TF strategy or None, JAX mesh or None, description) for ``count`` devices."""
    backend = keras.backend.backend()
    if count == 1:
        return None, None, "1 device"
    if backend == "jax":
        devices = keras.distribution.list_devices()
        if len(devices) < count:
            raise _BadInput(f"--devices {count}: JAX sees {len(devices)} device(s) ({', '.join(devices)}); on CPU set "
                            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before starting")
        mesh = keras.distribution.DeviceMesh((count,), ("batch",), devices[:count])
        return None, mesh, f"{count} JAX devices (batch split, head classes sharded)"
    if backend == "tensorflow":
        if sample_update == "sampled":
            raise _BadInput(f"--sample-update sampled with --devices {count} on TensorFlow: MirroredStrategy's "
                            "replicas would each restore the columns; use the JAX backend or --devices 1")
        if jit:
            raise _BadInput(f"--jit with --devices {count} on TensorFlow: XLA cannot reach the other replicas' "
                            "variables; drop --jit (or use the JAX backend)")
        import tensorflow as tf

        found = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        if len(found) < count:
            raise _BadInput(f"--devices {count}: TensorFlow sees {len(found)} device(s) "
                            f"({', '.join(d.name for d in found)})")
        names = [device.name for device in found[:count]]
        return tf.distribute.MirroredStrategy(names), None, f"{count} devices (MirroredStrategy: {', '.join(names)})"
    raise _BadInput(f"--devices {count}: multi-device training is implemented for JAX and TensorFlow, not {backend}")


def _build_model(keras, args, images, input_size, head_class, num_classes):
    """(training model, loss, form, head) where form is "cosine", "logits" or "fused"."""
    import keras_margin.models as models
    from keras_margin.input_contract import InputContract

    builder, fixed, _ = BACKBONES[args.backbone]
    kwargs = dict(fixed, input_shape=(*input_size, 3))
    if args.embedding_dim is not None:
        kwargs["embedding_dim"] = args.embedding_dim
    backbone = getattr(models, builder)(**kwargs)
    options = {"fused_loss": True} if args.fused_loss else {}
    if args.chunk_size is not None:
        options["chunk_size"] = args.chunk_size
        options["chunk_by"] = args.chunk_by
    if args.sample_rate is not None:
        options["sample_rate"] = args.sample_rate
    if args.sample_update is not None:
        options["sample_update"] = args.sample_update
    if args.kernel_layout is not None:
        options["kernel_layout"] = args.kernel_layout
    head = head_class(num_classes, name="head", **options)
    pixels = keras.Input((*input_size, 3), name="image")
    recorded = InputContract("normalized", "bgr", mean=_MEAN, scale=_SCALE,
                             source="keras-margin train (image_dataset's Caffe transform)", name="input_contract")
    embedding = backbone(recorded(pixels))
    loss, form = None, "fused"
    if not args.fused_loss:
        try:
            loss, form = head.loss, "cosine"
        except ValueError:  # the objective reads batch statistics: the label-aware logits form
            loss, form = keras.losses.SparseCategoricalCrossentropy(from_logits=True), "logits"
    if form == "cosine":
        model = keras.Model(pixels, head(embedding), name=f"{args.backbone}_{args.head}")
    else:
        labels = keras.Input((), dtype="int32", name="label")
        model = keras.Model([pixels, labels], head([embedding, labels]), name=f"{args.backbone}_{args.head}")
    return model, loss, form


def _peek_guard(tf, dataset, batches: int):
    """``dataset`` behind a switch: until ``started`` is set (``on_train_begin``), iterating yields zero batches
    of the same structure, so Keras' look at the first batch before training (``fit`` peeks to build the model
    on some backends and under tf.distribute) never starts a pass, and pass k of the run is always epoch k of
    ``image_dataset``'s order, whatever the backend or device count."""
    started = tf.Variable(0, dtype=tf.int64, trainable=False, name="train_started")
    zeros = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype), dataset.element_spec)
    stand_in = tf.data.Dataset.from_tensors(zeros).repeat(batches)

    def choose(_):
        live = started.read_value()
        return stand_in.take(1 - live).concatenate(dataset.take(tf.where(live > 0, tf.constant(-1, tf.int64),
                                                                          tf.constant(0, tf.int64))))

    guarded = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).flat_map(choose)
    guarded = guarded.apply(tf.data.experimental.assert_cardinality(batches)).prefetch(tf.data.AUTOTUNE)
    return guarded, started


def _train(args, checkpoints: Path) -> int:
    import keras

    import keras_margin.layers as heads
    from keras_margin import recipes
    from keras_margin.callbacks import NaNLossDiagnosis, NaNLossError
    from keras_margin.data import DataError, image_dataset
    from keras_margin.evaluation.pairs import PairsFileError
    from keras_margin.export._files import atomic_output

    head_class = getattr(heads, HEADS[args.head], None)
    if head_class is None:
        raise _BadInput(f"--head {args.head}: {HEADS[args.head]} is not in this keras_margin")
    input_size = args.input_size or BACKBONES[args.backbone][2]
    try:
        images, check = _read_images(args)
        report = check(images, image_size=input_size, fit="resize")
    except DataError as error:
        raise _BadInput(str(error)) from None
    preset = args.preset or _DEFAULT_PRESET.get(args.head, "insightface")
    recipe = recipes.get(preset)
    batch = args.batch_size or recipe.batch_size
    if batch % args.iter_size:
        raise _BadInput(f"--batch-size {batch} is not a multiple of --iter-size {args.iter_size}")
    micro = batch // args.iter_size
    if micro % args.devices:
        raise _BadInput(f"the micro-batch of {micro} images (--batch-size / --iter-size) does not split over "
                        f"--devices {args.devices}")
    per_pass = len(images) // micro  # Keras steps (micro-batches) per pass; the last, smaller batch is left out
    if per_pass == 0:
        raise _BadInput(f"{len(images)} images make no batch of {micro} (--batch-size / --iter-size): lower "
                        "--batch-size")
    if args.sample_update == "sampled":
        from keras_margin.sampling import num_sampled_classes

        kept = num_sampled_classes(images.num_classes, args.sample_rate)
        if micro > kept:
            raise _BadInput(f"--sample-update sampled keeps a fixed ceil({args.sample_rate} x {images.num_classes}) = "
                            f"{kept} classes per step, fewer than the batch of {micro} images, whose classes must all "
                            "be kept: raise --sample-rate or lower --batch-size")
    if args.steps is not None or (args.epochs is None and recipe.total_iterations is not None):
        updates = args.steps if args.steps is not None else recipe.total_iterations
        micro_total = updates * args.iter_size
        steps_per_epoch = min(micro_total, per_pass)
        epochs = math.ceil(micro_total / steps_per_epoch)
    else:
        epochs = args.epochs if args.epochs is not None else recipe.total_epochs
        steps_per_epoch = per_pass
        micro_total = epochs * per_pass
        updates = micro_total // args.iter_size
    verification = None
    best_path = Path(args.output).with_name(Path(args.output).stem + ".best.keras")
    if args.val_pairs is not None:
        from keras_margin.callbacks import Verification
        from keras_margin.evaluation.images import Preprocessing

        try:
            verification = Verification(args.val_pairs, args.val_images, every=args.val_every, ext=args.val_ext,
                                        filepath=best_path, verbose=0 if args.quiet else 1,
                                        preprocessing=Preprocessing(size=tuple(input_size)))
        except PairsFileError as error:
            raise _BadInput(str(error)) from None

    # What must not change between a run and its resumption (the length may grow, except for a poly schedule).
    config = {"backbone": args.backbone, "head": HEADS[args.head], "classes": images.num_classes,
              "images": len(images), "input_size": list(input_size), "embedding_dim": args.embedding_dim,
              "batch_size": batch, "iter_size": args.iter_size, "preset": preset, "lr": args.lr, "seed": args.seed,
              "fused_loss": args.fused_loss, "chunk_size": args.chunk_size, "chunk_by": args.chunk_by,
              "sample_rate": args.sample_rate,
              "mixed_precision": args.mixed_precision, "steps_per_epoch": steps_per_epoch,
              "poly_length": micro_total if recipe.schedule == "poly" else None}
    if args.sample_update is not None:  # only when given: earlier checkpoints' settings have no such key
        config["sample_update"] = args.sample_update
    if args.kernel_layout is not None:
        config["kernel_layout"] = args.kernel_layout
    saved_config = _read_json(checkpoints / "train_config.json")
    if saved_config is not None and saved_config != config:
        changed = sorted(key for key in set(config) | set(saved_config) if config.get(key) != saved_config.get(key))
        raise _BadInput(f"--checkpoint-dir {checkpoints} holds a run with other settings ("
                        + ", ".join(f"{key}: {saved_config.get(key)!r} there, {config.get(key)!r} now"
                                    for key in changed)
                        + "); give another --checkpoint-dir or remove that folder to start afresh")
    metadata = _read_json(checkpoints / "training_metadata.json") or {}
    start_epoch = int(metadata.get("epoch", 0))
    state = _read_json(checkpoints / "train_state.json") or {}

    previous_policy = keras.mixed_precision.global_policy()
    try:
        if args.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        strategy, mesh, device_text = _devices(keras, args.devices, args.jit, args.sample_update)
        keras.utils.set_random_seed(args.seed)
        import tensorflow as tf

        dataset = image_dataset(images=images, image_size=input_size, fit="resize", mean=_MEAN, scale=_SCALE,
                                bgr=True, batch_size=micro, training=True, seed=args.seed, start_epoch=start_epoch,
                                labels_as_input=False, check=False, prefetch=False)
        scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
        with scope:
            model, loss, form = _build_model(keras, args, images, input_size, head_class, images.num_classes)
            if mesh is not None:
                from keras_margin.distribution import shard_heads

                model = shard_heads(model, mesh, class_axis="batch", batch_axis="batch")
            # After the model: the optimizer's own variables (iterations, rate) must be placed as the model's.
            optimizer, schedule_text = _schedule_and_optimizer(recipe, args, updates, per_pass)
            if args.sample_update == "sampled":
                from keras_margin.partial_fc import PartialFCOptimizer

                optimizer = PartialFCOptimizer(optimizer)
            model.compile(optimizer, loss=loss, jit_compile="auto" if args.jit is None else args.jit)
        if form != "cosine":
            dataset = dataset.map(lambda x, y: ((x, y), y))
        stream, started = _peek_guard(tf, dataset, per_pass)

        print(f"training {args.backbone} + {HEADS[args.head]} ({form} form, {images.num_classes} classes) on "
              f"{len(images)} images of {images.source}; input {input_size[0]}x{input_size[1]}, batch {batch}"
              f"{f' ({args.iter_size} x {micro})' if args.iter_size > 1 else ''}, {device_text}")
        print(f"recipe {preset}: {schedule_text}; {updates} updates = {epochs} epoch(s) of {steps_per_epoch} "
              f"step(s)")
        if start_epoch:
            print(f"resuming from {checkpoints} at epoch {start_epoch + 1}")

        Clock, StateWriter = _callback_classes()
        clock = Clock(started, micro_total, steps_per_epoch, state)
        callbacks = [clock, keras.callbacks.BackupAndRestore(str(checkpoints), delete_checkpoint=False),
                     NaNLossDiagnosis()]
        if verification is not None:
            verification.best = state.get("best", -math.inf)
            verification.best_epoch = state.get("best_epoch")
            callbacks.insert(1, verification)
        callbacks.append(StateWriter(checkpoints, config, clock, verification))
        try:
            history = model.fit(stream, epochs=epochs, steps_per_epoch=steps_per_epoch if steps_per_epoch <
                                per_pass else None, shuffle=False, callbacks=callbacks,
                                verbose=0 if args.quiet else 1)
        except NaNLossError as error:
            raise _BadInput(str(error).splitlines()[0] + " (rerun with --no-jit for the bad class ids)") from None
        except KeyboardInterrupt:
            print(f"\n{PROG}: interrupted; rerun the same command to resume from {checkpoints}", file=sys.stderr)
            return 130
        try:
            with atomic_output(args.output) as partial:
                model.save(str(partial))
        except OSError as error:
            raise _BadInput(f"-o {args.output}: cannot write: {error.strerror or error}") from None
        _summary(args, model, form, report, images, history, clock, verification, best_path, checkpoints,
                 micro_total, updates)
        return 0
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        if args.devices > 1 and keras.backend.backend() == "jax":
            keras.distribution.set_distribution(None)


def _callback_classes():
    """The two callbacks of a run (defined here: this module imports no framework at import time)."""
    import keras

    class Clock(keras.callbacks.Callback):
        """Opens the data stream at ``on_train_begin``, counts and times the steps, stops after the last one."""

        def __init__(self, started, micro_total: int, steps_per_epoch: int, state: dict):
            super().__init__()
            self.started, self.micro_total, self.steps_per_epoch = started, micro_total, steps_per_epoch
            self.steps, self.seconds, self.first, self.begin, self.epoch = 0, 0.0, None, 0.0, 0
            self.final_loss = state.get("final_loss")
            self.epochs_done = state.get("epochs_done", 0)

        def on_train_begin(self, logs=None):
            self.started.assign(1)

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            self.begin = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            if self.steps > 1:  # the first step compiles
                self.seconds += time.perf_counter() - self.begin
            else:
                self.first = time.perf_counter() - self.begin
            if self.epoch * self.steps_per_epoch + batch + 1 >= self.micro_total:
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            if logs and "loss" in logs:
                self.final_loss = float(logs["loss"])
            self.epochs_done = epoch + 1

        def seconds_per_step(self) -> float | None:
            """Mean time of a training step, the first (compiling) one left out when there are others."""
            if self.steps >= 2:
                return self.seconds / (self.steps - 1)
            return self.first if self.steps == 1 else None

    class StateWriter(keras.callbacks.Callback):
        """After each epoch (after BackupAndRestore), writes the run's settings and what a resumed run's summary
        needs into the checkpoint folder."""

        def __init__(self, folder: Path, config: dict, clock: Clock, verification):
            super().__init__()
            self.folder, self.config, self.clock, self.verification = folder, config, clock, verification

        def on_epoch_end(self, epoch, logs=None):
            from keras_margin.export._files import atomic_output

            self.folder.mkdir(exist_ok=True)
            state = {"final_loss": self.clock.final_loss, "epochs_done": epoch + 1}
            if self.verification is not None and self.verification.best_epoch is not None:
                state.update(best=self.verification.best, best_epoch=self.verification.best_epoch)
            for name, content in (("train_config.json", self.config), ("train_state.json", state)):
                with atomic_output(self.folder / name) as partial:
                    partial.write_text(json.dumps(content, indent=1))

    return Clock, StateWriter


def _summary(args, model, form, report, images, history, clock, verification, best_path, checkpoints,
             micro_total, updates) -> None:
    per_step = clock.seconds_per_step()
    head = model.get_layer("head")
    lines = [
        ("images", f"{len(images)} ({images.source}), {images.num_classes} classes; {report.summary()}"),
        ("model", f"{args.backbone} + {type(head).__name__} ({form} form), {model.count_params():,} parameters"),
        ("steps", f"{clock.steps} this run; {clock.epochs_done} epoch(s), {updates} update(s) in all"),
        ("time/step", f"{1000 * per_step:.1f} ms" if per_step is not None else "- (no step run: already done)"),
        ("final loss", f"{clock.final_loss:.6f} (mean over the last epoch)" if clock.final_loss is not None else "-"),
    ]
    if verification is not None:
        if verification.best_epoch is not None:
            lines.append(("val_lfw_accuracy", f"{verification.best:.4f} best, at epoch {verification.best_epoch} "
                                              f"(saved to {best_path})"))
        last = {key: values[-1] for key, values in history.history.items() if key.startswith("val_lfw")}
        if "val_lfw_accuracy" in last:
            lines.append(("last val", f"val_lfw_accuracy {last['val_lfw_accuracy']:.4f}"))
    lines += [
        ("output", f"{args.output} (images -> {'cos(theta)' if form == 'cosine' else '[images, labels] -> head'})"),
        ("checkpoints", f"{checkpoints} (rerun with a larger --epochs to continue)"),
        ("embeddings", f"import keras, keras_margin; keras_margin.export.embedding_model("
                       f"keras.saving.load_model({str(args.output)!r}))"),
    ]
    width = max(len(name) for name, _ in lines)
    print(f"{PROG}: done")
    for name, text in lines:
        print(f"  {name.ljust(width)}  {text}")


if __name__ == "__main__":  # pragma: no cover
    import keras_margin_cli

    sys.exit(keras_margin_cli.main(["train", *sys.argv[1:]]))
