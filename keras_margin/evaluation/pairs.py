"""LFW-style pairs files: ``pairs.txt`` (View 2, header ``10 300``), View 1's ``pairsDevTest.txt`` (header ``500``)
and header-less lists, parsed into image-path pairs with their fold; every error names the file and the line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["Pair", "PairsFileError", "parse_pairs", "read_pairs", "image_paths", "VIEW1_FOLDS"]

# A single-set file (View 1, or a header-less list with one matched run and one mismatched run) is split
# into this many folds by position inside each run, so the 10-fold protocol still applies.
VIEW1_FOLDS = 10


class PairsFileError(ValueError):
    """A pairs file or images folder the protocol cannot use; the message names the file and the line."""


@dataclass(frozen=True)
class Pair:
    """One verification pair: two image paths relative to the images folder, same person or not, its fold.

    ``line`` is the 1-based line of the pairs file the pair comes from (for error messages).
    """

    first: str
    second: str
    same: bool
    fold: int
    line: int


def _is_number(text: str) -> bool:
    """At most 9 ASCII digits: ``str.isdigit`` also takes "²" (which ``int`` refuses) and Arabic-Indic digits,
    and ``int`` refuses more than 4,300 digits."""
    return text.isascii() and text.isdigit() and len(text) <= 9


def _check_name(name: str, where: str) -> None:
    """A person name is one folder inside the images folder: no separator, no "." / "..", nothing absolute."""
    if name in (".", "..") or any(c in name for c in "/\\\0:") or name != name.strip():
        raise PairsFileError(f"{where}: person name {name!r} is not a folder name inside the images folder "
                             "(no '/', '\\', ':', '.' or '..'); the pairs file may only name folders in it")


def _image(name: str, number: str, ext: str, where: str) -> str:
    _check_name(name, where)
    if not _is_number(number) or int(number) < 1:
        why = " (at most 9 ASCII digits 0-9)" if number.isdigit() else ""
        raise PairsFileError(f"{where}: image number {number!r} is not a positive integer{why}")
    return f"{name}/{name}_{int(number):04d}.{ext}"


def _pair_line(fields: list[str], ext: str, where: str) -> tuple[str, str, bool]:
    if len(fields) == 3:
        name, first, second = fields
        return _image(name, first, ext, where), _image(name, second, ext, where), True
    if len(fields) == 4:
        name1, first, name2, second = fields
        return _image(name1, first, ext, where), _image(name2, second, ext, where), False
    raise PairsFileError(
        f"{where}: expected 'name n1 n2' (same person) or 'name1 n1 name2 n2' (different people); "
        f"got {len(fields)} field(s): {' '.join(fields)!r}"
    )


def _header(fields: list[str]) -> tuple[int, int] | None:
    """(sets, pairs per set) from a header line, None if the line is a pair line."""
    if len(fields) in (1, 2) and all(_is_number(field) for field in fields):
        numbers = [int(field) for field in fields]
        return (numbers[0], numbers[1]) if len(numbers) == 2 else (1, numbers[0])
    return None


def parse_pairs(lines: Iterable[str], source: str = "pairs.txt", ext: str = "jpg") -> list[Pair]:
    """Parse the lines of an LFW pairs file into ``Pair`` objects.

    Layouts (fields separated by tabs or spaces; blank lines ignored):
    ```
    10  300                 View 2 (pairs.txt): S sets, each N same-person lines then N different-person lines
    500                     View 1 (pairsDevTrain/DevTest.txt): one set of N + N lines
    (no header)             sets are the runs: same-person lines followed by different-person lines
    Abel_Pacheco 1 4        same person:       <name>/<name>_0001.<ext> and <name>/<name>_0004.<ext>
    Abdel_Madi 1 Dean 3     different people:  <name1>/<name1>_0001.<ext> and <name2>/<name2>_0003.<ext>
    ```
    Each set of a multi-set file is one fold. A single-set file is split into ``VIEW1_FOLDS`` (10) folds by
    position inside each run, so every fold holds both kinds of pair.

    Args:
        lines: the file's lines.
        source: the file name used in error messages (default "pairs.txt").
        ext: the image file extension (default "jpg").

    Raises:
        PairsFileError: a malformed line, a count that does not match the header, or no pairs; the message
            starts with ``source:line``.

    Example:
    >>> pairs = parse_pairs(["1 1", "Ann 1 2", "Ann 1 Bob 3"])
    >>> [(p.first, p.second, p.same, p.fold) for p in pairs]
    [('Ann/Ann_0001.jpg', 'Ann/Ann_0002.jpg', True, 0), ('Ann/Ann_0001.jpg', 'Bob/Bob_0003.jpg', False, 0)]
    """
    # A UTF-8 byte-order mark (Windows editors write one) is not part of the first line.
    numbered = [(number, (line.removeprefix("\ufeff") if number == 1 else line).split())
                for number, line in enumerate(lines, start=1)]
    numbered = [(number, fields) for number, fields in numbered if fields]
    if not numbered:
        raise PairsFileError(f"{source}: the file holds no pairs")
    header = _header(numbered[0][1])
    body = numbered[1:] if header is not None else numbered
    if header is not None and header[0] * header[1] == 0:
        raise PairsFileError(f"{source}:{numbered[0][0]}: the header announces no pairs: "
                             f"{' '.join(numbered[0][1])!r}")
    first_fields = numbered[0][1]
    if header is None and (len(first_fields) in (1, 2) or all(field.isdigit() for field in first_fields)):
        if any(field.isdigit() and not _is_number(field) for field in first_fields):
            raise PairsFileError(f"{source}:{numbered[0][0]}: the header {' '.join(first_fields)!r} holds a digit that "
                                 "is not ASCII 0-9; write the counts with ASCII digits, e.g. '10 300'")
        raise PairsFileError(
            f"{source}:{numbered[0][0]}: expected a header 'sets pairs_per_set' (e.g. '10 300'), 'pairs' (View 1, "
            f"e.g. '500') or a pair line; got {' '.join(numbered[0][1])!r}"
        )

    # Parse every line, then group into runs: a set is a run of same-person lines and a run of
    # different-person lines.
    parsed = []
    for number, fields in body:
        first, second, same = _pair_line(fields, ext, f"{source}:{number}")
        parsed.append((number, first, second, same))
    runs: list[list[tuple[int, str, str, bool]]] = []
    for item in parsed:
        if not runs or runs[-1][-1][3] != item[3]:
            runs.append([])
        runs[-1].append(item)

    if header is not None:
        sets, per_set = header
        _check_against_header(parsed, sets, per_set, source, numbered[0][0])
    elif len(runs) % 2 or not runs[0][0][3]:
        bad = runs[0][0] if not runs[0][0][3] else runs[-1][-1]
        raise PairsFileError(
            f"{source}:{bad[0]}: without a header each set must be a run of same-person lines followed by a run "
            "of different-person lines; this file starts or ends with an unpaired run"
        )

    pairs: list[Pair] = []
    set_count = len(runs) // 2
    for set_index in range(set_count):
        for run in runs[2 * set_index: 2 * set_index + 2]:
            for position, (number, first, second, same) in enumerate(run):
                fold = set_index if set_count > 1 else position * VIEW1_FOLDS // len(run)
                pairs.append(Pair(first, second, same, fold, number))
    return pairs


def _check_against_header(parsed, sets: int, per_set: int, source: str, header_line: int) -> None:
    expected = 2 * sets * per_set
    for index, (number, _, _, same) in enumerate(parsed[:expected]):
        set_index, position = divmod(index, 2 * per_set)
        should_be_same = position < per_set
        if same != should_be_same:
            kind = "same-person ('name n1 n2')" if should_be_same else "different-person ('name1 n1 name2 n2')"
            raise PairsFileError(
                f"{source}:{number}: the header (line {header_line}) announces {sets} set(s) of {per_set} "
                f"same-person then {per_set} different-person pairs, so line {number} (set {set_index + 1}, "
                f"pair {position + 1}) must be a {kind} pair"
            )
    if len(parsed) < expected:
        last = parsed[-1][0] if parsed else header_line
        raise PairsFileError(
            f"{source}:{last}: the header (line {header_line}) announces {sets} x ({per_set} + {per_set}) = "
            f"{expected} pairs but the file ends after {len(parsed)}"
        )
    if len(parsed) > expected:
        raise PairsFileError(
            f"{source}:{parsed[expected][0]}: the header (line {header_line}) announces {expected} pairs; "
            "this line is one too many"
        )


def read_pairs(path: str | os.PathLike, ext: str = "jpg") -> list[Pair]:
    """Read an LFW pairs file (see ``parse_pairs`` for the layouts).

    Example:
    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "pairs.txt")
    ...     _ = open(path, "w").write("2\\t1\\nAnn\\t1\\t2\\nAnn\\t1\\tBob\\t1\\nCy\\t2\\t3\\nCy\\t1\\tDan\\t4\\n")
    ...     pairs = read_pairs(path)
    >>> [(p.same, p.fold, p.line) for p in pairs]
    [(True, 0, 2), (False, 0, 3), (True, 1, 4), (False, 1, 5)]
    """
    path = Path(path)
    if not path.is_file():
        raise PairsFileError(f"{path}: no such pairs file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is accepted
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise PairsFileError(f"{path}:{line}: not UTF-8 text; is this a pairs file?") from None
    return parse_pairs(text.splitlines(), source=str(path), ext=ext)


def image_paths(pairs: Sequence[Pair], images_dir: str | os.PathLike, source: str = "pairs.txt") -> list[Path]:
    """The distinct image files the pairs use, in first-use order, after checking that each exists.

    Every image must lie inside ``images_dir`` once links are resolved: a person folder (or image) that is a
    symbolic link pointing outside it is refused, as a name that leaves it is by ``parse_pairs``.

    Raises:
        PairsFileError: naming the line of the first pair whose image is missing or lies outside the folder.

    Example:
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = pathlib.Path(tmp, "Ann").mkdir()
    ...     _ = pathlib.Path(tmp, "Ann", "Ann_0001.jpg").write_bytes(b"")
    ...     image_paths(parse_pairs(["1 1", "Ann 1 2", "Ann 1 Bob 1"]), tmp)
    Traceback (most recent call last):
    ...
    keras_margin.evaluation.pairs.PairsFileError: pairs.txt:2: image 'Ann/Ann_0002.jpg' is not in ...
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise PairsFileError(f"{images_dir}: no such images folder")
    root = images_dir.resolve()
    seen: dict[str, Path] = {}
    for pair in pairs:
        for relative in (pair.first, pair.second):
            if relative in seen:
                continue
            path = images_dir / relative
            if not path.is_file():
                raise PairsFileError(f"{source}:{pair.line}: image {relative!r} is not in {images_dir} "
                                     f"(expected {path})")
            target = path.resolve()
            if not target.is_relative_to(root):
                raise PairsFileError(f"{source}:{pair.line}: image {relative!r} resolves to {target}, outside the "
                                     f"images folder {root} (a symbolic link out of it); copy the images into the "
                                     "folder instead")
            seen[relative] = path
    return list(seen.values())
