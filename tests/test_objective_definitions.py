"""Each objective is defined once: its defaults and hyper-parameter checks live in its ``keras_margin.margins``
module, and the head, the loss class and the loss function all take both from there. Loss classes keep their
hyper-parameters as attributes, and every head and loss documents each argument with its actual default.

The expected numbers below are the fact sheet's (the papers' and the authors' released settings), written out
here, not read from the package.
"""

import ast
import inspect
import math
import re

import numpy as np
import pytest
from keras import ops

import keras_margin as km
from keras_margin import layers, losses
from keras_margin.margins import amsoftmax, arcface, normface, sphereface, x2softmax
from tests import numpy_reference as ref

pytestmark = pytest.mark.backend_agnostic

# objective -> (margins module, checker name, head class or None, loss class, loss function, fact-sheet defaults,
# {argument name: margins constant name})
OBJECTIVES = {
    "normface": (normface, "check_normface_parameters", km.NormFaceHead, losses.NormFaceLoss, losses.normface_loss,
                 {"s": 30.0}, {"s": "DEFAULT_S"}),
    "sphereface": (sphereface, "check_sphereface_parameters", None, losses.SphereFaceLoss, losses.sphereface_loss,
                   {"m": 4, "s": 30.0, "lambda_": 0.0},
                   {"m": "DEFAULT_M", "s": "DEFAULT_S", "lambda_": "DEFAULT_LAMBDA"}),
    "amsoftmax": (amsoftmax, "check_amsoftmax_parameters", km.AMSoftmaxHead, losses.AMSoftmaxLoss,
                  losses.amsoftmax_loss, {"s": 30.0, "m": 0.35, "margin_rule": "paper"},
                  {"s": "DEFAULT_S", "m": "DEFAULT_M", "margin_rule": "DEFAULT_MARGIN_RULE"}),
    "x2softmax": (x2softmax, "check_x2softmax_parameters", km.X2SoftmaxHead, losses.X2SoftmaxLoss,
                  losses.x2softmax_loss, {"s": 64.0, "a": -0.9, "h": 0.0, "k": 0.65, "straight_through": False},
                  {"s": "DEFAULT_S", "a": "DEFAULT_A", "h": "DEFAULT_H", "k": "DEFAULT_K",
                   "straight_through": "DEFAULT_STRAIGHT_THROUGH"}),
    "arcface": (arcface, "check_arcface_parameters", km.ArcFaceHead, losses.ArcFaceLoss, losses.arcface_loss,
                {"s": 64.0, "m": 0.5}, {"s": "DEFAULT_S", "m": "DEFAULT_M"}),
    "combined": (arcface, "check_combined_margin_parameters", km.CombinedMarginHead, losses.CombinedMarginLoss,
                 losses.combined_margin_loss, {"s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0},
                 {"s": "COMBINED_DEFAULT_S", "m1": "COMBINED_DEFAULT_M1", "m2": "COMBINED_DEFAULT_M2",
                  "m3": "COMBINED_DEFAULT_M3"}),
}
SPHEREFACE_HEAD_DEFAULTS = {"m": 4, "base": 1000.0, "gamma": 0.12, "power": 1.0, "lambda_min": 5.0, "s": 30.0}
SPHEREFACE_HEAD_CONSTANTS = {"m": "DEFAULT_M", "base": "DEFAULT_BASE", "gamma": "DEFAULT_GAMMA",
                             "power": "DEFAULT_POWER", "lambda_min": "DEFAULT_LAMBDA_MIN", "s": "DEFAULT_S"}


def _defaults(fn, names):
    parameters = inspect.signature(fn).parameters
    return {name: parameters[name].default for name in names}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_signature_defaults_are_the_margins_module_constants(objective):
    module, _, head_cls, loss_cls, loss_fn, expected, constants = OBJECTIVES[objective]
    assert {name: getattr(module, constant) for name, constant in constants.items()} == expected
    users = [loss_cls.__init__, loss_fn] + ([head_cls.__init__] if head_cls is not None else [])
    for user in users:
        defaults = _defaults(user, constants)
        assert defaults == expected, user
        for name, constant in constants.items():
            # The very object of the margins module, not a literal that happens to be equal.
            assert defaults[name] is getattr(module, constant), (user, name)


def test_sphereface_head_schedule_defaults_are_the_margins_module_constants():
    defaults = _defaults(km.SphereFaceHead.__init__, SPHEREFACE_HEAD_CONSTANTS)
    assert defaults == SPHEREFACE_HEAD_DEFAULTS
    for name, constant in SPHEREFACE_HEAD_CONSTANTS.items():
        assert defaults[name] is getattr(sphereface, constant), name
    assert km.SphereFaceHead(5).make_loss().lambda_ == 5.0  # the schedule's floor, as documented


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_head_loss_class_and_loss_function_all_use_the_one_checker(objective, monkeypatch):
    module, checker_name, head_cls, loss_cls, loss_fn, _, _ = OBJECTIVES[objective]
    real = getattr(module, checker_name)
    owners = []

    def spy(owner, *args, **kwargs):
        owners.append(owner)
        return real(owner, *args, **kwargs)

    monkeypatch.setattr(module, checker_name, spy)
    loss = loss_cls()
    loss_fn(np.array([0, 1]), np.array([[0.8, 0.1], [0.3, 0.6]], "float32"))
    if head_cls is not None:
        head_cls(3)
    assert loss_cls.__name__ in owners and loss_fn.__name__ in owners
    if head_cls is not None:
        assert head_cls.__name__ in owners
    owners.clear()
    loss(np.array([0]), np.array([[0.8, 0.1]], "float32"))  # the class calls the function, which checks again
    assert owners == [loss_fn.__name__]


def test_sphereface_head_uses_the_sphereface_checkers(monkeypatch):
    seen = []
    for name in ("check_sphereface_parameters", "check_sphereface_schedule"):
        real = getattr(sphereface, name)
        monkeypatch.setattr(sphereface, name, lambda owner, *a, _real=real, _name=name, **k:
                            seen.append(_name) or _real(owner, *a, **k))
    km.SphereFaceHead(5)
    assert seen == ["check_sphereface_parameters", "check_sphereface_schedule"]


@pytest.mark.parametrize(
    "argument, value, users",
    [
        ("m", 4.0, [lambda v: km.ArcFaceHead(5, m=v), lambda v: losses.ArcFaceLoss(m=v),
                    lambda v: losses.arcface_loss(np.array([0]), np.zeros((1, 2), "float32"), m=v)]),
        ("m", 1.5, [lambda v: km.AMSoftmaxHead(5, m=v), lambda v: losses.AMSoftmaxLoss(m=v),
                    lambda v: losses.amsoftmax_loss(np.array([0]), np.zeros((1, 2), "float32"), m=v)]),
        ("m", 5, [lambda v: km.SphereFaceHead(5, m=v), lambda v: losses.SphereFaceLoss(m=v),
                  lambda v: losses.sphereface_loss(np.array([0]), np.zeros((1, 2), "float32"), m=v)]),
        ("a", 0.5, [lambda v: km.X2SoftmaxHead(5, a=v), lambda v: losses.X2SoftmaxLoss(a=v),
                    lambda v: losses.x2softmax_loss(np.array([0]), np.zeros((1, 2), "float32"), a=v)]),
        ("s", -1.0, [lambda v: km.NormFaceHead(5, s=v), lambda v: losses.NormFaceLoss(s=v),
                     lambda v: losses.normface_loss(np.array([0]), np.zeros((1, 2), "float32"), s=v)]),
        ("m3", 2.0, [lambda v: losses.CombinedMarginLoss(m3=v),
                     lambda v: losses.combined_margin_loss(np.array([0]), np.zeros((1, 2), "float32"), m3=v)]),
    ],
)
def test_head_loss_and_function_refuse_with_the_same_message(argument, value, users):
    messages = []
    for user in users:
        with pytest.raises(ValueError, match=f"`{argument}`") as error:
            user(value)
        messages.append(str(error.value).split(": ", 1)[1])  # without the owner's name
    assert len(set(messages)) == 1, messages


# --------------------------------------------------------------------------------------------------
# Hyper-parameters as attributes of the loss classes.


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_loss_hyper_parameters_are_attributes_with_the_defaults(objective):
    _, _, _, loss_cls, _, expected, _ = OBJECTIVES[objective]
    loss = loss_cls()
    for name, value in expected.items():
        assert getattr(loss, name) == value and type(getattr(loss, name)) is type(value), name
    assert loss.hyper_parameters == expected
    config = loss.get_config()
    assert {k: config[k] for k in expected} == expected
    assert set(config) == set(expected) | {"name", "reduction"}


def test_loss_attributes_examples():
    assert losses.AMSoftmaxLoss().m == 0.35 and losses.AMSoftmaxLoss().s == 30.0
    assert losses.ArcFaceLoss(s=32.0, m=0.3).m == 0.3
    assert losses.SphereFaceLoss(m=2, lambda_=1.5).lambda_ == 1.5
    assert losses.X2SoftmaxLoss(straight_through=True).straight_through is True
    assert losses.CombinedMarginLoss(m1=1.2).m1 == 1.2


def test_changed_attribute_is_used_round_trips_and_is_checked_when_called():
    cos = np.array([[0.8, 0.1], [0.3, 0.6]], "float32")
    y = np.array([0, 1])
    loss = losses.AMSoftmaxLoss(reduction=None)
    loss.m = 0.2
    np.testing.assert_allclose(ops.convert_to_numpy(loss(y, cos)),
                               ref.margin_loss(cos.astype(np.float64), y, 30.0,
                                               lambda c: ref.amsoftmax_target(c, 30.0, 0.2), reduction=None),
                               rtol=1e-5, atol=1e-5)
    assert losses.AMSoftmaxLoss.from_config(loss.get_config()).m == 0.2
    loss.m = 3.0
    with pytest.raises(ValueError, match="amsoftmax_loss: `m` must be a finite number in \\[0.0, 1.0\\]"):
        loss(y, cos)


# --------------------------------------------------------------------------------------------------
# Finite in float64 but not in float32.


@pytest.mark.parametrize(
    "factory, argument",
    [
        (lambda: losses.AMSoftmaxLoss(s=1e39), "s"),
        (lambda: km.ArcFaceHead(5, s=1e39), "s"),
        (lambda: losses.SphereFaceLoss(lambda_=1e308), "lambda_"),
        (lambda: km.SphereFaceHead(5, lambda_min=1e308), "lambda_min"),
        (lambda: km.SphereFaceHead(5, base=1e39), "base"),
        (lambda: losses.X2SoftmaxLoss(a=-1e39), "a"),
        (lambda: losses.CombinedMarginLoss(m1=1e39), "m1"),
        (lambda: losses.normface_loss(np.array([0]), np.zeros((1, 2), "float32"), s=1e39), "s"),
        (lambda: km.AMSoftmaxHead(5, fused_loss=True, sample_rate=1e-50), None),  # underflow is fine: > 0
    ],
)
def test_hyper_parameters_beyond_float32_are_refused(factory, argument):
    if argument is None:
        factory()
        return
    with pytest.raises(ValueError, match=rf"`{re.escape(argument)}` must be a finite number .* float32 can hold"):
        factory()


def test_largest_float32_scale_is_accepted():
    big = float(np.finfo(np.float32).max)
    assert losses.NormFaceLoss(s=big).s == big
    assert math.isfinite(float(np.float32(losses.NormFaceLoss(s=big).s)))


# --------------------------------------------------------------------------------------------------
# Docstrings in Keras form: one `Args:` entry per argument, ending with its actual default.

HEADS = [km.NormFaceHead, km.SphereFaceHead, km.AMSoftmaxHead, km.X2SoftmaxHead, km.ArcFaceHead]
LOSS_CLASSES = [losses.NormFaceLoss, losses.SphereFaceLoss, losses.AMSoftmaxLoss, losses.X2SoftmaxLoss,
                losses.ArcFaceLoss, losses.CombinedMarginLoss]
LOSS_FUNCTIONS = [losses.normface_loss, losses.sphereface_loss, losses.amsoftmax_loss, losses.x2softmax_loss,
                  losses.arcface_loss, losses.combined_margin_loss]


def _section(doc, title):
    lines = inspect.cleandoc(doc).splitlines()
    start = lines.index(f"{title}:")
    body = []
    for line in lines[start + 1:]:
        if line and not line.startswith(" "):
            break
        body.append(line)
    return body


def _args(doc):
    """{name: entry text} of the `Args:` section."""
    entries, name = {}, None
    for line in _section(doc, "Args"):
        match = re.match(r"^    (\*{0,2}\w+): (.*)$", line)
        if match:
            name = match.group(1).lstrip("*")
            entries[name] = match.group(2)
        elif name and line.strip():
            entries[name] += " " + line.strip()
    return entries


def _documented_parameters(obj):
    """Every parameter a user can pass: a head's own, MarginHead's options and CosineDense's kernel arguments."""
    classes = [obj] if not inspect.isclass(obj) else [c for c in obj.__mro__ if c in (obj, layers.MarginHead,
                                                                                        layers.CosineDense)]
    parameters = {}
    for cls in reversed(classes):
        fn = cls.__init__ if inspect.isclass(cls) else cls
        for name, parameter in inspect.signature(fn).parameters.items():
            if name in ("self", "y_true", "cos_theta", "units") or parameter.kind is parameter.VAR_KEYWORD:
                continue
            parameters[name] = parameter.default
    return parameters


@pytest.mark.parametrize("obj", HEADS + LOSS_CLASSES + LOSS_FUNCTIONS, ids=lambda o: o.__name__)
def test_every_argument_documented_with_its_actual_default(obj):
    entries = _args(obj.__doc__)
    for name, default in _documented_parameters(obj).items():
        assert name in entries, f"{obj.__name__}: no Args entry for `{name}`"
        if default is inspect.Parameter.empty:
            continue
        match = re.search(r"Defaults to `([^`]*)`", entries[name])
        assert match, f"{obj.__name__}: `{name}` does not say 'Defaults to'"
        assert ast.literal_eval(match.group(1)) == default, (obj.__name__, name, match.group(1), default)
        assert entries[name].rstrip().endswith("."), (obj.__name__, name)


@pytest.mark.parametrize("head_cls", HEADS + [layers.MarginHead], ids=lambda c: c.__name__)
def test_head_help_shows_the_shared_options_call_forms_shapes_and_reference(head_cls):
    text = inspect.getdoc(head_cls)
    for needed in ("fused_loss:", "chunk_size:", "sample_rate:", "kernel_initializer:", "Call forms:",
                   "head(x)", "head([x, labels], training=True)", "Input shape:", "Output shape:", ">>> "):
        assert needed in text, (head_cls.__name__, needed)
    if head_cls is not layers.MarginHead:
        reference = "\n".join(_section(head_cls.__doc__, "Reference"))
        assert re.search(r"arXiv:\d{4}\.\d{5}", reference), head_cls.__name__
    assert "{{" not in text


@pytest.mark.parametrize("obj", LOSS_CLASSES + LOSS_FUNCTIONS, ids=lambda o: o.__name__)
def test_loss_docstrings_have_a_reference_and_a_printed_example(obj):
    reference = "\n".join(_section(obj.__doc__, "Reference"))
    assert re.search(r"arXiv:\d{4}\.\d{5}", reference), obj.__name__
    lines = inspect.cleandoc(obj.__doc__).splitlines()
    # an example line followed by its expected output (not another prompt, not blank)
    assert any(line.startswith(">>> ") and nxt and not nxt.startswith((">>>", "...")) for line, nxt in
               zip(lines, lines[1:])), obj.__name__
    assert "{{" not in obj.__doc__
