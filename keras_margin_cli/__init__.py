"""The ``keras-margin`` command line, importing no framework until a subcommand runs.

Subcommands are entry points of the group ``keras_margin.commands`` (``keras_margin_cli.plugins``): each names
a module with ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``, whose module level imports
neither Keras nor TensorFlow. ``--version``, ``--help`` and argument errors therefore answer at once; a real
command starts the framework with its start-up log (absl, CUDA probing, oneDNN notices) kept off the terminal,
and shown only if the start fails or ``KERAS_MARGIN_FRAMEWORK_LOG=1`` is set.

Exit codes: 0 success, 1 a check failed (parity), 2 bad input or a failed command (one line, no traceback).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import tempfile
from typing import Sequence

from keras_margin_cli import plugins

__all__ = ["build_parser", "fail", "main", "start_framework", "version"]

_COMMAND_API = ("HELP", "add_arguments", "run")


def version() -> str:
    """The installed keras-margin version, read from the distribution's metadata (no import of the package)."""
    try:
        return importlib.metadata.version("keras-margin")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree, uninstalled
        return "unknown (not installed: pip install -e .)"


def fail(prog: str, message: object) -> int:
    """Print ``<prog>: error: <message>`` on one line to stderr; return exit code 2."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def image_size(text: str) -> tuple[int, int]:
    """An argparse ``type`` for ``H,W`` (or ``HxW``) image sizes: two positive integers.

    Example:
    >>> image_size("112,96"), image_size("112x112")
    ((112, 96), (112, 112))
    """
    try:
        parts = [int(part) for part in text.lower().replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HEIGHT,WIDTH, e.g. 112,96")
    return parts[0], parts[1]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subparser per installed ``keras_margin.commands`` entry point.

    A command whose module cannot be loaded is still listed; using it reports why (exit 2).

    Example:
    >>> build_parser().parse_args(["export", "m.keras", "--onnx", "m.onnx"]).command
    'export'
    """
    parser = argparse.ArgumentParser(prog="keras-margin",
                                     description="Margin-softmax face-recognition tools for Keras 3.")
    parser.add_argument("--version", action="version", version=f"keras-margin {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for point in plugins.entry_points(plugins.COMMANDS):
        try:
            module = plugins.load(point, required=_COMMAND_API)
        except plugins.PluginError as error:
            sub = subparsers.add_parser(point.name, help=f"(unavailable: {error})", add_help=False)
            sub.add_argument("rest", nargs=argparse.REMAINDER)
            sub.set_defaults(_module=None, _load_error=error)
            continue
        sub = subparsers.add_parser(point.name, help=module.HELP, description=module.HELP)
        sub.set_defaults(_module=module, _load_error=None)
        module.add_arguments(sub)
    return parser


def start_framework() -> None:
    """Import keras-margin (so Keras, its backend and the registered plugins) with the backend's start-up log
    kept off the terminal. The log is replayed if the start fails, or always with KERAS_MARGIN_FRAMEWORK_LOG=1.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ.get("KERAS_MARGIN_FRAMEWORK_LOG") == "1":
        import keras_margin  # noqa: F401
        return
    sys.stderr.flush()
    saved = os.dup(2)
    log = tempfile.TemporaryFile()
    try:
        os.dup2(log.fileno(), 2)
        import keras

        import keras_margin  # noqa: F401  (registers heads and plugin layers)

        # Device discovery is where TensorFlow and JAX log a missing CUDA driver: do it now, in the quiet.
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.list_physical_devices()
        elif keras.backend.backend() == "jax":
            import jax

            jax.devices()
    except BaseException:
        sys.stderr.flush()
        os.dup2(saved, 2)
        log.seek(0)
        sys.stderr.write(log.read().decode(errors="replace"))
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        log.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``keras-margin`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    prog = f"keras-margin {args.command}"
    if args._module is None:
        return fail(prog, args._load_error)
    try:
        start_framework()
    except ImportError as error:
        return fail(prog, f"cannot start Keras: {error}")
    return int(args._module.run(args) or 0)
