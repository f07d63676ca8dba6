"""The path every objective shares: normalized cosines, label handling, margin logits and the float32
softmax cross-entropy. Objectives only supply ``target(cos_theta_y) -> modified target cosine``.
"""

from __future__ import annotations

from typing import Any, Callable

import keras
from keras import ops

from keras_margin import _validation

TargetFn = Callable[[Any], Any]
#: ``nontarget(cos_theta (batch, C), cos_theta_y (batch, 1)) -> (batch, C)``: an objective's non-target cosines
#: (CurricularFace's re-weighted hard negatives); the target column of its result is ignored.
NontargetFn = Callable[[Any, Any], Any]
_NORM_EPS = 1e-12  # added to squared norms, so a zero vector gives a zero (not NaN) cosine


def l2_normalize(x, axis: int = -1):
    """``x / sqrt(sum(x^2) + 1e-12)`` along ``axis``, in float32."""
    x = ops.cast(x, "float32")
    return x * ops.rsqrt(ops.sum(ops.square(x), axis=axis, keepdims=True) + _NORM_EPS)


def cosine_matrix(x, kernel, compute_dtype: str = "float32", classes_first: bool = False):
    """cos(theta) between each row of ``x`` (batch, d) and each class weight of ``kernel``, in float32.

    Formula:
    ```
    cos[i, j] = <x_i / |x_i|, W[:, j]> / |W[:, j]|        kernel (d, C); classes_first: W[j, :] of (C, d)
    ```
    The matrix product runs in ``compute_dtype`` (float16/bfloat16 under mixed precision); the norms and
    the result are float32. Class norms scale the product instead of materializing a normalized copy of
    the kernel. The gradient is written out (``_unit_column_product``). ``classes_first``: the kernel is
    class-major, (C, d), one row per class (a head's ``kernel_layout="classes_first"``).
    """
    return _unit_column_product(l2_normalize(x, axis=-1), kernel, compute_dtype, classes_first)


def _unit_column_product(x_unit, kernel, compute_dtype: str, classes_first: bool = False):
    """``(x_unit @ W) / |W[:, j]|`` (batch, C) float32, with the gradient written out.

    Formula (``r_j = (|W[:, j]|^2 + eps)^(-1/2)``, upstream gradient G; for a class-major kernel read
    W^T for W):
    ```
    cos = (x_unit @ W) * r
    d x_unit = (G * r) @ W^T
    d W      = x_unit^T @ (G * r) - W * r^2 * colsum(G * cos)
    ```
    Autodiff forms ``colsum`` as a reduction down the batch axis of a (batch, C) array, which JAX's XLA
    on CPU runs several times slower than a pass over it; here it is ``column_sums``, and the
    kernel-sized terms fuse into one loop.
    """

    @ops.custom_gradient
    def op(x_unit, kernel):
        inv_norm = ops.rsqrt(column_sq_norms(kernel, classes_first) + _NORM_EPS)
        product = class_product(ops.cast(x_unit, compute_dtype), ops.cast(kernel, compute_dtype), classes_first)
        cos = ops.cast(product, "float32") * inv_norm

        def grad(*upstream, **_):
            (d_cos,) = upstream_gradients(upstream)
            d_x_unit, d_kernel = unit_column_product_gradients(x_unit, kernel, inv_norm, cos, d_cos, compute_dtype,
                                                               classes_first=classes_first)
            return ops.cast(d_x_unit, x_unit.dtype), ops.cast(d_kernel, kernel.dtype)

        return cos, grad

    return op(x_unit, read_value(kernel))


def class_product(x, kernel, classes_first: bool = False):
    """``x @ W`` (batch, C) for a (d, C) kernel; ``x @ W^T`` for a class-major (C, d) one (no transposed copy:
    XLA contracts the kernel's second axis directly)."""
    return ops.matmul(x, ops.transpose(kernel)) if classes_first else ops.matmul(x, kernel)


def per_class(values, classes_first: bool = False):
    """A (C,) vector shaped to broadcast against the kernel: (C,) for (d, C), (C, 1) for class-major (C, d)."""
    return values[:, None] if classes_first else values


def unit_column_product_gradients(x_unit, kernel, inv_norm, cos, d_cos, compute_dtype: str = "float32",
                                  reduce_rows: Callable[[Any], Any] | None = None, classes_first: bool = False):
    """float32 ``(d x_unit, d W)`` of ``cos = (x_unit @ W) * inv_norm`` for the upstream ``d_cos``.

    The formula of ``_unit_column_product``; the class-chunked loss's backward pass uses it per chunk,
    with ``reduce_rows`` (default ``column_sums``) a plain reduction there. ``d W`` has the kernel's
    layout ((C, d) with ``classes_first``).
    """
    reduce_rows = column_sums if reduce_rows is None else reduce_rows
    d_cos = ops.cast(d_cos, "float32")
    scaled = ops.cast(d_cos * inv_norm, compute_dtype)
    kernel_mm = ops.cast(kernel, compute_dtype)
    x_mm = ops.cast(x_unit, compute_dtype)
    if classes_first:
        d_x_unit = ops.matmul(scaled, kernel_mm)
        d_kernel = ops.cast(ops.matmul(ops.transpose(scaled), x_mm), "float32")
    else:
        d_x_unit = ops.matmul(scaled, ops.transpose(kernel_mm))
        d_kernel = ops.cast(batch_product(x_mm, scaled), "float32")
    correction = per_class(ops.square(inv_norm) * reduce_rows(d_cos * cos), classes_first)
    d_kernel = d_kernel - ops.cast(kernel, "float32") * correction
    return ops.cast(d_x_unit, "float32"), d_kernel


def batch_product(x, g):
    """``x^T @ g`` (d, C) for ``x`` (batch, d) and ``g`` (batch, C): the product over the batch that forms a
    (d, C) kernel's gradient.

    On TensorFlow ``x^T`` is first written out as an array of its own (a gather at the transposed flat
    indices, which XLA keeps: batch * d values). Its XLA otherwise folds the transpose into the product,
    one contracting the leading axis of both operands, which the CPU runs 25-40 % slower (512 x 256 by
    256 x 85,742: 155-172 ms against 120-124 ms; the AM-Softmax step 0.94x the time at 256 x 85,742). JAX
    keeps the plain product: its CPU backend fuses the head's kernel gradient around the product, and the
    copy made that step 1.04-1.15x slower.
    """
    if keras.backend.backend() != "tensorflow":
        return ops.matmul(ops.transpose(x), g)
    rows, cols = ops.shape(x)  # the batch may be unknown when traced (a Keras fit whose last batch is short)
    flat = ops.arange(cols, dtype="int32")[:, None] + cols * ops.arange(rows, dtype="int32")[None, :]
    x_t = ops.reshape(ops.take(ops.reshape(x, (-1,)), ops.reshape(flat, (-1,)), axis=0), (cols, rows))
    return ops.matmul(x_t, g)


def column_sq_norms(kernel, classes_first: bool = False):
    """Squared L2 norm of each class weight, (C,) float32: the columns of a (d, C) kernel (the rows of a
    class-major (C, d) one, ``classes_first``).

    Formula: ``n_j = sum_i W[i, j]^2``, summed pairwise (the halves added down to 16 terms, then a
    reduction), with the gradient ``dn_j / dW[i, j] = 2 W[i, j]`` given directly. The halving adds fuse
    into a pass over the kernel for XLA: on CPU, d=512, C=85,742, 30 ms on JAX and
    15 ms on TensorFlow, against 86 ms (JAX, through a transpose; its reduction down the leading axis
    takes 255 ms) and 31 ms (TensorFlow, down the leading axis). Class-major, TensorFlow halves the rows
    too (13 ms against 26 ms for the reduction, which its XLA feeds from a written-out square); JAX reduces
    along the contiguous axis directly (10 ms, against 59 ms halved). No matmul (ones @ W^2): its precision
    varies by device. Pairwise summation is also the more accurate float32 sum.
    """
    kernel = ops.cast(kernel, "float32")
    if classes_first and keras.backend.backend() == "jax":
        return ops.sum(ops.square(kernel), axis=1)

    @ops.custom_gradient
    def op(kernel):
        def grad(*upstream, **_):
            (d_norms,) = upstream_gradients(upstream)
            return 2.0 * kernel * per_class(ops.cast(d_norms, "float32"), classes_first)

        return _pairwise_sum(ops.square(kernel), axis=1 if classes_first else 0), grad

    return op(kernel)


def column_sums(a):
    """Sum over the rows of ``a`` (n, C): pairwise on JAX, whose XLA on CPU reduces a leading axis slowly
    (the AM-Softmax head step at 85,742 classes: 1.5x the matmul floor with the reduction, 1.25x pairwise);
    a reduction on TensorFlow, whose XLA is faster so (387 ms against 418 ms for that step)."""
    if keras.backend.backend() == "jax":
        return _pairwise_sum(a)
    return ops.sum(a, axis=0)


def _pairwise_sum(a, axis: int = 0):
    """Sum of the 2-D ``a`` along ``axis``: the halves added (an odd one carried) down to a few, which a
    reduction sums. That last reduction keeps XLA from inlining the final adds, recomputed, into every
    element of a kernel-sized consumer (Partial FC on JAX: 125 ms for the (d, C) update loop, against 45)."""

    def part(a, start, stop):
        return a[start:stop] if axis == 0 else a[:, start:stop]

    while a.shape[axis] > _PAIRWISE_ROWS:
        size, half = a.shape[axis], a.shape[axis] // 2
        summed = part(a, 0, half) + part(a, half, 2 * half)
        a = summed if size % 2 == 0 else ops.concatenate([summed, part(a, 2 * half, size)], axis=axis)
    return ops.sum(a, axis=axis)


_PAIRWISE_ROWS = 16  # terms left to the final reduction


def read_value(tensor):
    """A tensor holding the current value of ``tensor`` (a variable, array or tensor), for the inputs of an
    ``ops.custom_gradient`` op: TensorFlow's eager custom_gradient takes a variable read inside the op for a
    variable of its own and then expects a second set of gradients (``ops.convert_to_tensor`` of a Keras
    variable returns the variable on TensorFlow)."""
    return ops.cast(tensor, keras.backend.standardize_dtype(tensor.dtype))


def upstream_gradients(upstream) -> tuple:
    """The upstream gradients of an ``ops.custom_gradient`` op, one per output, on every backend.

    TensorFlow passes one gradient per output; JAX passes the outputs' structure (a tuple for several).
    """
    if len(upstream) == 1 and isinstance(upstream[0], (tuple, list)):
        return tuple(upstream[0])
    return tuple(upstream)


def sparse_labels(owner: str, labels, num_classes: int, batch: int | None = None):
    """Class ids (batch,) int32 from sparse (batch,)/(batch, 1) integer ids or one-hot (batch, C) labels.

    Where the labels enter: their dtype, their batch against ``batch`` (the predictions', when known: static
    shapes, checked at trace time), the range of the ids, one-hot rows. Ids stay integer end to end (never
    through a float dtype, where float32 rounds ids above 2^24); the range is checked in the labels' own
    dtype before the cast to int32, so an int64 id >= 2^31 cannot wrap to a valid one. Where nothing can
    raise (XLA), an invalid id or a row that is not one-hot becomes id -1: its loss is NaN.
    """
    kind = _validation.label_kind(owner, labels, num_classes)
    _validation.check_batch(owner, "labels", labels, batch, "the predictions")
    if kind == "one_hot":
        labels = _validation.check_one_hot(owner, labels, num_classes)
        ids = ops.cast(ops.argmax(labels, axis=-1), "int32")
        return ops.where(_validation.one_hot_rows(labels), ids, -1)
    ids = ops.reshape(labels, (-1,))
    ids = _validation.check_class_ids(owner, ids, num_classes)
    if _validation.dtype_name(ids) == "int32":
        return ids
    in_range = ops.logical_and(ids >= 0, ids < num_classes)  # in the ids' own dtype: no wrap-around
    return ops.where(in_range, ops.cast(ids, "int32"), -1)


def per_sample_scale(scale, x):
    """``scale`` (a float, a scalar tensor or a (batch, 1) tensor such as SphereFace's |x|) as (batch,) float32."""
    scale = ops.cast(scale, "float32")
    if len(scale.shape) == 0:
        return ops.zeros_like(ops.cast(x[:, 0], "float32")) + scale
    return ops.reshape(scale, (-1,))


def margin_logits(cos_theta, class_ids, target: TargetFn, scale, nontarget: NontargetFn | None = None):
    """Logits with the target column replaced by the objective's target cosine, times the scale.

    Formula:
    ```
    z_j = scale * cos_theta_j          (j != y; scale * nontarget(cos_theta, cos_theta_y)_j when given)
    z_y = scale * target(cos_theta_y)
    ```
    ``scale`` is a float, a scalar tensor or a (batch, 1) tensor (SphereFace's |x|). Rows whose class id
    is outside [0, C) (possible only under XLA, where no check can raise: see ``_validation``) become NaN,
    so a bad label can never produce a plausible loss.
    """
    z, _, valid = _logits_and_target(cos_theta, class_ids, target, scale, nontarget)
    return ops.where(valid[:, None], z, float("nan"))


def margin_cross_entropy(cos_theta, class_ids, target: TargetFn, scale, nontarget: NontargetFn | None = None):
    """Per-sample ``logsumexp(z) - z_y`` of ``margin_logits``, in float32; NaN for a class id outside [0, C).

    ``z_y`` is kept from building the target instead of being gathered back out of a (batch, C) matrix.
    Computed as ``softplus(logsumexp_{j != y}(z_j) - z_y)`` (the same value): its gradient w.r.t. z_y is
    ``-(1 - p_y)`` formed without the cancellation of ``p_y - 1``, so a well-classified sample's gradient
    keeps its float32 relative accuracy (``p_y - 1`` carries ~1e-7 absolute error whatever its size).
    ``nontarget`` (default None: the cosines as they are) modifies the non-target cosines, as in
    ``margin_logits``.
    """
    cos_theta = ops.cast(cos_theta, "float32")
    num_classes = cos_theta.shape[-1]
    is_target = _target_mask(class_ids, num_classes)
    cos_y = target_cosines(cos_theta, class_ids)
    z_y = ops.reshape(scale * target(cos_y)[:, None], (-1,))  # scale: a number, () or (batch, 1)
    other = cos_theta if nontarget is None else nontarget(cos_theta, cos_y[:, None])
    lse_other = ops.logsumexp(ops.where(is_target, float("-inf"), scale * other), axis=-1)
    # Marked here and not only in the logits: XLA's CPU math does not promise NaN propagation through
    # exp/log, but a select of a NaN constant survives.
    return ops.where(_valid(class_ids, num_classes), ops.softplus(lse_other - z_y), float("nan"))


def target_cosines(cos_theta, class_ids):
    """cos(theta_{y_i}) (batch,) float32: each row's value in its class's column; 0 where the id is outside [0, C).

    Picked by a gather of ``batch`` values, not a masked sum over the (batch, C) matrix (XLA on CPU writes
    the masked matrix out before reducing it: one more pass over (batch, C)). The gradient is written out
    as the upstream in the target column and zero elsewhere, a select that fuses into the rest of the
    backward pass (autodiff of the gather would scatter into a zero (batch, C) matrix).
    """
    num_classes = cos_theta.shape[-1]

    @ops.custom_gradient
    def op(cos_theta, class_ids):
        valid = _valid(class_ids, num_classes)
        picked = ops.take_along_axis(cos_theta, ops.where(valid, class_ids, 0)[:, None], axis=-1)[:, 0]

        def grad(*upstream, **_):
            (d_cos_y,) = upstream_gradients(upstream)
            d_cos_y = ops.cast(d_cos_y, cos_theta.dtype)[:, None]
            return ops.where(_target_mask(class_ids, num_classes), d_cos_y, ops.zeros_like(d_cos_y)), None

        return ops.where(valid, picked, 0.0), grad

    return op(ops.cast(cos_theta, "float32"), ops.cast(class_ids, "int32"))


def _target_mask(class_ids, num_classes: int):
    return ops.equal(ops.arange(num_classes, dtype="int32")[None, :], class_ids[:, None])


def _logits_and_target(cos_theta, class_ids, target: TargetFn, scale, nontarget: NontargetFn | None = None):
    """(z (batch, C), z_y (batch,), valid (batch,)) for ``margin_logits``."""
    cos_theta = ops.cast(cos_theta, "float32")
    num_classes = cos_theta.shape[-1]
    is_target = _target_mask(class_ids, num_classes)
    cos_y = target_cosines(cos_theta, class_ids)
    target_cos = target(cos_y)
    other = cos_theta if nontarget is None else nontarget(cos_theta, cos_y[:, None])
    z = scale * ops.where(is_target, target_cos[:, None], other)
    z_y = ops.reshape(scale * target_cos[:, None], (-1,))  # scale: a number, () or (batch, 1)
    return z, z_y, _valid(class_ids, num_classes)


def _valid(class_ids, num_classes: int):
    return ops.logical_and(class_ids >= 0, class_ids < num_classes)


def margin_softmax_loss(owner: str, y_true, cos_theta, target: TargetFn, scale):
    """Per-sample margin-softmax cross-entropy of cosines ``cos_theta`` (batch, C) and labels ``y_true``."""
    _validation.check_cosines(owner, cos_theta)
    class_ids = sparse_labels(owner, y_true, cos_theta.shape[-1], batch=cos_theta.shape[0])
    return margin_cross_entropy(cos_theta, class_ids, target, scale)


def agent_loss(owner: str, y_true, cos_theta, objective: Callable[[Any, Any], Any]):
    """Per-sample ``objective(cos_theta, class_ids)`` of an agent (distance) objective, with the same label
    handling and checks as ``margin_softmax_loss``: NaN for a class id outside [0, C)."""
    _validation.check_cosines(owner, cos_theta)
    class_ids = sparse_labels(owner, y_true, cos_theta.shape[-1], batch=cos_theta.shape[0])
    per_sample = objective(ops.cast(cos_theta, "float32"), class_ids)
    return ops.where(_valid(class_ids, cos_theta.shape[-1]), per_sample, float("nan"))
