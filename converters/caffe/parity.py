"""Verify stage: run the converted model and a reference on the same inputs and compare every blob.

References: OpenCV's own Caffe importer (``cv2.dnn.readNetFromCaffe``) on the planned net and the same
caffemodel, with the fork layers it lacks registered as Python layers; or blobs dumped from real Caffe
into an ``.npz`` (read with ``allow_pickle=False`` after checking every array's claimed size).

In TRAIN the layers that read the label run their TRAIN forward on both sides, on seeded class ids (or the
caller's ``labels=``): OpenCV through NumPy stand-ins of the fork's C++ fed the label, the model with its label
layers in their training forward (``label_layers.training_forward``, counters untouched) and everything else
at inference; and each fused head's margin logits, ``head([x, labels], training=True)`` (its state restored),
are compared with the top of the last Caffe layer of its chain (a row named after that blob).

Without a caffemodel, the OpenCV check runs on the net's initial weights: drawn from the prototxt fillers in
Caffe layout (``writer.filler_blobs``), written to a temporary caffemodel, and the model converted from it,
so both sides hold the same weights. An OpenCV failure (``cv2.error``) becomes a one-line ``ConversionError``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from google.protobuf import text_format

from converters.caffe import registry, schema
from converters.caffe.builder import Conversion, convert
from converters.caffe.errors import ConversionError
from converters.caffe.handlers import DATA_LAYER_TYPES
from converters.caffe.handlers.face import LABEL_FREE_SUFFIX, layer_phase
from converters.caffe.planner import TRAINING_ONLY_TYPES, Plan, plan_net
from converters.caffe.reader import CaffeNet, read_prototxt
from converters.caffe.stand_ins import NotRun, stand_in_type

__all__ = ["BlobParity", "ParityReport", "parity_report", "opencv_reference", "load_reference_npz",
           "opencv_prototxt", "check_reference", "initial_weights_caffemodel", "MAX_NPZ_BYTES", "FILLER_WEIGHTS",
           "LOGITS_NOTE"]

#: An .npz of dumped blobs larger than this is refused before it is read.
MAX_NPZ_BYTES = 2**32

#: The note of a TRAIN row comparing a fused head's margin logits (``ParityReport.logits_row``).
LOGITS_NOTE = "head([x, labels], training=True) margin logits"

#: ``ParityReport.weights`` when the check ran without a caffemodel.
FILLER_WEIGHTS = "the converted model's own initial weights (drawn from the prototxt fillers, no caffemodel)"


@dataclass(frozen=True)
class BlobParity:
    """One compared blob: the converted model's value against the reference's."""

    layer: str
    blob: str
    shape: tuple
    max_abs: float
    max_rel: float  # max_abs / max |reference|
    cosine: float
    ok: bool
    note: str = ""


@dataclass
class ParityReport:
    """Layer-by-layer comparison, in network order; ``first_divergence`` names the first blob out of tolerance.

    A blob diverges when ``max_abs > atol + rtol * max|reference|``.
    """

    reference: str
    rows: list[BlobParity]
    atol: float
    rtol: float
    skipped: list[str] = field(default_factory=list)
    batch_size: int = 0
    weights: str = ""  # what the weights were, when not the given caffemodel (e.g. ``FILLER_WEIGHTS``)

    @property
    def first_divergence(self) -> BlobParity | None:
        return next((row for row in self.rows if not row.ok), None)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and self.first_divergence is None

    def row(self, blob: str) -> BlobParity:
        """The row of Caffe blob ``blob`` (its last version when in-place layers rewrite it)."""
        matches = [row for row in self.rows if row.blob == blob]
        if not matches:
            raise KeyError(f"blob {blob!r} was not compared; compared: {[row.blob for row in self.rows]}")
        return matches[-1]

    def logits_row(self, blob: str) -> BlobParity:
        """The TRAIN row of a fused head's margin logits against Caffe blob ``blob`` (the last top of the
        head's chain, e.g. 'fc6_margin_scale'); it precedes the head's cosine row, which ``row`` returns when
        both name one blob (SphereFace's 'fc6')."""
        matches = [row for row in self.rows if row.blob == blob and row.note == LOGITS_NOTE]
        if not matches:
            raise KeyError(f"no margin-logits row for blob {blob!r}; they are compared in TRAIN, for fused heads "
                           "whose Caffe chain reads the label")
        return matches[-1]

    def summary(self) -> str:
        """Two lines: what was compared, and the verdict (the first divergent blob, or the last blob's figures)."""
        head = (f"parity vs {self.reference}: {len(self.rows)} blobs compared on a batch of {self.batch_size} "
                f"(tolerance {self.atol:g} + {self.rtol:g} * max|ref|)"
                + (f"; weights: {self.weights}" if self.weights else ""))
        bad = self.first_divergence
        if bad is not None:
            return (f"{head}\n  FIRST DIVERGENCE at blob '{bad.blob}' (layer '{bad.layer}'): "
                    f"max abs {bad.max_abs:.3g}, "
                    f"max rel {bad.max_rel:.3g}, cosine {bad.cosine:.6f}{' - ' + bad.note if bad.note else ''}")
        if not self.rows:
            return f"{head}\n  nothing was comparable"
        worst = max(self.rows, key=lambda row: row.max_abs)
        last = self.rows[-1]
        return (f"{head}\n  all within tolerance; output '{last.blob}': max abs {last.max_abs:.3g}, "
                f"max rel {last.max_rel:.3g}, cosine {last.cosine:.6f}; worst blob '{worst.blob}' max abs "
                f"{worst.max_abs:.3g}")

    def __str__(self) -> str:
        lines = [f"{'blob':<28} {'layer':<28} {'shape':<20} {'max abs':>9} {'max rel':>9} {'cosine':>9}  ok"]
        for row in self.rows:
            lines.append(f"{row.blob[:28]:<28} {row.layer[:28]:<28} {str(row.shape)[:20]:<20} {row.max_abs:9.2e} "
                         f"{row.max_rel:9.2e} {row.cosine:9.6f}  {'ok' if row.ok else 'DIVERGES'}"
                         + (f"  ({row.note})" if row.note else ""))
        return "\n".join(lines + [self.summary()])


def _compare(layer: str, blob: str, value: np.ndarray, reference: np.ndarray, atol: float, rtol: float,
             note: str = "") -> BlobParity:
    value = np.asarray(value, np.float64)
    reference = np.asarray(reference, np.float64)
    if value.shape != reference.shape:
        if reference.size == 1 and value.ndim == 1:  # a (1,) top (a bias, lambda) the model gives per sample
            reference = np.broadcast_to(reference.reshape(()), value.shape)
        elif value.size == reference.size:
            reference = reference.reshape(value.shape)
        else:
            return BlobParity(layer, blob, tuple(value.shape), math.inf, math.inf, 0.0, False,
                              f"shape {tuple(value.shape)} vs reference {tuple(reference.shape)}")
    diff = np.abs(value - reference)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    norms = float(np.linalg.norm(value)) * float(np.linalg.norm(reference))
    cosine = float(np.dot(value.ravel(), reference.ravel()) / norms) if norms > 0 else (1.0 if max_abs == 0 else 0.0)
    ok = bool(np.isfinite(value).all()) and max_abs <= atol + rtol * scale
    return BlobParity(layer, blob, tuple(value.shape), max_abs, max_rel, cosine, ok, note)


# ----------------------------------------------------------------------------------------------------
# .npz references (blobs dumped from Caffe)
# ----------------------------------------------------------------------------------------------------


def load_reference_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Blobs dumped from Caffe, e.g. ``np.savez("ref.npz", **{k: v.data for k, v in net.blobs.items()})``.

    Data only: pickled (object) arrays are refused, and each array's claimed shape is checked against the
    bytes stored for it before NumPy allocates it.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise ConversionError(f"{path}: no such reference .npz file") from None
    if size > MAX_NPZ_BYTES:
        raise ConversionError(f"{path}: {size} bytes is larger than the {MAX_NPZ_BYTES} accepted for a reference")
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise ConversionError(f"{path}: member {info.filename!r} is not a .npy array")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
                    else:
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
                    header = member.tell()
                if dtype.hasobject:
                    raise ConversionError(f"{path}: array {info.filename!r} holds Python objects; "
                                          "only numbers are read")
                claimed = math.prod(shape) * dtype.itemsize
                if claimed != info.file_size - header:
                    raise ConversionError(
                        f"{path}: array {info.filename!r} claims shape {shape} ({claimed} bytes) but stores "
                        f"{info.file_size - header} bytes"
                    )
    except zipfile.BadZipFile:
        raise ConversionError(f"{path}: not an .npz file (np.savez writes a zip archive)") from None
    except ValueError as error:
        raise ConversionError(f"{path}: malformed .npy header: {error}") from None
    with np.load(path, allow_pickle=False) as data:
        return {name: np.asarray(data[name]) for name in data.files}


# ----------------------------------------------------------------------------------------------------
# OpenCV reference
# ----------------------------------------------------------------------------------------------------


_registered: set[str] = set()


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ConversionError("the OpenCV reference needs opencv-python-headless (>= 4.8, < 5): "
                              "pip install 'opencv-python-headless<5'") from None
    if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
        raise ConversionError(f"OpenCV {cv2.__version__} has no cv2.dnn.readNetFromCaffe; "
                              "use opencv-python-headless < 5")
    return cv2


def _register_stand_ins(cv2, classes) -> None:
    for cls in classes:
        name = stand_in_type(cls)
        if name not in _registered:
            cv2.dnn_registerLayer(name, cls)
            _registered.add(name)


def opencv_prototxt(plan: Plan, batch_size: int) -> str:
    """The plan's (phase-filtered, upgraded) net as a prototxt OpenCV's importer runs with our Python layers.

    Data layers become Input layers fed with the transformed data; training-only layers are left out; the
    handlers prepare their layers (``Handler.opencv_layer``: fork layers become ``KerasMargin*`` Python
    stand-ins, LabelSpecificAdd a Split); second tops get ``Split`` probes (``__probe__<blob>``) so OpenCV exposes them.
    """
    text, _ = _opencv_net(plan, batch_size)
    return text


def _opencv_net(plan: Plan, batch_size: int) -> tuple[str, set]:
    """``opencv_prototxt`` and the stand-in classes it uses."""
    net = schema.NetParameter(name=plan.name or "reference")
    stand_ins: set = set()
    input_tops = {top for layer in plan.layers if registry.lookup(layer.type).is_input
                  for top in layer.top_names}
    shapes_by_name = {}
    for layer in plan.layers:
        for blob_id, name in zip(layer.tops, layer.top_names):
            shapes_by_name.setdefault(name, plan.blob_shapes[blob_id])
    label_tops = _label_tops(plan, shapes_by_name)
    train_forward = _train_forward_layers(plan)
    model_input_names = {name for layer in plan.layers if registry.lookup(layer.type).is_input
                         for blob_id, name in zip(layer.tops, layer.top_names) if blob_id in plan.needed}
    not_run: set[str] = set()  # tops of layers OpenCV cannot run (stand_ins.NotRun) and of their dependants
    for layer in plan.caffe_layers:
        kind = layer.type
        if kind.endswith("Loss") or kind in TRAINING_ONLY_TYPES:
            continue
        if not_run.intersection(layer.bottom):
            not_run.update(layer.top)
            continue
        copy = net.layer.add()
        copy.CopyFrom(layer)
        for field_name in ("include", "exclude", "phase", "blobs", "param", "loss_weight", "propagate_down"):
            copy.ClearField(field_name)
        if kind in DATA_LAYER_TYPES or kind == "Input":
            tops = [top for top in layer.top if top in input_tops and top in shapes_by_name]
            if kind != "Input":  # the data, and the labels the model takes or the TRAIN label layers read
                tops = tops[:1] + [top for top in tops[1:] if top in label_tops or top in model_input_names]
            copy.Clear()
            copy.name, copy.type = layer.name, "Input"
            for top in tops:
                copy.top.append(top)
                copy.input_param.shape.add().dim.extend([batch_size, *shapes_by_name[top][1:]])
            continue
        handler = registry.lookup(kind)
        if "phase" in inspect.signature(handler.opencv_layer).parameters:  # the label layers' TRAIN forward
            stand_in = handler.opencv_layer(layer, copy, phase="TRAIN" if layer.name in train_forward else "TEST")
        else:
            stand_in = handler.opencv_layer(layer, copy)
        if stand_in is NotRun:
            del net.layer[-1]
            not_run.update(layer.top)
            continue
        if stand_in is not None:
            stand_ins.add(stand_in)
        for extra in copy.top[1:]:
            probe = net.layer.add(name=f"__probe__{extra}", type="Split")
            probe.bottom.append(extra)
            probe.top.append(f"__probe__{extra}")
    return text_format.MessageToString(net), stand_ins


def _train_forward_layers(plan: Plan) -> set[str]:
    """Names of the label layers (handlers with ``label_classes``) that run their TRAIN forward as the
    conversion built them: a literal one that took its label bottom, a fused head's member in a TRAIN plan
    (or whose own ``phase`` field says TRAIN)."""
    names = set()
    for layer in plan.layers:
        if layer.head is not None:
            members = {param.name: param for param in plan.caffe_layers if param.name in layer.members}
            for param in members.values():
                if getattr(registry.lookup(param.type), "label_classes", None) is None or len(param.bottom) < 2:
                    continue
                if (layer_phase(param) if param.HasField("phase") else plan.phase) == "TRAIN":
                    names.add(param.name)
        elif getattr(registry.lookup(layer.type), "label_classes", None) is not None and len(layer.bottoms) >= 2:
            names.add(layer.name)
    return names


def _label_tops(plan: Plan, shapes_by_name: dict) -> dict[str, int | None]:
    """{label blob name: number of classes} of the label bottoms (the second) read by layers running their
    TRAIN forward (LabelSpecificAdd, MarginInnerProduct: handlers with ``label_classes``); the fewest classes
    when several read one blob, None when unknown."""
    found: dict[str, int | None] = {}
    train_forward = _train_forward_layers(plan)
    for param in plan.caffe_layers:
        if param.name not in train_forward or len(param.bottom) < 2:
            continue
        classes_of = getattr(registry.lookup(param.type), "label_classes", None)
        if classes_of is None:
            continue
        classes = classes_of(param, shapes_by_name)
        name = param.bottom[1]
        known = [value for value in (found.get(name), classes) if value]
        found[name] = min(known) if known else None
    return found


def _shapes_by_name(plan: Plan) -> dict:
    shapes = {}
    for layer in plan.layers:
        for blob_id, name in zip(layer.tops, layer.top_names):
            shapes.setdefault(name, plan.blob_shapes[blob_id])
    return shapes


def opencv_reference(plan: Plan, caffemodel: str, feeds: Mapping[str, np.ndarray],
                     layer_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Run OpenCV's Caffe importer on the plan's net; return {layer or probe name: first output (NCHW)}."""
    cv2 = _cv2()
    batch = next(iter(feeds.values())).shape[0]
    with tempfile.TemporaryDirectory() as tmp:
        prototxt = os.path.join(tmp, "reference.prototxt")
        with open(prototxt, "w") as handle:
            text, classes = _opencv_net(plan, batch)
            handle.write(text)
        _register_stand_ins(cv2, classes)
        weights = _without_scalar_blobs(plan, caffemodel, os.path.join(tmp, "reference.caffemodel"))
        try:
            net = cv2.dnn.readNetFromCaffe(prototxt, weights)
        except cv2.error as error:
            raise _opencv_error("could not import the net", error, plan, caffemodel) from None
    try:
        net.enableFusion(False)
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        for name, value in feeds.items():
            net.setInput(np.ascontiguousarray(value, np.float32), name)
        available = set(net.getLayerNames())
        wanted = [name for name in layer_names if name in available]
        outputs = net.forward(wanted) if wanted else []
    except cv2.error as error:
        raise _opencv_error("failed running the net", error, plan, caffemodel) from None
    return dict(zip(wanted, (np.asarray(value) for value in outputs)))


def _without_scalar_blobs(plan: Plan, caffemodel: str, path: str) -> str:
    """``caffemodel``, or a copy at ``path`` with every 0-d blob stored as shape (1,): Caffe's Scale with
    ``num_axes: 0`` (NormFace's learned s) has a 0-d blob, which OpenCV's importer cannot create."""
    if not any(shape == () for shapes in plan.layer_weight_shapes.values() for shape in shapes):
        return caffemodel
    from converters.caffe.reader import read_caffemodel
    from converters.caffe.writer import write_caffemodel

    stored = read_caffemodel(caffemodel)
    layers = [(name, "", [blob.reshape(1) if blob.ndim == 0 else blob for blob in stored.blobs(name)])
              for name in stored.names()]
    write_caffemodel(path, layers)
    return path


def _opencv_error(what: str, error: Exception, plan: Plan, caffemodel: str) -> ConversionError:
    """A one-line ConversionError for a ``cv2.error``: OpenCV's message (source file, not its build path) and,
    when the caffemodel lacks some layers' blobs (which OpenCV needs and Caffe would fill), which and the fix."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    detail = re.sub(r"\S*/([\w.]+\.(?:cpp|hpp|h)\b)", r"\1", lines[-1] if lines else type(error).__name__)
    message = f"OpenCV {what} ({detail})"
    if plan.missing_weights:
        message += (f"; the caffemodel {os.path.basename(caffemodel)} has no blobs for layer(s) "
                    f"{', '.join(repr(name) for name in plan.missing_weights)}, which OpenCV needs (Caffe fills them "
                    "from the prototxt): re-save the caffemodel with them, check without the caffemodel (initial "
                    "weights), or check against blobs dumped from Caffe (an .npz)")
    return ConversionError(message)


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------


def _to_caffe(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    return value.transpose(0, 3, 1, 2) if value.ndim == 4 else value


def _to_keras(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, np.float32)
    return value.transpose(0, 2, 3, 1) if value.ndim == 4 else value


def _data_transform(layer) -> tuple[np.ndarray, float] | None:
    transform = layer.param.transform_param
    means, scale = list(transform.mean_value), float(transform.scale)
    if not means and scale == 1.0:
        return None
    return np.asarray(means or [0.0], np.float64), scale


def parity_report(prototxt=None, caffemodel=None, reference: str = "opencv", *, phase: str = "TEST",
                  input_shape=None, stage=None, conversion: Conversion | None = None,
                  inputs: Mapping[str, np.ndarray] | None = None, batch_size: int = 2, seed: int = 0,
                  atol: float = 1e-4, rtol: float = 1e-4,
                  labels: Mapping[str, np.ndarray] | np.ndarray | None = None) -> ParityReport:
    """Compare the converted model with a reference, blob by blob, and name the first blob that diverges.

    Args:
        prototxt, caffemodel, phase, input_shape, stage: as ``load_caffe_model`` (or pass ``conversion``, the
            result of ``convert``, and the caffemodel path). With the prototxt and no caffemodel, the OpenCV
            check runs on initial weights drawn from the prototxt fillers (``initial_weights_caffemodel``),
            the model converted from them; ``report.weights`` then says so.
        reference: "opencv" (OpenCV's Caffe importer on the same files; fork layers run as registered Python
            layers) or the path of an ``.npz`` of blobs dumped from Caffe (keys: blob names; it must hold
            the net's input blobs, as Caffe's net received them).
        inputs: {input blob name: NCHW array} to feed; default seeded random data (raw pixels 0..255 for
            data layers with a transform, else uniform in [-1, 1]) with ``batch_size`` samples.
        atol, rtol: a blob diverges when ``max_abs > atol + rtol * max|reference|``.
        labels: in TRAIN, the class ids fed as the label blobs the label layers read ({blob name: (batch,)
            ids}, or one array for every label blob); default ``inputs[name]``, the .npz's blob, else seeded
            ids. Each fused head whose chain reads them adds a row for its margin logits, named after the
            chain's last top (e.g. 'fc6_margin_scale'), after its cosine row.

    Example:
    >>> import tempfile, os, numpy as np
    >>> from converters.caffe.writer import write_caffemodel
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     proto, weights = os.path.join(tmp, "net.prototxt"), os.path.join(tmp, "net.caffemodel")
    ...     _ = open(proto, "w").write('input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8 '
    ...         'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
    ...         '        convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 } } '
    ...         'layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" '
    ...         '        pooling_param { pool: AVE kernel_size: 3 stride: 2 } }')
    ...     _ = write_caffemodel(weights, [("conv", "Convolution", [np.ones((4, 3, 3, 3)), np.zeros(4)])])
    ...     report = parity_report(proto, weights, "opencv")
    >>> [(row.blob, row.ok) for row in report.rows], report.first_divergence is None
    ([('conv', True), ('pool', True)], True)
    """
    weights = ""
    with tempfile.TemporaryDirectory(prefix="keras_margin_parity_") as tmp:
        if conversion is None:
            if prototxt is None:
                raise ConversionError("parity_report needs a prototxt or a conversion")
            if caffemodel is None and reference == "opencv":
                _cv2()  # before converting: OpenCV is missing or unusable
                net = prototxt if isinstance(prototxt, CaffeNet) else read_prototxt(prototxt)
                caffemodel = initial_weights_caffemodel(net, os.path.join(tmp, "initial.caffemodel"), phase,
                                                        input_shape, seed=seed, stage=stage)
                prototxt, weights = net, FILLER_WEIGHTS
            conversion = convert(prototxt, caffemodel, phase, input_shape=input_shape, stage=stage)
        report = _parity_report(conversion, caffemodel, reference, inputs, batch_size, seed, atol, rtol, labels)
    report.weights = report.weights or weights
    return report


def initial_weights_caffemodel(net: CaffeNet, path: str, phase: str = "TEST", input_shape=None,
                               seed: int = 0, stage=None) -> str:
    """Write the initial weights of ``net`` (drawn from its prototxt fillers, ``writer.filler_blobs``) to the
    caffemodel ``path`` and return ``path``: converting with it gives a model OpenCV can run on the same
    weights."""
    from converters.caffe.writer import write_filler_caffemodel

    plan = plan_net(net, None, phase, input_shape, stage=stage)
    try:
        write_filler_caffemodel(path, plan, seed)
    except ValueError as error:
        raise ConversionError(f"{net.path}: cannot draw the initial weights: {error}") from None
    except OSError as error:
        raise ConversionError(f"cannot write the temporary caffemodel {path}: {error}") from None
    return path


def check_reference(reference: str, caffemodel=None) -> None:
    """Raise ``ConversionError`` now if ``reference`` ("opencv" or an .npz path) cannot serve as a parity
    reference: OpenCV not importable (or without its Caffe importer), or no such .npz file. Cheap: call it
    before converting."""
    if reference == "opencv":
        _cv2()
        return
    path = os.fspath(reference)
    if not path.endswith(".npz"):
        raise ConversionError(f"--check {path!r}: expected 'opencv' or the path of an .npz of blobs dumped from "
                              "Caffe (keys: blob names)")
    if not os.path.isfile(path):
        raise ConversionError(f"--check {path}: no such reference .npz file")


def _label_values(name: str, classes: int | None, labels, inputs, npz, batch: int, seed: int) -> np.ndarray:
    """The class ids fed as label blob ``name``: ``labels`` (a mapping by blob name, or one array), then
    ``inputs[name]``, then the .npz's blob, else seeded ids in [0, classes)."""
    given = None
    if isinstance(labels, Mapping):
        given = labels.get(name)
    elif labels is not None:
        given = labels
    if given is None and inputs is not None and name in inputs:
        given = inputs[name]
    if given is None and npz is not None and name in npz:
        given = npz[name]
    if given is None:
        rng = np.random.default_rng([seed, 1])  # its own stream: the data are drawn as in TEST
        return rng.integers(0, classes or 2, batch).astype(np.int64)
    values = np.asarray(given).reshape(-1)
    if values.shape[0] != batch:
        raise ConversionError(f"labels for '{name}': {values.shape[0]} class ids for a batch of {batch}")
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values != np.floor(values)) or \
            (classes and np.any(values >= classes)):
        raise ConversionError(f"labels for '{name}' must be class ids in [0, {classes}); got {values.tolist()[:8]}")
    return values.astype(np.int64)


def _label_member(layer, plan: Plan, train_forward: set[str]):
    """(label blob name, last member LayerParameter) of a fused head whose Caffe chain reads the label in
    its TRAIN forward (AMSoftmaxHead's LabelSpecificAdd, SphereFaceHead's MarginInnerProduct), else None."""
    if layer.head is None:
        return None
    params = {param.name: param for param in plan.caffe_layers if param.name in layer.members}
    label = None
    for member in layer.members:
        param = params.get(member)
        if param is not None and len(param.bottom) >= 2 and param.name in train_forward:
            label = param.bottom[1]
            break
    last = params.get(layer.members[-1])
    if label is None or last is None or not len(last.top):
        return None
    return label, last


def _head_logits(head, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``head([x, labels], training=True)`` with the head's non-trainable state (counters, margin) restored."""
    saved = [np.asarray(variable) for variable in head.non_trainable_weights]
    try:
        return np.asarray(head([x, labels.astype(np.int32)], training=True))
    finally:
        for variable, value in zip(head.non_trainable_weights, saved):
            variable.assign(value)


def _parity_report(conversion: Conversion, caffemodel, reference, inputs, batch_size, seed, atol,
                   rtol, labels=None) -> ParityReport:
    from converters.caffe.label_layers import training_forward

    plan, model = conversion.plan, conversion.model
    caffemodel_path = os.fspath(caffemodel) if caffemodel is not None else plan.caffemodel
    train_forward = _train_forward_layers(plan)
    train = bool(train_forward)
    label_tops = _label_tops(plan, _shapes_by_name(plan))

    input_layers = [layer for layer in plan.layers if registry.lookup(layer.type).is_input]
    input_blobs = [(layer, index, blob_id, name) for layer in input_layers
                   for index, (blob_id, name) in enumerate(zip(layer.tops, layer.top_names))
                   if blob_id in conversion.tensors and blob_id in plan.needed]

    npz = None
    if reference == "opencv":
        if caffemodel_path is None:
            raise ConversionError("the OpenCV reference needs the weights of this conversion, which was made without "
                                  "a caffemodel: pass the prototxt instead of conversion= to check on initial weights "
                                  "drawn from the fillers, or a caffemodel")
        reference_name = f"OpenCV {_cv2().__version__}"
    else:
        npz = load_reference_npz(reference)
        reference_name = os.path.basename(os.fspath(reference))

    rng = np.random.default_rng(seed)
    caffe_inputs, feeds_by_blob = {}, {}
    for layer, index, blob_id, name in input_blobs:
        if name in label_tops:
            continue  # class ids, fed below
        shape = plan.blob_shapes[blob_id]
        transform = _data_transform(layer) if (layer.type in DATA_LAYER_TYPES and index == 0) else None
        if inputs is not None and name in inputs:
            caffe_value = np.asarray(inputs[name], np.float32)
            raw = caffe_value if transform is None else \
                caffe_value / transform[1] + _broadcast_mean(transform[0], caffe_value)
        elif npz is not None:
            if name not in npz:
                raise ConversionError(f"{reference}: the reference has no input blob '{name}'; "
                                      f"dump net.blobs['{name}'] too")
            caffe_value = np.asarray(npz[name], np.float32)
            raw = caffe_value if transform is None else \
                caffe_value / transform[1] + _broadcast_mean(transform[0], caffe_value)
        else:
            sample_shape = (batch_size, *shape[1:])
            if transform is not None:
                raw = rng.uniform(0.0, 255.0, sample_shape).astype(np.float32)
                caffe_value = ((raw - _broadcast_mean(transform[0], raw)) * transform[1]).astype(np.float32)
            else:
                raw = rng.uniform(-1.0, 1.0, sample_shape).astype(np.float32)
                caffe_value = raw
        caffe_inputs[name] = caffe_value.astype(np.float32)
        feeds_by_blob[blob_id] = _to_keras(raw)
    batch = next(iter(caffe_inputs.values())).shape[0] if caffe_inputs else batch_size
    label_values = {name: _label_values(name, classes, labels, inputs, npz, batch, seed)
                    for name, classes in label_tops.items()}
    caffe_inputs.update({name: values.astype(np.float32) for name, values in label_values.items()})
    for layer, index, blob_id, name in input_blobs:
        if name in label_values:
            dtype = str(getattr(conversion.tensors[blob_id], "dtype", "float32"))
            feeds_by_blob[blob_id] = label_values[name].astype(np.int32 if "int" in dtype else np.float32)
    keras_feeds = [feeds_by_blob[blob_id] for _, _, blob_id, _ in input_blobs]
    if len(model.inputs) > len(keras_feeds):  # inputs a head created (the labels of a label-aware head)
        by_name = {conversion.tensors[blob_id].name: feeds_by_blob[blob_id] for _, _, blob_id, _ in input_blobs}
        classes = min((spec.num_classes for spec in conversion.heads), default=1)
        keras_feeds = [by_name[tensor.name] if tensor.name in by_name else
                       np.random.default_rng(seed + 1).integers(0, classes, batch).astype(np.int32)
                       for tensor in model.inputs]

    compare = []  # (planned layer, top index, blob id, caffe blob name)
    for layer in plan.layers:
        for index, (blob_id, name) in enumerate(zip(layer.tops, layer.top_names)):
            if blob_id in conversion.tensors:
                compare.append((layer, index, blob_id, name))
    import keras

    probe = keras.Model(model.inputs, [conversion.tensors[blob_id] for _, _, blob_id, _ in compare])
    with training_forward(advance=False) if train else contextlib.nullcontext():
        values = probe(keras_feeds, training=False)
    values = values if isinstance(values, (list, tuple)) else [values]
    raw_values = {blob_id: np.asarray(value) for (_, _, blob_id, _), value in zip(compare, values)}
    keras_values = {blob_id: _to_caffe(value) for blob_id, value in raw_values.items()}

    head_logits = {}  # id(planned head layer) -> (label blob, last member LayerParameter)
    if train:
        for layer in plan.layers:
            found = _label_member(layer, plan, train_forward)
            if found is not None and found[0] in label_values and layer.bottoms[0] in raw_values \
                    and conversion.head_layers.get(layer.head.layer) is not None:
                head_logits[id(layer)] = found

    def reference_key(layer, index, name, kind):
        if index:
            return f"__probe__{name}"
        if kind == "cos_from_logits" and layer.name in train_forward:  # its TRAIN top has the margin
            return f"__probe__{name}{LABEL_FREE_SUFFIX}"
        return layer.attrs.get("reference", {}).get("layer", layer.name)

    if npz is None:
        wanted = []
        for layer, index, _, name in compare:
            wanted.append(reference_key(layer, index, name, layer.attrs.get("reference", {}).get("kind", "same")))
            if index == 0 and id(layer) in head_logits:
                wanted.append(head_logits[id(layer)][1].name)
        ref_by_layer = opencv_reference(plan, caffemodel_path, caffe_inputs, wanted)
    final_ids = plan.final_blob_ids()

    rows, skipped, ref_values = [], [], {}
    for layer, index, blob_id, name in compare:
        is_input = registry.lookup(layer.type).is_input
        spec = layer.attrs.get("reference", {})
        kind = spec.get("kind", "same")
        ref = None
        if is_input:
            ref = caffe_inputs.get(name)
        elif npz is not None:
            ref_name = spec.get("top", name)
            if kind == "cos_from_logits" and layer.name in train_forward:
                ref = None  # Caffe's TRAIN top has the margin; the logits row compares it
            elif ref_name in npz and (final_ids.get(name) == blob_id or spec):
                ref = npz[ref_name]
        else:
            ref = ref_by_layer.get(reference_key(layer, index, name, kind))
        if index == 0 and id(layer) in head_logits:  # before the cosine row: row(blob) finds that one
            label_name, last = head_logits[id(layer)]
            logits_name = last.top[0]
            if npz is not None:
                logits_ref = npz[logits_name] if logits_name in npz else None
            else:
                logits_ref = ref_by_layer.get(last.name)
            if logits_ref is None:
                skipped.append(f"{logits_name} ({last.name})")
            else:
                head = conversion.head_layers[layer.head.layer]
                logits = _head_logits(head, raw_values[layer.bottoms[0]], label_values[label_name])
                rows.append(_compare(last.name, logits_name, logits, logits_ref, atol, rtol, LOGITS_NOTE))
        if ref is None:
            skipped.append(f"{name} ({layer.name})")
        else:
            note = ""
            compared = True
            if kind == "cos_from_logits":  # SphereFace's layer outputs |x| cos; the head outputs cos
                bottom = ref_values.get(layer.bottoms[0])
                if bottom is None:
                    skipped.append(f"{name} ({layer.name})")
                    compared = False
                else:
                    norms = np.linalg.norm(bottom.reshape(bottom.shape[0], -1).astype(np.float64), axis=1,
                                           keepdims=True)
                    ref = np.asarray(ref, np.float64) / norms
                    note = "head cos vs reference logits / |x|"
            elif kind == "cosine":
                note = f"head vs reference '{spec.get('layer')}'"
            elif kind == "distance_from_cosine":  # InnerDistance's squared L2 of unit vectors: D = 2 - 2 cos
                ref = 1.0 - np.asarray(ref, np.float64) / 2.0
                note = f"head cos vs 1 - D/2 of reference '{spec.get('layer')}'"
            if compared:
                ref_values[blob_id] = np.asarray(ref)
                if is_input and layer.type in DATA_LAYER_TYPES and index == 0 and _data_transform(layer) is not None:
                    note = "preprocessing"
                if not is_input or note == "preprocessing":
                    rows.append(_compare(layer.name, name, keras_values[blob_id], ref, atol, rtol, note))
    return ParityReport(reference_name, rows, atol, rtol, skipped, batch_size=batch)


def _broadcast_mean(means: np.ndarray, like: np.ndarray) -> np.ndarray:
    if like.ndim == 4 and means.size > 1:
        return means.reshape(1, -1, 1, 1)
    return means.reshape(()) if means.size == 1 else means
