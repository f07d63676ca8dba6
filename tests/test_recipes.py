"""keras_margin.recipes against NumPy transcriptions of the originals: Caffe's multistep policy and SGDSolver
(sgd_solver.cpp), InsightFace's PolyScheduler driven by train_v2.py's loop, and torch.optim.SGD."""

from __future__ import annotations

import dataclasses
import re

import keras
import numpy as np
import pytest

from keras_margin import recipes

pytestmark = pytest.mark.backend_agnostic


# ---------------------------------------------------------------- independent references (no package code)

def caffe_multistep_rates(base_lr, gamma, stepvalues, iterations):
    """Solver::Step's loop: GetLearningRate() at iter_, then ++iter_; multistep bumps current_step_ once per iter."""
    base, gamma = float(np.float32(base_lr)), float(np.float32(gamma))  # proto fields are float
    rates, current_step = [], 0
    for it in range(iterations):
        if current_step < len(stepvalues) and it >= stepvalues[current_step]:
            current_step += 1
        rates.append(np.float32(base * pow(gamma, current_step)))  # Dtype rate = float * double
    return np.array(rates)


class _PolySchedulerTranscript:
    """arcface_torch lr_scheduler.py PolyScheduler, with torch's _LRScheduler.__init__/step inlined."""

    def __init__(self, base_lr, max_steps, warmup_steps):
        self.base_lr, self.warmup_lr_init, self.max_steps, self.warmup_steps, self.power = (
            base_lr, 0.0001, max_steps, warmup_steps, 2)
        self.last_epoch = -1
        self.step()  # _LRScheduler.__init__ -> _initial_step -> step()
        self.last_epoch = -1  # PolyScheduler.__init__: self.last_epoch = last_epoch

    def get_lr(self):
        if self.last_epoch == -1:
            return self.warmup_lr_init
        if self.last_epoch < self.warmup_steps:
            return self.base_lr * float(self.last_epoch) / float(self.warmup_steps)
        return self.base_lr * pow(1 - float(self.last_epoch - self.warmup_steps)
                                  / float(self.max_steps - self.warmup_steps), self.power)

    def step(self):
        self.last_epoch += 1
        self.lr = self.get_lr()  # the param group's lr


def insightface_rates(base_lr, total_step, warmup_step):
    """train_v2.py: per micro-batch, opt.step() with the group's lr, then lr_scheduler.step()."""
    scheduler, rates = _PolySchedulerTranscript(base_lr, total_step, warmup_step), []
    for _ in range(total_step):
        rates.append(scheduler.lr)
        scheduler.step()
    return np.array(rates)


def tiny_forward_backward(W, b, alpha, x, t):
    """y = PReLU(x @ W + b); loss = mean((y - t)**2) (Keras' mean_squared_error); the gradients by hand."""
    z = x @ W + b
    y = np.where(z > 0, z, alpha * z)
    dy = 2.0 * (y - t) / y.size
    dz = dy * np.where(z > 0, 1.0, alpha)
    return {"W": x.T @ dz, "b": dz.sum(0), "alpha": (dy * np.where(z > 0, 0.0, z)).sum(0)}


def caffe_sgd(params, grads_fn, rates, momentum, weight_decay, decayed, form="caffe"):
    """sgd_solver.cpp: Regularize (diff += local_decay * data), ComputeUpdateValue
    (history = local_rate * diff + momentum * history), Update (data -= history); torch: data -= lr * buf."""
    params = {k: v.astype(np.float64).copy() for k, v in params.items()}
    history = {k: np.zeros_like(v) for k, v in params.items()}
    for rate in rates:
        grads = grads_fn(params)
        for k in params:
            diff = grads[k] + (weight_decay * params[k] if k in decayed else 0.0)
            if form == "caffe":
                history[k] = rate * diff + momentum * history[k]
                params[k] = params[k] - history[k]
            else:
                history[k] = momentum * history[k] + diff
                params[k] = params[k] - rate * history[k]
    return params


# ---------------------------------------------------------------- helpers

def tiny_model(seed=0):
    rng = np.random.default_rng(seed)
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(3, name="dense")
    prelu = keras.layers.PReLU(name="prelu")
    model = keras.Model(inputs, prelu(dense(inputs)))
    dense.kernel.assign(rng.normal(size=(4, 3)).astype("float32"))
    dense.bias.assign(rng.normal(size=3).astype("float32") * 0.1)
    prelu.alpha.assign(np.full(3, 0.25, "float32"))
    return model, dense, prelu


def batch(n=8, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype("float32"), rng.normal(size=(n, 3)).astype("float32")


# ---------------------------------------------------------------- presets

def test_unknown_preset_is_a_value_error_listing_the_names():
    with pytest.raises(ValueError, match=r"`name`.*'amsoftmax', 'insightface', 'sphereface'"):
        recipes.get("cosface")


@pytest.mark.parametrize("name, max_iter", [("sphereface", 28000), ("amsoftmax", 30000)])
def test_caffe_presets_are_the_released_solvers(name, max_iter):
    recipe = recipes.get(name)
    assert (recipe.base_lr, recipe.schedule, recipe.gamma, recipe.boundaries) == (0.1, "multistep", 0.1,
                                                                                  (16000, 24000, 28000))
    assert (recipe.momentum, recipe.weight_decay, recipe.total_iterations, recipe.batch_size) == (
        0.9, 5e-4, max_iter, 256)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.base_lr = 1.0


@pytest.mark.parametrize("name, file", [
    ("sphereface", "wy1iu_sphereface__train__code__sphereface_model.prototxt"),
    ("amsoftmax", "happynear_AMSoftmax__prototxt__face_train_test.prototxt")])
def test_batch_size_is_the_released_data_layers(shared_dir, name, file):
    text = (shared_dir / "caffe" / "real" / file).read_text()
    assert recipes.get(name).batch_size == int(re.search(r"batch_size:\s*(\d+)", text).group(1))


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize("name", ["sphereface", "amsoftmax"])
def test_multistep_schedule_matches_caffe(name):
    recipe = recipes.get(name)
    expected = caffe_multistep_rates(0.1, 0.1, [16000, 24000, 28000], recipe.total_iterations)
    points = [0, 15999, 16000, 23999, 24000, 27999] + ([28000, 29999] if name == "amsoftmax" else [])
    schedule = recipe.learning_rate_schedule()
    got = np.array([float(schedule(t)) for t in points], "float32")
    np.testing.assert_array_equal(got, expected[points])
    np.testing.assert_allclose(got[:6], [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_multistep_schedule_counts_caffe_iterations_under_accumulation():
    schedule = recipes.CaffeMultiStepSchedule(0.1, (3,), 0.1, iter_size=2)
    got = [float(schedule(step)) for step in range(8)]  # Keras micro-batches 0..7 = Caffe iterations 0,0,1,1,..
    np.testing.assert_allclose(got, [0.1] * 6 + [0.01] * 2, rtol=1e-6)


def test_poly_warmup_schedule_matches_insightface():
    recipe = recipes.get("insightface")
    steps_per_epoch = 12
    total, warmup = steps_per_epoch * 25, steps_per_epoch * 2  # train_v2.py: num_image // batch * epochs
    expected = insightface_rates(recipe.base_lr, total, warmup)
    schedule = recipe.learning_rate_schedule(steps_per_epoch=steps_per_epoch)
    got = np.array([float(schedule(m)) for m in range(total)])
    assert expected[0] == expected[1] == 0.0 and got[0] == 0.0
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-9)


def test_poly_schedule_without_warmup_matches_insightface():
    expected = insightface_rates(0.1, 50, 0)
    schedule = recipes.PolyWarmupSchedule(0.1, total_steps=50, warmup_steps=0)
    np.testing.assert_allclose([float(schedule(m)) for m in range(50)], expected, rtol=2e-6, atol=1e-9)


def test_poly_recipe_needs_steps_per_epoch():
    with pytest.raises(ValueError, match=r"`steps_per_epoch`.*5179510"):
        recipes.get("insightface").learning_rate_schedule()


@pytest.mark.parametrize("schedule", [recipes.CaffeMultiStepSchedule(0.05, (10, 20), 0.5, iter_size=3),
                                      recipes.PolyWarmupSchedule(0.2, 300, 24, power=1.5)],
                         ids=lambda s: type(s).__name__)
def test_schedule_config_round_trip(schedule):
    config = schedule.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert type(restored) is type(schedule) and restored.get_config() == config
    np.testing.assert_array_equal([float(restored(t)) for t in (0, 11, 25, 61)],
                                  [float(schedule(t)) for t in (0, 11, 25, 61)])


# ---------------------------------------------------------------- optimizer

@pytest.mark.parametrize("form", ["caffe", "pytorch"])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_three_steps_match_the_reference_sgd_with_a_changing_rate(form, jit_compile):
    model, dense, prelu = tiny_model()
    start = {"W": np.array(dense.kernel), "b": np.array(dense.bias), "alpha": np.array(prelu.alpha)}
    schedule = recipes.CaffeMultiStepSchedule(0.1, (1, 2), gamma=0.5)  # 0.1, 0.05, 0.025
    optimizer = recipes.RecipeSGD(schedule, momentum=0.9, weight_decay=0.05, momentum_form=form)
    model.compile(optimizer=optimizer, loss="mean_squared_error", jit_compile=jit_compile)
    x, t = batch()
    for _ in range(3):
        model.train_on_batch(x, t)
    expected = caffe_sgd(start, lambda p: tiny_forward_backward(p["W"], p["b"], p["alpha"], x, t),
                         [0.1, 0.05, 0.025], 0.9, 0.05, decayed={"W"}, form=form)
    np.testing.assert_allclose(np.asarray(dense.kernel), expected["W"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dense.bias), expected["b"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(prelu.alpha), expected["alpha"], rtol=1e-5, atol=1e-6)
    assert int(optimizer.iterations) == 3


def test_default_rule_decays_kernels_only_and_override_wins():
    model, dense, prelu = tiny_model()
    optimizer = recipes.RecipeSGD()
    optimizer.build(model.trainable_variables)
    assert [optimizer.decays(v) for v in (dense.kernel, dense.bias, prelu.alpha)] == [True, False, False]
    bn = keras.layers.BatchNormalization()
    bn.build((None, 3))
    assert not optimizer.decays(bn.gamma) and not optimizer.decays(bn.beta)
    released = recipes.get("sphereface").optimizer(model)  # as the prototxts: PReLU keeps decay_mult 1
    assert [released.decays(v) for v in (dense.kernel, dense.bias, prelu.alpha)] == [True, False, True]
    kernels_only = recipes.get("sphereface").optimizer(model, decay_exclude=("bias", "alpha"))
    assert [kernels_only.decays(v) for v in (dense.kernel, dense.bias, prelu.alpha)] == [True, False, False]


def test_caffe_lr_multipliers_follow_the_released_param_specs():
    optimizer = recipes.get("sphereface").optimizer()
    conv = keras.layers.Conv2D(2, 3, name="conv2_1")
    conv.build((None, 5, 5, 1))
    inner = keras.layers.Conv2D(2, 3, name="conv2_3")
    inner.build((None, 5, 5, 1))
    fc5 = keras.layers.Dense(2, name="fc5")
    fc5.build((None, 3))
    got = [optimizer.lr_multiplier(v) for v in (conv.kernel, conv.bias, inner.bias, fc5.kernel, fc5.bias)]
    assert got == [1.0, 2.0, 0.0, 1.0, 2.0]


@pytest.mark.parametrize("jit_compile", [False, True])
def test_iter_size_two_on_half_batches_equals_one_full_batch(jit_compile):
    recipe = dataclasses.replace(recipes.get("sphereface"), boundaries=(1,), gamma=0.5, weight_decay=0.05)
    x, t = batch(8)
    weights = []
    for iter_size, chunks in ((1, [slice(0, 8)]), (2, [slice(0, 4), slice(4, 8)])):
        model, _, _ = tiny_model()
        model.compile(optimizer=recipe.optimizer(model, iter_size=iter_size), loss="mean_squared_error",
                      jit_compile=jit_compile)
        for _ in range(2):  # two Caffe iterations: rates 0.1 then 0.05
            for part in chunks:
                model.train_on_batch(x[part], t[part])
        weights.append([np.asarray(w) for w in model.weights])
        assert int(model.optimizer.iterations) == 2
    for full, accumulated in zip(*weights):
        np.testing.assert_allclose(accumulated, full, rtol=1e-5, atol=1e-6)


def test_optimizer_config_round_trip():
    optimizer = recipes.get("amsoftmax").optimizer(iter_size=2)
    config = optimizer.get_config()
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is recipes.RecipeSGD and restored.get_config() == config
    assert (restored.momentum_form, restored.l2_decay, restored.gradient_accumulation_steps) == ("caffe", 5e-4, 2)
    assert restored.lr_multipliers == recipes.get("amsoftmax").lr_multipliers
    assert float(restored.learning_rate) == pytest.approx(0.1)


@pytest.mark.parametrize("call, argument", [
    (lambda: recipes.get("sphereface").optimizer(iter_size=0), "iter_size"),
    (lambda: recipes.get("sphereface").learning_rate_schedule(iter_size=1.5), "iter_size"),
    (lambda: recipes.CaffeMultiStepSchedule(0.1, (20, 10)), "boundaries"),
    (lambda: recipes.PolyWarmupSchedule(0.1, 10, 10), "warmup_steps"),
    (lambda: recipes.RecipeSGD(momentum_form="adam"), "momentum_form"),
    (lambda: recipes.RecipeSGD(momentum=1.0), "momentum"),
    (lambda: recipes.RecipeSGD(decay_exclude="bias"), "decay_exclude"),
    (lambda: recipes.RecipeSGD(lr_multipliers=[("bias", -1.0)]), "lr_multipliers"),
])
def test_bad_arguments_name_the_argument(call, argument):
    with pytest.raises(ValueError, match=f"`{re.escape(argument)}"):
        call()
