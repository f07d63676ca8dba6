"""AdaCos (Zhang et al., CVPR 2019, arXiv 1905.00292): a cosine softmax with no margin and an adaptive scale.

The objective's one definition: the fixed scale ``sqrt(2) log(C - 1)`` (also the adaptive scale's initial
value), the batch update of the adaptive scale, the median conventions and the checks, used by
``AdaCosHead``.
"""

from __future__ import annotations

import math

from keras import ops

from keras_margin import _validation
from keras_margin.margins._clamp import angle_from_cos

THETA_CAP = math.pi / 4  # the paper's min(pi/4, theta_med)
DEFAULT_MEDIAN = "midpoint"
MEDIANS = ("midpoint", "lower")  # NumPy's median (mean of the two middle values); torch.median (the lower one)
DEFAULT_ADAPTIVE = True


def fixed_scale(num_classes: int) -> float:
    """The fixed AdaCos scale ``sqrt(2) * log(C - 1)`` (the adaptive scale starts from it).

    Example:
    >>> round(fixed_scale(10), 4)
    3.1073
    """
    return math.sqrt(2.0) * math.log(num_classes - 1)


def check_adacos_parameters(owner: str, num_classes: int, s=None, median=DEFAULT_MEDIAN,
                            adaptive=DEFAULT_ADAPTIVE) -> dict:
    """AdaCos' hyper-parameters, checked: num_classes >= 3 (``log(C - 1) > 0``), s > 0 or None (the fixed scale),
    median one of ``MEDIANS``, adaptive a boolean.

    Example:
    >>> params = check_adacos_parameters("AdaCosHead", 10)
    >>> round(params["s"], 4), params["median"], params["adaptive"]
    (3.1073, 'midpoint', True)
    """
    num_classes = _validation.check_count(owner, "num_classes", num_classes, minimum=2)
    if num_classes < 3:
        raise ValueError(f"{owner}: AdaCos needs `num_classes` >= 3 (its scale sqrt(2) * log(num_classes - 1) is 0 "
                         f"for 2 classes); got {num_classes}.")
    if median not in MEDIANS:
        raise ValueError(f"{owner}: `median` must be one of {MEDIANS}; got {median!r}.")
    return {"s": fixed_scale(num_classes) if s is None else _validation.check_scale(owner, s),
            "median": median, "adaptive": _validation.check_bool(owner, "adaptive", adaptive)}


def adacos_scale(cos_theta, is_target, s, median: str = DEFAULT_MEDIAN, cos_theta_y=None):
    """The adaptive scale of one training step, from the cosines and the previous scale, no gradient.

    Formula:
    ```
    B_avg = (1 / N) sum_i sum_{j != y_i} exp(s * cos(theta_ij))      (s: the previous scale)
    theta_med = median_i theta_{i, y_i}
    s <- log(B_avg) / cos(min(pi / 4, theta_med))
    ```
    ``log(B_avg)`` is a log-sum-exp over every non-target entry minus ``log(N)`` (no overflow of ``exp``).
    ``cos_theta`` (N, C) float32, ``is_target`` its (N, C) boolean target mask; ``cos_theta_y`` (N,), the
    target cosines when the caller has them (``core.target_cosines``: a gather), else summed out of the mask.

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> cos = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], "float32")
    >>> mask = np.array([[True, False, False], [False, False, True]])
    >>> round(float(ops.convert_to_numpy(adacos_scale(cos, mask, 2.0))), 4)  # log(2) / cos(~0)
    0.6931
    """
    cos_theta = ops.stop_gradient(ops.cast(cos_theta, "float32"))
    batch = ops.cast(ops.shape(cos_theta)[0], "float32")
    flat = ops.reshape(ops.where(is_target, float("-inf"), s * cos_theta), (-1,))
    log_b_avg = ops.logsumexp(flat) - ops.log(batch)
    cos_y = (ops.sum(ops.where(is_target, cos_theta, 0.0), axis=-1) if cos_theta_y is None
             else ops.stop_gradient(ops.cast(cos_theta_y, "float32")))
    theta_med = ops.quantile(angle_from_cos(cos_y), 0.5, method="linear" if median == "midpoint" else "lower")
    return ops.stop_gradient(log_b_avg / ops.cos(ops.minimum(theta_med, THETA_CAP)))
