"""Read stage, part 2: text .prototxt and binary .caffemodel files into schema messages and NumPy blobs.

``read_prototxt`` parses with protobuf's text format, lists unknown (fork-specific) fields instead of failing,
upgrades V1 / legacy-input nets to the current format, takes the inline net out of a solver file, and decides
which Caffe fork (dialect: "bvlc", "happynear", "sphereface") the net was written for; ``read_caffemodel``
indexes a caffemodel lazily.

Model files are data: nothing in them is executed, imported or unpickled. A caffemodel is never held in
memory whole: the top level of the NetParameter (one length-delimited entry per layer) is split by a small
tag reader, and each layer is parsed with protobuf (``LayerBlobs`` / ``V1LayerBlobs`` views) only when its
weights are asked for. Sizes a file claims (blob shapes, lengths) are checked against what it holds before
anything is allocated for them.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from google.protobuf import message as protobuf_message
from google.protobuf import text_format, unknown_fields

from converters.caffe import schema, upgrade
from converters.caffe.errors import ConversionError
from converters.caffe.writer import _varint  # the one protobuf varint encoder (re-encoding renumbered fields)

__all__ = [
    "MAX_CAFFEMODEL_BYTES",
    "MAX_PROTOTXT_BYTES",
    "MAX_PROTOTXT_NESTING",
    "MAX_UNKNOWN_FIELDS",
    "UnknownField",
    "CaffeNet",
    "CaffemodelLayer",
    "Caffemodel",
    "read_prototxt",
    "parse_prototxt",
    "read_caffemodel",
    "blob_shape",
    "detect_dialect",
    "DIALECTS",
    "field_default",
]

DIALECTS = schema.DIALECTS
field_default = schema.field_default

#: Caffe itself refuses binary protos above INT_MAX bytes (``io.cpp`` kProtoReadBytesLimit).
MAX_CAFFEMODEL_BYTES = 2**31 - 1
#: Text prototxts are network descriptions, a few hundred kB at most; anything this large is not one.
MAX_PROTOTXT_BYTES = 64 * 2**20
#: Deepest message nesting a prototxt may have (protobuf's own parsers default to 100; caffe.proto needs ~6).
MAX_PROTOTXT_NESTING = 100
#: Most fields unknown to caffe.proto a prototxt may hold (a fork's net has tens to hundreds); each is listed.
MAX_UNKNOWN_FIELDS = 10_000

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LEN, _WIRE_FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class UnknownField:
    """A prototxt field our schema does not know (another fork's field); it was skipped."""

    line: int
    path: str  # e.g. "layer[12].inner_product_param.foo"
    layer: str | None = None  # the layer's name, when the field is inside a layer

    def __str__(self) -> str:
        where = f"layer '{self.layer}', " if self.layer else ""
        return f"{where}line {self.line}: {self.path}"


@dataclass
class CaffeNet:
    """A parsed, upgraded network description: a current-format ``NetParameter`` plus what the read saw."""

    net: object  # schema.NetParameter, upgraded (layer entries only, legacy inputs as an Input layer)
    path: str = "<string>"
    source_format: str = "V2"  # "V2", "V1" (legacy ``layers``)
    unknown_fields: list[UnknownField] = field(default_factory=list)
    #: the Caffe fork whose caffe.proto the file follows: one of ``DIALECTS``; ask ``field_default(net, ...)``
    #: for a field's default in it
    dialect: str = "bvlc"
    #: how ``dialect`` was decided: "given" or the layer type / field that decided it
    dialect_reason: str = "no fork-specific layer type or field: BVLC caffe.proto"
    #: for a solver file: the solver field the net came from ("net_param", "train_net_param", ...), else None
    solver_net_field: str | None = None
    #: for a solver file: the ``stage`` list of each ``test_state`` (one per test net), else None
    solver_test_stages: list[list[str]] | None = None


# ----------------------------------------------------------------------------------------------------
# Text prototxt
# ----------------------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>[-+]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)[fF]?)
  | (?P<ident>[A-Za-z_][\w.]*)
  | (?P<punct>.)
    """,
    re.VERBOSE,
)


def _tokens(text: str) -> Iterator[tuple[str, str, int]]:
    line = 1
    for match in _TOKEN.finditer(text):
        kind, value = match.lastgroup, match.group()
        if kind not in ("space", "comment"):
            yield kind, value, line
        line += value.count("\n")


def _is_repeated(field_descriptor) -> bool:
    # ``is_repeated`` is protobuf >= 5.28; ``label`` is gone in protobuf 7.
    if hasattr(field_descriptor, "is_repeated"):
        return bool(field_descriptor.is_repeated)
    return field_descriptor.label == field_descriptor.LABEL_REPEATED


def _unknown_fields(text: str, descriptor, path: str = "<string>") -> list[tuple[int, str]]:
    """(line, dotted path) of every field name that ``descriptor``'s schema lacks, at any depth.

    protobuf's ``allow_unknown_field`` skips such fields silently; this scan exists to report them. It only
    tracks structure (names and braces); protobuf's parser remains the judge of syntax and values. Tokens are
    streamed (memory is the found list, bounded by ``MAX_UNKNOWN_FIELDS``, not the file's token count).
    """
    stream = _tokens(text)

    def take():
        return next(stream, None)

    found: list[tuple[int, str]] = []
    stack: list[tuple[object, str, dict]] = [(descriptor, "", {})]
    token = take()
    while token is not None:
        kind, value, line = token
        token = take()
        if value in ("}", ">"):
            if len(stack) > 1:
                stack.pop()
            continue
        if kind != "ident":
            continue
        desc, prefix, seen = stack[-1]
        fdesc = desc.fields_by_name.get(value) if desc is not None else None
        index = seen.get(value, 0)
        seen[value] = index + 1
        fpath = f"{prefix}.{value}" if prefix else value
        if fdesc is not None and _is_repeated(fdesc):
            fpath += f"[{index}]"
        if desc is not None and fdesc is None:
            if len(found) >= MAX_UNKNOWN_FIELDS:
                raise ConversionError(
                    f"{path}: more than {MAX_UNKNOWN_FIELDS:,} fields unknown to caffe.proto (the first at line "
                    f"{found[0][0]}: {found[0][1]}; line {line}: {fpath}); no Caffe fork's net has so many; "
                    "this is not a network description this converter can read"
                )
            found.append((line, fpath))
        if token is not None and token[1] == ":":
            token = take()
        if token is None:
            break
        opener = token[1]
        if opener in ("{", "<"):
            stack.append((fdesc.message_type if fdesc is not None else None, fpath, {}))
            token = take()
        elif opener == "[":
            depth = 0
            while token is not None:
                if token[1] in ("[", "{", "<"):
                    depth += 1
                elif token[1] in ("]", "}", ">"):
                    depth -= 1
                token = take()
                if depth == 0:
                    break
        else:
            if opener == "-":
                token = take()
            token = take()
            while token is not None and token[0] == "string":
                token = take()
    return found


def _layer_of(net, path: str, prefix: str = "") -> str | None:
    if prefix:
        if not path.startswith(prefix + "."):
            return None
        path = path[len(prefix) + 1:]
    match = re.match(r"(layers?)\[(\d+)\]", path)
    if match is None:
        return None
    entries = getattr(net, match.group(1))
    index = int(match.group(2))
    return entries[index].name if index < len(entries) else None


# ----------------------------------------------------------------------------------------------------
# Dialect: which fork's caffe.proto a net follows
# ----------------------------------------------------------------------------------------------------


def _fork_fields(message, prefix: str) -> Iterator[tuple[str, frozenset]]:
    """(dotted field path, dialects that declare it) of every fork-only field or enum value set in ``message``."""
    owner = message.DESCRIPTOR.name
    for fdesc, value in message.ListFields():
        if fdesc.name == "blobs":
            continue
        where = f"{prefix}{fdesc.name}"
        dialects = schema.FIELD_DIALECTS.get((owner, fdesc.name))
        if dialects is not None:
            yield where, dialects
        values = list(value) if _is_repeated(fdesc) else [value]
        if fdesc.message_type is not None:
            for item in values:
                yield from _fork_fields(item, where + ".")
        elif fdesc.enum_type is not None:
            for item in values:
                dialects = schema.ENUM_VALUE_DIALECTS.get((owner, fdesc.name, item))
                if dialects is not None:
                    yield f"{where}: {fdesc.enum_type.values_by_number[item].name}", dialects


def detect_dialect(net, unknown_fields: list[UnknownField] | tuple = ()) -> tuple[str, str]:
    """(dialect, reason): the fork whose caffe.proto a current-format ``NetParameter`` follows, from the layer
    types and fields only some forks have (``schema.LAYER_TYPE_DIALECTS``, ``FIELD_DIALECTS``).

    happynear-only types or fields (Flip, Normalize, ChannelScale, ``inner_product_param.normalize``,
    ``scale_param.min_value``...) mean "happynear"; MarginInnerProduct without them means "sphereface"
    (happynear has that layer too, at another field number); nothing fork-specific means "bvlc".
    """
    ssd_normalize = {u.layer for u in unknown_fields if u.path.endswith(".norm_param")}
    clues: list[tuple[str, frozenset]] = []
    for layer in net.layer:
        dialects = schema.LAYER_TYPE_DIALECTS.get(layer.type)
        if dialects is not None and not (layer.type == "Normalize" and layer.name in ssd_normalize):
            clues.append((f"layer '{layer.name}' is a {layer.type} layer", dialects))
        clues.extend((f"layer '{layer.name}' sets {where}", dialects) for where, dialects in _fork_fields(layer, ""))
    if not clues:
        return "bvlc", "no fork-specific layer type or field: BVLC caffe.proto"
    candidates = set(DIALECTS)
    for _, dialects in clues:
        candidates &= dialects
    if candidates:
        dialect = next(d for d in ("happynear", "sphereface", "bvlc") if d in candidates)
        if candidates == {"happynear", "sphereface"}:
            dialect = "sphereface"
        first = min((clue for clue in clues if dialect in clue[1]), key=lambda clue: len(clue[1]))[0]
        more = f" (and {len(clues) - 1} more)" if len(clues) > 1 else ""
        if dialect == "sphereface":
            return dialect, (f"{first}{more}, and nothing happynear-only: SphereFace's fork "
                             "(happynear numbers margin_inner_product_param 232, SphereFace 147)")
        return dialect, f"{first}{more}: {schema.DIALECT_SOURCES[dialect]}"
    votes = Counter(d for _, dialects in clues for d in dialects)
    preference = ("happynear", "sphereface", "bvlc")  # on a tie, the fork: its layers need its runtime
    dialect = max(preference, key=lambda d: (votes[d], -preference.index(d)))
    against = next(where for where, dialects in clues if dialect not in dialects)
    first = next(where for where, dialects in clues if dialect in dialects)
    return dialect, (f"conflicting clues: {first} ({votes[dialect]} of {len(clues)} clues) but {against}; "
                     f"chose {dialect}; pass dialect= to choose another")


def _resolve_dialect(net, unknown: list[UnknownField], dialect: str | None) -> tuple[str, str]:
    if dialect is not None:
        return schema.check_dialect(dialect), "given"
    return detect_dialect(net, unknown)


# ----------------------------------------------------------------------------------------------------
# Solver files
# ----------------------------------------------------------------------------------------------------

_NET_FIELDS = frozenset(schema.NetParameter.DESCRIPTOR.fields_by_name)
_SOLVER_ONLY_FIELDS = frozenset(schema.SolverParameter.DESCRIPTOR.fields_by_name) - _NET_FIELDS
#: SolverParameter's ways of naming the train net, in the order Caffe's ``Solver::InitTrainNet`` lists them.
_TRAIN_NET_FIELDS = ("train_net_param", "train_net", "net_param", "net")


def _top_level_names(text: str, path: str = "<string>") -> set[str]:
    """Field names at the outermost level of a text proto (values after ':' are not names).

    The same pass refuses nesting deeper than ``MAX_PROTOTXT_NESTING`` (braces in strings and comments do not
    count) before protobuf's recursive text parser sees it.
    """
    names, depth, previous = set(), 0, ""
    for kind, value, line in _tokens(text):
        if value in ("{", "<"):
            depth += 1
            if depth > MAX_PROTOTXT_NESTING:
                raise ConversionError(
                    f"{path}: line {line}: messages nested more than {MAX_PROTOTXT_NESTING} levels deep; "
                    f"caffe.proto's deepest are a few levels (solver > net > layer > param > filler), and "
                    "protobuf's parsers stop at 100: this is not a network description"
                )
        elif value in ("}", ">"):
            depth = max(depth - 1, 0)
        elif kind == "ident" and depth == 0 and previous != ":":
            names.add(value)
        previous = value
    return names


def _is_solver(text: str, path: str = "<string>") -> bool:
    names = _top_level_names(text, path)
    return bool(names & _SOLVER_ONLY_FIELDS) and not names & {"layer", "layers"}


def _parse_solver(text: str, path: str, dialect: str | None) -> CaffeNet:
    solver = schema.SolverParameter()
    found = _unknown_fields(text, solver.DESCRIPTOR, path)
    try:
        text_format.Parse(text, solver, allow_unknown_field=True)
    except text_format.ParseError as error:
        raise ConversionError(f"{path}: not a valid Caffe solver prototxt: {error}") from None
    given = [name for name in _TRAIN_NET_FIELDS if solver.HasField(name)]
    if len(given) > 1:
        raise ConversionError(
            f"{path}: this solver names its train net {len(given)} times ({', '.join(given)}); "
            "Caffe accepts exactly one of train_net_param, train_net, net_param, net"
        )
    inline = [name for name in given if name.endswith("_param")]
    if inline:
        net_field, net = inline[0], getattr(solver, inline[0])
    elif not given and len(solver.test_net_param) == 1 and not len(solver.test_net):
        net_field, net = "test_net_param[0]", solver.test_net_param[0]
    else:
        files = [(name, getattr(solver, name)) for name in ("net", "train_net") if solver.HasField(name)]
        files += [("test_net", name) for name in solver.test_net]
        if files:
            field_name, file_name = files[0]
            raise ConversionError(
                f"{path}: this is a Caffe solver, not a network; it names its net in a separate file "
                f"({field_name}: {file_name!r}); convert that prototxt instead "
                "(Caffe resolves the path from the directory it runs in)"
            )
        raise ConversionError(f"{path}: this is a Caffe solver that defines no net (no net_param or net)")
    unknown = [UnknownField(line, fpath, _layer_of(net, fpath, net_field)) for line, fpath in found]
    _refuse_v0(unknown, path)
    upgraded = upgrade.upgrade_net(net, path)
    chosen, reason = _resolve_dialect(upgraded, unknown, dialect)
    return CaffeNet(net=upgraded, path=path, source_format="V1" if len(net.layers) else "V2", unknown_fields=unknown,
                    dialect=chosen, dialect_reason=reason, solver_net_field=net_field,
                    solver_test_stages=[list(state.stage) for state in solver.test_state])


def _refuse_v0(unknown: list[UnknownField], path: str) -> None:
    v0_layers = sorted({u.layer or u.path for u in unknown if re.search(r"(?:^|\.)layers\[\d+\]\.layer$", u.path)})
    if v0_layers:
        raise ConversionError(
            f"{path}: this is a V0 (2013) net (layers with a nested 'layer' block, e.g. {v0_layers[0]!r}); "
            "upgrade it with Caffe's tools/upgrade_net_proto_text first"
        )


def parse_prototxt(text: str, path: str = "<string>", dialect: str | None = None) -> CaffeNet:
    """Parse prototxt ``text`` (a current or V1 net, or a solver with an inline net) into an upgraded ``CaffeNet``.

    ``dialect`` is the Caffe fork the file was written for, one of ``DIALECTS``; None detects it from the
    layer types and fields the file uses (``detect_dialect``). It decides fork-specific defaults
    (``field_default``), e.g. BatchNorm's ``moving_average_fraction``: 0.99 in happynear, 0.999 elsewhere.

    Example:
    >>> net = parse_prototxt('input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8 '
    ...                      'layer { name: "relu" type: "ReLU" bottom: "data" top: "data" foo: 1 }')
    >>> [layer.type for layer in net.net.layer], [f.path for f in net.unknown_fields], net.dialect
    (['Input', 'ReLU'], ['layer[0].foo'], 'bvlc')
    """
    if dialect is not None:
        dialect = schema.check_dialect(dialect)
    if _is_solver(text, path):  # also refuses absurd nesting, before protobuf's recursive parser
        return _parse_solver(text, path, dialect)
    net = schema.NetParameter()
    found = _unknown_fields(text, net.DESCRIPTOR, path)  # first: it refuses a flood of unknown fields cheaply
    try:
        text_format.Parse(text, net, allow_unknown_field=True)
    except text_format.ParseError as error:
        raise ConversionError(f"{path}: not a valid Caffe prototxt: {error}") from None
    unknown = [UnknownField(line, fpath, _layer_of(net, fpath)) for line, fpath in found]
    _refuse_v0(unknown, path)
    source_format = "V1" if len(net.layers) else "V2"
    upgraded = upgrade.upgrade_net(net, path)
    chosen, reason = _resolve_dialect(upgraded, unknown, dialect)
    return CaffeNet(net=upgraded, path=path, source_format=source_format, unknown_fields=unknown,
                    dialect=chosen, dialect_reason=reason)


def read_prototxt(path: str | os.PathLike, dialect: str | None = None) -> CaffeNet:
    """Read a text .prototxt (current ``layer`` or legacy V1 ``layers`` format) into a ``CaffeNet``.

    Fields of other Caffe forks are skipped and listed in ``unknown_fields``; the legacy net-level
    ``input``/``input_dim``/``input_shape`` declarations become an ``Input`` layer, as Caffe does. A solver
    file yields its inline ``net_param`` / ``train_net_param`` (and records ``solver_test_stages``); one that
    only names a net file is refused with that file's name. ``dialect``: see ``parse_prototxt``.

    Example:
    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     file = os.path.join(tmp, "net.prototxt")
    ...     _ = open(file, "w").write('layer { name: "data" type: "Input" top: "data" '
    ...                               'input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }')
    ...     read_prototxt(file).net.layer[0].input_param.shape[0].dim
    [1, 3, 8, 8]
    """
    path = os.fspath(path)
    size = _file_size(path, "prototxt")
    if size > MAX_PROTOTXT_BYTES:
        raise ConversionError(
            f"{path}: {size} bytes is far larger than any network description "
            f"(limit {MAX_PROTOTXT_BYTES}); is it a .caffemodel? The prototxt comes first, the weights second"
        )
    with open(path, "rb") as handle:
        data = handle.read()
    if b"\x00" in data[:4096]:
        raise ConversionError(
            f"{path}: this is a binary file, not a text prototxt; if it is the .caffemodel, "
            "pass the .prototxt first and the .caffemodel second"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return parse_prototxt(text, path, dialect)


def _file_size(path: str, what: str) -> int:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such {what} file") from None
    except OSError as error:
        raise ConversionError(f"{path}: cannot read the {what}: {error.strerror}") from None
    if not Path(path).is_file():
        raise ConversionError(f"{path}: not a regular file")
    return info.st_size


# ----------------------------------------------------------------------------------------------------
# Binary caffemodel
# ----------------------------------------------------------------------------------------------------


def _read_varint(handle: io.BufferedReader, end: int, path: str) -> int:
    result = shift = 0
    while True:
        if handle.tell() >= end:
            raise ConversionError(f"{path}: truncated caffemodel (a field header runs past the end of its message)")
        byte = handle.read(1)[0]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ConversionError(f"{path}: not a Caffe caffemodel (malformed varint)")


def _scan_fields(handle, start: int, end: int, path: str) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field number, wire type, value offset, value length or varint value) of one message."""
    handle.seek(start)
    while handle.tell() < end:
        key = _read_varint(handle, end, path)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ConversionError(f"{path}: not a Caffe caffemodel (field number 0 at byte {handle.tell()})")
        if wire == _WIRE_VARINT:
            yield number, wire, handle.tell(), _read_varint(handle, end, path)
            continue
        if wire == _WIRE_LEN:
            length = _read_varint(handle, end, path)
        elif wire == _WIRE_FIXED64:
            length = 8
        elif wire == _WIRE_FIXED32:
            length = 4
        else:
            raise ConversionError(
                f"{path}: not a Caffe caffemodel (wire type {wire} at byte {handle.tell()}; Caffe files use 0, 1, 2, 5)"
            )
        offset = handle.tell()
        if offset + length > end:
            raise ConversionError(
                f"{path}: truncated caffemodel: a field at byte {offset} claims {length} bytes, "
                f"only {end - offset} remain"
            )
        yield number, wire, offset, length
        handle.seek(offset + length)


@dataclass(frozen=True)
class CaffemodelLayer:
    """Where one layer's message lies in a caffemodel, and its name and type."""

    name: str
    type: str
    offset: int
    length: int
    v1: bool
    #: the layer message's top-level field numbers (which *_param fields the writer's fork filled in)
    field_numbers: tuple[int, ...] = ()


def blob_shape(blob) -> tuple[int, ...]:
    """A ``BlobProto``'s shape: the legacy (num, channels, height, width) when any is set, else ``shape.dim``."""
    if any(blob.HasField(name) for name in ("num", "channels", "height", "width")):
        return (blob.num, blob.channels, blob.height, blob.width)
    return tuple(blob.shape.dim)


#: NVIDIA Caffe's ``raw_data_type`` values (OpenCV's caffe.proto ``Type``) that convert: FLOAT16 and FLOAT, which
#: OpenCV reads too, and DOUBLE, which NVIDIA Caffe writes for Blob<double> (OpenCV refuses it; reading it is
#: exact). INT (3) and UINT (4) are not weights.
_RAW_DTYPES = {0: "<f8", 1: "<f4", 2: "<f2"}
_RAW_TYPE_FIELD = 10  # BlobProto.raw_data_type


def _raw_dtype(blob, where: str, path: str) -> str:
    """The NumPy dtype of a blob's ``raw_data``, from a ``raw_data_type`` the file states.

    A value outside the enum (proto2 keeps it among the unknown fields, and the getter then answers DOUBLE) and
    an unset type (the field's default, DOUBLE, is what no writer means: NVIDIA Caffe always writes it; OpenCV
    refuses both) are refused rather than read with a guessed width.
    """
    if not blob.HasField("raw_data_type"):
        stray = [item.data for item in unknown_fields.UnknownFieldSet(blob) if item.field_number == _RAW_TYPE_FIELD]
        if stray:
            raise ConversionError(
                f"{path}: {where} stores raw_data of raw_data_type {stray[-1]}, which is not in caffe.proto's "
                "BlobProto.Type (DOUBLE 0, FLOAT 1, FLOAT16 2, INT 3, UINT 4); the file is corrupt or comes from "
                "a writer this converter does not know"
            )
        raise ConversionError(
            f"{path}: {where} stores raw_data without a raw_data_type, so the width of its values is unknown "
            "(NVIDIA Caffe always writes the type; OpenCV refuses such a blob too); re-save the caffemodel"
        )
    dtype = _RAW_DTYPES.get(blob.raw_data_type)
    if dtype is None:
        raise ConversionError(
            f"{path}: {where} stores raw_data of type {blob.raw_data_type} (integer); only float blobs convert"
        )
    return dtype


def _blob_values(blob, where: str, path: str):
    """(number of values, getter) of a blob's stored data, without converting it."""
    if len(blob.double_data):
        return len(blob.double_data), lambda: np.asarray(blob.double_data, dtype=np.float64)
    if len(blob.data):
        return len(blob.data), lambda: np.asarray(blob.data, dtype=np.float32)
    if blob.HasField("raw_data"):
        dtype = _raw_dtype(blob, where, path)
        itemsize = np.dtype(dtype).itemsize
        if len(blob.raw_data) % itemsize:
            raise ConversionError(f"{path}: {where}: raw_data length is not a multiple of {itemsize}")
        return len(blob.raw_data) // itemsize, lambda: np.frombuffer(blob.raw_data, dtype=dtype)
    return 0, lambda: np.zeros(0, dtype=np.float32)


class Caffemodel:
    """A binary .caffemodel opened for reading: a name -> layer index, weights read on demand.

    Layers are matched by name only, as Caffe's ``CopyTrainedLayersFrom`` does; where several layers share a
    name the last one wins (it is the one Caffe copies last).

    Example:
    >>> import tempfile, os, numpy as np
    >>> from converters.caffe.writer import write_caffemodel
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     file = os.path.join(tmp, "w.caffemodel")
    ...     _ = write_caffemodel(file, [("fc", "InnerProduct", [np.ones((2, 3), "float32")])])
    ...     model = read_caffemodel(file)
    ...     [blob.shape for blob in model.blobs("fc")]
    [(2, 3)]
    """

    def __init__(self, path: str, layers: list[CaffemodelLayer], size: int, source_format: str,
                 dialect: str | None = None):
        self.path = path
        self.layers = layers
        self.size = size
        self.source_format = source_format
        if dialect is None:
            self.dialect, self.dialect_reason = _caffemodel_dialect(layers)
        else:
            self.dialect, self.dialect_reason = schema.check_dialect(dialect), "given"
        self._by_name = {layer.name: layer for layer in layers}
        counts = Counter(layer.name for layer in layers)
        self.duplicate_names = sorted(name for name, count in counts.items() if count > 1)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def _message(self, name: str):
        entry = self._by_name[name]
        with open(self.path, "rb") as handle:
            handle.seek(entry.offset)
            raw = handle.read(entry.length)
        if len(raw) != entry.length:
            raise ConversionError(f"{self.path}: the file changed while reading layer '{name}'")
        message_type = schema.V1LayerBlobs if entry.v1 else schema.LayerBlobs
        try:
            return message_type.FromString(raw)
        except protobuf_message.DecodeError as error:
            raise ConversionError(f"{self.path}: layer '{name}' is corrupt in the caffemodel: {error}") from None

    def _checked_blobs(self, name: str):
        message = self._message(name)
        checked = []
        for index, blob in enumerate(message.blobs):
            where = f"blob {index} of layer '{name}'"
            shape = blob_shape(blob)
            if any(dim < 0 for dim in shape):
                raise ConversionError(f"{self.path}: {where} has a negative dimension {shape}")
            claimed = math.prod(shape)
            held, getter = _blob_values(blob, where, self.path)
            if claimed != held:
                raise ConversionError(
                    f"{self.path}: {where} claims shape {shape} ({claimed} values) but holds {held} values; "
                    "the file is corrupt or truncated"
                )
            checked.append((shape, getter))
        return checked

    def blob_shapes(self, name: str) -> list[tuple[int, ...]]:
        """Shapes of layer ``name``'s blobs as stored (legacy 4-D dims included), checked against their data."""
        return [shape for shape, _ in self._checked_blobs(name)]

    def blobs(self, name: str) -> list[np.ndarray]:
        """Layer ``name``'s blobs as float32 arrays in their stored shapes (Caffe layout)."""
        return [getter().astype(np.float32, copy=False).reshape(shape) for shape, getter in self._checked_blobs(name)]

    def layer_parameter(self, name: str, dialect: str | None = None):
        """Layer ``name``'s hyper-parameters as stored, as a current-format ``LayerParameter`` without its blobs
        (use ``blobs`` for the weights).

        The bytes are read with the numbering of ``dialect`` (default: this file's ``dialect``), renumbered to
        this schema's (``schema.WIRE_RENUMBERING``) and checked field by field: a field whose wire type is
        not the one the dialect's caffe.proto declares raises a ``ConversionError`` naming the field and the
        dialect that numbers it differently.
        """
        dialect = self.dialect if dialect is None else schema.check_dialect(dialect)
        entry = self._by_name[name]
        with open(self.path, "rb") as handle:
            handle.seek(entry.offset)
            raw = handle.read(entry.length)
        message_type = schema.V1LayerParameter if entry.v1 else schema.LayerParameter
        context = _WireContext(self.path, name, dialect)
        data = _renumbered(raw, message_type.DESCRIPTOR, context, chain=(), top=True)
        try:
            message = message_type.FromString(data)
        except protobuf_message.DecodeError as error:
            raise ConversionError(f"{self.path}: layer '{name}' is corrupt in the caffemodel: {error}") from None
        return upgrade.upgrade_v1_layer(message, self.path) if entry.v1 else message


#: LayerParameter numbers only happynear declares (bn_param 200 .. label_specific_add_param 241, mil 'MID'/'MIL').
_HAPPYNEAR_LAYER_NUMBERS = frozenset(range(200, 242)) | {0x004D4944, 0x004D494C}
#: V1LayerParameter numbers only happynear declares (bn_param 43 .. noise_param 51).
_HAPPYNEAR_V1_NUMBERS = frozenset(range(43, 52))


def _caffemodel_dialect(layers: list[CaffemodelLayer]) -> tuple[str, str]:
    """(dialect, reason) from the *_param field numbers the layers carry: 147 in a MarginInnerProduct layer is
    SphereFace's, 200-241 are happynear's, 147 (Swish) / 148 (Clip) elsewhere are BVLC's."""
    for layer in layers:
        numbers = set(layer.field_numbers)
        if layer.v1:
            if numbers & _HAPPYNEAR_V1_NUMBERS or layer.type in ("BN", "Normalize", "TripletLoss", "BatchNorm"):
                return "happynear", f"V1 layer '{layer.name}' uses happynear's V1 fields or types"
            continue
        if 147 in numbers and layer.type == "MarginInnerProduct":
            return "sphereface", f"layer '{layer.name}' (MarginInnerProduct) stores its parameters at field 147"
        found = sorted(numbers & _HAPPYNEAR_LAYER_NUMBERS)
        if found:
            return "happynear", f"layer '{layer.name}' ({layer.type}) has field {found[0]}, a happynear *_param"
        if numbers & {147, 148}:
            return "bvlc", f"layer '{layer.name}' ({layer.type}) has field {min(numbers & {147, 148})} (swish/clip)"
    return "bvlc", "no fork-specific layer parameter numbers: BVLC caffe.proto"


_WIRE_NAMES = {0: "varint", 1: "64-bit", 2: "length-delimited", 5: "32-bit"}
_F = schema.descriptor_pb2.FieldDescriptorProto


def _wire_types(fdesc) -> tuple[int, ...]:
    """The wire types a field of this descriptor may arrive with (repeated scalars: also packed)."""
    if fdesc.type in (_F.TYPE_MESSAGE, _F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_GROUP):
        return (_WIRE_LEN,)
    if fdesc.type in (_F.TYPE_FLOAT, _F.TYPE_FIXED32, _F.TYPE_SFIXED32):
        wire = _WIRE_FIXED32
    elif fdesc.type in (_F.TYPE_DOUBLE, _F.TYPE_FIXED64, _F.TYPE_SFIXED64):
        wire = _WIRE_FIXED64
    else:
        wire = _WIRE_VARINT
    return (wire, _WIRE_LEN) if _is_repeated(fdesc) else (wire,)


@dataclass(frozen=True)
class _WireContext:
    path: str
    layer: str
    dialect: str


def _meaning(dialect: str, message_name: str, number: int) -> str:
    target = schema.WIRE_RENUMBERING[dialect].get((message_name, number), number)
    if target is None:
        return "a training-only field"
    fdesc = schema.message_class(message_name).DESCRIPTOR.fields_by_number.get(target)
    if fdesc is None or dialect not in schema.FIELD_DIALECTS.get((message_name, fdesc.name), DIALECTS):
        return "no field"
    return fdesc.name


def _other_meanings(chain: tuple[tuple[str, int], ...], dialect: str) -> str:
    """Where another dialect numbers one of ``chain``'s (message, number) fields differently, in words."""
    hints = []
    for message_name, number in chain:
        here = _meaning(dialect, message_name, number)
        for other in DIALECTS:
            there = _meaning(other, message_name, number)
            if other != dialect and there not in (here, "no field"):
                hints.append(f"{other}'s caffe.proto uses {message_name} field {number} for {there}; "
                             f"read it with dialect={other!r}")
    return "; ".join(hints)


def _renumbered(data: bytes, descriptor, context: _WireContext, chain: tuple, top: bool = False) -> bytes:
    """``data`` (one message of type ``descriptor`` in ``context.dialect``'s numbering) in this schema's numbering,
    blobs left out, every known field's wire type checked."""
    table = schema.WIRE_RENUMBERING[context.dialect]
    handle = io.BytesIO(data)
    out = bytearray()
    unknown = []
    for number, wire, offset, value in _scan_fields(handle, 0, len(data), context.path):
        end = handle.tell() if wire == _WIRE_VARINT else offset + value
        body = data[offset:end] if wire != _WIRE_LEN else data[offset:offset + value]
        key = (descriptor.name, number)
        target = table.get(key, number)
        if target is None:
            continue
        fdesc = descriptor.fields_by_number.get(target)
        if fdesc is None:
            unknown.append(number)
            out += _varint(number << 3 | wire) + (_varint(value) if wire == _WIRE_LEN else b"") + body
            continue
        if top and fdesc.name == "blobs":
            continue
        here = (*chain, key)
        where = ".".join(schema.message_class(name).DESCRIPTOR.fields_by_number[table.get((name, n), n)].name
                         for name, n in here)
        meanings = {_meaning(other, *key) for other in DIALECTS} - {"no field"}
        if _meaning(context.dialect, *key) == "no field" and len(meanings) > 1:
            raise ConversionError(
                f"{context.path}: layer '{context.layer}': field {number} of {descriptor.name} is not in "
                f"{context.dialect}'s caffe.proto, and other forks disagree on what it is; "
                f"{_other_meanings(here, context.dialect)}"
            )
        if wire not in _wire_types(fdesc):
            hint = _other_meanings(here, context.dialect) or (
                "the file may come from a Caffe fork this converter does not know, or be corrupt")
            raise ConversionError(
                f"{context.path}: layer '{context.layer}': {where} (field {number}) arrives with wire type {wire} "
                f"({_WIRE_NAMES.get(wire, '?')}), but {context.dialect}'s caffe.proto declares "
                f"{descriptor.name}.{fdesc.name} with wire type {_wire_types(fdesc)[0]}; {hint}"
            )
        if fdesc.type == _F.TYPE_MESSAGE:
            body = _renumbered(body, fdesc.message_type, context, here)
            out += _varint(target << 3 | wire) + _varint(len(body)) + body
        else:
            out += _varint(target << 3 | wire) + (_varint(value) if wire == _WIRE_LEN else b"") + body
    if unknown and chain and _other_meanings(chain, context.dialect):
        raise ConversionError(
            f"{context.path}: layer '{context.layer}': {descriptor.name} holds fields {sorted(set(unknown))} that "
            f"{context.dialect}'s caffe.proto does not declare; {_other_meanings(chain, context.dialect)}"
        )
    return bytes(out)


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    printable = sum(32 <= byte < 127 or byte in (9, 10, 13) for byte in head)
    return printable / len(head) > 0.95


def read_caffemodel(path: str | os.PathLike, dialect: str | None = None) -> Caffemodel:
    """Index a binary .caffemodel (current ``layer`` or V1 ``layers`` format) without loading its weights.

    ``dialect`` (one of ``DIALECTS``) is the fork that wrote it; None detects it from the *_param field numbers
    the layers carry. It matters only for ``Caffemodel.layer_parameter``: weights are read by name, type and
    blobs, which every fork numbers alike. Raises ``ConversionError`` for a missing, oversized, truncated or
    foreign file.
    """
    if dialect is not None:
        dialect = schema.check_dialect(dialect)
    path = os.fspath(path)
    size = _file_size(path, "caffemodel")
    if size > MAX_CAFFEMODEL_BYTES:
        raise ConversionError(
            f"{path}: {size} bytes exceeds the 2 GiB that Caffe itself can read (kProtoReadBytesLimit); "
            "it is not a caffemodel Caffe wrote"
        )
    with open(path, "rb") as handle:
        head = handle.read(512)
        if _looks_like_text(head):
            raise ConversionError(
                f"{path}: this is a text file, not a binary caffemodel; if it is the .prototxt, "
                "pass it first and the .caffemodel second"
            )
        layers: list[CaffemodelLayer] = []
        kinds = set()
        for number, wire, offset, length in _scan_fields(handle, 0, size, path):
            if number in (100, 2) and wire == _WIRE_LEN:
                kinds.add(number)
                resume = offset + length
                layers.append(_index_layer(handle, offset, length, v1=number == 2, path=path))
                handle.seek(resume)
            else:
                _check_net_field(number, wire, path)
    if not layers:
        raise ConversionError(f"{path}: not a Caffe caffemodel (it holds no layers)")
    if kinds == {100, 2}:
        raise ConversionError(
            f"{path}: the caffemodel mixes current 'layer' and V1 'layers' entries, which Caffe refuses"
        )
    return Caffemodel(path, layers, size, "V1" if kinds == {2} else "V2", dialect)


def _check_net_field(number: int, wire: int, path: str) -> None:
    """Refuse a top-level field (other than a layer) that caffe.proto's NetParameter lacks, or that arrives with
    another wire type than the one it declares (a layer entry, 100 / 2, that is not length-delimited included)."""
    fdesc = schema.NetParameter.DESCRIPTOR.fields_by_number.get(number)
    if fdesc is None:
        raise ConversionError(
            f"{path}: not a Caffe caffemodel (top-level field {number} is not in caffe.proto's NetParameter)"
        )
    expected = _wire_types(fdesc)
    if wire not in expected:
        raise ConversionError(
            f"{path}: not a Caffe caffemodel: NetParameter field {number} ({fdesc.name}) has the wrong wire type "
            f"{wire} ({_WIRE_NAMES.get(wire, '?')}); caffe.proto declares {fdesc.name} with wire type "
            f"{expected[0]} ({_WIRE_NAMES[expected[0]]}); the file is corrupt or not a caffemodel"
        )


def _index_layer(handle, offset: int, length: int, v1: bool, path: str) -> CaffemodelLayer:
    name_field, type_field = (4, 5) if v1 else (1, 2)
    name, layer_type = None, ""
    numbers = set()
    for number, wire, value_offset, value in _scan_fields(handle, offset, offset + length, path):
        numbers.add(number)
        if v1 and number == 1 and wire == _WIRE_LEN:
            raise ConversionError(
                f"{path}: this is a V0 (2013) caffemodel; upgrade it with Caffe's tools/upgrade_net_proto_binary first"
            )
        if number == name_field and wire == _WIRE_LEN:
            position = handle.tell()
            handle.seek(value_offset)
            name = handle.read(value).decode("utf-8", errors="replace")
            handle.seek(position)
        elif number == type_field:
            if v1 and wire == _WIRE_VARINT:
                layer_type = schema.V1_LAYER_TYPES.get(value, f"V1 type {value}")
            elif not v1 and wire == _WIRE_LEN:
                position = handle.tell()
                handle.seek(value_offset)
                layer_type = handle.read(value).decode("utf-8", errors="replace")
                handle.seek(position)
    if name is None:
        raise ConversionError(f"{path}: not a Caffe caffemodel (a layer at byte {offset} has no name)")
    return CaffemodelLayer(name=name, type=layer_type, offset=offset, length=length, v1=v1,
                           field_numbers=tuple(sorted(numbers)))
