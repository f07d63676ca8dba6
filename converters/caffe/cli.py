"""``keras-margin convert``: Caffe .prototxt + .caffemodel -> .keras, with a progress bar, a one-screen summary
and an optional parity check. Keras/TensorFlow are imported inside ``run`` so ``keras-margin --version`` stays fast.

Exit codes: 0 converted (and parity within tolerance), 1 parity check failed, 2 conversion error (one line,
no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from converters.caffe.errors import ConversionError

__all__ = ["HELP", "add_arguments", "run"]

HELP = "convert a Caffe .prototxt + .caffemodel into a .keras model"

PROG = "keras-margin convert"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``convert`` subcommand's arguments to ``parser``.

    Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser)
    >>> parser.parse_args(["net.prototxt", "net.caffemodel", "-o", "net.keras", "--phase", "train"]).phase
    'TRAIN'
    """
    parser.add_argument("prototxt", help="the network description (.prototxt, current or V1 format)")
    parser.add_argument("caffemodel", nargs="?", default=None,
                        help="the weights (.caffemodel); without it the weights are initialised from the fillers")
    parser.add_argument("-o", "--output", default=None,
                        help="the .keras file to write (default: <prototxt name>.keras in the current directory)")
    parser.add_argument("--phase", type=str.upper, choices=("TEST", "TRAIN"), default="TEST",
                        help="TEST: the deploy net (default); TRAIN: keep TRAIN-phase layers, e.g. to rebuild "
                             "a training head such as AMSoftmaxHead")
    parser.add_argument("--check", metavar="opencv|REF.npz", default=None,
                        help="compare every blob with OpenCV's Caffe importer on the same files, or with blobs "
                             "dumped from Caffe into an .npz (keys: blob names)")
    parser.add_argument("--input-shape", metavar="C,H,W", default=None,
                        help="input size when the prototxt's data layer does not give it, e.g. 3,112,96")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="parity tolerance: a blob diverges when max abs error > atol + atol * max|ref| "
                             "(default 1e-4)")
    parser.add_argument("--report", action="store_true", help="print the parity table of every blob")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _parse_shape(text: str | None):
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise ConversionError(f"--input-shape {text!r}: expected C,H,W integers, e.g. 3,112,96") from None
    if not shape or any(dim < 1 for dim in shape):
        raise ConversionError(f"--input-shape {text!r}: expected positive C,H,W integers, e.g. 3,112,96")
    return shape


def _output_path(args) -> str:
    output = args.output or f"{Path(args.prototxt).stem}.keras"
    if not output.endswith(".keras"):
        raise ConversionError(f"-o {output!r}: the output file name must end in .keras")
    return output


def run(args: argparse.Namespace) -> int:
    """Run the conversion described by ``args`` (from ``add_arguments``); return the exit code."""
    try:
        return _run(args)
    except ConversionError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


def _megabytes(path: str) -> str:
    return f"{os.path.getsize(path) / 1e6:.1f} MB"


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    input_shape = _parse_shape(args.input_shape)
    output = _output_path(args)

    from converters.caffe.builder import convert

    def progress(done: int, total: int, name: str) -> None:
        # A plain text bar on stderr: redrawn in place on a terminal, a single final line otherwise.
        if args.quiet or (not sys.stderr.isatty() and done < total):
            return
        filled = round(30 * done / total)
        end = "\n" if done == total else ""
        text = f"converting [{'=' * filled}{' ' * (30 - filled)}] {done}/{total} layers  {name[:30]:<30}"
        print(("\r" if sys.stderr.isatty() else "") + text, end=end, file=sys.stderr, flush=True)

    started = time.perf_counter()
    conversion = convert(args.prototxt, args.caffemodel, args.phase, input_shape=input_shape, progress=progress)
    converted = time.perf_counter() - started
    try:
        conversion.model.save(output)
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot write {output}: {error}") from None
    saved = time.perf_counter() - started - converted

    report = None
    if args.check:
        from converters.caffe.parity import parity_report

        report = parity_report(conversion=conversion, caffemodel=args.caffemodel, reference=args.check,
                               atol=args.atol, rtol=args.atol)

    plan, model = conversion.plan, conversion.model
    weights = f"{args.caffemodel} ({_megabytes(args.caffemodel)}, {plan.source_format})" if args.caffemodel \
        else "none: initialised from the prototxt fillers"
    caffe_count = len(plan.caffe_layers)
    lines = [f"{PROG}: {args.prototxt} (phase {plan.phase}) -> {output}"]
    lines.append(f"  layers    {caffe_count} Caffe layers -> {len(model.layers)} Keras layers"
                 + (f"; dropped {', '.join(f'{d.name} ({d.type})' for d in plan.dropped)}" if plan.dropped else ""))
    lines.append(f"  params    {model.count_params():,} (Caffe blobs: {plan.parameter_count:,}); weights {weights}")
    for tensor in model.inputs:
        lines.append(f"  input     {tensor.name}: Keras {tuple(tensor.shape)} (NHWC)")
    outputs = model.outputs
    for blob_id, tensor in zip(plan.outputs, outputs):
        lines.append(f"  output    {blob_id.split('#')[0]}: Keras {tuple(tensor.shape)}")
    for head in conversion.heads or ["none"]:
        lines.append(f"  head      {head}")
    if conversion.heads:
        first = conversion.heads[0].split("'")[1]
        lines.append(f"            compile with loss=model.get_layer('{first}').loss; it outputs cos(theta)")
    for fusion in plan.fusions:
        lines.append(f"  fused     {fusion}")
    for note in conversion.notes:
        lines.append(f"  note      {note}")
    for warning in conversion.warnings:
        lines.append(f"  warning   {warning}")
    if plan.unused_weights:
        shown = ", ".join(plan.unused_weights[:5]) + (" ..." if len(plan.unused_weights) > 5 else "")
        lines.append(f"  unused    caffemodel layers not in the {plan.phase} net: {shown}")
    lines.append(f"  time      convert {converted:.1f} s, save {saved:.1f} s")
    if report is not None:
        if args.report:
            lines.append(str(report))
        else:
            head, *rest = report.summary().splitlines()
            lines.append(f"  {head}")
            lines.extend(rest)
    print("\n".join(lines))
    if report is not None and not report.ok:
        return 1
    return 0


def main(argv=None) -> int:  # pragma: no cover - the package's entry point is keras-margin (keras_margin_cli)
    parser = argparse.ArgumentParser(prog=PROG, description="convert a Caffe model into a .keras model")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
