"""The ``keras-margin`` command line: ``--version`` and the ``convert``, ``export`` and ``verify`` subcommands.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and ``run(args) -> int``;
this file only wires them up, so adding a subcommand is adding a line to ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from keras_margin.version import __version__

# name -> (module providing add_arguments/run, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("converters.caffe.cli", "convert a Caffe .prototxt + .caffemodel into a .keras model"),
    "export": ("keras_margin.export.cli", "export a .keras model to ONNX and/or TFLite, with a parity check"),
    "verify": ("keras_margin.evaluation.cli", "face-verification accuracy (LFW protocol) of a .keras model"),
}


class UsageError(Exception):
    """A user error the CLI reports in one line with exit code 2 (no traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-margin",
        description="Margin-softmax face-recognition tools for Keras 3.",
    )
    parser.add_argument("--version", action="version", version=f"keras-margin {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        module = _load(module_name)
        if module is not None:
            module.add_arguments(sub)
    return parser


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only a missing subcommand module is tolerated (listed, reported on use); a missing
        # dependency inside it is a real error and surfaces when the subcommand is used.
        if error.name == module_name or module_name.startswith(f"{error.name}."):
            return None
        raise


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = _load(args._module)
    if module is None:
        print(f"keras-margin {args.command}: this installation has no '{args._module}' module", file=sys.stderr)
        return 2
    try:
        return int(module.run(args) or 0)
    except UsageError as error:
        print(f"keras-margin {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
