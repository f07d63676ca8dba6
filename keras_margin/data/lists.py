"""Training-set readers: Caffe ``ImageData`` list files and class-per-folder trees, into an ``ImageList``.

A list file holds one ``relative/path.jpg label`` per line, as the released SphereFace / AM-Softmax prototxts
use (``image_data_param { source: "list.txt" root_folder: "..." }``). As in the fork's ``image_data_layer.cpp``
(``DataLayerSetUp``: ``pos = line.find_last_of(' ')``) the label is the last field, so paths may contain spaces.
Unlike Caffe (``atoi``, which reads ``3abc`` as 3 and a missing label as 0) a label that is not an integer is
an error, labels must lie in [0, C), and a 1-based list (labels 1..C, none 0) is refused with that diagnosis.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

__all__ = ["IMAGE_EXTENSIONS", "DataError", "ImageList", "Problem", "read_image_folder", "read_image_list"]

#: File endings ``read_image_folder`` takes as images (case-insensitive): what ``tf.io.decode_image`` reads.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
#: At most this many problems are listed in one ``DataError`` message (all are kept in ``.problems``).
MAX_LISTED = 20


@dataclass(frozen=True)
class Problem:
    """One bad entry: where it is (``file:line``, or the image path for a folder tree) and what is wrong."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class DataError(ValueError):
    """Bad training data, found before training starts: every problem names the file and line (``.problems``).

    Example:
    >>> error = DataError([Problem("list.txt:3", "label 7 is outside [0, 5)")])
    >>> print(error)
    list.txt:3: label 7 is outside [0, 5)
    """

    def __init__(self, problems: Sequence[Problem], summary: str | None = None):
        self.problems = list(problems)
        lines = [str(p) for p in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"... and {len(self.problems) - MAX_LISTED} more problems")
        if summary:
            lines.insert(0, summary)
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class ImageList:
    """Labelled images below one root folder.

    Attributes:
        root: the folder the paths are relative to.
        paths: each image's path relative to ``root`` ('/'-separated).
        labels: each image's class, in [0, num_classes).
        num_classes: C.
        source: the list file, or the root folder for a folder tree.
        lines: each image's line in ``source`` (1-based), or None for a folder tree.
        class_names: the folder names (label i is ``class_names[i]``), or None for a list file.
        allow_outside_root: whether paths may leave ``root`` (``check`` refuses them otherwise).
    """

    root: str
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    num_classes: int
    source: str
    lines: tuple[int, ...] | None = None
    class_names: tuple[str, ...] | None = None
    allow_outside_root: bool = field(default=False)

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self.samples)

    @property
    def samples(self) -> list[tuple[str, int]]:
        """(full path, label) per image, the full path being ``root`` joined with the relative one."""
        return [(self.full_path(i), label) for i, label in enumerate(self.labels)]

    def full_path(self, index: int) -> str:
        """``root`` joined with the ``index``-th path."""
        return os.path.join(self.root, self.paths[index])

    def where(self, index: int) -> str:
        """``source:line`` of the ``index``-th image (its full path for a folder tree)."""
        if self.lines is None:
            return self.full_path(index)
        return f"{self.source}:{self.lines[index]}"


def _leaves_root(path: str) -> str | None:
    """Why a list path (already '/'-separated) leaves its root folder, or None when it does not."""
    if path.startswith("/") or (len(path) > 1 and path[1] == ":" and path[0].isalpha()):
        return "is absolute"
    if ".." in path.split("/"):
        return "contains '..'"
    return None


def read_image_list(list_file: str | os.PathLike, root: str | os.PathLike | None = None, *,
                    num_classes: int | None = None, label_offset: int = 0,
                    allow_outside_root: bool = False) -> ImageList:
    """Read a Caffe ``ImageData`` list file: ``relative/path.jpg label`` per line.

    Blank lines are skipped; the label is the last whitespace-separated field (paths may contain spaces);
    backslashes in paths are read as '/'. Labels, after adding ``label_offset``, must lie in [0, C) with
    C = ``num_classes``, or max label + 1 when not given; without ``num_classes`` a list with no label 0 whose
    smallest label is 1 is refused as 1-based (pass ``label_offset=-1`` to shift it, or ``num_classes`` to
    accept a list that lacks class 0). Images are not opened here: ``check`` does that.

    Args:
        list_file: the list file (Caffe's ``image_data_param.source``).
        root: the folder paths are relative to (Caffe's ``root_folder``). Defaults to the list file's folder.
        num_classes: C, when known (e.g. from the training list for a validation list). Defaults to None.
        label_offset: added to every label (-1 turns a 1-based list 0-based). Defaults to 0.
        allow_outside_root: accept absolute paths and '..'. Defaults to False.

    Raises:
        DataError: naming ``list_file:line`` for each malformed line or bad label.

    Example:
    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     with open(os.path.join(tmp, "list.txt"), "w") as handle:
    ...         _ = handle.write("a/1.jpg 0\\nb/my face.jpg 1\\n")
    ...     images = read_image_list(os.path.join(tmp, "list.txt"))
    >>> images.paths, images.labels, images.num_classes
    (('a/1.jpg', 'b/my face.jpg'), (0, 1), 2)
    """
    list_file = os.fspath(list_file)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"read_image_list: num_classes must be a positive integer; got {num_classes!r}")
    root = os.path.dirname(os.path.abspath(list_file)) if root is None else os.fspath(root)
    try:
        with open(list_file, encoding="utf-8-sig") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise DataError([Problem(list_file, "no such list file")]) from None
    except UnicodeDecodeError as error:
        raise DataError([Problem(list_file, f"not a UTF-8 text list file ({error.reason} at byte "
                                            f"{error.start})")]) from None
    problems: list[Problem] = []
    paths: list[str] = []
    labels: list[int] = []
    lines: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        where = f"{list_file}:{number}"
        fields = line.rsplit(None, 1)
        if len(fields) != 2:
            problems.append(Problem(where, f"expected 'relative/path.jpg label', got {line!r}"))
            continue
        path, token = fields[0].strip().replace("\\", "/"), fields[1]
        try:
            label = int(token)
        except ValueError:
            problems.append(Problem(where, f"the label {token!r} is not an integer (line {line!r}; expected "
                                           f"'relative/path.jpg label')"))
            continue
        reason = None if allow_outside_root else _leaves_root(path)
        if reason is not None:
            problems.append(Problem(where, f"the path {path!r} {reason}: it leaves the root folder {root} (pass "
                                           f"allow_outside_root=True to accept it)"))
            continue
        paths.append(path)
        labels.append(label + label_offset)
        lines.append(number)
    if problems:
        raise DataError(problems, f"{list_file}: {len(problems)} malformed line(s)")
    if not paths:
        raise DataError([Problem(list_file, "the list file holds no images")])
    _check_labels(list_file, labels, lines, num_classes, label_offset)
    classes = num_classes if num_classes is not None else max(labels) + 1
    return ImageList(root=root, paths=tuple(paths), labels=tuple(labels), num_classes=classes, source=list_file,
                     lines=tuple(lines), allow_outside_root=allow_outside_root)


def _check_labels(list_file: str, labels: list[int], lines: list[int], num_classes: int | None,
                  label_offset: int) -> None:
    """Refuse labels outside [0, C) and (C not given) a 1-based list; each problem names its line."""
    shift = f" (after label_offset {label_offset})" if label_offset else ""
    smallest, largest = min(labels), max(labels)
    one_based = smallest == 1
    hint = (f"; the labels run {smallest}..{largest} with none 0: the list looks 1-based, while labels must be "
            f"0..C-1 (pass label_offset=-1 to shift them)") if one_based else ""
    if num_classes is not None:
        problems = [Problem(f"{list_file}:{line}", f"label {label}{shift} is outside [0, {num_classes})")
                    for label, line in zip(labels, lines) if not 0 <= label < num_classes]
        if problems:
            if one_based and largest == num_classes:
                problems[0] = Problem(problems[0].where, problems[0].message + hint)
            raise DataError(problems, f"{list_file}: {len(problems)} label(s) outside [0, {num_classes})")
        return
    negative = [Problem(f"{list_file}:{line}", f"label {label}{shift} is negative: labels must be in [0, C)")
                for label, line in zip(labels, lines) if label < 0]
    if negative:
        raise DataError(negative, f"{list_file}: {len(negative)} negative label(s)")
    if one_based:
        raise DataError([Problem(f"{list_file}:{lines[0]}",
                                 f"the labels{shift} run {smallest}..{largest} with none 0: the list looks 1-based, "
                                 f"while labels must be 0..C-1; pass label_offset=-1 to shift them (or "
                                 f"num_classes=C to accept a list without class 0)")])


def read_image_folder(root: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> ImageList:
    """Read a class-per-folder tree: ``root/<class>/**/<image>``; the sorted folder names get labels 0..C-1.

    Folders and files whose names start with '.' are skipped, as are files directly in ``root`` and files
    whose ending is not in ``extensions``; a class folder without images still takes its label.

    Example:
    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     for name in ("bob/1.png", "alice/1.png", "alice/2.jpg", "alice/notes.txt"):
    ...         os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
    ...         open(os.path.join(tmp, name), "wb").close()
    ...     images = read_image_folder(tmp)
    >>> images.class_names, images.paths, images.labels
    (('alice', 'bob'), ('alice/1.png', 'alice/2.jpg', 'bob/1.png'), (0, 0, 1))
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError([Problem(root, "no such folder")])
    endings = tuple(e.lower() for e in extensions)
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError([Problem(root, "no class folders: expected root/<class>/<image> (one folder per class)")])
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        found = []
        for directory, subdirectories, files in os.walk(folder, followlinks=True):
            subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
            relative = os.path.relpath(directory, root).replace(os.sep, "/")
            found.extend(f"{relative}/{file}" for file in files
                         if not file.startswith(".") and file.lower().endswith(endings))
        for path in sorted(found):
            paths.append(path)
            labels.append(label)
    if not paths:
        raise DataError([Problem(root, f"no images ({', '.join(endings)}) in the class folders")])
    return ImageList(root=root, paths=tuple(paths), labels=tuple(labels), num_classes=len(classes), source=root,
                     class_names=tuple(classes))
