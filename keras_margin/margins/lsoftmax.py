"""L-Softmax (Liu et al., ICML 2016, arXiv 1612.02295): the un-normalized large-margin softmax of the Caffe layer.

The objective's one definition: its defaults (the released MNIST prototxt: m = 4, base 1000, gamma 2.5e-5,
power 35, lambda_min 0), the target and non-target logits per unit |x| and the checks, used by ``LSoftmaxHead``.
psi, the lambda schedule and their checks are SphereFace's (``keras_margin.margins.sphereface``): the Caffe
``LargeMarginInnerProduct`` layer is the one SphereFace's ``MarginInnerProduct`` was written from, with the
weights left un-normalized.
"""

from __future__ import annotations

from keras import ops

from keras_margin.core import column_sq_norms
from keras_margin.margins import sphereface
from keras_margin.margins.sphereface import sphereface_target

DEFAULT_M = 4  # ``type: QUADRUPLE`` (mnist_train_test.prototxt); the CIFAR-10 prototxts use DOUBLE (m = 2)
DEFAULT_BASE = 1000.0
DEFAULT_GAMMA = 0.000025  # CIFAR-10: 0.00002
DEFAULT_POWER = 35.0  # CIFAR-10: 45
DEFAULT_LAMBDA_MIN = 0.0  # the proto default; the prototxts leave it unset or set 0


def check_lsoftmax_parameters(owner: str, m=DEFAULT_M, base=DEFAULT_BASE, gamma=DEFAULT_GAMMA, power=DEFAULT_POWER,
                              lambda_min=DEFAULT_LAMBDA_MIN) -> dict:
    """L-Softmax's hyper-parameters, checked as SphereFace's: m in 1..4, base > 0, gamma, power, lambda_min >= 0.

    Example:
    >>> check_lsoftmax_parameters("LSoftmaxHead")
    {'m': 4, 'base': 1000.0, 'gamma': 2.5e-05, 'power': 35.0, 'lambda_min': 0.0}
    """
    return {"m": sphereface.check_sphereface_m(owner, m),
            **sphereface.check_sphereface_schedule(owner, base, gamma, power, lambda_min)}


def lsoftmax_target(cos_theta_y, w_norm_y, m: int, lambda_):
    """The target logit per unit |x|: ``|W_y| * (lambda * cos(theta_y) + psi(theta_y)) / (1 + lambda)``.

    ``w_norm_y`` (batch,) is the norm of each sample's target column. The Caffe forward adds ``lambda * x.W_y``
    to ``|x||W_y| psi`` and divides by ``1 + lambda``: the same number.

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> c, w = np.array([1.0, 0.5], "float32"), np.array([2.0, 2.0], "float32")
    >>> np.round(ops.convert_to_numpy(lsoftmax_target(c, w, 4, 0.0)), 4)  # 2 * psi(0), 2 * psi(pi/3)
    array([ 2., -3.], dtype=float32)
    """
    return w_norm_y * sphereface_target(cos_theta_y, m, lambda_)


def lsoftmax_nontarget(cos_theta, w_norm):
    """The non-target logits per unit |x|: ``|W_j| * cos(theta_j)`` (``w_norm`` (C,)), i.e. ``x.W_j / |x|``."""
    return cos_theta * w_norm[None, :]


def column_norms(kernel):
    """``|W_j|`` of each column of a (d, C) kernel, (C,) float32."""
    return ops.sqrt(column_sq_norms(kernel))
