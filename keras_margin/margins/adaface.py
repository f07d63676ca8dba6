"""AdaFace (Kim et al., CVPR 2022, arXiv 2204.00964): a margin adapted to each sample's feature norm.

The objective's one definition: its defaults (the authors' ``head.py`` and released training configuration:
m = 0.4, h = 0.333, s = 64, t_alpha = 0.01, eps = 1e-3, norm statistics starting at mean 20 and std 100), the
update of the norm statistics, the per-sample margin scaler, the target and non-target cosines and the checks,
used by ``AdaFaceHead``.
"""

from __future__ import annotations

import math

from keras import ops

from keras_margin import _validation
from keras_margin.margins._clamp import angle_from_cos

DEFAULT_S = 64.0
DEFAULT_M = 0.4
DEFAULT_H = 0.333
DEFAULT_T_ALPHA = 0.01  # the released training configuration (head.py's own default is 1.0: no moving average)
EPS = 1e-3  # ``self.eps``: the cosine clamp, the angle clip and the std offset
INITIAL_BATCH_MEAN = 20.0  # ``register_buffer('batch_mean', torch.ones(1) * 20)``
INITIAL_BATCH_STD = 100.0  # ``register_buffer('batch_std', torch.ones(1) * 100)``
NORM_CLIP = (0.001, 100.0)  # ``safe_norms = torch.clip(norms, min=0.001, max=100)``


def check_adaface_parameters(owner: str, s=DEFAULT_S, m=DEFAULT_M, h=DEFAULT_H, t_alpha=DEFAULT_T_ALPHA) -> dict:
    """AdaFace's hyper-parameters, checked: s > 0, m in [0, pi / 2], h > 0, t_alpha in (0, 1].

    Example:
    >>> check_adaface_parameters("AdaFaceHead", 64, 0.4, 0.333, 0.01)
    {'s': 64.0, 'm': 0.4, 'h': 0.333, 't_alpha': 0.01}
    """
    return {"s": _validation.check_scale(owner, s),
            "m": _validation.check_number(owner, "m", m, low=0.0, high=math.pi / 2),
            "h": _validation.check_number(owner, "h", h, low=0.0, low_open=True),
            "t_alpha": _validation.check_number(owner, "t_alpha", t_alpha, low=0.0, high=1.0, low_open=True)}


def safe_norms(x):
    """``clip(|x|, 0.001, 100)`` per row (batch,), float32, no gradient: the quality proxy."""
    x = ops.cast(x, "float32")
    norms = ops.sqrt(ops.sum(ops.square(x), axis=-1))
    return ops.stop_gradient(ops.clip(norms, *NORM_CLIP))


def adaface_statistics(norms, batch_mean, batch_std, t_alpha: float = DEFAULT_T_ALPHA):
    """One step of the norm statistics (first, in every training call): ``(batch_mean, batch_std)``.

    Formula:
    ```
    batch_mean <- t_alpha * mean(norms) + (1 - t_alpha) * batch_mean
    batch_std  <- t_alpha * std(norms)  + (1 - t_alpha) * batch_std      (std: unbiased, N - 1, as torch.std)
    ```

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> mean, std = adaface_statistics(np.array([10.0, 12.0], "float32"), 20.0, 100.0, t_alpha=1.0)
    >>> round(float(ops.convert_to_numpy(mean)), 4), round(float(ops.convert_to_numpy(std)), 4)
    (11.0, 1.4142)
    """
    n = ops.cast(ops.shape(norms)[0], "float32")
    mean = ops.mean(norms)
    std = ops.sqrt(ops.sum(ops.square(norms - mean)) / (n - 1.0))
    return t_alpha * mean + (1.0 - t_alpha) * batch_mean, t_alpha * std + (1.0 - t_alpha) * batch_std


def margin_scaler(norms, batch_mean, batch_std, h: float = DEFAULT_H):
    """``clip(h * (norm - batch_mean) / (batch_std + eps), -1, 1)`` per sample (batch,), no gradient."""
    return ops.stop_gradient(ops.clip(h * (norms - batch_mean) / (batch_std + EPS), -1.0, 1.0))


def adaface_target(cos_theta_y, scaler, m: float = DEFAULT_M):
    """AdaFace's target cosine with the per-sample margin scaler (batch,).

    Formula:
    ```
    theta = arccos(clip(cos_y, -1 + eps, 1 - eps))
    z_y / s = cos(clip(theta + g_angular, eps, pi - eps)) - g_additive,
    g_angular = -m * scaler,  g_additive = m + m * scaler
    ```

    Example:
    >>> import numpy as np
    >>> from keras import ops
    >>> c = np.array([0.5, 0.5], "float32")  # scaler -1: cos(theta + m) (ArcFace); +1: cos(theta - m) - 2m
    >>> np.round(ops.convert_to_numpy(adaface_target(c, np.array([-1.0, 1.0], "float32"), 0.4)), 4)
    array([ 0.1233, -0.0022], dtype=float32)
    """
    theta = angle_from_cos(ops.clip(ops.cast(cos_theta_y, "float32"), -1.0 + EPS, 1.0 - EPS))
    theta_m = ops.clip(theta - m * scaler, EPS, math.pi - EPS)
    return ops.cos(theta_m) - (m + m * scaler)


def adaface_nontarget(cos_theta):
    """The non-target cosines as the code leaves them: ``clip(cos, -1 + eps, 1 - eps)`` (its arccos-then-cos of the
    clamped cosines, with theta clipped to [eps, pi - eps], is the identity on that range)."""
    return ops.clip(cos_theta, -1.0 + EPS, 1.0 - EPS)
