"""tests/harness.py's ``run_head_test`` on every head that keras_margin.layers exports, in every call form.

The heads are discovered from ``keras_margin.layers.__all__`` (every ``MarginHead`` subclass), so a new head is
covered as soon as it is exported; ``HEAD_CASES`` only adds constructor variants and weight counts.
"""

from __future__ import annotations

import functools

import keras
import pytest

import keras_margin.layers
from keras_margin import losses
from keras_margin.layers import CosineDense, MarginHead
from tests.harness import FORMS, run_head_test

pytestmark = pytest.mark.backend_agnostic

NUM_CLASSES = 10

#: Per head: (id suffix, constructor kwargs, trainable weights, non-trainable weights, forms without a fit step[,
#: harness options]). A head missing here runs with no extra kwargs and its weight counts unchecked. The options:
#: "forms" (the call forms the head supports, default all), "label_forms_add_loss" (see run_head_test).
_SCHEDULE = {"bias_gamma": -0.05, "bias_min": -0.35}
_UNFUSED_AND_FUSED = ("cosine", "logits_training", "logits_inference", "fused_training", "fused_inference")
# A variant (other hyper-parameters of the same head) runs one form per code path; the default case runs all.
_VARIANT = {"forms": ("cosine", "logits_training", "fused_chunked_training", "fused_sampled_training")}
HEAD_CASES = {
    "NormFaceHead": [("", {}, 1, 0, ()), ("learn_scale", {"learn_scale": True, "s": 16.0}, 2, 0, (), _VARIANT)],
    "SphereFaceHead": [("", {}, 1, 1, ()), ("m2", {"m": 2, "base": 10.0}, 1, 1, (), _VARIANT)],
    "AMSoftmaxHead": [("", {}, 1, 0, ()),
                      ("caffe_schedule", {"margin_rule": "caffe", "margin_schedule": _SCHEDULE}, 1, 2, (), _VARIANT)],
    "X2SoftmaxHead": [("", {}, 1, 0, ())],
    "ArcFaceHead": [("", {}, 1, 0, ())],
    "CombinedMarginHead": [("", {}, 1, 0, ()), ("m1", {"m1": 1.35, "m2": 0.2, "m3": 0.1}, 1, 0, (), _VARIANT)],
    "NormFaceContrastiveHead": [("", {}, 3, 0, ("cosine",),
                                 {"forms": _UNFUSED_AND_FUSED, "label_forms_add_loss": True})],
    # No chunked / class-sampled fused loss: those take one kernel column per class (see its docstring).
    "SubCenterArcFaceHead": [("", {}, 1, 0, (), {"forms": _UNFUSED_AND_FUSED})],
    # A batch statistic (t, s) updated from the labels: no cosine-path loss; no chunked fused loss (no non-target
    # hook in keras_margin.chunked); AdaCos' statistic sums over every class, so no class sampling either.
    "CurricularFaceHead": [("", {}, 1, 1, ("cosine",), {"forms": _UNFUSED_AND_FUSED + ("fused_sampled_training",)})],
    "AdaCosHead": [("", {}, 1, 1, ("cosine",), {"forms": _UNFUSED_AND_FUSED}),
                   ("fixed", {"adaptive": False}, 1, 0, (), {"forms": ("cosine", "logits_training")})],
    "AdaFaceHead": [("", {}, 1, 2, ("cosine",), {"forms": _UNFUSED_AND_FUSED + ("fused_sampled_training",)})],
    # No cosine-path loss (the margin and g(a) read |x|). A training call adds lambda_g * mean(g) in the logits form
    # too, an inference call adds nothing: the logits-inference form runs apart, without label_forms_add_loss.
    "MagFaceHead": [("", {}, 1, 0, ("cosine",),
                     {"forms": ("cosine", "logits_training", "fused_training", "fused_inference",
                                "fused_chunked_training", "fused_chunked_inference", "fused_sampled_training"),
                      "label_forms_add_loss": True}),
                    ("inference", {}, 1, 0, (), {"forms": ("logits_inference",)})],
    # Un-normalized logits |x||W_j|cos: no cosine-path loss, no chunked or class-sampled fused loss.
    "LSoftmaxHead": [("", {}, 1, 1, ("cosine",), {"forms": _UNFUSED_AND_FUSED})],
}


def exported_heads():
    heads = []
    for name in keras_margin.layers.__all__:
        obj = getattr(keras_margin.layers, name)
        if isinstance(obj, type) and issubclass(obj, MarginHead) and obj is not MarginHead:
            heads.append(obj)
    return heads


_TENSORFLOW_ONLY = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                      reason="harness variants run on TensorFlow; the default cases cover this backend")


def _cases():
    cases = []
    for cls in exported_heads():
        for suffix, kwargs, trainable, non_trainable, untrainable, *options in HEAD_CASES.get(
                cls.__name__, [("", {}, None, None, ())]):
            options = dict(options[0]) if options else {}
            case_id = cls.__name__ + (f"-{suffix}" if suffix else "")
            # A variant exercises hyper-parameters, whose code is backend-independent: on TensorFlow only
            # (the default case runs every code path on both backends; test_objectives_as_released and
            # test_combined_margin check the variants' numbers on both).
            marks = [_TENSORFLOW_ONLY] if suffix else []
            for form in options.pop("forms", FORMS):
                cases.append(pytest.param(cls, kwargs, trainable, non_trainable, untrainable, options, form,
                                          id=f"{case_id}-{form}", marks=marks))
    return cases


def test_every_exported_head_is_discovered():
    names = {cls.__name__ for cls in exported_heads()}
    assert {"NormFaceHead", "SphereFaceHead", "AMSoftmaxHead", "X2SoftmaxHead", "ArcFaceHead"} <= names
    assert set(HEAD_CASES) <= names, "HEAD_CASES names a head that keras_margin.layers no longer exports"


@pytest.mark.parametrize("cls, kwargs, trainable, non_trainable, untrainable, options, form", _cases())
def test_head(cls, kwargs, trainable, non_trainable, untrainable, options, form):
    run_head_test(functools.partial(cls, NUM_CLASSES, **kwargs), forms=[form],
                  expected_num_trainable_weights=trainable, expected_num_non_trainable_weights=non_trainable,
                  untrainable_forms=untrainable, **options)


def test_cosine_dense():
    # The base layer has only the cosine form; any cosine loss trains it.
    run_head_test(functools.partial(CosineDense, NUM_CLASSES), forms=["cosine"], expected_num_trainable_weights=1,
                  expected_num_non_trainable_weights=0, cosine_loss=losses.NormFaceLoss())
