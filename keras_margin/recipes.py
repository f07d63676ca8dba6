"""The papers' training recipes: the released solvers' learning-rate schedules and SGD, reproduced step for step.

``get(name)`` returns a frozen :class:`Recipe` ("sphereface", "amsoftmax", "insightface"); its
``learning_rate_schedule()`` and ``optimizer()`` build the Keras objects: :class:`CaffeMultiStepSchedule`,
:class:`PolyWarmupSchedule` and :class:`RecipeSGD` (coupled L2 decay, Caffe's or PyTorch's momentum form).

Iteration counting. Caffe's ``Solver::Step`` computes the rate of iteration ``iter_`` (0 first) before its update and
increments ``iter_`` after it; Keras calls the schedule with ``optimizer.iterations`` (0 first) before the update
and increments it after, so Keras step ``t`` is Caffe iteration ``t``. With gradient accumulation Keras passes the
count of micro-batches instead, which :class:`CaffeMultiStepSchedule` divides by ``iter_size``.
InsightFace's ``PolyScheduler`` is stepped once per micro-batch after ``opt.step()`` and was already stepped once
by its constructor, so the rate of micro-batch ``m`` (0 first) is the formula at ``max(m - 1, 0)``;
:class:`PolyWarmupSchedule` takes Keras' micro-batch count and does that shift itself.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_margin._validation import check_count, check_number

__all__ = ["CaffeMultiStepSchedule", "PolyWarmupSchedule", "Recipe", "RecipeSGD", "get", "names",
           "DEFAULT_DECAY_EXCLUDE"]

#: Variables the optimizer does not decay by default: biases, BatchNormalization's gamma/beta and PReLU's slopes
#: (matched against the last component of ``variable.path``); every other trainable variable (Conv/Dense/head
#: kernels) is decayed.
DEFAULT_DECAY_EXCLUDE = ("bias", "gamma", "beta", "alpha")

_MOMENTUM_FORMS = ("caffe", "pytorch")


def _matches(path: str, pattern: str) -> bool:
    """``pattern`` (fnmatch) matches the whole path or a trailing part of it after a ``/``."""
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*/" + pattern)


def _check_patterns(owner: str, name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{owner}: `{name}` must be a sequence of fnmatch patterns (str); got {value!r}.")
    return tuple(value)


def _check_multipliers(owner: str, value: Any) -> tuple[tuple[str, float], ...]:
    pairs = list(value.items()) if isinstance(value, dict) else value
    bad = isinstance(pairs, str) or not isinstance(pairs, Sequence) or not all(
        isinstance(pair, Sequence) and len(pair) == 2 and isinstance(pair[0], str) for pair in pairs)
    if bad:
        raise ValueError(f"{owner}: `lr_multipliers` must be (pattern, multiplier) pairs or a dict; got {value!r}.")
    return tuple((pattern, check_number(owner, f"lr_multipliers[{pattern!r}]", multiplier, low=0.0))
                 for pattern, multiplier in pairs)


@keras.saving.register_keras_serializable(package="keras_margin")
class CaffeMultiStepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Caffe's ``lr_policy: "multistep"``: the rate drops by ``gamma`` at each ``stepvalue``.

    Formula:
    ```
    iter = floor(step / iter_size)              # Keras counts micro-batches when it accumulates
    lr(iter) = float32(base_lr * gamma ** #{b in boundaries : b <= iter})
    ```
    As sgd_solver.cpp's ``GetLearningRate``: ``current_step_`` is incremented when ``iter_ >= stepvalue``, the
    product is taken in double (``pow`` of float promotes) and stored as a float.

    Args:
        base_lr: ``base_lr`` of the solver. Defaults to 0.1.
        boundaries: the ``stepvalue`` entries, strictly increasing iterations. Defaults to (16000, 24000, 28000).
        gamma: factor applied at each boundary. Defaults to 0.1.
        iter_size: Caffe's ``iter_size`` (= the optimizer's ``gradient_accumulation_steps``): the number of Keras
            steps per Caffe iteration. Defaults to 1.
        name: name of the schedule. Defaults to None.

    Example:
    >>> schedule = CaffeMultiStepSchedule(0.1, (16000, 24000))
    >>> [round(float(schedule(t)), 6) for t in (0, 15999, 16000, 24000)]
    [0.1, 0.1, 0.01, 0.001]

    Reference:
        BVLC/caffe ``src/caffe/solvers/sgd_solver.cpp``, ``SGDSolver::GetLearningRate``.
    """

    def __init__(self, base_lr: float = 0.1, boundaries: Sequence[int] = (16000, 24000, 28000), gamma: float = 0.1,
                 iter_size: int = 1, name: str | None = None) -> None:
        owner = type(self).__name__
        self.base_lr = check_number(owner, "base_lr", base_lr, low=0.0)
        self.gamma = check_number(owner, "gamma", gamma, low=0.0)
        self.iter_size = check_count(owner, "iter_size", iter_size, minimum=1)
        if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence):
            raise ValueError(f"{owner}: `boundaries` must be a sequence of iterations; got {boundaries!r}.")
        self.boundaries = tuple(check_count(owner, "boundaries", b, minimum=0) for b in boundaries)
        if any(a >= b for a, b in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError(f"{owner}: `boundaries` must be strictly increasing (Caffe passes one stepvalue per "
                             f"iteration); got {self.boundaries}.")
        self.name = name
        base, gamma32 = float(np.float32(self.base_lr)), float(np.float32(self.gamma))  # proto fields are floats
        self._rates = [float(np.float32(base * gamma32 ** k)) for k in range(len(self.boundaries) + 1)]

    def __call__(self, step):
        iteration = ops.floor_divide(ops.cast(step, "int32"), self.iter_size)
        count = ops.zeros((), "int32")
        for boundary in self.boundaries:
            count = count + ops.cast(ops.greater_equal(iteration, boundary), "int32")
        return ops.take(ops.convert_to_tensor(self._rates, "float32"), count)

    def get_config(self) -> dict[str, Any]:
        return {"base_lr": self.base_lr, "boundaries": list(self.boundaries), "gamma": self.gamma,
                "iter_size": self.iter_size, "name": self.name}


@keras.saving.register_keras_serializable(package="keras_margin")
class PolyWarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """InsightFace arcface_torch's ``PolyScheduler``: linear warm-up from 0, then polynomial decay to 0.

    Formula:
    ```
    e = max(step - 1, 0)       # the rate of micro-batch `step` is the scheduler's value at last_epoch = step - 1
    lr = base_lr * e / warmup_steps                                              if e < warmup_steps
    lr = base_lr * (1 - min(e - warmup_steps, T - warmup_steps) / (T - warmup_steps)) ** power   otherwise
    ```
    with ``T = total_steps``. The ``min`` holds the rate at 0 past ``T`` (the original would rise again there;
    training stops at ``T``). ``warmup_lr_init`` of the original is never used by its training loop.

    Args:
        base_lr: ``cfg.lr``. Defaults to 0.1.
        total_steps: ``cfg.total_step`` = ``num_image // total_batch_size * num_epoch``, micro-batches.
            Defaults to 1000.
        warmup_steps: ``cfg.warmup_step`` = ``num_image // total_batch_size * warmup_epoch``; less than
            ``total_steps``. Defaults to 0.
        power: exponent of the decay (``self.power = 2`` in the original). Defaults to 2.0.
        name: name of the schedule. Defaults to None.

    Example:
    >>> schedule = PolyWarmupSchedule(0.1, total_steps=100, warmup_steps=10)
    >>> [round(float(schedule(t)), 6) for t in (0, 1, 2, 11, 56)]
    [0.0, 0.0, 0.01, 0.1, 0.025]

    Reference:
        deepinsight/insightface ``recognition/arcface_torch/lr_scheduler.py`` (``PolyScheduler``) and
        ``train_v2.py`` (``opt.step(); lr_scheduler.step()`` once per micro-batch).
    """

    def __init__(self, base_lr: float = 0.1, total_steps: int = 1000, warmup_steps: int = 0, power: float = 2.0,
                 name: str | None = None) -> None:
        owner = type(self).__name__
        self.base_lr = check_number(owner, "base_lr", base_lr, low=0.0)
        self.total_steps = check_count(owner, "total_steps", total_steps, minimum=1)
        self.warmup_steps = check_count(owner, "warmup_steps", warmup_steps, minimum=0)
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"{owner}: `warmup_steps` must be less than `total_steps` ({self.total_steps}); "
                             f"got {self.warmup_steps}.")
        self.power = check_number(owner, "power", power, low=0.0)
        self.name = name

    def __call__(self, step):
        e = ops.maximum(ops.cast(step, "float32") - 1.0, 0.0)
        warmup = float(self.warmup_steps)
        warm = self.base_lr * e / max(warmup, 1.0)
        span = float(self.total_steps - self.warmup_steps)
        progress = ops.minimum(ops.maximum(e - warmup, 0.0), span) / span
        decay = self.base_lr * ops.power(1.0 - progress, self.power)
        return ops.cast(ops.where(e < warmup, warm, decay), "float32")

    def get_config(self) -> dict[str, Any]:
        return {"base_lr": self.base_lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "power": self.power, "name": self.name}


@keras.saving.register_keras_serializable(package="keras_margin")
class RecipeSGD(keras.optimizers.Optimizer):
    """SGD with momentum and coupled L2 weight decay, as Caffe's ``SGDSolver`` (or ``torch.optim.SGD``) updates.

    Formula:
    ```
    g = gradient (averaged over gradient_accumulation_steps, Caffe's Normalize)
    d = g + weight_decay * w          # only where the variable is decayed (Caffe's Regularize, L2)
    r = learning_rate * lr_multiplier # Caffe's local_rate
    caffe:   h = momentum * h + r * d;   w = w - h      # sgd_solver.cpp ComputeUpdateValue + Blob::Update
    pytorch: h = momentum * h + d;       w = w - r * h  # torch.optim.SGD, dampening 0, nesterov False
    ```
    Caffe folds the rate into the history: after a rate drop the old velocity keeps its old rate (as
    ``keras.optimizers.SGD`` does); PyTorch multiplies the whole history by the new rate. The decay is added to the
    gradient (coupled), unlike Keras' decoupled ``weight_decay``.

    Which variables are decayed: every trainable variable except those whose ``variable.path`` matches a pattern of
    ``decay_exclude`` (fnmatch, against the whole path or its trailing part after a ``/``). The default
    :data:`DEFAULT_DECAY_EXCLUDE` decays kernels (Conv, Dense, margin-head kernels) and leaves biases,
    BatchNormalization gamma/beta and PReLU slopes alone (Caffe's ``decay_mult: 0``). ``lr_multipliers`` (Caffe's
    ``lr_mult``) are (pattern, multiplier) pairs, the first match wins, 1 where none matches.

    Args:
        learning_rate: float or a ``LearningRateSchedule``. Defaults to 0.1.
        momentum: momentum in [0, 1). Defaults to 0.9.
        weight_decay: L2 factor (Caffe's ``weight_decay``). Defaults to 5e-4.
        momentum_form: "caffe" or "pytorch" (see Formula). Defaults to "caffe".
        decay_exclude: patterns of variables not decayed. Defaults to ``DEFAULT_DECAY_EXCLUDE``.
        lr_multipliers: (pattern, multiplier) pairs or a dict. Defaults to () (all 1).
        name: name of the optimizer. Defaults to "recipe_sgd".
        **kwargs: the base optimizer's arguments (``gradient_accumulation_steps``, ``clipnorm``, ...); its
            decoupled ``weight_decay`` is not available here.

    Example:
    >>> dense = keras.layers.Dense(1, kernel_initializer="ones")
    >>> dense.build((None, 1))
    >>> optimizer = RecipeSGD(learning_rate=0.1, momentum=0.9, weight_decay=0.5)
    >>> _ = optimizer.apply_gradients([(np.ones((1, 1), "float32"), dense.kernel), (np.ones(1, "float32"), dense.bias)])
    >>> round(float(dense.kernel[0, 0]), 6), round(float(dense.bias[0]), 6)   # 1 - 0.1*(1 + 0.5*1), 0 - 0.1*1
    (0.85, -0.1)

    Reference:
        BVLC/caffe ``src/caffe/solvers/sgd_solver.cpp`` (``Normalize``, ``Regularize``, ``ComputeUpdateValue``).
    """

    def __init__(self, learning_rate: Any = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                 momentum_form: str = "caffe", decay_exclude: Sequence[str] = DEFAULT_DECAY_EXCLUDE,
                 lr_multipliers: Any = (), name: str = "recipe_sgd", **kwargs: Any) -> None:
        owner = type(self).__name__
        steps = kwargs.get("gradient_accumulation_steps")
        if steps is not None:
            check_count(owner, "gradient_accumulation_steps", steps, minimum=2)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = check_number(owner, "momentum", momentum, low=0.0, high=1.0, high_open=True)
        self.l2_decay = check_number(owner, "weight_decay", weight_decay, low=0.0)
        if momentum_form not in _MOMENTUM_FORMS:
            raise ValueError(f"{owner}: `momentum_form` must be one of {_MOMENTUM_FORMS}; got {momentum_form!r}.")
        self.momentum_form = momentum_form
        self.decay_exclude = _check_patterns(owner, "decay_exclude", decay_exclude)
        self.lr_multipliers = _check_multipliers(owner, lr_multipliers)

    def decays(self, variable) -> bool:
        """Whether ``variable`` gets the L2 term (no pattern of ``decay_exclude`` matches its path)."""
        return not any(_matches(variable.path, pattern) for pattern in self.decay_exclude)

    def lr_multiplier(self, variable) -> float:
        """The ``lr_mult`` of ``variable``: the first matching pair of ``lr_multipliers``, else 1."""
        return next((m for pattern, m in self.lr_multipliers if _matches(variable.path, pattern)), 1.0)

    def build(self, variables) -> None:
        if self.built:
            return
        super().build(variables)
        self.histories = self.add_optimizer_variables(variables, "history")
        self._local_decay = [self.l2_decay if self.decays(v) else 0.0 for v in variables]
        self._local_lr_mult = [self.lr_multiplier(v) for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        history = self.histories[index]
        rate = ops.cast(learning_rate, variable.dtype) * self._local_lr_mult[index]
        diff = ops.cast(gradient, variable.dtype)
        if self._local_decay[index]:
            diff = diff + ops.multiply(variable, self._local_decay[index])
        momentum = ops.cast(self.momentum, variable.dtype)
        if self.momentum_form == "caffe":
            self.assign(history, ops.add(ops.multiply(history, momentum), ops.multiply(diff, rate)))
            self.assign_sub(variable, history)
        else:
            self.assign(history, ops.add(ops.multiply(history, momentum), diff))
            self.assign_sub(variable, ops.multiply(history, rate))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"momentum": self.momentum, "weight_decay": self.l2_decay,
                       "momentum_form": self.momentum_form, "decay_exclude": list(self.decay_exclude),
                       "lr_multipliers": [list(pair) for pair in self.lr_multipliers]})
        return config


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A published training recipe: schedule, SGD and batch, as the released solver files set them.

    Formula:
    ```
    schedule == "multistep": lr(iter) = base_lr * gamma ** #{b in boundaries : b <= iter},  iter < total_iterations
    schedule == "poly":      PolyWarmupSchedule(base_lr, steps_per_epoch * total_epochs,
                                                steps_per_epoch * warmup_epochs, power)
    ```

    Args:
        name: preset name.
        base_lr: initial learning rate.
        schedule: "multistep" (Caffe) or "poly" (InsightFace).
        boundaries: multistep ``stepvalue`` iterations. Defaults to ().
        gamma: multistep factor. Defaults to 0.1.
        power: poly exponent. Defaults to 2.0.
        momentum: SGD momentum. Defaults to 0.9.
        weight_decay: coupled L2 factor. Defaults to 5e-4.
        total_iterations: Caffe ``max_iter`` (None when counted in epochs). Defaults to None.
        total_epochs: InsightFace ``num_epoch`` (None when counted in iterations). Defaults to None.
        warmup_epochs: InsightFace ``warmup_epoch``. Defaults to 0.
        num_images: training-set size of the released run (steps per epoch = num_images // global batch).
            Defaults to None.
        batch_size: images per iteration (Caffe: the data layer's, per GPU; InsightFace: per GPU). Defaults to 256.
        momentum_form: "caffe" or "pytorch" (:class:`RecipeSGD`). Defaults to "caffe".
        decay_exclude: :class:`RecipeSGD` patterns of variables without decay. Defaults to ``DEFAULT_DECAY_EXCLUDE``.
        lr_multipliers: :class:`RecipeSGD` (pattern, lr_mult) pairs. Defaults to ().
        citation: the files the values were read from. Defaults to "".

    Example:
    >>> recipe = get("sphereface")
    >>> recipe.base_lr, recipe.boundaries, recipe.total_iterations
    (0.1, (16000, 24000, 28000), 28000)
    >>> round(float(recipe.learning_rate_schedule()(16000)), 6)
    0.01
    """

    name: str
    base_lr: float
    schedule: str
    boundaries: tuple[int, ...] = ()
    gamma: float = 0.1
    power: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    total_iterations: int | None = None
    total_epochs: int | None = None
    warmup_epochs: int = 0
    num_images: int | None = None
    batch_size: int = 256
    momentum_form: str = "caffe"
    decay_exclude: tuple[str, ...] = DEFAULT_DECAY_EXCLUDE
    lr_multipliers: tuple[tuple[str, float], ...] = ()
    citation: str = ""

    def learning_rate_schedule(self, steps_per_epoch: int | None = None,
                               iter_size: int = 1) -> keras.optimizers.schedules.LearningRateSchedule:
        """The recipe's schedule, called by Keras with ``optimizer.iterations``' micro-batch count.

        Args:
            steps_per_epoch: optimizer micro-batches per epoch (poly recipes only:
                ``num_images // (batch_size * GPUs)``; ignored by multistep ones). Defaults to None.
            iter_size: gradient accumulation steps (multistep: Keras steps per Caffe iteration; the poly schedule
                counts micro-batches as InsightFace does and ignores it). Defaults to 1.
        """
        owner = f"Recipe {self.name!r}"
        iter_size = check_count(owner, "iter_size", iter_size, minimum=1)
        if self.schedule == "multistep":
            return CaffeMultiStepSchedule(self.base_lr, self.boundaries, self.gamma, iter_size=iter_size,
                                          name=f"{self.name}_multistep")
        if steps_per_epoch is None:
            hint = (f" (the released run: {self.num_images} // ({self.batch_size} * GPUs), e.g. "
                    f"{self.num_images // (self.batch_size * 8)} on 8 GPUs)") if self.num_images else ""
            raise ValueError(f"{owner}: `steps_per_epoch` is required by the poly schedule{hint}.")
        steps = check_count(owner, "steps_per_epoch", steps_per_epoch, minimum=1)
        return PolyWarmupSchedule(self.base_lr, steps * self.total_epochs, steps * self.warmup_epochs,
                                  self.power, name=f"{self.name}_poly")

    def optimizer(self, model_or_variables: Any = None, iter_size: int = 1, steps_per_epoch: int | None = None,
                  decay_exclude: Sequence[str] | None = None) -> RecipeSGD:
        """A :class:`RecipeSGD` with this recipe's schedule, built on ``model_or_variables`` when given.

        ``iter_size`` is Caffe's gradient accumulation: Keras' ``gradient_accumulation_steps`` averages the
        ``iter_size`` gradients ((g + acc) / steps in base_optimizer.py), as Caffe sums them and ``Normalize``
        scales by ``1 / iter_size``; with a mean loss, ``iter_size`` micro-batches of ``B / iter_size`` images
        then make the update of one batch of ``B`` images.

        Args:
            model_or_variables: a model/layer (its trainable variables) or a list of variables; None builds on
                the first update. Defaults to None.
            iter_size: micro-batches per update, >= 1. Defaults to 1.
            steps_per_epoch: see :meth:`learning_rate_schedule`. Defaults to None.
            decay_exclude: overrides the recipe's ``decay_exclude``. Defaults to None.
        """
        owner = f"Recipe {self.name!r}"
        iter_size = check_count(owner, "iter_size", iter_size, minimum=1)
        optimizer = RecipeSGD(
            learning_rate=self.learning_rate_schedule(steps_per_epoch, iter_size=iter_size),
            momentum=self.momentum, weight_decay=self.weight_decay, momentum_form=self.momentum_form,
            decay_exclude=self.decay_exclude if decay_exclude is None else decay_exclude,
            lr_multipliers=self.lr_multipliers, name=f"{self.name}_sgd",
            gradient_accumulation_steps=iter_size if iter_size > 1 else None)
        if model_or_variables is not None:
            variables = getattr(model_or_variables, "trainable_variables", model_or_variables)
            optimizer.build(list(variables))
        return optimizer


_CAFFE_BIAS_LR = (("conv*_1/bias", 2.0), ("fc5/bias", 2.0), ("conv*/bias", 0.0))

_PRESETS = {
    "sphereface": Recipe(
        name="sphereface", base_lr=0.1, schedule="multistep", boundaries=(16000, 24000, 28000), gamma=0.1,
        momentum=0.9, weight_decay=5e-4, total_iterations=28000, batch_size=256, momentum_form="caffe",
        decay_exclude=("bias",), lr_multipliers=_CAFFE_BIAS_LR,
        citation="wy1iu/sphereface train/code/sphereface_solver.prototxt (base_lr 0.1, multistep gamma 0.1 at "
                 "16000/24000/28000, max_iter 28000, momentum 0.9, weight_decay 0.0005) and "
                 "train/code/sphereface_model.prototxt (batch_size 256; conv*_1 and fc5 biases lr_mult 2 "
                 "decay_mult 0, other conv biases lr_mult 0; PReLU and kernels default decay_mult 1)"),
    "amsoftmax": Recipe(
        name="amsoftmax", base_lr=0.1, schedule="multistep", boundaries=(16000, 24000, 28000), gamma=0.1,
        momentum=0.9, weight_decay=5e-4, total_iterations=30000, batch_size=256, momentum_form="caffe",
        decay_exclude=("bias",), lr_multipliers=_CAFFE_BIAS_LR,
        citation="happynear/AMSoftmax prototxt/face_solver.prototxt (base_lr 0.1, multistep gamma 0.1 at "
                 "16000/24000/28000, max_iter 30000, iter_size 1, momentum 0.9, weight_decay 0.0005) and "
                 "prototxt/face_train_test.prototxt (batch_size 256, same param specs as SphereFace's)"),
    "insightface": Recipe(
        name="insightface", base_lr=0.2, schedule="poly", power=2.0, momentum=0.9, weight_decay=5e-4,
        total_epochs=25, warmup_epochs=2, num_images=5179510, batch_size=128, momentum_form="pytorch",
        decay_exclude=(), lr_multipliers=(),
        citation="deepinsight/insightface recognition/arcface_torch: configs/ms1mv3_r50.py over configs/base.py "
                 "(lr 0.2, momentum 0.9, weight_decay 5e-4, batch_size 128 per GPU, num_epoch 25, warmup_epoch 2, "
                 "num_image 5179510), lr_scheduler.py PolyScheduler (power 2), train_v2.py (torch.optim.SGD on "
                 "all parameters; not reproduced: clip_grad_norm_(backbone, 5) and fp16 GradScaler)"),
}


def names() -> tuple[str, ...]:
    """The preset names, sorted.

    Example:
    >>> names()
    ('amsoftmax', 'insightface', 'sphereface')
    """
    return tuple(sorted(_PRESETS))


def get(name: str) -> Recipe:
    """The preset ``name``.

    Args:
        name: one of :func:`names`.

    Example:
    >>> get("amsoftmax").total_iterations
    30000
    """
    if name not in _PRESETS:
        raise ValueError(f"recipes.get: `name` must be one of {list(names())}; got {name!r}.")
    return _PRESETS[name]

