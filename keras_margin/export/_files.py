"""Output files written whole or not at all: every command that writes a file (``export``, ``verify``,
``convert``) checks first that it can (before any work) and writes through ``atomic_output``: a temporary file
beside the output, moved onto it (``os.replace``) only once complete. An error, a failed check or Ctrl-C
leaves the previous file (or none) in place, never a partial one. No framework is imported here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_output", "check_writable"]


def check_writable(path: str | os.PathLike, what: str = "") -> Path:
    """Raise unless a file can be written at ``path``: not a folder, its folder exists and takes a new file.

    The test is real (a temporary file is created in the folder and removed), so a read-only folder is caught
    whatever the user's privileges.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: ``path`` is a folder, or the folder cannot take a new file.

    Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     check_writable(tmp, "--tflite")
    Traceback (most recent call last):
    ...
    ValueError: --tflite ...: is a folder; give a file name
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if path.is_dir():
        raise ValueError(f"{label}: is a folder; give a file name")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{label}: the folder {path.parent} does not exist")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as error:
        raise ValueError(f"{label}: cannot write in the folder {folder}: {error.strerror or error}") from None
    os.close(handle)
    os.remove(probe)
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so format-by-suffix writers still work); once the
    block completes, move it onto ``path``. On any exception or interrupt the temporary file is removed and
    ``path`` is left as it was.

    Example:
    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     target = os.path.join(tmp, "figures.json")
    ...     with atomic_output(target) as partial:
    ...         _ = partial.write_text("{}")
    ...     sorted(os.listdir(tmp))
    ['figures.json']
    """
    path = Path(path)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{path.suffix}",
                                    dir=path.resolve().parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would have given the output
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
