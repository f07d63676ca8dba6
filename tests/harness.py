"""One test harness for the margin heads, in the manner of Keras' ``keras.src.testing.TestCase.run_layer_test``.

``run_head_test(head_factory, ...)`` checks a head in each of its call forms (``FORMS``):

- the call on ``keras.Input`` builds a symbolic model whose output shape and dtype are those of the eager call
  (the batch dimension may be ``None`` symbolically);
- the symbolic model and the eager call agree numerically on the same weights and the same state (SphereFace's
  ``iteration``, Partial FC's seed are snapshot and restored around each call);
- the built head has the expected numbers of trainable and non-trainable weights (and seed generators); a fused
  call adds exactly one loss, the other forms none;
- ``get_config``/``from_config`` (and ``keras.saving.serialize_keras_object``) round trip to the same config, and
  the clone computes the same outputs once the weights are copied; a ``.keras`` save/load round trip restores the
  head's class, config, weights and outputs;
- one training step (``model.fit`` on one batch) in float32 (every form) and under ``mixed_bfloat16`` (one form per
  code path, ``MIXED_PRECISION_FORMS``) gives a finite loss and changes the kernel; under mixed precision the kernel stays float32 and the outputs are float32.

``head_factory(**overrides)`` returns a fresh, unbuilt head; the harness passes the call form's options
(``fused_loss``, ``chunk_size``, ``sample_rate``) as overrides, e.g. ``functools.partial(AMSoftmaxHead, 10, m=0.3)``.
Only ``keras.ops`` and NumPy are used, so the harness runs on every backend.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import keras
import numpy as np
from keras import ops


@dataclass(frozen=True)
class CallForm:
    """One way of calling a head: constructor overrides, whether labels are passed, and ``training``."""

    overrides: dict
    labels: bool
    training: bool | None

    @property
    def fused(self) -> bool:
        return bool(self.overrides.get("fused_loss"))


FORMS = {
    "cosine": CallForm({}, labels=False, training=None),
    "logits_training": CallForm({}, labels=True, training=True),
    "logits_inference": CallForm({}, labels=True, training=False),
    "fused_training": CallForm({"fused_loss": True}, labels=True, training=True),
    "fused_inference": CallForm({"fused_loss": True}, labels=True, training=False),
    "fused_chunked_training": CallForm({"fused_loss": True, "chunk_size": 3}, labels=True, training=True),
    "fused_chunked_inference": CallForm({"fused_loss": True, "chunk_size": 3}, labels=True, training=False),
    "fused_sampled_training": CallForm({"fused_loss": True, "sample_rate": 0.5}, labels=True, training=True),
}

POLICIES = ("float32", "mixed_bfloat16")
#: The forms also run under mixed precision: one per code path (cosines, dense logits, the chunked fused loss,
#: the class-sampled fused loss), which the other forms share; every form runs in float32.
MIXED_PRECISION_FORMS = ("cosine", "logits_training", "fused_chunked_training", "fused_sampled_training")


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _dtype(x) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def _state(head):
    """Every variable of the head (weights, SphereFace's iteration, seed generator states) as NumPy."""
    return [_np(v) for v in head.variables]


def _restore(head, state):
    for variable, value in zip(head.variables, state, strict=True):
        variable.assign(value)


def _seed_generators(head):
    return [v for v in vars(head).values() if isinstance(v, keras.random.SeedGenerator)]


def _config_json(config) -> str:
    return json.dumps(config, sort_keys=True, default=repr)


def _inputs(form: CallForm, embedding_dim: int):
    x = keras.Input((embedding_dim,), name="embeddings")
    return [x, keras.Input((), dtype="int32", name="labels")] if form.labels else x


def _data(form: CallForm, x, y):
    return [x, y] if form.labels else x


def _call(head, form: CallForm, inputs, training):
    kwargs = {} if training is None else {"training": training}
    return head(inputs, **kwargs)


def _symbolic_model(head, form: CallForm, embedding_dim: int, training="form"):
    """A functional model on keras.Input; ``training="form"`` fixes the form's own ``training`` in the node."""
    inputs = _inputs(form, embedding_dim)
    return keras.Model(inputs, _call(head, form, inputs, form.training if training == "form" else training))


def _assert_spec_matches(symbolic, eager, where):
    assert len(symbolic.shape) == len(eager.shape), (where, symbolic.shape, eager.shape)
    for s, e in zip(symbolic.shape, eager.shape):
        assert s is None or s == e, (where, symbolic.shape, eager.shape)
    assert _dtype(symbolic) == _dtype(eager), (where, _dtype(symbolic), _dtype(eager))


def _assert_close(actual, expected, tol, where):
    np.testing.assert_allclose(_np(actual).astype("float64"), _np(expected).astype("float64"),
                               rtol=tol, atol=tol, err_msg=where)


def _check_weight_counts(head, form, where, expected_trainable, expected_non_trainable):
    assert head.built, where
    if expected_trainable is not None:
        assert len(head.trainable_weights) == expected_trainable, (where, [w.path for w in head.trainable_weights])
    if expected_non_trainable is not None:
        assert len(head.non_trainable_weights) == expected_non_trainable, (
            where, [w.path for w in head.non_trainable_weights])
    expected_seeds = 1 if form.overrides.get("sample_rate", 1.0) < 1.0 else 0
    assert len(_seed_generators(head)) == expected_seeds, where


def _check_symbolic_and_eager(head_factory, form, policy, x, y, embedding_dim, tol, expected_trainable,
                              expected_non_trainable, where, label_forms_add_loss=False):
    head = head_factory(**form.overrides)
    model = _symbolic_model(head, form, embedding_dim)
    _check_weight_counts(head, form, where, expected_trainable, expected_non_trainable)
    if policy != "float32":
        assert head.compute_dtype == keras.mixed_precision.Policy(policy).compute_dtype, where
        for weight in head.weights:
            if keras.backend.is_float_dtype(weight.dtype):
                assert _dtype(weight) == "float32", (where, weight.path, _dtype(weight))
    data = _data(form, x, y)
    before = _state(head)
    symbolic_out = model(data)
    _restore(head, before)
    eager_out = _call(head, form, data, form.training)
    assert len(head.losses) == (1 if form.fused or (form.labels and label_forms_add_loss) else 0), (where, head.losses)
    _assert_spec_matches(model.outputs[0], eager_out, where)
    assert _dtype(eager_out) == "float32", (where, _dtype(eager_out))
    assert np.all(np.isfinite(_np(eager_out))), where
    _assert_close(symbolic_out, eager_out, tol, where + ": symbolic model vs eager call")
    if form.fused:
        _assert_close(head.losses[0], ops.mean(eager_out), tol, where + ": added loss vs mean per-sample loss")
    return head, model, before


def _check_serialization(head, model, form, state, x, y, embedding_dim, tol, where):
    data = _data(form, x, y)
    _restore(head, state)
    reference = _np(model(data))

    config = head.get_config()
    clone = type(head).from_config(config)
    assert _config_json(clone.get_config()) == _config_json(config), where + ": from_config"
    revived = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(keras.saving.serialize_keras_object(head))))
    assert type(revived) is type(head), where
    assert _config_json(revived.get_config()) == _config_json(config), where + ": serialize_keras_object"
    clone_model = _symbolic_model(clone, form, embedding_dim)
    assert len(clone.variables) == len(head.variables), where
    _restore(clone, state)
    _assert_close(clone_model(data), reference, tol, where + ": from_config clone with copied weights")

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "head.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)  # no custom_objects: the heads are registered
    loaded_head = loaded.layers[-1]
    assert type(loaded_head) is type(head), where
    assert _config_json(loaded_head.get_config()) == _config_json(config), where + ": .keras config"
    for original, restored in zip(head.weights, loaded_head.weights, strict=True):
        np.testing.assert_array_equal(_np(restored), _np(original), err_msg=f"{where}: .keras {original.path}")
    _restore(loaded_head, state)  # the weights are equal (checked above); this also aligns the seed state
    _assert_close(loaded(data), reference, tol, where + ": .keras reload")


def _check_training_step(head_factory, form, x, y, embedding_dim, cosine_loss, where):
    head = head_factory(**form.overrides)
    inputs = _inputs(form, embedding_dim)
    model = keras.Model(inputs, head(inputs))  # fit passes training=True
    if form.fused:
        loss, targets = None, None
    elif form.labels:
        loss, targets = keras.losses.SparseCategoricalCrossentropy(from_logits=True), y
    else:
        loss, targets = (cosine_loss if cosine_loss is not None else head.loss), y
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    kernel_before = _np(head.kernel)
    history = model.fit(_data(form, x, y), targets, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 1, where
    value = history.history["loss"][0]
    assert np.isfinite(value), (where, value)
    kernel_after = _np(head.kernel)
    assert np.all(np.isfinite(kernel_after)), where
    assert not np.array_equal(kernel_after, kernel_before), where + ": the training step left the kernel unchanged"
    assert _dtype(head.kernel) == "float32", where


def run_head_test(head_factory, *, forms=None, embedding_dim: int = 8, batch_size: int = 4, policies=POLICIES,
                  expected_num_trainable_weights: int | None = None,
                  expected_num_non_trainable_weights: int | None = None,
                  run_serialization_check: bool = True, run_training_check: bool = True,
                  untrainable_forms=(), cosine_loss=None, label_forms_add_loss: bool = False, seed: int = 0):
    """Run every check of the module docstring on ``head_factory`` for the call forms ``forms``.

    Args:
        head_factory: ``head_factory(**overrides)`` returns a fresh unbuilt head (num_classes >= 8, so that
            ``sample_rate=0.5`` samples fewer classes than there are).
        forms: names from ``FORMS`` (default: all; "cosine" only for a layer without labels, e.g. CosineDense).
        embedding_dim, batch_size: the input shapes (small: each form takes a few seconds).
        policies: dtype policies to run under ("float32", "mixed_bfloat16").
        expected_num_trainable_weights, expected_num_non_trainable_weights: the built head's weight counts
            (None: not checked).
        run_serialization_check, run_training_check: switch those checks off.
        untrainable_forms: forms that have no training step (NormFaceContrastiveHead has no cosine-path loss).
        cosine_loss: the loss of the cosine-form training step (default ``head.loss``).
        label_forms_add_loss: the label-aware forms add one loss also when not fused (NormFaceContrastiveHead's
            C-contrastive term).
    """
    forms = tuple(FORMS) if forms is None else tuple(forms)
    unknown = set(forms) - set(FORMS)
    if unknown:
        raise ValueError(f"unknown call forms {sorted(unknown)}; known: {sorted(FORMS)}")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch_size, embedding_dim)).astype("float32")
    previous_policy = keras.mixed_precision.global_policy()
    try:
        for policy in policies:
            keras.mixed_precision.set_global_policy(policy)
            tol = 1e-5 if policy == "float32" else 2e-2
            for name in forms:
                if policy != "float32" and name not in MIXED_PRECISION_FORMS:
                    continue
                form = FORMS[name]
                where = f"{name} under {policy}"
                num_classes = head_factory(**form.overrides).units
                y = (np.arange(batch_size) % num_classes).astype("int32")
                head, model, state = _check_symbolic_and_eager(
                    head_factory, form, policy, x, y, embedding_dim, tol, expected_num_trainable_weights,
                    expected_num_non_trainable_weights, where, label_forms_add_loss)
                if run_serialization_check and policy == "float32":
                    _check_serialization(head, model, form, state, x, y, embedding_dim, tol, where)
                if run_training_check and name not in untrainable_forms:
                    _check_training_step(head_factory, form, x, y, embedding_dim, cosine_loss, where)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
