"""Blob plumbing: Eltwise, Concat, Slice, Flatten, Reshape, Reduction."""

from __future__ import annotations

import math

import keras
import numpy as np

from converters.caffe.handlers.common import _known, to_caffe_order
from converters.caffe.layers import (
    CaffeReduction,
    CaffeSlice,
)
from converters.caffe.registry import Built, Handler, register
from converters.caffe.shapes import canonical_axis, keras_axis, keras_shape
from converters.caffe.stand_ins import StandIn, python_layer

# ----------------------------------------------------------------------------------------------------
# Blob plumbing: Eltwise, Concat, Slice, Flatten, Reshape
# ----------------------------------------------------------------------------------------------------


@register("Eltwise")
class EltwiseHandler(Handler):
    def output_shapes(self, layer):
        first = layer.input_shapes[0]
        if len(layer.bottoms) < 2:
            raise layer.error("Eltwise needs at least 2 bottoms")
        for shape in layer.input_shapes[1:]:
            if tuple(shape) != tuple(first):
                raise layer.error(f"bottoms must have identical shapes (Caffe does not broadcast); got "
                                  f"{[tuple(s) for s in layer.input_shapes]}")
        p = layer.param.eltwise_param
        if len(p.coeff) and (p.operation != 1 or len(p.coeff) != len(layer.bottoms)):
            raise layer.error("coeff is only for SUM, one per bottom")
        return [first]

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.eltwise_param
        if p.operation == 1:
            coeffs = list(p.coeff) or [1.0] * len(inputs)
            terms = [x if c == 1.0 else keras.layers.Rescaling(c, name=ctx.name(layer, f"coeff{i}"))(x)
                     for i, (x, c) in enumerate(zip(inputs, coeffs))]
            return Built([keras.layers.Add(name=ctx.name(layer))(terms)])
        if p.operation == 0:
            return Built([keras.layers.Multiply(name=ctx.name(layer))(inputs)])
        if p.operation == 2:
            return Built([keras.layers.Maximum(name=ctx.name(layer))(inputs)])
        raise layer.error("Eltwise operation SORT (happynear) does not convert")


def _concat_axis(layer):
    p = layer.param.concat_param
    rank = len(layer.input_shapes[0])
    return canonical_axis(p.concat_dim if p.HasField("concat_dim") else p.axis, rank)


@register("Concat")
class ConcatHandler(Handler):
    def output_shapes(self, layer):
        axis = _concat_axis(layer)
        first = list(layer.input_shapes[0])
        for shape in layer.input_shapes[1:]:
            if len(shape) != len(first) or any(a != b for i, (a, b) in enumerate(zip(shape, first)) if i != axis):
                raise layer.error(f"bottoms differ outside axis {axis}: {[tuple(s) for s in layer.input_shapes]}")
        sizes = [shape[axis] for shape in layer.input_shapes]
        first[axis] = None if None in sizes else sum(sizes)
        return [tuple(first)]

    def build(self, ctx, layer, inputs, weights):
        if len(inputs) == 1:
            return Built([inputs[0]])
        axis = keras_axis(_concat_axis(layer), len(layer.input_shapes[0]))
        return Built([keras.layers.Concatenate(axis=axis, name=ctx.name(layer))(inputs)])


@register("Slice")
class SliceHandler(Handler):
    def _axis(self, layer):
        p = layer.param.slice_param
        return canonical_axis(p.slice_dim if p.HasField("slice_dim") else p.axis, len(layer.input_shapes[0]))

    def output_shapes(self, layer):
        shape, axis = list(layer.input_shapes[0]), self._axis(layer)
        points, size, tops = list(layer.param.slice_param.slice_point), shape[axis], len(layer.tops)
        out = []
        if points:
            if len(points) != tops - 1:
                raise layer.error(f"{len(points)} slice_point values for {tops} tops; give one fewer than tops")
            bounds = [0, *points, size]
            if points != sorted(points) or (size is not None and points[-1] >= size) or points[0] <= 0:
                raise layer.error(f"slice_point {points} must increase strictly inside (0, {size})")
            for start, stop in zip(bounds, bounds[1:]):
                shape[axis] = None if stop is None else stop - start
                out.append(tuple(shape))
            return out
        if size is not None and size % tops:
            raise layer.error(f"axis {axis} of size {size} does not split into {tops} equal parts")
        shape[axis] = None if size is None else size // tops
        return [tuple(shape)] * tops

    def build(self, ctx, layer, inputs, weights):
        axis = self._axis(layer)
        points = list(layer.param.slice_param.slice_point)
        sections = points if points else len(layer.tops)
        kaxis = keras_axis(axis, len(layer.input_shapes[0]))
        outputs = [CaffeSlice(kaxis, sections, i, name=ctx.name(layer, str(i) if i else ""))(inputs[0])
                   for i in range(len(layer.tops))]
        return Built(outputs)


def _needs_permute(shape) -> bool:
    """Whether NHWC and NCHW memory orders differ for this 4-D shape (C > 1 and H W > 1)."""
    return len(shape) == 4 and shape[1] > 1 and shape[2] * shape[3] > 1


def _reshape_to(ctx, layer, tensor, bottom, top):
    """Reshape with Caffe's (NCHW) memory order: permute to NCHW if needed, reshape, permute back if 4-D."""
    bottom, top = tuple(bottom), tuple(top)
    if bottom == top:
        return tensor
    _known(layer, bottom)
    if _needs_permute(bottom):
        tensor = to_caffe_order(ctx, layer, tensor, 4)
    target = top[1:]
    if len(top) == 4:
        # Build the NCHW-ordered tensor, then bring it to NHWC (skip the permute where orders agree).
        if _needs_permute(top):
            tensor = keras.layers.Reshape(target, name=ctx.name(layer, "reshape"))(tensor)
            return keras.layers.Permute((2, 3, 1), name=ctx.name(layer))(tensor)
        target = keras_shape(top)[1:]
    return keras.layers.Reshape(target, name=ctx.name(layer))(tensor)


@register("Flatten")
class FlattenHandler(Handler):
    def output_shapes(self, layer):
        shape = layer.input_shapes[0]
        rank = len(shape)
        p = layer.param.flatten_param
        start, end = canonical_axis(p.axis, rank), canonical_axis(p.end_axis, rank)
        if start == 0:
            raise layer.error("Flatten over the batch axis does not convert")
        if end < start:
            raise layer.error(f"flatten_param.end_axis {p.end_axis} is before axis {p.axis}")
        _known(layer, shape)
        return [(*shape[:start], math.prod(shape[start:end + 1]), *shape[end + 1:])]

    def build(self, ctx, layer, inputs, weights):
        return Built([_reshape_to(ctx, layer, inputs[0], layer.input_shapes[0], layer.output_shapes[0])])


@register("Reshape")
class ReshapeHandler(Handler):
    def output_shapes(self, layer):
        bottom = tuple(layer.input_shapes[0])
        p = layer.param.reshape_param
        rank = len(bottom)
        axis = p.axis + rank + 1 if p.axis < 0 else p.axis
        if not 0 <= axis <= rank:
            raise layer.error(f"reshape_param.axis {p.axis} is out of range for a {rank}-D bottom")
        stop = rank if p.num_axes == -1 else axis + p.num_axes
        if p.num_axes < -1 or stop > rank:
            raise layer.error(f"reshape_param.num_axes {p.num_axes} is out of range")
        dims = list(p.shape.dim)
        if dims.count(-1) > 1:
            raise layer.error("at most one reshape dimension may be -1")
        new = []
        for index, dim in enumerate(dims):
            if dim == 0:
                if axis + index >= rank:
                    raise layer.error(f"dim {index} is 0 (copy) but the bottom has no axis {axis + index}")
                new.append(bottom[axis + index])
            elif dim == -1 or dim > 0:
                new.append(dim)
            else:
                raise layer.error(f"reshape dimension {dim} is invalid")
        out = [*bottom[:axis], *new, *bottom[stop:]]
        _known(layer, bottom)
        # The batch axis must survive: copied (0 -> None), untouched (axis > 0), or an inferred -1 at axis 0.
        if out[0] == -1:
            if -1 in out[1:]:
                raise layer.error("-1 at the batch axis and elsewhere: cannot infer both")
            out[0] = None
        elif out[0] is not None:
            raise layer.error(f"the reshape sets the batch axis to {out[0]}; only per-sample reshapes convert")
        per_sample = math.prod(bottom[1:])
        known = math.prod(d for d in out[1:] if d != -1)
        if -1 in out[1:]:
            if known == 0 or per_sample % known:
                raise layer.error(f"cannot infer a dimension: {per_sample} values per sample into {out}")
            out[out.index(-1, 1)] = per_sample // known
        elif known != per_sample:
            raise layer.error(f"{per_sample} values per sample do not fill shape {out} (the batch must not change)")
        return [tuple(out)]

    def build(self, ctx, layer, inputs, weights):
        return Built([_reshape_to(ctx, layer, inputs[0], layer.input_shapes[0], layer.output_shapes[0])])


#: ReductionParameter.ReductionOp values (caffe.proto): SUM=1 ASUM=2 SUMSQ=3 MEAN=4.
REDUCTION_OPERATIONS = {1: "SUM", 2: "ASUM", 3: "SUMSQ", 4: "MEAN"}


class ReductionStandIn(StandIn):
    """BVLC's Reduction (``reduction_layer.cpp``): axes [axis, end) reduced, times ``coeff`` (OpenCV lacks it)."""

    def _axis(self, rank: int) -> int:
        axis = self.config["axis"]
        return axis + rank if axis < 0 else axis

    def getMemoryShapes(self, inputs):  # noqa: N802 (OpenCV's name)
        return [list(inputs[0][: self._axis(len(inputs[0]))])]

    def forward(self, inputs):
        x = inputs[0].astype(np.float64)
        axis, op = self._axis(x.ndim), self.config["operation"]
        flat = x.reshape(*x.shape[:axis], -1)
        if op == "ASUM":
            flat = np.abs(flat)
        elif op == "SUMSQ":
            flat = flat * flat
        value = flat.mean(axis=-1) if op == "MEAN" else flat.sum(axis=-1)
        return [(value * self.config["coeff"]).astype(np.float32)]


@register("Reduction")
class ReductionHandler(Handler):
    """BVLC's Reduction: the top keeps the bottom's axes before ``axis`` (SUM, ASUM, SUMSQ or MEAN over the
    rest, times ``coeff``). ``axis: 0`` (the default) would reduce over the batch, which does not convert."""

    def _axis(self, layer) -> int:
        p = layer.param.reduction_param
        shape = layer.input_shapes[0]
        try:
            axis = canonical_axis(p.axis, len(shape))
        except ValueError as error:
            raise layer.error(f"reduction_param.axis: {error}") from None
        if axis == 0:
            raise layer.error("reduction_param.axis 0 (the default) reduces over the batch to one number; only a "
                              "per-sample reduction (axis >= 1) converts")
        return axis

    def opencv_layer(self, layer, copy):
        p = layer.reduction_param
        return python_layer(copy, ReductionStandIn, {"axis": p.axis, "coeff": p.coeff,
                                                     "operation": REDUCTION_OPERATIONS.get(p.operation, "SUM")})

    def output_shapes(self, layer):
        if len(layer.tops) != 1:
            raise layer.error(f"Reduction has one top; got {len(layer.tops)}")
        if layer.param.reduction_param.operation not in REDUCTION_OPERATIONS:
            raise layer.error(f"reduction_param.operation {layer.param.reduction_param.operation} is not SUM, ASUM, "
                              "SUMSQ or MEAN")
        return [tuple(layer.input_shapes[0][: self._axis(layer)])]

    def build(self, ctx, layer, inputs, weights):
        p = layer.param.reduction_param
        shape = layer.input_shapes[0]
        axis = self._axis(layer)
        tensor = inputs[0]
        if axis > 1 and len(shape) == 4:  # reduce the Caffe axes [axis, end), not NHWC's
            tensor = to_caffe_order(ctx, layer, tensor, len(shape))
        operation = REDUCTION_OPERATIONS[p.operation]
        return Built([CaffeReduction(operation, axis, p.coeff, name=ctx.name(layer))(tensor)])
