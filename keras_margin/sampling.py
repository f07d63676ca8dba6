"""Sampled classes (Partial FC): each step keeps the batch's classes plus a uniform subset of the others.

Owns the choice of the sampled classes and the relabelling into the sampled set; the loss over the
sampled columns is the ordinary (or chunked) margin loss of ``keras_margin.chunked``.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_margin import _validation
from keras_margin.core import read_value, upstream_gradients


def check_sample_rate(owner: str, sample_rate) -> float:
    """``sample_rate`` must be a number in (0, 1]."""
    return _validation.check_number(owner, "sample_rate", sample_rate, low=0.0, low_open=True, high=1.0)


SAMPLE_UPDATES = ("all", "sampled")


def check_sample_update(owner: str, sample_update, sample_rate: float) -> str:
    """``sample_update`` is "all" (PartialFC_V2) or "sampled" (PartialFC v1, needs ``sample_rate`` < 1)."""
    if sample_update not in SAMPLE_UPDATES:
        raise ValueError(f"{owner}: `sample_update` must be one of {SAMPLE_UPDATES}; got {sample_update!r}.")
    if sample_update == "sampled" and sample_rate >= 1.0:
        raise ValueError(f"{owner}: `sample_update='sampled'` (Partial FC's first version: only the sampled "
                         f"columns are stepped) needs class sampling; pass sample_rate < 1 (got {sample_rate}).")
    return sample_update


_MARKER_ATTRIBUTE = "_keras_margin_sampled_kernel"


def pair_sample_marker(marker, kernel, channel, classes_first: bool = False) -> None:
    """Tag a head's ``sampled_columns`` weight with the kernel whose sample its gradient carries, the
    head's ``sample_gradient`` weight, whose gradient is the sampled columns' gradient, and the kernel's
    layout (``classes_first``: class-major (C, d))."""
    setattr(marker, _MARKER_ATTRIBUTE, (kernel, channel, bool(classes_first)))


def sampled_kernel(variable):
    """The kernel whose sample ``variable``'s gradient carries, when it is a ``sampled_columns`` weight; else None."""
    pair = getattr(variable, _MARKER_ATTRIBUTE, None)
    return None if pair is None else pair[0]


def sample_gradient_weight(marker):
    """The ``sample_gradient`` weight paired with a ``sampled_columns`` weight (its head's)."""
    return getattr(marker, _MARKER_ATTRIBUTE)[1]


def sampled_kernel_is_classes_first(marker) -> bool:
    """Whether the kernel paired with a ``sampled_columns`` weight is class-major, (C, d)."""
    return getattr(marker, _MARKER_ATTRIBUTE)[2]


def num_sampled_classes(num_classes: int, sample_rate: float, batch_size: int | None = None) -> int:
    """How many classes a step keeps: ``ceil(rate * C)``, raised to the batch size so every positive fits.

    Formula:
    ```
    K = min(C, max(ceil(sample_rate * C), batch_size))     (batch_size ignored when unknown)
    ```
    """
    k = math.ceil(sample_rate * num_classes)
    if batch_size is not None:
        k = max(k, int(batch_size))
    return int(min(num_classes, max(k, 1)))


def sample_classes(class_ids, num_classes: int, num_sampled: int, seed=None):
    """The classes of one step and the batch's labels within them (Partial FC, InsightFace).

    Every class present in ``class_ids`` is kept; the remaining ``num_sampled - #positives`` slots are a
    uniform random subset of the other classes (``random_scores``, positives lifted above all of them, top-k).

    Args:
        class_ids: int (batch,) labels in [0, num_classes).
        num_classes: C.
        num_sampled: K, the static number of classes kept, in [1, C].
        seed: a ``keras.random.SeedGenerator`` (or int / None) for the uniform scores.

    Returns:
        ``(sampled, sampled_ids)``: int32 (K,) distinct class indices in increasing order (the columns to
        gather from the kernel) and int32 (batch,) labels re-indexed into ``sampled``; -1 for a label that
        is not in the sampled set (possible only when the batch has more distinct classes than K, or for an
        out-of-range id), which the loss turns into NaN rather than a wrong number.

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> sampled, ids = sample_classes(np.array([3, 7, 3]), num_classes=10, num_sampled=4, seed=0)
    >>> s = ops.convert_to_numpy(sampled)
    >>> [int(s[i]) for i in ops.convert_to_numpy(ids)]
    [3, 7, 3]
    """
    class_ids = ops.cast(ops.reshape(class_ids, (-1,)), "int32")
    valid = ops.logical_and(class_ids >= 0, class_ids < num_classes)
    safe_ids = ops.where(valid, class_ids, 0)
    # Count of each class in the batch (sparse scatter: O(C), never a (batch, C) one-hot).
    present = ops.scatter(safe_ids[:, None], ops.cast(valid, "float32"), (num_classes,))
    scores = ops.where(present > 0, _LIFTED, random_scores(num_classes, seed))
    _, sampled = ops.top_k(scores, num_sampled, sorted=False)
    # In increasing order: the kernel's columns are then read in memory order (TensorFlow XLA CPU, d=512,
    # C=85,742: a plain column gather of K=8,575 takes 31 ms unsorted, 14 ms sorted).
    sampled = ops.sort(ops.cast(sampled, "int32"))
    position = _positions(sampled, num_classes)
    sampled_ids = ops.where(valid, ops.take(position, safe_ids), -1)
    return sampled, sampled_ids


# lowbias32 (C. Wellons' integer hash search): x ^= x >> 16; x *= M1; x ^= x >> 15; x *= M2; x ^= x >> 16.
_HASH_SHIFTS, _HASH_MULTIPLIERS = (16, 15, 16), (0x7FEB352D, 0x846CA68B)
_SCORE_BITS = 24  # scores are float32 integers below 2^24: exact, and top-k on float32 is fast
_LIFTED = float(2**_SCORE_BITS)  # above every score: the positives' score


def _hash32(h):
    """lowbias32 of a uint32 tensor (multiplications wrap modulo 2^32)."""
    for shift, multiplier in zip(_HASH_SHIFTS[:2], _HASH_MULTIPLIERS):
        h = ops.bitwise_xor(h, ops.right_shift(h, shift))
        h = ops.multiply(h, ops.convert_to_tensor(multiplier, "uint32"))
    return ops.bitwise_xor(h, ops.right_shift(h, _HASH_SHIFTS[2]))


def random_scores(num_classes: int, seed=None):
    """float32 (C,) pseudo-random integer scores in [0, 2^24), one per class; a new draw from ``seed`` per call.

    Formula:
    ```
    k1, k2 = keras.random.randint((2,), 0, 2^31 - 1, seed)      two keys: the only draw from the generator
    score_j = hash(hash(j ^ k1) ^ k2) >> 8                      hash: the lowbias32 integer hash
    ```
    The top-k of the scores is a uniform random subset of the classes (tested for uniform inclusion and
    for pairs sampled together). A counter-based hash rather than ``keras.random.uniform((C,))`` for
    speed: under TensorFlow XLA on CPU, Keras' uniform over 85,742 classes takes 38 ms (its default
    stateless algorithm); two rounds of the hash take 0.3 ms, the same ops on every backend. Float32,
    not int32: XLA's CPU top-k of 8,575 from 85,742 takes 4 ms on float32 and 23 ms on int32.

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> scores = ops.convert_to_numpy(random_scores(1000, seed=0))
    >>> bool(scores.min() >= 0 and scores.max() < 2**24 and len(np.unique(scores)) > 990)
    True
    """
    keys = ops.cast(keras.random.randint((2,), 0, 2**31 - 1, seed=seed, dtype="int32"), "uint32")
    h = ops.cast(ops.arange(num_classes, dtype="int32"), "uint32")
    h = _hash32(ops.bitwise_xor(_hash32(ops.bitwise_xor(h, keys[0])), keys[1]))
    return ops.cast(ops.cast(ops.right_shift(h, 32 - _SCORE_BITS), "int32"), "float32")


def _positions(sampled, num_classes: int):
    """int32 (C,): the position of every class in ``sampled``, -1 for the classes left out."""
    num_sampled = sampled.shape[0]
    # +1, so that the classes left out read -1 after the shift.
    return ops.scatter(sampled[:, None], ops.arange(1, num_sampled + 1, dtype="int32"), (num_classes,)) - 1


def take_columns(kernel, sampled, marker=None, channel=None, classes_first: bool = False):
    """The sampled columns ``kernel[:, sampled]``, with the gradient formed by a gather instead of a scatter.

    Formula:
    ```
    forward:   W_s = W[:, sampled]                                     (d, K)
    backward:  dL/dW[:, j] = dL/dW_s[:, p(j)]  if class j is sampled    (d, C)
                           = 0                 otherwise                p(j): its position in `sampled`
               dL/dmarker[j] = 1 if class j is sampled, else 0          (C,), with `marker`
               dL/dchannel = dL/dW_s                                    (d, K), with `channel`
    ```
    The values are those of ``ops.take(kernel, sampled, axis=1)`` and of its gradient (a dense (d, C)
    tensor, zero outside the sample, as in InsightFace's PartialFC_V2: the optimizer still sees every
    column). Only how the gradient is formed differs: ``ops.take``'s gradient is a scatter-add, which XLA
    on CPU runs element by element (TensorFlow, d=512, C=85,742, K=8,575: 0.61 s per step against 0.06 s
    for this gather; JAX: 0.14 s against 0.04 s). Exact because the sampled classes are distinct
    (``sample_classes`` draws them with top-k), so no column receives two gradients.

    ``marker`` and ``channel`` (a head's ``sampled_columns`` and ``sample_gradient`` weights, with
    ``sample_update="sampled"``) take no part in the value; their gradients are the step's sample and the
    sampled columns' own gradient, which is how ``keras_margin.PartialFCOptimizer`` learns which columns to
    step, and with what. Through autodiff, because that reaches the optimizer on every backend and inside
    ``jax.jit``, where an optimizer cannot read a variable the forward pass assigned. An optimizer that
    steps the columns from ``channel``'s gradient leaves the dense (d, C) one unused, and XLA then never
    forms it. With ``channel``, ``sampled`` must be increasing (as ``sample_classes`` returns it), the order
    ``sample_indices`` recovers from the marker.

    ``classes_first``: the kernel is class-major, (C, d); the sample is its rows ``kernel[sampled]`` (K, d),
    contiguous blocks of memory (a (d, C) kernel's sampled columns are single elements spread over every
    row), and ``channel`` is (K, d).

    Args:
        kernel: (d, C) class weights, or (C, d) with ``classes_first``.
        sampled: int (K,) distinct class indices in [0, C).
        marker: optional (C,) float variable or tensor whose gradient is to be the sample's indicator.
        channel: optional (d, K) ((K, d)) float variable or tensor whose gradient is to be ``dL/dW_s``.
        classes_first: the kernel's layout (a head's ``kernel_layout="classes_first"``).

    Returns:
        (d, K) ``kernel[:, sampled]``; (K, d) ``kernel[sampled]`` with ``classes_first``.

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> kernel = np.arange(12.0, dtype="float32").reshape(2, 6)
    >>> ops.convert_to_numpy(take_columns(kernel, np.array([4, 1], dtype="int32"))).tolist()
    [[4.0, 1.0], [10.0, 7.0]]
    """
    kernel = read_value(kernel)
    sampled = ops.cast(sampled, "int32")
    num_classes, d = kernel.shape if classes_first else kernel.shape[::-1]
    sample_shape = (sampled.shape[0], d) if classes_first else (d, sampled.shape[0])
    extras = {"marker": (marker, (num_classes,)), "channel": (channel, sample_shape)}
    extras = {name: (read_value(value), shape) for name, (value, shape) in extras.items() if value is not None}
    for name, (value, shape) in extras.items():
        if tuple(value.shape) != shape:
            raise ValueError(f"take_columns: `{name}` must have shape {shape}; got {tuple(value.shape)}.")
    names = tuple(extras)
    inputs = (kernel, sampled) + tuple(value for value, _ in extras.values())

    @ops.custom_gradient
    def op(*inputs):
        kernel, sampled = inputs[:2]
        position = _positions(sampled, num_classes)

        def grad(*upstream, **_):
            (upstream,) = upstream_gradients(upstream)
            # With a marker, read twice by PartialFCOptimizer(update="dense"): materialized, so in row order.
            d_kernel = _spread_columns(upstream, position, 0.0, row_order="marker" in names,
                                       classes_first=classes_first)
            extra_grads = {"marker": lambda dtype: ops.cast(position >= 0, dtype),
                           "channel": lambda dtype: ops.cast(upstream, dtype)}
            return (ops.cast(d_kernel, kernel.dtype), None,
                    *(extra_grads[name](value.dtype) for name, value in zip(names, inputs[2:])))

        return gather_columns(kernel, sampled, classes_first), grad

    return op(*inputs)


def sample_indices(indicator, num_sampled: int):
    """The sampled classes, increasing, from a step's (C,) indicator (``sampled_columns``' gradient).

    Formula:
    ```
    p_j = (sum_{i <= j} [indicator_i > 0]) - 1          position of class j among the sampled ones
    indices[p_j] = j                                    for every j with indicator_j > 0
    ```
    Exactly ``num_sampled`` entries of ``indicator`` must be positive (the head's static K).

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> ops.convert_to_numpy(sample_indices(np.array([0.0, 1.0, 0.0, 1.0, 1.0]), 3)).tolist()
    [1, 3, 4]
    """
    chosen = ops.cast(indicator, "float32") > 0  # a float indicator or a boolean mask
    num_classes = chosen.shape[0]
    position = ops.cumsum(ops.cast(chosen, "int32")) - 1
    # The unsampled classes land on the extra slot num_sampled, dropped after the scatter.
    slot = ops.where(chosen, position, num_sampled)
    classes = ops.where(chosen, ops.arange(num_classes, dtype="int32"), 0)
    return ops.scatter(slot[:, None], classes, (num_sampled + 1,))[:num_sampled]


def gather_columns(kernel, sampled, classes_first: bool = False):
    """``kernel[:, sampled]`` (d, K), gathered as single elements of the flat kernel where int32 indexes it;
    ``kernel[sampled]`` (K, d), whole rows, for a class-major kernel (``classes_first``).

    The values of ``ops.take(kernel, sampled, axis=1)``, which XLA on CPU forms in (K, d) order (each
    column read with a stride of C); that transposed layout then reaches the later (d, K) operations, the
    backward pass's (d, C) gradient loop included. The flat gather writes (d, K) in row order. TensorFlow
    XLA, d=512, C=85,742, K=8,575 sorted classes: the gather 8.7 ms against 13.6 ms, the whole Partial FC
    training step 92 ms against 119 ms.
    """
    if classes_first:
        return ops.take(kernel, sampled, axis=0)
    d, num_classes = kernel.shape
    if d * num_classes >= _FLAT_INDEX_LIMIT:
        return ops.take(kernel, sampled, axis=1)
    return ops.reshape(ops.take(ops.reshape(kernel, (-1,)), _flat_indices(d, num_classes, sampled)),
                       (d, sampled.shape[0]))


def scatter_columns(kernel, sampled, columns, classes_first: bool = False):
    """``kernel`` with ``kernel[:, sampled] = columns`` (d, K): the inverse of ``gather_columns``
    (``kernel[sampled] = columns`` (K, d) for a class-major kernel, ``classes_first``).

    Formula:
    ```
    out[:, j] = columns[:, p(j)]   if class j is sampled (p(j): its position in `sampled`)
              = kernel[:, j]       otherwise
    ```
    Two equal ways. XLA on CPU scatters element by element: TensorFlow, d=512, C=85,742, K=8,575: 32 ms
    (JAX 24 ms), about 3 us per sampled column; a select over every column (``where(sampled, columns[:, p(j)],
    kernel[:, j])``, one pass over the kernel) takes 18 ms (JAX 16 ms), about 0.2 us per class. On TensorFlow
    the select from K >= C / 16 (the Partial FC v1 step at rate 0.1: 0.100 s against 0.125 s), below it the
    scatter; on JAX always the scatter (written as single elements of the flat kernel in row order where
    int32 indexes it): inside a whole training step XLA copies a kernel that the select rewrites while the
    forward pass reads it (the same step: 0.205 s and a kernel-sized temporary, against 0.128 s). Either
    updates the kernel's buffer in place when nothing else reads it (a training step's variable update).
    A class-major kernel takes the K rows by a scatter of whole rows on every backend (TensorFlow: 7.8 ms
    for the shapes above).
    """
    columns = ops.cast(columns, kernel.dtype)
    if classes_first:
        return ops.scatter_update(kernel, ops.cast(sampled, "int32")[:, None], columns)
    d, num_classes = kernel.shape
    num_sampled = sampled.shape[0]
    if keras.backend.backend() == "tensorflow" and num_sampled * _SELECT_FROM >= num_classes:
        return _spread_columns(columns, _positions(sampled, num_classes), kernel)
    if d * num_classes >= _FLAT_INDEX_LIMIT:
        rows = ops.broadcast_to(ops.arange(d, dtype="int32")[:, None], (d, num_sampled))
        coordinates = ops.stack([rows, ops.broadcast_to(sampled[None, :], rows.shape)], axis=-1)
        return ops.scatter_update(kernel, ops.reshape(coordinates, (-1, 2)), ops.reshape(columns, (-1,)))
    flat = ops.scatter_update(ops.reshape(kernel, (-1,)), _flat_indices(d, num_classes, sampled)[:, None],
                              ops.reshape(columns, (-1,)))
    return ops.reshape(flat, (d, num_classes))


_SELECT_FROM = 16  # TensorFlow: scatter_columns selects over every column when K * 16 >= C (3 us vs 0.2 us a column)


def _spread_columns(columns, position, otherwise, row_order: bool = True, classes_first: bool = False):
    """(d, C): column j is ``columns[:, position[j]]`` where ``position[j] >= 0``, else ``otherwise``'s (a (d, C)
    tensor or a scalar). ``row_order`` gathers through ``gather_columns`` (written in row order), else
    ``ops.take`` (which XLA on CPU forms transposed: cheaper when the result is read once, in a fusion).
    ``classes_first``: the same in rows, (K, d) to (C, d)."""
    safe = ops.maximum(position, 0)
    if classes_first:
        return ops.where(position[:, None] >= 0, ops.take(columns, safe, axis=0), ops.cast(otherwise, columns.dtype))
    spread = gather_columns(columns, safe) if row_order else ops.take(columns, safe, axis=1)
    return ops.where(position[None, :] >= 0, spread, ops.cast(otherwise, spread.dtype))


def _flat_indices(d: int, num_classes: int, sampled):
    """int32 (d * K,): the flat positions of ``kernel[:, sampled]`` in row order."""
    return ops.reshape(ops.arange(d, dtype="int32")[:, None] * num_classes + sampled[None, :], (-1,))


_FLAT_INDEX_LIMIT = 2**31  # flat int32 indices of the kernel; above, the plain column gather
