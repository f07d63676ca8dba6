"""``keras-margin export``: a ``.keras`` model to ONNX and/or TFLite, each file run in its runtime and compared
with Keras. TensorFlow and Keras are imported inside ``run``, so ``keras-margin --version`` stays fast.

The parity check runs each file on a probe batch that follows the model's ``InputContract`` (random pixels
0..255 for a model that normalizes itself, normalized as recorded otherwise; standard normal when nothing is
recorded), or on ``--inputs DIR|file.npy``. When the Keras outputs barely differ between the probe inputs (mean
pairwise cosine distance at most 4 x (1 - the precision's min cosine)), the figures could not catch an export
that ignores its input: the report says "NOT A CHECK" and the command exits 1, like a failed check, so a
vacuous check never passes a pipeline silently. Give real inputs with ``--inputs``.

Exit codes: 0 exported and checked within tolerance, 1 an exported file disagrees with Keras beyond tolerance or
the probe was not a check, 2 bad input or a failed conversion (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keras_margin_cli import fail

__all__ = ["HELP", "add_arguments", "run"]

HELP = "export a .keras model to ONNX and/or TFLite, with a parity check"

PROG = "keras-margin export"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``export`` subcommand's arguments to ``parser``.

    Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser)
    >>> args = parser.parse_args(["m.keras", "--tflite", "m.tflite", "--quantize", "float16"])
    >>> args.tflite, args.quantize, args.onnx
    ('m.tflite', 'float16', None)
    """
    parser.add_argument("model", help="the .keras model (trained with keras-margin, or from keras-margin convert)")
    parser.add_argument("--onnx", metavar="FILE.onnx", default=None, help="write an ONNX file (float32)")
    parser.add_argument("--tflite", metavar="FILE.tflite", default=None, help="write a TFLite file")
    parser.add_argument("--quantize", choices=("none", "float16", "dynamic"), default="none",
                        help="TFLite weights: none (float32, default), float16, or dynamic (int8 weights)")
    parser.add_argument("--include-head", action="store_true",
                        help="export the margin head's cos(theta) output too (default: the embedding part only)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: tf2onnx's)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="size of the batch the parity check runs on (default 8; batch 1 is checked too); with "
                             "--inputs, the first ones are used")
    parser.add_argument("--inputs", metavar="DIR|FILE.npy", default=None,
                        help="real inputs for the parity check: a .npy of model inputs (N, H, W, C), or a folder of "
                             "images prepared per the model's input contract (default: a probe batch following the "
                             "contract)")


def run(args: argparse.Namespace) -> int:
    """Run ``keras-margin export`` with parsed ``args``; returns the exit code.

    Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser)
    >>> run(parser.parse_args(["absent.keras", "--onnx", "m.onnx"]))
    2
    """
    if not args.onnx and not args.tflite:
        return fail(PROG, "nothing to do: give --onnx FILE.onnx and/or --tflite FILE.tflite")
    quantize = None if args.quantize == "none" else args.quantize
    if quantize and not args.tflite:
        return fail(PROG, f"--quantize {args.quantize} applies to the TFLite file; give --tflite FILE.tflite "
                      "(ONNX is always exported in float32)")
    if args.batch_size < 1:
        return fail(PROG, f"--batch-size must be >= 1; got {args.batch_size}")
    if args.opset is not None and not 7 <= args.opset <= 99:
        return fail(PROG, f"--opset must be an ONNX opset tf2onnx converts to (7 or more; default: tf2onnx's); "
                          f"got {args.opset}")
    from keras_margin.export._files import check_writable

    for option, path, suffix in (("--onnx", args.onnx, ".onnx"), ("--tflite", args.tflite, ".tflite")):
        if path is None:
            continue
        if Path(path).suffix != suffix:
            return fail(PROG, f"{option} {path}: the file name must end in {suffix}")
        try:
            check_writable(path, option)  # before any work: not a folder, and its folder takes a new file
        except (FileNotFoundError, ValueError) as error:
            return fail(PROG, error)

    from keras_margin.export.embedding import embedding_model, find_head
    from keras_margin.export.loading import load_inputs, load_model

    try:
        model = load_model(args.model)
        head = find_head(model)
        part = embedding_model(model, include_head=args.include_head)
    except (FileNotFoundError, ValueError) as error:
        return fail(PROG, str(error))
    inputs, described = None, None
    if args.inputs is not None:
        try:
            inputs, described = load_inputs(part, args.inputs, args.batch_size)
        except (FileNotFoundError, ValueError) as error:
            return fail(PROG, f"--inputs {error}")
    what = ("the whole model with the head's cos(theta) output" if args.include_head and head is not None else
            f"the embedding part (inputs -> the input of {type(head).__name__} '{head.name}')" if head is not None
            else "the whole model (it has no margin head)")
    print(f"{args.model}: exporting {what}, output shape {part.output_shape}")
    if described is None:
        from keras_margin.export.parity import probe_inputs

        described = probe_inputs(part, 1)[1]
    print(f"parity inputs: {described}")

    from keras_margin.export.onnx_export import export_onnx
    from keras_margin.export.tflite_export import export_tflite

    reports = []
    try:
        if args.onnx:
            reports.append(export_onnx(model, args.onnx, include_head=args.include_head, opset=args.opset,
                                       inputs=inputs, batch_size=args.batch_size, verbose=True))
        if args.tflite:
            reports.append(export_tflite(model, args.tflite, quantize=quantize, include_head=args.include_head,
                                         inputs=inputs, batch_size=args.batch_size, verbose=True))
    except (FileNotFoundError, ValueError, RuntimeError, TypeError, MemoryError) as error:
        return fail(PROG, str(error) or "out of memory")
    failed = [report for report in reports if not report.within_tolerance()]
    for report in failed:
        print(f"PARITY CHECK FAILED: {report.format} {report.precision} differs from Keras beyond tolerance")
    vacuous = [report for report in reports if not report.informative()]
    for report in vacuous:
        message = (f"PARITY NOT CHECKED: {report.format} {report.precision}: the Keras outputs barely differ between "
                   f"the probe inputs (mean pairwise cosine distance {report.spread:.2e} <= "
                   f"{report.spread_threshold():.2e}), so the figures cannot tell a faithful file from one that "
                   "ignores its input; pass real inputs with --inputs DIR|file.npy")
        print(message)
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    if not failed and not vacuous:
        print("parity: all exports within tolerance")
    return 1 if failed or vacuous else 0
