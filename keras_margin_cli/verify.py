"""``keras-margin verify``: LFW-protocol verification figures of a ``.keras`` model (10-fold accuracy, AUC, EER,
TAR@FAR, optional ROC plot). TensorFlow and Keras are imported inside ``run``, so ``keras-margin --version`` stays fast.

Preprocessing follows the model's ``InputContract`` (``keras-margin convert`` records one): what the model does
not do itself is applied, ``--mean/--scale/--bgr/--rgb/--flip`` fill in what it does not record; an option that
doubles a step the model does itself is dropped with a one-line warning on stderr, one that contradicts the
contract is an error (``--ignore-contract`` uses the options as given). The line ``preprocessing ...`` says what
was applied.

Exit codes: 0 evaluated, 2 bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys

from keras_margin_cli import fail, image_size

__all__ = ["HELP", "add_arguments", "run"]

HELP = "face-verification accuracy (LFW protocol) of a .keras model"

PROG = "keras-margin verify"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``verify`` subcommand's arguments to ``parser``.

    Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser)
    >>> args = parser.parse_args(["m.keras", "--pairs", "pairs.txt", "--images", "lfw", "--flip", "--size", "112,96"])
    >>> args.flip, args.size, args.mean, args.channel_order
    (True, (112, 96), None, None)
    """
    parser.add_argument("model", help="the .keras model (a margin head and label inputs are dropped)")
    parser.add_argument("--pairs", required=True, help="LFW pairs file: pairs.txt (View 2, '10 300' header), "
                                                       "a View 1 file ('500' header) or a header-less list")
    parser.add_argument("--images", required=True, help="images folder: DIR/<name>/<name>_<0001>.<ext>")
    parser.add_argument("--flip", action="store_true", default=None,
                        help="embedding = L2-normalized feature(image) + feature(mirror image), as the AM-Softmax "
                             "deploy net (never applied to a model whose input contract says it flips itself)")
    parser.add_argument("--roc", metavar="PNG", default=None, help="write the ROC plot (needs matplotlib)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the figures as JSON")
    parser.add_argument("--ext", default="jpg", help="image file extension (default jpg)")
    parser.add_argument("--size", type=image_size, metavar="H,W", default=None,
                        help="resize every image to H,W (default: none; images must have the model's input size)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--bgr", dest="channel_order", action="store_const", const="bgr", default=None,
                       help="feed BGR (default: the model's input contract, else RGB)")
    order.add_argument("--rgb", dest="channel_order", action="store_const", const="rgb",
                       help="feed RGB (default: the model's input contract, else RGB)")
    parser.add_argument("--mean", type=float, default=None,
                        help="subtracted from pixels 0..255 (default: the model's input contract, else 0)")
    parser.add_argument("--scale", type=float, default=None,
                        help="multiplies after the mean (default: the model's input contract, else 1; a model with "
                             "no recorded normalization, e.g. the AM-Softmax deploy net: --mean 128 --scale 0.0078125)")
    parser.add_argument("--ignore-contract", action="store_true",
                        help="use --mean/--scale/--bgr/--flip as given (defaults RGB, 0, 1, no flip), whatever the "
                             "model's input contract records")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    parser.add_argument("--far", type=float, nargs="+", default=None, metavar="FAR",
                        help="FAR targets for TAR@FAR (default 1e-1 1e-2 ... 1e-6)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``keras-margin verify`` with parsed ``args``; returns the exit code.

    Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser)
    >>> run(parser.parse_args(["absent.keras", "--pairs", "p.txt", "--images", "."]))
    2
    """
    from keras_margin.evaluation.contract import CLI_NAMES, resolve_preprocessing
    from keras_margin.evaluation.images import Preprocessing, load_image
    from keras_margin.evaluation.lfw import evaluate_lfw
    from keras_margin.evaluation.metrics import DEFAULT_FARS
    from keras_margin.evaluation.pairs import PairsFileError, image_paths, read_pairs
    from keras_margin.export.loading import load_model

    if args.batch_size < 1:
        return fail(PROG, f"--batch-size must be >= 1; got {args.batch_size}")
    if any(not 0.0 <= far <= 1.0 for far in args.far or ()):
        return fail(PROG, f"--far values must be in [0, 1]; got {args.far}")
    from keras_margin.export._files import atomic_output, check_writable

    for option, path in (("--roc", args.roc), ("--json", args.json)):
        try:
            if path is not None:  # before any work, not after the embeddings
                check_writable(path, option)
        except (FileNotFoundError, ValueError) as error:
            return fail(PROG, error)
    if args.scale is not None and args.scale <= 0:
        return fail(PROG, f"--scale must be > 0; got {args.scale:g}")
    try:
        given = Preprocessing(size=args.size, channel_order=args.channel_order, mean=args.mean, scale=args.scale)
        # The cheap checks first: a bad pairs file or a missing image should not wait for the model.
        pairs = read_pairs(args.pairs, ext=args.ext)
        paths = image_paths(pairs, args.images, source=args.pairs)
        model = load_model(args.model)
        _check_image_size(model, load_image(paths[0], given.size), paths[0])
        resolved = resolve_preprocessing(model, given, args.flip, ignore_contract=args.ignore_contract,
                                         names=CLI_NAMES)
    except (PairsFileError, FileNotFoundError, ValueError, ImportError) as error:
        return fail(PROG, str(error))
    for message in resolved.warnings:
        print(f"{PROG}: warning: {' '.join(message.split())}", file=sys.stderr)
    print(f"preprocessing  {resolved.description}")
    try:
        report = evaluate_lfw(model, args.pairs, args.images, flip=resolved.flip,
                              preprocessing=resolved.preprocessing, ext=args.ext, batch_size=args.batch_size,
                              fars=args.far or DEFAULT_FARS, roc=args.roc, progress=not args.quiet,
                              ignore_contract=True)
    except (PairsFileError, FileNotFoundError, ValueError, ImportError) as error:
        return fail(PROG, str(error))
    print(f"{args.model} on {args.pairs}{' (flip)' if resolved.flip else ''}")
    print(report.summary())
    if args.roc:
        print(f"ROC plot  {args.roc}")
    if args.json:
        figures = {
            "accuracy": report.accuracy, "accuracy_std": report.accuracy_std,
            "fold_accuracies": report.fold_accuracies.tolist(), "fold_thresholds": report.fold_thresholds.tolist(),
            "auc": report.auc, "eer": report.eer, "eer_threshold": report.eer_threshold,
            "best_threshold": report.best_threshold, "best_accuracy": report.best_accuracy,
            "tar_at_far": {f"{far:g}": {"tar": tar, "threshold": threshold}
                           for far, (tar, threshold) in report.tar_at_far.items()},
            "genuine": report.genuine, "impostor": report.impostor, "flip": resolved.flip,
            "preprocessing": {"channel_order": resolved.preprocessing.channel_order,
                              "mean": resolved.preprocessing.mean, "scale": resolved.preprocessing.scale,
                              "flip": resolved.flip, "description": resolved.description},
        }
        try:
            with atomic_output(args.json) as partial, open(partial, "w") as handle:
                json.dump(figures, handle, indent=2)
        except OSError as error:
            return fail(PROG, f"{args.json}: cannot write: {error.strerror}")
        print(f"figures   {args.json}")
    return 0


def _check_image_size(model, image, path) -> None:
    shape = model.inputs[0].shape if model.inputs else None
    if shape is None or len(shape) != 4:
        return
    expected = tuple(shape[1:3])
    if None not in expected and tuple(image.shape[:2]) != expected:
        raise ValueError(
            f"{path}: the image is {image.shape[0]}x{image.shape[1]} but the model takes {expected[0]}x{expected[1]}; "
            f"pass --size {expected[0]},{expected[1]} to resize (or use aligned {expected[0]}x{expected[1]} faces)"
        )
