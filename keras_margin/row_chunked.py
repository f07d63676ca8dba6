"""Exact margin-softmax loss over row chunks of the batch, its gradient formed in the forward pass
(``chunk_by="rows"``; ``keras_margin.chunked`` chunks over classes and dispatches between the two).

Each chunk of rows meets every class at once, so its log-sum-exp is final and the chunk's contribution
to the gradient is formed right there (three matrix products per chunk, the dense path's count); the
(batch, C) logits never exist. Owns the two custom-gradient ops (``target_cosine``, ``row_chunked_loss``)
and the per-sample loss built on them; the target logit comes from the objective's own target function.
"""

from __future__ import annotations

from keras import ops

from keras_margin import _validation
from keras_margin.core import (  # _NORM_EPS: the epsilon of l2_normalize / cosine_matrix, in their derivative
    _NORM_EPS,
    TargetFn,
    _valid,
    column_sq_norms,
    per_sample_scale,
    read_value,
    upstream_gradients,
)

_NEG_INF = float("-inf")


def _unit_rows(x32):
    """``(x / |x|, 1 / |x|)`` with the epsilon of ``core.l2_normalize``."""
    r = ops.rsqrt(ops.sum(ops.square(x32), axis=-1, keepdims=True) + _NORM_EPS)
    return x32 * r, r


def _through_unit_rows(x32, r, d_unit):
    """Gradient w.r.t. x of a gradient w.r.t. x_unit = x * r:  r * g - x * r^3 * <x, g>."""
    return r * d_unit - x32 * (r**3) * ops.sum(x32 * d_unit, axis=-1, keepdims=True)


def target_cosine(x, kernel, class_ids):
    """``cos(theta_y)`` (batch,) float32 from the B target columns, and ``kernel`` passed through.

    The kernel goes through this op on its way to ``row_chunked_loss`` so that the gradient of the
    target column (the margin's, through ``target``) is added into the incoming (d, C) kernel gradient
    in place (a scatter-add of B columns) instead of into a second (d, C) buffer. 0 where y is outside [0, C).
    """
    num_classes = kernel.shape[-1]

    @ops.custom_gradient
    def op(x, kernel, class_ids):
        valid = _valid(class_ids, num_classes)
        safe_ids = ops.where(valid, class_ids, 0)
        x32 = ops.cast(x, "float32")
        x_unit, r = _unit_rows(x32)
        w_y = ops.transpose(ops.cast(ops.take(kernel, safe_ids, axis=1), "float32"))   # (batch, d)
        inv_norm = ops.rsqrt(ops.sum(ops.square(w_y), axis=-1, keepdims=True) + _NORM_EPS)
        cos_y = ops.where(valid, ops.sum(x_unit * w_y, axis=-1) * inv_norm[:, 0], 0.0)

        def grad(*upstream, **_):
            d_cos, d_kernel = upstream_gradients(upstream)
            d_cos = ops.where(valid, ops.cast(d_cos, "float32"), 0.0)[:, None]
            d_kernel = ops.zeros(kernel.shape, kernel.dtype) if d_kernel is None else d_kernel
            # cos = <x_unit, w> / |w|:  d/dw = (x_unit - cos * w / |w|) / |w|,  d/dx_unit = w / |w|.
            d_w = d_cos * inv_norm * (x_unit - cos_y[:, None] * w_y * inv_norm)            # (batch, d)
            d_x = _through_unit_rows(x32, r, d_cos * w_y * inv_norm)
            dim = kernel.shape[0]
            rows = ops.tile(ops.arange(dim, dtype="int32")[None, :], (x.shape[0], 1))        # (batch, d)
            cols = ops.tile(safe_ids[:, None], (1, dim))
            indices = ops.reshape(ops.stack([rows, cols], axis=-1), (-1, 2))
            d_kernel = ops.scatter_update(d_kernel, indices, ops.reshape(ops.cast(d_w, d_kernel.dtype), (-1,)),
                                          reduction="add")
            return ops.cast(d_x, x.dtype), d_kernel, None

        return (cos_y, kernel), grad

    return op(x, read_value(kernel), ops.cast(class_ids, "int32"))


def _row_chunks(batch: int, rows: int, body, carry):
    """``carry = body(start, is_new, carry)`` over the batch, ``rows`` rows at a time.

    All chunks have the same size and run in one ``fori_loop`` (one loop body in the graph, so under XLA
    only one chunk's (rows, C) blocks are alive at a time). When ``rows`` does not divide the batch the
    last chunk is moved back to end at the last row, and ``is_new`` (rows,) marks the rows no earlier
    chunk covered: the body writes the others again (same values) and leaves them out of every sum.
    No separate remainder step, and every class is computed once per row.
    """
    num_chunks = -(-batch // rows)
    if num_chunks == 1:
        return body(0, ops.ones((rows,), dtype="bool"), carry)

    def loop_body(i, carry):
        first_new = i * rows
        start = ops.minimum(first_new, batch - rows)
        is_new = ops.arange(rows, dtype="int32") + start >= first_new
        return body(start, is_new, carry)

    return ops.fori_loop(0, num_chunks, loop_body, carry)


def row_chunked_loss(x, kernel, class_ids, scale, target_logit, rows: int, compute_dtype: str = "float32"):
    """Per-sample ``softplus(lse_other - z_y)`` over chunks of ``rows`` rows, gradient formed in the forward pass.

    Formula:
    ```
    cos = cosine_matrix(x, kernel)                           (rows, C) per chunk, never (batch, C)
    lse_other[i] = log(sum_{j != y_i} exp(scale[i] * cos[i, j]))
    loss[i] = softplus(lse_other[i] - target_logit[i])       target_logit: z_y, an input (see chunked_margin_loss)
    ```
    Forward, per chunk: the cosines (one product), the chunk's final log-sum-exp, and the gradient of
    its rows' losses for a unit upstream: d x (a second product, per row) and its share of the kernel
    gradient F = sum_i dL_i/dW (a third product, accumulated in place). Backward: the per-row parts
    scale by each row's upstream g_i exactly. The kernel part is exact when every g_i is equal (a head
    that adds the batch mean, with any loss scaling): g * F. Otherwise a second pass over the chunks
    recomputes sum_i g_i dL_i/dW (two more products per chunk), so the gradient is exact for any upstream.
    The target column is left out here (its gradient reaches the kernel through ``target_cosine``).

    Memory: a few (rows, C) blocks and F, (d, C) in the kernel's dtype, which becomes the kernel
    gradient. The bound holds under XLA (JAX, or TensorFlow with ``jit_compile=True``). Under jax.jit
    with the kernel donated, XLA adds one kernel-sized copy for the loop (as for any while loop that
    reads a donated buffer). On CPU each chunk's kernel-gradient update reads and writes the whole
    (d, C) block, so fewer, larger chunks are faster. A call whose gradient is never taken still
    may still form it (three products instead of one) unless XLA drops the unused loop results.

    Args:
        x: embeddings (batch, d). kernel: class weights (d, C). class_ids: int32 (batch,).
        scale: float32 (batch,). target_logit: float32 (batch,), z_y. rows: rows per chunk, >= 1.
        compute_dtype: dtype of the matrix products (the norms and the result are float32).

    Returns:
        float32 (batch,), the per-sample loss.
    """
    batch, num_classes = x.shape[0], kernel.shape[-1]
    rows = min(int(rows), batch)

    @ops.custom_gradient
    def op(x, kernel, class_ids, scale, target_logit):
        dim = kernel.shape[0]
        x32 = ops.cast(x, "float32")
        x_unit, r = _unit_rows(x32)
        x_mm = ops.cast(x_unit, compute_dtype)
        w_mm = ops.cast(kernel, compute_dtype)            # once, not per chunk (a no-op in float32)
        inv_norm = ops.rsqrt(column_sq_norms(kernel) + _NORM_EPS)   # (C,)
        x_mm_t = ops.transpose(x_mm)                     # (d, batch): the kernel-gradient product untransposed
        columns = ops.arange(num_classes, dtype="int32")[None, :]

        def chunk(start, is_new, row_weight):
            """The chunk's cosines, loss, d loss/d lse and non-target softmax, weighted d cos."""
            xc = ops.slice(x_mm, (start, 0), (rows, dim))
            ids = ops.slice(class_ids, (start,), (rows,))
            sc = ops.slice(scale, (start,), (rows,))
            cos = ops.cast(ops.matmul(xc, w_mm), "float32") * inv_norm
            logits = ops.where(ops.equal(columns, ids[:, None]), _NEG_INF, sc[:, None] * cos)
            lse = ops.logsumexp(logits, axis=-1)
            margin = lse - ops.slice(target_logit, (start,), (rows,))
            p = ops.sigmoid(margin)                                       # d loss / d lse
            softmax = ops.exp(logits - lse[:, None])                      # 0 in the target column
            weight = ops.where(is_new, p * sc * ops.slice(row_weight, (start,), (rows,)), 0.0)
            d_cos = weight[:, None] * softmax
            return (start, cos), cos, margin, p, softmax, d_cos

        def kernel_part(xc, cos, d_cos, d_kernel, col_sum):
            start, _ = xc
            d_product = ops.cast(d_cos * inv_norm, compute_dtype)
            xt = ops.slice(x_mm_t, (0, start), (dim, rows))
            d_kernel = d_kernel + ops.cast(ops.matmul(xt, d_product), d_kernel.dtype)
            return d_kernel, col_sum + ops.sum(d_cos * cos, axis=0)

        def finish(d_kernel, col_sum):
            # cos = (x_unit @ w) * inv_norm, inv_norm = (|w|^2 + eps)^(-1/2): the column-norm term, once.
            correction = ops.cast(kernel, "float32") * (ops.square(inv_norm) * col_sum)
            return d_kernel - ops.cast(correction, d_kernel.dtype)

        def forward_chunk(start, is_new, carry):
            loss, d_x_unit, d_scale, d_z, d_kernel, col_sum = carry
            ones = ops.ones_like(scale)
            xc, cos, margin, p, softmax, d_cos = chunk(start, is_new, ones)
            d_kernel, col_sum = kernel_part(xc, cos, d_cos, d_kernel, col_sum)
            d_rows = ops.cast(ops.matmul(ops.cast(d_cos * inv_norm, compute_dtype), ops.transpose(w_mm)), "float32")
            loss = ops.slice_update(loss, (start,), ops.softplus(margin))
            # Rows a previous chunk covered get their own values again (d_cos is masked, p is not needed).
            d_x_unit = ops.slice_update(d_x_unit, (start, 0), d_rows + ops.where(is_new[:, None], 0.0,
                                        ops.slice(d_x_unit, (start, 0), (rows, dim))))
            d_scale = ops.slice_update(d_scale, (start,), ops.where(
                is_new, p * ops.sum(softmax * cos, axis=-1), ops.slice(d_scale, (start,), (rows,))))
            d_z = ops.slice_update(d_z, (start,), -p)
            return loss, d_x_unit, d_scale, d_z, d_kernel, col_sum

        zeros = ops.zeros((batch,), "float32")
        loss, d_x_unit, d_scale, d_z, d_kernel, col_sum = _row_chunks(
            batch, rows, forward_chunk,
            (zeros, ops.zeros((batch, dim), "float32"), zeros, zeros,
             ops.zeros(kernel.shape, kernel.dtype), ops.zeros((num_classes,), "float32")))
        d_kernel = finish(d_kernel, col_sum)
        d_x = _through_unit_rows(x32, r, d_x_unit)

        def grad(*upstream, **_):
            (g,) = upstream_gradients(upstream)
            g = ops.cast(g, "float32")

            def reweighted():
                def backward_chunk(start, is_new, carry):
                    xc, cos, _, _, _, d_cos = chunk(start, is_new, g)
                    return kernel_part(xc, cos, d_cos, *carry)

                return finish(*_row_chunks(batch, rows, backward_chunk,
                                           (ops.zeros(kernel.shape, kernel.dtype),
                                            ops.zeros((num_classes,), "float32"))))

            uniform = ops.all(ops.equal(g, g[0]))
            d_w = ops.cond(uniform, lambda: d_kernel * ops.cast(g[0], d_kernel.dtype), reweighted)
            return (ops.cast(g[:, None] * d_x, x.dtype), d_w, None, g * d_scale, g * d_z)

        return loss, grad

    return op(x, read_value(kernel), ops.cast(class_ids, "int32"), ops.cast(scale, "float32"),
              ops.cast(target_logit, "float32"))


def row_chunked_margin_loss(x, kernel, class_ids, target: TargetFn, scale, chunk_size: int,
                        compute_dtype: str = "float32"):
    """Per-sample margin-softmax cross-entropy computed over row chunks; equal to the unchunked loss.

    Formula:
    ```
    cos_y = target_cosine(x, kernel, y)              the B target columns only
    z_y = scale * target(cos_y)
    loss = softplus(lse_other - z_y)                 row_chunked_loss: lse_other over j != y, by row chunks
         = log(exp(lse_other) + exp(z_y)) - z_y
    ```
    The margin touches only the target column, so ``target`` runs once on the (batch,) target cosines,
    outside the chunk loop, and ordinary autodiff carries its gradient (and that of ``scale``) back to
    ``target_cosine``. Each chunk holds ``chunk_size`` rows of the batch against all C classes: memory
    a few (chunk_size, C) blocks plus the kernel gradient, three matrix products per chunk, no class
    computed twice. The gradient is exact for any upstream gradient (see ``row_chunked_loss``: a uniform
    one, as from a batch mean, costs nothing more). Rows whose class id is outside [0, C) are NaN, as
    in ``core.margin_cross_entropy``.

    Args:
        x: embeddings (batch, embedding_dim). kernel: class weights (embedding_dim, C).
        class_ids: int (batch,). target: the objective's target function (e.g. ``MarginHead.target``).
        scale: float, scalar tensor or (batch, 1) tensor. chunk_size: rows of the batch per chunk, >= 1
            (more than the batch: one chunk).
        compute_dtype: dtype of the matrix products (default "float32").

    Example:
    >>> import numpy as np
    >>> from keras_margin.margins import amsoftmax_target
    >>> x, w = np.random.rand(4, 8).astype("float32"), np.random.rand(8, 10).astype("float32")
    >>> loss = row_chunked_margin_loss(x, w, np.array([0, 3, 5, 9]), lambda c: amsoftmax_target(c, 0.35), 30.0, 3)
    >>> tuple(loss.shape)
    (4,)
    """
    chunk_size = _validation.check_count("row_chunked_margin_loss", "chunk_size", chunk_size, minimum=1)
    class_ids = ops.cast(class_ids, "int32")
    scale = per_sample_scale(scale, x)
    cos_target, kernel = target_cosine(x, kernel, class_ids)
    target_logit = scale * target(cos_target)
    loss = row_chunked_loss(x, kernel, class_ids, scale, target_logit, chunk_size, compute_dtype)
    return ops.where(_valid(class_ids, kernel.shape[-1]), loss, float("nan"))
