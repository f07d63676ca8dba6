"""Argument, shape and label checks shared by every head and loss: clear ValueErrors, never a TF stack trace.

Checks on values (class ids in range, finite features) run only where the values are concrete (eager
execution, NumPy input); inside a compiled step the core marks such rows with NaN instead.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from keras import backend


def check_number(owner: str, name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as a float after checking it is a finite number inside the given interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{owner}: `{name}` must be a number; got {value!r} of type {type(value).__name__}.")
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None:
        bad = bad or (value <= low if low_open else value < low)
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{owner}: `{name}` must be a finite number in {interval}; got {value!r}.")
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


def label_kind(owner: str, labels: Any, num_classes: int, check_dtype: bool = True) -> str:
    """Classify labels as "sparse" ((batch,) or (batch, 1) class ids) or "one_hot" ((batch, C)).

    With ``check_dtype`` sparse labels must be integers (float class ids are refused, not truncated).
    """
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
        dtype = backend.standardize_dtype(labels.dtype)
        if not (dtype.startswith("int") or dtype.startswith("uint")):
            raise ValueError(
                f"{owner}: sparse labels must be integer class ids; got {dtype} labels of shape {shape}. "
                "Cast them with labels.astype('int32') (or pass one-hot labels of shape (batch, num_classes))."
            )
    return kind


def check_class_ids(owner: str, sparse_labels: Any, num_classes: int) -> None:
    """Raise when concrete class ids fall outside [0, num_classes)."""
    value = concrete_value(sparse_labels)
    if value is None or value.size == 0:
        return
    bad = (value < 0) | (value >= num_classes)
    if np.any(bad):
        examples = sorted({int(v) for v in np.ravel(value)[np.ravel(bad)]})[:5]
        raise ValueError(
            f"{owner}: class ids must be in [0, {num_classes}); got {examples} "
            f"({int(np.sum(bad))} of {value.size} labels out of range)."
        )


def check_embeddings(owner: str, x: Any) -> None:
    """Embeddings must be (batch, embedding_dim); concrete ones must be finite."""
    shape = static_shape(x)
    if len(shape) != 2:
        raise ValueError(
            f"{owner}: embeddings must have shape (batch, embedding_dim); got shape {shape}. "
            "Add keras.layers.Flatten() or a pooling layer before the head."
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
