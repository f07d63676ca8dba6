"""``keras-margin convert``: Caffe .prototxt + .caffemodel -> .keras, with a progress bar, a one-screen summary
and an optional parity check. Keras/TensorFlow are imported inside ``run`` so ``keras-margin --version`` stays fast.

Exit codes: 0 converted (and parity within tolerance), 1 parity check failed, 2 conversion error (one line,
no traceback).

The output is written to a temporary file in the output's folder and moved onto the output path
(``os.replace``) only once everything asked for has run and passed: an error, Ctrl-C or a failed save never
leaves a partial file there, and an error (exit 2, including a ``--check`` that cannot run) leaves no new output
at all. Only what passed is written: when the parity check runs but finds a divergence (exit 1), nothing is
written (a previous file at the output path stays as it was) and the summary says so; ``--report`` shows every
blob, and converting without ``--check`` writes the file for inspection.

``--check`` is validated before anything is converted or written: ``opencv`` needs an importable cv2 with
``cv2.dnn.readNetFromCaffe``, anything else must be an existing ``.npz`` file. ``--check opencv`` without a
caffemodel checks the converted model's own initial weights: drawn from the prototxt fillers, written to a
temporary caffemodel that OpenCV reads and the model is converted from (so the .keras holds those weights).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from converters.caffe.errors import ConversionError

__all__ = ["HELP", "add_arguments", "run", "check_reference_npz", "reference_byte_limit", "MAX_REFERENCE_BATCH"]

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
                        help="compare every blob with OpenCV's Caffe importer on the same files (without a "
                             "caffemodel: on the initial weights drawn from the fillers), or with blobs dumped "
                             "from Caffe into an .npz (keys: blob names)")
    parser.add_argument("--input-shape", metavar="[BLOB=]C,H,W", action="append", default=None,
                        help="input size when the prototxt's data layer does not give it, e.g. 3,112,96; "
                             "BLOB=C,H,W names the input, or declares the first bottom of a net fragment "
                             "(e.g. last_ip_layer=512); repeat for several")
    parser.add_argument("--stage", action="append", default=None,
                        help="a NetState stage for include/exclude rules that name stages (as a solver's "
                             "test_state does), e.g. --stage test-on-test-set; repeat for several")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="parity tolerance: a blob diverges when max abs error > atol + atol * max|ref| "
                             "(default 1e-4)")
    contract = parser.add_argument_group(
        "input contract", "record the preprocessing a deploy net expects (its prototxt cannot say); verify and "
        "export then apply it. A TRAIN data layer's transform_param is recorded without these.")
    contract.add_argument("--mean", type=float, default=None,
                          help="pixel mean the model's input was normalized with, e.g. 128 (AM-Softmax)")
    contract.add_argument("--scale", type=float, default=None,
                          help="factor applied after the mean, e.g. 0.0078125 (AM-Softmax)")
    order = contract.add_mutually_exclusive_group()
    order.add_argument("--bgr", dest="channel_order", action="store_const", const="bgr", default=None,
                       help="the input is in BGR order (the default for 3-channel Caffe input)")
    order.add_argument("--rgb", dest="channel_order", action="store_const", const="rgb",
                       help="the input is in RGB order")
    parser.add_argument("--report", action="store_true", help="print the parity table of every blob")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _parse_shape(texts):
    """``--input-shape`` values: a single C,H,W, or BLOB=C,H,W entries (a dict)."""
    if texts is None:
        return None
    texts = [texts] if isinstance(texts, str) else list(texts)
    named = {}
    for text in texts:
        if "=" not in text:
            if len(texts) > 1:
                raise ConversionError(f"--input-shape {text!r}: with several --input-shape, name each: BLOB=C,H,W")
            return _parse_dims(text)
        name, _, dims = text.partition("=")
        if not name.strip():
            raise ConversionError(f"--input-shape {text!r}: expected BLOB=C,H,W with a blob name")
        named[name.strip()] = _parse_dims(dims, text)
    return named


def _parse_dims(text: str, given: str | None = None):
    given = text if given is None else given
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise ConversionError(f"--input-shape {given!r}: expected C,H,W integers, e.g. 3,112,96") from None
    if not shape or any(dim < 1 for dim in shape):
        raise ConversionError(f"--input-shape {given!r}: expected positive C,H,W integers, e.g. 3,112,96")
    return shape


def _output_path(args) -> str:
    output = args.output or f"{Path(args.prototxt).stem}.keras"
    if not output.endswith(".keras"):
        raise ConversionError(f"-o {output!r}: the output file name must end in .keras")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise ConversionError(f"-o {output}: the folder {folder} does not exist; create it first")
    if os.path.isdir(output):
        raise ConversionError(f"-o {output}: is a folder; give a file name ending in .keras")
    from keras_margin.export._files import check_writable

    try:
        check_writable(output, "-o")  # before converting: a read-only folder fails now, not after the work
    except (FileNotFoundError, ValueError) as error:
        raise ConversionError(str(error)) from None
    return output


#: Largest batch a reference .npz may hold: with every blob of the net in float64, it bounds the uncompressed size
#: of the archive (a small archive can claim gigabytes), checked from the zip directory before anything is read.
MAX_REFERENCE_BATCH = 1024


def _npz_headers(path: str) -> list[tuple[str, tuple, int]]:
    """(member name without .npy, array shape, uncompressed bytes the zip directory claims) of each member,
    from the zip directory and the .npy headers only."""
    import zipfile

    import numpy as np

    found = []
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                shape: tuple = ()
                if info.filename.endswith(".npy"):
                    with archive.open(info) as member:
                        version = np.lib.format.read_magic(member)
                        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                else np.lib.format.read_array_header_2_0)
                        shape = tuple(read(member)[0])
                found.append((name, shape, info.file_size))
    except zipfile.BadZipFile:
        raise ConversionError(f"--check {path}: not an .npz file (np.savez writes a zip archive)") from None
    except (ValueError, OSError) as error:
        raise ConversionError(f"--check {path}: malformed .npy header: {error}") from None
    return found


def reference_byte_limit(plan) -> int:
    """Most uncompressed bytes a reference .npz of ``plan``'s net may hold: every blob the plan infers, in
    float64, for ``MAX_REFERENCE_BATCH`` samples, plus 1 MiB (headers, labels); ``MAX_NPZ_BYTES`` at most."""
    import math

    from converters.caffe.parity import MAX_NPZ_BYTES

    per_sample = 0
    for shape in plan.blob_shapes.values():
        dims = list(shape[1:])
        if any(dim is None for dim in dims):
            return MAX_NPZ_BYTES
        per_sample += math.prod(int(dim) for dim in dims)
    return min(MAX_NPZ_BYTES, per_sample * 8 * MAX_REFERENCE_BATCH + 2**20)


def check_reference_npz(path: str, plan) -> None:
    """Refuse a reference .npz, before NumPy loads it, whose members claim more uncompressed bytes than the net's
    blobs can fill (``reference_byte_limit``), or whose image input blob has another shape than the net's."""
    from converters.caffe import registry

    members = _npz_headers(path)
    limit = reference_byte_limit(plan)
    total = sum(size for _, _, size in members)
    if total > limit:
        largest = max(members, key=lambda member: member[2])
        raise ConversionError(
            f"--check {path}: the archive's members claim {total:,} bytes uncompressed ({largest[0]!r}: "
            f"{largest[2]:,}), more than the {limit:,} that every blob of this net in float64 for a batch of "
            f"{MAX_REFERENCE_BATCH} would take; refusing to load it"
        )
    shapes = {name: shape for name, shape, _ in members}
    for layer in plan.layers:
        if not registry.lookup(layer.type).is_input:
            continue
        for name, blob_id in zip(layer.top_names, layer.tops):
            expected = tuple(plan.blob_shapes.get(blob_id, ()))
            if name not in shapes or len(expected) != 4 or blob_id not in plan.needed:
                continue
            got = shapes[name]
            if len(got) != 4 or tuple(got[1:]) != expected[1:]:
                want = ", ".join(str(dim) for dim in expected[1:])
                raise ConversionError(
                    f"--check {path}: input blob '{name}' has shape {got}, but the net expects (N, {want}); "
                    "dump the reference from a forward pass at the net's input size"
                )


def run(args: argparse.Namespace) -> int:
    """Run the conversion described by ``args`` (from ``add_arguments``); return the exit code."""
    from keras_margin_cli import fail

    try:
        return _run(args)
    except ConversionError as error:
        return fail(PROG, error)


def _megabytes(path: str) -> str:
    return f"{os.path.getsize(path) / 1e6:.1f} MB"


def _save_atomically(model, output: str, finish) -> object:
    """Save ``model`` to a temporary .keras beside ``output``, call ``finish()`` (the check), then move the file
    onto ``output`` if the check passed (``finish()`` returns None or a report with ``ok``); on a failed check,
    any error or interrupt the temporary file is removed and ``output`` is untouched."""
    folder = os.path.dirname(os.path.abspath(output))
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=".partial.keras", dir=folder)
    os.close(handle)
    try:
        try:
            model.save(temporary)
        except (OSError, ValueError) as error:
            raise ConversionError(f"cannot write {output}: {error}") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would have given the output
        result = finish()
        if result is not None and not result.ok:
            os.remove(temporary)  # only what passed is written
        else:
            os.replace(temporary, output)
        return result
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    input_shape = _parse_shape(args.input_shape)
    output = _output_path(args)
    if args.caffemodel is not None and not os.path.isfile(args.caffemodel):
        raise ConversionError(f"{args.caffemodel}: no such caffemodel file")

    from converters.caffe.builder import convert
    from converters.caffe.parity import FILLER_WEIGHTS, check_reference, initial_weights_caffemodel, parity_report
    from converters.caffe.reader import read_prototxt

    if args.check:
        check_reference(args.check)  # before converting or writing anything

    def progress(done: int, total: int, name: str) -> None:
        # A plain text bar on stderr: redrawn in place on a terminal, a single final line otherwise.
        if args.quiet or (not sys.stderr.isatty() and done < total):
            return
        filled = round(30 * done / total)
        end = "\n" if done == total else ""
        text = f"converting [{'=' * filled}{' ' * (30 - filled)}] {done}/{total} layers  {name[:30]:<30}"
        print(("\r" if sys.stderr.isatty() else "") + text, end=end, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="keras_margin_convert_") as scratch:
        started = time.perf_counter()
        net = read_prototxt(args.prototxt)
        caffemodel, initial = args.caffemodel, args.check == "opencv" and args.caffemodel is None
        if initial:  # OpenCV needs weights: give both sides the model's initial ones
            caffemodel = initial_weights_caffemodel(net, os.path.join(scratch, "initial.caffemodel"), args.phase,
                                                    input_shape, stage=args.stage)
        given = {key: value for key, value in (("mean", args.mean), ("scale", args.scale),
                                               ("channel_order", args.channel_order)) if value is not None}
        conversion = convert(net, caffemodel, args.phase, input_shape=input_shape, progress=progress,
                             input_contract=given or None, stage=args.stage)
        converted = time.perf_counter() - started
        if args.check and args.check != "opencv":
            check_reference_npz(args.check, conversion.plan)  # before anything is loaded or written
        timing = {}

        def check():
            timing["saved"] = time.perf_counter() - started - converted
            if not args.check:
                return None
            found = parity_report(conversion=conversion, caffemodel=caffemodel, reference=args.check,
                                  atol=args.atol, rtol=args.atol)
            if initial:
                found.weights = FILLER_WEIGHTS
            return found

        report = _save_atomically(conversion.model, output, check)
    saved = timing["saved"]

    plan, model = conversion.plan, conversion.model
    if args.caffemodel:
        weights = f"{args.caffemodel} ({_megabytes(args.caffemodel)}, {plan.source_format})"
    elif initial:
        weights = ("none: initialised from the prototxt fillers (drawn in Caffe layout; a temporary caffemodel "
                   "of them fed the OpenCV check)")
    else:
        weights = "none: initialised from the prototxt fillers"
    caffe_count = len(plan.caffe_layers)
    failed = report is not None and not report.ok
    written = " (not written: the check failed)" if failed else ""
    lines = [f"{PROG}: {args.prototxt} (phase {plan.phase}) -> {output}{written}"]
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
    for spec in conversion.heads:
        keras_name = conversion.head_layers[spec.layer].name
        lines.append(f"            {spec.compile_hint(keras_name)}")
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
        if not report.ok:
            lines.append(f"  NOT WRITTEN  {output}: the parity check FAILED (exit 1), so the model was not saved"
                         f"{' (the previous file is unchanged)' if os.path.exists(output) else ''}; --report shows "
                         "every blob, and converting without --check writes the file for inspection")
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
