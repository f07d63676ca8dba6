"""Argument, shape and label checks shared by every head and loss: clear ValueErrors, never a TF stack trace.

Checks on values (class ids in range, finite features) run where the values are concrete (eager execution,
NumPy input, JAX outside ``jit``). Class ids are also checked inside a TensorFlow graph (``tf.function``
without XLA, what ``model.fit`` runs on a CPU-only TensorFlow) by a ``tf.debugging.Assert`` with the same
message: this module is the only one with backend-specific code. Under XLA (``jit_compile=True``, JAX's
``jit``) nothing can raise, and the core marks such rows with NaN instead
(``keras_margin.callbacks.NaNLossDiagnosis`` then names the batch).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from keras import backend

#: Largest finite float32: the heads and losses compute in float32, so a hyper-parameter beyond it is inf there.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_number(owner: str, name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as a float after checking it is a finite number, also in float32, inside an interval.

    Example:
    >>> check_number("AMSoftmaxLoss", "s", 1e39, low=0.0, low_open=True)
    Traceback (most recent call last):
    ...
    ValueError: AMSoftmaxLoss: `s` must be a finite number in (0.0, inf) that float32 can hold ...
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{owner}: `{name}` must be a number; got {value!r} of type {type(value).__name__}.")
    value = float(value)
    # Finite in float64 is not enough: the computation is float32, where 1e39 is already inf.
    bad = not math.isfinite(value) or abs(value) > FLOAT32_MAX
    if low is not None:
        bad = bad or (value <= low if low_open else value < low)
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{owner}: `{name}` must be a finite number in {interval} that float32 can hold "
                         f"(|{name}| <= {FLOAT32_MAX:.4g}); got {value!r}.")
    return value


def check_scale(owner: str, s: Any) -> float:
    """The scale ``s`` of every objective: a finite number > 0."""
    return check_number(owner, "s", s, low=0.0, low_open=True)


def check_bool(owner: str, name: str, value: Any) -> bool:
    """``value`` must be a bool (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: `{name}` must be a bool; got {value!r}.")
    return value


def check_count(owner: str, name: str, value: Any, *, minimum: int) -> int:
    """Return ``value`` after checking it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{owner}: `{name}` must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def concrete_value(x: Any) -> np.ndarray | None:
    """The NumPy value of ``x`` when it has one (eager tensor, array), else None (symbolic or traced)."""
    if isinstance(x, np.ndarray):
        return x
    if backend.is_keras_tensor(x):
        return None
    try:
        return np.asarray(x)
    except Exception:  # symbolic TF tensors and JAX tracers refuse conversion: no value to check
        return None


def static_shape(x: Any) -> tuple:
    return tuple(x.shape)


def dtype_name(x: Any) -> str:
    """Keras' name of ``x``'s dtype ("int64", "float32", "string", ...); NumPy's when Keras has none (``<U3``)."""
    try:
        return backend.standardize_dtype(x.dtype)
    except (ValueError, TypeError):  # NumPy strings and objects: Keras has no name for them
        return str(getattr(x, "dtype", type(x).__name__))


def _is_integer(dtype: str) -> bool:
    return dtype.startswith("int") or dtype.startswith("uint")


def _is_numeric(dtype: str) -> bool:
    return _is_integer(dtype) or dtype.startswith("float") or dtype.startswith("bfloat")


def check_batch(owner: str, what: str, value: Any, batch: int | None, of: str) -> None:
    """``value``'s first (batch) dimension must equal ``batch`` where both are known (static shapes: free)."""
    shape = static_shape(value)
    size = shape[0] if shape else None
    if batch is not None and size is not None and int(size) != int(batch):
        raise ValueError(f"{owner}: {what} hold {size} samples but {of} hold {batch}; got {what} of shape "
                         f"{shape}. Give one {what[:-1] if what.endswith('s') else what} per sample.")


def check_sample_weight(owner: str, sample_weight: Any, batch: int | None) -> None:
    """``sample_weight`` must be a number, or numeric of shape (batch,) / (batch, 1) when the batch is known."""
    if sample_weight is None or not hasattr(sample_weight, "shape"):
        return
    dtype = dtype_name(sample_weight)
    if not (_is_numeric(dtype) or dtype == "bool"):
        raise ValueError(f"{owner}: sample_weight must be numeric; got {dtype} of shape "
                         f"{static_shape(sample_weight)}.")
    shape = static_shape(sample_weight)
    if not shape:
        return
    if len(shape) > 2 or (len(shape) == 2 and shape[1] not in (1, None)):
        raise ValueError(f"{owner}: sample_weight must have shape (batch,) or (batch, 1), one weight per sample; "
                         f"got shape {shape}.")
    check_batch(owner, "sample weights", sample_weight, batch, "the predictions")


def label_kind(owner: str, labels: Any, num_classes: int, check_dtype: bool = True) -> str:
    """Classify labels as "sparse" ((batch,) or (batch, 1) class ids) or "one_hot" ((batch, C)).

    Labels must be numeric (strings are refused, naming the dtype). With ``check_dtype`` sparse labels must
    be integers (float class ids are refused, not truncated).
    """
    dtype = dtype_name(labels)
    if not (_is_numeric(dtype) or dtype == "bool"):
        raise ValueError(
            f"{owner}: labels must be integer class ids (or one-hot numbers); got {dtype} labels of shape "
            f"{static_shape(labels)}. Map names to ids first, e.g. with keras.layers.StringLookup."
        )
    shape = static_shape(labels)
    if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
        kind = "sparse"
    elif len(shape) == 2 and shape[1] == num_classes:
        kind = "one_hot"
    else:
        raise ValueError(
            f"{owner}: labels must be integer class ids of shape (batch,) or (batch, 1), or one-hot of shape "
            f"(batch, {num_classes}); got labels of shape {shape}."
        )
    if kind == "sparse" and check_dtype:
        if not _is_integer(dtype):
            raise ValueError(
                f"{owner}: sparse labels must be integer class ids; got {dtype} labels of shape {shape}. "
                "Cast them with labels.astype('int32') (or pass one-hot labels of shape (batch, num_classes))."
            )
    return kind


def class_id_message(owner: str, num_classes: int) -> str:
    """The start of the out-of-range message, the same eagerly and in a TensorFlow graph."""
    return f"{owner}: class ids must be in [0, {num_classes}); got"


def check_class_ids(owner: str, sparse_labels: Any, num_classes: int):
    """Raise when class ids fall outside [0, num_classes); return the ids (to compute the loss from).

    Concrete ids (eager, NumPy, JAX outside ``jit``) raise a ``ValueError`` here. In a TensorFlow graph
    without XLA the returned ids depend on a ``tf.debugging.Assert`` with the same message, which raises
    ``tf.errors.InvalidArgumentError`` when the step runs, before anything is computed from them. Under XLA
    (and for Keras' symbolic tensors) the ids come back unchanged; the core turns their rows into NaN.
    """
    value = concrete_value(sparse_labels)
    if value is None:
        if backend.backend() == "tensorflow" and not backend.is_keras_tensor(sparse_labels):
            return _tf_graph_check_class_ids(owner, sparse_labels, num_classes)
        return sparse_labels
    if value.size == 0:
        return sparse_labels
    bad = (value < 0) | (value >= num_classes)
    if np.any(bad):
        examples = sorted({int(v) for v in np.ravel(value)[np.ravel(bad)]})[:5]
        raise ValueError(
            f"{class_id_message(owner, num_classes)} {examples} "
            f"({int(np.sum(bad))} of {value.size} labels out of range)."
        )
    return sparse_labels


def _tf_graph_check_class_ids(owner: str, ids, num_classes: int):
    """TensorFlow graph mode: the ids behind a ``tf.debugging.Assert`` (nothing added under XLA, where TF
    compiles Assert to a no-op)."""
    return _tf_graph_assert(ids, lambda tf, v: tf.logical_or(v < 0, v >= num_classes),
                            class_id_message(owner, num_classes), "out-of-range ids", "labels")


def _tf_graph_assert(value, find_bad, message: str, shown: str, counted: str):
    """``value`` behind a ``tf.debugging.Assert`` that no element of ``find_bad(tf, value)`` is True; the
    message, then the bad entries of ``value`` (first 5), then their count. Nothing is added under XLA or
    in Keras' symbolic build."""
    import tensorflow as tf

    from keras_margin import _keras_private

    if tf.executing_eagerly() or _keras_private.in_symbolic_scope() or _in_tf_xla_context():
        return value
    value = tf.convert_to_tensor(value)
    bad = find_bad(tf, value)
    check = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(bad)),
        [message, tf.boolean_mask(value, bad),
         f"({shown}, first 5 shown; count:", tf.reduce_sum(tf.cast(bad, "int32")), "of",
         tf.shape(bad)[0], f"{counted}).", ],
        summarize=5,
    )
    with tf.control_dependencies([check]):
        return tf.identity(value)


def one_hot_message(owner: str, num_classes: int) -> str:
    """The start of the not-one-hot message, the same eagerly and in a TensorFlow graph."""
    return (f"{owner}: labels of shape (batch, {num_classes}) are read as one-hot and each row must hold a single "
            "1 and zeros elsewhere; soft labels (label smoothing, mixup, all-zero rows) are not supported: pass "
            "integer class ids instead. Rows that are not one-hot:")


def one_hot_rows(labels):
    """(batch,) bool, True where a row of ``labels`` is exactly one-hot: ``max == 1`` and ``sum |x| == 1``."""
    from keras import ops

    x = ops.cast(labels, "float32")
    return ops.logical_and(ops.equal(ops.max(x, axis=-1), 1.0), ops.equal(ops.sum(ops.abs(x), axis=-1), 1.0))


def check_one_hot(owner: str, labels: Any, num_classes: int):
    """Raise when a row of (batch, C) labels is not one-hot; return the labels.

    As ``check_class_ids``: concrete labels raise a ``ValueError`` here, a TensorFlow graph without XLA gets
    a ``tf.debugging.Assert`` with the same message, and under XLA the core turns such rows into NaN.
    """
    value = concrete_value(labels)
    if value is None:
        if backend.backend() == "tensorflow" and not backend.is_keras_tensor(labels):
            return _tf_graph_assert(
                labels,
                lambda tf, v: tf.logical_not(tf.logical_and(
                    tf.equal(tf.reduce_max(tf.cast(v, "float32"), axis=-1), 1.0),
                    tf.equal(tf.reduce_sum(tf.abs(tf.cast(v, "float32")), axis=-1), 1.0))),
                one_hot_message(owner, num_classes), "rows", "rows")
        return labels
    if value.size == 0:
        return labels
    x = value.astype(np.float64)
    bad = ~((x.max(axis=-1) == 1.0) & (np.abs(x).sum(axis=-1) == 1.0))
    if np.any(bad):
        rows = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(f"{one_hot_message(owner, num_classes)} {rows} ({int(bad.sum())} of {len(x)} rows), e.g. "
                         f"row {rows[0]} = {np.round(x[rows[0]][:8], 4).tolist()}"
                         f"{' ...' if x.shape[-1] > 8 else ''}.")
    return labels


def _in_tf_xla_context() -> bool:
    """Whether the graph being built is compiled by XLA (``tf.function(jit_compile=True)``)."""
    import tensorflow as tf

    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a TensorFlow without the module: assume XLA, add nothing
        return True
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def check_embeddings(owner: str, x: Any, embedding_dim: int | None = None) -> None:
    """Embeddings must be numeric (batch, embedding_dim), with the head's ``embedding_dim`` when it is built;
    concrete ones must be finite."""
    shape = static_shape(x)
    if len(shape) != 2:
        raise ValueError(
            f"{owner}: embeddings must have shape (batch, embedding_dim); got shape {shape}. "
            "Add keras.layers.Flatten() or a pooling layer before the head."
        )
    dtype = dtype_name(x)
    if not _is_numeric(dtype):
        raise ValueError(f"{owner}: embeddings must be floating-point numbers; got {dtype} of shape {shape}.")
    if embedding_dim is not None and shape[-1] is not None and int(shape[-1]) != int(embedding_dim):
        raise ValueError(
            f"{owner}: the head was built for embedding_dim {int(embedding_dim)} (its kernel is "
            f"({int(embedding_dim)}, num_classes)) but is called on embeddings of size {int(shape[-1])} "
            f"(shape {shape}); a head cannot change its input size once built."
        )
    value = concrete_value(x)
    if value is not None and value.dtype.kind == "f" and not np.all(np.isfinite(value)):
        rows = np.flatnonzero(~np.all(np.isfinite(value), axis=-1))[:5].tolist()
        raise ValueError(f"{owner}: embeddings contain NaN or inf (rows {rows}).")


def check_cosines(owner: str, cos_theta: Any) -> None:
    shape = static_shape(cos_theta)
    if len(shape) != 2:
        raise ValueError(
            f"{owner}: y_pred must be the cosines of shape (batch, num_classes) from a head such as "
            f"AMSoftmaxHead or CosineDense; got shape {shape}."
        )
    value = concrete_value(cos_theta)
    if value is not None and value.dtype.kind == "f" and not np.all(np.isfinite(value)):
        raise ValueError(f"{owner}: y_pred (cosines) contains NaN or inf.")
