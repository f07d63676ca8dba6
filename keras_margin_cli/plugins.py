"""Plugin discovery through entry points, importing no framework: the ``keras-margin`` subcommands
(group ``keras_margin.commands``) and the packages whose Keras layers ``import keras_margin`` registers
(group ``keras_margin.custom_objects``).

A distribution plugs in by declaring entry points in its ``pyproject.toml``, as keras-margin's own Caffe
converter does::

    [project.entry-points."keras_margin.commands"]
    convert = "converters.caffe.cli"          # a module with HELP, add_arguments(parser), run(args)
    [project.entry-points."keras_margin.custom_objects"]
    caffe = "converters.caffe.layers"         # imported by `import keras_margin` (registers its layers)

A top-level package of the same name from another distribution can shadow the plugin's package; when an
entry point's module cannot be imported, or is not what the entry point promised, ``PluginError`` says
which file was imported instead.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from types import ModuleType

__all__ = ["COMMANDS", "CUSTOM_OBJECTS", "PluginError", "entry_points", "load"]

COMMANDS = "keras_margin.commands"
CUSTOM_OBJECTS = "keras_margin.custom_objects"


class PluginError(ImportError):
    """An entry point's module could not be imported, or is not the module its distribution installed."""


def entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    """The installed entry points of ``group``, sorted by name (one per name: the first distribution wins).

    Example:
    >>> sorted(ep.name for ep in entry_points(COMMANDS))
    ['convert', 'export', 'train', 'verify']
    """
    seen: dict[str, importlib.metadata.EntryPoint] = {}
    for point in importlib.metadata.entry_points(group=group):
        seen.setdefault(point.name, point)
    return [seen[name] for name in sorted(seen)]


def _distribution(point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(point, "dist", None)
    return dist.metadata["Name"] if dist is not None else "an installed distribution"


def _where(top: str) -> str:
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return f"no top-level package '{top}' is importable"
    origin = spec.origin if spec.origin not in (None, "namespace") else ", ".join(spec.submodule_search_locations or [])
    return f"the top-level package '{top}' is imported from {origin}"


def load(point: importlib.metadata.EntryPoint, *, required: tuple[str, ...] = ()) -> ModuleType:
    """Import the module an entry point names; check it has the ``required`` attributes.

    Raises:
        PluginError: the import failed inside the plugin's package because another distribution's package of
            the same top-level name shadows it, or the module lacks a required attribute. The message names
            the entry point, its distribution and the file that was imported.
    """
    module_name = point.value.split(":")[0].strip()
    top = module_name.split(".")[0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing == module_name or module_name.startswith(f"{missing}."):
            raise PluginError(
                f"entry point '{point.name}' of {_distribution(point)} names the module '{module_name}', which "
                f"cannot be imported: {_where(top)}. If that is another distribution's '{top}', it shadows "
                f"{_distribution(point)}'s: uninstall one of them (pip uninstall), or reinstall "
                f"{_distribution(point)}."
            ) from error
        raise  # a dependency missing inside the plugin: its own message says which
    absent = [name for name in required if not hasattr(module, name)]
    if absent:
        raise PluginError(
            f"entry point '{point.name}' of {_distribution(point)}: the module '{module_name}' imported from "
            f"{getattr(module, '__file__', '?')} has no {', '.join(absent)}; {_where(top)}. If that is another "
            f"distribution's '{top}', it shadows {_distribution(point)}'s: uninstall one of them."
        )
    return module
