"""AM-Softmax (Wang et al. 2018, arXiv 1801.05599, Eq. 4) = CosFace's large margin cosine loss.

The objective's one definition: its target function (the paper's formula, or the released Caffe layer's
rule), the Caffe layer's margin schedule, its default hyper-parameters (the released AM-Softmax model:
s = 30, m = 0.35) and their checks, used by ``AMSoftmaxHead``, ``AMSoftmaxLoss`` and ``amsoftmax_loss``.

The released layer is ``LabelSpecificAdd`` of happynear/caffe-windows (branch ``ms``,
``src/caffe/layers/label_specific_add.cpp``). With ``bias = -m`` it computes, in TRAIN only::

    if bias_base is set:                       # the annealed margin
        bias = bias_base + (1 + bias_gamma * iteration)^bias_power - 1
        bias = min(max(bias, bias_min), bias_max)
        iteration += 1                         # AFTER bias is computed (SphereFace's layer: before)
    z_y = z_y + bias   only where z_y > -bias  # i.e. cos_y - m where cos_y > m, else cos_y
    backward: the identity                     # (also the derivative of the rule above)
"""

from __future__ import annotations

from keras import ops

from keras_margin import _validation

DEFAULT_S = 30.0
DEFAULT_M = 0.35
MARGIN_RULES = ("paper", "caffe")
DEFAULT_MARGIN_RULE = "paper"

#: The Caffe layer's schedule fields (``label_specific_add_param``) and their proto defaults.
SCHEDULE_DEFAULTS = {"bias_base": 0.0, "bias_gamma": 0.0, "bias_power": 1.0, "bias_min": 0.0, "bias_max": 0.0}


def amsoftmax_target(cos_theta_y, m, margin_rule: str = DEFAULT_MARGIN_RULE):
    """Additive cosine margin.

    Formula:
    ```
    paper: z_y / s = cos(theta_y) - m
    caffe: z_y / s = cos(theta_y) - m   where cos(theta_y) > m,  cos(theta_y) elsewhere
    ```
    ``"caffe"`` is the released ``LabelSpecificAdd`` layer: the margin never pushes a target cosine below
    zero. Its derivative w.r.t. cos(theta_y) is 1 on both sides, the layer's identity backward pass.
    ``m`` is a float or a scalar tensor (the scheduled margin).
    """
    if margin_rule == "caffe":
        return ops.where(cos_theta_y > m, cos_theta_y - m, cos_theta_y)
    return cos_theta_y - m


def scheduled_margin(iteration, bias_base: float, bias_gamma: float, bias_power: float, bias_min: float,
                     bias_max: float):
    """The Caffe layer's annealed margin at counter value ``iteration`` (read before the layer advances it).

    Formula:
    ```
    bias = clip(bias_base + (1 + bias_gamma * iteration)^bias_power - 1, bias_min, bias_max)
    m = -bias
    ```
    Computed in float32, as the layer computes it in ``Dtype``.

    Example:
    >>> import keras
    >>> schedule = {"bias_base": 0.0, "bias_gamma": -5e-5, "bias_power": 1.0, "bias_min": -0.4, "bias_max": 0.0}
    >>> [round(float(scheduled_margin(it, **schedule)), 6) for it in (0, 1, 2000, 8000, 9000)]
    [0.0, 5e-05, 0.1, 0.4, 0.4]
    """
    iteration = ops.cast(iteration, "float32")
    bias = bias_base + ops.power(1.0 + bias_gamma * iteration, bias_power) - 1.0
    return 0.0 - ops.minimum(ops.maximum(bias, bias_min), bias_max)  # 0 - b, not -b: no -0.0


def check_margin_rule(owner: str, margin_rule) -> str:
    """``margin_rule`` must be one of ``MARGIN_RULES``: ``"paper"`` (the default) or ``"caffe"``."""
    if margin_rule not in MARGIN_RULES:
        raise ValueError(f"{owner}: `margin_rule` must be one of {MARGIN_RULES} ('paper': cos - m everywhere; "
                         f"'caffe': the released layer, cos - m only where cos > m); got {margin_rule!r}.")
    return margin_rule


def check_amsoftmax_parameters(owner: str, s=DEFAULT_S, m=DEFAULT_M, margin_rule=DEFAULT_MARGIN_RULE) -> dict:
    """AM-Softmax's hyper-parameters, checked: s > 0, m in [0, 1], margin_rule "paper" or "caffe".

    Example:
    >>> check_amsoftmax_parameters("AMSoftmaxLoss", 30, 0.35)
    {'s': 30.0, 'm': 0.35, 'margin_rule': 'paper'}
    """
    return {"s": _validation.check_scale(owner, s),
            "m": _validation.check_number(owner, "m", m, low=0.0, high=1.0),
            "margin_rule": check_margin_rule(owner, margin_rule)}


def check_margin_schedule(owner: str, schedule) -> dict | None:
    """The Caffe margin schedule, checked: ``None``, or a dict of ``SCHEDULE_DEFAULTS``' keys (missing keys
    take the proto defaults) with -1 <= bias_min <= bias_max <= 0, so the margin ``-bias`` stays in [0, 1].

    Example:
    >>> check_margin_schedule("AMSoftmaxHead", {"bias_gamma": -5e-5, "bias_min": -0.4})
    {'bias_base': 0.0, 'bias_gamma': -5e-05, 'bias_power': 1.0, 'bias_min': -0.4, 'bias_max': 0.0}
    """
    if schedule is None:
        return None
    if not isinstance(schedule, dict):
        raise ValueError(f"{owner}: `margin_schedule` must be None or a dict with keys {list(SCHEDULE_DEFAULTS)} "
                         f"(the Caffe layer's label_specific_add_param fields); got {schedule!r}.")
    unknown = sorted(set(schedule) - set(SCHEDULE_DEFAULTS))
    if unknown:
        raise ValueError(f"{owner}: `margin_schedule` has unknown keys {unknown}; the keys are "
                         f"{list(SCHEDULE_DEFAULTS)}.")
    checked = {key: _validation.check_number(owner, f"margin_schedule['{key}']", schedule.get(key, default))
               for key, default in SCHEDULE_DEFAULTS.items()}
    if not -1.0 <= checked["bias_min"] <= checked["bias_max"] <= 0.0:
        raise ValueError(f"{owner}: `margin_schedule` needs -1 <= bias_min <= bias_max <= 0 (the margin is "
                         f"-bias, in [0, 1]); got bias_min={checked['bias_min']}, bias_max={checked['bias_max']}.")
    return checked
