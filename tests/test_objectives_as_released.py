"""The objectives as the authors' released code runs them, against NumPy transcriptions of that code.

- AM-Softmax's ``LabelSpecificAdd`` (happynear/caffe-windows, branch ms, ``src/caffe/layers/label_specific_add.cpp``):
  the margin only where ``cos_y > m``, identity backward, and the annealed bias read before the counter advances;
  on the dense logits, the fused (chunked, class-sampled) loss and the Sequential cosine form with ``head.loss``.
- NormFace's learned scale (``scaled_cosine_softmax.prototxt``: a Caffe ``Scale`` with ``min_value: 0.01``):
  trained in every call form, Sequential + ``head.loss`` included, clamped at its floor, saved and reloaded.
- ``NormFaceContrastiveHead``: normalized softmax + 0.01 x C-contrastive with separate class matrices.

The transcriptions below are written from the C++ and the fact sheets, in float64, without keras_margin.
"""

from __future__ import annotations

import os
import tempfile

import keras
import numpy as np
import pytest
from keras import ops

import keras_margin as km
from keras_margin.losses import HeadLoss

pytestmark = pytest.mark.backend_agnostic


# --------------------------------------------------------------------------------------------------
# NumPy transcriptions
# --------------------------------------------------------------------------------------------------
class CaffeLabelSpecificAdd:
    """Forward_cpu / Backward_cpu of LabelSpecificAddLayer (TRAIN phase), line by line."""

    def __init__(self, bias=0.0, bias_base=None, bias_gamma=0.0, bias_power=1.0, bias_min=0.0, bias_max=0.0,
                 iteration=0):
        self.bias, self.anneal = bias, bias_base is not None
        self.bias_base, self.bias_gamma, self.bias_power = bias_base, bias_gamma, bias_power
        self.bias_min, self.bias_max, self.iteration = bias_min, bias_max, iteration

    def forward(self, bottom, labels):
        top = np.array(bottom, dtype=np.float64)
        if self.anneal:
            f = np.float32  # Dtype = float in the released build
            bias = f(self.bias_base) + np.power(f(1.0) + f(self.bias_gamma) * f(self.iteration), f(self.bias_power)) - f(1.0)
            bias = max(bias, f(self.bias_min))
            self.bias = float(min(bias, f(self.bias_max)))
            self.iteration += 1
        for i, gt in enumerate(labels):
            if top[i, gt] > -self.bias:
                top[i, gt] += self.bias
        return top

    @staticmethod
    def backward(top_diff):
        return np.array(top_diff)  # caffe_copy: the identity


def softmax_loss_and_grad(z, labels):
    """SoftmaxWithLoss (per sample) and its gradient w.r.t. the logits z."""
    z = np.asarray(z, dtype=np.float64)
    shifted = z - z.max(axis=1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(len(labels)), labels])
    grad = p.copy()
    grad[np.arange(len(labels)), labels] -= 1.0
    return loss, grad


def unit(v, axis):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=axis, keepdims=True)


def _grad_wrt_input(fn, value):
    """d sum(fn(value)) / d value on the current backend (TF tape or JAX grad)."""
    if keras.backend.backend() == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: ops.sum(fn(v)))(value))
    import tensorflow as tf

    value = tf.constant(value)
    with tf.GradientTape() as tape:
        tape.watch(value)
        total = tf.reduce_sum(fn(value))
    return tape.gradient(total, value).numpy()


# --------------------------------------------------------------------------------------------------
# AM-Softmax: the Caffe rule
# --------------------------------------------------------------------------------------------------
M, S = 0.35, 30.0
# Target cosines on both sides of cos_y = m (and far from it), one sample each.
TARGET_COS = np.array([M - 1e-3, M + 1e-3, -0.5, 0.9, 0.2, 0.6], "float32")


def _cosines_with_targets(seed=0):
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-0.6, 0.6, size=(len(TARGET_COS), 5)).astype("float32")
    labels = np.arange(len(TARGET_COS)) % 5
    cos[np.arange(len(labels)), labels] = TARGET_COS
    return cos, labels


def test_caffe_rule_loss_and_gradient_match_the_layer():
    cos, labels = _cosines_with_targets()
    layer = CaffeLabelSpecificAdd(bias=-M)
    z = S * layer.forward(cos, labels)  # LabelSpecificAdd, then Scale (s = 30)
    expected_loss, dz = softmax_loss_and_grad(z, labels)
    expected_grad = S * layer.backward(dz)

    loss = km.losses.AMSoftmaxLoss(s=S, m=M, margin_rule="caffe", reduction=None)
    np.testing.assert_allclose(ops.convert_to_numpy(loss(labels, cos)), expected_loss, rtol=2e-5, atol=2e-5)
    grad = _grad_wrt_input(lambda c: km.losses.amsoftmax_loss(labels, c, s=S, m=M, margin_rule="caffe"), cos)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)
    # Below cos_y = m the rule leaves the target alone; above it the paper's formula and the rule agree.
    paper = ops.convert_to_numpy(km.losses.AMSoftmaxLoss(s=S, m=M, reduction=None)(labels, cos))
    above = TARGET_COS > M
    np.testing.assert_allclose(ops.convert_to_numpy(loss(labels, cos))[above], paper[above], rtol=1e-6)
    assert np.all(ops.convert_to_numpy(loss(labels, cos))[~above] < paper[~above])


def test_caffe_rule_on_the_dense_logits_of_the_head():
    cos, labels = _cosines_with_targets(1)
    head = km.AMSoftmaxHead(5, s=S, m=M, margin_rule="caffe", kernel_initializer="identity")
    x = np.zeros((len(labels), 5), "float32")
    # Embeddings whose cosines to the identity kernel's columns are the rows of `cos` (unit rows: scale up).
    x[:] = cos
    logits = ops.convert_to_numpy(head([x, labels], training=True))
    cos_actual = unit(cos, axis=1)
    expected = S * CaffeLabelSpecificAdd(bias=-M).forward(cos_actual, labels)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# AM-Softmax: the margin schedule
# --------------------------------------------------------------------------------------------------
# The released "without feature normalization" net's schedule (face_train_test_wo_fn.prototxt), sped up 1000x.
SCHEDULE = {"bias_base": 0.0, "bias_gamma": -0.05, "bias_power": 1.0, "bias_min": -0.4, "bias_max": 0.0}


def _problem(num_classes=6, batch=6, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, dim)).astype("float32")
    kernel = rng.normal(size=(dim, num_classes)).astype("float32")
    labels = (np.arange(batch) % num_classes).astype("int32")
    return x, kernel, labels


def _reference_steps(x, kernel, labels, steps, s=S):
    """Per-sample losses of `steps` training forward passes of InnerProduct(normalize) -> LabelSpecificAdd -> Scale."""
    layer = CaffeLabelSpecificAdd(**SCHEDULE)
    cos = unit(x, 1) @ unit(kernel, 0)
    out = []
    for _ in range(steps):
        loss, _ = softmax_loss_and_grad(s * layer.forward(cos, labels), labels)
        out.append((loss, -layer.bias))
    return out, layer.iteration


@pytest.mark.parametrize("path", [{}, {"fused_loss": True}, {"fused_loss": True, "chunk_size": 4}])
def test_schedule_first_steps_match_the_layer(path):
    x, kernel, labels = _problem()
    head = km.AMSoftmaxHead(6, s=S, margin_rule="caffe", margin_schedule=SCHEDULE, **path)
    head.build((None, x.shape[1]))
    head.kernel.assign(kernel)
    reference, iterations = _reference_steps(x, kernel, labels, steps=10)
    for step, (expected_loss, expected_margin) in enumerate(reference):
        out = ops.convert_to_numpy(head([x, labels], training=True))
        if not path:  # dense logits: the loss of the label-aware form
            z = out.astype("float64")
            out = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(len(labels)), labels]
        np.testing.assert_allclose(out, expected_loss, rtol=2e-5, atol=2e-5, err_msg=f"step {step}")
        assert float(ops.convert_to_numpy(head.margin)) == pytest.approx(expected_margin, abs=1e-7), step
    # Step 0 used it = 0 (no margin); the margin reached 0.4 at it = 8 and stays clipped there.
    assert reference[0][1] == 0.0 and reference[8][1] == pytest.approx(0.4, abs=1e-7)
    assert int(ops.convert_to_numpy(head.iteration)) == iterations == 10
    # An inference call neither applies the margin nor advances the counter.
    head([x, labels], training=False)
    assert int(ops.convert_to_numpy(head.iteration)) == 10


def test_schedule_on_the_class_sampled_path_advances_once_per_step():
    rng = np.random.default_rng(3)
    x, labels = rng.normal(size=(4, 6)).astype("float32"), np.array([0, 5, 9, 17], "int32")
    head = km.AMSoftmaxHead(40, s=S, margin_rule="caffe", margin_schedule=SCHEDULE, fused_loss=True,
                            sample_rate=0.25, chunk_size=4)
    plain = km.AMSoftmaxHead(40, s=S, fused_loss=True)
    plain.build((None, 6))
    head.build((None, 6))
    plain.kernel.assign(ops.convert_to_numpy(head.kernel))
    for step in range(3):
        sampled = ops.convert_to_numpy(head([x, labels], training=True))
        full_without_margin = ops.convert_to_numpy(plain([x, labels], training=False))
        # Fewer negatives and a margin that only lowers the target: bounded by the full loss with that margin.
        assert np.all(np.isfinite(sampled)), step
        assert float(ops.convert_to_numpy(head.margin)) == pytest.approx(0.05 * step, abs=1e-7)
        if step == 0:  # margin 0: the sampled loss has a subset of the full loss' negatives
            assert np.all(sampled <= full_without_margin + 1e-5)
    assert int(ops.convert_to_numpy(head.iteration)) == 3


def test_schedule_in_a_sequential_model_with_the_heads_loss():
    x, kernel, labels = _problem(batch=12)
    model = keras.Sequential([keras.Input((x.shape[1],))])
    head = km.AMSoftmaxHead(6, s=S, margin_rule="caffe", margin_schedule=SCHEDULE)
    model.add(head)
    loss = head.loss
    assert isinstance(loss, HeadLoss)
    model.compile(keras.optimizers.SGD(0.0), loss=loss, jit_compile=True)  # lr 0: the kernel stays put
    head.kernel.assign(kernel)
    history = model.fit(x, labels, batch_size=4, epochs=2, shuffle=False, verbose=0)
    assert int(ops.convert_to_numpy(head.iteration)) == 6  # one step per batch, 3 batches x 2 epochs
    assert float(ops.convert_to_numpy(head.margin)) == pytest.approx(0.25, abs=1e-7)  # computed at it = 5
    # The second epoch's mean loss is the Caffe net's over its batches at iterations 3, 4, 5.
    layer = CaffeLabelSpecificAdd(**SCHEDULE, iteration=3)
    cos = unit(x, 1) @ unit(kernel, 0)
    batches = [softmax_loss_and_grad(S * layer.forward(cos[i:i + 4], labels[i:i + 4]), labels[i:i + 4])[0].mean()
               for i in range(0, 12, 4)]
    assert history.history["loss"][1] == pytest.approx(np.mean(batches), rel=1e-4)
    # evaluate applies the current margin without advancing the schedule.
    model.evaluate(x, labels, batch_size=4, verbose=0)
    assert int(ops.convert_to_numpy(head.iteration)) == 6


def test_schedule_state_and_the_heads_loss_survive_a_keras_file():
    x, _, labels = _problem(batch=8)
    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(5)])
    head = km.AMSoftmaxHead(6, margin_rule="caffe", margin_schedule=SCHEDULE, name="amsoftmax")
    model.add(head)
    model.compile("sgd", loss=head.loss)
    model.fit(x, labels, batch_size=4, epochs=1, verbose=0)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.keras")
        model.save(path)
        del model, head
        loaded = keras.saving.load_model(path)
    loaded_head = loaded.layers[-1]
    assert loaded_head.get_config()["margin_schedule"] == {**SCHEDULE}
    assert int(ops.convert_to_numpy(loaded_head.iteration)) == 2
    assert loaded.loss.get_head() is loaded_head  # the reloaded compile step bound the loss to the reloaded head
    loaded.fit(x, labels, batch_size=4, epochs=1, verbose=0)
    assert int(ops.convert_to_numpy(loaded_head.iteration)) == 4


def test_schedule_and_rule_are_checked():
    with pytest.raises(ValueError, match="margin_rule"):
        km.AMSoftmaxHead(4, margin_rule="Caffe")
    with pytest.raises(ValueError, match="unknown keys"):
        km.AMSoftmaxHead(4, margin_schedule={"gamma": 0.1})
    with pytest.raises(ValueError, match="bias_min <= bias_max <= 0"):
        km.AMSoftmaxHead(4, margin_schedule={"bias_min": 0.0, "bias_max": 0.3})
    with pytest.raises(ValueError, match="no head named"):
        HeadLoss("no_such_head")


# --------------------------------------------------------------------------------------------------
# NormFace: the learned scale
# --------------------------------------------------------------------------------------------------
def test_learned_scale_trains_in_a_sequential_model_with_the_heads_loss():
    x, kernel, labels = _problem(num_classes=4, batch=8)
    model = keras.Sequential([keras.Input((x.shape[1],))])
    head = km.NormFaceHead(4, s=10.0, learn_scale=True)
    model.add(head)
    model.compile(keras.optimizers.SGD(0.5), loss=head.loss, jit_compile=True)
    head.kernel.assign(kernel)
    # One full-batch SGD step: ds = mean over samples of d CE / d s = mean(sum_j p_j cos_j - cos_y).
    cos = unit(x, 1) @ unit(kernel, 0)
    p = np.exp(10.0 * cos) / np.exp(10.0 * cos).sum(1, keepdims=True)
    grad_s = np.mean((p * cos).sum(1) - cos[np.arange(8), labels])
    model.fit(x, labels, batch_size=8, epochs=1, verbose=0)
    assert float(ops.convert_to_numpy(head.scale_weight)) == pytest.approx(10.0 - 0.5 * grad_s, rel=1e-4)


def test_learned_scale_is_held_at_its_floor():
    x, kernel, labels = _problem(num_classes=4, batch=8)
    inputs, ids = keras.Input((x.shape[1],)), keras.Input((), dtype="int32")
    head = km.NormFaceHead(4, s=0.5, learn_scale=True, scale_min=0.4)
    model = keras.Model([inputs, ids], head([inputs, ids]))
    # Labels opposite to the nearest class: lowering s lowers the loss, so SGD drives s down to the floor.
    cos = unit(x, 1) @ unit(kernel, 0)
    worst = np.argmin(cos, axis=1).astype("int32")
    head.kernel.assign(kernel)
    head.kernel.trainable = False  # only s moves
    model.compile(keras.optimizers.SGD(20.0), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit([x, worst], worst, batch_size=8, epochs=3, verbose=0)
    assert float(ops.convert_to_numpy(head.scale_weight)) == pytest.approx(0.4)
    assert float(ops.convert_to_numpy(head.scale())) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="scale_min"):
        km.NormFaceHead(4, s=0.5, learn_scale=True, scale_min=1.0)


# --------------------------------------------------------------------------------------------------
# NormFace: softmax + 0.01 x C-contrastive, separate matrices
# --------------------------------------------------------------------------------------------------
def test_softmax_plus_contrastive_matches_the_released_config():
    x, kernel, labels = _problem(num_classes=5, batch=6)
    rng = np.random.default_rng(7)
    agents = rng.normal(size=kernel.shape).astype("float32")
    head = km.NormFaceContrastiveHead(5, fused_loss=True)
    head.build((None, x.shape[1]))
    head.kernel.assign(kernel)
    head.agents.assign(agents)
    per_sample = ops.convert_to_numpy(head([x, labels], training=True))
    # SoftmaxWithLoss over Scale(4) of the cosines + 0.01 x GeneralContrastiveLoss over InnerDistance (L2).
    softmax, _ = softmax_loss_and_grad(4.0 * (unit(x, 1) @ unit(kernel, 0)), labels)
    distances = ((unit(x, 1)[:, None, :] - unit(agents, 0).T[None, :, :]) ** 2).sum(-1)
    own = np.eye(5, dtype=bool)[labels]
    contrastive = distances[own] + np.where(own, 0.0, np.maximum(0.0, 1.0 - distances)).sum(1)
    np.testing.assert_allclose(per_sample, softmax + 0.01 * contrastive, rtol=1e-5, atol=1e-6)
    # The unfused form returns the softmax logits and adds only the weighted contrastive term.
    unfused = km.NormFaceContrastiveHead(5)
    unfused.build((None, x.shape[1]))
    unfused.set_weights(head.get_weights())
    logits = ops.convert_to_numpy(unfused([x, labels]))
    np.testing.assert_allclose(logits, 4.0 * (unit(x, 1) @ unit(kernel, 0)), rtol=1e-5, atol=1e-5)
    assert float(ops.convert_to_numpy(unfused.losses[0])) == pytest.approx(0.01 * contrastive.mean(), rel=1e-5)
    with pytest.raises(ValueError, match="needs the labels"):
        unfused.loss


def test_softmax_plus_contrastive_trains_a_separable_problem():
    rng = np.random.default_rng(0)
    centers = unit(rng.normal(size=(4, 6)), 1)
    labels = np.repeat(np.arange(4), 16).astype("int32")
    x = (centers[labels] + 0.2 * rng.normal(size=(64, 6))).astype("float32")
    keras.utils.set_random_seed(0)
    inputs, ids = keras.Input((6,)), keras.Input((), dtype="int32")
    embedding = keras.layers.Dense(6)(inputs)
    head = km.NormFaceContrastiveHead(4, s=4.0)
    model = keras.Model([inputs, ids], head([embedding, ids]))
    model.compile(keras.optimizers.Adam(0.05), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
    history = model.fit([x, labels], labels, batch_size=16, epochs=30, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    assert float(ops.convert_to_numpy(head.scale_weight)) > 4.0  # the learned scale grows on separable data
    scores = ops.convert_to_numpy(head(keras.Model(inputs, embedding)(x)))
    assert np.mean(np.argmax(scores, axis=1) == labels) > 0.95
