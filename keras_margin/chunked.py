"""Exact margin-softmax loss over class chunks: a running log-sum-exp forward and a recomputing backward.

Owns the one custom-gradient op (``nontarget_logsumexp``) and the per-sample losses built on it; the
cosines come from ``core.cosine_matrix`` and the target logit from the objective's own target function.
"""

from __future__ import annotations

from keras import ops

from keras_margin import _validation
from keras_margin.core import (  # _NORM_EPS: the epsilon of l2_normalize / cosine_matrix, in their derivative
    _NORM_EPS,
    TargetFn,
    _valid,
    column_sq_norms,
    cosine_matrix,
    l2_normalize,
    margin_cross_entropy,
    per_sample_scale,
    read_value,
    unit_column_product_gradients,
    upstream_gradients,
)

_NEG_INF = float("-inf")


def _for_each_chunk(num_classes: int, chunk_size: int, body, carry):
    """``carry = body(start, is_new, carry)`` over the classes, ``chunk_size`` columns at a time.

    All chunks have the same size and run in one ``fori_loop`` (a single loop body in the graph, so
    under XLA only one chunk's (batch, chunk) blocks are alive at a time). When ``chunk_size`` does not
    divide C the last chunk is moved back to end at column C, and ``is_new`` (chunk_size,) marks the
    columns no earlier chunk covered; the body ignores the others. No separate remainder step: under
    XLA that is what lets the kernel gradient be written in place.
    """
    num_chunks = -(-num_classes // chunk_size)
    if num_chunks == 1:
        return body(0, ops.ones((chunk_size,), dtype="bool"), carry)

    def loop_body(i, carry):
        first_new = i * chunk_size
        start = ops.minimum(first_new, num_classes - chunk_size)
        is_new = ops.arange(chunk_size, dtype="int32") + start >= first_new
        return body(start, is_new, carry)

    return ops.fori_loop(0, num_chunks, loop_body, carry)


def _chunk_columns(start, chunk_size: int):
    return ops.arange(chunk_size, dtype="int32")[None, :] + ops.cast(start, "int32")


def nontarget_logsumexp(x, kernel, class_ids, scale, chunk_size: int, compute_dtype: str = "float32",
                        classes_first: bool = False, scale_gradient: bool = True):
    """Log-sum-exp of ``scale * cos(theta_j)`` over the non-target classes, and ``cos(theta_y)``, by chunks.

    Formula:
    ```
    cos = cosine_matrix(x, kernel)                        (batch, C), never materialized
    lse_other[i] = log(sum_{j != y_i} exp(scale[i] * cos[i, j]))
    cos_target[i] = cos[i, y_i]                           (0 where y_i is outside [0, C))
    ```
    Peak memory is a few (batch, chunk_size) blocks (about six, measured under XLA) plus the
    (embedding_dim, C) kernel gradient: the forward pass keeps a running log-sum-exp, and the custom
    gradient recomputes each chunk's cosines in the backward pass instead of keeping them, writing the
    kernel gradient chunk by chunk. Compute: four matrix products per chunk (forward, recomputation,
    two for the gradient) against the dense path's three.

    The bound holds under XLA (JAX, or TensorFlow with ``jit_compile=True``). TensorFlow without XLA
    (Keras' default on CPU) runs up to 10 loop iterations at once and copies the kernel gradient at
    each chunk, so there the chunked path saves no memory; it is still exact.

    Args:
        x: embeddings (batch, embedding_dim), not necessarily normalized.
        kernel: class weights (embedding_dim, C), one column per class; (C, embedding_dim) with
            ``classes_first`` (class-major: each chunk is a block of rows, as is its gradient).
        class_ids: int32 (batch,).
        scale: float32 (batch,), the factor turning cosines into logits (differentiable).
        scale_gradient: False when ``scale`` is a constant (a fixed s): its gradient, a (batch, chunk)
            reduction per chunk in the backward pass, is then not formed (zeros are returned).
        chunk_size: classes per chunk, >= 1.
        compute_dtype: dtype of the matrix products (the norms and the result are float32).

    Returns:
        ``(lse_other, cos_target)``, both float32 (batch,).
    """
    num_classes = class_count(kernel, classes_first)
    chunk_size = min(int(chunk_size), num_classes)

    def classes(tensor, start):
        """The chunk's ``chunk_size`` classes of a kernel-shaped tensor, from class ``start``."""
        if classes_first:
            return ops.slice(tensor, (start, 0), (chunk_size, tensor.shape[1]))
        return ops.slice(tensor, (0, start), (tensor.shape[0], chunk_size))

    @ops.custom_gradient
    def op(x, kernel, class_ids, scale):
        x32 = ops.cast(x, "float32")
        zeros = ops.zeros_like(x32[:, 0])

        def forward_chunk(start, is_new, carry):
            lse_other, cos_target = carry
            cos = cosine_matrix(x32, classes(kernel, start), compute_dtype, classes_first)
            is_target = ops.equal(_chunk_columns(start, chunk_size), class_ids[:, None])
            cos_target = cos_target + ops.sum(ops.where(is_target & is_new, cos, 0.0), axis=-1)
            logits = ops.where(is_target | ~is_new, _NEG_INF, scale[:, None] * cos)
            return ops.logaddexp(lse_other, ops.logsumexp(logits, axis=-1)), cos_target

        lse_other, cos_target = _for_each_chunk(
            num_classes, chunk_size, forward_chunk, (zeros + _NEG_INF, zeros)
        )

        def grad(*upstream, **_):
            d_lse, d_cos_target = (ops.cast(g, "float32") for g in upstream_gradients(upstream))
            x_unit = l2_normalize(x32)

            def backward_chunk(start, is_new, carry):
                d_x_unit, d_scale, d_kernel = carry
                w = ops.cast(classes(kernel, start), "float32")
                inv_norm = ops.rsqrt(column_sq_norms(w, classes_first) + _NORM_EPS)
                cos = cosine_matrix(x32, w, compute_dtype, classes_first)           # recomputed, not stored
                is_target = ops.equal(_chunk_columns(start, chunk_size), class_ids[:, None])
                logits = ops.where(is_target | ~is_new, _NEG_INF, scale[:, None] * cos)
                softmax = ops.exp(logits - lse_other[:, None])        # over non-target classes
                d_cos = (d_lse * scale)[:, None] * softmax + ops.where(is_target & is_new,
                                                                       d_cos_target[:, None], 0.0)
                if scale_gradient:
                    d_scale = d_scale + d_lse * ops.sum(softmax * cos, axis=-1)
                # cos = (x_unit @ w) * inv_norm, inv_norm = (|w|^2 + eps)^(-1/2), column by column.
                # A plain column sum: the pairwise halving would keep halved (batch, chunk) copies alive in
                # the loop, and JAX reduces a chunk's few thousand columns quickly.
                d_x_chunk, d_w = unit_column_product_gradients(x_unit, w, inv_norm, cos, d_cos, compute_dtype,
                                                               reduce_rows=lambda a: ops.sum(a, axis=0),
                                                               classes_first=classes_first)
                d_x_unit = d_x_unit + d_x_chunk
                # Columns already covered by the previous chunk get d_w = 0 here: accumulate, in place.
                d_w = classes(d_kernel, start) + ops.cast(d_w, d_kernel.dtype)
                d_kernel = ops.slice_update(d_kernel, (start, 0) if classes_first else (0, start), d_w)
                return d_x_unit, d_scale, d_kernel

            d_x_unit, d_scale, d_kernel = _for_each_chunk(
                num_classes, chunk_size, backward_chunk,
                (ops.zeros_like(x32), zeros, ops.zeros(kernel.shape, dtype=kernel.dtype)),
            )
            # x_unit = x * r, r = (|x|^2 + eps)^(-1/2)  =>  dx = r * g - x * r^3 * <x, g>.
            r = ops.rsqrt(ops.sum(ops.square(x32), axis=-1, keepdims=True) + _NORM_EPS)
            d_x = r * d_x_unit - x32 * (r**3) * ops.sum(x32 * d_x_unit, axis=-1, keepdims=True)
            return ops.cast(d_x, x.dtype), d_kernel, None, d_scale

        return (lse_other, cos_target), grad

    return op(x, read_value(kernel), ops.cast(class_ids, "int32"), ops.cast(scale, "float32"))


def chunked_margin_loss(x, kernel, class_ids, target: TargetFn, scale, chunk_size: int,
                        compute_dtype: str = "float32", classes_first: bool = False):
    """Per-sample margin-softmax cross-entropy computed over class chunks; equal to the unchunked loss.

    Formula:
    ```
    z_y = scale * target(cos_theta_y)
    loss = log(exp(lse_other) + exp(z_y)) - z_y      lse_other from nontarget_logsumexp
         = softplus(lse_other - z_y)                 (computed so: no cancellation in d loss / d z_y)
    ```
    The margin touches only the target column, so ``target`` runs once on the (batch,) target cosines,
    outside the chunk loop, and ordinary autodiff carries its gradient (and that of ``scale``).
    Rows whose class id is outside [0, C) are NaN, as in ``core.margin_cross_entropy``.

    Args:
        x: embeddings (batch, embedding_dim). kernel: class weights (embedding_dim, C).
        class_ids: int (batch,). target: the objective's target function (e.g. ``MarginHead.target``).
        scale: float, scalar tensor or (batch, 1) tensor. chunk_size: classes per chunk, >= 1.
        compute_dtype: dtype of the matrix products (default "float32").
        classes_first: the kernel is class-major, (C, embedding_dim).

    Example:
    >>> import numpy as np
    >>> from keras_margin.margins import amsoftmax_target
    >>> x, w = np.random.rand(4, 8).astype("float32"), np.random.rand(8, 10).astype("float32")
    >>> loss = chunked_margin_loss(x, w, np.array([0, 3, 5, 9]), lambda c: amsoftmax_target(c, 0.35), 30.0, 4)
    >>> tuple(loss.shape)
    (4,)
    """
    chunk_size = _validation.check_count("chunked_margin_loss", "chunk_size", chunk_size, minimum=1)
    class_ids = ops.cast(class_ids, "int32")
    scale_gradient = not isinstance(scale, (int, float))  # a Python number (a fixed s) has no gradient
    scale = per_sample_scale(scale, x)
    lse_other, cos_target = nontarget_logsumexp(x, kernel, class_ids, scale, chunk_size, compute_dtype,
                                                classes_first, scale_gradient)
    target_logit = scale * target(cos_target)
    loss = ops.softplus(lse_other - target_logit)  # = logaddexp(lse_other, z_y) - z_y, no cancellation in d/dz_y
    return ops.where(_valid(class_ids, class_count(kernel, classes_first)), loss, float("nan"))


def class_count(kernel, classes_first: bool = False) -> int:
    """C of a (d, C) kernel, or of a class-major (C, d) one."""
    return kernel.shape[0] if classes_first else kernel.shape[-1]


CHUNK_BY = ("classes", "rows")


def check_chunk_by(owner: str, chunk_by) -> str:
    """``chunk_by`` must be "classes" (this module's chunks) or "rows" (``keras_margin.row_chunked``)."""
    if chunk_by not in CHUNK_BY:
        raise ValueError(f"{owner}: `chunk_by` must be one of {CHUNK_BY}; got {chunk_by!r}.")
    return chunk_by


def margin_loss(x, kernel, class_ids, target: TargetFn, scale, chunk_size: int | None = None,
                compute_dtype: str = "float32", chunk_by: str = "classes", classes_first: bool = False):
    """Per-sample margin-softmax cross-entropy from embeddings and class weights.

    ``chunk_size=None``: the (batch, C) path of ``core`` (cosines, margin logits, cross-entropy).
    Otherwise the same numbers by chunks, two ways:
    - ``chunk_by="classes"``: ``chunked_margin_loss``, chunks of ``chunk_size`` classes, O(batch x chunk_size)
      memory beyond the kernel gradient, four matrix products per chunk (the backward pass recomputes).
    - ``chunk_by="rows"``: ``row_chunked.row_chunked_margin_loss``, chunks of ``chunk_size`` rows of the batch
      against every class, O(chunk_size x C) memory, three matrix products (the dense path's count).
    ``classes_first``: the kernel is class-major, (C, d) (not with ``chunk_by="rows"``).
    """
    if chunk_size is None:
        class_ids = ops.cast(class_ids, "int32")
        return margin_cross_entropy(cosine_matrix(x, kernel, compute_dtype, classes_first), class_ids, target, scale)
    if check_chunk_by("margin_loss", chunk_by) == "rows":
        if classes_first:
            raise ValueError("margin_loss: chunk_by='rows' takes a (d, C) kernel, not a class-major one "
                             "(kernel_layout='classes_first'); chunk by classes.")
        from keras_margin.row_chunked import row_chunked_margin_loss

        return row_chunked_margin_loss(x, kernel, class_ids, target, scale, chunk_size, compute_dtype)
    return chunked_margin_loss(x, kernel, class_ids, target, scale, chunk_size, compute_dtype, classes_first)
